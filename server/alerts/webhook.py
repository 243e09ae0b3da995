"""Webhook deliveries: POST an alert's JSON to its rule's URL, retried with backoff.

A delivery row is queued in the transaction that opens or resolves an alert
(:mod:`server.alerts.service`); a :class:`WebhookSender` sends the due ones, on a thread
of its own so a slow or dead receiver never holds up the evaluation of rules.

What always holds:

- A delivery is claimed (``claimed_until``, one conditional ``UPDATE``) before it is
  sent, so two senders -- two server replicas -- never post the same attempt; a claim
  that outlives its sender (a crash mid-request) expires and the attempt is made again.
- No database transaction is open while a request is in flight.
- 2xx: ``delivered``. A transport error, a timeout, 408, 425, 429 or 5xx: tried again
  after :func:`backoff_delay` (or the receiver's ``Retry-After``, within the same
  bounds) until ``max_attempts`` attempts were made, then ``failed``. Any other status
  (a 4xx retrying cannot change): ``failed`` at once. The last status code and error
  are kept either way.
- Each request carries ``X-Edgefleet-Event`` (``alert.opened`` / ``alert.resolved``)
  and ``X-Edgefleet-Delivery`` (the delivery id, the same on every attempt, so a
  receiver can drop a repeat).
- The clock is injected: retries are due by it, and tests move it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import or_, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from server import __version__
from server.alerts.models import AlertDeliveryRecord
from server.db import session_scope

__all__ = ["DeliveryOutcome", "WebhookPolicy", "WebhookSender", "backoff_delay", "retryable"]

log = logging.getLogger(__name__)

PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
_MAX_ERROR = 500


@dataclass(frozen=True)
class WebhookPolicy:
    """The bounds of webhook delivery (``EDGEFLEET_ALERT_WEBHOOK_*`` settings)."""

    timeout_seconds: float = 10.0
    max_attempts: int = 8
    backoff_min_seconds: float = 5.0
    backoff_max_seconds: float = 600.0
    batch: int = 20
    """Deliveries claimed per pass."""


def backoff_delay(attempts: int, policy: WebhookPolicy) -> timedelta:
    """Wait after the ``attempts``-th failed attempt: doubling from the minimum, capped."""
    seconds = policy.backoff_min_seconds * 2 ** max(attempts - 1, 0)
    return timedelta(seconds=min(seconds, policy.backoff_max_seconds))


def retryable(status_code: int) -> bool:
    return status_code >= 500 or status_code in (408, 425, 429)


@dataclass(frozen=True)
class DeliveryOutcome:
    delivery_id: int
    status: str
    attempts: int
    status_code: int | None
    error: str | None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


class WebhookSender:
    """Sends due deliveries; :meth:`send_due` once, or :meth:`start` a polling thread."""

    def __init__(
        self,
        engine: Engine,
        *,
        policy: WebhookPolicy,
        clock: Callable[[], datetime],
        transport: httpx.BaseTransport | None = None,
        poll_seconds: float = 2.0,
    ) -> None:
        self._engine = engine
        self._policy = policy
        self._clock = clock
        self._poll = poll_seconds
        self._http = httpx.Client(
            timeout=policy.timeout_seconds,
            transport=transport,
            follow_redirects=False,
            headers={"User-Agent": f"edgefleet/{__version__}"},
        )
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="alert-webhooks", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 15.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._http.close()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.send_due()
            except Exception:  # a database hiccup must not end the deliveries for good
                log.exception("alert webhooks: a delivery pass failed")
            self._wake.wait(self._poll)
            self._wake.clear()

    # -- one pass

    def send_due(self) -> list[DeliveryOutcome]:
        """Claim and send every due delivery (up to a batch); their outcomes."""
        now = self._clock()
        with Session(self._engine) as session:
            due = session.exec(
                select(AlertDeliveryRecord.id)
                .where(
                    AlertDeliveryRecord.status == PENDING,
                    col(AlertDeliveryRecord.next_attempt_at) <= now,
                    or_(
                        col(AlertDeliveryRecord.claimed_until).is_(None),
                        col(AlertDeliveryRecord.claimed_until) < now,
                    ),
                )
                .order_by(col(AlertDeliveryRecord.next_attempt_at), col(AlertDeliveryRecord.id))
                .limit(self._policy.batch)
            ).all()
        outcomes = []
        for delivery_id in due:
            if self._stopping.is_set():
                break
            assert delivery_id is not None
            claimed = self._claim(delivery_id, now)
            if claimed is not None:
                outcomes.append(self._send(claimed))
        return outcomes

    def _claim(self, delivery_id: int, now: datetime) -> AlertDeliveryRecord | None:
        lease = now + timedelta(seconds=self._policy.timeout_seconds + 30)
        with session_scope(self._engine) as session:
            result = session.execute(
                update(AlertDeliveryRecord)
                .where(
                    col(AlertDeliveryRecord.id) == delivery_id,
                    col(AlertDeliveryRecord.status) == PENDING,
                    col(AlertDeliveryRecord.next_attempt_at) <= now,
                    or_(
                        col(AlertDeliveryRecord.claimed_until).is_(None),
                        col(AlertDeliveryRecord.claimed_until) < now,
                    ),
                )
                .values(claimed_until=lease, attempts=AlertDeliveryRecord.attempts + 1)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None  # another sender has it
            row = session.get(AlertDeliveryRecord, delivery_id, populate_existing=True)
            assert row is not None
            session.expunge(row)
            return row

    def _send(self, delivery: AlertDeliveryRecord) -> DeliveryOutcome:
        assert delivery.id is not None
        event = f"alert.{delivery.event}"
        status_code: int | None = None
        retry_after: float | None = None
        try:
            response = self._http.post(
                delivery.url,
                content=delivery.payload_json.encode(),
                headers={
                    "Content-Type": "application/json",
                    "X-Edgefleet-Event": event,
                    "X-Edgefleet-Delivery": str(delivery.id),
                },
            )
            status_code = response.status_code
            if 200 <= status_code < 300:
                error = None
            else:
                error = f"HTTP {status_code}: {response.text[:200]}"
                retry_after = _retry_after(response)
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"[:_MAX_ERROR]
        return self._record(delivery, status_code, error, retry_after)

    def _record(
        self,
        delivery: AlertDeliveryRecord,
        status_code: int | None,
        error: str | None,
        retry_after: float | None,
    ) -> DeliveryOutcome:
        now = self._clock()
        attempts = delivery.attempts
        values: dict[str, object] = {
            "claimed_until": None,
            "last_status_code": status_code,
            "last_error": error,
        }
        if error is None:
            values |= {"status": DELIVERED, "delivered_at": now}
        elif (status_code is not None and not retryable(status_code)) or (
            attempts >= self._policy.max_attempts
        ):
            values["status"] = FAILED
        else:
            delay = backoff_delay(attempts, self._policy)
            if retry_after is not None:
                delay = timedelta(
                    seconds=min(
                        max(retry_after, self._policy.backoff_min_seconds),
                        self._policy.backoff_max_seconds,
                    )
                )
            values["next_attempt_at"] = now + delay
        with session_scope(self._engine) as session:
            session.execute(
                update(AlertDeliveryRecord)
                .where(col(AlertDeliveryRecord.id) == delivery.id)
                .values(**values)
            )
        status = str(values.get("status", PENDING))
        if status == FAILED:
            log.warning(
                "alert webhook %s to %s failed for good after %d attempt(s): %s",
                delivery.id,
                delivery.url,
                attempts,
                error,
            )
        elif status == PENDING:
            log.info(
                "alert webhook %s: attempt %d failed (%s); retrying", delivery.id, attempts, error
            )
        assert delivery.id is not None
        return DeliveryOutcome(delivery.id, status, attempts, status_code, error)
