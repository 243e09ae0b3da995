"""The fleet's signing keys on the server: root, online keys, and the root-signed keyring.

Layout of the keys folder::

    root.pub             base64 raw public key of the root -- baked into device images
    root.key             base64 seed of the root; only where keys were created, and it
                         belongs offline: the server never needs it at run time
    online/<keyid>.key   online signing keys (mode 0600) that sign desired states
    keyring.json         the current root-signed keyring (a DSSE envelope)

The key ceremony (``edgefleet keys ...``, :mod:`server.commands.keys`):

- :func:`init_root` creates the root key pair in a folder meant for offline media and
  gives the keys folder only ``root.pub``;
- :func:`add_online_key`, :func:`rotate_online_key`, :func:`revoke_online_key` and
  :func:`renew_keyring` each write a new keyring, one version up, signed with the root
  key the operator brings (:func:`load_root_key`); a key that leaves the keyring loses
  its private file here too, so nothing re-lists it;
- :func:`init_keys` is the development shortcut: everything in the keys folder, root
  included.

A running server follows the keys folder with a :class:`KeyringWatcher`: a new keyring
(or online key) reaches the API, the desired-state publisher and, through the re-signed
desired states, every device -- no restart, no reflash.

What always holds: files are written atomically (temporary file, fsync, rename)
with private keys readable by the owner only; :func:`load_fleet_keys` verifies
the keyring against ``root.pub`` before the server uses any online key; a new keyring's
version is above the current one's, so devices never see one version with two contents.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.errors import ConfigurationError, InvalidInputError, NotFoundError
from server.models import KeyringRecord
from shared.errors import ContractError
from shared.messages import KeyEntry, Keyring
from shared.signing import (
    Envelope,
    PayloadType,
    SigningKey,
    VerifyKey,
    sign_envelope,
    verify_envelope,
)
from shared.trust import TrustState, accept_keyring

__all__ = [
    "FleetKeys",
    "KeyringChange",
    "KeyringWatcher",
    "add_online_key",
    "expires_soon",
    "init_keys",
    "init_root",
    "issue_keyring",
    "keyring_recorder",
    "load_fleet_keys",
    "load_root_key",
    "read_keyring",
    "record_keyring",
    "renew_keyring",
    "revoke_online_key",
    "rotate_online_key",
]

log = logging.getLogger(__name__)


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
        version, threshold = current.version + 1, current.threshold
    else:
        version, threshold = 1, 1
    if refresh:
        if not root_file.exists():
            raise ConfigurationError(
                f"the keyring in {keys_dir} needs re-issuing, but root.key is offline; "
                "sign a new keyring with the root key"
            )
        root = SigningKey.from_base64(root_file.read_text())
        online = [SigningKey.from_base64(p.read_text()) for p in sorted(online_dir.glob("*.key"))]
        # A threshold the operator raised stays raised (as far as there are keys for it).
        threshold = min(threshold, len(online))
        _, envelope = issue_keyring(
            root,
            [k.public for k in online],
            version=version,
            now=now,
            lifetime=lifetime,
            threshold=threshold,
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


def keyring_recorder(engine: Engine) -> Callable[[FleetKeys], None]:
    """A :class:`KeyringWatcher` subscriber that records each new keyring in ``engine``."""

    def record(keys: FleetKeys) -> None:
        with Session(engine) as session:
            record_keyring(session, keys=keys)
            session.commit()

    return record


# ----------------------------------------------------------------------------- ceremony

EXPIRY_WARNING = timedelta(days=14)
"""``keys show`` warns when the keyring expires within this: renew it (``edgefleet keys
renew``) before devices refuse every desired state. The root key has to be fetched from
its offline place for that, so the warning comes early."""


def expires_soon(keyring: Keyring, *, now: datetime) -> bool:
    """Whether ``keyring`` has expired or expires within :data:`EXPIRY_WARNING`."""
    return keyring.expires_at - now <= EXPIRY_WARNING


@dataclass(frozen=True, slots=True)
class KeyringChange:
    """What a ceremony step wrote: the new keyring, and the online keys it added or removed."""

    keyring: Keyring
    envelope: Envelope
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


def init_root(root_dir: Path, keys_dir: Path) -> VerifyKey:
    """Create the root key pair in ``root_dir`` (offline media); copy ``root.pub`` to ``keys_dir``.

    Refuses to overwrite a root key, and refuses a keys folder that already trusts another
    root: devices carry ``root.pub`` in their image, so a new root means reflashing them.
    """
    if (root_dir / "root.key").exists():
        raise ConfigurationError(f"{root_dir / 'root.key'} exists already; it is never replaced")
    existing = keys_dir / "root.pub"
    if existing.exists():
        raise ConfigurationError(
            f"{existing} exists already: the fleet has a root key (devices carry it in their "
            "image); a new root would need every device reflashed"
        )
    root = SigningKey.generate()
    _write_atomic(root_dir / "root.key", root.seed_base64() + "\n", 0o600)
    _write_atomic(root_dir / "root.pub", root.public.to_base64() + "\n", 0o644)
    _write_atomic(existing, root.public.to_base64() + "\n", 0o644)
    return root.public


def _root_public(keys_dir: Path) -> VerifyKey:
    path = keys_dir / "root.pub"
    try:
        return VerifyKey.from_base64(path.read_text().strip())
    except FileNotFoundError as e:
        raise ConfigurationError(
            f"missing {path}: create the root with `edgefleet keys init-root`"
        ) from e
    except ValueError as e:
        raise ConfigurationError(f"{path} is not a public key: {e}") from e


def load_root_key(path: Path, keys_dir: Path) -> SigningKey:
    """The root signing key from ``path``, checked against the fleet's ``root.pub``."""
    try:
        root = SigningKey.from_base64(path.read_text())
    except FileNotFoundError as e:
        raise ConfigurationError(f"no root key at {path}") from e
    except (OSError, ValueError) as e:
        raise ConfigurationError(f"{path} is not a root key: {e}") from e
    if root.public != _root_public(keys_dir):
        raise ConfigurationError(
            f"{path} is not the fleet's root key: its public half differs from "
            f"{keys_dir / 'root.pub'}"
        )
    return root


