"""Read-only views the dashboard needs and no other endpoint gives, under ``/dashboard``.

- ``GET /dashboard/fleet``: devices online/offline per group and profile, which model
  versions run in which group, and each device with its groups and last-seen time
  (the device list alone does not say which groups a device is in).
- ``GET /dashboard/drift/heatmap``: PSI (or JS distance) per group x feature x hour/day,
  one :func:`server.drift.service.timeseries_report` per group.
- ``GET /dashboard/drift/histogram``: one feature's reference counts beside the live
  counts of a scope, bin by bin, read with :func:`server.drift.storage.read_sums`.

What always holds: nothing here writes; every figure comes from the same services the
rest of the API uses (fleet inventory, group rules, drift rollups), so the dashboard
never shows a number the API or CLI would not. Bad input raises a
:class:`~server.errors.ServerError` naming it (404 unknown model/version/group, 422
a bad range or feature), as the drift endpoints do.
"""

from __future__ import annotations

import itertools
import math
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from server.api.deps import ArtifactsDep, KeysDep, NowDep, SessionDep
from server.drift import service as drift_service
from server.drift.reference import version_reference
from server.drift.report import Level, Thresholds
from server.drift.rollups import retention_marks
from server.drift.storage import read_sums
from server.drift.timerange import plan, resolve_range
from server.errors import InvalidInputError
from server.fleet import devices as inventory
from server.fleet import groups as group_service
from server.fleet.models import DeviceStatus
from shared.drift import js_distance, psi

__all__ = [
    "DeviceRow",
    "FleetCell",
    "FleetOverview",
    "Heatmap",
    "HeatmapRow",
    "Histogram",
    "VersionCell",
    "router",
]

router = APIRouter(prefix="/dashboard", tags=["dashboard"])

MAX_FLEET_DEVICES = 10_000
"""The fleet view lists at most this many devices (the counts cover them all)."""
MAX_HEATMAP_GROUPS = 50
MAX_HEATMAP_FEATURES = 64

ModelQuery = Annotated[str, Query(min_length=1, max_length=128, description="model name")]
VersionQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description="version number, alias or 'latest'; default: the newest with data",
    ),
]
SinceQuery = Annotated[
    str, Query(max_length=64, description="a duration ago (24h, 7d) or an ISO 8601 time")
]
UntilQuery = Annotated[str | None, Query(max_length=64, description="end (exclusive); default now")]


# ----------------------------------------------------------------------------- fleet


class FleetCell(BaseModel):
    group: str | None = Field(description="null: devices in no group")
    profile: str
    devices: int
    online: int
    offline: int


class VersionCell(BaseModel):
    group: str | None
    model: str
    version: int
    devices: int


class DeviceRow(BaseModel):
    id: str
    status: DeviceStatus
    profile: str
    groups: list[str]
    models: list[str] = Field(description="NAME@VERSION it runs")
    online: bool
    last_seen: datetime | None
    agent_version: str
    last_update: str | None = Field(description="outcome of its last update, with the reason")


class FleetOverview(BaseModel):
    devices: int
    online: int
    offline: int
    groups: list[str] = Field(description="every group, by name")
    profiles: list[str]
    by_group_profile: list[FleetCell]
    versions: list[VersionCell]
    device_rows: list[DeviceRow]
    truncated: bool = Field(description="more devices matched than the view lists")


def _update_text(device_update: object) -> str | None:
    if not isinstance(device_update, dict):
        return None
    outcome = device_update.get("outcome")
    reason = device_update.get("reason")
    if outcome is None:
        return None
    return f"{outcome} ({reason})" if reason else str(outcome)


