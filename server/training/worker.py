"""One training run, start to finish, in a process of its own.

``python -m server.training.worker --run-id N`` -- started by a
:class:`~server.training.jobs.JobRunner`, or by hand to run a queued run. Settings come
from the environment (``EDGEFLEET_DATABASE_URL``, ``EDGEFLEET_DATA_DIR``, ...).

The worker loads the run and its dataset version, trains (phase ``training``) while
writing progress and history to the run (at most about twice a second) and reading
``cancel_requested`` after each epoch, records metrics, environment and seed, then
builds the per-target artifacts (phase ``building targets``, through
:func:`server.pipeline.publish.publish_model_version`) and ends the run ``succeeded``
with its ``model_version_id``. Signing keys and target profiles are loaded *before*
training, so a server that cannot sign fails at once, not after an hour of training.

What always holds: the run ends ``failed`` with the error's message on any error, and
``cancelled`` when a cancel was requested -- whether the worker notices it after an
epoch or is sent SIGTERM by its runner. On SIGTERM without a cancel request (the runner
is shutting down) the run is left ``running`` for the runner to queue again.

Exit codes: 0 succeeded, 1 failed, 2 bad usage or settings, 3 cancelled, 143 terminated.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col

from server.db import create_db_engine, session_scope
from server.errors import ServerError
from server.models import TrainingRun
from server.settings import Settings
from server.training import jobs
from server.training.spec import ModelSpec
from shared.preprocessing import apply_preprocessing

if TYPE_CHECKING:
    from server.datasets.types import LoadedDataset
    from server.training.trainer import EpochProgress, TrainedModel

__all__ = [
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "DatasetLoader",
    "PipelinePublisher",
    "Publisher",
    "main",
    "run_worker",
]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 3
EXIT_TERMINATED = 128 + signal.SIGTERM
_MAX_ERROR = 4000

DatasetLoader = Callable[[Session, int], "LoadedDataset"]
"""``(session, dataset_version_id) -> LoadedDataset``."""


class Publisher(Protocol):
    """Turns a trained model into a model version; returns its id."""

    def __call__(
        self,
        session: Session,
        *,
        run: TrainingRun,
        dataset: LoadedDataset,
        trained: TrainedModel,
        on_phase: Callable[[str], None],
    ) -> int: ...


class _Terminated(BaseException):
    """SIGTERM arrived. A BaseException, so no ``except Exception`` on the way swallows it."""


def _raise_terminated(_signum: int, _frame: FrameType | None) -> None:
    raise _Terminated


class PipelinePublisher:
    """The real publisher: converts, gates and signs per target profile.

    Built before training, so missing keys or profiles fail the run before it trains.
    """

    def __init__(self, settings: Settings, *, now: datetime | None = None) -> None:
        from server.artifacts import artifact_store
        from server.keys import load_fleet_keys
        from server.pipeline.publish import publish_model_version
        from server.profiles import load_profiles

        self._publish = publish_model_version
        self._keys = load_fleet_keys(settings.keys_dir, now=now or datetime.now(UTC))
        self._profiles = load_profiles()
        self.store = artifact_store(settings)

    def __call__(
        self,
        session: Session,
        *,
        run: TrainingRun,
        dataset: LoadedDataset,
        trained: TrainedModel,
        on_phase: Callable[[str], None],
    ) -> int:
        return self.publish_version(
            session,
            run=run,
            dataset=dataset,
            keras_model=trained.model,
            preprocessing=list(trained.preprocessing),
            float_metrics=trained.float_metrics,
            source="trained",
            on_phase=on_phase,
        )

    def publish_version(
        self,
        session: Session,
        *,
        run: TrainingRun,
        dataset: LoadedDataset,
        keras_model: Any,
        preprocessing: list[Any],
        float_metrics: dict[str, Any],
        source: str,
        on_phase: Callable[[str], None],
        notes: str = "",
    ) -> int:
        """Publish any Keras model (trained here or imported) for ``run``; the version's id."""
        version = self._publish(
            session,
            store=self.store,
            keys=self._keys,
            profiles=self._profiles,
            model_name=run.model_name,
            dataset=dataset,
            dataset_version_id=run.dataset_version_id,
            keras_model=keras_model,
            preprocessing=preprocessing,
            float_metrics=float_metrics,
            source=source,
            run_id=run.id,
            on_phase=on_phase,
            notes=notes,
        )
        session.flush()
        assert version.id is not None
        return int(version.id)


def _store_loader(settings: Settings) -> DatasetLoader:
    from server.artifacts import artifact_store
    from server.datasets.service import load_dataset_version

    store = artifact_store(settings)

    def load(session: Session, dataset_version_id: int) -> LoadedDataset:
        return load_dataset_version(session, store=store, dataset_version_id=dataset_version_id)

    return load


