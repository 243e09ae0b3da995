"""A fleet drift query end to end: version, reference, scope, plan, rows, figures.

:func:`fleet_drift` and :func:`fleet_timeseries` take what the API and CLI take (text
for the version, group, devices and range) and resolve it; :func:`drift_report` and
:func:`timeseries_report` are the cores on resolved values (the benchmark calls them).

What always holds:

- The scope is the whole fleet, a group's members *now* (accepted devices, as
  :func:`server.fleet.groups.group_device_ids` computes them), or a list of devices.
- The whole fleet is answered from the fleet rollups plus the device rollups' counts
  (for the device shares, read by :func:`~server.drift.timerange.count_plan`: a day
  mostly in range as its day row minus the hours outside it); a group or list from
  its devices' rollups alone. Fleet rows are the sums of device rows (kept in the
  same transaction), so both give the same figures.
- Bad input raises a :class:`~server.errors.ServerError` whose message names it:
  unknown model, version or group (404), a bad range, feature or bucket (422).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlmodel import Session

from server import registry
from server.artifacts import ArtifactStore
from server.drift.compute import (
    DevicePsi,
    device_psi,
    device_summary,
    feature_drift,
    prediction_shift,
    series,
    sla_summary,
    top_devices,
)
from server.drift.errors import LayoutMismatchError, TimeRangeError
from server.drift.layout import Layout
from server.drift.reference import version_reference
from server.drift.report import DriftReport, DriftTimeseries, Thresholds
from server.drift.rollups import fleet_table, retention_marks
from server.drift.storage import Totals, read_device_counts, read_sums, stored_layout
from server.drift.timerange import Period, Segment, count_plan, floor_to, plan, resolve_range
from server.errors import InvalidInputError
from server.fleet.groups import get_group, group_device_ids
from server.keys import FleetKeys
from server.models import ModelVersion
from shared.drift import DriftReference

__all__ = [
    "AUTO_HOURLY_SPAN",
    "MAX_DEVICES",
    "Scope",
    "comparable_layout",
    "drift_report",
    "fleet_drift",
    "fleet_timeseries",
    "resolve_scope",
    "resolve_version",
    "timeseries_report",
]

MAX_DEVICES = 10_000
"""The most devices a ``devices`` list may name (a group may have any number)."""

AUTO_HOURLY_SPAN = timedelta(hours=72)
"""``bucket=auto`` gives hourly points up to this span, daily ones beyond."""


@dataclass(frozen=True, slots=True)
class Scope:
    group: str | None
    device_ids: list[str] | None
    """None: the whole fleet."""


def resolve_scope(session: Session, *, group: str | None, devices: Sequence[str] | None) -> Scope:
    if group and devices:
        raise InvalidInputError("give a group or a list of devices, not both")
    if group:
        return Scope(group, group_device_ids(session, get_group(session, name=group)))
    if devices:
        ids = sorted({d.strip() for d in devices if d.strip()})
        if not ids:
            raise InvalidInputError("devices: the list is empty")
        if len(ids) > MAX_DEVICES:
            raise InvalidInputError(f"devices: at most {MAX_DEVICES} ids, not {len(ids)}")
        return Scope(None, ids)
    return Scope(None, None)


def resolve_version(
    session: Session, *, model_name: str, version: str | None, since: datetime, until: datetime
) -> ModelVersion:
    """A version by number, alias or ``latest``; by default the newest with data in the range."""
    if version:
        return registry.get_version(session, model_name=model_name, version=version)
    registry.get_model(session, name=model_name)  # 404 for an unknown model
    fleet = fleet_table()
    newest = session.execute(
        select(func.max(fleet.c.model_version)).where(
            fleet.c.model_name == model_name,
            fleet.c.bucket_start >= floor_to(since, Period.DAY),
            fleet.c.bucket_start < until,
        )
    ).scalar_one_or_none()
    return registry.get_version(
        session, model_name=model_name, version="latest" if newest is None else str(newest)
    )


def comparable_layout(session: Session, reference: DriftReference) -> Layout | None:
    """The layout the reference's counts were stored with (None: nothing stored yet), or
    :class:`LayoutMismatchError` when it does not cover the reference's features."""
    stored = stored_layout(session, reference.reference_id)
    if stored is not None and not stored.covers_features_of(Layout.of_reference(reference)):
        raise LayoutMismatchError(
            f"drift counts for reference {reference.reference_id[:12]}... were stored with "
            "other features than the model's reference has; they cannot be compared"
        )
    return stored


