"""Training runs as background jobs, kept in the database so any API replica can serve them.

A run moves ``queued -> running -> succeeded | failed | cancelled``, and only forward:
every transition is one conditional ``UPDATE ... WHERE status = <expected>``, so two
processes racing on a run (a worker finishing while an operator cancels, two runners
claiming) can never both win, and a finished run is never changed again.

- The API creates runs (:func:`create_run`) and asks for cancellation
  (:func:`request_cancel`); it never trains and never waits.
- A :class:`JobRunner` (one per API process, or a process of its own) claims queued runs
  (:func:`claim_next_run`, atomic across processes and hosts) and runs each in a worker
  subprocess (``python -m server.training.worker --run-id N``), which records progress
  and the outcome through the helpers below.

``progress_json`` while a run trains::

    {"stage": "training" | "cross-validation", "fold": 2 | null, "folds": 5 | null,
     "epoch": 3, "epochs": 15, "loss": 0.21, "metrics": {"accuracy": 0.93, "val_loss": ...}}

``history_json`` is the final fit's epochs (``[{"epoch": 1, "loss": ..., ...}, ...]``);
``metrics_json`` is ``{"test": {...}, "validation": {...}, "cross_validation": {...} |
null, "parameters": n, "epochs_trained": n, "best_epoch": n}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from server.db import session_scope, utcnow
from server.errors import ConflictError, NotFoundError
from server.models import TrainingRun
from server.settings import Settings
from server.training.spec import ModelSpec

__all__ = [
    "ACTIVE",
    "FINISHED",
    "STATUSES",
    "JobRunner",
    "claim_next_run",
    "create_run",
    "finish_run",
    "get_run",
    "is_cancel_requested",
    "list_runs",
    "process_alive",
    "record_progress",
    "record_results",
    "request_cancel",
    "requeue_orphaned_runs",
    "set_phase",
    "start_run",
    "worker_command",
    "worker_environment",
    "worker_name",
]

log = logging.getLogger(__name__)

QUEUED, RUNNING = "queued", "running"
SUCCEEDED, FAILED, CANCELLED = "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
FINISHED = (SUCCEEDED, FAILED, CANCELLED)
_PHASE_LENGTH = 32  # training_runs.phase


def _json_text(value: Any) -> str:
    """JSON for a ``*_json`` column; NaN and infinities become null (JSON has neither)."""
    return json.dumps(_finite(value), separators=(",", ":"))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def worker_name(pid: int | None = None) -> str:
    """``host:pid`` of a process on this host, as ``training_runs.worker`` records it."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


# ----------------------------------------------------------------------------- API side


def create_run(
    session: Session, *, model_name: str, dataset_version_id: int, spec: ModelSpec
) -> TrainingRun:
    """Queue a run; committed, so any runner may claim it at once."""
    run = TrainingRun(
        model_name=model_name,
        dataset_version_id=dataset_version_id,
        status=QUEUED,
        spec_json=spec.model_dump_json(),
    )
    session.add(run)
    session.commit()
    session.refresh(run)
    return run


def get_run(session: Session, *, run_id: int) -> TrainingRun:
    run = session.get(TrainingRun, run_id, populate_existing=True)
    if run is None:
        raise NotFoundError(f"no training run {run_id}")
    return run


