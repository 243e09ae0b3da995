"""Fleet drift query cost, against a plain numpy sum of the same counts in the same run.

The fleet: N devices (10,000; 500 with ``--quick``) running one model whose drift
reference has 32 features x 20 bins (plus 10 classes and the confidence histogram),
each device reporting 24 hourly windows a day; a fifth of them drift on two
features. The next day repeats the first one, so ranges across midnight read both.
The rollups (hour, 6-hour and day rows per device, and the fleet rows) are written into a
real database (a SQLite file, or ``--db URL``) with the ingest path's packing.

Figures (time of :func:`server.drift.service.drift_report`, database reads included):

- the day (24 windows), whole fleet: day rows -- goal <= 1 s;
- a rolling 24 h from 01:00: each device's counts are its day row minus its 00:00 hour
  row, plus the next day's 00:00 hour (:func:`server.drift.timerange.count_plan`),
  three rows per device where hour rows alone were 24 -- goal <= 1 s;
- a rolling 24 h from 12:00: half a day on either side, two 6-hour rows each (the
  count plan's day-minus-hours saves nothing there; the 6-hour tier does) -- goal <= 1 s;
- a rolling 24 h from 09:00, the start that needs the most rows: 3 hour rows, three
  6-hour rows across midnight, 3 hour rows -- 9 per device, where hour rows alone were 24;
- the day for a list of half the devices, and the hourly PSI series of one feature.

Baseline: ``numpy.sum`` over the same raw counts (devices x 24 windows x counts), per
device and over the fleet -- what adding them up costs with no database at all. The
answer is checked against that sum (every feature's count and PSI). Ratios are
printed, not asserted: this is a benchmark, not a timed test.

    python bench/drift_query.py [--quick] [--devices N] [--db URL]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import numpy as np
from results import BenchResults, add_results_argument
from sqlalchemy import Engine, insert, text
from sqlmodel import Session

from server.db import create_db_engine, migrate
from server.drift.layout import EMPTY_MOMENT, Layout, merge_moment_stack, pack_counts, pack_moments
from server.drift.models import DriftLayout
from server.drift.report import DriftReport, DriftTimeseries, Thresholds
from server.drift.rollups import device_table, fleet_table
from server.drift.service import Scope, drift_report, timeseries_report
from shared.drift import DriftReference, psi
from shared.latency import N_LATENCY_BUCKETS, latency_counts

FEATURES, BINS, CLASSES, WINDOWS = 32, 20, 10, 24
DAY = datetime(2026, 11, 2, tzinfo=UTC)
MODEL, VERSION = "bench", 1
CHUNK = 250
T = TypeVar("T")


def build_reference(rng: np.random.Generator) -> DriftReference:
    train = rng.normal(size=(20_000, FEATURES))
    logits = rng.normal(size=(20_000, CLASSES))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return DriftReference.from_data(
        train,
        feature_names=[f"f{i}" for i in range(FEATURES)],
        n_bins=BINS,
        probabilities=probabilities,
    )


def expected_rates(reference: DriftReference, layout: Layout, per_window: int) -> np.ndarray:
    """Mean counts per window in the layout, and a drifted variant (f3, f7 shifted)."""
    rates = np.zeros((2, layout.size))
    for j, feature in enumerate(reference.features):
        share = np.asarray(feature.counts, dtype=np.float64)
        share /= share.sum()
        rates[:, layout.feature_slice(j)] = share * per_window
        if j in (3, 7):  # drifted devices: the mass slides five bins up
            rates[1, layout.feature_slice(j)] = np.roll(share, 5) * per_window
    assert reference.predictions is not None and reference.predictions.class_counts
    for part, where in (
        (reference.predictions.class_counts, layout.class_slice),
        (reference.predictions.confidence_counts, layout.confidence_slice),
    ):
        assert part is not None and where is not None
        share = np.asarray(part, dtype=np.float64)
        rates[:, where] = share / share.sum() * per_window
    return rates


def moments_for(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    out = np.tile(np.asarray(EMPTY_MOMENT), (rows, FEATURES, 1))
    out[:, :, 0] = n
    out[:, :, 1] = rng.normal(0, 0.05, size=(rows, FEATURES))
    out[:, :, 2] = n * rng.uniform(0.9, 1.1, size=(rows, FEATURES))
    out[:, :, 3] = -4.0
    out[:, :, 4] = 4.0
    return out


def next_day(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    """The same rows a day later: the next day's data, so ranges across midnight read both."""
    return [r | {"bucket_start": r["bucket_start"] + timedelta(days=1)} for r in rows]  # type: ignore[operator]


