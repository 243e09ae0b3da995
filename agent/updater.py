"""Secure updates, the pure part: which signed desired state to accept, and what it asks for.

:func:`plan_update` is a function of the persisted trust state, the message that
arrived, what the device runs, what it can run, and ``now``. It performs no I/O: the
agent persists the new trust state only after the plan succeeded, fetches what the
plan lists, and reports the plan's events. :class:`TrustStore` is the thin adapter
that keeps the trust state on disk.

What always holds:

- A rejected message changes nothing: the function raises, the caller keeps its old
  trust state and its running models, and reports a ``rejected`` event with the
  error's ``reason`` (a :class:`shared.errors.RejectReason`).
- A deployment for another profile, or for a runtime this device does not have, is
  refused as a whole (``wrong_target``) before anything is fetched.
- Re-delivery of the accepted manifest (retained messages arrive on every connect)
  is not new, and plans only what is still missing -- so an install that failed (no
  network, full disk) is retried when the desired state comes again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from shared.errors import (
    ContractError,
    ExpiredError,
    MalformedError,
    MessageError,
    WrongTargetError,
)
from shared.integrity import sha256_hex
from shared.messages import Deployment, DesiredMessage, DesiredState, Keyring
from shared.signing import Envelope, PayloadType, VerifyKey, verify_envelope
from shared.trust import TrustState, accept_desired, accept_keyring

__all__ = ["TrustStore", "TrustStoreError", "UpdatePlan", "plan_update"]


@dataclass(frozen=True)
class UpdatePlan:
    """What an accepted desired state asks of the device."""

    state: TrustState
    desired: DesiredState
    keyring_envelope: Envelope
    """The root-signed keyring the message carried: what the trust store persists."""
    fetch: list[Deployment] = field(default_factory=list)
    """Deployments whose artifact is not what runs now: download, verify, activate."""
    unchanged: list[str] = field(default_factory=list)
    """Model names already running exactly the desired artifact."""
    remove: list[str] = field(default_factory=list)
    """Model names running now that the desired state no longer lists."""
    is_new: bool = True


def plan_update(
    state: TrustState,
    payload: bytes,
    *,
    device_id: str,
    profile: str,
    runtimes: Iterable[str],
    running: Mapping[str, str],
    now: datetime,
) -> UpdatePlan:
    """Accept or refuse one ``…/desired`` payload; ``running`` maps model name -> sha256."""
    try:
        message = DesiredMessage.from_bytes(payload)
    except MessageError as e:
        raise MalformedError(str(e)) from e
    acceptance = accept_desired(state, message, device_id=device_id, now=now)
    desired = acceptance.desired
    available = set(runtimes)
    for deployment in desired.deployments:
        if deployment.target != profile:
            raise WrongTargetError(
                f"{deployment.model_name} v{deployment.model_version} is built for "
                f"{deployment.target}; this device is {profile}"
            )
    fetch, unchanged = [], []
    for deployment in desired.deployments:
        if running.get(deployment.model_name) == deployment.artifact.sha256:
            unchanged.append(deployment.model_name)
        else:
            fetch.append(deployment)
    if fetch and not available:
        raise WrongTargetError("this device has no model runtime installed")
    wanted = {d.model_name for d in desired.deployments}
    return UpdatePlan(
        state=acceptance.state,
        desired=desired,
        keyring_envelope=message.keyring,
        fetch=fetch,
        unchanged=unchanged,
        remove=sorted(set(running) - wanted),
        is_new=acceptance.is_new,
    )


class TrustStoreError(AgentError):
    """The persisted trust state cannot be read; the device refuses updates until fixed."""


class TrustStore:
    """The trust state on disk (``<data_dir>/trust.json``), written atomically.

    It keeps the accepted keyring's signed envelope (re-verified against the root
    keys from the image at every load, so a tampered file is refused, not trusted)
    and the manifest floor: version, payload hash and signers. It also keeps the last
    few keyrings before the current one (:data:`EARLIER_KEYRINGS`), so the bundles a
    rotated-out online key signed while it was listed still load at start-up
    (:meth:`bundle_keys`); new downloads are checked against the current keyring only.
    """

    def __init__(
        self, data_dir: Path, *, root_keys: list[VerifyKey], root_threshold: int = 1
    ) -> None:
        self.path = data_dir / "trust.json"
        self._root_keys = root_keys
        self._root_threshold = root_threshold

    def load(self, *, now: datetime) -> TrustState:
        state = TrustState.from_root_keys(self._root_keys, self._root_threshold)
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return state
        except (OSError, ValueError) as e:
            raise TrustStoreError(f"{self.path} is unreadable: {e}") from e
        try:
            keyring_envelope = data.get("keyring")
            if keyring_envelope is not None:
                state = _accept_persisted_keyring(
                    state, Envelope.model_validate(keyring_envelope), now
                )
            return TrustState(
                root_keys=state.root_keys,
                root_threshold=state.root_threshold,
                keyring=state.keyring,
                keyring_sha256=state.keyring_sha256,
                manifest_version=int(data.get("manifest_version", 0)),
                manifest_sha256=data.get("manifest_sha256"),
                manifest_signers=frozenset(data.get("manifest_signers", [])),
            )
        except (ContractError, ValueError, TypeError) as e:
            raise TrustStoreError(f"{self.path} does not verify against the root keys: {e}") from e

    def save(self, state: TrustState, *, keyring_envelope: Envelope | None) -> None:
        keyring = (
            None
            if keyring_envelope is None
            else keyring_envelope.model_dump(mode="json", by_alias=True)
        )
        data = {
            "keyring": keyring,
            "keyring_version": 0 if state.keyring is None else state.keyring.version,
            "manifest_version": state.manifest_version,
            "manifest_sha256": state.manifest_sha256,
            "manifest_signers": sorted(state.manifest_signers),
            "earlier_keyrings": self._earlier_keyrings(keyring),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".trust.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _earlier_keyrings(self, keyring: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The persisted earlier keyrings, plus the one ``keyring`` replaces (newest first)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        earlier = [e for e in data.get("earlier_keyrings") or [] if isinstance(e, dict)]
        previous = data.get("keyring")
        if isinstance(previous, dict) and previous != keyring:
            earlier.insert(0, previous)
        return [e for e in earlier if e != keyring][:EARLIER_KEYRINGS]

    def bundle_keys(self, state: TrustState) -> tuple[dict[str, VerifyKey], int]:
        """Keys (and the threshold) that vouch for a bundle already installed: those of the
        current keyring and of the earlier ones that still verify against the root keys
        (expired or not). A bundle was checked against the keyring of its day before it
        was activated; re-checking it at start-up must not fail because the key that
        signed it was rotated out since."""
        keyring = state.keyring
        if keyring is None:
            return {}, 1
        keys, threshold = keyring.verify_keys(), keyring.threshold
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return keys, threshold
        for raw in data.get("earlier_keyrings") or []:
            try:
                payload = verify_envelope(
                    Envelope.model_validate(raw),
                    payload_type=PayloadType.KEYRING,
                    trusted_keys=state.root_keys,
                    threshold=state.root_threshold,
                )
                earlier = Keyring.from_bytes(payload)
            except (ContractError, ValueError):
                continue  # a damaged entry vouches for nothing
            if earlier.version < keyring.version:
                keys = {**earlier.verify_keys(), **keys}
                threshold = min(threshold, earlier.threshold)
        return keys, threshold


EARLIER_KEYRINGS = 8
"""Keyrings kept besides the current one, for :meth:`TrustStore.bundle_keys`."""


def _accept_persisted_keyring(state: TrustState, envelope: Envelope, now: datetime) -> TrustState:
    """Re-verify the persisted keyring against the root keys.

    It may have expired since it was accepted: it is then still kept (its version is
    the floor the next keyring must reach), but it lists no key that will be trusted
    for a new manifest until a fresh keyring arrives with the next desired state.
    """
    try:
        return accept_keyring(state, envelope, now=now)
    except ExpiredError:
        payload = verify_envelope(
            envelope,
            payload_type=PayloadType.KEYRING,
            trusted_keys=state.root_keys,
            threshold=state.root_threshold,
        )
        keyring = Keyring.from_bytes(payload)
        return dataclasses.replace(state, keyring=keyring, keyring_sha256=sha256_hex(payload))
