"""The job table's state machine, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import json
import socket
import threading
from datetime import timedelta

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.db import session_scope, utcnow
from server.errors import ConflictError, NotFoundError
from server.models import TrainingRun
from server.training import jobs
from server.training.spec import ModelSpec
from tests.server.training.conftest import add_dataset_version, digits_schema

pytestmark = pytest.mark.database

SPEC = ModelSpec(arch="mlp", epochs=2)


@pytest.fixture
def dataset_version(engine: Engine) -> int:
    return add_dataset_version(engine, digits_schema())


def queue(engine: Engine, dataset_version: int, count: int = 1, model: str = "m") -> list[int]:
    ids = []
    with Session(engine) as session:
        for _ in range(count):
            run = jobs.create_run(
                session, model_name=model, dataset_version_id=dataset_version, spec=SPEC
            )
            assert run.id is not None
            ids.append(run.id)
    return ids


def status_of(engine: Engine, run_id: int) -> TrainingRun:
    with Session(engine) as session:
        return jobs.get_run(session, run_id=run_id)


def test_create_get_and_list(engine: Engine, dataset_version: int) -> None:
    first, second = queue(engine, dataset_version, 2)
    (other,) = queue(engine, dataset_version, model="other")
    with Session(engine) as session:
        run = jobs.get_run(session, run_id=first)
        assert (run.status, run.phase, run.cancel_requested) == ("queued", "", False)
        assert ModelSpec.model_validate_json(run.spec_json) == SPEC
        assert run.created_at.tzinfo is not None
        assert [r.id for r in jobs.list_runs(session)] == [other, second, first]
        assert [r.id for r in jobs.list_runs(session, model_name="m")] == [second, first]
        assert [r.id for r in jobs.list_runs(session, status="running")] == []
        assert [r.id for r in jobs.list_runs(session, limit=1)] == [other]
        with pytest.raises(NotFoundError, match="no training run 999"):
            jobs.get_run(session, run_id=999)


def test_claim_takes_the_oldest_queued_run_once(engine: Engine, dataset_version: int) -> None:
    first, second = queue(engine, dataset_version, 2)
    with Session(engine) as session:
        claimed = jobs.claim_next_run(session, worker="host-a:1")
        assert claimed is not None and claimed.id == first
        assert (claimed.status, claimed.worker, claimed.phase) == (
            "running",
            "host-a:1",
            "starting",
        )
        assert claimed.started_at is not None
        again = jobs.claim_next_run(session, worker="host-b:2")
        assert again is not None and again.id == second
        assert jobs.claim_next_run(session, worker="host-b:2") is None


def test_two_claimers_never_get_the_same_run(engine: Engine, dataset_version: int) -> None:
    ids = queue(engine, dataset_version, 24)
    claimed: dict[str, list[int]] = {}
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def claimer(name: str) -> None:
        mine: list[int] = []
        try:
            start.wait()
            with Session(engine) as session:
                while (run := jobs.claim_next_run(session, worker=f"{name}:1")) is not None:
                    assert run.id is not None
                    mine.append(run.id)
        except BaseException as e:
            errors.append(e)
        claimed[name] = mine

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    everything = [run_id for mine in claimed.values() for run_id in mine]
    assert sorted(everything) == ids  # each run once: no duplicates, none lost
    with Session(engine) as session:
        for run in jobs.list_runs(session):
            assert run.status == "running"
            assert run.worker is not None and run.id in claimed[run.worker.split(":")[0]]


def test_cancel_a_queued_run_at_once(engine: Engine, dataset_version: int) -> None:
    (run_id,) = queue(engine, dataset_version)
    with Session(engine) as session:
        run = jobs.request_cancel(session, run_id=run_id)
        assert run.status == "cancelled" and run.finished_at is not None
        assert jobs.claim_next_run(session, worker="h:1") is None
        assert jobs.request_cancel(session, run_id=run_id).status == "cancelled"  # idempotent
        with pytest.raises(NotFoundError):
            jobs.request_cancel(session, run_id=run_id + 100)


def test_cancel_a_running_run_asks_its_worker(engine: Engine, dataset_version: int) -> None:
    (run_id,) = queue(engine, dataset_version)
    with Session(engine) as session:
        jobs.claim_next_run(session, worker="h:1")
        jobs.start_run(session, run_id=run_id, worker="h:2")
        assert not jobs.is_cancel_requested(session, run_id=run_id)
        run = jobs.request_cancel(session, run_id=run_id)
        assert (run.status, run.cancel_requested) == ("running", True)
        assert jobs.is_cancel_requested(session, run_id=run_id)
        assert jobs.finish_run(session, run_id=run_id, status="cancelled")
        assert not jobs.finish_run(session, run_id=run_id, status="succeeded")  # already ended
    assert status_of(engine, run_id).status == "cancelled"


def test_finished_runs_cannot_be_cancelled_or_changed(engine: Engine, dataset_version: int) -> None:
    (run_id,) = queue(engine, dataset_version)
    with Session(engine) as session:
        jobs.claim_next_run(session, worker="h:1")
        assert jobs.finish_run(session, run_id=run_id, status="succeeded", phase="done")
        with pytest.raises(ConflictError, match="has already succeeded"):
            jobs.request_cancel(session, run_id=run_id)
        with pytest.raises(ConflictError, match="has already succeeded"):
            jobs.start_run(session, run_id=run_id, worker="h:3")
        assert not jobs.record_progress(session, run_id=run_id, progress={"epoch": 9})
        assert not jobs.set_phase(session, run_id=run_id, phase="training")
        assert jobs.is_cancel_requested(session, run_id=run_id)  # nothing left to run
        with pytest.raises(ValueError, match="finishes as one of"):
            jobs.finish_run(session, run_id=run_id, status="running")
    run = status_of(engine, run_id)
    assert (run.status, run.phase, run.progress_json) == ("succeeded", "done", "{}")


def test_worker_side_records(engine: Engine, dataset_version: int) -> None:
    (run_id,) = queue(engine, dataset_version)
    with Session(engine) as session:
        run = jobs.start_run(session, run_id=run_id, worker="h:7")  # by hand: straight from queued
        assert (run.status, run.worker, run.phase) == ("running", "h:7", "loading data")
        assert run.started_at is not None
        progress = {"stage": "training", "epoch": 1, "epochs": 2, "loss": float("nan")}
        assert jobs.record_progress(
            session, run_id=run_id, progress=progress, history=[{"epoch": 1, "loss": 0.5}]
        )
        assert jobs.record_results(
            session,
            run_id=run_id,
            metrics={"test": {"accuracy": 0.9}},
            environment={"tensorflow": "2.21.0"},
            history=[{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": float("inf")}],
            phase="building targets",
        )
    run = status_of(engine, run_id)
    assert json.loads(run.progress_json)["loss"] is None  # NaN is not JSON
    assert json.loads(run.history_json)[1]["loss"] is None
    assert json.loads(run.metrics_json) == {"test": {"accuracy": 0.9}}
    assert run.phase == "building targets"


def test_orphaned_runs_of_dead_workers_on_this_host_are_queued_again(
    engine: Engine, dataset_version: int
) -> None:
    here = socket.gethostname()
    dead, alive, elsewhere, cancelled, rebooted = queue(engine, dataset_version, 5)
    workers = {
        dead: f"{here}:101",
        alive: f"{here}:102",
        elsewhere: "some-other-host:101",
        cancelled: f"{here}:103",
        rebooted: f"{here}:104",
    }
    booted_at = utcnow() - timedelta(minutes=5)
    with session_scope(engine) as session:
        for run_id, worker in workers.items():
            jobs.start_run(session, run_id=run_id, worker=worker)
        jobs.request_cancel(session, run_id=cancelled)
        long_ago = session.get(TrainingRun, rebooted)
        assert long_ago is not None
        long_ago.started_at = booted_at - timedelta(hours=1)
        session.add(long_ago)
    with session_scope(engine) as session:
        requeued = jobs.requeue_orphaned_runs(
            session, host=here, is_alive=lambda pid: pid in (102, 104), booted_at=booted_at
        )
    assert sorted(requeued) == sorted([dead, cancelled, rebooted])
    for run_id in (dead, rebooted):
        run = status_of(engine, run_id)
        assert (run.status, run.worker, run.started_at, run.phase) == (
            "queued",
            None,
            None,
            "requeued",
        )
        assert run.error is not None and "was gone" in run.error
    assert status_of(engine, cancelled).status == "cancelled"
    assert status_of(engine, alive).status == "running"
    assert status_of(engine, elsewhere).status == "running"
    with Session(engine) as session:  # queued again means claimable again, oldest first
        again = jobs.claim_next_run(session, worker="h:1")
        assert again is not None and again.id == dead


def test_process_alive() -> None:
    import os
    import subprocess
    import sys

    assert jobs.process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not jobs.process_alive(child.pid)
