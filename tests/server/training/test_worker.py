"""The training worker: in-process with stand-in loader and publisher, and as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.datasets.types import LoadedDataset
from server.models import Model, ModelVersion, TrainingRun
from server.settings import Settings
from server.training import jobs
from server.training.spec import ModelSpec
from server.training.trainer import TrainedModel
from server.training.worker import EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, run_worker
from tests.server.training.conftest import add_dataset_version, small_digits

pytestmark = pytest.mark.database

SPEC = ModelSpec(arch="mlp", hidden_units=[16], epochs=3, batch_size=64, seed=5, k_folds=2)


class RecordingPublisher:
    """Makes a model version row, as the pipeline would, and remembers what it was given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.calls: list[dict[str, object]] = []

    def __call__(
        self,
        session: Session,
        *,
        run: TrainingRun,
        dataset: LoadedDataset,
        trained: TrainedModel,
        on_phase: Callable[[str], None],
    ) -> int:
        on_phase("converting edge-x86_64")
        self.calls.append({"run": run.id, "metrics": trained.float_metrics})
        if self.error is not None:
            raise self.error
        model = Model(name=run.model_name, task=dataset.schema.task)
        session.add(model)
        session.flush()
        assert model.id is not None
        version = ModelVersion(
            model_id=model.id,
            version=1,
            source="trained",
            dataset_version_id=run.dataset_version_id,
            run_id=run.id,
            keras_sha256="f" * 64,
            status="ready",
        )
        session.add(version)
        session.flush()
        assert version.id is not None
        return version.id


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url)


def queued_run(engine: Engine, spec: ModelSpec = SPEC) -> tuple[int, int]:
    data = small_digits(300)
    version = add_dataset_version(engine, data.schema)
    with Session(engine) as session:
        run = jobs.create_run(session, model_name="digits", dataset_version_id=version, spec=spec)
        jobs.claim_next_run(session, worker="runner:1")
        assert run.id is not None
        return run.id, version


def loader_for(expected_version: int, hook: Callable[[], None] | None = None):  # type: ignore[no-untyped-def]
    def load(_session: Session, dataset_version_id: int) -> LoadedDataset:
        assert dataset_version_id == expected_version
        if hook is not None:
            hook()
        return small_digits(300)

    return load


def test_a_run_is_trained_recorded_and_published(engine: Engine, settings: Settings) -> None:
    run_id, version = queued_run(engine)
    publisher = RecordingPublisher()
    code = run_worker(
        run_id,
        engine=engine,
        settings=settings,
        load_dataset=loader_for(version),
        publisher=publisher,
    )
    assert code == EXIT_OK
    with Session(engine) as session:
        run = jobs.get_run(session, run_id=run_id)
        model_version = session.exec(select(ModelVersion)).one()
    assert (run.status, run.phase, run.error) == ("succeeded", "done", None)
    assert run.model_version_id == model_version.id and model_version.run_id == run_id
    assert run.worker == jobs.worker_name()
    metrics = json.loads(run.metrics_json)
    assert set(metrics["test"]) == {"rows", "accuracy", "macro_f1", "confusion_matrix"}
    assert metrics["cross_validation"]["k"] == 2 and len(metrics["cross_validation"]["folds"]) == 2
    assert metrics["parameters"] > 0 and metrics["epochs_trained"] == 3
    history = json.loads(run.history_json)
    assert [h["epoch"] for h in history] == [1, 2, 3] and "val_loss" in history[0]
    progress = json.loads(run.progress_json)
    assert progress == progress | {"stage": "training", "fold": None, "epoch": 3, "epochs": 3}
    assert "val_accuracy" in progress["metrics"]
    environment = json.loads(run.environment_json)
    assert environment["seed"] == "5" and environment["tensorflow"].startswith("2.")
    (call,) = publisher.calls
    assert call["run"] == run_id
    assert call["metrics"] == {
        "accuracy": metrics["test"]["accuracy"],
        "macro_f1": metrics["test"]["macro_f1"],
    }


