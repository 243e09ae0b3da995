"""A small fleet for the alert tests: six devices in two groups, a model version whose signed
bundle carries a drift reference, and telemetry as devices send it, hour by hour.

Reports go through :func:`server.ingest.telemetry.store_reports` -- the ingestor's own
storing, which keeps the drift rollups -- so rules read what ingestion wrote.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.alerts.evaluate import EvaluationContext
from server.artifacts import ArtifactStore
from server.datasets.types import DatasetSchema
from server.db import session_scope
from server.feedback.service import accuracy
from server.fleet.groups import add_members, create_group
from server.ingest.telemetry import store_reports
from server.keys import FleetKeys, init_keys
from server.models import DatasetVersion
from server.profiles import load_profiles
from shared.drift import DriftReference
from tests.server.drift.conftest import (
    CANARY,
    CONTROL,
    DRIFTED_FEATURE,
    FEATURES,
    MODEL,
    T0,
    TARGET,
    add_devices,
    make_reference,
    register_version,
    report,
    sketch_of,
)

__all__ = [
    "CANARY",
    "CONTROL",
    "DRIFTED_FEATURE",
    "MODEL",
    "T0",
    "TARGET",
    "Clock",
    "Fleet",
    "at",
    "make_fleet",
]

ROWS = 300
"""Values each device counts per report (two reports an hour)."""


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def class_schema(rows: int = 4000) -> str:
    """A schema whose class names are the reference's labels (feedback needs them)."""
    return DatasetSchema(
        task="classification",
        label="y",
        feature_names=FEATURES,
        feature_dtypes=["float64"] * len(FEATURES),
        input_shape=[len(FEATURES)],
        class_names=["a", "b", "c"],
        rows=rows,
    ).model_dump_json()


class Clock:
    """A clock the test sets (thread-safe enough: one assignment)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Fleet:
    engine: Engine
    store: ArtifactStore
    keys: FleetKeys
    reference: DriftReference
    rng: np.random.Generator
    seq: int = 0

    @property
    def context(self) -> EvaluationContext:
        profiles = load_profiles()
        return EvaluationContext(
            store=self.store,
            keys=self.keys,
            latency_sla_ms={n: p.latency_sla_ms_p95 for n, p in profiles.items()},
            accuracy_source=accuracy,
        )

    def hour(
        self,
        hour: int,
        devices: Iterable[str],
        *,
        shift: Mapping[str, float] | None = None,
        latency_ms: float = 5.0,
        errors: int = 0,
        version: int = 1,
        rows: int = ROWS,
    ) -> None:
        """Two half-hour reports per device, starting at hour ``hour`` after T0."""
        reports = []
        for device_id in devices:
            for half in range(2):
                self.seq += 1
                sketch = sketch_of(self.reference, self.rng, rows, shift)
                reports.append(
                    report(
                        device_id,
                        self.seq,
                        at(hour) + timedelta(minutes=30 * half),
                        sketch,
                        minutes=30,
                        version=version,
                        inferences=rows,
                        errors=errors,
                        latency_ms=latency_ms,
                    )
                )
        with session_scope(self.engine) as session:
            store_reports(session, reports)


def make_fleet(engine: Engine, data_dir: Path) -> Fleet:
    """Devices canary-0..2 (group canary) and control-0..2 (group control), all profile
    TARGET; model MODEL v1 with the reference in its signed bundle.

    Keys and artifacts are where a server with ``data_dir`` keeps them, so a server
    started on it afterwards reads the same bundle with the same keys."""
    keys = init_keys(data_dir / "keys", now=T0, lifetime=timedelta(days=3650))
    store = ArtifactStore(data_dir / "artifacts")
    reference = make_reference()
    with Session(engine) as session:
        add_devices(session, CANARY + CONTROL)
        for name, members in (("canary", CANARY), ("control", CONTROL)):
            add_members(session, group=create_group(session, name=name), device_ids=members)
        version = register_version(session, store=store, keys=keys, reference=reference)
        dataset_version = session.get(DatasetVersion, version.dataset_version_id)
        assert dataset_version is not None
        dataset_version.data_schema_json = class_schema()
        session.add(dataset_version)
        session.commit()
    return Fleet(engine, store, keys, reference, np.random.default_rng(3))
