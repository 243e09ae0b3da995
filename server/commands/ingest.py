"""``edgefleet ingest``: ingestion workers on their own, N processes on a shared subscription.

Each worker consumes device telemetry, feedback and samples through
``$share/<group>/ef/v1/dev/+/<channel>`` with its own persistent client id
(``edgefleet-ingest-<i>@<name>``), and stores what it receives exactly once (see
:mod:`server.ingest.workers`). It runs until Ctrl-C or SIGTERM (or ``--duration``),
then stops the workers, each finishing the batch in hand, and prints what each did --
``--json`` prints that as JSON on stdout and nothing else.

Run it beside ``edgefleet server`` with the server's own ingestor off
(``EDGEFLEET_TELEMETRY_INGESTOR=false``) or in the same group
(``EDGEFLEET_INGEST_SHARE_GROUP=ingest``); otherwise the server receives every
message as well and stores nothing twice, but does the work twice.
"""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from server.commands.client import emit_json, err, fail

__all__ = ["ingest"]

_NAME = re.compile(r"[^A-Za-z0-9._-]")


def _host_name() -> str:
    return _NAME.sub("-", socket.gethostname())[:32] or "host"


def _table(rows: list[dict[str, Any]], elapsed: float) -> Table:
    table = Table(title=f"ingest workers, {elapsed:.0f} s")
    for column in (
        "worker",
        "client id",
        "received",
        "stored",
        "duplicates",
        "dropped",
        "restarts",
    ):
        table.add_column(column, justify="left" if column in ("worker", "client id") else "right")
    for row in rows:
        table.add_row(
            str(row["index"]),
            row["client_id"],
            f"{row['received']:,}",
            f"{row['stored']:,}",
            f"{row['duplicates']:,}",
            f"{row['dropped']:,}",
            str(row["restarts"]),
        )
    return table


def ingest(
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 2,
    broker: Annotated[
        str | None,
        typer.Option(help="mqtt[s]://host:port of the broker. [env: EDGEFLEET_BROKER_URL]"),
    ] = None,
    db: Annotated[
        str | None,
        typer.Option(
            help="Database URL (default: SQLite in the data dir). [env: EDGEFLEET_DATABASE_URL]"
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="What follows '@' in the workers' client ids (default: this host's name)."
        ),
    ] = None,
    share_group: Annotated[
        str, typer.Option(help="Shared-subscription group of the workers.")
    ] = "ingest",
    batch_size: Annotated[int, typer.Option(min=1, max=20000, help="Messages per transaction.")] = (
        500
    ),
    duration: Annotated[
        float | None, typer.Option(min=0, help="Stop after this many seconds (for scripts).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON only.")
    ] = False,
) -> None:
    """Run N ingestion worker processes on a shared subscription until Ctrl-C."""
    from pydantic import ValidationError

    from server.db import create_db_engine, migrate
    from server.errors import ServerError
    from server.ingest.workers import IngestWorkers, WorkerSpec, worker_client_id
    from server.logs import configure_logging
    from server.settings import Settings
    from shared.errors import TopicError
    from shared.topics import fleet_filter

    overrides = {k: v for k, v in {"broker_url": broker, "database_url": db}.items() if v}
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        fail(e.errors()[0]["msg"], code=2)
    if settings.broker_url == "embedded":
        fail(
            "edgefleet ingest needs a broker: give --broker mqtt://host:port (or set "
            "EDGEFLEET_BROKER_URL); the embedded broker lives inside `edgefleet server`",
            code=2,
        )
    try:
        fleet_filter("telemetry", share_group=share_group)
    except TopicError as e:
        fail(f"--share-group: {e}", code=2)
    host = name if name is not None else _host_name()
    if _NAME.search(host) or not host:
        fail(f"--name {host!r}: use letters, digits, '.', '_' or '-'", code=2)
    configure_logging("WARNING" if as_json else settings.log_level, settings.log_format)
    try:
        specs = [
            WorkerSpec(
                index=i,
                database_url=settings.resolved_database_url,
                broker_url=settings.service_broker_url,
                client_id=worker_client_id(f"edgefleet-ingest@{host}", i),
                share_group=share_group,
                batch_size=batch_size,
                samples_retention_days=settings.samples_retention_days,
                log_level="WARNING" if as_json else settings.log_level,
                log_format=settings.log_format,
            )
            for i in range(workers)
        ]
        engine = create_db_engine(settings.resolved_database_url)
        migrate(engine)  # once, here: the workers find the schema current
        engine.dispose()
        supervisor = IngestWorkers(specs)
    except ServerError as e:
        fail(str(e))
    stop = threading.Event()
    previous = {
        signum: signal.signal(signum, lambda *_: stop.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    console = Console(stderr=True)
    if not as_json:
        console.print(
            f"{workers} ingest worker{'s' * (workers > 1)} on "
            f"[bold]{fleet_filter('telemetry', share_group=share_group)}[/] (and feedback, "
            f"samples) as {', '.join(s.client_id for s in specs)}; Ctrl-C stops them"
        )
    started = time.monotonic()
    supervisor.start()

    def rows() -> list[dict[str, Any]]:
        stats, restarts = supervisor.stats(), supervisor.restarts()
        return [
            {
                "index": s.index,
                "client_id": s.client_id,
                **asdict(stats[s.index]),
                "restarts": restarts[s.index],
            }
            for s in specs
        ]

    announced = False

    def wait() -> bool:
        """A moment more, or False once it is time to stop."""
        nonlocal announced
        if not announced and supervisor.subscribed():
            announced = True
            pids = ", ".join(str(p) for p in supervisor.pids().values())
            err.print(f"ready: {workers} workers subscribed (processes {pids})")
        left = None if duration is None else duration - (time.monotonic() - started)
        if left is not None and left <= 0:
            return False
        pause = 0.5 if announced else 0.1
        return not stop.wait(pause if left is None else min(pause, left))

    try:
        if console.is_terminal and not as_json:
            with Live(_table(rows(), 0), console=console, refresh_per_second=2) as live:
                while wait():
                    live.update(_table(rows(), time.monotonic() - started))
        else:
            while wait():
                pass
    finally:
        supervisor.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    final = rows()
    totals = {
        key: sum(row[key] for row in final)
        for key in ("received", "stored", "duplicates", "dropped", "batches", "errors")
    }
    elapsed = time.monotonic() - started
    if as_json:
        emit_json({"workers": final, "total": totals, "seconds": round(elapsed, 1)})
        return
    err.print(_table(final, elapsed))
    err.print(
        f"{totals['received']:,} messages received, {totals['stored']:,} stored, "
        f"{totals['duplicates']:,} duplicates, {totals['dropped']:,} dropped"
    )
