"""Fleet drift and SLA views over HTTP, for the dashboard and ``edgefleet drift``.

``GET /drift`` answers, for one model version and a scope (the whole fleet, a group's
members now, or a list of devices) over a time range: per-feature PSI, Jensen-Shannon
distance and KS from the merged counts, the share of devices that drifted (each from
its own counts), the top drifting features, the devices ranked by PSI, the shift of
the predicted classes and confidence, and latency p50/p95/p99 and the error rate.
``GET /drift/timeseries`` gives PSI / JS / KS per hour or day for chosen features.

Ranges are answered at whole hours (UTC); the answer says which range it covers.
An unknown model, version or group answers 404; a bad range, feature, bucket or
threshold 422 naming the parameter.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from server.api.deps import ArtifactsDep, KeysDep, NowDep, SessionDep
from server.drift import service
from server.drift.report import DriftReport, DriftTimeseries, Thresholds
from server.errors import InvalidInputError

__all__ = ["router"]

router = APIRouter(prefix="/drift", tags=["drift"])

ModelQuery = Annotated[str, Query(min_length=1, max_length=128, description="model name")]
VersionQuery = Annotated[
    str | None,
    Query(
        max_length=64,
        description="version number, alias (e.g. production) or 'latest'; "
        "default: the newest version with data in the range",
    ),
]
GroupQuery = Annotated[
    str | None, Query(max_length=64, description="a device group: its accepted members now")
]
DevicesQuery = Annotated[
    list[str] | None,
    Query(description="device ids instead of a group; repeat the parameter or separate by commas"),
]
SinceQuery = Annotated[
    str,
    Query(
        max_length=64,
        description="start: a duration ago (30m, 24h, 7d, 1d12h, 2w) or an ISO 8601 time; "
        "floored to the hour",
    ),
]
UntilQuery = Annotated[
    str | None,
    Query(max_length=64, description="end (exclusive), as since; default now; ceiled to the hour"),
]
MinSamplesQuery = Annotated[
    int,
    Query(
        ge=1,
        le=10**12,
        description="values a device needs on a feature before its PSI there counts",
    ),
]
WarnQuery = Annotated[float, Query(gt=0, le=100, description="PSI warn threshold")]
ActQuery = Annotated[float, Query(gt=0, le=100, description="PSI act threshold")]


def _devices(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [part for value in values for part in value.split(",") if part.strip()]


def _thresholds(warn: float, act: float, min_samples: int) -> Thresholds:
    if warn >= act:
        raise InvalidInputError(f"warn ({warn}) must be below act ({act})")
    return Thresholds(warn=warn, act=act, min_samples=min_samples)


@router.get(
    "",
    response_model=DriftReport,
    summary="Drift and SLA of a model version over a group, device list or the fleet",
)
def get_drift(
    session: SessionDep,
    store: ArtifactsDep,
    keys: KeysDep,
    now: NowDep,
    model: ModelQuery,
    version: VersionQuery = None,
    group: GroupQuery = None,
    devices: DevicesQuery = None,
    since: SinceQuery = "24h",
    until: UntilQuery = None,
    min_samples: MinSamplesQuery = 500,
    warn: WarnQuery = 0.1,
    act: ActQuery = 0.25,
    top: Annotated[int, Query(ge=0, le=1000, description="devices in the ranking")] = 20,
) -> DriftReport:
    """Per-feature PSI, Jensen-Shannon distance and KS of the scope's merged counts against
    the version's drift reference; the share of devices whose own counts drifted (PSI at
    or above ``act``, each device judged only on features with ``min_samples`` values);
    the top drifting features; devices ranked by PSI; the shift of predicted classes and
    confidence; latency p50/p95/p99 and the error rate.

    The scope is the whole fleet, a group's accepted members now, or ``devices``. The
    range is answered at whole hours (UTC) from hourly and daily rollups; ``since`` and
    ``until`` in the answer say which range it covers (``widened`` / ``clipped`` when
    retention made it differ from the one asked for).
    """
    return service.fleet_drift(
        session,
        store=store,
        keys=keys,
        model=model,
        version=version,
        group=group,
        devices=_devices(devices),
        since=since,
        until=until,
        now=now,
        thresholds=_thresholds(warn, act, min_samples),
        top=top,
    )


@router.get(
    "/timeseries",
    response_model=DriftTimeseries,
    summary="PSI, JS distance and KS per hour or day, per feature",
)
def get_drift_timeseries(
    session: SessionDep,
    store: ArtifactsDep,
    keys: KeysDep,
    now: NowDep,
    model: ModelQuery,
    version: VersionQuery = None,
    group: GroupQuery = None,
    devices: DevicesQuery = None,
    since: SinceQuery = "24h",
    until: UntilQuery = None,
    feature: Annotated[
        list[str] | None, Query(description="feature names (repeat); default: every feature")
    ] = None,
    bucket: Annotated[
        Literal["auto", "hour", "day"],
        Query(description="point size; auto: hours up to 72 h, days beyond"),
    ] = "auto",
    warn: WarnQuery = 0.1,
    act: ActQuery = 0.25,
) -> DriftTimeseries:
    """One point per hour or day of the range, per feature: PSI, JS distance and KS of the
    scope's counts in that bucket (null where the bucket has none)."""
    return service.fleet_timeseries(
        session,
        store=store,
        keys=keys,
        model=model,
        version=version,
        group=group,
        devices=_devices(devices),
        since=since,
        until=until,
        features=feature,
        bucket=bucket,
        now=now,
        thresholds=_thresholds(warn, act, 1),
    )
