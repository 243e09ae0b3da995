"""Alert rules and alerts in the database: keyword-only functions on a session.

- **Rules** -- :func:`create_rule`, :func:`get_rule`, :func:`list_rules`,
  :func:`update_rule`, :func:`delete_rule`.
- **Alerts** -- :func:`list_alerts`, :func:`get_alert`, :func:`deliveries_of`, and
  :func:`apply_findings`, which turns one evaluation of a rule into opened, updated
  and resolved alerts (the decision itself is :func:`server.alerts.conditions.transition`).

What always holds:

- A rule's scope fits its condition: an offline rule watches a group's (or the fleet's)
  devices and names no model; every other kind names a model. The model and the group
  exist when the rule is created (404 otherwise); a group deleted later makes the
  rule's evaluation fail with that reason in ``last_error``, not the evaluator.
- One open alert per rule and subject (see :mod:`server.alerts.models`); an alert
  that opens or resolves queues one webhook delivery when its rule has a webhook,
  in the same transaction, so a notification is never lost nor invented.
- Disabling a rule, changing its condition or scope, or deleting it resolves its
  open alerts, saying why: they would otherwise never be judged again.

Functions flush but never commit; the caller commits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import func, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from server import __version__, registry
from server.alerts.conditions import Action, transition
from server.alerts.errors import (
    AlertNotFoundError,
    RuleConflictError,
    RuleInvalidError,
    RuleNotFoundError,
)
from server.alerts.evaluate import Finding
from server.alerts.models import AlertDeliveryRecord, AlertRecord, AlertRuleRecord
from server.alerts.rules import AnyCondition, OfflineCondition, Severity, parse_condition
from server.fleet.groups import get_group

__all__ = [
    "NAME_PATTERN",
    "Changes",
    "alert_payload",
    "apply_findings",
    "create_rule",
    "delete_rule",
    "deliveries_of",
    "get_alert",
    "get_rule",
    "list_alerts",
    "list_rules",
    "open_counts",
    "rule_condition",
    "update_rule",
]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
OPEN, RESOLVED = "open", "resolved"
_UNSET: Any = object()


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise RuleInvalidError(
            f"rule name {name!r}: 1 to 64 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )


def _check_webhook(url: str | None) -> None:
    if url is None:
        return
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or len(url) > 2000:
        raise RuleInvalidError(f"webhook_url {url!r}: use an http:// or https:// URL with a host")


def _check_scope(
    session: Session, condition: AnyCondition, model_name: str | None, group: str | None
) -> None:
    if isinstance(condition, OfflineCondition):
        if model_name is not None:
            raise RuleInvalidError(
                "an offline rule watches a group's devices (or the fleet's); it takes no model"
            )
    elif model_name is None:
        raise RuleInvalidError(f"a {condition.kind} rule needs a model")
    else:
        registry.get_model(session, name=model_name)
    if group is not None:
        get_group(session, name=group)


# ----------------------------------------------------------------------------- rules


def rule_condition(rule: AlertRuleRecord) -> AnyCondition:
    return parse_condition(rule.condition_json)


def create_rule(
    session: Session,
    *,
    name: str,
    condition: AnyCondition,
    model_name: str | None,
    group: str | None,
    now: datetime,
    severity: Severity = Severity.WARNING,
    webhook_url: str | None = None,
    description: str = "",
    enabled: bool = True,
) -> AlertRuleRecord:
    _check_name(name)
    _check_webhook(webhook_url)
    _check_scope(session, condition, model_name, group)
    if session.exec(select(AlertRuleRecord).where(AlertRuleRecord.name == name)).first():
        raise RuleConflictError(f"an alert rule named {name!r} exists already")
    rule = AlertRuleRecord(
        name=name,
        kind=condition.kind,
        model_name=model_name,
        group_name=group,
        condition_json=condition.model_dump_json(),
        severity=Severity(severity).value,
        enabled=enabled,
        webhook_url=webhook_url,
        description=description,
        created_at=now,
        updated_at=now,
    )
    session.add(rule)
    try:
        session.flush()
    except IntegrityError as e:
        session.rollback()
        raise RuleConflictError(f"an alert rule named {name!r} exists already") from e
    return rule


def get_rule(session: Session, *, name: str) -> AlertRuleRecord:
    rule = session.exec(select(AlertRuleRecord).where(AlertRuleRecord.name == name)).first()
    if rule is None:
        raise RuleNotFoundError(f"no alert rule named {name!r}")
    return rule


def list_rules(
    session: Session,
    *,
    kind: str | None = None,
    model_name: str | None = None,
    group: str | None = None,
    enabled: bool | None = None,
) -> list[AlertRuleRecord]:
    query = select(AlertRuleRecord).order_by(col(AlertRuleRecord.name))
    if kind is not None:
        query = query.where(AlertRuleRecord.kind == kind)
    if model_name is not None:
        query = query.where(AlertRuleRecord.model_name == model_name)
    if group is not None:
        query = query.where(AlertRuleRecord.group_name == group)
    if enabled is not None:
        query = query.where(AlertRuleRecord.enabled == enabled)
    return list(session.exec(query))


def update_rule(
    session: Session,
    *,
    name: str,
    now: datetime,
    enabled: bool | None = None,
    severity: Severity | None = None,
    webhook_url: str | None = _UNSET,
    description: str | None = None,
    condition: AnyCondition | None = None,
) -> AlertRuleRecord:
    """Change what is given; ``webhook_url=None`` removes the webhook."""
    rule = get_rule(session, name=name)
    reasons = []
    if condition is not None:
        if condition.kind != rule.kind:
            raise RuleInvalidError(
                f"rule {name!r} is a {rule.kind} rule; a {condition.kind} condition needs a "
                "rule of its own"
            )
        _check_scope(session, condition, rule.model_name, rule.group_name)
        if condition.model_dump_json() != rule.condition_json:
            rule.condition_json = condition.model_dump_json()
            reasons.append("the rule's condition changed")
    if webhook_url is not _UNSET:
        _check_webhook(webhook_url)
        rule.webhook_url = webhook_url
    if severity is not None:
        rule.severity = Severity(severity).value
    if description is not None:
        rule.description = description
    if enabled is not None and enabled != rule.enabled:
        rule.enabled = enabled
        if not enabled:
            reasons.append("the rule was disabled")
    rule.updated_at = now
    session.add(rule)
    session.flush()
    if reasons:
        _resolve_all(session, rule=rule, now=now, reason="; ".join(reasons))
    return rule


def delete_rule(session: Session, *, name: str, now: datetime) -> None:
    """Delete a rule; its alerts stay (resolved), with the rule's name."""
    rule = get_rule(session, name=name)
    _resolve_all(session, rule=rule, now=now, reason="the rule was deleted")
    session.execute(
        update(AlertRecord).where(col(AlertRecord.rule_id) == rule.id).values(rule_id=None)
    )
    session.delete(rule)
    session.flush()


