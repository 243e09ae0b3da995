"""The device's trust rules, as pure functions of state, documents and now."""

from __future__ import annotations

from datetime import timedelta

import pytest

from shared.errors import (
    BadSignatureError,
    ExpiredError,
    MalformedError,
    RejectReason,
    RollbackError,
    ThresholdError,
    UnknownKeyError,
    WrongDeviceError,
)
from shared.messages import DesiredMessage
from shared.signing import PayloadType, sign_envelope
from shared.trust import TrustState, accept_desired, accept_keyring
from tests.shared.conftest import NOW, key, make_desired, make_keyring, make_message

ROOT, ONLINE = key("root"), key("online-1")


def fresh() -> TrustState:
    return TrustState.from_root_keys([ROOT.public])


def accept(state: TrustState, message: DesiredMessage, device_id: str = "cam-1"):  # type: ignore[no-untyped-def]
    return accept_desired(state, message, device_id=device_id, now=NOW)


def test_a_valid_manifest_is_accepted_and_recorded() -> None:
    result = accept(
        fresh(), make_message(make_desired(manifest_version=5), root=ROOT, signers=[ONLINE])
    )
    assert result.is_new
    assert result.state.manifest_version == 5
    assert result.state.manifest_signers == {ONLINE.keyid}
    assert result.state.keyring is not None and result.state.keyring.version == 1
    assert result.desired.deployments[0].model_name == "digits"


def test_redelivery_of_the_same_manifest_is_harmless() -> None:
    message = make_message(make_desired(manifest_version=5), root=ROOT, signers=[ONLINE])
    first = accept(fresh(), message)
    again = accept(first.state, message)
    assert not again.is_new and again.state == first.state


@pytest.mark.parametrize(
    ("build", "error", "reason"),
    [
        (
            lambda: make_message(
                make_desired(), root=ROOT, signers=[key("stranger")], keyring=make_keyring(ONLINE)
            ),
            UnknownKeyError,
            RejectReason.UNKNOWN_KEY,
        ),
        (
            lambda: make_message(make_desired(), root=key("fake-root"), signers=[ONLINE]),
            UnknownKeyError,
            RejectReason.UNKNOWN_KEY,
        ),
        (
            lambda: make_message(make_desired(device_id="cam-2"), root=ROOT, signers=[ONLINE]),
            WrongDeviceError,
            RejectReason.WRONG_DEVICE,
        ),
        (
            lambda: make_message(
                make_desired(expires_in=timedelta(minutes=-1)), root=ROOT, signers=[ONLINE]
            ),
            ExpiredError,
            RejectReason.EXPIRED,
        ),
        (
            lambda: make_message(
                make_desired(), root=ROOT, signers=[ONLINE], keyring=make_keyring(ONLINE, days=-1)
            ),
            ExpiredError,
            RejectReason.EXPIRED,
        ),
        (
            lambda: make_message(
                make_desired(),
                root=ROOT,
                signers=[ONLINE, ONLINE],
                keyring=make_keyring(ONLINE, key("online-2"), threshold=2),
            ),
            ThresholdError,
            RejectReason.THRESHOLD_NOT_MET,
        ),
    ],
    ids=[
        "unknown-online-key",
        "unknown-root",
        "other-device",
        "expired-manifest",
        "expired-keyring",
        "duplicate-signer",
    ],
)
def test_each_rejection_names_its_reason(build, error, reason) -> None:  # type: ignore[no-untyped-def]
    state = fresh()
    with pytest.raises(error) as info:
        accept(state, build())
    assert info.value.reason is reason


def test_tampered_manifest_payload_is_a_bad_signature() -> None:
    message = make_message(make_desired(), root=ROOT, signers=[ONLINE])
    other = make_message(make_desired(manifest_version=99), root=ROOT, signers=[ONLINE])
    message.manifest.payload = other.manifest.payload  # swap payload, keep signature
    with pytest.raises(BadSignatureError):
        accept(fresh(), message)


