"""Retraining policies and decisions over HTTP, for the dashboard and ``edgefleet retraining``.

``/retraining/policies``: a policy per model -- a condition (``drift``, ``accuracy``,
``latency_p95`` or ``error_rate``, as alert rules write them) watched on each of its
groups, whether a firing waits for approval, a cooldown, the spec overrides of the
retraining run, the alias the result is promoted to and the canary rollout to start.
``/retraining/decisions``: what the policies decided, with the evidence (devices,
features, values per window), the plan (which dataset version, and why), the run,
the candidate and the rollout; ``approve`` starts the retraining of a pending
decision, ``reject`` turns it down.

An unknown policy, decision, model or group answers 404; a taken policy name and a
command on a decision that is not pending 409; a policy that cannot work 422 naming
the field.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import Session

from server.alerts.rules import ConditionKind
from server.api.deps import NowDep, SessionDep
from server.auth import audit
from server.auth.deps import PrincipalDep
from server.models import TrainingRun
from server.retraining import service
from server.retraining.models import RetrainingDecisionRecord, RetrainingPolicyRecord
from server.retraining.policy import (
    CanarySpec,
    DecisionStatus,
    RetrainingCondition,
    TrainingOverrides,
)

__all__ = [
    "DecisionCommand",
    "DecisionDetail",
    "DecisionPublic",
    "PolicyCreate",
    "PolicyPublic",
    "PolicyUpdate",
    "RunView",
    "router",
]

router = APIRouter(prefix="/retraining", tags=["retraining"])


class PolicyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=service.NAME_PATTERN, description="unique; letters, digits, ._-")
    model: str = Field(max_length=128, description="the model retrained")
    groups: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=service.MAX_GROUPS, description="groups watched, one by one"
    )
    condition: RetrainingCondition
    approval: bool = Field(True, description="a firing waits for an operator's approval")
    cooldown: timedelta = Field(
        timedelta(days=1), description="at most one firing per group in this time (seconds)"
    )
    training: TrainingOverrides = Field(default_factory=TrainingOverrides)
    alias: str = Field("candidate", max_length=64, description="promoted to when its gates pass")
    canary: CanarySpec | None = Field(
        None, description="start a canary rollout of the candidate to the group (null: none)"
    )
    enabled: bool = True
    description: str = Field("", max_length=2000)


class PolicyUpdate(BaseModel):
    """Fields to change; ``"canary": null`` removes the canary."""

    model_config = ConfigDict(extra="forbid")

    groups: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(
        None, min_length=1, max_length=service.MAX_GROUPS
    )
    condition: RetrainingCondition | None = None
    approval: bool | None = None
    cooldown: timedelta | None = None
    training: TrainingOverrides | None = None
    alias: str | None = Field(None, max_length=64)
    canary: CanarySpec | None = None
    enabled: bool | None = None
    description: str | None = Field(None, max_length=2000)


class PolicyPublic(BaseModel):
    name: str
    model: str
    groups: list[str]
    kind: ConditionKind
    condition: dict[str, Any]
    approval: bool
    cooldown_seconds: float
    training: dict[str, Any]
    alias: str
    canary: dict[str, Any] | None
    enabled: bool
    description: str
    created_at: datetime
    updated_at: datetime
    last_evaluated_at: datetime | None
    last_error: str | None


class DecisionPublic(BaseModel):
    id: int
    policy: str
    model: str
    version: int = Field(description="the version that fired (whose lineage is retrained)")
    group: str
    status: DecisionStatus
    status_reason: str
    summary: str = Field(description="what fired, in a line")
    window_end: datetime = Field(description="end of the newest window the firing judged")
    run_id: int | None
    candidate_version: int | None
    rollout_id: str | None
    created_at: datetime
    updated_at: datetime
    decided_at: datetime | None


class RunView(BaseModel):
    id: int
    status: str
    phase: str
    error: str | None
    model_version_id: int | None


class DecisionDetail(DecisionPublic):
    evidence: dict[str, Any] = Field(
        description="the condition, and per window the devices, features and values"
    )
    plan: dict[str, Any] = Field(
        description="dataset (original and chosen version, and why), spec, alias, canary"
    )
    history: list[dict[str, Any]]
    note: str
    run: RunView | None


class DecisionCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str = Field("", max_length=2000, description="why (kept with the decision)")


def _policy_public(policy: RetrainingPolicyRecord) -> PolicyPublic:
    condition = json.loads(policy.condition_json)
    canary = service.policy_canary(policy)
    return PolicyPublic(
        name=policy.name,
        model=policy.model_name,
        groups=service.policy_groups(policy),
        kind=ConditionKind(condition["kind"]),
        condition=condition,
        approval=policy.approval,
        cooldown_seconds=policy.cooldown_seconds,
        training=service.policy_training(policy).model_dump(mode="json"),
        alias=policy.alias,
        canary=None if canary is None else canary.model_dump(mode="json"),
        enabled=policy.enabled,
        description=policy.description,
        created_at=policy.created_at,
        updated_at=policy.updated_at,
        last_evaluated_at=policy.last_evaluated_at,
        last_error=policy.last_error,
    )


def _decision_fields(d: RetrainingDecisionRecord) -> dict[str, Any]:
    assert d.id is not None
    return {
        "id": d.id,
        "policy": d.policy_name,
        "model": d.model_name,
        "version": d.model_version,
        "group": d.group_name,
        "status": d.status,
        "status_reason": d.status_reason,
        "summary": d.summary,
        "window_end": d.window_end,
        "run_id": d.run_id,
        "candidate_version": d.candidate_version,
        "rollout_id": d.rollout_id,
        "created_at": d.created_at,
        "updated_at": d.updated_at,
        "decided_at": d.decided_at,
    }


def _decision_detail(session: Session, d: RetrainingDecisionRecord) -> DecisionDetail:
    run = None if d.run_id is None else session.get(TrainingRun, d.run_id, populate_existing=True)
    return DecisionDetail(
        **_decision_fields(d),
        evidence=json.loads(d.evidence_json or "{}"),
        plan=service.decision_plan(d),
        history=json.loads(d.history_json or "[]"),
        note=d.note,
        run=None
        if run is None or run.id is None
        else RunView(
            id=run.id,
            status=run.status,
            phase=run.phase,
            error=run.error,
            model_version_id=run.model_version_id,
        ),
    )


def _wake(request: Request) -> None:
    evaluator = getattr(request.app.state, "alert_evaluator", None)
    if evaluator is not None:
        evaluator.wake()


# ----------------------------------------------------------------------------- policies


@router.post(
    "/policies",
    response_model=PolicyPublic,
    status_code=status.HTTP_201_CREATED,
    summary="Create a retraining policy",
    responses={
        404: {"description": "unknown model or group"},
        409: {"description": "a policy of that name exists"},
        422: {"description": "a policy that cannot work (the field is named)"},
    },
)
def create_policy(
    body: PolicyCreate, session: SessionDep, now: NowDep, request: Request
) -> PolicyPublic:
    policy = service.create_policy(
        session,
        name=body.name,
        model_name=body.model,
        groups=body.groups,
        condition=body.condition,
        now=now,
        approval=body.approval,
        cooldown=body.cooldown,
        training=body.training,
        alias=body.alias,
        canary=body.canary,
        enabled=body.enabled,
        description=body.description,
    )
    session.commit()
    _wake(request)
    return _policy_public(policy)


@router.get("/policies", response_model=list[PolicyPublic], summary="Retraining policies")
def list_policies(
    session: SessionDep,
    model: Annotated[str | None, Query(max_length=128)] = None,
    enabled: bool | None = None,
) -> list[PolicyPublic]:
    return [
        _policy_public(p) for p in service.list_policies(session, model_name=model, enabled=enabled)
    ]


@router.get("/policies/{name}", response_model=PolicyPublic, summary="One retraining policy")
def show_policy(name: str, session: SessionDep) -> PolicyPublic:
    return _policy_public(service.get_policy(session, name=name))


@router.patch(
    "/policies/{name}",
    response_model=PolicyPublic,
    summary="Change a policy (decisions already taken keep their plan)",
)
def update_policy(
    name: str, body: PolicyUpdate, session: SessionDep, now: NowDep, request: Request
) -> PolicyPublic:
    changes: dict[str, Any] = {
        key: getattr(body, key)
        for key in (
            "groups",
            "condition",
            "approval",
            "cooldown",
            "training",
            "alias",
            "enabled",
            "description",
        )
        if getattr(body, key) is not None
    }
    if "canary" in body.model_fields_set:
        changes["canary"] = body.canary
    policy = service.update_policy(session, name=name, now=now, **changes)
    session.commit()
    _wake(request)
    return _policy_public(policy)


@router.delete(
    "/policies/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a policy (its decisions stay; pending ones are rejected)",
)
def delete_policy(name: str, session: SessionDep, now: NowDep) -> Response:
    service.delete_policy(session, name=name, now=now)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ----------------------------------------------------------------------------- decisions


@router.get("/decisions", response_model=list[DecisionPublic], summary="Decisions, newest first")
def list_decisions(
    session: SessionDep,
    status_: Annotated[DecisionStatus | None, Query(alias="status")] = None,
    policy: Annotated[str | None, Query(max_length=64)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    group: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DecisionPublic]:
    decisions = service.list_decisions(
        session,
        status=None if status_ is None else status_.value,
        policy=policy,
        model_name=model,
        group=group,
        limit=limit,
    )
    return [DecisionPublic(**_decision_fields(d)) for d in decisions]


@router.get(
    "/decisions/{decision_id}",
    response_model=DecisionDetail,
    summary="One decision: evidence, plan, run, candidate, rollout, history",
)
def show_decision(decision_id: int, session: SessionDep) -> DecisionDetail:
    return _decision_detail(session, service.get_decision(session, decision_id=decision_id))


@router.post(
    "/decisions/{decision_id}/approve",
    response_model=DecisionDetail,
    summary="Approve a pending decision: its retraining run is queued",
    responses={409: {"description": "the decision is not pending approval"}},
)
def approve_decision(
    decision_id: int,
    session: SessionDep,
    now: NowDep,
    who: PrincipalDep,
    body: DecisionCommand | None = None,
) -> DecisionDetail:
    note = (body or DecisionCommand()).note
    decision = service.approve(session, decision_id=decision_id, now=now, note=note)
    audit.record(
        session,
        actor=who.name,
        action="retraining.approve",
        target=f"retraining_decision:{decision_id}",
        detail={"note": note},
        at=now,
    )
    session.commit()
    return _decision_detail(session, service.get_decision(session, decision_id=decision.id or 0))


@router.post(
    "/decisions/{decision_id}/reject",
    response_model=DecisionDetail,
    summary="Reject a pending decision",
    responses={409: {"description": "the decision is not pending approval"}},
)
def reject_decision(
    decision_id: int,
    session: SessionDep,
    now: NowDep,
    who: PrincipalDep,
    body: DecisionCommand | None = None,
) -> DecisionDetail:
    note = (body or DecisionCommand()).note
    decision = service.reject(session, decision_id=decision_id, now=now, note=note)
    audit.record(
        session,
        actor=who.name,
        action="retraining.reject",
        target=f"retraining_decision:{decision_id}",
        detail={"note": note},
        at=now,
    )
    session.commit()
    return _decision_detail(session, service.get_decision(session, decision_id=decision.id or 0))
