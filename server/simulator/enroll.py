"""Enrolling simulated devices through the server's own API, as real agents do.

Each device posts its facts with a provisioning token (``POST /api/v1/enroll``) and gets
its broker credentials and the fleet's root key back; nothing is written into the
database behind the API's back, so a simulated fleet is indistinguishable in the
inventory from a real one (agent version ``sim-1`` aside).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from server.commands.client import ApiClient, ApiError
from server.profiles import Profile
from server.simulator.device import AGENT_VERSION

__all__ = ["Enrolled", "enroll_devices"]


@dataclass(frozen=True)
class Enrolled:
    device_id: str
    username: str
    password: str
    broker_url: str | None
    root_public_key: str
    status: str


def enroll_devices(
    client: ApiClient,
    *,
    token: str,
    device_ids: list[str],
    profile: Profile,
    tags: Mapping[str, str] | Callable[[int], Mapping[str, str]] | None = None,
    progress: Callable[[int], None] | None = None,
    max_wait: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Enrolled]:
    """Enroll ``device_ids`` with ``token``; ``tags`` may vary by device index.

    A device id the fleet already holds is an :class:`ApiError` (409) naming it: a
    simulator never takes over an identity. The server limits enrollments per token and
    per address (429): a refused device is asked again a second later, for at most
    ``max_wait`` seconds each -- a big simulated fleet enrolls faster when the server's
    ``EDGEFLEET_ENROLL_PER_MINUTE_PER_TOKEN`` / ``..._PER_ADDRESS`` are raised.
    """
    enrolled = []
    for index, device_id in enumerate(device_ids):
        device_tags = tags(index) if callable(tags) else (tags or {})
        body = {
            "token": token,
            "device_id": device_id,
            "profile": profile.name,
            "arch": profile.arch,
            "runtime": {"name": profile.runtime.name, "version": profile.runtime.version},
            "runtimes": {profile.runtime.name: profile.runtime.version},
            "agent_version": AGENT_VERSION,
            "tags": dict(device_tags),
        }
        answer = _post_enrollment(client, body, device_id, max_wait=max_wait, sleep=sleep)
        credentials = answer["credentials"]
        enrolled.append(
            Enrolled(
                device_id=device_id,
                username=credentials["username"],
                password=credentials["password"],
                broker_url=credentials.get("broker_url"),
                root_public_key=answer["root_public_key"],
                status=answer["status"],
            )
        )
        if progress is not None:
            progress(index + 1)
    return enrolled


def _post_enrollment(
    client: ApiClient,
    body: dict[str, Any],
    device_id: str,
    *,
    max_wait: float,
    sleep: Callable[[float], None],
) -> dict[str, Any]:
    waited = 0.0
    while True:
        try:
            answer: dict[str, Any] = client.post("/enroll", json=body)
            return answer
        except ApiError as e:
            if e.status_code != 429 or waited >= max_wait:
                raise ApiError(f"enrolling {device_id}: {e}", e.status_code) from e
        sleep(1.0)
        waited += 1.0
