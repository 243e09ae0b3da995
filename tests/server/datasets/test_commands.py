"""``edgefleet datasets`` against a real server running in a thread."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from server.app import create_app
from server.commands.datasets import app
from server.settings import Settings
from tests.conftest import admin_token

pytestmark = pytest.mark.database

runner = CliRunner()


@pytest.fixture
def server_url(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url)
    api = create_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(api, host="127.0.0.1", port=0, log_config=None, log_level="warning")
    )
    thread = threading.Thread(target=server.run, name="datasets-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(settings))
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def run(server_url: str, *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [*args, "--server", server_url])


def test_add_list_and_show(server_url: str, tmp_path: Path) -> None:
    path = tmp_path / "pumps.csv"
    path.write_text(
        "flow,pressure,health\n"
        + "".join(f"{i},{i * 0.5},{'worn' if i % 3 == 0 else 'ok'}\n" for i in range(30))
    )
    added = run(server_url, "add", str(path), "--name", "pumps", "--label", "health")
    assert added.exit_code == 0, added.output
    assert "added pumps v1 · 30 rows · classification (2 classes)" in added.stdout
    assert "train 20 · validation 5 · test 5" in added.stdout

    again = run(server_url, "add", str(path), "--name", "pumps", "--label", "health", "--json")
    assert again.exit_code == 0
    assert json.loads(again.stdout)["created"] is False

    example = run(server_url, "add-example", "vibration", "--name", "vib", "--json")
    assert example.exit_code == 0, example.output
    assert json.loads(example.stdout)["data_schema"]["input_shape"] == [64, 3]

    listed = run(server_url, "list", "--json")
    assert [d["name"] for d in json.loads(listed.stdout)] == ["pumps", "vib"]
    table = run(server_url, "list")
    assert "pumps" in table.stdout and "vib" in table.stdout and "classification" in table.stdout

    shown = run(server_url, "show", "pumps")
    assert shown.exit_code == 0 and "pumps.csv" in shown.stdout and "v1" in shown.stdout
    version = run(server_url, "show", "vib@1", "--json")
    body = json.loads(version.stdout)
    assert body["version"] == 1 and body["lineage"]["example"] == "vibration"
    human = run(server_url, "show", "vib", "latest")
    assert "bearing_fault" in human.stdout and "64×3" in human.stdout


def test_errors_are_one_line_and_exit_non_zero(server_url: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n1,x\n")
    bad = run(server_url, "add", str(path), "--name", "bad", "--label", "y")
    assert bad.exit_code == 1
    assert "HTTP 422" in bad.output and "no column named 'y'" in bad.output
    assert bad.stdout == ""
    missing = run(server_url, "show", "nope", "--json")
    assert missing.exit_code == 1 and "no dataset named 'nope'" in missing.output
    assert run(server_url, "add-example", "mnist").exit_code == 2
    wrong_task = run(server_url, "add", str(path), "--name", "b", "--label", "y", "--task", "x")
    assert wrong_task.exit_code == 2
