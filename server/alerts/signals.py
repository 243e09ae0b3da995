"""Reading what conditions are judged on: the drift rollups, the inventory, feedback.

Thin adapters over the database, one window at a time; the judging is
:mod:`server.alerts.conditions`' (pure).

What always holds:

- A scope is a group's accepted members *now* (as the drift view takes it,
  :func:`server.fleet.groups.group_device_ids`) or the whole fleet (``None``).
- Figures come from the hourly drift rollups kept on ingest, so they are exact sums
  of what the devices reported in the window (see :mod:`server.drift.models`): per
  device drift counts for the scores, latency histograms and error counters for the SLA.
- Only rows of the asked model version and window are read.
- Accuracy comes from an :class:`AccuracySource` -- labelled feedback lives in
  :mod:`server.feedback`; without a source, accuracy conditions are never judged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from sqlalchemy import select
from sqlmodel import Session, col

from server.alerts.conditions import DeviceScores, DeviceSeen, ProfileLatency, Window, device_scores
from server.artifacts import ArtifactStore
from server.drift.compute import Sums
from server.drift.errors import LayoutMismatchError, NoReferenceError
from server.drift.layout import Layout
from server.drift.reference import version_reference
from server.drift.rollups import device_table, fleet_table
from server.drift.storage import read_sums, stored_layout
from server.drift.timerange import Period, Segment
from server.fleet.groups import get_group, group_device_ids
from server.fleet.models import Device, DeviceStatus
from server.keys import FleetKeys
from server.registry import get_version
from shared.drift import DriftReference
from shared.latency import latency_quantile

__all__ = [
    "AccuracySource",
    "devices_seen",
    "drift_reference",
    "scope_device_ids",
    "versions_with_data",
    "window_latency",
    "window_scores",
    "window_sla",
]

_IN_LIST_LIMIT = 1000


class AccuracySource(Protocol):
    """Live accuracy from labelled feedback: ``(correct, labelled)`` predictions of one model
    version made by ``device_ids`` (None: every device) in ``[since, until)`` --
    :func:`server.feedback.service.accuracy` is one."""

    def __call__(
        self,
        session: Session,
        *,
        model_name: str,
        model_version: int,
        device_ids: Sequence[str] | None,
        since: datetime,
        until: datetime,
    ) -> tuple[int, int]: ...


def scope_device_ids(session: Session, group: str | None) -> list[str] | None:
    """The group's accepted members now; ``None`` for the whole fleet (404: no such group)."""
    if group is None:
        return None
    return group_device_ids(session, get_group(session, name=group))


def versions_with_data(
    session: Session, *, model_name: str, device_ids: Sequence[str] | None, window: Window
) -> list[int]:
    """Versions of the model that the scope reported on in ``window`` (ascending)."""
    table = fleet_table() if device_ids is None else device_table()
    c = table.c
    where = (
        c.model_name == model_name,
        c.period == Period.HOUR.value,
        c.bucket_start >= window.start,
        c.bucket_start < window.end,
    )
    if device_ids is None:
        found = session.execute(select(c.model_version).distinct().where(*where)).scalars()
        return sorted(int(v) for v in found)
    if not device_ids:
        return []
    if len(device_ids) <= _IN_LIST_LIMIT:
        query = select(c.model_version).distinct().where(*where, c.device_id.in_(device_ids))
        return sorted(int(v) for v in session.execute(query).scalars())
    wanted = set(device_ids)
    rows = session.execute(select(c.model_version, c.device_id).distinct().where(*where))
    return sorted({int(version) for version, device in rows if device in wanted})


def drift_reference(
    session: Session, *, store: ArtifactStore, keys: FleetKeys, model_name: str, version: int
) -> DriftReference | None:
    """The version's drift reference from its signed bundle; None if it carries none."""
    found = get_version(session, model_name=model_name, version=version)
    try:
        return version_reference(
            session, store=store, keys=keys, model_name=model_name, version=found
        )
    except NoReferenceError:
        return None


