"""Every way a desired state can be refused leaves the device exactly as it was: the same
model served, the same trust state on disk, only a ``rejected`` event in the outbox."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.agent import Agent
from agent.config import AgentConfig
from shared.messages import (
    ArtifactRef,
    Deployment,
    DesiredMessage,
    DesiredState,
    Event,
    KeyEntry,
    Keyring,
)
from shared.signing import Envelope, PayloadType, SigningKey, sign_envelope

DEVICE = "cam-refuse"
PROFILE = "edge-x86_64-litert"
ROOT = SigningKey.generate()
ONLINE = SigningKey.generate()


def keyring(*keys: SigningKey, days: float = 1, signer: SigningKey = ROOT) -> Envelope:
    now = datetime.now(UTC)
    ring = Keyring(
        version=1,
        issued_at=now - timedelta(days=2),
        expires_at=now + timedelta(days=days),
        keys=[KeyEntry(keyid=k.keyid, public_key=k.public.to_base64()) for k in keys],
    )
    return sign_envelope(ring.to_bytes(), PayloadType.KEYRING, [signer])


KEYRING = keyring(ONLINE)  # the fleet's current keyring: one version, one content


def desired(
    *,
    version: int = 2,
    device: str = DEVICE,
    target: str = PROFILE,
    hours: float = 1,
    signer: SigningKey = ONLINE,
    ring: Envelope | None = None,
) -> bytes:
    now = datetime.now(UTC)
    state = DesiredState(
        device_id=device,
        manifest_version=version,
        issued_at=now - timedelta(hours=2),
        expires_at=now + timedelta(hours=hours),
        deployments=[
            Deployment(
                model_name="digits",
                model_version=1,
                target=target,
                artifact=ArtifactRef(sha256="ab" * 32, length=4096),
            )
        ],
    )
    return DesiredMessage(
        keyring=ring or KEYRING,
        manifest=sign_envelope(state.to_bytes(), PayloadType.DESIRED_STATE, [signer]),
    ).to_bytes()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    config = AgentConfig.model_validate(
        {
            "device_id": DEVICE,
            "profile": PROFILE,
            "data_dir": str(tmp_path / "device"),
            "trust": {"root_keys": [ROOT.public.to_base64()]},
            "http": {"enabled": False},
        }
    )
    agent = Agent(config)
    agent.start()
    # an accepted manifest first (version 1, nothing to fetch), so there is state to keep
    now = datetime.now(UTC)
    empty = DesiredState(
        device_id=DEVICE, manifest_version=1, issued_at=now, expires_at=now + timedelta(hours=1)
    )
    accepted = DesiredMessage(
        keyring=KEYRING,
        manifest=sign_envelope(empty.to_bytes(), PayloadType.DESIRED_STATE, [ONLINE]),
    ).to_bytes()
    assert agent.apply_desired(accepted) is not None
    yield agent
    agent.stop()


def tamper(payload: bytes) -> bytes:
    message = json.loads(payload)
    inner = json.loads(Envelope.model_validate(message["manifest"]).payload_bytes())
    inner["manifest_version"] = 99
    import base64

    message["manifest"]["payload"] = base64.b64encode(json.dumps(inner).encode()).decode()
    return json.dumps(message).encode()


CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "bad signature": (lambda: tamper(desired()), "bad_signature"),
    "unknown key": (lambda: desired(signer=SigningKey.generate()), "unknown_key"),
    "keyring not from the root": (
        lambda: desired(ring=keyring(ONLINE, signer=SigningKey.generate())),
        "unknown_key",
    ),
    "expired manifest": (lambda: desired(hours=-1), "expired"),
    "expired keyring": (lambda: desired(ring=keyring(ONLINE, days=-1)), "expired"),
    "rollback": (lambda: desired(version=1), "rollback"),
    "another device": (lambda: desired(device="cam-other"), "wrong_device"),
    "another profile": (lambda: desired(target="cloud-x86_64-onnx"), "wrong_target"),
    "not a desired state": (lambda: b'{"schema": "ef.desired"}', "malformed"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_refusal_changes_nothing_and_is_reported(agent: Agent, case: str) -> None:
    build, reason = CASES[case]
    trust_file = agent.trust_store.path.read_bytes()
    before = (agent.trust.manifest_version, dict(agent.models))
    depth = agent.outbox.depth()
    assert agent.apply_desired(build()) is None
    assert agent.trust_store.path.read_bytes() == trust_file
    assert (agent.trust.manifest_version, dict(agent.models)) == before
    assert agent.last_update is not None and agent.last_update.outcome == "rejected"
    assert agent.last_update.reason == reason
    events = [Event.from_bytes(m.payload) for m in agent.outbox.pending(1000)]
    assert agent.outbox.depth() == depth + 1
    assert (events[-1].kind.value, events[-1].reason) == ("rejected", reason)
    assert not any(agent.store.tmp_dir.iterdir())  # nothing downloaded


def test_without_broker_an_accepted_update_fails_cleanly(agent: Agent) -> None:
    plan = agent.apply_desired(desired(version=3))
    assert plan is not None and agent.trust.manifest_version == 3
    assert agent.last_update is not None and agent.last_update.outcome == "failed"
    assert agent.last_update.reason == "download_failed"
    assert agent.models == {}


def test_a_failed_install_is_retried_when_the_desired_state_comes_again(agent: Agent) -> None:
    payload = desired(version=4)
    agent.apply_desired(payload)
    first = agent.last_update
    again = agent.apply_desired(payload)  # e.g. the retained message on reconnect
    assert again is not None and not again.is_new and len(again.fetch) == 1
    assert agent.last_update is not None and agent.last_update is not first
    assert agent.last_update.reason == "download_failed"
    assert agent.trust.manifest_version == 4