def list_runs(
    session: Session,
    *,
    model_name: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[TrainingRun]:
    """Newest first."""
    query = select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(limit)
    if model_name is not None:
        query = query.where(TrainingRun.model_name == model_name)
    if status is not None:
        query = query.where(TrainingRun.status == status)
    return list(session.exec(query).all())


def _transition(session: Session, run_id: int, expected: Sequence[str], **values: Any) -> bool:
    """One conditional update; True when the run was in an ``expected`` status and changed."""
    statement = (
        update(TrainingRun)
        .where(col(TrainingRun.id) == run_id, col(TrainingRun.status).in_(expected))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    changed = session.exec(statement).rowcount == 1
    session.commit()
    return changed


def request_cancel(session: Session, *, run_id: int) -> TrainingRun:
    """A queued run is cancelled at once; a running one gets ``cancel_requested``, which its
    runner and worker act on. A finished run cannot be cancelled (:class:`ConflictError`)."""
    if not _transition(
        session, run_id, [QUEUED], status=CANCELLED, cancel_requested=True, finished_at=utcnow()
    ):
        _transition(session, run_id, [RUNNING], cancel_requested=True)
    run = get_run(session, run_id=run_id)
    if run.status in FINISHED and not (run.status == CANCELLED and run.cancel_requested):
        raise ConflictError(f"training run {run_id} has already {run.status}")
    return run


# ----------------------------------------------------------------------------- runner side


def claim_next_run(session: Session, *, worker: str) -> TrainingRun | None:
    """Atomically move the oldest queued run to ``running`` for ``worker``; None if none.

    One statement does it: ``UPDATE ... WHERE id = (oldest queued) AND status = 'queued'``.
    On PostgreSQL the inner select takes ``FOR UPDATE SKIP LOCKED``, so concurrent
    claimers skip each other's candidate instead of queueing behind it; on SQLite the
    statement runs under the database's single write lock and the ``status`` guard plus
    the row count decide. Either way no two claimers get the same run.
    """
    session.commit()  # a fresh transaction: the claim must not see a stale snapshot
    oldest = (
        select(TrainingRun.id)
        .where(TrainingRun.status == QUEUED)
        .order_by(col(TrainingRun.id))
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        oldest = oldest.with_for_update(skip_locked=True)
    statement = (
        update(TrainingRun)
        .where(col(TrainingRun.id) == oldest.scalar_subquery(), TrainingRun.status == QUEUED)
        .values(status=RUNNING, worker=worker[:128], phase="starting", started_at=utcnow())
        .returning(TrainingRun.id)
        .execution_options(synchronize_session=False)
    )
    claimed = session.exec(statement).scalars().all()
    session.commit()
    if len(claimed) != 1:
        return None
    return get_run(session, run_id=claimed[0])


def process_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _booted_at() -> datetime | None:
    """When this host booted (Linux), so a pid from before a reboot is known to be gone."""
    from datetime import UTC

    try:
        with open("/proc/stat", encoding="ascii") as stat:
            for line in stat:
                if line.startswith("btime "):
                    return datetime.fromtimestamp(int(line.split()[1]), UTC)
    except (OSError, ValueError):
        pass
    return None


def requeue_orphaned_runs(
    session: Session,
    *,
    host: str | None = None,
    is_alive: Callable[[int], bool] = process_alive,
    booted_at: datetime | None = None,
) -> list[int]:
    """Put back in the queue the runs left ``running`` by a dead worker on this host.

    Why: a runner or worker that dies without finishing (host reboot, OOM kill, SIGKILL,
    a crash of the API process) leaves its run ``running`` for ever, and no one would
    ever train it. Only runs whose worker is on *this* host can be judged -- their pid
    is either alive or gone -- and a run started before this host's last boot is gone
    whatever its pid says now (pids are reused after a reboot). A run whose cancellation
    was asked for is cancelled instead. Runs of other hosts are left to their own hosts.
    """
    host = host or socket.gethostname()
    booted_at = booted_at or _booted_at()
    requeued: list[int] = []
    query = select(TrainingRun).where(
        TrainingRun.status == RUNNING,
        col(TrainingRun.worker).startswith(f"{host}:", autoescape=True),
    )
    for run in session.exec(query).all():
        assert run.id is not None and run.worker is not None
        pid_text = run.worker.rsplit(":", 1)[1]
        pid = int(pid_text) if pid_text.isdigit() else None
        before_boot = (
            booted_at is not None and run.started_at is not None and run.started_at < booted_at
        )
        if pid is not None and is_alive(pid) and not before_boot:
            continue
        if run.cancel_requested:
            values: dict[str, Any] = {"status": CANCELLED, "finished_at": utcnow()}
        else:
            values = _requeue_values(f"requeued: worker {run.worker} was gone")
        guard = update(TrainingRun).where(
            col(TrainingRun.id) == run.id,
            TrainingRun.status == RUNNING,
            TrainingRun.worker == run.worker,
        )
        if session.exec(guard.values(**values)).rowcount == 1:
            requeued.append(run.id)
            log.warning(
                "training run %s: its worker %s is gone; %s",
                run.id,
                run.worker,
                "cancelled" if run.cancel_requested else "queued again",
            )
    session.commit()
    return requeued


def _requeue_values(note: str) -> dict[str, Any]:
    return {
        "status": QUEUED,
        "phase": "requeued",
        "worker": None,
        "started_at": None,
        "progress_json": "{}",
        "history_json": "[]",
        "error": note,
    }


# ----------------------------------------------------------------------------- worker side


def start_run(session: Session, *, run_id: int, worker: str) -> TrainingRun:
    """The worker takes its run: claimed (``running``) or, run by hand, still ``queued``."""
    started = _transition(
        session,
        run_id,
        [QUEUED, RUNNING],
        status=RUNNING,
        worker=worker[:128],
        phase="loading data",
        error=None,
    )
    run = get_run(session, run_id=run_id)
    if not started:
        raise ConflictError(f"training run {run_id} has already {run.status}")
    if run.started_at is None:
        _transition(session, run_id, [RUNNING], started_at=utcnow())
        run = get_run(session, run_id=run_id)
    return run


def is_cancel_requested(session: Session, *, run_id: int) -> bool:
    """True when the run should stop: cancellation asked for, or no longer ``running``."""
    row = session.exec(
        select(TrainingRun.cancel_requested, TrainingRun.status).where(TrainingRun.id == run_id)
    ).first()
    session.commit()  # end the read transaction: the next call must see new writes
    return row is None or bool(row[0]) or row[1] != RUNNING


def set_phase(session: Session, *, run_id: int, phase: str) -> bool:
    return _transition(session, run_id, [RUNNING], phase=phase[:_PHASE_LENGTH])


def record_progress(
    session: Session,
    *,
    run_id: int,
    progress: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
) -> bool:
    """Store the latest epoch (and the history so far); False if the run is no longer running."""
    values: dict[str, Any] = {"progress_json": _json_text(progress)}
    if history is not None:
        values["history_json"] = _json_text(history)
    return _transition(session, run_id, [RUNNING], **values)


def record_results(
    session: Session,
    *,
    run_id: int,
    metrics: dict[str, Any],
    environment: dict[str, Any],
    history: list[dict[str, Any]],
    phase: str,
) -> bool:
    return _transition(
        session,
        run_id,
        [RUNNING],
        metrics_json=_json_text(metrics),
        environment_json=_json_text(environment),
        history_json=_json_text(history),
        phase=phase[:_PHASE_LENGTH],
    )


def finish_run(
    session: Session,
    *,
    run_id: int,
    status: str,
    error: str | None = None,
    model_version_id: int | None = None,
    phase: str | None = None,
) -> bool:
    """End a running run; False (and nothing changed) when it had already ended."""
    if status not in FINISHED:
        raise ValueError(f"a run finishes as one of {FINISHED}, not {status!r}")
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "error": error}
    if model_version_id is not None:
        values["model_version_id"] = model_version_id
    if phase is not None:
        values["phase"] = phase[:_PHASE_LENGTH]
    return _transition(session, run_id, [RUNNING], **values)


# ----------------------------------------------------------------------------- the runner


def worker_command(run_id: int) -> list[str]:
    """How a :class:`JobRunner` starts the worker for ``run_id`` by default."""
    return [sys.executable, "-m", "server.training.worker", "--run-id", str(run_id)]


def worker_environment(settings: Settings) -> dict[str, str]:
    """The worker's environment: this process's, plus the settings it must share with it."""
    env = dict(os.environ)
    env.update(
        {
            "EDGEFLEET_DATABASE_URL": settings.resolved_database_url,
            "EDGEFLEET_DATA_DIR": str(settings.data_dir.resolve()),
            "EDGEFLEET_MODE": settings.mode,
            "EDGEFLEET_SECRET_KEY": settings.secret_key.get_secret_value(),
            "EDGEFLEET_MAX_ARTIFACT_BYTES": str(settings.max_artifact_bytes),
            "EDGEFLEET_LOG_LEVEL": settings.log_level,
            "EDGEFLEET_LOG_FORMAT": settings.log_format,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(settings.artifact_environment())  # the same store: the folder or the bucket
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


@dataclass
class _Child:
    run_id: int
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    log_path: Path
    log_offset: int
    terminated_at: float | None = None


class JobRunner:
    """Claims queued runs and runs each in a worker subprocess, at most ``max_concurrent``.

    A thread polls the database every ``poll_interval`` seconds. For each child it
    watches ``cancel_requested`` and then terminates the child's process group (SIGTERM,
    and SIGKILL ``kill_grace`` seconds later by ``clock``), marking the run cancelled; a
    child that exits while its run is still ``running`` failed, and the run records its
    exit code and the tail of its output (kept in ``<data_dir>/logs/training-run-N.log``).
    :meth:`start` first re-queues runs orphaned by a dead worker on this host
    (:func:`requeue_orphaned_runs`); :meth:`stop` terminates the children and puts their
    runs back in the queue, so a restart or another replica trains them again.

    ``engine`` is an engine or a factory for one (then the runner owns and disposes it);
    ``command`` maps a run id to the worker's argv (default :func:`worker_command`); the
    worker gets the database URL and data dir through ``EDGEFLEET_DATABASE_URL`` and
    ``EDGEFLEET_DATA_DIR``. POSIX only (process groups).
    """

    def __init__(
        self,
        engine: Engine | Callable[[], Engine],
        *,
        settings: Settings,
        max_concurrent: int = 1,
        command: Callable[[int], list[str]] | None = None,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        kill_grace: float = 10.0,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self._engine_source = engine
        self._engine: Engine | None = engine if isinstance(engine, Engine) else None
        self._settings = settings
        self._max_concurrent = max_concurrent
        self._command = command or worker_command
        self._poll_interval = poll_interval
        self._clock = clock
        self._kill_grace = kill_grace
        self._children: dict[int, _Child] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._name = worker_name()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            factory = self._engine_source
            assert callable(factory)
            self._engine = factory()
        return self._engine

    @property
    def active_runs(self) -> list[int]:
        """Ids of the runs whose workers are alive (or not yet reaped)."""
        return sorted(self._children.copy())

    def start(self) -> None:
        """Re-queue this host's orphaned runs, then start claiming and running runs.

        Orphans first: a previous server process on this host may have died with runs
        ``running`` whose workers died with it (or after it); nothing else would ever
        train them again. See :func:`requeue_orphaned_runs`.
        """
        if self._thread is not None:
            raise RuntimeError("the job runner is already started")
        with session_scope(self.engine) as session:
            requeue_orphaned_runs(session)
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._loop, name="edgefleet-training-runner", daemon=True
        )
        self._thread.start()
        log.info("training job runner started", extra={"max_concurrent": self._max_concurrent})

    def stop(self) -> None:
        """Stop claiming, terminate running workers and queue their runs again."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for child in self._children.values():
            self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + self._kill_grace
        for child in list(self._children.values()):
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(child, signal.SIGKILL)
                child.process.wait()
            child.log.close()
            try:
                self._put_back(child)
            except Exception:  # the others must still be put back
                log.exception("training run %s: could not queue it again", child.run_id)
        self._children.clear()
        if self._engine is not None and not isinstance(self._engine_source, Engine):
            self._engine.dispose()
            self._engine = None

    # -- the thread

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:  # the database may be briefly away; never let the thread die
                log.exception("training job runner: poll failed; retrying")
            self._stopping.wait(self._poll_interval)

    def _tick(self) -> None:
        for child in list(self._children.values()):
            code = child.process.poll()
            if code is not None:
                self._reap(child, code)
            elif child.terminated_at is None:
                with Session(self.engine) as session:
                    cancel = session.exec(
                        select(TrainingRun.cancel_requested).where(TrainingRun.id == child.run_id)
                    ).first()
                if cancel:
                    log.info("training run %s: cancelling its worker", child.run_id)
                    with session_scope(self.engine) as session:
                        set_phase(session, run_id=child.run_id, phase="cancelling")
                    self._signal(child, signal.SIGTERM)
                    child.terminated_at = self._clock()
            elif self._clock() - child.terminated_at >= self._kill_grace:
                self._signal(child, signal.SIGKILL)
        while len(self._children) < self._max_concurrent and not self._stopping.is_set():
            with Session(self.engine) as session:
                run = claim_next_run(session, worker=self._name)
            if run is None:
                break
            assert run.id is not None
            self._spawn(run.id)

    def _spawn(self, run_id: int) -> None:
        log_path = self._settings.data_dir / "logs" / f"training-run-{run_id}.log"
        output: IO[bytes] | None = None
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            output = log_path.open("ab")
            offset = output.tell()
            process = subprocess.Popen(
                self._command(run_id),
                env=worker_environment(self._settings),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a terminal's Ctrl-C is ours
            )
        except Exception as e:  # no such program, no permission, a full disk
            if output is not None:
                output.close()
            with session_scope(self.engine) as session:
                finish_run(session, run_id=run_id, status=FAILED, error=f"cannot start: {e}")
            log.error("training run %s: cannot start its worker: %s", run_id, e)
            return
        self._children[run_id] = _Child(run_id, process, output, log_path, offset)
        with session_scope(self.engine) as session:
            # The worker's pid, so a restarted runner can tell whether it is still alive.
            _transition(session, run_id, [RUNNING], worker=worker_name(process.pid))
        log.info("training run %s: worker pid %s started", run_id, process.pid)

    def _reap(self, child: _Child, code: int) -> None:
        """Record how a child that exited left its run; the child is forgotten only once
        that is recorded, so a database outage here is retried at the next poll."""
        how = f"exited with code {code}"
        if code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        elif code == 0:
            how += " without finishing the run"
        with session_scope(self.engine) as session:
            run = get_run(session, run_id=child.run_id)
            if run.status != RUNNING:
                pass  # the worker recorded how it ended
            elif run.cancel_requested:
                finish_run(session, run_id=child.run_id, status=CANCELLED)
            else:
                child.log.flush()
                tail = _tail(child.log_path, child.log_offset)
                error = f"the training worker {how}" + (f":\n{tail}" if tail else "")
                finish_run(session, run_id=child.run_id, status=FAILED, error=error)
                log.warning("training run %s: worker %s", child.run_id, how)
        del self._children[child.run_id]
        child.log.close()

    def _put_back(self, child: _Child) -> None:
        with session_scope(self.engine) as session:
            run = get_run(session, run_id=child.run_id)
            if run.status != RUNNING:
                return
            if run.cancel_requested:
                finish_run(session, run_id=child.run_id, status=CANCELLED)
            else:
                _transition(
                    session, child.run_id, [RUNNING], **_requeue_values("requeued: server stopped")
                )

    @staticmethod
    def _signal(child: _Child, signum: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.process.pid, signum)


def _tail(path: Path, offset: int, limit: int = 2000) -> str:
    """The end of what the worker wrote since ``offset``: its traceback, if it had one."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(offset, end - limit))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = text.strip().splitlines()
    if end - offset > limit and len(lines) > 1:
        lines = lines[1:]  # the first line is cut
    return "\n".join(lines[-25:])
