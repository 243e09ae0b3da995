from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from server.cli import app

runner = CliRunner()


def test_keys_init_json_and_idempotent(tmp_path: Path) -> None:
    first = runner.invoke(app, ["keys", "init", "--keys-dir", str(tmp_path), "--json"])
    assert first.exit_code == 0, first.output
    info = json.loads(first.stdout)
    assert info["keyring_version"] == 1 and len(info["online_keyids"]) == 1
    second = runner.invoke(app, ["keys", "init", "--keys-dir", str(tmp_path), "--json"])
    assert json.loads(second.stdout)["root_keyid"] == info["root_keyid"]
    human = runner.invoke(app, ["keys", "init", "--keys-dir", str(tmp_path)])
    assert "root_keyid" in human.stdout and "offline" in human.output


def test_server_refuses_bad_settings(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("EDGEFLEET_MODE", "prod")
    result = runner.invoke(app, ["server", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "development secret" in result.output
