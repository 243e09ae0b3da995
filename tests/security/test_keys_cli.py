"""``edgefleet keys``: the key ceremony through the real command line.

The root key lives in a folder standing for offline media; the server's keys folder
gets only ``root.pub``. Each step writes a keyring one version up, signed by that root;
a device (the real trust core with the root key from its image) accepts each in turn.
A production server starts and serves the keyring with no root key anywhere near it.
"""

from __future__ import annotations

import json
import secrets
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from server.app import create_app
from server.cli import app as edgefleet
from server.keys import load_fleet_keys
from server.settings import Settings
from shared.errors import UnknownKeyError
from shared.signing import Envelope, PayloadType, SigningKey, VerifyKey, sign_envelope
from shared.trust import TrustState, accept_keyring

runner = CliRunner()


def keys(*args: str, code: int = 0) -> Any:
    result = runner.invoke(edgefleet, ["keys", *args])
    assert result.exit_code == code, f"edgefleet keys {' '.join(args)}: {result.output}"
    return result


def keys_json(*args: str) -> Any:
    return json.loads(keys(*args, "--json").stdout)


def envelope(keys_dir: Path) -> Envelope:
    return Envelope.from_bytes((keys_dir / "keyring.json").read_bytes())


@pytest.fixture
def ceremony(tmp_path: Path) -> tuple[Path, Path]:
    """(offline folder, the server's keys folder) after init-root and add-online."""
    offline, keys_dir = tmp_path / "usb", tmp_path / "data" / "keys"
    made = keys_json("init-root", "--out", str(offline), "--keys-dir", str(keys_dir))
    assert made["root_key"] == str(offline / "root.key")
    added = keys_json(
        "add-online", "--root-key", str(offline / "root.key"), "--keys-dir", str(keys_dir)
    )
    assert added["version"] == 1 and len(added["added"]) == 1
    return offline, keys_dir


