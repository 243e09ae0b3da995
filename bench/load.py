"""Load: a simulated fleet reporting telemetry into a real server, for minutes on end.

N simulated devices (1,000; 50 with ``--quick``) each send one telemetry report every S
seconds (1) for T seconds (300; 10 with ``--quick``) through a Mosquitto of the bench's
own into a real ``edgefleet server`` process (SQLite by default, ``--db`` for
PostgreSQL) that ingests with ``EDGEFLEET_INGEST_WORKERS`` worker processes (2) on the
shared subscription. Before the clock starts the devices enroll through the API and
take a rollout of a small digits classifier, so that every report carries a model window
with a real drift sketch (64 features), as a fleet in service sends.

Figures:

- reports due (devices x duration / interval, counted from the moment every device is
  connected) against reports sent in that time: the simulator's achieved rate against
  the due rate. Below 99 % the run is marked **short** -- the load was not applied, and
  no other figure of the run may stand for "N devices every S seconds";
- reports sent against reports ingested (stored once per ``(device_id, seq)``), after the
  devices stop, the broker acknowledged what they sent and the server drained it: lost =
  sent - ingested, goal 0; stored reports that no device sent, goal 0; duplicates the
  broker delivered (the same ``(device_id, seq)`` twice to the bare subscriber, which the
  server must store once); and reports the ingestion dropped (malformed, unknown
  device, ...), goal 0;
- RSS of the server and its worker processes at the start, middle and end of the load,
  and its slope (least squares over a sample a second): "flat" is an end within 10 % of
  the middle -- the first half includes the warm-up (caches, connection pools, arenas);
- ingestion lag, from the report's ``window_end`` (the device's clock when it sent it) to
  the server's ``received_at`` (stamped in the transaction that stores it), p50 / p99 /
  max; against the same delay for a bare paho subscriber on the broker (its own process)
  measured during the same run -- the part of the lag that is the broker's and the
  network's, not the server's;
- the last third's p50 lag against the first third's: a backlog that grows shows here;
- server CPU per report (server + workers), and the devices one core takes at this
  report interval; beside it the CPU the same server spent idle, and the broker's;
- the simulator's own CPU per report (build, encode, publish), beside the server's.

The bench process itself runs the simulated devices (one thread, paho's external loop,
:mod:`server.simulator.windows` for cheap reports) and competes with the server for the
machine's cores: if it falls behind its schedule it skips a report rather than bursting,
and the pace figure above says so.

    python bench/load.py [--quick] [--devices N] [--interval S] [--duration T]
                         [--workers W] [--db postgresql+psycopg://...] [--results PATH]
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import brokers
from brokers import free_port, wait_port
from results import BenchResults, add_results_argument

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

PROFILE = "edge-x86_64-litert"
MODEL = "bench-mlp"
_WINDOW_END = re.compile(rb'"window_end":\s*"([^"]+)"')
_REPORT_ID = re.compile(rb'"device_id":\s*"([^"]+)",\s*"seq":\s*(\d+)')
PACE_GOAL = 0.99  # below it the run is "short": the load was not applied
LOST_FIGURE = "reports sent − ingested (lost)"


# ----------------------------------------------------------------------------- processes


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and every process descending from it (read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int(_stat(int(entry.name))[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(parents.get(current, []))
    return tree


def tree_rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` (and of their children they waited for)."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat(pid)
        except OSError:
            continue
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / os.sysconf("SC_CLK_TCK")


def start_mosquitto(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A Mosquitto of our own, configured as docs/deploy/mosquitto.conf advises for
    ingestion (deep queues for the persistent ingestion sessions, no in-flight cap)."""
    return brokers.start_mosquitto(
        work,
        "max_inflight_messages 0\nmax_queued_messages 1000000\nmax_queued_bytes 0\n"
        "set_tcp_nodelay true\n",
    )


def database(url: str | None, work: Path) -> tuple[str, Any]:
    """The server's database URL (its SQLite file, or a PostgreSQL schema of our own)."""
    if url is None:
        return f"sqlite:///{work / 'server' / 'edgefleet.db'}", None
    if not url.startswith("postgresql"):
        raise SystemExit("--db takes a PostgreSQL URL (the default is a SQLite file)")
    from sqlalchemy import text

    from server.db import create_db_engine

    schema = f"edgefleet_load_{os.getpid()}"
    admin = create_db_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {schema}"))

    def drop() -> None:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()

    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options=-csearch_path%3D{schema}", drop


