"""Alert rules and alerts over HTTP, for the dashboard and ``edgefleet alerts``.

``/alert-rules``: create, list, show, change (``PATCH``) and delete rules -- a condition
(``latency_p95``, ``error_rate``, ``drift``, ``accuracy``, ``offline``; see
:mod:`server.alerts.rules`) over a model and/or a group, a severity and an optional
webhook. ``/alerts``: the alerts the rules opened, filtered by status, rule, kind,
model, group, severity and time; one alert with its evidence (when it opened and at
the latest evaluation) and its webhook deliveries.

A rule is judged by the server's evaluator every ``EDGEFLEET_ALERT_INTERVAL_SECONDS``
(at once after it is created or changed). Webhook URLs are shown without their path
and query: they often carry a secret. An unknown rule, alert, model or group answers
404; a taken rule name 409; a rule that cannot work 422 naming the field.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from server.alerts import service
from server.alerts.models import AlertDeliveryRecord, AlertRecord, AlertRuleRecord
from server.alerts.rules import Condition, ConditionKind, Severity
from server.api.deps import NowDep, SessionDep
from server.drift.timerange import parse_instant

__all__ = [
    "AlertDetail",
    "AlertPublic",
    "AlertRuleCreate",
    "AlertRulePublic",
    "AlertRuleUpdate",
    "DeliveryPublic",
    "router",
    "rules_router",
]

rules_router = APIRouter(prefix="/alert-rules", tags=["alerts"])
router = APIRouter(prefix="/alerts", tags=["alerts"])


class AlertRuleCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=service.NAME_PATTERN, description="unique; letters, digits, ._-")
    model: str | None = Field(
        None, max_length=128, description="the model watched (every kind but offline)"
    )
    group: str | None = Field(None, max_length=64, description="a device group; default the fleet")
    condition: Condition
    severity: Severity = Severity.WARNING
    webhook_url: str | None = Field(
        None, max_length=2000, description="POSTed JSON when an alert opens or resolves"
    )
    description: str = Field("", max_length=2000)
    enabled: bool = True


class AlertRuleUpdate(BaseModel):
    """Fields to change; ``"webhook_url": null`` removes the webhook."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    severity: Severity | None = None
    webhook_url: str | None = Field(None, max_length=2000)
    description: str | None = Field(None, max_length=2000)
    condition: Condition | None = Field(
        None, description="a new condition of the same kind (open alerts resolve)"
    )


class AlertRulePublic(BaseModel):
    name: str
    kind: ConditionKind
    model: str | None
    group: str | None
    condition: dict[str, Any]
    severity: Severity
    enabled: bool
    webhook: str | None = Field(description="the webhook's scheme and host (the rest is hidden)")
    description: str
    open_alerts: int
    created_at: datetime
    updated_at: datetime
    last_evaluated_at: datetime | None
    last_error: str | None = Field(description="why the last evaluation failed, if it did")


class AlertPublic(BaseModel):
    id: int
    rule: str
    kind: ConditionKind
    severity: Severity
    subject: str = Field(description="what fired: a model version in a group, or a group")
    model: str | None
    version: int | None
    group: str | None
    status: Literal["open", "resolved"]
    opened_at: datetime
    resolved_at: datetime | None
    last_evaluated_at: datetime
    value: float | None = Field(description="the figure compared with the threshold")
    threshold: float | None
    summary: str
    resolution: str | None


class DeliveryPublic(BaseModel):
    id: int
    event: Literal["opened", "resolved"]
    webhook: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: datetime
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class AlertDetail(AlertPublic):
    evidence: dict[str, Any] = Field(description="what the condition showed when it opened")
    latest: dict[str, Any] = Field(description="the latest evaluation (the resolving one)")
    deliveries: list[DeliveryPublic]


def _redact(url: str | None) -> str | None:
    if url is None:
        return None
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = f":{parsed.port}" if parsed.port else ""
    hidden = "/…" if (parsed.path not in ("", "/") or parsed.query) else ""
    return f"{parsed.scheme}://{host}{port}{hidden}"


def _rule_public(rule: AlertRuleRecord, open_alerts: int) -> AlertRulePublic:
    return AlertRulePublic(
        name=rule.name,
        kind=ConditionKind(rule.kind),
        model=rule.model_name,
        group=rule.group_name,
        condition=json.loads(rule.condition_json),
        severity=Severity(rule.severity),
        enabled=rule.enabled,
        webhook=_redact(rule.webhook_url),
        description=rule.description,
        open_alerts=open_alerts,
        created_at=rule.created_at,
        updated_at=rule.updated_at,
        last_evaluated_at=rule.last_evaluated_at,
        last_error=rule.last_error,
    )


def _alert_public(alert: AlertRecord) -> dict[str, Any]:
    assert alert.id is not None
    return {
        "id": alert.id,
        "rule": alert.rule_name,
        "kind": alert.kind,
        "severity": alert.severity,
        "subject": alert.subject,
        "model": alert.model_name,
        "version": alert.model_version,
        "group": alert.group_name,
        "status": alert.status,
        "opened_at": alert.opened_at,
        "resolved_at": alert.resolved_at,
        "last_evaluated_at": alert.last_evaluated_at,
        "value": alert.value,
        "threshold": alert.threshold,
        "summary": alert.summary,
        "resolution": alert.resolution,
    }


