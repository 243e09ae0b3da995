"""Retraining policies and decisions in the database: keyword-only functions on a session.

- **Policies** -- :func:`create_policy`, :func:`get_policy`, :func:`list_policies`,
  :func:`update_policy`, :func:`delete_policy`.
- **Decisions** -- :func:`fire` (a policy fired for a group: record the decision with its
  evidence and its plan, and train at once unless the policy wants approval),
  :func:`approve` / :func:`reject`, :func:`advance` (a finished run: promote the
  candidate, start the canary), :func:`list_decisions`, :func:`get_decision`.

What always holds:

- A decision's plan -- the alias, the canary, the spec overrides -- is the policy's as it
  was when the decision was taken: changing or deleting the policy later does not change
  what an approved decision does.
- Training starts in the transaction that moves the decision to ``training``: the queued
  run and the decision's ``run_id`` are committed together or not at all. The run
  trains on the drifted version's dataset at its newest version, with the spec of the
  run that made the drifted version (or the dataset's default spec for an imported
  one) and the policy's overrides; any job runner claims it like any other run, and the
  worker's pipeline builds, evaluates, quantizes and gates it as for every run.
- A version is promoted to the plan's alias only when it is ``ready`` and at least one of
  its artifacts passed its gates (:func:`server.registry.promote`); the canary rollout
  goes through :func:`server.rollouts.service.create_rollout`, which refuses an
  unevaluated or ungated version and overlapping rollouts.
- Every status change is one conditional ``UPDATE`` that also appends to the history;
  what cannot be done ends the decision ``failed`` with the reason, never half-done.

Functions flush but never commit; the caller commits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server import registry
from server.alerts.evaluate import Finding
from server.errors import ServerError
from server.fleet.groups import get_group
from server.models import Dataset, DatasetVersion, ModelVersion, TrainingRun
from server.retraining.errors import (
    DecisionNotFoundError,
    DecisionStateError,
    PolicyConflictError,
    PolicyInvalidError,
    PolicyNotFoundError,
)
from server.retraining.models import RetrainingDecisionRecord, RetrainingPolicyRecord
from server.retraining.policy import (
    CanarySpec,
    DecisionStatus,
    RetrainingCondition,
    TrainingOverrides,
    choose_dataset,
)

__all__ = [
    "MAX_GROUPS",
    "NAME_PATTERN",
    "advance",
    "approve",
    "create_policy",
    "decision_plan",
    "delete_policy",
    "fire",
    "get_decision",
    "get_policy",
    "list_decisions",
    "list_policies",
    "policy_canary",
    "policy_condition",
    "policy_groups",
    "policy_training",
    "reject",
    "update_policy",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
_ALIAS = re.compile(r"[a-z][a-z0-9_-]{0,63}")
MAX_GROUPS = 20
MAX_COOLDOWN = timedelta(days=365)
_UNSET: Any = object()
_MAX_REASON = 4000

_CONDITION: TypeAdapter[Any] = TypeAdapter(RetrainingCondition)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


# ----------------------------------------------------------------------------- policies


def policy_condition(policy: RetrainingPolicyRecord) -> Any:
    return _CONDITION.validate_json(policy.condition_json)


def policy_groups(policy: RetrainingPolicyRecord) -> list[str]:
    groups: list[str] = json.loads(policy.groups_json)
    return groups


def policy_training(policy: RetrainingPolicyRecord) -> TrainingOverrides:
    return TrainingOverrides.model_validate_json(policy.training_json or "{}")


def policy_canary(policy: RetrainingPolicyRecord) -> CanarySpec | None:
    return (
        None if policy.canary_json is None else CanarySpec.model_validate_json(policy.canary_json)
    )


def _check_groups(session: Session, groups: Sequence[str]) -> list[str]:
    cleaned = list(dict.fromkeys(g.strip() for g in groups if g.strip()))
    if not cleaned:
        raise PolicyInvalidError("groups: name at least one device group the policy watches")
    if len(cleaned) > MAX_GROUPS:
        raise PolicyInvalidError(f"groups: at most {MAX_GROUPS}, not {len(cleaned)}")
    for name in cleaned:
        get_group(session, name=name)  # 404 for an unknown group
    return cleaned


def _check_alias(alias: str) -> None:
    if not _ALIAS.fullmatch(alias) or alias == "latest":
        raise PolicyInvalidError(
            f"alias {alias!r}: lowercase letters, digits, '-' or '_', starting with a letter "
            "('latest' is reserved)"
        )
    if alias == "production":
        raise PolicyInvalidError(
            "alias 'production': a retrained version is a candidate until a rollout has "
            "proved it; promote it to production yourself"
        )


def _check_canary(canary: CanarySpec | None, model_name: str) -> None:
    if canary is None:
        return
    from server.rollouts.core import RolloutSpec, parse_phases

    try:
        RolloutSpec.build(
            rollout_id="policy-check",
            model_name=model_name,
            model_version=1,
            group="policy-check",
            phases=parse_phases(canary.phases),
        )
    except ServerError as e:
        raise PolicyInvalidError(f"canary.phases {canary.phases!r}: {e}") from e


def _check_cooldown(cooldown: timedelta) -> None:
    if not timedelta(0) <= cooldown <= MAX_COOLDOWN:
        raise PolicyInvalidError("cooldown must be between 0 and 365 days")


def _check_condition(condition: Any) -> None:
    if getattr(condition, "kind", None) == "offline":
        raise PolicyInvalidError(
            "condition: an offline device is no reason to retrain; use drift, accuracy, "
            "latency_p95 or error_rate"
        )


def create_policy(
    session: Session,
    *,
    name: str,
    model_name: str,
    groups: Sequence[str],
    condition: Any,
    now: datetime,
    approval: bool = True,
    cooldown: timedelta = timedelta(days=1),
    training: TrainingOverrides | None = None,
    alias: str = "candidate",
    canary: CanarySpec | None = None,
    enabled: bool = True,
    description: str = "",
) -> RetrainingPolicyRecord:
    if not _NAME.fullmatch(name):
        raise PolicyInvalidError(
            f"policy name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    _check_condition(condition)
    registry.get_model(session, name=model_name)  # 404 for an unknown model
    cleaned = _check_groups(session, groups)
    _check_alias(alias)
    _check_canary(canary, model_name)
    _check_cooldown(cooldown)
    if session.exec(
        select(RetrainingPolicyRecord).where(RetrainingPolicyRecord.name == name)
    ).first():
        raise PolicyConflictError(f"a retraining policy named {name!r} exists already")
    policy = RetrainingPolicyRecord(
        name=name,
        model_name=model_name,
        groups_json=_json(cleaned),
        condition_json=condition.model_dump_json(),
        approval=approval,
        cooldown_seconds=cooldown.total_seconds(),
        training_json=(training or TrainingOverrides()).model_dump_json(),
        alias=alias,
        canary_json=None if canary is None else canary.model_dump_json(),
        enabled=enabled,
        description=description,
        created_at=now,
        updated_at=now,
    )
    session.add(policy)
    try:
        session.flush()
    except IntegrityError as e:
        session.rollback()
        raise PolicyConflictError(f"a retraining policy named {name!r} exists already") from e
    return policy


def get_policy(session: Session, *, name: str) -> RetrainingPolicyRecord:
    policy = session.exec(
        select(RetrainingPolicyRecord).where(RetrainingPolicyRecord.name == name)
    ).first()
    if policy is None:
        raise PolicyNotFoundError(f"no retraining policy named {name!r}")
    return policy


def list_policies(
    session: Session, *, model_name: str | None = None, enabled: bool | None = None
) -> list[RetrainingPolicyRecord]:
    query = select(RetrainingPolicyRecord).order_by(col(RetrainingPolicyRecord.name))
    if model_name is not None:
        query = query.where(RetrainingPolicyRecord.model_name == model_name)
    if enabled is not None:
        query = query.where(RetrainingPolicyRecord.enabled == enabled)
    return list(session.exec(query))


def update_policy(
    session: Session,
    *,
    name: str,
    now: datetime,
    groups: Sequence[str] | None = None,
    condition: Any = None,
    approval: bool | None = None,
    cooldown: timedelta | None = None,
    training: TrainingOverrides | None = None,
    alias: str | None = None,
    canary: CanarySpec | None = _UNSET,
    enabled: bool | None = None,
    description: str | None = None,
) -> RetrainingPolicyRecord:
    """Change what is given (``canary=None`` removes the canary); decisions already taken
    keep the plan they were taken with."""
    policy = get_policy(session, name=name)
    if groups is not None:
        policy.groups_json = _json(_check_groups(session, groups))
    if condition is not None:
        _check_condition(condition)
        policy.condition_json = condition.model_dump_json()
    if approval is not None:
        policy.approval = approval
    if cooldown is not None:
        _check_cooldown(cooldown)
        policy.cooldown_seconds = cooldown.total_seconds()
    if training is not None:
        policy.training_json = training.model_dump_json()
    if alias is not None:
        _check_alias(alias)
        policy.alias = alias
    if canary is not _UNSET:
        _check_canary(canary, policy.model_name)
        policy.canary_json = None if canary is None else canary.model_dump_json()
    if enabled is not None:
        policy.enabled = enabled
    if description is not None:
        policy.description = description
    policy.updated_at = now
    session.add(policy)
    session.flush()
    return policy


def delete_policy(session: Session, *, name: str, now: datetime) -> None:
    """Delete a policy; its decisions stay, and those pending approval are rejected."""
    policy = get_policy(session, name=name)
    pending = session.exec(
        select(RetrainingDecisionRecord).where(
            RetrainingDecisionRecord.policy_id == policy.id,
            RetrainingDecisionRecord.status == DecisionStatus.PENDING_APPROVAL.value,
        )
    ).all()
    for decision in pending:
        _move(
            session,
            decision,
            expected=DecisionStatus.PENDING_APPROVAL,
            to=DecisionStatus.REJECTED,
            now=now,
            reason="the policy was deleted",
        )
    session.execute(
        update(RetrainingDecisionRecord)
        .where(col(RetrainingDecisionRecord.policy_id) == policy.id)
        .values(policy_id=None)
    )
    session.delete(policy)
    session.flush()


# ----------------------------------------------------------------------------- decisions


def list_decisions(
    session: Session,
    *,
    status: str | None = None,
    policy: str | None = None,
    model_name: str | None = None,
    group: str | None = None,
    limit: int = 100,
) -> list[RetrainingDecisionRecord]:
    """Newest first."""
    query = select(RetrainingDecisionRecord).order_by(col(RetrainingDecisionRecord.id).desc())
    for column, value in (
        (RetrainingDecisionRecord.status, status),
        (RetrainingDecisionRecord.policy_name, policy),
        (RetrainingDecisionRecord.model_name, model_name),
        (RetrainingDecisionRecord.group_name, group),
    ):
        if value is not None:
            query = query.where(column == value)
    return list(session.exec(query.limit(limit)))


def get_decision(session: Session, *, decision_id: int) -> RetrainingDecisionRecord:
    decision = session.get(RetrainingDecisionRecord, decision_id, populate_existing=True)
    if decision is None:
        raise DecisionNotFoundError(f"no retraining decision {decision_id}")
    return decision


def decision_plan(decision: RetrainingDecisionRecord) -> dict[str, Any]:
    plan: dict[str, Any] = json.loads(decision.plan_json or "{}")
    return plan


def _move(
    session: Session,
    decision: RetrainingDecisionRecord,
    *,
    expected: DecisionStatus,
    to: DecisionStatus,
    now: datetime,
    reason: str,
    **values: Any,
) -> bool:
    """Move ``decision`` from ``expected`` to ``to``; False if it is no longer ``expected``."""
    history = json.loads(decision.history_json or "[]")
    history.append({"at": now.isoformat(), "status": to.value, "note": reason[:_MAX_REASON]})
    result = session.execute(
        update(RetrainingDecisionRecord)
        .where(
            col(RetrainingDecisionRecord.id) == decision.id,
            col(RetrainingDecisionRecord.status) == expected.value,
        )
        .values(
            status=to.value,
            status_reason=reason[:_MAX_REASON],
            updated_at=now,
            history_json=_json(history),
            **values,
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.refresh(decision)
    return True


def _dataset_plan(session: Session, version: ModelVersion) -> dict[str, Any]:
    """Which dataset version a retraining of ``version`` trains on, and why."""
    from server.datasets.service import latest_version  # heavier than this module needs

    original = session.get(DatasetVersion, version.dataset_version_id)
    if original is None:
        raise DecisionStateError(f"the dataset version {version.dataset_version_id} is gone")
    dataset = session.get(Dataset, original.dataset_id)
    assert dataset is not None and original.id is not None  # foreign keys
    newest = latest_version(session, dataset=dataset) or original
    assert newest.id is not None
    choice = choose_dataset(
        dataset=dataset.name,
        original_id=original.id,
        original_version=original.version,
        newest_id=newest.id,
        newest_version=newest.version,
        newest_lineage=json.loads(newest.lineage_json or "{}"),
    )
    return {
        "dataset": dataset.name,
        "original_version": original.version,
        "original_dataset_version_id": original.id,
        "version": choice.version,
        "dataset_version_id": choice.dataset_version_id,
        "note": choice.note,
    }


def fire(
    session: Session,
    *,
    policy: RetrainingPolicyRecord,
    group: str,
    finding: Finding,
    now: datetime,
) -> RetrainingDecisionRecord | None:
    """Record that ``policy`` fired for ``group``; train at once unless it wants approval.

    None when this firing was recorded already (another evaluator judged the same windows).
    """
    assert finding.model_version is not None and finding.window_end is not None
    version = registry.get_version(
        session, model_name=policy.model_name, version=finding.model_version
    )
    try:
        dataset = _dataset_plan(session, version)
    except ServerError as e:
        dataset = {"error": str(e)}
    plan = {
        "alias": policy.alias,
        "canary": None if policy.canary_json is None else json.loads(policy.canary_json),
        "training": json.loads(policy.training_json or "{}"),
        "approval": policy.approval,
        "dataset": dataset,
    }
    status = DecisionStatus.PENDING_APPROVAL
    note = f"{policy.name} fired: {finding.summary}"
    decision = RetrainingDecisionRecord(
        policy_id=policy.id,
        policy_name=policy.name,
        model_name=policy.model_name,
        model_version=finding.model_version,
        group_name=group,
        window_end=finding.window_end,
        status=status.value,
        status_reason="waiting for an operator's approval" if policy.approval else note,
        summary=f"{finding.subject}: {finding.summary}",
        evidence_json=_json(
            {
                "subject": finding.subject,
                "value": finding.value,
                "threshold": finding.threshold,
                "condition": json.loads(policy.condition_json),
                **finding.evidence,
            }
        ),
        plan_json=_json(plan),
        history_json=_json([{"at": now.isoformat(), "status": status.value, "note": note}]),
        created_at=now,
        updated_at=now,
    )
    savepoint = session.begin_nested()
    try:
        session.add(decision)
        session.flush()
    except IntegrityError:
        savepoint.rollback()
        return None
    savepoint.commit()
    if not policy.approval:
        _start_training(session, decision, now=now, note="the policy trains without approval")
    return decision


def approve(
    session: Session, *, decision_id: int, now: datetime, note: str = ""
) -> RetrainingDecisionRecord:
    """Start the retraining a pending decision proposes (409 unless it is pending)."""
    decision = get_decision(session, decision_id=decision_id)
    _expect_pending(decision, "approved")
    if note:
        decision.note = note
        session.add(decision)
    reason = "approved" + (f": {note}" if note else "")
    if not _start_training(session, decision, now=now, note=reason, decided=True):
        raise DecisionStateError(f"decision {decision_id} was decided by someone else just now")
    return decision


def reject(
    session: Session, *, decision_id: int, now: datetime, note: str = ""
) -> RetrainingDecisionRecord:
    """Turn a pending decision down (409 unless it is pending)."""
    decision = get_decision(session, decision_id=decision_id)
    _expect_pending(decision, "rejected")
    reason = "rejected" + (f": {note}" if note else "")
    if not _move(
        session,
        decision,
        expected=DecisionStatus.PENDING_APPROVAL,
        to=DecisionStatus.REJECTED,
        now=now,
        reason=reason,
        decided_at=now,
        note=note,
    ):
        raise DecisionStateError(f"decision {decision_id} was decided by someone else just now")
    return decision


def _expect_pending(decision: RetrainingDecisionRecord, verb: str) -> None:
    if decision.status != DecisionStatus.PENDING_APPROVAL.value:
        raise DecisionStateError(
            f"decision {decision.id} is {decision.status}: only a decision pending approval "
            f"can be {verb}"
        )


def _run_spec(
    session: Session, version: ModelVersion, overrides: dict[str, Any], schema: Any
) -> Any:
    """The spec of the run that made ``version`` with ``overrides``; the dataset's default
    spec with them for an imported version."""
    from server.training.spec import ModelSpec, SpecError, check_fits, spec_with_overrides

    base = None
    run = None if version.run_id is None else session.get(TrainingRun, version.run_id)
    if run is not None:
        stored = json.loads(run.spec_json or "{}")
        if stored.get("kind") != "import":
            base = stored
    if base is None:
        return spec_with_overrides(None, schema, overrides)
    try:
        spec = ModelSpec.model_validate({**base, **overrides})
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors()
        )
        raise SpecError(f"invalid model spec: {problems}") from e
    check_fits(spec, schema)
    return spec


def _start_training(
    session: Session,
    decision: RetrainingDecisionRecord,
    *,
    now: datetime,
    note: str,
    decided: bool = False,
) -> bool:
    """Queue the run and move the decision to ``training`` together; a plan that cannot
    be trained ends the decision ``failed``. False if the decision was not pending."""
    from server.datasets.types import DatasetSchema

    plan = decision_plan(decision)
    extra: dict[str, Any] = {"decided_at": now} if decided else {}
    try:
        version = registry.get_version(
            session, model_name=decision.model_name, version=decision.model_version
        )
        dataset = _dataset_plan(session, version)
        chosen = session.get(DatasetVersion, dataset["dataset_version_id"])
        assert chosen is not None
        schema = DatasetSchema.model_validate_json(chosen.data_schema_json)
        overrides = TrainingOverrides.model_validate(plan.get("training") or {}).as_overrides()
        spec = _run_spec(session, version, overrides, schema)
    except ServerError as e:
        return _move(
            session,
            decision,
            expected=DecisionStatus.PENDING_APPROVAL,
            to=DecisionStatus.FAILED,
            now=now,
            reason=f"{note}; cannot train: {e}",
            **extra,
        )
    plan["dataset"] = dataset
    plan["spec"] = spec.model_dump(mode="json")
    # The run row is made here rather than by jobs.create_run (which commits): the queued
    # run and the decision's move to "training" must commit together.
    run = TrainingRun(
        model_name=decision.model_name,
        dataset_version_id=dataset["dataset_version_id"],
        status="queued",
        spec_json=spec.model_dump_json(),
    )
    session.add(run)
    session.flush()
    moved = _move(
        session,
        decision,
        expected=DecisionStatus.PENDING_APPROVAL,
        to=DecisionStatus.TRAINING,
        now=now,
        reason=f"{note}; training run {run.id} queued on {dataset['note']}",
        run_id=run.id,
        plan_json=_json(plan),
        **extra,
    )
    if not moved:
        session.delete(run)
        session.flush()
    return moved


def advance(session: Session, *, decision: RetrainingDecisionRecord, now: datetime) -> bool:
    """Act on the finished run of a ``training`` decision; True if the decision moved."""
    if decision.status != DecisionStatus.TRAINING.value or decision.run_id is None:
        return False
    run = session.get(TrainingRun, decision.run_id, populate_existing=True)
    if run is None:
        return _fail(session, decision, now, f"training run {decision.run_id} is gone")
    if run.status in ("queued", "running"):
        return False
    if run.status != "succeeded" or run.model_version_id is None:
        return _fail(
            session,
            decision,
            now,
            f"training run {run.id} {run.status}" + (f": {run.error}" if run.error else ""),
        )
    version = session.get(ModelVersion, run.model_version_id)
    if version is None:
        return _fail(session, decision, now, f"model version id {run.model_version_id} is gone")
    artifacts = registry.list_artifacts(session, version=version)
    passed = sorted(a.target for a in artifacts if a.gate_passed)
    if version.status != "ready" or not passed:
        reasons = {a.target: json.loads(a.gate_reasons_json or "[]") for a in artifacts}
        return _fail(
            session,
            decision,
            now,
            f"{decision.model_name} v{version.version} from run {run.id} is {version.status} "
            f"and passed no gate, so it is not promoted: {_json(reasons)[:1500]}",
        )
    plan = decision_plan(decision)
    alias = str(plan.get("alias") or "candidate")
    # Claim the move first (it locks the row), so a second server cannot promote and
    # start a second canary of the same decision.
    steps = [f"v{version.version} passed its gates on {', '.join(passed)}; promoted to {alias!r}"]
    if not _move(
        session,
        decision,
        expected=DecisionStatus.TRAINING,
        to=DecisionStatus.COMPLETED,
        now=now,
        reason=steps[0],
        candidate_version=version.version,
    ):
        return False
    registry.promote(session, model_name=decision.model_name, version=version.version, alias=alias)
    canary = plan.get("canary")
    if canary is None:
        return True
    spec = CanarySpec.model_validate(canary)
    from server.rollouts.service import create_rollout

    savepoint = session.begin_nested()
    try:
        rollout = create_rollout(
            session,
            model_name=decision.model_name,
            version=version.version,
            group=decision.group_name,
            now=now,
            phases=spec.phases,
            approval=spec.approval,
            wait_between_phases=spec.wait_between_phases,
            device_timeout=spec.device_timeout,
            gates=spec.gates,
        )
    except ServerError as e:
        savepoint.rollback()
        _rewrite_last(
            session,
            decision,
            now,
            DecisionStatus.FAILED,
            f"{steps[0]}; the canary rollout to group {decision.group_name!r} could not start: {e}",
        )
        return True
    savepoint.commit()
    _rewrite_last(
        session,
        decision,
        now,
        DecisionStatus.COMPLETED,
        f"{steps[0]}; canary rollout {rollout.id} to group {decision.group_name!r} "
        f"({spec.phases}) started",
        rollout_id=rollout.id,
    )
    return True


def _fail(session: Session, decision: RetrainingDecisionRecord, now: datetime, reason: str) -> bool:
    return _move(
        session,
        decision,
        expected=DecisionStatus.TRAINING,
        to=DecisionStatus.FAILED,
        now=now,
        reason=reason,
    )


def _rewrite_last(
    session: Session,
    decision: RetrainingDecisionRecord,
    now: datetime,
    status: DecisionStatus,
    reason: str,
    **values: Any,
) -> None:
    """Settle a decision this transaction has just moved (it holds the row)."""
    history = json.loads(decision.history_json or "[]")
    history[-1] = {"at": now.isoformat(), "status": status.value, "note": reason[:_MAX_REASON]}
    decision.status = status.value
    decision.status_reason = reason[:_MAX_REASON]
    decision.history_json = _json(history)
    for key, value in values.items():
        setattr(decision, key, value)
    session.add(decision)
    session.flush()