# ----------------------------------------------------------------------------- the baseline


def subscriber_main(port: int, out: Path, ready: Path) -> None:
    """A bare paho subscriber (run as its own process): for every telemetry report, the
    delay from its ``window_end`` to its arrival here, and how many reports arrived a
    second time (same ``(device_id, seq)``). Writes both as JSON to ``out`` on SIGTERM."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.topics import Channel, fleet_filter

    delays: list[float] = []
    seen: set[tuple[bytes, int]] = set()
    duplicates = 0
    stop = threading.Event()

    def on_message(_c: Any, _u: Any, message: Any) -> None:
        nonlocal duplicates
        arrived = time.time()
        report = _REPORT_ID.search(message.payload)
        if report is not None:
            key = (report.group(1), int(report.group(2)))
            if key in seen:
                duplicates += 1
            seen.add(key)
        match = _WINDOW_END.search(message.payload)
        if match is None:
            return
        try:
            sent = datetime.fromisoformat(match.group(1).decode()).timestamp()
        except ValueError:
            return
        delays.append(arrived - sent)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="load-baseline@bench")
    client.on_connect = lambda c, *_: c.subscribe(fleet_filter(Channel.TELEMETRY), qos=1)
    client.on_subscribe = lambda *_: ready.write_text("ready")
    client.on_message = on_message
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    client.connect("127.0.0.1", port)
    client.loop_start()
    stop.wait()
    client.disconnect()
    client.loop_stop()
    out.write_text(json.dumps({"delays": delays, "reports": len(seen), "duplicates": duplicates}))


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of (seconds, bytes) samples, in bytes per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [t for t, _ in samples]
    ys = [float(v) for _, v in samples]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 60 * sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var


# ----------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, results: BenchResults) -> None:
    from rollout import register_model
    from sqlalchemy import func, select
    from sqlmodel import Session

    from server.commands.client import ApiClient
    from server.db import create_db_engine
    from server.ingest.models import IngestDrop, TelemetryRecord
    from server.profiles import get_profile
    from server.simulator import FleetSimulator, SimulatedDevice
    from server.simulator.enroll import enroll_devices
    from shared.signing import VerifyKey

    devices, interval, duration = args.devices, args.interval, args.duration
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-load-"))
    cleanups: list[Any] = []
    processes: list[tuple[subprocess.Popen[Any], int]] = []  # stopped in reverse, by signal
    simulator: FleetSimulator | None = None
    try:
        mosquitto, broker_port = start_mosquitto(work)
        processes.append((mosquitto, signal.SIGTERM))
        broker = f"mqtt://127.0.0.1:{broker_port}"
        db_url, drop = database(args.db, work)
        if drop is not None:
            cleanups.append(drop)
        port = free_port()
        admin_token = secrets.token_urlsafe(32)
        env = {
            **os.environ,
            "EDGEFLEET_DATA_DIR": str(work / "server"),
            "EDGEFLEET_DATABASE_URL": db_url,
            "EDGEFLEET_RUN_JOBS": "false",
            "EDGEFLEET_ROLLOUT_TICK_SECONDS": "0.5",
            "EDGEFLEET_INGEST_WORKERS": str(args.workers),
            "EDGEFLEET_LOG_LEVEL": "WARNING",
            # the bench is the operator (dev mode takes any admin token it is given), and
            # enrolls the whole fleet from one address with one token
            "EDGEFLEET_ADMIN_TOKEN": admin_token,
            "EDGEFLEET_ENROLL_PER_MINUTE_PER_ADDRESS": "1000000",
            "EDGEFLEET_ENROLL_PER_MINUTE_PER_TOKEN": "1000000",
        }
        server = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "server", "--broker", broker, "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append((server, signal.SIGINT))
        wait_port(port, 90, "edgefleet server")
        client = ApiClient(f"http://127.0.0.1:{port}", token=admin_token)
        engine = create_db_engine(db_url)
        cleanups.append(engine.dispose)

        # -- the fleet: enrolled through the API, running a model from a real rollout
        profile = get_profile(PROFILE)
        client.post("/groups", json={"name": "load"})
        token = client.post(
            "/provisioning-tokens",
            json={"group": "load", "profile": PROFILE, "max_uses": devices, "auto_accept": True},
        )["token"]
        started = time.monotonic()
        enrolled = enroll_devices(
            client,
            token=token,
            device_ids=[f"load-{i:05d}" for i in range(devices)],
            profile=profile,
        )
        enroll_seconds = time.monotonic() - started
        root = VerifyKey.from_base64(enrolled[0].root_public_key)
        fleet = [
            SimulatedDevice(
                e.device_id,
                profile=PROFILE,
                runtime=(profile.runtime.name, profile.runtime.version),
                root_keys=[root],
                wall_clock=lambda: datetime.now(UTC),
            )
            for e in enrolled
        ]
        model_note = "reports without a model window (--no-model)"
        if args.model:
            version, size = register_model(work / "server", (32, 16), db_url)
            simulator = FleetSimulator(fleet, host="127.0.0.1", port=broker_port, report_interval=0)
            simulator.start()
            started = time.monotonic()
            client.post(
                "/rollouts",
                json={
                    "model": MODEL,
                    "version": version,
                    "group": "load",
                    "phases": "100",
                    "wait_between_phases": 0,
                    "max_devices_per_minute": 100_000,
                    "gates": {
                        "max_error_rate": None,
                        "max_latency_sla_ratio": None,
                        "max_confidence_drop": None,
                        "max_prediction_psi": None,
                    },
                },
            )
            deadline = time.monotonic() + max(120, devices * 0.5)
            while simulator.stats().installs < devices:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"only {simulator.stats().installs} of {devices} devices took the model"
                    )
                time.sleep(0.2)
            rollout_seconds = time.monotonic() - started
            simulator.stop()
            simulator = None
            model_note = (
                f"each report carries one model window with a 64-feature drift sketch "
                f"({size / 1e3:.0f} kB bundle rolled out to all in {rollout_seconds:.1f} s)"
            )

        # -- the baseline subscriber, its own process
        ready, delays_file = work / "baseline.ready", work / "baseline.json"
        baseline = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--subscriber",
                str(broker_port),
                str(delays_file),
                str(ready),
            ],
            cwd=Path(__file__).parent.parent,
        )
        processes.append((baseline, signal.SIGTERM))
        deadline = time.monotonic() + 30
        while not ready.exists():
            if time.monotonic() > deadline or baseline.poll() is not None:
                raise SystemExit("the baseline subscriber did not subscribe")
            time.sleep(0.05)

        server_pids = process_tree(server.pid)
        idle_window = 5.0
        idle_start = cpu_seconds(server_pids)
        time.sleep(idle_window)
        idle_cpu = (cpu_seconds(server_pids) - idle_start) / idle_window

        # -- the load: the clock starts once every device is connected, so that the
        # schedule (devices / interval reports a second) is due from then on
        simulator = FleetSimulator(
            fleet,
            host="127.0.0.1",
            port=broker_port,
            report_interval=interval,
            inferences_per_report=args.inferences,
            connect_rate=1000.0,
        )
        simulator.start()
        deadline = time.monotonic() + 60 + devices / 100
        while (connected := simulator.stats().connected) < devices:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {connected} of {devices} simulated devices connected")
            time.sleep(0.05)
        server_pids = process_tree(server.pid)
        cpu_start = cpu_seconds(server_pids)
        broker_cpu_start = cpu_seconds([mosquitto.pid])
        own_cpu_start = time.process_time()
        rss_samples: list[tuple[float, int]] = []
        load_before = os.getloadavg()
        at_start = simulator.stats()
        started, started_at = time.monotonic(), datetime.now(UTC)
        while (elapsed := time.monotonic() - started) < duration:
            server_pids = process_tree(server.pid)
            rss_samples.append((elapsed, tree_rss(server_pids)))
            time.sleep(min(1.0, max(0.0, duration - elapsed)))
        at_end = simulator.stats()
        load_seconds, ended_at = time.monotonic() - started, datetime.now(UTC)
        server_cpu = cpu_seconds(process_tree(server.pid)) - cpu_start
        broker_cpu = cpu_seconds([mosquitto.pid]) - broker_cpu_start
        own_cpu = time.process_time() - own_cpu_start
        load_after = os.getloadavg()
        simulator.stop()  # no new reports; waits for the broker to acknowledge the last
        stats = simulator.stats()
        simulator = None
        made = {device.device_id: device.reports_made for device in fleet}
        sent = stats.telemetry_sent
        sent_in_window = at_end.telemetry_sent - at_start.telemetry_sent

        # -- drain: what was sent must all be stored
        def stored() -> int:
            with Session(engine) as session:
                count = session.execute(select(func.count()).select_from(TelemetryRecord))
                return int(count.scalar_one())

        drain_started = time.monotonic()
        last_count, last_change = -1, time.monotonic()
        while (count := stored()) < sent and time.monotonic() - last_change < 60:
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            time.sleep(0.5)
        drain_seconds = time.monotonic() - drain_started
        ingested = stored()
        with Session(engine) as session:
            dropped = int(
                session.execute(select(func.coalesce(func.sum(IngestDrop.count), 0))).scalar_one()
            )
            rows = session.execute(
                select(  # type: ignore[call-overload]
                    TelemetryRecord.device_id,
                    TelemetryRecord.seq,
                    TelemetryRecord.window_end,
                    TelemetryRecord.received_at,
                )
            ).all()
        # (device_id, seq) is the table's key, so nothing is stored twice; a stored report
        # no device made (seq at or past what it made) would be a phantom
        phantoms = sum(1 for device_id, seq, _, _ in rows if seq >= made.get(device_id, 0))
        pairs = [(end, received) for _, _, end, received in rows]
        stored_in_window = sum(1 for _, received in pairs if started_at <= received < ended_at)
        baseline.send_signal(signal.SIGTERM)
        baseline.wait(30)
        seen_by_baseline = json.loads(delays_file.read_text())
        broker_delays = sorted(seen_by_baseline["delays"])
        broker_duplicates = int(seen_by_baseline["duplicates"])
    finally:
        if simulator is not None:
            simulator.stop()
        for process, signum in reversed(processes):
            if process.poll() is None:
                process.send_signal(signum)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        for cleanup in cleanups:
            cleanup()
        shutil.rmtree(work, ignore_errors=True)

    # -- the figures
    lags_by_time = sorted(
        (end.timestamp(), (received - end).total_seconds()) for end, received in pairs
    )
    lags = sorted(lag for _, lag in lags_by_time)
    first_t = lags_by_time[0][0] if lags_by_time else 0.0
    last_t = lags_by_time[-1][0] if lags_by_time else 0.0
    third = (last_t - first_t) / 3
    times = [t for t, _ in lags_by_time]
    early = [lag for _, lag in lags_by_time[: bisect.bisect_left(times, first_t + third)]]
    late = [lag for _, lag in lags_by_time[bisect.bisect_left(times, last_t - third) :]]
    early_p50 = statistics.median(early) if early else float("nan")
    late_p50 = statistics.median(late) if late else float("nan")
    p50, p99, worst = percentile(lags, 50), percentile(lags, 99), (lags[-1] if lags else 0.0)
    b50, b99 = percentile(broker_delays, 50), percentile(broker_delays, 99)
    lost = sent - ingested
    rss_start, rss_end = rss_samples[0][1], rss_samples[-1][1]
    rss_middle = rss_samples[len(rss_samples) // 2][1]
    slope = slope_per_minute(rss_samples)
    late_slope = slope_per_minute(rss_samples[len(rss_samples) // 2 :])
    # Per report actually sent in the load window (a short run sends fewer than due).
    cpu_per_second = server_cpu / load_seconds
    # A device reporting every `interval` seconds costs per_report / interval of a core.
    per_report_ms = 1000 * server_cpu / max(sent_in_window, 1)
    devices_per_core = interval / (per_report_ms / 1000) if per_report_ms > 0 else float("inf")
    broker_per_report_ms = 1000 * broker_cpu / max(sent_in_window, 1)
    broker_devices_per_core = (
        interval / (broker_per_report_ms / 1000) if broker_per_report_ms > 0 else float("inf")
    )
    due = devices / interval * load_seconds
    rate, due_rate = sent_in_window / load_seconds, devices / interval
    pace = sent_in_window / due if due else 0.0
    short = pace < PACE_GOAL
    simulator_cpu = at_end.cpu_seconds - at_start.cpu_seconds  # the simulator's thread only
    own_per_report_us = 1e6 * simulator_cpu / max(sent_in_window, 1)

    verdict = (
        f"SHORT RUN: the simulator sent {sent_in_window:,} of {due:,.0f} due reports "
        f"({100 * pace:.1f} %, {rate:,.0f}/s of {due_rate:,.0f}/s) -- the load was not "
        "applied; no figure below stands for the load asked for"
        if short
        else f"the load was applied: {sent_in_window:,} of {due:,.0f} due reports sent "
        f"({100 * pace:.1f} %, {rate:,.0f}/s of {due_rate:,.0f}/s)"
    )
    results.note(
        f"load benchmark ({'quick' if args.quick else 'full'}): {devices:,} simulated devices, "
        f"one report every {interval:g} s each for {load_seconds:.0f} s "
        f"(asked: {duration:g} s, counted from all connected); {verdict}; "
        f"{sent:,} sent in all, {stats.telemetry_acked:,} acknowledged by the broker, "
        f"{stats.telemetry_skipped:,} report windows skipped by devices behind schedule or "
        f"offline, {stats.disconnects:,} disconnects; "
        f"{model_note}; server: `edgefleet server` with {args.workers} ingest worker "
        f"processes on {'PostgreSQL' if args.db else 'SQLite'}, Mosquitto of its own; "
        f"enrolling through the API took {enroll_seconds:.1f} s; the simulator's thread used "
        f"{simulator_cpu / load_seconds:.2f} CPU-s/s ({own_per_report_us:.0f} CPU-µs per "
        f"report sent), the whole bench process {own_cpu / load_seconds:.2f} CPU-s/s; "
        f"{os.cpu_count()} cores, load average (1/5/15 min) "
        f"{'/'.join(f'{v:.1f}' for v in load_before)} before the load and "
        f"{'/'.join(f'{v:.1f}' for v in load_after)} at its end (other work on the machine "
        "shows here)"
    )
    results.add(
        "reports sent / due (the simulator's pace)",
        sent_in_window,
        "reports",
        value_text=f"{sent_in_window:,} sent ({rate:,.0f}/s)",
        baseline=due,
        baseline_text=f"{due:,.0f} due ({due_rate:,.0f}/s)",
        ratio=pace,
        ratio_text=f"{pace:.3f}",
        goal=f"≥ {PACE_GOAL:g} (else the run is short)",
        passed=not short,
    )
    results.add(
        LOST_FIGURE,
        lost,
        "reports",
        value_text=f"{lost:,} lost ({ingested:,} ingested of {sent:,} sent)",
        baseline=sent,
        baseline_text=f"{sent:,} sent",
        ratio=ingested / sent if sent else None,
        ratio_text=f"{ingested / sent:.4f}" if sent else "",
        goal="0 lost",
        passed=lost == 0 and sent > 0,
    )
    results.add(
        "reports stored that no device sent",
        phantoms,
        "reports",
        value_text=f"{phantoms:,}",
        goal="0",
        passed=phantoms == 0,
    )
    results.add(
        "duplicates delivered by the broker (stored once by the server)",
        broker_duplicates,
        "reports",
        value_text=f"{broker_duplicates:,}",
        baseline=len(broker_delays),
        baseline_text=f"{len(broker_delays):,} reports the bare subscriber received",
    )
    results.add(
        "reports dropped by ingestion (malformed, unknown device, …)",
        dropped,
        "reports",
        value_text=f"{dropped:,}",
        goal="0",
        passed=dropped == 0,
    )
    ingest_rate = stored_in_window / load_seconds
    results.add(
        "ingestion rate during the load (reports stored per second)",
        ingest_rate,
        "reports/s",
        value_text=f"{ingest_rate:,.0f}/s ({stored_in_window:,} stored)",
        baseline=rate,
        baseline_text=f"{rate:,.0f}/s sent",
        ratio=ingest_rate / rate if rate else None,
        ratio_text=f"{ingest_rate / rate:.3f}" if rate else "",
    )
    results.add(
        "drain after the devices stopped",
        drain_seconds,
        "s",
        value_text=f"{drain_seconds:.1f} s",
        baseline=interval,
        baseline_text=f"{interval:g} s (report interval)",
        ratio=drain_seconds / interval,
    )
    results.add(
        "server RSS start / middle / end (server + workers)",
        rss_end / 2**20,
        "MB",
        value_text=f"{rss_start / 2**20:.0f} / {rss_middle / 2**20:.0f} / {rss_end / 2**20:.0f} MB",
        baseline=rss_middle / 2**20,
        baseline_text=f"{rss_middle / 2**20:.0f} MB in the middle (warmed up)",
        ratio=rss_end / rss_middle,
        ratio_text=f"{rss_end / rss_middle:.3f}",
        goal="end ≤ 1.10 × middle",
        passed=rss_end <= 1.10 * rss_middle,
    )
    results.add(
        "server RSS slope over the second half (least squares, a sample a second)",
        late_slope / 2**20,
        "MB/min",
        value_text=f"{late_slope / 2**20:+.2f} MB/min",
        baseline=slope / 2**20,
        baseline_text=f"{slope / 2**20:+.2f} MB/min over the whole run",
        ratio=late_slope / rss_middle,
        ratio_text=f"{100 * late_slope / rss_middle:+.2f} %/min",
    )
    results.add(
        "ingestion lag p50 (window end → stored)",
        p50,
        "s",
        value_text=f"{p50 * 1000:.0f} ms",
        baseline=b50,
        baseline_text=f"{b50 * 1000:.0f} ms (bare subscriber p50)",
        ratio=p50 / b50 if b50 > 0 else None,
    )
    results.add(
        "ingestion lag p99",
        p99,
        "s",
        value_text=f"{p99 * 1000:.0f} ms",
        baseline=b99,
        baseline_text=f"{b99 * 1000:.0f} ms (bare subscriber p99)",
        ratio=p99 / b99 if b99 > 0 else None,
        goal=f"≤ {2 * interval:g} s (two report intervals)",
        passed=p99 <= 2 * interval,
    )
    results.add(
        "ingestion lag max",
        worst,
        "s",
        value_text=f"{worst * 1000:.0f} ms",
        baseline=broker_delays[-1] if broker_delays else None,
        baseline_text=(
            f"{broker_delays[-1] * 1000:.0f} ms (bare subscriber max)" if broker_delays else ""
        ),
    )
    results.add(
        "lag p50, last third of the run / first third (a growing backlog shows here)",
        late_p50,
        "s",
        value_text=f"{late_p50 * 1000:.0f} ms",
        baseline=early_p50,
        baseline_text=f"{early_p50 * 1000:.0f} ms (first third)",
        ratio=late_p50 / early_p50 if early_p50 > 0 else None,
        goal="≤ 2 (not growing)",
        passed=late_p50 <= 2 * early_p50 + 0.05,
    )
    results.add(
        "server CPU per report (server + workers)",
        per_report_ms,
        "ms",
        value_text=f"{per_report_ms:.2f} CPU-ms",
        baseline=idle_cpu,
        baseline_text=f"idle: {idle_cpu:.3f} CPU-s/s",
        ratio=cpu_per_second / idle_cpu if idle_cpu > 0 else None,
        ratio_text=f"{cpu_per_second:.2f} CPU-s/s under load",
    )
    results.add(
        f"devices per core at one report every {interval:g} s (server + workers)",
        devices_per_core,
        "devices",
        value_text=f"{devices_per_core:,.0f} devices",
        baseline=broker_devices_per_core,
        baseline_text=(
            f"Mosquitto: {broker_devices_per_core:,.0f} devices per core "
            f"({broker_per_report_ms:.3f} CPU-ms per report)"
            if broker_cpu > 0
            else ""
        ),
    )
    results.add(
        "simulator CPU per report sent (build, encode, publish, acknowledgements)",
        own_per_report_us / 1000,
        "ms",
        value_text=f"{own_per_report_us:.0f} CPU-µs",
        baseline=per_report_ms,
        baseline_text=f"{per_report_ms:.2f} CPU-ms (server + workers)",
        ratio=own_per_report_us / 1000 / per_report_ms if per_report_ms > 0 else None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="50 devices for 10 s (CI)")
    parser.add_argument("--devices", type=int, help="simulated devices (default 1,000)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between reports")
    parser.add_argument("--duration", type=float, help="seconds of load (default 300)")
    parser.add_argument("--workers", type=int, default=2, help="ingest worker processes")
    parser.add_argument("--inferences", type=int, default=20, help="inferences per report")
    parser.add_argument("--db", help="a PostgreSQL URL (default: the server's SQLite file)")
    parser.add_argument(
        "--no-model",
        dest="model",
        action="store_false",
        help="skip the rollout: reports carry no model window (no TensorFlow needed)",
    )
    parser.add_argument("--subscriber", nargs=3, help=argparse.SUPPRESS)
    add_results_argument(parser)
    args = parser.parse_args()
    if args.subscriber:
        port, out, ready = args.subscriber
        subscriber_main(int(port), Path(out), Path(ready))
        return
    args.devices = args.devices or (50 if args.quick else 1_000)
    args.duration = args.duration or (10.0 if args.quick else 300.0)
    for name in ("devices", "interval", "duration", "workers", "inferences"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive, not {getattr(args, name)}")
    results = BenchResults("load", quick=args.quick, path=args.results)
    run(args, results)
    results.finish()
    lost = next(f for f in results.figures if f.figure == LOST_FIGURE)
    if lost.result != "pass":
        raise SystemExit("reports were lost: " + lost.value_text)


if __name__ == "__main__":
    main()