class _Reporter:
    """Writes progress to the run at most every ``interval`` seconds and answers ``should_stop``."""

    def __init__(
        self, engine: Engine, run_id: int, clock: Callable[[], float], interval: float = 0.5
    ) -> None:
        self.engine = engine
        self.run_id = run_id
        self.clock = clock
        self.interval = interval
        self.history: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._written_at = -float("inf")
        self._checked_at = -float("inf")
        self._stop = False

    def on_epoch(self, progress: EpochProgress) -> None:
        if progress.fold is None:
            if progress.epoch == 1:
                self.history = []
            self.history.append(
                {"epoch": progress.epoch, "loss": progress.loss, **progress.metrics}
            )
        self._pending = {
            "stage": progress.stage,
            "fold": progress.fold,
            "folds": progress.folds,
            "epoch": progress.epoch,
            "epochs": progress.epochs,
            "loss": progress.loss,
            "metrics": progress.metrics,
        }
        # The final fit's last epoch is always written; anything else at most every interval.
        last = progress.fold is None and progress.epoch == progress.epochs
        if last or self.clock() - self._written_at >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self._pending is None:
            return
        with session_scope(self.engine) as session:
            still_running = jobs.record_progress(
                session,
                run_id=self.run_id,
                progress=self._pending,
                history=self.history if self._pending["stage"] == "training" else None,
            )
        self._pending = None
        self._written_at = self.clock()
        self._stop = self._stop or not still_running

    def should_stop(self) -> bool:
        if not self._stop and self.clock() - self._checked_at >= self.interval:
            with Session(self.engine) as session:
                self._stop = jobs.is_cancel_requested(session, run_id=self.run_id)
            self._checked_at = self.clock()
        return self._stop

    def phase(self, phase: str) -> None:
        """Best effort, never blocking for long: called while the publisher holds its own
        transaction, which may hold locks this update would otherwise wait on for ever."""
        try:
            with self.engine.connect() as connection:
                dialect = connection.dialect.name
                if dialect == "postgresql":
                    connection.exec_driver_sql("SET LOCAL lock_timeout = '500ms'")
                elif dialect == "sqlite":
                    connection.exec_driver_sql("PRAGMA busy_timeout = 500")
                try:
                    connection.execute(
                        update(TrainingRun)
                        .where(col(TrainingRun.id) == self.run_id, TrainingRun.status == "running")
                        .values(phase=phase[:32])
                    )
                    connection.commit()
                finally:
                    if dialect == "sqlite":
                        connection.invalidate()  # not back to the pool with a short timeout
        except SQLAlchemyError as e:
            log.debug("training run %s: phase %r not recorded: %s", self.run_id, phase, e)


def _message(error: BaseException) -> str:
    text = str(error) if isinstance(error, ServerError) else f"{type(error).__name__}: {error}"
    return text[:_MAX_ERROR]