def drift_report(
    session: Session,
    *,
    reference: DriftReference,
    model_name: str,
    model_version: int,
    scope: Scope,
    since: datetime,
    until: datetime,
    thresholds: Thresholds,
    top: int = 20,
) -> DriftReport:
    """The drift and SLA view of one version over ``[since, until)`` (whole hours)."""
    marks = retention_marks(session)
    covered = plan(
        since, until, hour_deleted_before=marks.get("hour"), day_deleted_before=marks.get("day")
    )
    layout = comparable_layout(session, reference)

    def read(fleet: bool, **options: Any) -> Totals:
        return read_sums(
            session,
            fleet=fleet,
            model_name=model_name,
            model_version=model_version,
            segments=covered.segments,
            reference_id=reference.reference_id,
            layout=layout,
            **options,
        )

    scores = DevicePsi([], np.zeros((0, 0)), np.zeros((0, 0), dtype=np.int64))
    if scope.device_ids is None:
        merged = read(True)
        rows_read = {f"fleet_{k}": v for k, v in merged.rows.items()}
        if layout is not None:  # the device shares need counts alone: days minus hours do
            devices = read_device_counts(
                session,
                model_name=model_name,
                model_version=model_version,
                counts_plan=count_plan(covered, hour_deleted_before=marks.get("hour")),
                reference_id=reference.reference_id,
                layout=layout,
            )
            rows_read |= devices.rows
            scores = device_psi(reference, layout, devices.device_ids, devices.counts)
    else:
        merged = read(False, device_ids=scope.device_ids, per_device=True)
        rows_read = merged.rows
        if layout is not None and merged.device_counts is not None:
            scores = device_psi(reference, layout, merged.device_ids, merged.device_counts)
    sums = merged.sums
    in_scope = None if scope.device_ids is None else len(scope.device_ids)
    summary, feature_act, feature_warn = device_summary(scores, thresholds, in_scope=in_scope)
    features, top_features, predictions = [], [], None
    if layout is not None and sums.counts is not None and sums.moments is not None:
        features = feature_drift(
            reference,
            layout,
            sums.counts,
            sums.moments,
            thresholds,
            devices_act=feature_act,
            devices_warn=feature_warn,
        )
        top_features = [
            f.name
            for f in sorted(features, key=lambda f: (-f.psi, f.name))
            if f.psi >= thresholds.warn
        ][:10]
        predictions = prediction_shift(reference, layout, sums.counts, thresholds)
    return DriftReport(
        model=model_name,
        version=model_version,
        reference_id=reference.reference_id,
        group=scope.group,
        since=covered.since,
        until=covered.until,
        widened=covered.widened,
        clipped=covered.clipped,
        thresholds=thresholds,
        devices=summary,
        features=features,
        top_features=top_features,
        top_devices=top_devices(scores, layout.names if layout else [], thresholds, top),
        predictions=predictions,
        sla=sla_summary(sums),
        rows_read=rows_read,
    )