def test_rollback_is_refused_and_state_is_untouched() -> None:
    state = accept(
        fresh(), make_message(make_desired(manifest_version=5), root=ROOT, signers=[ONLINE])
    ).state
    for version in (4, 1):
        with pytest.raises(RollbackError):
            accept(
                state,
                make_message(make_desired(manifest_version=version), root=ROOT, signers=[ONLINE]),
            )
    # same version, different content (equivocation)
    other = make_desired(manifest_version=5, expires_in=timedelta(hours=7))
    with pytest.raises(RollbackError, match="reused"):
        accept(state, make_message(other, root=ROOT, signers=[ONLINE]))
    assert state.manifest_version == 5


def test_keyring_cannot_go_back() -> None:
    state = accept_keyring(
        fresh(),
        sign_envelope(make_keyring(ONLINE, version=3).to_bytes(), PayloadType.KEYRING, [ROOT]),
        now=NOW,
    )
    with pytest.raises(RollbackError):
        accept_keyring(
            state,
            sign_envelope(make_keyring(ONLINE, version=2).to_bytes(), PayloadType.KEYRING, [ROOT]),
            now=NOW,
        )
    with pytest.raises(RollbackError, match="reused"):
        accept_keyring(
            state,
            sign_envelope(
                make_keyring(key("x"), version=3).to_bytes(), PayloadType.KEYRING, [ROOT]
            ),
            now=NOW,
        )


def test_keyring_payload_must_be_a_keyring() -> None:
    envelope = sign_envelope(b'{"schema":"ef.keyring","version":0}', PayloadType.KEYRING, [ROOT])
    with pytest.raises(MalformedError):
        accept_keyring(fresh(), envelope, now=NOW)


def test_online_key_rotation_needs_no_reflash() -> None:
    state = accept(
        fresh(), make_message(make_desired(manifest_version=2), root=ROOT, signers=[ONLINE])
    ).state
    new_key = key("online-2")
    rotated = make_keyring(new_key, version=2)
    result = accept(
        state,
        make_message(
            make_desired(manifest_version=3), root=ROOT, signers=[new_key], keyring=rotated
        ),
    )
    assert result.state.manifest_version == 3
    # the old key is gone from the keyring: it no longer signs anything
    with pytest.raises(UnknownKeyError):
        accept(
            result.state,
            make_message(
                make_desired(manifest_version=4), root=ROOT, signers=[ONLINE], keyring=rotated
            ),
        )


def test_fast_forward_recovery_after_a_leaked_key_is_rotated_out() -> None:
    # An attacker with the online key pushes a huge version: devices accept it.
    attacked = accept(
        fresh(), make_message(make_desired(manifest_version=2**40), root=ROOT, signers=[ONLINE])
    ).state
    with pytest.raises(RollbackError):
        accept(
            attacked, make_message(make_desired(manifest_version=7), root=ROOT, signers=[ONLINE])
        )
    # The root rotates the online key out; the floor restarts and normal versions work.
    new_key = key("online-2")
    recovered = accept(
        attacked,
        make_message(
            make_desired(manifest_version=7),
            root=ROOT,
            signers=[new_key],
            keyring=make_keyring(new_key, version=2),
        ),
    )
    assert recovered.is_new and recovered.state.manifest_version == 7


def test_root_threshold() -> None:
    other_root = key("root-2")
    state = TrustState.from_root_keys([ROOT.public, other_root.public], threshold=2)
    keyring = make_keyring(ONLINE)
    single = sign_envelope(keyring.to_bytes(), PayloadType.KEYRING, [ROOT])
    with pytest.raises(ThresholdError):
        accept_keyring(state, single, now=NOW)
    both = sign_envelope(keyring.to_bytes(), PayloadType.KEYRING, [ROOT, other_root])
    assert accept_keyring(state, both, now=NOW).keyring == keyring
    with pytest.raises(ValueError):
        TrustState.from_root_keys([ROOT.public], threshold=2)
    with pytest.raises(ValueError):
        TrustState.from_root_keys([])