# ----------------------------------------------------------------------------- alerts


def list_alerts(
    session: Session,
    *,
    status: str | None = None,
    rule: str | None = None,
    kind: str | None = None,
    model_name: str | None = None,
    group: str | None = None,
    severity: str | None = None,
    since: datetime | None = None,
    limit: int = 100,
) -> list[AlertRecord]:
    """Newest first; ``since``: opened at or after, or still open then."""
    query = select(AlertRecord).order_by(
        col(AlertRecord.opened_at).desc(), col(AlertRecord.id).desc()
    )
    for column, value in (
        (AlertRecord.status, status),
        (AlertRecord.rule_name, rule),
        (AlertRecord.kind, kind),
        (AlertRecord.model_name, model_name),
        (AlertRecord.group_name, group),
        (AlertRecord.severity, severity),
    ):
        if value is not None:
            query = query.where(column == value)
    if since is not None:
        query = query.where(
            (col(AlertRecord.opened_at) >= since)
            | col(AlertRecord.resolved_at).is_(None)
            | (col(AlertRecord.resolved_at) >= since)
        )
    return list(session.exec(query.limit(limit)))


def open_counts(session: Session) -> dict[int, int]:
    """Rule id -> its open alerts."""
    rows = session.execute(
        select(AlertRecord.rule_id, func.count())
        .where(AlertRecord.status == OPEN, col(AlertRecord.rule_id).is_not(None))
        .group_by(col(AlertRecord.rule_id))
    )
    return {int(rule_id): int(count) for rule_id, count in rows}


def get_alert(session: Session, *, alert_id: int) -> AlertRecord:
    alert = session.get(AlertRecord, alert_id)
    if alert is None:
        raise AlertNotFoundError(f"no alert {alert_id}")
    return alert


def deliveries_of(session: Session, *, alert_id: int) -> list[AlertDeliveryRecord]:
    return list(
        session.exec(
            select(AlertDeliveryRecord)
            .where(AlertDeliveryRecord.alert_id == alert_id)
            .order_by(col(AlertDeliveryRecord.id))
        )
    )


def alert_payload(alert: AlertRecord, event: str) -> dict[str, Any]:
    """What a webhook receives (and ``GET /alerts/{id}`` shows of the alert)."""
    return {
        "event": f"alert.{event}",
        "sent_by": f"edgefleet {__version__}",
        "alert": {
            "id": alert.id,
            "rule": alert.rule_name,
            "kind": alert.kind,
            "severity": alert.severity,
            "subject": alert.subject,
            "model": alert.model_name,
            "version": alert.model_version,
            "group": alert.group_name,
            "status": alert.status,
            "opened_at": alert.opened_at.isoformat(),
            "resolved_at": None if alert.resolved_at is None else alert.resolved_at.isoformat(),
            "value": alert.value,
            "threshold": alert.threshold,
            "summary": alert.summary,
            "resolution": alert.resolution,
            "evidence": json.loads(alert.evidence_json or "{}"),
        },
    }


