"""Which signed documents a device accepts: the pure core of the secure update.

This module does no I/O and reads no clock: every function takes the current
:class:`TrustState` and ``now`` and returns a new state or raises a
:class:`~shared.errors.VerificationError` naming the reason. The agent persists
the state it gets back; on any error it persists nothing.

The rules (the TUF/Uptane threat model, adapted):

1. The keyring must be signed by ``root_threshold`` distinct root keys (baked into
   the device image), must not have expired, and its version must not go down. A
   reused version with different content is refused as a rollback too.
2. The desired state must be signed by ``keyring.threshold`` distinct keys the
   keyring lists, be addressed to this device, not have expired, and carry a
   manifest version above the last accepted one. The same version with the same
   bytes is a harmless re-delivery (retained messages arrive on every connect).
3. Fast-forward recovery: when a newer keyring no longer lists any key that signed
   the last accepted manifest (the online key was rotated out, maybe because it
   leaked and signed a huge version), the manifest-version floor restarts from 0
   -- only manifests from the new keys can pass rule 2 after that.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from shared.errors import (
    ExpiredError,
    MalformedError,
    MessageError,
    RollbackError,
    WrongDeviceError,
)
from shared.integrity import sha256_hex
from shared.messages import DesiredMessage, DesiredState, Keyring
from shared.signing import (
    Envelope,
    PayloadType,
    VerifyKey,
    verify_envelope,
    verify_envelope_signers,
)

__all__ = ["Acceptance", "TrustState", "accept_desired", "accept_keyring"]


@dataclass(frozen=True, slots=True)
class TrustState:
    """Everything a device must remember between two trust decisions."""

    root_keys: Mapping[str, VerifyKey]
    root_threshold: int = 1
    keyring: Keyring | None = None
    keyring_sha256: str | None = None
    manifest_version: int = 0
    manifest_sha256: str | None = None
    manifest_signers: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_root_keys(cls, keys: list[VerifyKey], threshold: int = 1) -> TrustState:
        if not keys:
            raise ValueError("a device needs at least one root key")
        if threshold > len(keys):
            raise ValueError("root threshold is higher than the number of root keys")
        return cls(root_keys={k.keyid: k for k in keys}, root_threshold=threshold)


@dataclass(frozen=True, slots=True)
class Acceptance:
    """The outcome of :func:`accept_desired`."""

    state: TrustState
    desired: DesiredState
    is_new: bool
    """False when this exact manifest was already accepted (a re-delivery)."""


def _parse(model: type[Keyring] | type[DesiredState], payload: bytes) -> Keyring | DesiredState:
    try:
        return model.from_bytes(payload)
    except MessageError as e:
        raise MalformedError(str(e)) from e


def accept_keyring(state: TrustState, envelope: Envelope, *, now: datetime) -> TrustState:
    """Verify a root-signed keyring and return the state that holds it."""
    payload = verify_envelope(
        envelope,
        payload_type=PayloadType.KEYRING,
        trusted_keys=state.root_keys,
        threshold=state.root_threshold,
    )
    digest = sha256_hex(payload)
    keyring = _parse(Keyring, payload)
    assert isinstance(keyring, Keyring)
    if now >= keyring.expires_at:
        raise ExpiredError(f"keyring v{keyring.version} expired at {keyring.expires_at}")
    current = state.keyring
    if current is not None:
        if keyring.version < current.version:
            raise RollbackError(
                f"keyring v{keyring.version} is older than the accepted v{current.version}"
            )
        if keyring.version == current.version:
            if digest != state.keyring_sha256:
                raise RollbackError(f"keyring v{keyring.version} was reused with other content")
            return state
    new_state = replace(state, keyring=keyring, keyring_sha256=digest)
    listed = {k.keyid for k in keyring.keys}
    if state.manifest_signers and not (state.manifest_signers & listed):
        new_state = replace(
            new_state, manifest_version=0, manifest_sha256=None, manifest_signers=frozenset()
        )
    return new_state


def accept_desired(
    state: TrustState, message: DesiredMessage, *, device_id: str, now: datetime
) -> Acceptance:
    """Verify a desired-state message for ``device_id``; raise on any failed rule."""
    state = accept_keyring(state, message.keyring, now=now)
    keyring = state.keyring
    assert keyring is not None
    trusted = keyring.verify_keys()
    payload, signers = verify_envelope_signers(
        message.manifest,
        payload_type=PayloadType.DESIRED_STATE,
        trusted_keys=trusted,
        threshold=keyring.threshold,
    )
    digest = sha256_hex(payload)
    desired = _parse(DesiredState, payload)
    assert isinstance(desired, DesiredState)
    if desired.device_id != device_id:
        raise WrongDeviceError(
            f"desired state is addressed to {desired.device_id!r}, this is {device_id!r}"
        )
    if now >= desired.expires_at:
        raise ExpiredError(f"manifest v{desired.manifest_version} expired at {desired.expires_at}")
    if desired.manifest_version < state.manifest_version:
        raise RollbackError(
            f"manifest v{desired.manifest_version} is older than the accepted "
            f"v{state.manifest_version}"
        )
    if desired.manifest_version == state.manifest_version:
        if digest != state.manifest_sha256:
            raise RollbackError(
                f"manifest v{desired.manifest_version} was reused with other content"
            )
        return Acceptance(state=state, desired=desired, is_new=False)
    new_state = replace(
        state,
        manifest_version=desired.manifest_version,
        manifest_sha256=digest,
        manifest_signers=signers,
    )
    return Acceptance(state=new_state, desired=desired, is_new=True)
