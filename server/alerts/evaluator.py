"""The periodic evaluator: every rule, every ``interval`` seconds, on a thread of the server.

:func:`evaluate_rules` evaluates each enabled rule in a transaction of its own and
applies the findings (:func:`server.alerts.service.apply_findings`). An
:class:`AlertEvaluator` calls it on its thread, then any further *steps* it was given
(the retraining policies, :mod:`server.retraining.engine`), and wakes the webhook
sender when something opened or resolved.

What always holds:

- One rule's failure -- its group deleted, stored counts that do not fit its model's
  reference, a database error -- is recorded in that rule's ``last_error`` and logged;
  the other rules and the next round go on. Nothing a rule does stops the thread.
- ``now`` comes from the injected clock, once per round: every rule in a round is
  judged at the same moment.
- Several servers may each run an evaluator: the tables' constraints keep alerts and
  deliveries single (see :mod:`server.alerts.models`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from datetime import datetime

import httpx
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from server.alerts.evaluate import EvaluationContext, evaluate_condition
from server.alerts.models import AlertRuleRecord
from server.alerts.service import Changes, apply_findings, rule_condition
from server.alerts.webhook import WebhookPolicy, WebhookSender
from server.db import session_scope
from server.errors import ServerError

__all__ = ["AlertEvaluator", "Step", "evaluate_rules"]

log = logging.getLogger(__name__)

Step = Callable[[datetime], None]
"""More work for each round, given the round's ``now`` (e.g. retraining policies)."""

_MAX_ERROR = 2000


def _record_error(engine: Engine, rule_id: int, now: datetime, error: str) -> None:
    with session_scope(engine) as session:
        session.execute(
            update(AlertRuleRecord)
            .where(col(AlertRuleRecord.id) == rule_id)
            .values(last_evaluated_at=now, last_error=error[:_MAX_ERROR])
        )


def evaluate_rules(
    engine: Engine, *, now: datetime, context: EvaluationContext
) -> dict[str, Changes]:
    """Evaluate every enabled rule at ``now``; what changed, per rule name."""
    with Session(engine) as session:
        rule_ids = session.exec(
            select(AlertRuleRecord.id)
            .where(AlertRuleRecord.enabled == True)  # noqa: E712  (SQL, not Python)
            .order_by(col(AlertRuleRecord.id))
        ).all()
    changes: dict[str, Changes] = {}
    for rule_id in rule_ids:
        assert rule_id is not None
        try:
            with session_scope(engine) as session:
                rule = session.get(AlertRuleRecord, rule_id)
                if rule is None or not rule.enabled:
                    continue  # deleted or disabled since the list was read
                findings = evaluate_condition(
                    session,
                    condition=rule_condition(rule),
                    model_name=rule.model_name,
                    group=rule.group_name,
                    now=now,
                    context=context,
                )
                changes[rule.name] = apply_findings(session, rule=rule, findings=findings, now=now)
                rule.last_evaluated_at = now
                rule.last_error = None
                session.add(rule)
        except Exception as e:
            # A ServerError says what is wrong with the rule (a deleted group, ...); anything
            # else is a fault of ours and gets its traceback.
            expected = isinstance(e, ServerError)
            log.warning("alert rule %s: evaluation failed: %s", rule_id, e, exc_info=not expected)
            try:
                _record_error(engine, rule_id, now, f"{type(e).__name__}: {e}")
            except Exception:
                log.exception("alert rule %s: cannot record its error", rule_id)
    return changes


class AlertEvaluator:
    """Evaluates the rules (and the further ``steps``) every ``interval`` seconds, and sends
    webhooks on a second thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        context: EvaluationContext,
        clock: Callable[[], datetime],
        interval: float = 60.0,
        webhook: WebhookPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        steps: Sequence[Step] = (),
    ) -> None:
        self._engine = engine
        self._context = context
        self._clock = clock
        self._interval = interval
        self._steps = list(steps)
        self.sender = WebhookSender(
            engine, policy=webhook or WebhookPolicy(), clock=clock, transport=transport
        )
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0
        """Rounds completed (for tests and health checks)."""

    def start(self) -> None:
        self.sender.start()
        self._thread = threading.Thread(target=self._loop, name="alert-evaluator", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Evaluate now rather than at the end of the interval (a rule was added or changed)."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.sender.stop()

    def run_once(self) -> dict[str, Changes]:
        """One round: every rule, then every step, at one ``now``."""
        now = self._clock()
        changes = evaluate_rules(self._engine, now=now, context=self._context)
        for step in self._steps:
            try:
                step(now)
            except Exception:
                log.exception("alert evaluator: step %r failed", step)
        if any(c.opened or c.resolved for c in changes.values()):
            self.sender.wake()
        self.rounds += 1
        return changes

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.run_once()
            except Exception:  # the database away for a moment: try again next round
                log.exception("alert evaluator: a round failed")
            self._wake.wait(self._interval)
            self._wake.clear()