def _delivery_public(d: AlertDeliveryRecord) -> DeliveryPublic:
    assert d.id is not None
    return DeliveryPublic(
        id=d.id,
        event=d.event,  # type: ignore[arg-type]
        webhook=_redact(d.url) or "",
        status=d.status,  # type: ignore[arg-type]
        attempts=d.attempts,
        next_attempt_at=d.next_attempt_at,
        last_status_code=d.last_status_code,
        last_error=d.last_error,
        created_at=d.created_at,
        delivered_at=d.delivered_at,
    )


def _wake(request: Request) -> None:
    evaluator = getattr(request.app.state, "alert_evaluator", None)
    if evaluator is not None:
        evaluator.wake()


# ----------------------------------------------------------------------------- rules


@rules_router.post(
    "",
    response_model=AlertRulePublic,
    status_code=status.HTTP_201_CREATED,
    summary="Create an alert rule",
    responses={
        404: {"description": "unknown model or group"},
        409: {"description": "a rule of that name exists"},
        422: {"description": "a rule that cannot work (the field is named)"},
    },
)
def create_rule(
    body: AlertRuleCreate, session: SessionDep, now: NowDep, request: Request
) -> AlertRulePublic:
    rule = service.create_rule(
        session,
        name=body.name,
        condition=body.condition,
        model_name=body.model,
        group=body.group,
        now=now,
        severity=body.severity,
        webhook_url=body.webhook_url,
        description=body.description,
        enabled=body.enabled,
    )
    session.commit()
    _wake(request)
    return _rule_public(rule, 0)


@rules_router.get("", response_model=list[AlertRulePublic], summary="Alert rules, by name")
def list_rules(
    session: SessionDep,
    kind: ConditionKind | None = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    group: Annotated[str | None, Query(max_length=64)] = None,
    enabled: bool | None = None,
) -> list[AlertRulePublic]:
    counts = service.open_counts(session)
    rules = service.list_rules(
        session,
        kind=None if kind is None else kind.value,
        model_name=model,
        group=group,
        enabled=enabled,
    )
    return [_rule_public(r, counts.get(r.id or 0, 0)) for r in rules]


@rules_router.get("/{name}", response_model=AlertRulePublic, summary="One alert rule")
def show_rule(name: str, session: SessionDep) -> AlertRulePublic:
    rule = service.get_rule(session, name=name)
    return _rule_public(rule, service.open_counts(session).get(rule.id or 0, 0))


@rules_router.patch(
    "/{name}",
    response_model=AlertRulePublic,
    summary="Change a rule (disabling it, or changing its condition, resolves its open alerts)",
)
def update_rule(
    name: str, body: AlertRuleUpdate, session: SessionDep, now: NowDep, request: Request
) -> AlertRulePublic:
    changes: dict[str, Any] = {
        key: getattr(body, key)
        for key in ("enabled", "severity", "description", "condition")
        if getattr(body, key) is not None
    }
    if "webhook_url" in body.model_fields_set:
        changes["webhook_url"] = body.webhook_url
    rule = service.update_rule(session, name=name, now=now, **changes)
    session.commit()
    _wake(request)
    return _rule_public(rule, service.open_counts(session).get(rule.id or 0, 0))


@rules_router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a rule (its alerts stay, resolved)",
)
def delete_rule(name: str, session: SessionDep, now: NowDep) -> Response:
    service.delete_rule(session, name=name, now=now)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ----------------------------------------------------------------------------- alerts


@router.get("", response_model=list[AlertPublic], summary="Alerts, newest first")
def list_alerts(
    session: SessionDep,
    now: NowDep,
    status_: Annotated[Literal["open", "resolved"] | None, Query(alias="status")] = None,
    rule: Annotated[str | None, Query(max_length=64)] = None,
    kind: ConditionKind | None = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    group: Annotated[str | None, Query(max_length=64)] = None,
    severity: Severity | None = None,
    since: Annotated[
        str | None,
        Query(
            max_length=64,
            description="alerts open at some time since: a duration ago (24h, 7d) or ISO 8601",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AlertPublic]:
    start = None if since is None else parse_instant(since, now=now, name="since")
    alerts = service.list_alerts(
        session,
        status=status_,
        rule=rule,
        kind=None if kind is None else kind.value,
        model_name=model,
        group=group,
        severity=None if severity is None else severity.value,
        since=start,
        limit=limit,
    )
    return [AlertPublic(**_alert_public(a)) for a in alerts]


@router.get(
    "/{alert_id}",
    response_model=AlertDetail,
    summary="One alert: its evidence, its latest evaluation, its webhook deliveries",
)
def show_alert(alert_id: int, session: SessionDep) -> AlertDetail:
    alert = service.get_alert(session, alert_id=alert_id)
    return AlertDetail(
        **_alert_public(alert),
        evidence=json.loads(alert.evidence_json or "{}"),
        latest=json.loads(alert.latest_json or "{}"),
        deliveries=[_delivery_public(d) for d in service.deliveries_of(session, alert_id=alert_id)],
    )
