from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.db import session_scope
from server.errors import ConfigurationError
from server.keys import init_keys, load_fleet_keys, record_keyring
from server.models import KeyringRecord
from shared.signing import SigningKey
from shared.trust import TrustState, accept_keyring

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
LIFETIME = timedelta(days=90)


def test_init_creates_a_verifiable_hierarchy_once(tmp_path: Path) -> None:
    keys = init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    assert keys.keyring.version == 1
    assert [k.keyid for k in keys.online] == [e.keyid for e in keys.keyring.keys]
    # what a device does with the root key from its image:
    state = accept_keyring(
        TrustState.from_root_keys([keys.root_public]), keys.keyring_envelope, now=NOW
    )
    assert state.keyring == keys.keyring
    for private in [tmp_path / "root.key", *(tmp_path / "online").glob("*.key")]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    again = init_keys(tmp_path, now=NOW + timedelta(days=1), lifetime=LIFETIME)
    assert again.keyring.version == 1 and again.root_public == keys.root_public


def test_a_new_online_key_or_a_near_expiry_reissues_the_keyring(tmp_path: Path) -> None:
    init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    extra = SigningKey.generate()
    (tmp_path / "online" / f"{extra.keyid}.key").write_text(extra.seed_base64())
    keys = init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    assert keys.keyring.version == 2 and extra.keyid in {k.keyid for k in keys.keyring.keys}
    later = init_keys(tmp_path, now=NOW + timedelta(days=85), lifetime=LIFETIME)
    assert later.keyring.version == 3 and later.keyring.expires_at > NOW + timedelta(days=170)


def test_root_offline_means_the_server_runs_but_cannot_reissue(tmp_path: Path) -> None:
    init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    (tmp_path / "root.key").unlink()  # moved offline, as it should be
    assert load_fleet_keys(tmp_path, now=NOW).keyring.version == 1
    with pytest.raises(ConfigurationError, match=r"root\.key is offline"):
        init_keys(tmp_path, now=NOW + timedelta(days=89), lifetime=LIFETIME)


def test_a_keyring_not_signed_by_the_root_is_refused(tmp_path: Path) -> None:
    init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    (tmp_path / "root.pub").write_text(SigningKey.generate().public.to_base64())
    with pytest.raises(ConfigurationError, match="not usable"):
        load_fleet_keys(tmp_path, now=NOW)


def test_missing_and_expired(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="edgefleet keys init"):
        load_fleet_keys(tmp_path, now=NOW)
    init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    with pytest.raises(ConfigurationError, match="expired"):
        load_fleet_keys(tmp_path, now=NOW + timedelta(days=91))


@pytest.mark.database
def test_keyrings_are_recorded_once_per_version(engine: Engine, tmp_path: Path) -> None:
    keys = init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    for _ in range(2):
        with session_scope(engine) as session:
            record_keyring(session, keys=keys)
    with Session(engine) as session:
        rows = session.exec(select(KeyringRecord)).all()
    assert [(r.version, r.expires_at) for r in rows] == [(1, keys.keyring.expires_at)]


def test_a_raised_threshold_survives_a_dev_reissue(tmp_path: Path) -> None:
    from server.keys import add_online_key

    init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    root = SigningKey.from_base64((tmp_path / "root.key").read_text())
    add_online_key(tmp_path, root=root, now=NOW, lifetime=LIFETIME, threshold=2)
    later = init_keys(tmp_path, now=NOW + timedelta(days=85), lifetime=LIFETIME)
    assert (later.keyring.version, later.keyring.threshold) == (3, 2)
    assert len(later.signing_keys) == 2


def test_a_revoked_key_is_gone_for_good_even_on_a_dev_server(tmp_path: Path) -> None:
    from server.keys import add_online_key, revoke_online_key

    first = init_keys(tmp_path, now=NOW, lifetime=LIFETIME).online[0]
    root = SigningKey.from_base64((tmp_path / "root.key").read_text())
    add_online_key(tmp_path, root=root, now=NOW, lifetime=LIFETIME)
    change = revoke_online_key(tmp_path, first.keyid[:10], root=root, now=NOW, lifetime=LIFETIME)
    assert change.removed == (first.keyid,) and change.keyring.version == 3
    # init_keys lists every private key it finds: the revoked one left none behind
    again = init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    assert again.keyring.version == 3
    assert first.keyid not in {k.keyid for k in again.keyring.keys}


def test_the_watcher_hands_on_new_keys_and_nothing_broken_or_older(tmp_path: Path) -> None:
    from server.keys import KeyringWatcher, rotate_online_key

    keys = init_keys(tmp_path, now=NOW, lifetime=LIFETIME)
    root = SigningKey.from_base64((tmp_path / "root.key").read_text())
    watcher = KeyringWatcher(tmp_path, keys, clock=lambda: NOW)
    got: list[int] = []
    watcher.subscribe(lambda k: got.append(k.keyring.version))
    assert watcher.check() is None  # nothing changed
    old_ring = (tmp_path / "keyring.json").read_bytes()
    rotate_online_key(tmp_path, root=root, now=NOW, lifetime=LIFETIME)
    new = watcher.check()
    assert new is not None and new.keyring.version == 2 and got == [2]
    assert watcher.keys is new and new.online[0].keyid != keys.online[0].keyid
    # an older keyring put back (a restored backup) is not taken
    (tmp_path / "keyring.json").write_bytes(old_ring)
    assert watcher.check() is None and watcher.keys is new
    # a broken file is not taken either, and the server keeps its keys
    (tmp_path / "keyring.json").write_text("{")
    assert watcher.check() is None and got == [2]


def test_a_revoke_never_lowers_the_threshold_by_itself(tmp_path: Path) -> None:
    from server.errors import InvalidInputError
    from server.keys import add_online_key, read_keyring, revoke_online_key

    first = init_keys(tmp_path, now=NOW, lifetime=LIFETIME).online[0]
    root = SigningKey.from_base64((tmp_path / "root.key").read_text())
    add_online_key(tmp_path, root=root, now=NOW, lifetime=LIFETIME, threshold=2)
    with pytest.raises(InvalidInputError, match="threshold 2 is not possible with 1"):
        revoke_online_key(tmp_path, first.keyid, root=root, now=NOW, lifetime=LIFETIME)
    current = read_keyring(tmp_path)
    assert current is not None and current[0].version == 2  # nothing written
    change = revoke_online_key(
        tmp_path, first.keyid, root=root, now=NOW, lifetime=LIFETIME, threshold=1
    )
    assert (change.keyring.version, change.keyring.threshold) == (3, 1)