def populate(
    engine: Engine, reference: DriftReference, layout: Layout, n_devices: int, seed: int
) -> tuple[np.ndarray, float, list[str]]:
    """Write the rollups; return the fleet's summed counts, the baseline time, device ids."""
    rng = np.random.default_rng(seed)
    rates = expected_rates(reference, layout, per_window=400)
    lat = latency_counts(rng.lognormal(2.0, 0.3, size=400))
    latency = pack_counts(lat)
    hours = [DAY + timedelta(hours=h) for h in range(WINDOWS)]
    devices = [f"dev-{i:05d}" for i in range(n_devices)]
    fleet_hour = np.zeros((WINDOWS, layout.size), dtype=np.int64)
    fleet_moments: list[np.ndarray] = []
    baseline = 0.0
    key = {"model_name": MODEL, "model_version": VERSION, "reference_id": reference.reference_id}
    with Session(engine) as session:
        session.execute(
            insert(DriftLayout),
            [
                {
                    "reference_id": reference.reference_id,
                    "layout_json": layout.to_json(),
                    "created_at": datetime.now(UTC),
                }
            ],
        )
        for start in range(0, n_devices, CHUNK):
            ids = devices[start : start + CHUNK]
            drifted = (np.arange(start, start + len(ids)) % 5 == 4).astype(int)
            raw = rng.poisson(rates[drifted][:, None, :], size=(len(ids), WINDOWS, layout.size))
            raw = raw.astype(np.int32)
            t0 = time.perf_counter()
            per_device = raw.sum(axis=1, dtype=np.int64)  # the baseline: numpy, same counts
            fleet_part = per_device.sum(axis=0)
            baseline += time.perf_counter() - t0
            fleet_hour += raw.sum(axis=0, dtype=np.int64)
            moments = moments_for(rng, len(ids) * WINDOWS, 400).reshape(
                len(ids), WINDOWS, FEATURES, 5
            )
            day_moments = np.stack([merge_moment_stack(m) for m in moments])
            fleet_moments.append(moments.reshape(-1, FEATURES, 5))
            rows = []
            for i, device_id in enumerate(ids):
                common = key | {"device_id": device_id, "errors": 4, "latency": latency}
                for h, hour in enumerate(hours):
                    rows.append(
                        common
                        | {
                            "period": "hour",
                            "bucket_start": hour,
                            "windows": 1,
                            "inferences": 400,
                            "counts": pack_counts(raw[i, h].astype(np.int64)),
                            "moments": pack_moments(moments[i, h]),
                        }
                    )
                for block in range(WINDOWS // 6):
                    hours_in = slice(6 * block, 6 * block + 6)
                    rows.append(
                        common
                        | {
                            "period": "6h",
                            "bucket_start": hours[6 * block],
                            "windows": 6,
                            "inferences": 400 * 6,
                            "latency": pack_counts(lat * 6),
                            "errors": 4 * 6,
                            "counts": pack_counts(raw[i, hours_in].sum(axis=0, dtype=np.int64)),
                            "moments": pack_moments(merge_moment_stack(moments[i, hours_in])),
                        }
                    )
                rows.append(
                    common
                    | {
                        "period": "day",
                        "bucket_start": DAY,
                        "windows": WINDOWS,
                        "inferences": 400 * WINDOWS,
                        "latency": pack_counts(lat * WINDOWS),
                        "errors": 4 * WINDOWS,
                        "counts": pack_counts(per_device[i]),
                        "moments": pack_moments(day_moments[i]),
                    }
                )
            session.execute(insert(device_table()), rows + next_day(rows))
            del fleet_part
        all_moments = np.concatenate(fleet_moments).reshape(n_devices, WINDOWS, FEATURES, 5)
        fleet_rows = []
        for h, hour in enumerate(hours):
            fleet_rows.append(
                key
                | {
                    "period": "hour",
                    "bucket_start": hour,
                    "windows": n_devices,
                    "inferences": 400 * n_devices,
                    "errors": 4 * n_devices,
                    "latency": pack_counts(lat * n_devices),
                    "counts": pack_counts(fleet_hour[h]),
                    "moments": pack_moments(merge_moment_stack(all_moments[:, h])),
                }
            )
        for block in range(WINDOWS // 6):
            hours_in = slice(6 * block, 6 * block + 6)
            fleet_rows.append(
                key
                | {
                    "period": "6h",
                    "bucket_start": hours[6 * block],
                    "windows": 6 * n_devices,
                    "inferences": 400 * 6 * n_devices,
                    "errors": 4 * 6 * n_devices,
                    "latency": pack_counts(lat * 6 * n_devices),
                    "counts": pack_counts(fleet_hour[hours_in].sum(axis=0)),
                    "moments": pack_moments(
                        merge_moment_stack(all_moments[:, hours_in].reshape(-1, FEATURES, 5))
                    ),
                }
            )
        fleet_rows.append(
            key
            | {
                "period": "day",
                "bucket_start": DAY,
                "windows": n_devices * WINDOWS,
                "inferences": 400 * n_devices * WINDOWS,
                "errors": 4 * n_devices * WINDOWS,
                "latency": pack_counts(lat * n_devices * WINDOWS),
                "counts": pack_counts(fleet_hour.sum(axis=0)),
                "moments": pack_moments(merge_moment_stack(all_moments.reshape(-1, FEATURES, 5))),
            }
        )
        session.execute(insert(fleet_table()), fleet_rows + next_day(fleet_rows))
        session.commit()
    assert lat.size == N_LATENCY_BUCKETS
    return fleet_hour.sum(axis=0), baseline, devices


@contextmanager
def bench_database(url: str | None, work: Path) -> Iterator[str]:
    """A fresh database: a SQLite file in ``work``, or a schema of the bench's own in the
    PostgreSQL database ``url`` names (dropped at the end)."""
    if url is None:
        yield f"sqlite:///{work / 'bench.db'}"
        return
    if not url.startswith("postgresql"):
        raise SystemExit("--db takes a PostgreSQL URL (the default is a SQLite file)")
    schema = f"edgefleet_bench_drift_{os.getpid()}"
    admin = create_db_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        separator = "&" if "?" in url else "?"
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


def timed(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def row(figure: str, value: str, baseline: str, ratio: str, goal: str, result: str) -> str:
    return f"| {figure} | {value} | {baseline} | {ratio} | {goal} | {result} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="500 devices, fewer repeats (CI)")
    parser.add_argument("--devices", type=int, help="devices in the fleet (default 10,000)")
    parser.add_argument(
        "--db",
        help="a PostgreSQL URL: the bench works in a schema of its own there and drops it "
        "at the end (default: a SQLite file in a temp folder)",
    )
    add_results_argument(parser)
    args = parser.parse_args()
    n_devices = args.devices or (500 if args.quick else 10_000)
    repeats = 3 if args.quick else 5
    rng = np.random.default_rng(0)
    reference = build_reference(rng)
    layout = Layout.of_reference(reference)
    with (
        tempfile.TemporaryDirectory(prefix="edgefleet-bench-drift-") as tmp,
        bench_database(args.db, Path(tmp)) as url,
    ):
        engine = create_db_engine(url)
        migrate(engine)
        t0 = time.perf_counter()
        fleet_counts, baseline, devices = populate(engine, reference, layout, n_devices, seed=1)
        load_seconds = time.perf_counter() - t0
        thresholds = Thresholds()

        def query(scope: Scope, since: datetime, until: datetime) -> DriftReport:
            with Session(engine) as session:
                return drift_report(
                    session,
                    reference=reference,
                    model_name=MODEL,
                    model_version=VERSION,
                    scope=scope,
                    since=since,
                    until=until,
                    thresholds=thresholds,
                )

        def series() -> DriftTimeseries:
            with Session(engine) as session:
                return timeseries_report(
                    session,
                    reference=reference,
                    model_name=MODEL,
                    model_version=VERSION,
                    scope=Scope(None, None),
                    since=DAY,
                    until=DAY + timedelta(days=1),
                    features=["f3"],
                    bucket="hour",
                    thresholds=thresholds,
                )

        whole = Scope(None, None)
        day_s, report = timed(lambda: query(whole, DAY, DAY + timedelta(days=1)), repeats)
        rolling_s, rolling = timed(
            lambda: query(whole, DAY + timedelta(hours=1), DAY + timedelta(days=1, hours=1)),
            repeats,
        )
        noon_s, noon = timed(
            lambda: query(whole, DAY + timedelta(hours=12), DAY + timedelta(days=1, hours=12)),
            repeats,
        )
        worst_s, worst = timed(
            lambda: query(whole, DAY + timedelta(hours=9), DAY + timedelta(days=1, hours=9)),
            repeats,
        )
        half = Scope(None, devices[::2])
        half_s, _ = timed(lambda: query(half, DAY, DAY + timedelta(days=1)), repeats)
        series_s, _ = timed(series, repeats)
        engine.dispose()

    # The answer is the pooled computation: counts and PSI of every feature.
    for j, feature in enumerate(report.features):
        live = fleet_counts[layout.feature_slice(j)]
        assert feature.n == int(live.sum()), f"{feature.name}: counts differ"
        assert feature.psi == psi(reference.features[j].counts, live), f"{feature.name}: PSI"
    assert report.devices.with_drift_data == n_devices
    assert report.devices.act == n_devices // 5
    assert set(report.top_features) == {"f3", "f7"}, report.top_features
    # rolling from 01:00: the day row minus its 00:00, plus the next day's 00:00
    assert (rolling.rows_read["day"], rolling.rows_read["hour"]) == (n_devices, 2 * n_devices)
    # from 12:00: two 6-hour rows on either side of midnight
    assert noon.rows_read["6h"] == 4 * n_devices and "hour" not in noon.rows_read, noon.rows_read
    # from 09:00, the most rows any start needs: 3 hours, 3 six-hour rows, 3 hours
    assert (worst.rows_read["hour"], worst.rows_read["6h"]) == (6 * n_devices, 3 * n_devices)
    # the next day repeats the first: any 24 h holds each device's day's counts
    for answer in (rolling, noon, worst):
        assert [f.n for f in answer.features] == [f.n for f in report.features]
        assert answer.devices.act == n_devices // 5

    cells = n_devices * WINDOWS * layout.size
    print(
        f"{n_devices:,} devices x {FEATURES} features x {BINS} bins x {WINDOWS} windows "
        f"({cells / 1e6:.0f} M counts, {layout.size} per window); rollups written in "
        f"{load_seconds:.1f} s to {engine.dialect.name}; median of {repeats} runs\n"
    )

    def verdict(ok: bool) -> str:
        return "pass" if ok else "short"

    base = f"{baseline * 1e3:.0f} ms (numpy sum of {cells / 1e6:.0f} M counts)"
    lines = [
        row("figure", "value", "baseline", "ratio", "goal", "pass/short"),
        row("---", "---", "---", "---", "---", "---"),
        row(
            "fleet drift query, one day (24 windows), whole fleet",
            f"{day_s * 1e3:.0f} ms",
            base,
            f"{day_s / baseline:.2f}",
            "≤ 1 s",
            verdict(day_s <= 1.0),
        ),
        row(
            "fleet drift query, rolling 24 h from 01:00 (day row - 1 h + 1 h per device)",
            f"{rolling_s * 1e3:.0f} ms",
            base,
            f"{rolling_s / baseline:.2f}",
            "≤ 1 s",
            verdict(rolling_s <= 1.0),
        ),
        row(
            "fleet drift query, rolling 24 h from 12:00 (2 + 2 six-hour rows per device)",
            f"{noon_s * 1e3:.0f} ms",
            base,
            f"{noon_s / baseline:.2f}",
            "≤ 1 s",
            verdict(noon_s <= 1.0),
        ),
        row(
            "fleet drift query, rolling 24 h from 09:00, the worst start (3 h + 3 x 6 h + 3 h "
            "rows per device)",
            f"{worst_s * 1e3:.0f} ms",
            base,
            f"{worst_s / baseline:.2f}",
            "≤ 1 s",
            verdict(worst_s <= 1.0),
        ),
        row(
            "fleet drift query, one day, list of half the devices",
            f"{half_s * 1e3:.0f} ms",
            base,
            f"{half_s / baseline:.2f}",
            "—",
            "info",
        ),
        row(
            "hourly PSI series of one feature, whole fleet",
            f"{series_s * 1e3:.1f} ms",
            base,
            f"{series_s / baseline:.3f}",
            "—",
            "info",
        ),
    ]
    results = BenchResults("drift_query", quick=args.quick, path=args.results)
    for line in lines[2:]:  # the table's rows, header and rule left out
        results.add_row(*(cell.strip() for cell in line.strip()[2:-2].split(" | ")))
    results.finish()


if __name__ == "__main__":
    main()