@router.get("/fleet", response_model=FleetOverview, summary="Devices per group and profile")
def fleet_overview(
    session: SessionDep,
    group: Annotated[str | None, Query(max_length=64, description="only this group")] = None,
    profile: Annotated[str | None, Query(max_length=128, description="only this profile")] = None,
) -> FleetOverview:
    """Online/offline per group x profile, model versions per group, and the devices."""
    all_groups = group_service.list_groups(session)
    if group is not None:
        group_service.get_group(session, name=group)  # 404 for an unknown group
    membership: dict[str, list[str]] = {}
    for each in all_groups:
        for device_id in group_service.group_device_ids(session, each, include_unaccepted=True):
            membership.setdefault(device_id, []).append(each.name)
    found = inventory.list_devices(
        session,
        filters=inventory.DeviceFilter(profile=profile),
        limit=MAX_FLEET_DEVICES + 1,
        offset=0,
    )
    if group is not None:
        found = [d for d in found if group in membership.get(d.id, [])]
    truncated = len(found) > MAX_FLEET_DEVICES
    found = found[:MAX_FLEET_DEVICES]
    cells: dict[tuple[str | None, str], FleetCell] = {}
    versions: dict[tuple[str | None, str, int], int] = {}
    rows = []
    for device in found:
        names = sorted(membership.get(device.id, []))
        shown_groups: list[str | None] = [group] if group is not None else (list(names) or [None])
        running = [(m.get("model_name"), m.get("model_version")) for m in device.models]
        for g in shown_groups:
            cell = cells.setdefault(
                (g, device.profile),
                FleetCell(group=g, profile=device.profile, devices=0, online=0, offline=0),
            )
            cell.devices += 1
            if device.online:
                cell.online += 1
            else:
                cell.offline += 1
            for name, number in running:
                if isinstance(name, str) and isinstance(number, int):
                    versions[(g, name, number)] = versions.get((g, name, number), 0) + 1
        rows.append(
            DeviceRow(
                id=device.id,
                status=DeviceStatus(device.status),
                profile=device.profile,
                groups=names,
                models=[f"{name}@{number}" for name, number in running],
                online=device.online,
                last_seen=device.last_seen,
                agent_version=device.agent_version,
                last_update=_update_text(device.last_update),
            )
        )
    online = sum(1 for d in found if d.online)

    def group_key(name: str | None) -> tuple[int, str]:
        return (1, "") if name is None else (0, name)

    return FleetOverview(
        devices=len(found),
        online=online,
        offline=len(found) - online,
        groups=[each.name for each in all_groups],
        profiles=sorted({d.profile for d in found}),
        by_group_profile=sorted(cells.values(), key=lambda c: (group_key(c.group), c.profile)),
        versions=[
            VersionCell(group=g, model=m, version=v, devices=n)
            for (g, m, v), n in sorted(
                versions.items(), key=lambda kv: (group_key(kv[0][0]), kv[0][1], kv[0][2])
            )
        ],
        device_rows=rows,
        truncated=truncated,
    )


# ----------------------------------------------------------------------------- drift


class HeatmapRow(BaseModel):
    group: str
    feature: str
    values: list[float | None] = Field(description="one per bucket; null where no data")


class Heatmap(BaseModel):
    model: str
    version: int
    metric: Literal["psi", "js"]
    bucket: str
    since: datetime
    until: datetime
    starts: list[datetime] = Field(description="start of each bucket")
    groups: list[str]
    features: list[str] = Field(description="chosen, or the largest values first")
    rows: list[HeatmapRow] = Field(description="group-major, features in the order above")
    thresholds: Thresholds


@router.get(
    "/drift/heatmap",
    response_model=Heatmap,
    summary="Drift per group x feature x hour (or day), for a heatmap",
)
def drift_heatmap(
    session: SessionDep,
    store: ArtifactsDep,
    keys: KeysDep,
    now: NowDep,
    model: ModelQuery,
    version: VersionQuery = None,
    group: Annotated[
        list[str] | None, Query(description="groups (repeat); default: every group")
    ] = None,
    feature: Annotated[
        list[str] | None,
        Query(description="features (repeat); default: the `top` with the largest values"),
    ] = None,
    top: Annotated[int, Query(ge=1, le=MAX_HEATMAP_FEATURES)] = 12,
    since: SinceQuery = "24h",
    until: UntilQuery = None,
    bucket: Literal["auto", "hour", "day"] = "auto",
    metric: Literal["psi", "js"] = "psi",
) -> Heatmap:
    """For each group (its accepted members now) and feature, PSI or JS distance of that
    group's merged counts in each hour or day of the range; ``null`` where it sent none.
    Without ``feature``, the ``top`` features with the largest value anywhere come first."""
    start, end = resolve_range(since, until, now=now)
    found = drift_service.resolve_version(
        session, model_name=model, version=version, since=start, until=end
    )
    reference = version_reference(session, store=store, keys=keys, model_name=model, version=found)
    names = [g.name for g in group_service.list_groups(session)] if not group else list(group)
    if len(names) > MAX_HEATMAP_GROUPS:
        raise InvalidInputError(f"group: at most {MAX_HEATMAP_GROUPS} groups, not {len(names)}")
    thresholds = Thresholds()
    per_group: dict[str, dict[str, list[float | None]]] = {}
    starts: list[datetime] = []
    series_since, series_until, period = start, end, "hour"
    for name in names:
        report = drift_service.timeseries_report(
            session,
            reference=reference,
            model_name=model,
            model_version=found.version,
            scope=drift_service.resolve_scope(session, group=name, devices=None),
            since=start,
            until=end,
            features=feature,
            bucket=bucket,
            thresholds=thresholds,
        )
        series_since, series_until, period = report.since, report.until, report.bucket
        per_group[name] = {
            s.feature: [(p.psi if metric == "psi" else p.js_distance) for p in s.points]
            for s in report.series
        }
        starts = [p.start for s in report.series[:1] for p in s.points]
    if feature:
        chosen = list(feature)
    else:
        largest: dict[str, float] = {}
        for values in per_group.values():
            for name, points in values.items():
                seen = [v for v in points if v is not None and math.isfinite(v)]
                if seen:
                    largest[name] = max(largest.get(name, 0.0), max(seen))
        chosen = sorted(largest, key=lambda n: (-largest[n], n))[:top]
    rows = [
        HeatmapRow(group=g, feature=f, values=per_group[g].get(f, [None] * len(starts)))
        for g in names
        for f in chosen
    ]
    return Heatmap(
        model=model,
        version=found.version,
        metric=metric,
        bucket=period,
        since=series_since,
        until=series_until,
        starts=starts,
        groups=names,
        features=chosen,
        rows=rows,
        thresholds=thresholds,
    )


