"""The JobRunner with real subprocesses: a stand-in worker (``fake_worker.py``) plays each part."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.db import create_db_engine, session_scope
from server.models import TrainingRun
from server.settings import Settings
from server.training import jobs
from server.training.jobs import JobRunner
from server.training.spec import ModelSpec
from tests.server.training.conftest import add_dataset_version, digits_schema, wait_for

pytestmark = pytest.mark.database

FAKE_WORKER = str(Path(__file__).with_name("fake_worker.py"))


def fake(behaviour: str) -> Callable[[int], list[str]]:
    return lambda run_id: [sys.executable, FAKE_WORKER, "--run-id", str(run_id), behaviour]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url)


@pytest.fixture
def runners(engine: Engine, settings: Settings) -> Iterator[Callable[..., JobRunner]]:
    started: list[JobRunner] = []

    def make(command: Callable[[int], list[str]], **kwargs: object) -> JobRunner:
        options: dict[str, object] = {"settings": settings, "poll_interval": 0.05, "kill_grace": 5}
        runner = JobRunner(kwargs.pop("engine", engine), command=command, **options | kwargs)  # type: ignore[arg-type]
        started.append(runner)
        runner.start()
        return runner

    yield make
    for runner in started:
        runner.stop()


def queue(engine: Engine, count: int = 1) -> list[int]:
    version = add_dataset_version(engine, digits_schema(), version=1 + _count_versions(engine))
    with Session(engine) as session:
        return [
            jobs.create_run(
                session, model_name="m", dataset_version_id=version, spec=ModelSpec()
            ).id
            or 0
            for _ in range(count)
        ]


def _count_versions(engine: Engine) -> int:
    from sqlmodel import func, select

    from server.models import DatasetVersion

    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(DatasetVersion)).one())


def run_row(engine: Engine, run_id: int) -> TrainingRun:
    with Session(engine) as session:
        return jobs.get_run(session, run_id=run_id)


def wait_status(engine: Engine, run_id: int, *statuses: str) -> TrainingRun:
    def probe() -> TrainingRun | None:
        run = run_row(engine, run_id)
        return run if run.status in statuses else None

    return wait_for(probe, what=f"run {run_id} to be {' or '.join(statuses)}")


def wait_phase(engine: Engine, run_id: int, phase: str) -> TrainingRun:
    def probe() -> TrainingRun | None:
        run = run_row(engine, run_id)
        return run if run.phase == phase else None

    return wait_for(probe, what=f"run {run_id} to reach phase {phase!r}")


def worker_pid(run: TrainingRun) -> int:
    assert run.worker is not None
    host, pid = run.worker.rsplit(":", 1)
    assert host == socket.gethostname()
    return int(pid)


def test_a_worker_runs_the_claimed_run_to_success(
    runners: Callable[..., JobRunner], db_url: str, engine: Engine, settings: Settings
) -> None:
    (run_id,) = queue(engine)
    # An engine factory: the runner builds and disposes of its own engine.
    runner = runners(fake("succeed"), engine=lambda: create_db_engine(db_url))
    run = wait_status(engine, run_id, "succeeded", "failed")
    assert run.status == "succeeded", run.error
    assert worker_pid(run) not in (0, __import__("os").getpid())
    assert json.loads(run.progress_json)["epoch"] == 3
    assert [h["epoch"] for h in json.loads(run.history_json)] == [1, 2, 3]
    assert json.loads(run.environment_json)["data_dir"] == str(settings.data_dir.resolve())
    assert run.started_at is not None and run.finished_at is not None
    wait_for(lambda: runner.active_runs == [], what="the runner to reap its worker")


def test_a_crashing_worker_fails_the_run_with_its_exit_code_and_output(
    runners: Callable[..., JobRunner], engine: Engine, settings: Settings
) -> None:
    (run_id,) = queue(engine)
    runners(fake("crash"))
    run = wait_status(engine, run_id, "failed", "succeeded")
    assert run.status == "failed" and run.error is not None
    assert "the training worker exited with code 7" in run.error
    assert "RuntimeError: boom" in run.error and "loading the dataset" in run.error
    log = settings.data_dir / "logs" / f"training-run-{run_id}.log"
    assert "RuntimeError: boom" in log.read_text()


def test_a_worker_that_cannot_start_fails_the_run(
    runners: Callable[..., JobRunner], engine: Engine
) -> None:
    (run_id,) = queue(engine)
    runners(lambda _run_id: ["/nonexistent/edgefleet-worker"])
    run = wait_status(engine, run_id, "failed")
    assert run.error is not None and run.error.startswith("cannot start:")


def test_cancel_terminates_a_running_worker(
    runners: Callable[..., JobRunner], engine: Engine
) -> None:
    (run_id,) = queue(engine)
    runner = runners(fake("hang"))
    pid = worker_pid(wait_phase(engine, run_id, "hanging"))
    assert jobs.process_alive(pid)
    with Session(engine) as session:
        assert jobs.request_cancel(session, run_id=run_id).status == "running"
    run = wait_status(engine, run_id, "cancelled", "failed")
    assert run.status == "cancelled" and run.finished_at is not None
    wait_for(lambda: runner.active_runs == [], what="the runner to reap its worker")
    assert not jobs.process_alive(pid)


def test_a_worker_deaf_to_sigterm_is_killed_after_the_grace_period(
    runners: Callable[..., JobRunner], engine: Engine
) -> None:
    (run_id,) = queue(engine)
    clock = FakeClock()
    runners(fake("hang-ignoring-term"), clock=clock, kill_grace=30)
    pid = worker_pid(wait_phase(engine, run_id, "hanging"))
    with Session(engine) as session:
        jobs.request_cancel(session, run_id=run_id)
    wait_phase(engine, run_id, "cancelling")  # SIGTERM sent, and ignored
    assert jobs.process_alive(pid) and run_row(engine, run_id).status == "running"
    clock.now += 31  # the grace period is over: SIGKILL
    run = wait_status(engine, run_id, "cancelled", "failed")
    assert run.status == "cancelled"
    assert not jobs.process_alive(pid)


def test_at_most_max_concurrent_workers(runners: Callable[..., JobRunner], engine: Engine) -> None:
    first, second, third = queue(engine, 3)
    runner = runners(fake("hang"), max_concurrent=2)
    wait_phase(engine, first, "hanging")
    wait_phase(engine, second, "hanging")
    assert sorted(runner.active_runs) == [first, second]
    assert run_row(engine, third).status == "queued"
    with Session(engine) as session:
        jobs.request_cancel(session, run_id=first)
    wait_phase(engine, third, "hanging")  # a slot came free
    assert run_row(engine, first).status == "cancelled"


def test_stop_queues_running_runs_again(engine: Engine, settings: Settings) -> None:
    (run_id,) = queue(engine)
    runner = JobRunner(engine, settings=settings, command=fake("hang"), poll_interval=0.05)
    runner.start()
    pid = worker_pid(wait_phase(engine, run_id, "hanging"))
    runner.stop()
    run = run_row(engine, run_id)
    assert (run.status, run.phase, run.worker) == ("queued", "requeued", None)
    assert not jobs.process_alive(pid)


def test_start_requeues_the_run_of_a_dead_worker(
    runners: Callable[..., JobRunner], engine: Engine
) -> None:
    (run_id,) = queue(engine)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with session_scope(engine) as session:
        jobs.claim_next_run(session, worker=jobs.worker_name(gone.pid))
    assert run_row(engine, run_id).status == "running"
    runners(fake("succeed"))  # finds the orphan at start, queues it, then trains it
    run = wait_status(engine, run_id, "succeeded", "failed")
    assert run.status == "succeeded", run.error
    assert worker_pid(run) != gone.pid