def test_the_root_key_never_reaches_the_keys_folder(ceremony: tuple[Path, Path]) -> None:
    offline, keys_dir = ceremony
    assert stat.S_IMODE((offline / "root.key").stat().st_mode) == 0o600
    assert (offline / "root.pub").read_text() == (keys_dir / "root.pub").read_text()
    assert not (keys_dir / "root.key").exists()
    assert sorted(p.name for p in keys_dir.iterdir()) == ["keyring.json", "online", "root.pub"]
    for private in (keys_dir / "online").glob("*.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # the server loads everything it needs without the root key
    loaded = load_fleet_keys(keys_dir, now=datetime.now(UTC))
    assert loaded.keyring.version == 1 and len(loaded.online) == 1
    # init-root refuses to replace a root (devices carry it) and to write into the keys folder
    again = runner.invoke(
        edgefleet,
        ["keys", "init-root", "--out", str(offline.parent / "usb3"), "--keys-dir", str(keys_dir)],
    )
    assert again.exit_code == 1 and "reflash" in again.output
    inside = runner.invoke(
        edgefleet, ["keys", "init-root", "--out", str(keys_dir), "--keys-dir", str(keys_dir)]
    )
    assert inside.exit_code == 2 and "offline" in inside.output


def test_add_rotate_revoke_renew_each_a_keyring_devices_accept(
    ceremony: tuple[Path, Path],
) -> None:
    offline, keys_dir = ceremony
    root = ["--root-key", str(offline / "root.key"), "--keys-dir", str(keys_dir)]
    now = datetime.now(UTC)
    device = TrustState.from_root_keys(
        [VerifyKey.from_base64((offline / "root.pub").read_text().strip())]
    )
    device = accept_keyring(device, envelope(keys_dir), now=now)
    (first,) = keys_json("list", "--keys-dir", str(keys_dir))
    assert first["private_key_here"] is True

    added = keys_json("add-online", *root, "--threshold", "2")
    assert (added["version"], added["threshold"], len(added["online_keyids"])) == (2, 2, 2)
    device = accept_keyring(device, envelope(keys_dir), now=now)
    assert device.keyring is not None and device.keyring.threshold == 2

    second = added["added"][0]
    rotated = keys_json("rotate-online", *root, "--old", first["keyid"][:12], "--threshold", "1")
    assert rotated["version"] == 3 and rotated["removed"] == [first["keyid"]]
    assert first["keyid"] not in rotated["online_keyids"] and second in rotated["online_keyids"]
    assert not (keys_dir / "online" / f"{first['keyid']}.key").exists()
    device = accept_keyring(device, envelope(keys_dir), now=now)

    revoked = keys_json("revoke", second, *root)
    assert revoked["version"] == 4 and revoked["removed"] == [second]
    device = accept_keyring(device, envelope(keys_dir), now=now)
    assert device.keyring is not None and [k.keyid for k in device.keyring.keys] == [
        revoked["online_keyids"][0]
    ]
    # the last key cannot be revoked: nothing could sign desired states
    last = runner.invoke(edgefleet, ["keys", "revoke", revoked["online_keyids"][0], *root])
    assert last.exit_code == 1 and "only online key" in last.output

    renewed = keys_json("renew", *root, "--expires-days", "30")
    assert renewed["version"] == 5 and renewed["online_keyids"] == revoked["online_keyids"]
    device = accept_keyring(device, envelope(keys_dir), now=now)
    assert device.keyring is not None and device.keyring.version == 5

    shown = keys_json("show", "--keys-dir", str(keys_dir))
    assert shown["version"] == 5 and shown["expires_soon"] is False
    assert shown["root_key_here"] is False
    human = keys("show", "--keys-dir", str(keys_dir)).stdout
    assert "v5" in human and revoked["online_keyids"][0] in human
    # the server loads the last keyring and exactly its one private key
    loaded = load_fleet_keys(keys_dir, now=now)
    assert [k.keyid for k in loaded.online] == revoked["online_keyids"]


def test_bad_input_is_refused_by_name(ceremony: tuple[Path, Path], tmp_path: Path) -> None:
    offline, keys_dir = ceremony
    before = (keys_dir / "keyring.json").read_bytes()
    stranger = tmp_path / "stranger.key"
    stranger.write_text(SigningKey.generate().seed_base64())
    cases = {
        "not the fleet's root key": ["add-online", "--root-key", str(stranger)],
        "no root key at": ["add-online", "--root-key", str(tmp_path / "nowhere.key")],
        "no online key": ["revoke", "0123456789abcdef", "--root-key", str(offline / "root.key")],
        "too short": ["revoke", "0123", "--root-key", str(offline / "root.key")],
        "not possible with 1": [
            "renew", "--threshold", "2", "--root-key", str(offline / "root.key"),
        ],
    }  # fmt: skip
    for message, args in cases.items():
        result = runner.invoke(edgefleet, ["keys", *args, "--keys-dir", str(keys_dir)])
        assert result.exit_code == 1, (message, result.output)
        assert message in " ".join(result.output.split()), (message, result.output)
    assert (keys_dir / "keyring.json").read_bytes() == before  # nothing was written
    missing = runner.invoke(edgefleet, ["keys", "show", "--keys-dir", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "keys init-root" in missing.output


def test_show_warns_before_the_keyring_expires(ceremony: tuple[Path, Path]) -> None:
    offline, keys_dir = ceremony
    keys_json("renew", "--root-key", str(offline / "root.key"), "--keys-dir", str(keys_dir),
              "--expires-days", "3")  # fmt: skip
    shown = runner.invoke(edgefleet, ["keys", "show", "--keys-dir", str(keys_dir), "--json"])
    assert shown.exit_code == 0
    assert json.loads(shown.stdout)["expires_soon"] is True  # stdout stays pure JSON
    assert "expires at" in shown.stderr and "keys renew" in shown.stderr


def test_a_keyring_signed_by_another_root_is_refused_by_show_and_the_server(
    ceremony: tuple[Path, Path],
) -> None:
    _, keys_dir = ceremony
    forged_root = SigningKey.generate()
    payload = envelope(keys_dir).payload_bytes()
    forged = sign_envelope(payload, PayloadType.KEYRING, [forged_root])
    (keys_dir / "keyring.json").write_bytes(forged.to_bytes())
    shown = runner.invoke(edgefleet, ["keys", "show", "--keys-dir", str(keys_dir)])
    assert shown.exit_code == 1 and "not usable" in shown.output
    device = TrustState.from_root_keys(
        [VerifyKey.from_base64((keys_dir / "root.pub").read_text().strip())]
    )
    with pytest.raises(UnknownKeyError):
        accept_keyring(device, forged, now=datetime.now(UTC))


def test_keys_init_still_makes_the_development_layout(tmp_path: Path) -> None:
    made = keys_json("init", "--keys-dir", str(tmp_path))
    assert (tmp_path / "root.key").exists() and made["keyring_version"] == 1
    shown = runner.invoke(edgefleet, ["keys", "show", "--keys-dir", str(tmp_path)])
    assert shown.exit_code == 0 and "development" in shown.stderr


def test_a_production_server_starts_and_serves_the_keyring_with_no_root_key(
    ceremony: tuple[Path, Path], tmp_path: Path
) -> None:
    offline, keys_dir = ceremony
    settings = Settings(
        mode="prod",
        data_dir=keys_dir.parent,
        secret_key=secrets.token_urlsafe(32),  # type: ignore[arg-type]
        run_jobs=False,
        alert_evaluator=False,
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/api/v1/keyring")
        assert response.status_code == 200, response.text
        body = response.json()
    assert body["version"] == 1
    assert body["root_public_key"] == (offline / "root.pub").read_text().strip()
    assert Envelope.model_validate(body["envelope"]) == envelope(keys_dir)
    assert not any(p.name == "root.key" for p in keys_dir.parent.rglob("*"))
    # and with an expired keyring, it refuses to start, naming the problem
    keys_json("renew", "--root-key", str(offline / "root.key"), "--keys-dir", str(keys_dir),
              "--expires-days", "1")  # fmt: skip
    with pytest.raises(Exception, match="expired"):
        load_fleet_keys(keys_dir, now=datetime.now(UTC) + timedelta(days=2))


def test_each_step_is_audited_when_a_database_is_configured(
    ceremony: tuple[Path, Path], tmp_path: Path
) -> None:
    from sqlmodel import Session, select

    from server.auth import audit
    from server.db import create_db_engine
    from server.models import KeyringRecord

    offline, keys_dir = ceremony
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    rotated = keys_json("rotate-online", "--root-key", str(offline / "root.key"),
                        "--keys-dir", str(keys_dir), "--db", url)  # fmt: skip
    engine = create_db_engine(url)
    try:
        with Session(engine) as session:
            (entry,) = audit.list_entries(session, action="key.")
            assert (entry.action, entry.target) == ("key.rotate", "keyring:v2")
            assert entry.actor.startswith("local:")
            assert json.loads(entry.detail)["removed"] == rotated["removed"]
            rows = session.exec(select(KeyringRecord)).all()
            assert [r.version for r in rows] == [2]
    finally:
        engine.dispose()
