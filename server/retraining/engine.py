"""Retraining on the evaluator's rounds: policies judged, decisions taken and carried on.

:class:`RetrainingStep` is one of the :class:`~server.alerts.evaluator.AlertEvaluator`'s
steps. Each round it

1. judges every enabled policy on each of its groups with the alerts' own evaluation
   (:func:`server.alerts.evaluate.evaluate_condition`) and, where it fires and
   :func:`~server.retraining.policy.may_fire` allows, takes a decision
   (:func:`server.retraining.service.fire`);
2. carries every ``training`` decision whose run has finished to its end
   (:func:`server.retraining.service.advance`): the candidate promoted, the canary
   rollout created -- the rollout engine starts it at its next step.

What always holds: each policy and each decision is handled in a transaction of its
own, and one that fails is logged (a policy's error also lands in its ``last_error``)
without stopping the others or the round; decisions are single per firing (see
:mod:`server.retraining.models`), so several servers may run this at once.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from server.alerts.evaluate import EvaluationContext, evaluate_condition
from server.db import session_scope
from server.errors import ServerError
from server.retraining import service
from server.retraining.models import RetrainingDecisionRecord, RetrainingPolicyRecord
from server.retraining.policy import ACTIVE, DecisionStatus, may_fire, pick_firing

__all__ = ["RetrainingStep", "advance_decisions", "evaluate_policies"]

log = logging.getLogger(__name__)

_MAX_ERROR = 2000


def _last_decision(
    session: Session, policy_id: int, group: str
) -> tuple[RetrainingDecisionRecord | None, bool]:
    """The policy's latest decision for the group, and whether one is still under way."""
    rows = session.exec(
        select(RetrainingDecisionRecord)
        .where(
            RetrainingDecisionRecord.policy_id == policy_id,
            RetrainingDecisionRecord.group_name == group,
        )
        .order_by(col(RetrainingDecisionRecord.created_at).desc())
        .limit(1)
    ).all()
    active = session.exec(
        select(RetrainingDecisionRecord.id).where(
            RetrainingDecisionRecord.policy_id == policy_id,
            RetrainingDecisionRecord.group_name == group,
            col(RetrainingDecisionRecord.status).in_([s.value for s in ACTIVE]),
        )
    ).first()
    return (rows[0] if rows else None), active is not None


def evaluate_policies(engine: Engine, *, now: datetime, context: EvaluationContext) -> list[int]:
    """Judge every enabled policy at ``now``; the ids of the decisions taken."""
    with Session(engine) as session:
        policy_ids = session.exec(
            select(RetrainingPolicyRecord.id)
            .where(RetrainingPolicyRecord.enabled == True)  # noqa: E712  (SQL, not Python)
            .order_by(col(RetrainingPolicyRecord.id))
        ).all()
    taken = []
    for policy_id in policy_ids:
        assert policy_id is not None
        try:
            with session_scope(engine) as session:
                policy = session.get(RetrainingPolicyRecord, policy_id)
                if policy is None or not policy.enabled:
                    continue
                condition = service.policy_condition(policy)
                cooldown = timedelta(seconds=policy.cooldown_seconds)
                for group in service.policy_groups(policy):
                    findings = evaluate_condition(
                        session,
                        condition=condition,
                        model_name=policy.model_name,
                        group=group,
                        now=now,
                        context=context,
                    )
                    firing = pick_firing(findings)
                    if firing is None:
                        continue
                    last, active = _last_decision(session, policy_id, group)
                    allowed, why = may_fire(
                        now,
                        last_fired_at=None if last is None else last.created_at,
                        cooldown=cooldown,
                        active=active,
                    )
                    if not allowed:
                        log.debug("policy %s on %s fires but %s", policy.name, group, why)
                        continue
                    decision = service.fire(
                        session, policy=policy, group=group, finding=firing, now=now
                    )
                    if decision is not None:
                        assert decision.id is not None
                        taken.append(decision.id)
                        log.info(
                            "retraining policy %s fired for group %s: decision %s (%s)",
                            policy.name,
                            group,
                            decision.id,
                            decision.status,
                        )
                policy.last_evaluated_at = now
                policy.last_error = None
                session.add(policy)
        except Exception as e:
            expected = isinstance(e, ServerError)  # what is wrong with the policy: no traceback
            log.warning(
                "retraining policy %s: evaluation failed: %s", policy_id, e, exc_info=not expected
            )
            try:
                with session_scope(engine) as session:
                    session.execute(
                        update(RetrainingPolicyRecord)
                        .where(col(RetrainingPolicyRecord.id) == policy_id)
                        .values(
                            last_evaluated_at=now,
                            last_error=f"{type(e).__name__}: {e}"[:_MAX_ERROR],
                        )
                    )
            except Exception:
                log.exception("retraining policy %s: cannot record its error", policy_id)
    return taken


def advance_decisions(engine: Engine, *, now: datetime) -> list[int]:
    """Carry every ``training`` decision whose run finished on; the ids that moved."""
    with Session(engine) as session:
        ids = session.exec(
            select(RetrainingDecisionRecord.id).where(
                RetrainingDecisionRecord.status == DecisionStatus.TRAINING.value
            )
        ).all()
    moved = []
    for decision_id in ids:
        assert decision_id is not None
        try:
            with session_scope(engine) as session:
                decision = service.get_decision(session, decision_id=decision_id)
                if service.advance(session, decision=decision, now=now):
                    moved.append(decision_id)
                    log.info(
                        "retraining decision %s: %s (%s)",
                        decision_id,
                        decision.status,
                        decision.status_reason,
                    )
        except Exception:
            log.exception("retraining decision %s: cannot carry it on", decision_id)
    return moved


class RetrainingStep:
    """One round of retraining work; give it to the evaluator as a step."""

    def __init__(self, engine: Engine, *, context: EvaluationContext) -> None:
        self._engine = engine
        self._context = context

    def __call__(self, now: datetime) -> None:
        evaluate_policies(self._engine, now=now, context=self._context)
        advance_decisions(self._engine, now=now)

    def __repr__(self) -> str:
        return "RetrainingStep()"
