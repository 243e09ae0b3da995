"""Retraining policies on what ingestion stored: a policy fires on the drifted group with its
evidence, once per firing and cooldown; approval queues a run on the newest dataset version
with the drifted version's spec; a finished run's gated version becomes the candidate and a
canary rollout starts -- or the decision fails, saying why."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server import registry
from server.alerts.rules import DriftCondition, OfflineCondition
from server.db import session_scope
from server.errors import NotFoundError
from server.models import DatasetVersion, ModelVersion, TargetArtifact, TrainingRun
from server.retraining import service
from server.retraining.engine import advance_decisions, evaluate_policies
from server.retraining.errors import DecisionStateError, PolicyConflictError, PolicyInvalidError
from server.retraining.models import RetrainingDecisionRecord
from server.retraining.policy import CanarySpec, TrainingOverrides
from server.rollouts.service import create_rollout, list_rollouts
from server.training import jobs
from server.training.spec import ModelSpec
from tests.server.alerts.conftest import (
    CANARY,
    CONTROL,
    DRIFTED_FEATURE,
    MODEL,
    Fleet,
    at,
    class_schema,
    make_fleet,
)
from tests.server.drift.conftest import register_version

pytestmark = pytest.mark.database

SHIFT = {DRIFTED_FEATURE: 2.0}
DRIFT = DriftCondition(windows=2, min_samples=200, min_device_share=0.5)


@pytest.fixture
def fleet(engine: Engine, tmp_path: Path) -> Fleet:
    return make_fleet(engine, tmp_path)


def add_policy(fleet: Fleet, name: str = "sensor-drift", **options: Any) -> None:
    fields: dict[str, Any] = {
        "groups": ["canary", "control"],
        "condition": DRIFT,
        "cooldown": timedelta(hours=6),
        "training": TrainingOverrides(epochs=3),
    } | options
    with session_scope(fleet.engine) as session:
        service.create_policy(session, name=name, model_name=MODEL, now=at(0), **fields)


def drifted_hours(fleet: Fleet, *hours: int) -> None:
    for hour in hours:
        fleet.hour(hour, CANARY, shift=SHIFT)
        fleet.hour(hour, CONTROL)


def decisions(fleet: Fleet) -> list[RetrainingDecisionRecord]:
    with Session(fleet.engine) as session:
        return service.list_decisions(session)


def decision_of(fleet: Fleet, decision_id: int) -> RetrainingDecisionRecord:
    with Session(fleet.engine) as session:
        return service.get_decision(session, decision_id=decision_id)


def evaluate(fleet: Fleet, hours: float) -> list[int]:
    return evaluate_policies(fleet.engine, now=at(hours), context=fleet.context)


def test_a_policy_fires_on_the_drifted_group_with_its_evidence(fleet: Fleet) -> None:
    add_policy(fleet)
    drifted_hours(fleet, 0, 1)
    assert evaluate(fleet, 0.5) == []  # one drifted window; two needed
    (taken,) = evaluate(fleet, 1.5)
    (decision,) = decisions(fleet)
    assert decision.id == taken and decision.group_name == "canary"
    assert decision.status == "pending_approval" and decision.model_version == 1
    assert decision.window_end == at(2) and decision.run_id is None
    assert decision.summary.startswith("sensor v1 in group canary: 3 of 3 device(s) (100%)")
    evidence = json.loads(decision.evidence_json)
    assert evidence["condition"]["kind"] == "drift" and evidence["threshold"] == 0.5
    assert {d["device_id"] for d in evidence["devices"]} == set(CANARY)
    assert {d["feature"] for d in evidence["devices"]} == {DRIFTED_FEATURE}
    assert all(d["value"] >= 0.25 for d in evidence["devices"])
    assert evidence["features"] == [DRIFTED_FEATURE] and len(evidence["windows"]) == 2
    plan = service.decision_plan(decision)
    assert plan["alias"] == "candidate" and plan["canary"] is None
    assert plan["training"] == {"epochs": 3, "spec": {}}
    assert plan["dataset"]["note"] == (
        "sensor-data v1: the drifted version's own training data (no newer version of the "
        "dataset exists)"
    )
    history = json.loads(decision.history_json)
    assert history == [
        {
            "at": at(1.5).isoformat(),
            "status": "pending_approval",
            "note": f"sensor-drift fired: {decision.summary.split(': ', 1)[1]}",
        }
    ]
    # while it waits, the same firing -- and later ones -- take no second decision
    assert evaluate(fleet, 1.5) == [] and evaluate(fleet, 1.75) == []
    assert len(decisions(fleet)) == 1


def test_approval_queues_a_run_on_the_newest_dataset_version(fleet: Fleet) -> None:
    add_policy(fleet, training=TrainingOverrides(epochs=3, spec={"hidden_units": [8]}))
    drifted_hours(fleet, 0, 1)
    (decision_id,) = evaluate(fleet, 1.5)
    with session_scope(fleet.engine) as session:
        original = session.exec(select(DatasetVersion)).one()
        newer = DatasetVersion(
            dataset_id=original.dataset_id,
            version=2,
            sha256="d" * 64,
            source_sha256="e" * 64,
            source_format="npz",
            rows=4300,
            data_schema_json=class_schema(4300),
            splits_sha256="f" * 64,
            split_seed=0,
            lineage_json=json.dumps({"source": "samples", "devices": 3}),
        )
        session.add(newer)
        session.flush()
        newer_id = newer.id
    with session_scope(fleet.engine) as session:
        service.approve(session, decision_id=decision_id, now=at(2), note="go")
    approved = decision_of(fleet, decision_id)
    assert approved.status == "training" and approved.decided_at == at(2)
    assert approved.note == "go" and approved.run_id is not None
    with Session(fleet.engine) as session:
        run = session.get(TrainingRun, approved.run_id)
        assert run is not None
        assert run.status == "queued" and run.model_name == MODEL
        assert run.dataset_version_id == newer_id
        spec = ModelSpec.model_validate_json(run.spec_json)
    assert (spec.arch, spec.epochs, spec.hidden_units) == ("mlp", 3, [8])
    plan = service.decision_plan(approved)
    assert plan["dataset"]["version"] == 2 and plan["dataset"]["original_version"] == 1
    assert plan["dataset"]["note"] == (
        "sensor-data v2, newer than v1 the drifted version was trained on (devices=3, "
        "source=samples): the newest data, e.g. captured device samples"
    )
    assert plan["spec"]["epochs"] == 3
    assert approved.status_reason == (
        f"approved: go; training run {run.id} queued on {plan['dataset']['note']}"
    )
    for command in (service.approve, service.reject):
        with (
            pytest.raises(DecisionStateError, match="is training: only a decision pending"),
            session_scope(fleet.engine) as session,
        ):
            command(session, decision_id=decision_id, now=at(2))
    with (
        pytest.raises(NotFoundError, match="no retraining decision 999"),
        session_scope(fleet.engine) as session,
    ):
        service.approve(session, decision_id=999, now=at(2))


def test_a_rejected_decision_holds_the_policy_off_for_its_cooldown(fleet: Fleet) -> None:
    add_policy(fleet)
    drifted_hours(fleet, 0, 1, 2, 3, 4, 5, 6, 7)
    (first,) = evaluate(fleet, 1.5)
    with session_scope(fleet.engine) as session:
        service.reject(session, decision_id=first, now=at(1.6), note="not now")
    rejected = decision_of(fleet, first)
    assert rejected.status == "rejected" and rejected.status_reason == "rejected: not now"
    assert evaluate(fleet, 2.5) == [] and evaluate(fleet, 7.4) == []  # within 6 h of 01:30
    (second,) = evaluate(fleet, 7.5)
    assert second != first and [d.status for d in decisions(fleet)] == [
        "pending_approval",
        "rejected",
    ]


def test_a_policy_without_approval_trains_at_once(fleet: Fleet) -> None:
    add_policy(fleet, approval=False, groups=["canary"])
    drifted_hours(fleet, 0, 1)
    (decision_id,) = evaluate(fleet, 1.5)
    decision = decision_of(fleet, decision_id)
    assert decision.status == "training" and decision.run_id is not None
    assert decision.decided_at is None
    assert decision.status_reason.startswith("the policy trains without approval; training run")


def take_and_run(fleet: Fleet, **policy: Any) -> RetrainingDecisionRecord:
    """A decision, approved, and its run claimed by a worker (as a JobRunner would)."""
    add_policy(fleet, groups=["canary"], **policy)
    drifted_hours(fleet, 0, 1)
    (decision_id,) = evaluate(fleet, 1.5)
    with session_scope(fleet.engine) as session:
        service.approve(session, decision_id=decision_id, now=at(2))
    with Session(fleet.engine) as session:
        assert jobs.claim_next_run(session, worker="test:1") is not None
        return service.get_decision(session, decision_id=decision_id)


def finish(fleet: Fleet, run_id: int | None, **outcome: Any) -> None:
    assert run_id is not None
    with session_scope(fleet.engine) as session:
        assert jobs.finish_run(session, run_id=run_id, **outcome)


def new_version(fleet: Fleet, *, gated: bool) -> int:
    """The model version a finished run published (a signed, gated bundle or none passed)."""
    with session_scope(fleet.engine) as session:
        version = register_version(
            session, store=fleet.store, keys=fleet.keys, reference=fleet.reference, version=2
        )
        if not gated:
            for artifact in session.exec(
                select(TargetArtifact).where(TargetArtifact.model_version_id == version.id)
            ):
                artifact.gate_passed = False
                artifact.gate_reasons_json = json.dumps(["int8 accuracy 61.0 < 90.0"])
                session.add(artifact)
        assert version.id is not None
        return version.id


def test_a_gated_version_becomes_the_candidate_and_a_canary_starts(fleet: Fleet) -> None:
    decision = take_and_run(fleet, canary=CanarySpec(phases="1dev,100"))
    assert advance_decisions(fleet.engine, now=at(2.1)) == []  # still running
    finish(
        fleet, decision.run_id, status="succeeded", model_version_id=new_version(fleet, gated=True)
    )
    assert advance_decisions(fleet.engine, now=at(2.2)) == [decision.id]
    with Session(fleet.engine) as session:
        done = service.get_decision(session, decision_id=decision.id or 0)
        assert registry.get_version(session, model_name=MODEL, version="candidate").version == 2
        (rollout,) = list_rollouts(session, model_name=MODEL)
    assert done.status == "completed" and done.candidate_version == 2
    assert done.rollout_id == rollout.id
    assert (rollout.model_version, rollout.group_name) == (2, "canary")
    assert [p.describe() for p in rollout.spec.phases] == ["1 devices", "100%"]
    assert rollout.spec.phases[0].approval_required and not rollout.spec.phases[1].approval_required
    assert done.status_reason == (
        f"v2 passed its gates on edge-x86_64-litert; promoted to 'candidate'; canary rollout "
        f"{rollout.id} to group 'canary' (1dev,100) started"
    )
    assert [h["status"] for h in json.loads(done.history_json)] == [
        "pending_approval",
        "training",
        "completed",
    ]
    assert advance_decisions(fleet.engine, now=at(2.3)) == []  # done once


def test_a_version_that_passed_no_gate_is_not_promoted(fleet: Fleet) -> None:
    decision = take_and_run(fleet, canary=CanarySpec())
    finish(
        fleet, decision.run_id, status="succeeded", model_version_id=new_version(fleet, gated=False)
    )
    advance_decisions(fleet.engine, now=at(2.2))
    with Session(fleet.engine) as session:
        done = service.get_decision(session, decision_id=decision.id or 0)
        with pytest.raises(NotFoundError):
            registry.get_version(session, model_name=MODEL, version="candidate")
        assert list_rollouts(session, model_name=MODEL) == []
    assert done.status == "failed" and done.candidate_version is None
    assert "v2 from run" in done.status_reason and "passed no gate" in done.status_reason
    assert "int8 accuracy 61.0 < 90.0" in done.status_reason


def test_a_failed_run_fails_the_decision(fleet: Fleet) -> None:
    decision = take_and_run(fleet)
    finish(fleet, decision.run_id, status="failed", error="out of memory")
    advance_decisions(fleet.engine, now=at(2.2))
    with Session(fleet.engine) as session:
        done = service.get_decision(session, decision_id=decision.id or 0)
    assert done.status == "failed"
    assert done.status_reason == f"training run {decision.run_id} failed: out of memory"


def test_a_canary_the_fleet_refuses_leaves_the_candidate_and_says_why(fleet: Fleet) -> None:
    decision = take_and_run(fleet, canary=CanarySpec(phases="50,100"))
    with session_scope(fleet.engine) as session:
        create_rollout(session, model_name=MODEL, version=1, group="canary", now=at(2))
    finish(
        fleet, decision.run_id, status="succeeded", model_version_id=new_version(fleet, gated=True)
    )
    advance_decisions(fleet.engine, now=at(2.2))
    with Session(fleet.engine) as session:
        done = service.get_decision(session, decision_id=decision.id or 0)
        assert registry.get_version(session, model_name=MODEL, version="candidate").version == 2
    assert done.status == "failed" and done.candidate_version == 2 and done.rollout_id is None
    assert "promoted to 'candidate'; the canary rollout to group 'canary' could not start" in (
        done.status_reason
    )
    assert "is still pending" in done.status_reason


def test_an_imported_version_is_retrained_with_the_datasets_default_spec(fleet: Fleet) -> None:
    decision = take_and_run(fleet)
    with Session(fleet.engine) as session:
        version = session.exec(select(ModelVersion).where(ModelVersion.version == 1)).one()
        assert version.run_id is None  # imported: there is no run to copy the spec from
        run = session.get(TrainingRun, decision.run_id)
        assert run is not None
    assert ModelSpec.model_validate_json(run.spec_json).epochs == 3  # default spec + override


def test_evaluators_racing_take_one_decision(fleet: Fleet) -> None:
    add_policy(fleet, groups=["canary"])
    drifted_hours(fleet, 0, 1)
    start = threading.Barrier(3)

    def run() -> None:
        start.wait()
        evaluate(fleet, 1.5)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(decisions(fleet)) == 1


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"condition": OfflineCondition(offline_for=timedelta(hours=1))},
            PolicyInvalidError,
            "an offline device is no reason to retrain",
        ),
        ({"groups": []}, PolicyInvalidError, "name at least one device group"),
        ({"groups": ["nope"]}, NotFoundError, "no device group named 'nope'"),
        ({"alias": "production"}, PolicyInvalidError, "promote it to production yourself"),
        ({"alias": "Latest"}, PolicyInvalidError, "alias 'Latest'"),
        ({"canary": CanarySpec(phases="50,25")}, PolicyInvalidError, "must increase"),
        ({"canary": CanarySpec(phases="half")}, PolicyInvalidError, "canary.phases 'half'"),
        ({"cooldown": timedelta(days=-1)}, PolicyInvalidError, "cooldown must be between"),
        ({"name": "has space"}, PolicyInvalidError, "policy name 'has space'"),
        ({"model_name": "nope"}, NotFoundError, "no model named 'nope'"),
    ],
)
def test_policies_that_cannot_work_are_refused(
    fleet: Fleet, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    fields: dict[str, Any] = {
        "name": "p",
        "model_name": MODEL,
        "groups": ["canary"],
        "condition": DRIFT,
    } | options
    with pytest.raises(error, match=message), session_scope(fleet.engine) as session:
        service.create_policy(session, now=at(0), **fields)


def test_deleting_a_policy_rejects_its_pending_decisions(fleet: Fleet) -> None:
    add_policy(fleet)
    with pytest.raises(PolicyConflictError), session_scope(fleet.engine) as session:
        service.create_policy(
            session,
            name="sensor-drift",
            model_name=MODEL,
            groups=["canary"],
            condition=DRIFT,
            now=at(0),
        )
    drifted_hours(fleet, 0, 1)
    evaluate(fleet, 1.5)
    with session_scope(fleet.engine) as session:
        service.delete_policy(session, name="sensor-drift", now=at(2))
    (decision,) = decisions(fleet)
    assert decision.status == "rejected" and decision.policy_id is None
    assert decision.status_reason == "the policy was deleted"
    assert decision.policy_name == "sensor-drift"
