"""Webhook deliveries to a real HTTP server on loopback: a failure, then the retry after the
backoff (the clock is moved, never slept on); permanent failures; running out of attempts;
two senders never posting the same attempt."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.alerts import service
from server.alerts.evaluator import evaluate_rules
from server.alerts.rules import ErrorRateCondition
from server.alerts.webhook import WebhookPolicy, WebhookSender, backoff_delay, retryable
from server.db import session_scope
from tests.conftest import free_port
from tests.server.alerts.conftest import CANARY, MODEL, Clock, Fleet, at, make_fleet

pytestmark = pytest.mark.database

POLICY = WebhookPolicy(
    timeout_seconds=5, max_attempts=3, backoff_min_seconds=10, backoff_max_seconds=25
)


@dataclass
class Receiver:
    """Answers each POST with the next status of ``statuses`` (then 200), and keeps them."""

    url: str
    statuses: list[int]
    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box = Receiver(url="", statuses=[])

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with box.lock:
                box.received.append(
                    {
                        "path": self.path,
                        "event": self.headers["X-Edgefleet-Event"],
                        "delivery": self.headers["X-Edgefleet-Delivery"],
                        "type": self.headers["Content-Type"],
                        "body": json.loads(body),
                    }
                )
                status = box.statuses.pop(0) if box.statuses else 200
            self.send_response(status)
            if status == 429:
                self.send_header("Retry-After", "20")
            self.end_headers()
            self.wfile.write(b"ok" if status < 300 else b"try later")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    box.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/edgefleet?token=secret"
    yield box
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture
def fleet(engine: Engine, tmp_path: Path) -> Fleet:
    return make_fleet(engine, tmp_path)


def open_alert(fleet: Fleet, url: str, *, hours: float = 0.5) -> int:
    with session_scope(fleet.engine) as session:
        service.create_rule(
            session,
            name="errors",
            condition=ErrorRateCondition(max_error_rate=0.05),
            model_name=MODEL,
            group="canary",
            now=at(0),
            webhook_url=url,
        )
    fleet.hour(0, CANARY, errors=50)
    (alert_id,) = evaluate_rules(fleet.engine, now=at(hours), context=fleet.context)[
        "errors"
    ].opened
    return alert_id


def deliveries(fleet: Fleet, alert_id: int) -> list[Any]:
    with Session(fleet.engine) as session:
        return service.deliveries_of(session, alert_id=alert_id)


def test_a_failed_delivery_is_retried_after_the_backoff_and_then_delivered(
    fleet: Fleet, receiver: Receiver
) -> None:
    receiver.statuses = [500]
    alert_id = open_alert(fleet, receiver.url)
    clock = Clock(at(0.5))
    sender = WebhookSender(fleet.engine, policy=POLICY, clock=clock)
    try:
        (first,) = sender.send_due()
        assert (first.status, first.attempts, first.status_code) == ("pending", 1, 500)
        (row,) = deliveries(fleet, alert_id)
        assert row.status == "pending" and row.last_error == "HTTP 500: try later"
        assert row.next_attempt_at == at(0.5) + timedelta(seconds=10)

        assert sender.send_due() == []  # not before its time
        clock.now += timedelta(seconds=10)
        (second,) = sender.send_due()
        assert (second.status, second.attempts, second.status_code) == ("delivered", 2, 200)
        assert sender.send_due() == []

        # the condition clears: the resolution is delivered too
        fleet.hour(1, CANARY)
        evaluate_rules(fleet.engine, now=at(1.5), context=fleet.context)
        clock.now = at(1.5)
        (resolved,) = sender.send_due()
        assert resolved.status == "delivered"
    finally:
        sender.stop()

    assert [(r["event"], r["path"]) for r in receiver.received] == [
        ("alert.opened", "/hooks/edgefleet?token=secret"),
        ("alert.opened", "/hooks/edgefleet?token=secret"),
        ("alert.resolved", "/hooks/edgefleet?token=secret"),
    ]
    opened, again, closed = receiver.received
    assert opened["delivery"] == again["delivery"] != closed["delivery"]  # same id on a retry
    assert opened["type"] == "application/json"
    body = opened["body"]
    assert body["event"] == "alert.opened" and body["alert"]["id"] == alert_id
    assert body["alert"]["subject"] == "sensor v1 in group canary"
    assert body["alert"]["status"] == "open" and body["alert"]["severity"] == "warning"
    assert body["alert"]["evidence"]["windows"][0]["errors"] == 300
    assert closed["body"]["alert"]["status"] == "resolved"
    assert closed["body"]["alert"]["resolution"].startswith("the condition cleared")
    rows = deliveries(fleet, alert_id)
    assert [(d.event, d.status, d.attempts) for d in rows] == [
        ("opened", "delivered", 2),
        ("resolved", "delivered", 1),
    ]
    assert rows[0].delivered_at == at(0.5) + timedelta(seconds=10)
    assert rows[0].last_status_code == 200 and rows[0].last_error is None


def test_a_client_error_fails_at_once_and_attempts_run_out(
    fleet: Fleet, receiver: Receiver
) -> None:
    receiver.statuses = [404]
    alert_id = open_alert(fleet, receiver.url)
    clock = Clock(at(0.5))
    sender = WebhookSender(fleet.engine, policy=POLICY, clock=clock)
    try:
        (gone,) = sender.send_due()
        assert (gone.status, gone.attempts) == ("failed", 1)
        clock.now += timedelta(hours=1)
        assert sender.send_due() == []  # failed is final

        receiver.statuses = [503, 429, 503]
        fleet.hour(1, CANARY)
        evaluate_rules(fleet.engine, now=at(1.5), context=fleet.context)  # resolved: queued
        clock.now = at(1.5)
        outcomes = []
        for _ in range(3):
            outcomes += sender.send_due()
            clock.now += timedelta(seconds=25)
        assert [(o.status, o.attempts) for o in outcomes] == [
            ("pending", 1),
            ("pending", 2),
            ("failed", 3),
        ]
    finally:
        sender.stop()
    resolved = deliveries(fleet, alert_id)[1]
    assert resolved.status == "failed" and resolved.last_status_code == 503


def test_retry_after_and_an_unreachable_receiver(fleet: Fleet, receiver: Receiver) -> None:
    receiver.statuses = [429]
    alert_id = open_alert(fleet, receiver.url)
    clock = Clock(at(0.5))
    sender = WebhookSender(fleet.engine, policy=POLICY, clock=clock)
    try:
        sender.send_due()
        (row,) = deliveries(fleet, alert_id)
        assert row.next_attempt_at == at(0.5) + timedelta(seconds=20)  # its Retry-After
    finally:
        sender.stop()

    with session_scope(fleet.engine) as session:
        service.update_rule(
            session, name="errors", now=at(0.6), webhook_url=f"http://127.0.0.1:{free_port()}/x"
        )
    fleet.hour(1, CANARY)
    evaluate_rules(fleet.engine, now=at(1.5), context=fleet.context)
    clock.now = at(1.5)
    sender = WebhookSender(fleet.engine, policy=POLICY, clock=clock)
    try:
        outcomes = [o for o in sender.send_due() if o.status_code is None]
    finally:
        sender.stop()
    (refused,) = outcomes
    assert refused.status == "pending" and refused.error is not None
    assert refused.error.startswith("ConnectError")


def test_two_senders_never_post_the_same_attempt(fleet: Fleet, receiver: Receiver) -> None:
    open_alert(fleet, receiver.url)
    clock = Clock(at(0.5))
    senders = [WebhookSender(fleet.engine, policy=POLICY, clock=clock) for _ in range(3)]
    start = threading.Barrier(len(senders))
    results: list[Any] = []

    def run(sender: WebhookSender) -> None:
        start.wait()
        results.extend(sender.send_due())

    threads = [threading.Thread(target=run, args=(s,)) for s in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for sender in senders:
        sender.stop()
    assert len(results) == 1 and len(receiver.received) == 1


def test_backoff_doubles_up_to_its_cap() -> None:
    delays = [backoff_delay(n, POLICY).total_seconds() for n in range(1, 5)]
    assert delays == [10, 20, 25, 25]
    assert [retryable(s) for s in (500, 503, 408, 429, 400, 404, 410)] == [
        True,
        True,
        True,
        True,
        False,
        False,
        False,
    ]
