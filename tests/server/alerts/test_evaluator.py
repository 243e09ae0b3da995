"""Rules evaluated on what ingestion stored: alerts open with their evidence, stay single,
and resolve by themselves when the condition clears -- on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.alerts import service
from server.alerts.evaluator import evaluate_rules
from server.alerts.models import AlertRecord, AlertRuleRecord
from server.alerts.rules import (
    AccuracyCondition,
    AnyCondition,
    DriftCondition,
    ErrorRateCondition,
    LatencyCondition,
    OfflineCondition,
)
from server.db import session_scope
from server.feedback.service import FeedbackInput, record_feedback
from server.fleet.groups import delete_group, get_group
from server.fleet.models import Device
from tests.server.alerts.conftest import (
    CANARY,
    CONTROL,
    DRIFTED_FEATURE,
    MODEL,
    Fleet,
    at,
    make_fleet,
)

pytestmark = pytest.mark.database

SHIFT = {DRIFTED_FEATURE: 2.0}


@pytest.fixture
def fleet(engine: Engine, tmp_path: Path) -> Fleet:
    return make_fleet(engine, tmp_path)


def add_rule(
    fleet: Fleet,
    name: str,
    condition: AnyCondition,
    *,
    model: str | None = MODEL,
    group: str | None = None,
    webhook: str | None = None,
) -> None:
    with session_scope(fleet.engine) as session:
        service.create_rule(
            session,
            name=name,
            condition=condition,
            model_name=model,
            group=group,
            now=at(0),
            webhook_url=webhook,
        )


def alerts(fleet: Fleet, rule: str | None = None) -> list[AlertRecord]:
    with Session(fleet.engine) as session:
        return service.list_alerts(session, rule=rule, limit=1000)


def evaluate(fleet: Fleet, hours: float) -> dict[str, Any]:
    return evaluate_rules(fleet.engine, now=at(hours), context=fleet.context)


def test_a_drift_alert_opens_once_with_its_evidence_and_resolves_when_drift_ends(
    fleet: Fleet,
) -> None:
    drift = DriftCondition(windows=3, min_samples=200, min_device_share=0.5)
    add_rule(fleet, "canary-drift", drift, group="canary")
    add_rule(fleet, "control-drift", drift, group="control")
    for hour in range(3):
        fleet.hour(hour, CANARY, shift=SHIFT)
        fleet.hour(hour, CONTROL)

    assert evaluate(fleet, 1.5)["canary-drift"].opened == []  # two drifted hours, three needed
    changes = evaluate(fleet, 2.5)
    assert len(changes["canary-drift"].opened) == 1 and changes["control-drift"].opened == []
    (alert,) = alerts(fleet)
    assert alert.status == "open" and alert.rule_name == "canary-drift"
    assert alert.subject == "sensor v1 in group canary" and alert.model_version == 1
    assert alert.value == 1.0 and alert.threshold == 0.5
    evidence = json.loads(alert.evidence_json)
    assert [w["start"][11:13] for w in evidence["windows"]] == ["02", "01", "00"]
    assert {w["verdict"] for w in evidence["windows"]} == {"firing"}
    assert {d["device_id"] for d in evidence["devices"]} == set(CANARY)
    assert {d["feature"] for d in evidence["devices"]} == {DRIFTED_FEATURE}
    assert all(d["value"] >= 0.25 for d in evidence["devices"])
    assert evidence["features"] == [DRIFTED_FEATURE]
    assert evidence["windows"][0]["in_scope"] == 3 and evidence["windows"][0]["evaluated"] == 3

    # evaluated again -- and at the next hour before it has data -- it stays one alert
    assert evaluate(fleet, 2.75)["canary-drift"].updated == [alert.id]
    assert evaluate(fleet, 3.05)["canary-drift"].updated == [alert.id]
    assert len(alerts(fleet)) == 1

    fleet.hour(3, CANARY)  # healthy telemetry again
    changes = evaluate(fleet, 3.5)
    assert changes["canary-drift"].resolved == [alert.id]
    (resolved,) = alerts(fleet)
    assert resolved.status == "resolved" and resolved.open_key is None
    assert resolved.resolved_at == at(3.5)
    assert resolved.resolution is not None
    assert resolved.resolution.startswith("the condition cleared: 0 of 3 device(s) (0%)")
    latest = json.loads(resolved.latest_json)
    assert latest["verdict"] == "ok" and latest["windows"][0]["start"][11:13] == "03"
    assert json.loads(resolved.evidence_json) == evidence  # the opening evidence is kept

    # drift again later: a new alert, the old one stays resolved
    for hour in (4, 5, 6):
        fleet.hour(hour, CANARY, shift=SHIFT)
    assert len(evaluate(fleet, 6.5)["canary-drift"].opened) == 1
    assert [a.status for a in alerts(fleet)] == ["open", "resolved"]


def test_latency_above_the_profiles_sla_opens_and_clears(fleet: Fleet) -> None:
    add_rule(fleet, "slow", LatencyCondition(min_inferences=100), group="canary")
    fleet.hour(0, CANARY, latency_ms=60.0)  # edge-x86_64-litert's SLA is 20 ms
    changes = evaluate(fleet, 0.5)
    assert len(changes["slow"].opened) == 1
    (alert,) = alerts(fleet)
    assert alert.threshold == 20.0 and alert.value is not None and alert.value > 20.0
    profiles = json.loads(alert.evidence_json)["windows"][0]["profiles"]
    assert profiles == [
        {
            "profile": "edge-x86_64-litert",
            "devices": 3,
            "inferences": 1800,
            "p95_ms": alert.value,
            "p95_over_largest_bucket": False,
            "limit_ms": 20.0,
            "judged": True,
        }
    ]
    fleet.hour(1, CANARY, latency_ms=5.0)
    assert evaluate(fleet, 1.5)["slow"].resolved == [alert.id]


def test_error_rate(fleet: Fleet) -> None:
    add_rule(fleet, "errors", ErrorRateCondition(max_error_rate=0.05))
    fleet.hour(0, CANARY + CONTROL, errors=30)  # 30 / 330 per report: 9 %
    evaluate(fleet, 0.5)
    (alert,) = alerts(fleet)
    assert alert.subject == "sensor v1 in the fleet"
    assert alert.value == pytest.approx(30 / 330)
    assert json.loads(alert.evidence_json)["windows"][0]["errors"] == 360
    fleet.hour(1, CANARY + CONTROL, errors=1)
    assert evaluate(fleet, 1.5)["errors"].resolved == [alert.id]


def test_accuracy_from_labelled_feedback(fleet: Fleet) -> None:
    add_rule(fleet, "accuracy", AccuracyCondition(min_accuracy=0.9, min_labels=20, window_hours=1))
    fleet.hour(0, CANARY)  # the version reports, so it is a subject
    labels = [
        FeedbackInput(
            device_id=CANARY[i % 3],
            prediction_id=f"p{i}",
            model_name=MODEL,
            model_version=1,
            predicted_label="a",
            true_label="a" if i % 10 < 7 else "b",  # 70 % right
            labelled_at=at(0.4),
            predicted_at=at(0.2),
        )
        for i in range(40)
    ]
    with session_scope(fleet.engine) as session:
        record_feedback(session, labels, now=at(0.4))
    evaluate(fleet, 0.5)
    (alert,) = alerts(fleet)
    assert alert.value == pytest.approx(0.7) and alert.threshold == 0.9
    assert json.loads(alert.evidence_json)["windows"][0]["labelled"] == 40


def test_devices_offline_longer_than_the_limit(fleet: Fleet) -> None:
    add_rule(
        fleet,
        "offline",
        OfflineCondition(offline_for=timedelta(minutes=30)),
        model=None,
        group="control",
    )
    with session_scope(fleet.engine) as session:
        for device_id in CANARY + CONTROL:
            device = session.get(Device, device_id)
            assert device is not None
            device.online = device_id != CONTROL[0]
            device.last_seen = at(0)
            session.add(device)
    assert evaluate(fleet, 0.25)["offline"].opened == []  # offline, but for 15 minutes only
    evaluate(fleet, 1)
    (alert,) = alerts(fleet)
    assert alert.subject == "group control" and alert.model_name is None
    offline = json.loads(alert.evidence_json)["devices"]
    assert offline == [
        {"device_id": CONTROL[0], "last_seen": at(0).isoformat(), "offline_seconds": 3600}
    ]
    with session_scope(fleet.engine) as session:
        device = session.get(Device, CONTROL[0])
        assert device is not None
        device.online = True
        session.add(device)
    assert evaluate(fleet, 1.1)["offline"].resolved == [alert.id]


def test_a_version_that_stops_reporting_resolves_its_alert(fleet: Fleet) -> None:
    add_rule(fleet, "errors", ErrorRateCondition(max_error_rate=0.05), group="canary")
    fleet.hour(0, CANARY, errors=50)
    evaluate(fleet, 0.5)
    (alert,) = alerts(fleet)
    assert evaluate(fleet, 3.5)["errors"].resolved == [alert.id]  # nothing for hours
    with Session(fleet.engine) as session:
        found = service.get_alert(session, alert_id=alert.id or 0)
    assert found.resolution == "no data from sensor v1 in group canary in the windows looked at"


def test_a_failing_rule_records_why_and_the_others_go_on(fleet: Fleet) -> None:
    add_rule(fleet, "gone", ErrorRateCondition(max_error_rate=0.05), group="control")
    add_rule(fleet, "fleet", ErrorRateCondition(max_error_rate=0.05))
    with session_scope(fleet.engine) as session:
        delete_group(session, group=get_group(session, name="control"))
    fleet.hour(0, CANARY, errors=50)
    changes = evaluate(fleet, 0.5)
    assert "gone" not in changes and len(changes["fleet"].opened) == 1
    with Session(fleet.engine) as session:
        rule = service.get_rule(session, name="gone")
    assert rule.last_error == "NotFoundError: no device group named 'control'"
    assert rule.last_evaluated_at == at(0.5)


def test_disabling_or_changing_a_rule_resolves_its_open_alerts(fleet: Fleet) -> None:
    add_rule(fleet, "errors", ErrorRateCondition(max_error_rate=0.05))
    fleet.hour(0, CANARY, errors=50)
    evaluate(fleet, 0.5)
    with session_scope(fleet.engine) as session:
        service.update_rule(
            session, name="errors", now=at(0.6), condition=ErrorRateCondition(max_error_rate=0.5)
        )
    (alert,) = alerts(fleet)
    assert alert.status == "resolved" and alert.resolution == "the rule's condition changed"
    assert evaluate(fleet, 0.7)["errors"].opened == []  # within the new limit
    with session_scope(fleet.engine) as session:
        service.update_rule(
            session, name="errors", now=at(0.8), condition=ErrorRateCondition(max_error_rate=0.01)
        )
    evaluate(fleet, 0.9)
    with session_scope(fleet.engine) as session:
        service.update_rule(session, name="errors", now=at(1), enabled=False)
    assert [a.resolution for a in alerts(fleet)] == [
        "the rule was disabled",
        "the rule's condition changed",
    ]
    assert evaluate(fleet, 1.1) == {}  # disabled rules are not evaluated
    with session_scope(fleet.engine) as session:
        service.delete_rule(session, name="errors", now=at(1.2))
    with Session(fleet.engine) as session:
        assert session.exec(select(AlertRuleRecord)).all() == []
    assert {(a.rule_id, a.rule_name) for a in alerts(fleet)} == {(None, "errors")}


def test_evaluators_racing_open_one_alert(fleet: Fleet) -> None:
    add_rule(fleet, "errors", ErrorRateCondition(max_error_rate=0.05))
    fleet.hour(0, CANARY, errors=50)
    start = threading.Barrier(4)

    def run() -> None:
        start.wait()
        for _ in range(3):
            evaluate(fleet, 0.5)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    found = alerts(fleet)
    assert len(found) == 1 and found[0].status == "open"