def read_keyring(keys_dir: Path) -> tuple[Keyring, Envelope] | None:
    """The current keyring, its root signature checked (expired or not); None if none yet."""
    path = keys_dir / "keyring.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    root_public = _root_public(keys_dir)
    try:
        envelope = Envelope.from_bytes(raw)
        payload = verify_envelope(
            envelope, payload_type=PayloadType.KEYRING, trusted_keys=[root_public]
        )
        return Keyring.from_bytes(payload), envelope
    except ContractError as e:
        raise ConfigurationError(f"{path} is not usable: {e}") from e


def _reissue(
    keys_dir: Path,
    *,
    root: SigningKey,
    online: Sequence[VerifyKey],
    now: datetime,
    lifetime: timedelta,
    threshold: int | None,
    new_keys: Sequence[SigningKey] = (),
) -> KeyringChange:
    """Write a keyring listing ``online``, one version above the current one.

    The new private keys are written first and the keyring replaces the old one last, so
    a crash in between leaves the old keyring in force. Private files of keys the keyring
    no longer lists are removed afterwards (a dev server's :func:`init_keys` would list
    them again otherwise).
    """
    if not online:
        raise InvalidInputError("a keyring needs at least one online key")
    current = read_keyring(keys_dir)
    previous = set() if current is None else {k.keyid for k in current[0].keys}
    wanted = (
        threshold if threshold is not None else (1 if current is None else current[0].threshold)
    )
    if not 1 <= wanted <= len(online):
        # Never lowered silently: a revoke that leaves too few keys needs a decision.
        raise InvalidInputError(
            f"threshold {wanted} is not possible with {len(online)} online key(s): "
            "add a key first, or give --threshold"
        )
    if lifetime <= timedelta(0):
        raise InvalidInputError("the keyring's lifetime must be positive")
    keyring, envelope = issue_keyring(
        root,
        online,
        version=1 if current is None else current[0].version + 1,
        now=now,
        lifetime=lifetime,
        threshold=wanted,
    )
    for key in new_keys:
        _write_atomic(keys_dir / "online" / f"{key.keyid}.key", key.seed_base64() + "\n", 0o600)
    _write_atomic(keys_dir / "keyring.json", envelope.to_bytes().decode("ascii") + "\n", 0o644)
    listed = {k.keyid for k in online}
    removed = tuple(sorted(previous - listed))
    for path in (keys_dir / "online").glob("*.key"):
        if path.stem not in listed:
            path.unlink(missing_ok=True)
    return KeyringChange(
        keyring=keyring,
        envelope=envelope,
        added=tuple(sorted(listed - previous)),
        removed=removed,
    )


def _listed(keys_dir: Path) -> list[VerifyKey]:
    current = read_keyring(keys_dir)
    return [] if current is None else [k.verify_key() for k in current[0].keys]


def add_online_key(
    keys_dir: Path,
    *,
    root: SigningKey,
    now: datetime,
    lifetime: timedelta,
    threshold: int | None = None,
) -> KeyringChange:
    """A new online key, and a keyring listing it beside the current ones."""
    key = SigningKey.generate()
    return _reissue(
        keys_dir,
        root=root,
        online=[*_listed(keys_dir), key.public],
        now=now,
        lifetime=lifetime,
        threshold=threshold,
        new_keys=[key],
    )


def _match(keys: Sequence[VerifyKey], keyid: str) -> VerifyKey:
    """The listed key ``keyid`` names (a unique prefix of 8 or more hex digits will do)."""
    wanted = keyid.strip().lower()
    if len(wanted) < 8:
        raise InvalidInputError(f"key id {keyid!r} is too short: give at least 8 hex digits")
    found = [k for k in keys if k.keyid.startswith(wanted)]
    if not found:
        raise NotFoundError(f"no online key {keyid} in the current keyring")
    if len(found) > 1:
        raise InvalidInputError(f"key id {keyid} is ambiguous: give more digits")
    return found[0]


