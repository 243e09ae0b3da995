"""The agent's update decisions and its persisted trust state."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from agent.updater import TrustStore, TrustStoreError, plan_update
from shared.errors import MalformedError, RejectReason, RollbackError, VerificationError
from shared.trust import TrustState
from tests.shared.conftest import NOW, key, make_desired, make_keyring, make_message

ROOT, ONLINE = key("root"), key("online-1")
PROFILE = "edge-arm64-litert"


def deployment(name: str, sha: str, version: int = 3) -> dict[str, object]:
    return {
        "model_name": name,
        "model_version": version,
        "target": PROFILE,
        "artifact": {"sha256": sha * 64, "length": 4096},
    }


def plan(state: TrustState, payload: bytes, running: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return plan_update(
        state,
        payload,
        device_id="cam-1",
        profile=PROFILE,
        runtimes=["litert"],
        running=running or {},
        now=NOW,
    )


def fresh() -> TrustState:
    return TrustState.from_root_keys([ROOT.public])


def test_plan_lists_what_to_fetch_keep_and_remove() -> None:
    desired = make_desired(
        manifest_version=4, deployments=[deployment("digits", "a"), deployment("vib", "b")]
    )
    payload = make_message(desired, root=ROOT, signers=[ONLINE]).to_bytes()
    result = plan(fresh(), payload, running={"digits": "a" * 64, "old": "c" * 64})
    assert [d.model_name for d in result.fetch] == ["vib"]
    assert result.unchanged == ["digits"] and result.remove == ["old"]
    assert result.state.manifest_version == 4 and result.is_new
    again = plan(result.state, payload, running={"digits": "a" * 64, "vib": "b" * 64})
    assert not again.is_new and again.fetch == []


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"not json", RejectReason.MALFORMED),
        (
            make_message(
                make_desired(
                    deployments=[{**deployment("digits", "a"), "target": "cloud-x86_64-onnx"}]
                ),
                root=ROOT,
                signers=[ONLINE],
            ).to_bytes(),
            RejectReason.WRONG_TARGET,
        ),
        (
            make_message(make_desired(device_id="cam-2"), root=ROOT, signers=[ONLINE]).to_bytes(),
            RejectReason.WRONG_DEVICE,
        ),
        (
            make_message(
                make_desired(), root=ROOT, signers=[key("intruder")], keyring=make_keyring(ONLINE)
            ).to_bytes(),
            RejectReason.UNKNOWN_KEY,
        ),
    ],
)
def test_refusals_carry_their_reason(payload: bytes, reason: RejectReason) -> None:
    with pytest.raises(VerificationError) as info:
        plan(fresh(), payload)
    assert info.value.reason is reason


def test_malformed_is_a_verification_error() -> None:
    with pytest.raises(MalformedError):
        plan(fresh(), b"{}")


def test_trust_state_survives_a_restart_and_still_refuses_rollback(tmp_path: Path) -> None:
    store = TrustStore(tmp_path, root_keys=[ROOT.public])
    assert store.load(now=NOW).manifest_version == 0
    message = make_message(make_desired(manifest_version=9), root=ROOT, signers=[ONLINE])
    accepted = plan(store.load(now=NOW), message.to_bytes())
    store.save(accepted.state, keyring_envelope=message.keyring)
    restarted = TrustStore(tmp_path, root_keys=[ROOT.public]).load(now=NOW + timedelta(hours=1))
    assert restarted.manifest_version == 9
    assert restarted.manifest_signers == {ONLINE.keyid}
    assert restarted.keyring is not None and restarted.keyring.version == 1
    older = make_message(make_desired(manifest_version=8), root=ROOT, signers=[ONLINE])
    with pytest.raises(RollbackError):
        plan(restarted, older.to_bytes())


def test_a_tampered_trust_file_is_refused(tmp_path: Path) -> None:
    store = TrustStore(tmp_path, root_keys=[ROOT.public])
    message = make_message(make_desired(manifest_version=2), root=ROOT, signers=[ONLINE])
    store.save(plan(fresh(), message.to_bytes()).state, keyring_envelope=message.keyring)
    data = json.loads(store.path.read_text())
    forged = make_message(
        make_desired(),
        root=key("attacker-root"),
        signers=[key("attacker")],
        keyring=make_keyring(key("attacker")),
    )
    data["keyring"] = forged.keyring.model_dump(mode="json", by_alias=True)
    store.path.write_text(json.dumps(data))
    with pytest.raises(TrustStoreError, match="does not verify"):
        store.load(now=NOW)
    store.path.write_text("{not json")
    with pytest.raises(TrustStoreError, match="unreadable"):
        store.load(now=NOW)


def test_an_expired_persisted_keyring_is_kept_as_the_floor(tmp_path: Path) -> None:
    store = TrustStore(tmp_path, root_keys=[ROOT.public])
    message = make_message(make_desired(manifest_version=2), root=ROOT, signers=[ONLINE])
    store.save(plan(fresh(), message.to_bytes()).state, keyring_envelope=message.keyring)
    later = NOW + timedelta(days=60)
    state = store.load(now=later)
    assert state.keyring is not None and state.keyring.version == 1
    fresh_keyring = make_keyring(ONLINE, version=2, days=120)
    renewed = make_message(
        make_desired(manifest_version=3, expires_in=timedelta(days=61)),
        root=ROOT,
        signers=[ONLINE],
        keyring=fresh_keyring,
    )
    result = plan_update(
        state,
        renewed.to_bytes(),
        device_id="cam-1",
        profile=PROFILE,
        runtimes=["litert"],
        running={},
        now=later,
    )
    assert result.state.keyring is not None and result.state.keyring.version == 2