def _segments(window: Window) -> list[Segment]:
    return [Segment(Period.HOUR, window.start, window.end)]


def window_scores(
    session: Session,
    *,
    reference: DriftReference,
    model_name: str,
    model_version: int,
    device_ids: Sequence[str] | None,
    window: Window,
    metric: str,
) -> DeviceScores:
    """Every device's PSI or JS distance per feature over the window, from its own counts."""
    names = [f.name for f in reference.features]
    layout = stored_layout(session, reference.reference_id)
    if layout is None or (device_ids is not None and not device_ids):
        return DeviceScores.empty(names)
    if not layout.covers_features_of(Layout.of_reference(reference)):
        raise LayoutMismatchError(
            f"drift counts for reference {reference.reference_id[:12]}... were stored with "
            "other features than the model's reference has; they cannot be compared"
        )
    totals = read_sums(
        session,
        fleet=False,
        model_name=model_name,
        model_version=model_version,
        segments=_segments(window),
        reference_id=reference.reference_id,
        layout=layout,
        device_ids=device_ids,
        sla=False,
        moments=False,
        per_device=True,
    )
    if totals.device_counts is None or not totals.device_ids:
        return DeviceScores.empty(names)
    slices = [layout.feature_slice(j) for j in range(layout.n_features)]
    return device_scores(reference, slices, totals.device_ids, totals.device_counts, metric)


def window_sla(
    session: Session,
    *,
    model_name: str,
    model_version: int,
    device_ids: Sequence[str] | None,
    window: Window,
) -> Sums:
    """Windows, inferences, errors and the merged latency histogram of the scope."""
    return read_sums(
        session,
        fleet=device_ids is None,
        model_name=model_name,
        model_version=model_version,
        segments=_segments(window),
        reference_id="",
        layout=None,
        device_ids=device_ids,
        sla=True,
        moments=False,
    ).sums


def _profiles(session: Session, device_ids: Sequence[str] | None) -> dict[str, list[str]]:
    query = select(col(Device.id), col(Device.profile)).where(
        col(Device.status) == DeviceStatus.ACCEPTED.value
    )
    wanted = None if device_ids is None else set(device_ids)
    by_profile: dict[str, list[str]] = {}
    for device_id, profile in session.execute(query):
        if wanted is None or device_id in wanted:
            by_profile.setdefault(profile, []).append(device_id)
    return by_profile


def window_latency(
    session: Session,
    *,
    model_name: str,
    model_version: int,
    device_ids: Sequence[str] | None,
    window: Window,
    sla_by_profile: Mapping[str, float],
) -> list[ProfileLatency]:
    """The p95 of each device profile in the scope (a profile's SLA is its own)."""
    rows = []
    for profile, members in sorted(_profiles(session, device_ids).items()):
        sums = window_sla(
            session,
            model_name=model_name,
            model_version=model_version,
            device_ids=members,
            window=window,
        )
        if sums.windows == 0:
            continue
        rows.append(
            ProfileLatency(
                profile=profile,
                devices=len(members),
                inferences=int(sums.latency.sum()),
                p95_ms=latency_quantile(sums.latency, 0.95),
                sla_ms=sla_by_profile.get(profile),
            )
        )
    return rows


def devices_seen(session: Session, device_ids: Sequence[str] | None) -> list[DeviceSeen]:
    """Presence of the scope's accepted devices."""
    query = select(
        col(Device.id),
        col(Device.online),
        col(Device.last_seen),
        col(Device.accepted_at),
        col(Device.enrolled_at),
    ).where(col(Device.status) == DeviceStatus.ACCEPTED.value)
    if device_ids is not None and len(device_ids) <= _IN_LIST_LIMIT:
        query = query.where(col(Device.id).in_(list(device_ids)))
    wanted = None if device_ids is None else set(device_ids)
    return [
        DeviceSeen(device_id, bool(online), last_seen, accepted_at or enrolled_at)
        for device_id, online, last_seen, accepted_at, enrolled_at in session.execute(query)
        if wanted is None or device_id in wanted
    ]
