"""``edgefleet train`` and ``edgefleet runs ...`` against a real server and a real job runner."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import typer
from sqlalchemy.engine import Engine
from sqlmodel import Session
from typer.testing import CliRunner

from server.commands import train as train_module
from server.commands.train import app as runs_app
from server.commands.train import train
from server.db import create_db_engine, migrate
from server.settings import Settings
from server.training import jobs
from server.training.jobs import JobRunner
from tests.conftest import admin_token
from tests.server.training.conftest import (
    add_dataset_version,
    digits_schema,
    wait_for,
)

FAKE_WORKER = str(Path(__file__).with_name("fake_worker.py"))
runner = CliRunner()

cli = typer.Typer()
cli.command("train")(train)
cli.add_typer(runs_app, name="runs")


@dataclass
class Server:
    url: str
    engine: Engine
    operator: dict[str, str]  # headers of an operator call


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """A uvicorn server on a free port, and a job runner whose stand-in worker behaves as the
    run's model name says: ``crash-…`` crashes, ``hang-…`` hangs, anything else succeeds."""
    import uvicorn

    from server.app import create_app

    monkeypatch.setattr(train_module, "POLL_INTERVAL", 0.05)
    db_url = f"sqlite:///{tmp_path / 'cli.db'}"
    # this suite drives runs itself: the app's own job runner stays off
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, run_jobs=False)
    engine = create_db_engine(db_url)
    migrate(engine)
    add_dataset_version(engine, digits_schema(), name="digits")

    def command(run_id: int) -> list[str]:
        with Session(engine) as session:
            name = jobs.get_run(session, run_id=run_id).model_name
        behaviour = name.split("-")[0] if name.split("-")[0] in ("crash", "hang") else "succeed"
        return [sys.executable, FAKE_WORKER, "--run-id", str(run_id), behaviour]

    job_runner = JobRunner(engine, settings=settings, command=command, poll_interval=0.05)
    job_runner.start()
    port = _free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_config=None,
        log_level="warning",
    )
    api = uvicorn.Server(config)
    thread = threading.Thread(target=api.run, daemon=True)
    thread.start()
    wait_for(lambda: api.started, timeout=30, what="the API server to start")
    monkeypatch.setenv("EDGEFLEET_TOKEN", admin_token(settings))
    try:
        operator = {"Authorization": f"Bearer {admin_token(settings)}"}
        yield Server(f"http://127.0.0.1:{port}", engine, operator)
    finally:
        api.should_exit = True
        thread.join(10)
        job_runner.stop()
        engine.dispose()


def invoke(server: Server, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(cli, [*args, "--server", server.url])
    return result.exit_code, result.stdout, result.stderr


def test_train_wait_follows_the_run_to_success(server: Server) -> None:
    code, out, err = invoke(
        server, "train", "--dataset", "digits", "--model", "digits-cnn", "--epochs", "3", "--wait"
    )
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0].startswith("run 1 queued: digits-cnn on digits@1 (cnn2d, 3 epochs, seed 0)")
    assert "  epoch 3/3  loss 0.3333  accuracy 0.9000" in lines
    assert lines[-1] == "run 1 succeeded: no model version; test accuracy 0.9000, macro_f1 0.8800"


def test_train_json_prints_only_json(server: Server) -> None:
    code, out, _ = invoke(
        server, "train", "--dataset", "digits@1", "--model", "m", "--arch", "mlp", "--json"
    )
    assert code == 0
    run = json.loads(out)
    # a runner may claim it between the commit and the answer
    assert run["status"] in ("queued", "running")
    assert (run["arch"], run["model_name"]) == ("mlp", "m")
    code, out, _ = invoke(server, "runs", "watch", str(run["id"]), "--json")
    assert code == 0 and json.loads(out)["status"] == "succeeded"


def test_a_failed_run_exits_non_zero_with_its_error(server: Server) -> None:
    code, out, err = invoke(server, "train", "--dataset", "digits", "--model", "crash-1", "--wait")
    assert code == 1
    assert "run 1 failed: the training worker exited with code 7" in " ".join(err.split())
    code, out, _ = invoke(
        server, "train", "--dataset", "digits", "--model", "crash-2", "--wait", "--json"
    )
    assert code == 1 and json.loads(out)["status"] == "failed"


def test_bad_requests_name_the_problem(server: Server) -> None:
    code, _, err = invoke(server, "train", "--dataset", "digits", "--model", "m", "--arch", "cnn1d")
    assert code == 1 and "cnn1d needs a 2-D input shape" in " ".join(err.split())
    code, _, err = invoke(server, "train", "--dataset", "nope", "--model", "m")
    assert code == 1 and "HTTP 404" in err
    code, _, err = invoke(server, "train", "--dataset", "digits", "--model", "m", "--arch", "rnn")
    assert code == 2


def test_runs_list_show_cancel_and_watch(server: Server) -> None:
    queued = httpx.post(
        f"{server.url}/api/v1/runs",
        json={"dataset": "digits", "model": "hang-1", "epochs": 2},
        headers=server.operator,
    ).json()
    wait_for(
        lambda: (
            httpx.get(f"{server.url}/api/v1/runs/{queued['id']}", headers=server.operator).json()[
                "phase"
            ]
            == "hanging"
        ),
        what="the worker to start",
    )
    code, out, _ = invoke(server, "runs", "list")
    assert code == 0 and "hang-1" in out and "running" in out
    code, out, _ = invoke(server, "runs", "list", "--json", "--status", "running")
    assert [r["id"] for r in json.loads(out)] == [queued["id"]]
    code, out, _ = invoke(server, "runs", "show", str(queued["id"]))
    assert code == 0 and "lineage   digits@1 -> run 1 -> (no model version yet)" in out
    assert "spec      cnn2d, 2 epochs" in out
    code, out, _ = invoke(server, "runs", "cancel", str(queued["id"]))
    assert code == 0 and "cancellation requested" in out
    code, _, err = invoke(server, "runs", "watch", str(queued["id"]))
    assert code == 3 and "was cancelled" in err
    code, _, err = invoke(server, "runs", "cancel", str(queued["id"]))
    assert code == 0  # cancelling a cancelled run changes nothing
    code, out, _ = invoke(server, "runs", "show", str(queued["id"]), "--json")
    assert json.loads(out)["status"] == "cancelled"
    code, _, err = invoke(server, "runs", "show", "99")
    assert code == 1 and "no training run 99" in err


def test_progress_bar_on_a_terminal(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    monkeypatch.setattr(train_module, "out", Console(force_terminal=True, width=120))
    started = time.monotonic()
    code, out, err = invoke(server, "train", "--dataset", "digits", "--model", "bar", "--wait")
    assert code == 0, out + err
    assert "3/3" in out and "loss 0.3333" in out  # the bar, drawn with terminal codes
    assert "\x1b[" in out and "succeeded" in out and time.monotonic() - started < 30