def test_a_publishing_error_fails_the_run(engine: Engine, settings: Settings) -> None:
    run_id, version = queued_run(engine, SPEC.model_copy(update={"k_folds": None}))
    code = run_worker(
        run_id,
        engine=engine,
        settings=settings,
        load_dataset=loader_for(version),
        publisher=RecordingPublisher(RuntimeError("no target accepted the model")),
    )
    assert code == EXIT_FAILED
    with Session(engine) as session:
        run = jobs.get_run(session, run_id=run_id)
    assert run.status == "failed"
    assert run.error == "RuntimeError: no target accepted the model"
    assert run.phase == "converting edge-x86_64"  # where it was when it failed
    assert json.loads(run.metrics_json)["test"]["accuracy"] > 0  # the training is kept


def test_a_cancel_request_stops_training(engine: Engine, settings: Settings) -> None:
    run_id, version = queued_run(engine)

    def operator_cancels() -> None:
        with Session(engine) as session:
            jobs.request_cancel(session, run_id=run_id)

    publisher = RecordingPublisher()
    code = run_worker(
        run_id,
        engine=engine,
        settings=settings,
        load_dataset=loader_for(version, hook=operator_cancels),
        publisher=publisher,
    )
    assert code == EXIT_CANCELLED and publisher.calls == []
    with Session(engine) as session:
        assert jobs.get_run(session, run_id=run_id).status == "cancelled"


def test_a_finished_run_is_not_started_again(engine: Engine, settings: Settings) -> None:
    run_id, version = queued_run(engine)
    with Session(engine) as session:
        jobs.finish_run(session, run_id=run_id, status="failed", error="earlier")
    code = run_worker(
        run_id,
        engine=engine,
        settings=settings,
        load_dataset=loader_for(version),
        publisher=RecordingPublisher(),
    )
    assert code == EXIT_FAILED
    with Session(engine) as session:
        assert jobs.get_run(session, run_id=run_id).error == "earlier"


def test_the_worker_process_reads_its_settings_from_the_environment(
    engine: Engine, settings: Settings
) -> None:
    """``python -m server.training.worker``: with no signing keys in the data dir, the run
    fails before any training, and the process says so with a non-zero exit code."""
    run_id, _version = queued_run(engine)
    env = jobs.worker_environment(settings)
    result = subprocess.run(
        [sys.executable, "-m", "server.training.worker", "--run-id", str(run_id)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.getcwd(),
        check=False,
    )
    assert result.returncode == EXIT_FAILED, result.stderr
    with Session(engine) as session:
        run = jobs.get_run(session, run_id=run_id)
    assert run.status == "failed" and run.error, run
    assert run.phase == "loading data" and run.history_json == "[]"
    assert run.worker is not None and run.worker != "runner:1"  # the process took the run
    usage = subprocess.run(
        [sys.executable, "-m", "server.training.worker"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert usage.returncode == 2 and "--run-id" in usage.stderr


def test_progress_writes_are_throttled(engine: Engine, settings: Settings) -> None:
    """With a clock that never moves, only the first and the last epoch are written."""
    from sqlalchemy import event

    run_id, version = queued_run(engine, SPEC.model_copy(update={"k_folds": None, "epochs": 6}))
    written: list[str] = []

    def count(_conn, _cursor, statement: str, parameters, _context, _many) -> None:  # type: ignore[no-untyped-def]
        if statement.startswith("UPDATE training_runs SET progress_json"):
            written.append(json.loads(_first(parameters))["epoch"])

    event.listen(engine, "before_cursor_execute", count)
    try:
        code = run_worker(
            run_id,
            engine=engine,
            settings=settings,
            load_dataset=loader_for(version),
            publisher=RecordingPublisher(),
            clock=lambda: 0.0,
        )
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert code == EXIT_OK
    assert written == [1, 6]


def _first(parameters: object) -> str:
    values = parameters.values() if isinstance(parameters, dict) else parameters
    return next(v for v in values if isinstance(v, str) and v.startswith("{"))  # type: ignore[union-attr]