class Histogram(BaseModel):
    model: str
    version: int
    group: str | None
    feature: str
    features: list[str] = Field(description="every feature of the reference, in its order")
    since: datetime
    until: datetime
    labels: list[str] = Field(description="one per slot: below, each bin, above, NaN")
    reference: list[int]
    live: list[int] = Field(description="zeros where the scope sent nothing")
    reference_share: list[float]
    live_share: list[float]
    n: int = Field(description="live values counted")
    psi: float | None = Field(description="null without live values")
    js_distance: float | None
    level: Level | None


def _slot_labels(edges: list[float]) -> list[str]:
    def short(x: float) -> str:
        return f"{x:.3g}"

    inner = [f"{short(a)}–{short(b)}" for a, b in itertools.pairwise(edges)]
    return [f"< {short(edges[0])}", *inner, f"≥ {short(edges[-1])}", "NaN"]


def _shares(counts: list[int]) -> list[float]:
    total = sum(counts)
    return [c / total if total else 0.0 for c in counts]


@router.get(
    "/drift/histogram",
    response_model=Histogram,
    summary="One feature's reference counts against the live counts of a group or the fleet",
)
def drift_histogram(
    session: SessionDep,
    store: ArtifactsDep,
    keys: KeysDep,
    now: NowDep,
    model: ModelQuery,
    version: VersionQuery = None,
    group: Annotated[str | None, Query(max_length=64, description="default: the fleet")] = None,
    feature: Annotated[
        str | None, Query(max_length=256, description="default: the reference's first")
    ] = None,
    since: SinceQuery = "24h",
    until: UntilQuery = None,
) -> Histogram:
    """The feature's training counts per slot (below the first edge, each bin, above the
    last, NaN) beside the scope's merged live counts in the range, with their PSI."""
    start, end = resolve_range(since, until, now=now)
    found = drift_service.resolve_version(
        session, model_name=model, version=version, since=start, until=end
    )
    reference = version_reference(session, store=store, keys=keys, model_name=model, version=found)
    names = [f.name for f in reference.features]
    wanted = feature or names[0]
    if wanted not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise InvalidInputError(f"unknown feature {wanted!r}; the reference has: {shown}")
    index = names.index(wanted)
    feature_reference = reference.features[index]
    scope = drift_service.resolve_scope(session, group=group, devices=None)
    marks = retention_marks(session)
    covered = plan(
        start, end, hour_deleted_before=marks.get("hour"), day_deleted_before=marks.get("day")
    )
    layout = drift_service.comparable_layout(session, reference)
    live = [0] * len(feature_reference.counts)
    if layout is not None and (scope.device_ids is None or scope.device_ids):
        totals = read_sums(
            session,
            fleet=scope.device_ids is None,
            model_name=model,
            model_version=found.version,
            segments=covered.segments,
            reference_id=reference.reference_id,
            layout=layout,
            device_ids=scope.device_ids,
            sla=False,
            moments=False,
        )
        if totals.sums.counts is not None:
            live = [int(c) for c in totals.sums.counts[layout.feature_slice(index)]]
    expected = list(feature_reference.counts)
    n = sum(live)
    drift_psi = psi(expected, live) if n else None
    return Histogram(
        model=model,
        version=found.version,
        group=scope.group,
        feature=wanted,
        features=names,
        since=covered.since,
        until=covered.until,
        labels=_slot_labels(list(feature_reference.edges)),
        reference=expected,
        live=live,
        reference_share=_shares(expected),
        live_share=_shares(live),
        n=n,
        psi=drift_psi,
        js_distance=js_distance(expected, live) if n else None,
        level=None if drift_psi is None else Thresholds().level(drift_psi),
    )
