"""A stand-in training worker for the JobRunner tests: ``fake_worker.py --run-id N BEHAVIOUR``.

It reaches the database the way the real worker does (``EDGEFLEET_DATABASE_URL`` from the
runner) and behaves as asked:

- ``succeed``: take the run, report three epochs, finish it ``succeeded``;
- ``crash``: write to stderr and exit 7 without touching the run (a worker that dies);
- ``hang``: take the run and wait for ever (SIGTERM ends it: the default action);
- ``hang-ignoring-term``: the same, but deaf to SIGTERM, so only SIGKILL ends it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from server.db import create_db_engine, session_scope
from server.training import jobs


def main() -> int:
    run_id = int(sys.argv[sys.argv.index("--run-id") + 1])
    behaviour = sys.argv[-1]
    if behaviour == "hang-ignoring-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if behaviour == "crash":
        print("fake worker: loading the dataset", flush=True)
        print("Traceback (most recent call last):\nRuntimeError: boom", file=sys.stderr)
        return 7
    engine = create_db_engine(os.environ["EDGEFLEET_DATABASE_URL"])
    with session_scope(engine) as session:
        jobs.start_run(session, run_id=run_id, worker=jobs.worker_name())
        jobs.set_phase(session, run_id=run_id, phase="training")
    if behaviour == "succeed":
        history = []
        for epoch in (1, 2, 3):
            history.append({"epoch": epoch, "loss": 1.0 / epoch, "accuracy": 0.3 * epoch})
            progress = {
                "stage": "training",
                "fold": None,
                "folds": None,
                "epoch": epoch,
                "epochs": 3,
                "loss": 1.0 / epoch,
                "metrics": {"accuracy": 0.3 * epoch},
            }
            with session_scope(engine) as session:
                jobs.record_progress(session, run_id=run_id, progress=progress, history=history)
        with session_scope(engine) as session:
            jobs.record_results(
                session,
                run_id=run_id,
                metrics={"test": {"accuracy": 0.9, "macro_f1": 0.88}},
                environment={"data_dir": os.environ["EDGEFLEET_DATA_DIR"]},
                history=history,
                phase="building targets",
            )
            jobs.finish_run(session, run_id=run_id, status="succeeded", phase="done")
        return 0
    with session_scope(engine) as session:
        jobs.set_phase(session, run_id=run_id, phase="hanging")
    engine.dispose()
    threading.Event().wait(120)  # until a signal ends the process
    return 1


if __name__ == "__main__":
    sys.exit(main())