def run_worker(
    run_id: int,
    *,
    engine: Engine,
    settings: Settings,
    load_dataset: DatasetLoader | None = None,
    publisher: Publisher | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Train and publish run ``run_id``; returns the exit code (see the module docstring).

    ``load_dataset`` and ``publisher`` default to the datasets service and the pipeline.
    """
    try:
        with session_scope(engine) as session:
            run = jobs.start_run(session, run_id=run_id, worker=jobs.worker_name())
            model_name, dataset_version_id = run.model_name, run.dataset_version_id
            spec_json = run.spec_json
    except ServerError as e:
        log.error("training run %s cannot start: %s", run_id, e)
        return EXIT_FAILED
    reporter = _Reporter(engine, run_id, clock)
    if json.loads(spec_json or "{}").get("kind") == "import":
        return _run_import(
            run_id,
            engine=engine,
            settings=settings,
            spec_json=spec_json,
            model_name=model_name,
            dataset_version_id=dataset_version_id,
            reporter=reporter,
        )
    log.info("training run %s: %s on dataset version %s", run_id, model_name, dataset_version_id)
    try:
        spec = ModelSpec.model_validate_json(spec_json)
        publish = publisher or PipelinePublisher(settings)
        loader = load_dataset or _store_loader(settings)
        from server.training.trainer import TrainingCancelled, train_model  # TensorFlow: slow

        with Session(engine) as session:
            dataset = loader(session, dataset_version_id)
        with session_scope(engine) as session:
            jobs.set_phase(session, run_id=run_id, phase="training")
        try:
            trained = train_model(
                spec, dataset, on_epoch=reporter.on_epoch, should_stop=reporter.should_stop
            )
        except TrainingCancelled:
            return _cancelled(engine, run_id)
        reporter.flush()
        metrics = {
            "test": trained.metrics,
            "validation": trained.validation_metrics,
            "cross_validation": trained.cross_validation,
            "parameters": trained.parameters,
            "epochs_trained": trained.epochs_trained,
            "best_epoch": trained.best_epoch,
        }
        with session_scope(engine) as session:
            jobs.record_results(
                session,
                run_id=run_id,
                metrics=metrics,
                environment={**trained.environment, "seed": str(spec.seed)},
                history=trained.history,
                phase="building targets",
            )
        with session_scope(engine) as session:
            run = jobs.get_run(session, run_id=run_id)
            model_version_id = publish(
                session, run=run, dataset=dataset, trained=trained, on_phase=reporter.phase
            )
        with session_scope(engine) as session:
            jobs.finish_run(
                session,
                run_id=run_id,
                status=jobs.SUCCEEDED,
                model_version_id=model_version_id,
                phase="done",
            )
        log.info("training run %s succeeded: model version id %s", run_id, model_version_id)
        return EXIT_OK
    except (_Terminated, KeyboardInterrupt):
        with Session(engine) as session:
            cancel = jobs.is_cancel_requested(session, run_id=run_id)
        if cancel:
            return _cancelled(engine, run_id)
        log.warning("training run %s: terminated; left for the runner to queue again", run_id)
        return EXIT_TERMINATED
    except Exception as e:
        log.exception("training run %s failed", run_id)
        with session_scope(engine) as session:
            jobs.finish_run(session, run_id=run_id, status=jobs.FAILED, error=_message(e))
        return EXIT_FAILED


def _run_import(
    run_id: int,
    *,
    engine: Engine,
    settings: Settings,
    spec_json: str,
    model_name: str,
    dataset_version_id: int,
    reporter: _Reporter,
) -> int:
    """An import run: load the uploaded model, check and measure it, publish it."""
    from server.training import importing
    from server.training.trainer import environment, evaluate

    log.info("import run %s: %s on dataset version %s", run_id, model_name, dataset_version_id)
    try:
        spec = importing.ImportSpec.model_validate_json(spec_json)
        publisher = PipelinePublisher(settings)
        with Session(engine) as session:
            dataset = _store_loader(settings)(session, dataset_version_id)
        with session_scope(engine) as session:
            jobs.set_phase(session, run_id=run_id, phase="loading the model")
        with importing.temporary_dir() as tmp:
            model = importing.load_model(
                publisher.store.verify(spec.artifact_sha256).path,
                model_format=spec.format,
                input_shape=dataset.schema.input_shape,
                work_dir=Path(tmp),
            )
            steps = list(spec.preprocessing)
            importing.check_model_against(model, dataset=dataset, preprocessing=steps)
            x_test = apply_preprocessing(steps, dataset.x_test)
            metrics = evaluate(model, dataset.schema, x_test, dataset.y_test)
            with session_scope(engine) as session:
                jobs.record_results(
                    session,
                    run_id=run_id,
                    metrics={"test": metrics},
                    environment=environment(),
                    history=[],
                    phase="building targets",
                )
            with Session(engine) as session:
                version_id = publisher.publish_version(
                    session,
                    run=jobs.get_run(session, run_id=run_id),
                    dataset=dataset,
                    keras_model=model,
                    preprocessing=steps,
                    float_metrics=metrics,
                    source="imported",
                    on_phase=reporter.phase,
                    notes=spec.notes,
                )
        with session_scope(engine) as session:
            jobs.finish_run(
                session,
                run_id=run_id,
                status=jobs.SUCCEEDED,
                model_version_id=version_id,
                phase="done",
            )
        return EXIT_OK
    except (_Terminated, KeyboardInterrupt):
        return _cancelled(engine, run_id)
    except Exception as e:
        log.exception("import run %s failed", run_id)
        with session_scope(engine) as session:
            jobs.finish_run(session, run_id=run_id, status=jobs.FAILED, error=_message(e))
        return EXIT_FAILED


def _cancelled(engine: Engine, run_id: int) -> int:
    with session_scope(engine) as session:
        jobs.finish_run(session, run_id=run_id, status=jobs.CANCELLED)
    log.info("training run %s cancelled", run_id)
    return EXIT_CANCELLED


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.training.worker",
        description="Train and publish one queued or claimed training run.",
    )
    parser.add_argument("--run-id", type=int, required=True, help="the training run's id")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from pydantic import ValidationError

    from server.logs import configure_logging

    try:
        settings = Settings()
    except ValidationError as e:
        print(f"error: invalid settings: {e}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        engine = create_db_engine(settings.resolved_database_url)
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run_worker(args.run_id, engine=engine, settings=settings)
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
