"""Enrolling simulated devices through the server's own API, as real agents do.

Each device posts its facts with a provisioning token (``POST /api/v1/enroll``) and gets
its broker credentials and the fleet's root key back; nothing is written into the
database behind the API's back, so a simulated fleet is indistinguishable in the
inventory from a real one (agent version ``sim-1`` aside).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

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
) -> list[Enrolled]:
    """Enroll ``device_ids`` with ``token``; ``tags`` may vary by device index.

    A device id the fleet already holds is an :class:`ApiError` (409) naming it: a
    simulator never takes over an identity.
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
        try:
            answer = client.post("/enroll", json=body)
        except ApiError as e:
            raise ApiError(f"enrolling {device_id}: {e}", e.status_code) from e
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