def _queue(
    session: Session, *, rule_webhook: str | None, alert: AlertRecord, event: str, now: datetime
) -> None:
    if rule_webhook is None:
        return
    assert alert.id is not None
    session.add(
        AlertDeliveryRecord(
            alert_id=alert.id,
            event=event,
            url=rule_webhook,
            payload_json=_json(alert_payload(alert, event)),
            next_attempt_at=now,
            created_at=now,
        )
    )


def _latest(finding: Finding, now: datetime) -> str:
    return _json(
        {
            "evaluated_at": now.isoformat(),
            "verdict": finding.verdict.value,
            "value": finding.value,
            "threshold": finding.threshold,
            "summary": finding.summary,
            **finding.evidence,
        }
    )


def _resolve(
    session: Session,
    *,
    alert: AlertRecord,
    now: datetime,
    reason: str,
    latest: str | None,
    webhook: str | None,
) -> bool:
    """Resolve ``alert`` if it is still open; True when this call resolved it."""
    values: dict[str, Any] = {
        "status": RESOLVED,
        "open_key": None,
        "resolved_at": now,
        "last_evaluated_at": now,
        "resolution": reason,
    }
    if latest is not None:
        values["latest_json"] = latest
    result = session.execute(
        update(AlertRecord)
        .where(col(AlertRecord.id) == alert.id, col(AlertRecord.status) == OPEN)
        .values(**values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    session.refresh(alert)
    _queue(session, rule_webhook=webhook, alert=alert, event="resolved", now=now)
    return True


def _resolve_all(session: Session, *, rule: AlertRuleRecord, now: datetime, reason: str) -> None:
    for alert in session.exec(
        select(AlertRecord).where(AlertRecord.rule_id == rule.id, AlertRecord.status == OPEN)
    ).all():
        _resolve(
            session, alert=alert, now=now, reason=reason, latest=None, webhook=rule.webhook_url
        )


@dataclass
class Changes:
    """What one evaluation of a rule did (alert ids)."""

    opened: list[int] = field(default_factory=list)
    updated: list[int] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)


def apply_findings(
    session: Session,
    *,
    rule: AlertRuleRecord,
    findings: Sequence[Finding],
    now: datetime,
) -> Changes:
    """Open, update and resolve the rule's alerts as one evaluation's findings say.

    An open alert whose subject has no finding (it reported nothing in the windows
    looked at) is resolved: there is nothing left that fires.
    """
    assert rule.id is not None
    changes = Changes()
    open_alerts = {
        a.subject: a
        for a in session.exec(
            select(AlertRecord).where(AlertRecord.rule_id == rule.id, AlertRecord.status == OPEN)
        ).all()
    }
    for finding in findings:
        current = open_alerts.pop(finding.subject, None)
        action = transition(current is not None, finding.verdict)
        latest = _latest(finding, now)
        if action is Action.OPEN:
            opened = _open(session, rule=rule, finding=finding, now=now, latest=latest)
            if opened is not None:
                assert opened.id is not None
                changes.opened.append(opened.id)
        elif action is Action.UPDATE and current is not None:
            session.execute(
                update(AlertRecord)
                .where(col(AlertRecord.id) == current.id, col(AlertRecord.status) == OPEN)
                .values(
                    last_evaluated_at=now,
                    latest_json=latest,
                    value=finding.value if finding.value is not None else current.value,
                    summary=finding.summary or current.summary,
                )
            )
            assert current.id is not None
            changes.updated.append(current.id)
        elif action is Action.RESOLVE and current is not None:
            reason = f"the condition cleared: {finding.summary}"
            if _resolve(
                session,
                alert=current,
                now=now,
                reason=reason,
                latest=latest,
                webhook=rule.webhook_url,
            ):
                assert current.id is not None
                changes.resolved.append(current.id)
    for subject, alert in open_alerts.items():
        reason = f"no data from {subject} in the windows looked at"
        if _resolve(
            session, alert=alert, now=now, reason=reason, latest=None, webhook=rule.webhook_url
        ):
            assert alert.id is not None
            changes.resolved.append(alert.id)
    session.flush()
    return changes


def _open(
    session: Session, *, rule: AlertRuleRecord, finding: Finding, now: datetime, latest: str
) -> AlertRecord | None:
    """A new open alert; None when another evaluator opened it first."""
    alert = AlertRecord(
        rule_id=rule.id,
        rule_name=rule.name,
        kind=rule.kind,
        severity=rule.severity,
        subject=finding.subject,
        open_key=finding.subject,
        model_name=rule.model_name,
        model_version=finding.model_version,
        group_name=rule.group_name,
        status=OPEN,
        opened_at=now,
        last_evaluated_at=now,
        value=finding.value,
        threshold=finding.threshold,
        summary=finding.summary,
        evidence_json=_json(finding.evidence),
        latest_json=latest,
    )
    savepoint = session.begin_nested()
    try:
        session.add(alert)
        session.flush()
    except IntegrityError:
        savepoint.rollback()
        return None
    savepoint.commit()
    _queue(session, rule_webhook=rule.webhook_url, alert=alert, event="opened", now=now)
    return alert