def rotate_online_key(
    keys_dir: Path,
    *,
    root: SigningKey,
    now: datetime,
    lifetime: timedelta,
    old_keyid: str | None = None,
    threshold: int | None = None,
) -> KeyringChange:
    """A new online key in, ``old_keyid`` out (the only key, when there is one)."""
    listed = _listed(keys_dir)
    if not listed:
        raise ConfigurationError(
            f"there is no keyring in {keys_dir} yet: start with `edgefleet keys add-online`"
        )
    if old_keyid is None:
        if len(listed) > 1:
            raise InvalidInputError(
                f"the keyring lists {len(listed)} online keys: name the one to retire with --old"
            )
        old = listed[0]
    else:
        old = _match(listed, old_keyid)
    key = SigningKey.generate()
    return _reissue(
        keys_dir,
        root=root,
        online=[*(k for k in listed if k != old), key.public],
        now=now,
        lifetime=lifetime,
        threshold=threshold,
        new_keys=[key],
    )


def revoke_online_key(
    keys_dir: Path,
    keyid: str,
    *,
    root: SigningKey,
    now: datetime,
    lifetime: timedelta,
    threshold: int | None = None,
) -> KeyringChange:
    """A keyring without ``keyid``. Refused when it is the last key: add one first."""
    listed = _listed(keys_dir)
    revoked = _match(listed, keyid)
    rest = [k for k in listed if k != revoked]
    if not rest:
        raise InvalidInputError(
            f"{revoked.keyid[:16]}... is the only online key: nothing could sign desired "
            "states without it; use `edgefleet keys rotate-online` to replace it"
        )
    return _reissue(
        keys_dir, root=root, online=rest, now=now, lifetime=lifetime, threshold=threshold
    )


def renew_keyring(
    keys_dir: Path,
    *,
    root: SigningKey,
    now: datetime,
    lifetime: timedelta,
    threshold: int | None = None,
) -> KeyringChange:
    """The same online keys under a new expiry (and threshold, if given), one version up."""
    listed = _listed(keys_dir)
    if not listed:
        raise ConfigurationError(
            f"there is no keyring in {keys_dir} yet: start with `edgefleet keys add-online`"
        )
    return _reissue(
        keys_dir, root=root, online=listed, now=now, lifetime=lifetime, threshold=threshold
    )


# ----------------------------------------------------------------------------- following


class KeyringWatcher:
    """Follows the keys folder of a running server: a changed ``keyring.json`` or set of
    online keys is loaded, verified (:func:`load_fleet_keys`) and handed to every
    subscriber (the API's ``app.state.keys``, the desired-state publisher, the keyring
    recorder...).

    What always holds: subscribers only ever get keys that verified, with a keyring
    version at or above the one they hold; a folder caught mid-change or broken is
    logged and retried at the next poll, and the server keeps its current keys. A poll
    costs a stat of the folder and a read of ``keyring.json`` (16 KiB at most).
    """

    def __init__(
        self,
        keys_dir: Path,
        keys: FleetKeys,
        *,
        clock: Callable[[], datetime],
        interval: float = 2.0,
    ) -> None:
        self.keys_dir = keys_dir
        self.keys = keys
        self._clock = clock
        self._interval = interval
        self._subscribers: list[Callable[[FleetKeys], None]] = []
        self._seen = self._fingerprint()
        self._failed: tuple[str, tuple[str, ...]] | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def subscribe(self, subscriber: Callable[[FleetKeys], None]) -> None:
        self._subscribers.append(subscriber)

    def _fingerprint(self) -> tuple[str, tuple[str, ...]]:
        try:
            ring = hashlib.sha256((self.keys_dir / "keyring.json").read_bytes()).hexdigest()
        except OSError:
            ring = ""
        online = tuple(sorted(p.name for p in (self.keys_dir / "online").glob("*.key")))
        return ring, online

    def check(self) -> FleetKeys | None:
        """One poll: the new keys if the folder changed and they verified, else None."""
        with self._lock:
            seen = self._fingerprint()
            if seen == self._seen:
                return None
            try:
                keys = load_fleet_keys(self.keys_dir, now=self._clock())
            except ConfigurationError as e:
                if seen != self._failed:  # once per state of the folder, not every poll
                    log.error("keys: the changed keys folder is not usable: %s", e)
                    self._failed = seen
                return None
            self._seen = seen
            if keys.keyring.version < self.keys.keyring.version:
                log.error(
                    "keys: keyring v%d in %s is older than the v%d in use; ignored",
                    keys.keyring.version,
                    self.keys_dir,
                    self.keys.keyring.version,
                )
                return None
            self.keys = keys
            log.info(
                "keys: keyring v%d in use (online keys %s)",
                keys.keyring.version,
                ", ".join(k.keyid[:12] for k in keys.signing_keys),
            )
            for subscriber in self._subscribers:
                try:
                    subscriber(keys)
                except Exception:
                    log.exception("keys: a keyring subscriber failed")
            return keys

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("KeyringWatcher already started")
        self._thread = threading.Thread(target=self._run, name="keyring-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self.check()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
