"""Helpers for agent releases and agent rollouts: wheels, publishing, and devices that
answer agent updates over the real broker.

- :func:`make_agent_wheel` -- a small wheel of the ``edgefleet`` distribution built in
  memory (a real RECORD with sha256 hashes), or a broken one (``defect=...``) for the
  refusals.
- :func:`publish_agent_release` / :func:`start_agent_rollout` -- through the API of a
  :class:`~tests.server.rollouts.harness.RolloutServer` (or any ``call``), the way the
  end-to-end test with the real agent will publish a wheel and start its rollout.
- :class:`AgentUpdateDevice` -- an enrolled device on a real MQTT connection that
  follows its desired state: it reports the models named as running and, for an agent
  deployment, either switches (events ``activated`` + ``health_check_passed``, state
  with the new ``agent_version`` and an ``activated`` ``agent_update``) or goes back
  by itself (``rolled_back`` with the reason). Its messages are the real contract
  classes of :mod:`shared.messages`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import uuid
import zipfile
from collections.abc import Callable
from datetime import datetime
from typing import Any

from shared.messages import (
    AgentUpdateResult,
    DesiredMessage,
    DesiredState,
    DeviceState,
    Event,
    EventKind,
    ModelWindow,
    RunningModel,
    RuntimeInfo,
    TelemetryReport,
    UpdateOutcome,
    UpdateResult,
)
from shared.topics import Channel, device_topic
from tests.conftest import TestClient

__all__ = [
    "AgentUpdateDevice",
    "make_agent_wheel",
    "publish_agent_release",
    "start_agent_rollout",
]


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_agent_wheel(version: str, *, defect: str | None = None) -> bytes:
    """A wheel of ``edgefleet`` ``version``: ``agent/`` and ``shared/`` packages, METADATA,
    WHEEL, RECORD. ``defect`` breaks one thing: ``name``, ``metadata_version``,
    ``platlib``, ``platform_tag``, ``no_agent``, ``hash``, ``unrecorded``, ``unsafe_path``."""
    name = "otherpkg" if defect == "name" else "edgefleet"
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {
        "shared/__init__.py": b'"""shared."""\n',
        "shared/messages.py": b"VERSION = 1\n",
        "agent/__main__.py": b"print('agent')\n",
        "agent/cli.py": b"def main() -> None: ...\n",
    }
    if defect != "no_agent":
        files["agent/__init__.py"] = f'__version__ = "{version}"\n'.encode()
    if defect == "unsafe_path":
        files["../escape.py"] = b"x = 1\n"
    meta_version = "9.9.9" if defect == "metadata_version" else version
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {meta_version}\nRequires-Python: >=3.11\n\n"
    ).encode()
    purelib = "false" if defect == "platlib" else "true"
    tag = "cp311-cp311-linux_x86_64" if defect == "platform_tag" else "py3-none-any"
    files[f"{dist_info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: edgefleet-tests\nRoot-Is-Purelib: {purelib}\n"
        f"Tag: {tag}\n\n"
    ).encode()
    record_lines = []
    for path, data in files.items():
        digest = _hash(data)
        if defect == "hash" and path == "agent/__main__.py":
            digest = _hash(b"something else")
        record_lines.append(f"{path},{digest},{len(data)}")
    record_lines.append(f"{dist_info}/RECORD,,")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        if defect == "unrecorded":
            archive.writestr("agent/sneaky.py", b"import os\n")
        archive.writestr(f"{dist_info}/RECORD", "\n".join(record_lines) + "\n")
    return buffer.getvalue()


def publish_agent_release(
    call: Callable[..., Any], version: str, *, data: bytes | None = None, expect: int = 201
) -> Any:
    """``POST /agent-releases`` with a wheel of ``version`` (``data``: that wheel instead)."""
    wheel = make_agent_wheel(version) if data is None else data
    return call(
        "POST",
        "/agent-releases",
        expect,
        content=wheel,
        params={"filename": f"edgefleet-{version}-py3-none-any.whl"},
        headers={"Content-Type": "application/octet-stream"},
    )


def start_agent_rollout(
    call: Callable[..., Any], version: str, group: str, **options: Any
) -> dict[str, Any]:
    """``POST /rollouts`` of agent release ``version`` to ``group`` (options as the API's)."""
    created: dict[str, Any] = call(
        "POST", "/rollouts", 201, json={"agent_version": version, "group": group, **options}
    )
    return created


class AgentUpdateDevice:
    """A device that follows its retained desired state over a real MQTT connection.

    ``fail_agent``: agent versions it cannot keep -- it reports going back by itself with
    ``reason`` (``health_timeout`` by default), as a real agent whose new version never
    reported healthy does.
    """

    def __init__(
        self,
        device_id: str,
        client: TestClient,
        *,
        clock: Callable[[], datetime],
        profile: str,
        agent_version: str = "0.1.0",
        fail_agent: frozenset[str] = frozenset(),
        reason: str = "health_timeout",
    ) -> None:
        self.device_id = device_id
        self.client = client
        self.clock = clock
        self.profile = profile
        self.agent_version = agent_version
        self.fail_agent = fail_agent
        self.reason = reason
        self.models: dict[str, RunningModel] = {}
        self.manifest_version = 0
        self.agent_update: AgentUpdateResult | None = None
        self.last_update: UpdateResult | None = None
        self.seen: list[DesiredState] = []
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"device-{device_id}", daemon=True)

    # -- lifecycle

    def start(self) -> AgentUpdateDevice:
        self.client.subscribe(device_topic(self.device_id, Channel.DESIRED))
        self.report()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                received = self.client.expect(timeout=0.2)
            except AssertionError:
                continue
            if not received.payload:
                continue
            message = DesiredMessage.from_bytes(received.payload)
            desired = DesiredState.from_bytes(message.manifest.payload_bytes())
            if desired.manifest_version <= self.manifest_version:
                continue
            self.apply(desired)

    # -- behaviour

    def apply(self, desired: DesiredState) -> None:
        now = self.clock()
        self.seen.append(desired)
        self.manifest_version = desired.manifest_version
        self.models = {
            d.model_name: RunningModel(
                model_name=d.model_name,
                model_version=d.model_version,
                target=d.target,
                sha256=d.artifact.sha256,
                activated_at=now,
            )
            for d in desired.deployments
        }
        self.last_update = UpdateResult(
            manifest_version=desired.manifest_version, outcome=UpdateOutcome.ACTIVATED, at=now
        )
        agent = desired.agent
        if agent is not None and agent.version != self.agent_version:
            previous = self.agent_version
            kinds: list[tuple[EventKind, str | None]]
            if agent.version in self.fail_agent:
                kinds = [(EventKind.ACTIVATED, None), (EventKind.ROLLED_BACK, self.reason)]
                outcome = UpdateOutcome.ROLLED_BACK
            else:
                kinds = [(EventKind.ACTIVATED, None), (EventKind.HEALTH_CHECK_PASSED, None)]
                outcome = UpdateOutcome.ACTIVATED
                self.agent_version = agent.version
            for kind, reason in kinds:
                self.event(desired, kind, agent.version, reason, agent.artifact.sha256)
            self.agent_update = AgentUpdateResult(
                manifest_version=desired.manifest_version,
                rollout_id=desired.rollout_id,
                version=agent.version,
                previous_version=previous,
                outcome=outcome,
                reason=None if outcome is UpdateOutcome.ACTIVATED else self.reason,
                at=now,
            )
        self.report()

    def event(
        self,
        desired: DesiredState,
        kind: EventKind,
        agent_version: str,
        reason: str | None,
        sha256: str,
    ) -> None:
        event = Event(
            device_id=self.device_id,
            event_id=uuid.uuid4().hex,
            kind=kind,
            at=self.clock(),
            manifest_version=desired.manifest_version,
            rollout_id=desired.rollout_id,
            sha256=sha256,
            reason=reason,
            agent_version=agent_version,
        )
        self.client.publish(device_topic(self.device_id, Channel.EVENTS), event.to_bytes())

    def send_telemetry(self, windows: list[ModelWindow], *, start: datetime, end: datetime) -> None:
        """One telemetry report of ``windows`` over ``start``..``end``."""
        self.seq += 1
        report = TelemetryReport(
            device_id=self.device_id,
            seq=self.seq,
            window_start=start,
            window_end=end,
            models=windows,
        )
        self.client.publish(device_topic(self.device_id, Channel.TELEMETRY), report.to_bytes())

    def report(self) -> None:
        state = DeviceState(
            device_id=self.device_id,
            agent_version=self.agent_version,
            profile=self.profile,
            arch="x86_64",
            runtime=RuntimeInfo(name="litert", version="2.3.0"),
            manifest_version=self.manifest_version,
            keyring_version=1,
            models=list(self.models.values()),
            last_update=self.last_update,
            agent_update=self.agent_update,
            reported_at=self.clock(),
        )
        self.client.publish(
            device_topic(self.device_id, Channel.STATE), state.to_bytes(), retain=True
        )