def fleet_drift(
    session: Session,
    *,
    store: ArtifactStore,
    keys: FleetKeys,
    model: str,
    version: str | None,
    group: str | None,
    devices: Sequence[str] | None,
    since: str,
    until: str | None,
    now: datetime,
    thresholds: Thresholds,
    top: int = 20,
) -> DriftReport:
    """:func:`drift_report` from the API's and CLI's parameters (see the module doc)."""
    start, end = resolve_range(since, until, now=now)
    found = resolve_version(session, model_name=model, version=version, since=start, until=end)
    reference = version_reference(session, store=store, keys=keys, model_name=model, version=found)
    return drift_report(
        session,
        reference=reference,
        model_name=model,
        model_version=found.version,
        scope=resolve_scope(session, group=group, devices=devices),
        since=start,
        until=end,
        thresholds=thresholds,
        top=top,
    )


# ----------------------------------------------------------------------------- time series


def timeseries_report(
    session: Session,
    *,
    reference: DriftReference,
    model_name: str,
    model_version: int,
    scope: Scope,
    since: datetime,
    until: datetime,
    features: Sequence[str] | None,
    bucket: str,
    thresholds: Thresholds,
) -> DriftTimeseries:
    """PSI, JS and KS per hour or day for each feature (all of them by default)."""
    names = [f.name for f in reference.features]
    wanted = list(features) if features else names
    unknown = [f for f in wanted if f not in names]
    if unknown:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise InvalidInputError(f"unknown feature(s) {unknown}; the reference has: {shown}")
    if bucket not in ("auto", "hour", "day"):
        raise TimeRangeError(f"bucket={bucket!r}: use auto, hour or day")
    period = (
        (Period.HOUR if until - since <= AUTO_HOURLY_SPAN else Period.DAY)
        if bucket == "auto"
        else Period(bucket)
    )
    marks = retention_marks(session)
    if period is Period.HOUR:
        hour_mark = marks.get("hour")
        if hour_mark is not None and hour_mark > since:
            if hour_mark >= until:
                raise TimeRangeError(
                    f"hourly rollups before {hour_mark.isoformat()} are deleted (retention); "
                    "ask for bucket=day"
                )
            since = hour_mark
        segments: tuple[Segment, ...] = (Segment(Period.HOUR, since, until),)
    else:
        covered = plan(
            since,
            until,
            hour_deleted_before=marks.get("hour"),
            day_deleted_before=marks.get("day"),
        )
        since, until, segments = covered.since, covered.until, covered.segments
    layout = comparable_layout(session, reference)
    totals = read_sums(
        session,
        fleet=scope.device_ids is None,
        model_name=model_name,
        model_version=model_version,
        segments=segments,
        reference_id=reference.reference_id,
        layout=layout,
        device_ids=scope.device_ids,
        sla=False,
        moments=False,
        per_bucket=period,
    )
    starts = []
    moment = floor_to(since, period)
    while moment < until:
        starts.append(moment)
        moment += period.length
    totals_by_bucket = totals.bucket_counts
    buckets = [
        (max(start, since), min(start + period.length, until), totals_by_bucket.get(start))
        for start in starts
    ]
    return DriftTimeseries(
        model=model_name,
        version=model_version,
        reference_id=reference.reference_id,
        group=scope.group,
        bucket=period.value,
        since=since,
        until=until,
        series=series(
            reference, layout or Layout.of_reference(reference), wanted, buckets, thresholds
        ),
    )


def fleet_timeseries(
    session: Session,
    *,
    store: ArtifactStore,
    keys: FleetKeys,
    model: str,
    version: str | None,
    group: str | None,
    devices: Sequence[str] | None,
    since: str,
    until: str | None,
    features: Sequence[str] | None,
    bucket: str,
    now: datetime,
    thresholds: Thresholds,
) -> DriftTimeseries:
    start, end = resolve_range(since, until, now=now)
    found = resolve_version(session, model_name=model, version=version, since=start, until=end)
    reference = version_reference(session, store=store, keys=keys, model_name=model, version=found)
    return timeseries_report(
        session,
        reference=reference,
        model_name=model,
        model_version=found.version,
        scope=resolve_scope(session, group=group, devices=devices),
        since=start,
        until=end,
        features=features,
        bucket=bucket,
        thresholds=thresholds,
    )
