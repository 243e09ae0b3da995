"""Rollouts in the database: creation and its refusals, the commands over revisions, group
members with their exclusions, pins, the device message log and issued manifests."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from server.errors import NotFoundError
from server.fleet.auth import hash_password
from server.fleet.groups import add_members, create_group
from server.fleet.inventory import DeviceMessage
from server.fleet.models import DeviceCredential
from server.keys import init_keys
from server.registry import promote
from server.rollouts import service
from server.rollouts.core import RolloutStatus, abort, new_rollout, step
from server.rollouts.desired import DesiredContent, IssuedManifest, IssueReason, issue_manifest
from server.rollouts.errors import (
    InvalidRolloutError,
    PinNotFoundError,
    RolloutConflictError,
    RolloutNotFoundError,
    RolloutStateError,
)
from server.rollouts.models import DeviceEventRecord, RolloutRecord
from shared.messages import (
    ArtifactRef,
    Deployment,
    DeviceState,
    Event,
    EventKind,
    InstallWindow,
    RuntimeInfo,
)
from shared.topics import Channel
from tests.server.rollouts.harness import PROFILE, add_device, register_version

pytestmark = pytest.mark.database

NOW = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
MODEL = "digits"


def fleet(session: Session, group: str, *device_ids: str) -> None:
    for device_id in device_ids:
        add_device(session, device_id)
    created = create_group(session, name=group)
    add_members(session, group=created, device_ids=list(device_ids))


def create(session: Session, **options: object) -> service.LoadedRollout:
    fields: dict[str, object] = {"model_name": MODEL, "version": 1, "group": "line", "now": NOW}
    fields.update(options)
    return service.create_rollout(session, **fields)  # type: ignore[arg-type]


def test_create_resolves_an_alias_and_starts_pending(engine: Engine) -> None:
    with Session(engine) as session:
        fleet(session, "line", "d1", "d2")
        register_version(session)
        second = register_version(session)
        promote(session, model_name=MODEL, version=second.version, alias="candidate")
        created = create(session, version="candidate", phases="1dev,50,100", approval=True)
        session.commit()
    assert created.spec.model_version == 2 and created.spec.group == "line"
    assert created.id.startswith("digits-v2-")
    assert created.state.status is RolloutStatus.PENDING and created.revision == 0
    assert [p.describe() for p in created.spec.phases] == ["1 devices", "50%", "100%"]
    # --approval: every phase but the last waits for the operator.
    assert [p.approval_required for p in created.spec.phases] == [True, True, False]
    with Session(engine) as session:
        stored = service.get_rollout(session, rollout_id=created.id)
    assert stored.spec == created.spec and stored.state == created.state
    assert stored.group_name == "line"


def test_no_rollout_of_an_unknown_unready_or_ungated_version(engine: Engine) -> None:
    with Session(engine) as session:
        fleet(session, "line", "d1")
        register_version(session, status="evaluating")  # v1
        register_version(session, artifacts={PROFILE: {"gate": False}})  # v2
        register_version(session, artifacts={PROFILE: {"bundle": False}})  # v3
        register_version(session, artifacts={})  # v4
        with pytest.raises(NotFoundError, match="no model named 'nope'"):
            create(session, model_name="nope")
        with pytest.raises(NotFoundError, match="has no version or alias 'production'"):
            create(session, version="production")
        with pytest.raises(RolloutConflictError, match="v1 is evaluating: only a ready version"):
            create(session, version=1)
        for version in (2, 3, 4):
            with pytest.raises(
                RolloutConflictError, match="no rollout of an unevaluated or ungated"
            ):
                create(session, version=version)
        good = register_version(session)
        with pytest.raises(NotFoundError, match="no device group named 'elsewhere'"):
            create(session, version=good.version, group="elsewhere")
        assert session.exec(select(RolloutRecord)).all() == []


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"phases": "5,abc"}, "phase 'abc': write a percentage"),
        ({"phases": "50,25"}, "phase percents must increase"),
        ({"phases": "0"}, "phase '0'"),
        ({"wait_between_phases": timedelta(seconds=-1)}, "wait_between_phases cannot be negative"),
        ({"device_timeout": timedelta(0)}, "device_timeout must be positive"),
        ({"max_devices_per_minute": 0}, "max_devices_per_minute"),
        ({"rollout_id": "has space"}, "rollout_id"),
    ],
)
def test_a_spec_that_cannot_work_is_refused_naming_the_field(
    engine: Engine, options: dict[str, object], says: str
) -> None:
    with Session(engine) as session:
        fleet(session, "line", "d1")
        register_version(session)
        with pytest.raises(InvalidRolloutError, match=says):
            create(session, **options)


def test_active_rollouts_of_one_model_never_overlap(engine: Engine) -> None:
    with Session(engine) as session:
        fleet(session, "line", "d1", "d2")
        add_device(session, "d3")
        other = create_group(session, name="mixed")
        add_members(session, group=other, device_ids=["d2", "d3"])
        create_group(session, name="empty")
        register_version(session)
        register_version(session, model="other")
        first = create(session)
        with pytest.raises(RolloutConflictError, match=f"rollout {first.id} of digits to group"):
            create(session)
        with pytest.raises(RolloutConflictError, match=r"covers 1 device.*: d2"):
            create(session, group="mixed")
        create(session, group="empty")  # no shared device
        create(session, model_name="other", group="mixed")  # another model
        # Once the first is finished, its group is free again.
        result = abort(first.spec, first.state, now=NOW)
        assert service.save_state(session, rollout=first, state=result.state, now=NOW)
        create(session, group="mixed")


def test_list_filters_by_status_model_group_and_activity(engine: Engine) -> None:
    with Session(engine) as session:
        fleet(session, "line", "d1")
        create_group(session, name="empty")
        register_version(session)
        register_version(session, model="other")
        a = create(session, now=NOW)
        b = create(session, group="empty", now=NOW + timedelta(seconds=1))
        c = create(session, model_name="other", now=NOW + timedelta(seconds=2))
        service.abort_rollout(session, rollout_id=b.id, now=NOW)
        session.commit()

        def ids(**filters: object) -> list[str]:
            return [r.id for r in service.list_rollouts(session, **filters)]  # type: ignore[arg-type]

        assert ids() == [c.id, b.id, a.id]
        assert ids(model_name=MODEL) == [b.id, a.id]
        assert ids(group="empty") == [b.id]
        assert ids(status=RolloutStatus.ABORTED) == [b.id]
        assert ids(active=True) == [c.id, a.id]
        assert ids(active=False) == [b.id]


def test_commands_follow_the_state_machine_and_bump_the_revision(engine: Engine) -> None:
    with Session(engine) as session:
        fleet(session, "line", "d1")
        register_version(session)
        rollout_id = create(session).id
        session.commit()
    with Session(engine) as session:
        paused, _ = service.pause_rollout(session, rollout_id=rollout_id, now=NOW, reason="lunch")
        session.commit()
        assert (paused.state.status, paused.state.status_reason) == (RolloutStatus.PAUSED, "lunch")
        assert paused.revision == 1
        with pytest.raises(RolloutStateError, match="cannot approve a rollout that is paused"):
            service.approve_rollout(session, rollout_id=rollout_id, now=NOW)
        session.rollback()
        resumed, _ = service.resume_rollout(session, rollout_id=rollout_id, now=NOW)
        assert resumed.state.status is RolloutStatus.PENDING  # it never started
        with pytest.raises(RolloutStateError, match="cannot approve a rollout that is pending"):
            service.approve_rollout(session, rollout_id=rollout_id, now=NOW, phase=1)
        with pytest.raises(InvalidRolloutError, match="numbered from 1"):
            service.approve_rollout(session, rollout_id=rollout_id, now=NOW, phase=0)
        aborted, result = service.abort_rollout(session, rollout_id=rollout_id, now=NOW)
        session.commit()
        assert aborted.state.status is RolloutStatus.ABORTED and result.device_ids == []
        assert aborted.revision == 3
        with pytest.raises(RolloutStateError, match="cannot abort a rollout that is aborted"):
            service.abort_rollout(session, rollout_id=rollout_id, now=NOW)
        with pytest.raises(RolloutNotFoundError, match="no rollout with id 'missing'"):
            service.pause_rollout(session, rollout_id="missing", now=NOW)
    with Session(engine) as session:
        stored = session.get(RolloutRecord, rollout_id)
        assert stored is not None and (stored.status, stored.revision) == ("aborted", 3)


def test_a_state_computed_from_an_old_revision_is_never_saved(engine: Engine) -> None:
    with Session(engine) as session:
        fleet(session, "line", "d1")
        register_version(session)
        stale = create(session)
        session.commit()
    with Session(engine) as session:
        service.pause_rollout(session, rollout_id=stale.id, now=NOW)
        session.commit()
    with Session(engine) as session:
        late = abort(stale.spec, stale.state, now=NOW)
        assert service.save_state(session, rollout=stale, state=late.state, now=NOW) is None
        session.commit()
        stored = service.get_rollout(session, rollout_id=stale.id)
        assert stored.state.status is RolloutStatus.PAUSED and stored.revision == 1


def test_members_carry_each_exclusion_with_its_reason(engine: Engine) -> None:
    with Session(engine) as session:
        add_device(session, "ok")
        add_device(session, "pinned")
        add_device(session, "arm", profile="edge-arm64-litert")
        add_device(session, "silent", runtime=None)
        add_device(session, "onnx", runtime=("onnxruntime", "1.20.0"))
        # An agent with no model yet reports its first runtime; it declared both.
        add_device(
            session,
            "both",
            runtime=("onnxruntime", "1.20.0"),
            runtimes={"onnxruntime": "1.20.0", "litert": "2.3.0"},
        )
        add_device(session, "old-litert", runtime=("litert", "2.3.0"))
        add_device(session, "pending", status="pending")
        group = create_group(session, name="line", maintenance_window="02:00-04:00")
        ids = ["ok", "pinned", "arm", "silent", "onnx", "both", "old-litert", "pending"]
        add_members(session, group=group, device_ids=ids)
        v1 = register_version(session)
        v2 = register_version(
            session,
            artifacts={
                PROFILE: {"ops": [{"name": "FULLY_CONNECTED", "version": 1}]},
                "edge-arm64-litert": {"gate": False},
            },
        )
        service.set_pin(session, device_id="pinned", model_name=MODEL, version=v1.version)
        # A third version whose op the runtime cannot run.
        v3 = register_version(
            session, artifacts={PROFILE: {"ops": [{"name": "FULLY_CONNECTED", "version": 99}]}}
        )
        spec = create(session, version=v2.version).spec
        members = service.rollout_members(
            session,
            spec=spec,
            group_id=group.id,  # type: ignore[arg-type]
            variants=service.model_variants(session, model_name=MODEL, model_version=v2.version),
            latency_sla_ms={PROFILE: 20.0},
        )
        excluded = {
            m.device_id: (m.exclusion.code, m.exclusion.detail) if m.exclusion else None
            for m in members.members
        }
        assert excluded == {
            "ok": None,
            "both": None,
            "old-litert": None,
            "pinned": ("pinned", "pinned to digits v1"),
            "arm": (
                "no_artifact",
                "the edge-arm64-litert artifact of digits v2 did not pass its gates",
            ),
            "silent": ("runtime_unknown", "the device has not reported its runtime"),
            "onnx": (
                "runtime_mismatch",
                f"the {PROFILE} artifact of digits v2 is built for litert; "
                "the device runs onnxruntime 1.20.0",
            ),
        }  # "pending" is no member: only accepted devices are
        assert {m.device_id: m.latency_sla_ms for m in members.members}["ok"] == 20.0
        # The group's maintenance window (02:00-04:00 UTC) is the install window its
        # devices are sent: they are targeted by day too, and download ahead.
        window = members.install_window
        assert window == InstallWindow(start="02:00", end="04:00")
        noon = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
        by_day = step(
            spec, new_rollout(spec, now=noon), members.members, {}, now=noon, install_window=window
        )
        (canary,) = by_day.device_ids  # 5 % of the three eligible devices
        assert canary in ("both", "ok", "old-litert")
        assert by_day.state.devices[canary].install_window == window
        variants = service.model_variants(session, model_name=MODEL, model_version=v3.version)
        (ops_member,) = [
            m
            for m in service.rollout_members(
                session,
                spec=spec.model_copy(update={"model_version": v3.version}),
                group_id=group.id,  # type: ignore[arg-type]
                variants=variants,
                latency_sla_ms={},
            ).members
            if m.device_id == "ok"
        ]
        assert ops_member.exclusion is not None
        assert ops_member.exclusion.code == "unsupported_ops"
        assert "FULLY_CONNECTED" in ops_member.exclusion.detail


def test_pins_name_a_version_the_device_can_run(engine: Engine) -> None:
    with Session(engine) as session:
        add_device(session, "d1")
        add_device(session, "onnx", runtime=("onnxruntime", "1.20.0"))
        v1 = register_version(session)
        v2 = register_version(session)
        promote(session, model_name=MODEL, version=v2.version, alias="production")
        pin = service.set_pin(session, device_id="d1", model_name=MODEL, version="production")
        assert (pin.model_version, pin.model_version_id) == (2, v2.id)
        again = service.set_pin(session, device_id="d1", model_name=MODEL, version=1, note="why")
        assert (again.model_version, again.note) == (v1.version, "why")
        assert [(p.device_id, p.model_version) for p in service.list_pins(session)] == [("d1", 1)]
        with pytest.raises(
            RolloutConflictError, match="cannot pin onnx to digits v1: runtime_mismatch"
        ):
            service.set_pin(session, device_id="onnx", model_name=MODEL, version=1)
        with pytest.raises(PinNotFoundError, match="no device with id 'ghost'"):
            service.set_pin(session, device_id="ghost", model_name=MODEL, version=1)
        with pytest.raises(NotFoundError, match="has no version or alias '7'"):
            service.set_pin(session, device_id="d1", model_name=MODEL, version=7)
        service.clear_pin(session, device_id="d1", model_name=MODEL)
        with pytest.raises(PinNotFoundError, match="has no pin on model 'digits'"):
            service.clear_pin(session, device_id="d1", model_name=MODEL)
        assert service.list_pins(session) == []


def _event(device_id: str, kind: EventKind, *, model_version: int | None = 2) -> Event:
    return Event(
        device_id=device_id,
        event_id=uuid.uuid4().hex,
        kind=kind,
        at=NOW - timedelta(hours=3),  # the device's clock is off: the server's time counts
        model_name=None if model_version is None else MODEL,
        model_version=model_version,
        reason="self_test_failed" if kind is EventKind.REJECTED else None,
    )


def _message(body: Event | DeviceState, at: datetime) -> DeviceMessage:
    channel = Channel.EVENTS if isinstance(body, Event) else Channel.STATE
    return DeviceMessage(body.device_id, channel, body, at, retained=False)


def test_device_messages_are_logged_once_with_the_server_receive_time(engine: Engine) -> None:
    early = _event("d1", EventKind.DOWNLOADING)
    late = _event("d1", EventKind.REJECTED)
    other_model = _event("d1", EventKind.ACTIVATED).model_copy(update={"model_name": "other"})
    no_model = _event("d1", EventKind.FAILED, model_version=None)
    with Session(engine) as session:
        assert service.record_device_message(session, message=_message(early, NOW))
        assert not service.record_device_message(session, message=_message(early, NOW))
        for event, minutes in ((late, 5), (other_model, 6), (no_model, 7)):
            service.record_device_message(
                session, message=_message(event, NOW + timedelta(minutes=minutes))
            )
        session.commit()
        assert len(session.exec(select(DeviceEventRecord)).all()) == 4
        reports = service.update_reports(
            session, device_ids=["d1"], model_name=MODEL, since=NOW + timedelta(minutes=1)
        )
    assert [(r.kind, r.received_at, r.reason) for r in reports["d1"]] == [
        (EventKind.REJECTED, NOW + timedelta(minutes=5), "self_test_failed"),
        (EventKind.FAILED, NOW + timedelta(minutes=7), None),
    ]

    def state(reported: datetime) -> DeviceState:
        return DeviceState(
            device_id="d1",
            agent_version="t",
            profile=PROFILE,
            arch="x86_64",
            runtime=RuntimeInfo(name="litert", version="2.3.0"),
            reported_at=reported,
        )

    with Session(engine) as session:
        assert service.record_device_message(session, message=_message(state(NOW), NOW))
        newer = _message(state(NOW + timedelta(seconds=5)), NOW + timedelta(minutes=9))
        assert service.record_device_message(session, message=newer)
        older = _message(state(NOW), NOW + timedelta(minutes=10))  # a replayed old report
        assert not service.record_device_message(session, message=older)
        session.commit()
        receipt = service.state_receipts(session, device_ids=["d1"])["d1"]
    assert receipt.reported_at == NOW + timedelta(seconds=5)
    assert receipt.received_at == NOW + timedelta(minutes=9)


def test_latest_manifests_and_the_artifact_authority(engine: Engine, tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys", now=NOW, lifetime=timedelta(days=90))
    a, b = "a" * 64, "b" * 64
    with Session(engine) as session:
        add_device(session, "d1")
        add_device(session, "gone", status="revoked")
        session.add(
            DeviceCredential(device_id="d1", username="d1", password_hash=hash_password("pw"))
        )
        session.commit()
    authority = service.ManifestAuthority(engine, cache_seconds=0.0)
    assert authority.authenticate("d1", "pw") and not authority.authenticate("d1", "nope")
    assert not authority.allowed("d1", a)  # nothing issued yet

    def content(device_id: str, sha256: str, version: int) -> DesiredContent:
        deployment = Deployment(
            model_name=MODEL,
            model_version=version,
            target=PROFILE,
            artifact=ArtifactRef(sha256=sha256, length=10),
        )
        return DesiredContent(device_id, "r1", (deployment,))

    last: dict[str, IssuedManifest] = {}
    for sha256, version in ((a, 1), (b, 2)):
        for device_id in ("d1", "gone"):
            desired = content(device_id, sha256, version)
            issue = issue_manifest(desired, keys=keys, last=last.get(device_id), now=NOW)
            with Session(engine) as session:
                service.record_manifest(
                    session, manifest=issue.manifest, content=desired, reason=issue.reason
                )
                session.commit()
            last[device_id] = issue.manifest
    with Session(engine) as session, pytest.raises(IntegrityError):
        # A manifest version names one payload for ever: it cannot be recorded twice.
        service.record_manifest(
            session, manifest=last["d1"], content=content("d1", a, 1), reason=IssueReason.RETRY
        )
    with Session(engine) as session:
        latest = service.latest_manifests(session)
        assert {d: r.manifest_version for d, r in latest.items()} == {"d1": 2, "gone": 2}
        assert latest["d1"].reason == IssueReason.CONTENT_CHANGED.value
        assert json.loads(latest["d1"].artifacts_json) == [b]
        assert service.issued_manifest(latest["d1"]) == last["d1"]
        assert {r.device_id for r in service.unsent_manifests(session)} == {"d1", "gone"}
        service.mark_sent(session, device_id="d1", manifest_version=2, at=NOW)
        session.commit()
        assert {r.device_id for r in service.unsent_manifests(session)} == {"gone"}
    # Only what the device's latest manifest names, and only for an accepted device.
    assert authority.allowed("d1", b)
    assert not authority.allowed("d1", a)
    assert not authority.allowed("gone", b)
    assert not authority.allowed("nobody", b)
