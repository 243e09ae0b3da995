"""The fleet's signing keys on the server: root, online keys, and the root-signed keyring.

Layout of the keys folder::

    root.pub             base64 raw public key of the root -- baked into device images
    root.key             base64 seed of the root; only where keys were created, and it
                         belongs offline: the server never needs it at run time
    online/<keyid>.key   online signing keys (mode 0600) that sign desired states
    keyring.json         the current root-signed keyring (a DSSE envelope)

What always holds: files are written atomically (temporary file, fsync, rename)
with private keys readable by the owner only, and :func:`load_fleet_keys` verifies
the keyring against ``root.pub`` before the server uses any online key.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlmodel import Session

from server.errors import ConfigurationError
from server.models import KeyringRecord
from shared.errors import ContractError
from shared.messages import KeyEntry, Keyring
from shared.signing import Envelope, PayloadType, SigningKey, VerifyKey, sign_envelope
from shared.trust import TrustState, accept_keyring

__all__ = [
    "FleetKeys",
    "init_keys",
    "issue_keyring",
    "load_fleet_keys",
    "record_keyring",
]


@dataclass(frozen=True, slots=True)
class FleetKeys:
    root_public: VerifyKey
    online: list[SigningKey]
    keyring: Keyring
    keyring_envelope: Envelope

    @property
    def signing_keys(self) -> list[SigningKey]:
        """The online keys to sign desired states with (as many as the threshold)."""
        return self.online[: self.keyring.threshold]


def _write_atomic(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def issue_keyring(
    root: SigningKey,
    online: Sequence[VerifyKey],
    *,
    version: int,
    now: datetime,
    lifetime: timedelta,
    threshold: int = 1,
) -> tuple[Keyring, Envelope]:
    """A keyring listing ``online``, signed by ``root``."""
    keyring = Keyring(
        version=version,
        issued_at=now,
        expires_at=now + lifetime,
        threshold=threshold,
        keys=[KeyEntry(keyid=k.keyid, public_key=k.to_base64()) for k in online],
    )
    return keyring, sign_envelope(keyring.to_bytes(), PayloadType.KEYRING, [root])


def init_keys(keys_dir: Path, *, now: datetime, lifetime: timedelta) -> FleetKeys:
    """Create whatever is missing: root, one online key, a keyring. Idempotent.

    A keyring that has expired, or will within a tenth of its lifetime, is
    re-issued with the next version -- which needs ``root.key`` here.
    """
    root_file = keys_dir / "root.key"
    if not (keys_dir / "root.pub").exists():
        root = SigningKey.generate()
        _write_atomic(root_file, root.seed_base64() + "\n", 0o600)
        _write_atomic(keys_dir / "root.pub", root.public.to_base64() + "\n", 0o644)
    online_dir = keys_dir / "online"
    if not online_dir.is_dir() or not any(online_dir.glob("*.key")):
        key = SigningKey.generate()
        _write_atomic(online_dir / f"{key.keyid}.key", key.seed_base64() + "\n", 0o600)
    keyring_file = keys_dir / "keyring.json"
    refresh = not keyring_file.exists()
    if not refresh:
        current = Keyring.from_bytes(Envelope.from_bytes(keyring_file.read_bytes()).payload_bytes())
        refresh = current.expires_at - now < lifetime / 10 or _unlisted_online_keys(
            online_dir, current
        )
        version = current.version + 1
    else:
        version = 1
    if refresh:
        if not root_file.exists():
            raise ConfigurationError(
                f"the keyring in {keys_dir} needs re-issuing, but root.key is offline; "
                "sign a new keyring with the root key"
            )
        root = SigningKey.from_base64(root_file.read_text())
        online = [SigningKey.from_base64(p.read_text()) for p in sorted(online_dir.glob("*.key"))]
        _, envelope = issue_keyring(
            root, [k.public for k in online], version=version, now=now, lifetime=lifetime
        )
        _write_atomic(keyring_file, envelope.to_bytes().decode("ascii") + "\n", 0o644)
    return load_fleet_keys(keys_dir, now=now)


def _unlisted_online_keys(online_dir: Path, keyring: Keyring) -> bool:
    listed = {k.keyid for k in keyring.keys}
    return any(p.stem not in listed for p in online_dir.glob("*.key"))


def load_fleet_keys(keys_dir: Path, *, now: datetime) -> FleetKeys:
    """Load and check the keys; raise :class:`ConfigurationError` naming what is wrong."""
    try:
        root_public = VerifyKey.from_base64((keys_dir / "root.pub").read_text().strip())
        envelope = Envelope.from_bytes((keys_dir / "keyring.json").read_bytes())
    except FileNotFoundError as e:
        raise ConfigurationError(
            f"missing {e.filename}: create the fleet keys with `edgefleet keys init`"
        ) from e
    except (ValueError, ContractError) as e:
        raise ConfigurationError(f"unreadable key file in {keys_dir}: {e}") from e
    try:
        state = accept_keyring(TrustState.from_root_keys([root_public]), envelope, now=now)
    except ContractError as e:
        raise ConfigurationError(f"{keys_dir / 'keyring.json'} is not usable: {e}") from e
    keyring = state.keyring
    assert keyring is not None
    listed = {k.keyid for k in keyring.keys}
    online = []
    for path in sorted((keys_dir / "online").glob("*.key")):
        key = SigningKey.from_base64(path.read_text())
        if key.keyid in listed:
            online.append(key)
    if len(online) < keyring.threshold:
        raise ConfigurationError(
            f"the keyring needs {keyring.threshold} online key(s); {len(online)} of its keys "
            f"are in {keys_dir / 'online'}"
        )
    return FleetKeys(
        root_public=root_public, online=online, keyring=keyring, keyring_envelope=envelope
    )


def record_keyring(session: Session, *, keys: FleetKeys) -> KeyringRecord:
    """Store the keyring in the database (once per version) so every replica serves it."""
    row = session.get(KeyringRecord, keys.keyring.version)
    if row is None:
        row = KeyringRecord(
            version=keys.keyring.version,
            issued_at=keys.keyring.issued_at,
            expires_at=keys.keyring.expires_at,
            envelope=keys.keyring_envelope.to_bytes().decode("ascii"),
        )
        session.add(row)
        session.flush()
    return row
