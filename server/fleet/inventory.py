"""The inventory from MQTT: what devices report on ``state``, ``presence`` and ``events``.

Two halves:

- **Pure functions** (:func:`decode_message`, :func:`apply_message` and the per-kind
  :func:`apply_state`, :func:`apply_presence`, :func:`apply_event`) turn one MQTT
  message into changes of a :class:`~server.fleet.models.Device` record, or raise
  :class:`DroppedMessage` with a :class:`DropReason`. They do no I/O and take the time
  of receipt as an argument.
- :class:`InventoryConsumer` is the adapter: a paho-mqtt 2.x client (MQTT 3.1.1,
  ``CallbackAPIVersion.VERSION2``) subscribed to ``ef/v1/dev/+/state``, ``+/presence``
  and ``+/events``, whose network thread only puts what arrives on a bounded queue,
  and one worker thread that decodes, applies a batch in one transaction, commits,
  and then hands every applied message to the registered hooks.

What always holds:

- A message is applied only if its topic parses, its payload is a valid message of
  the topic's channel, the ``device_id`` in the payload equals the topic's, and the
  device is registered and *accepted*. Anything else is dropped and counted by
  reason (``stats()["dropped"]``); a device cannot speak for another.
- Retained messages (what a fresh subscription replays) never make a device look
  seen *now*: ``last_seen`` moves only to the time the device itself gave (clamped
  to the time of receipt), and never backwards.
- A state report older than the one applied (``reported_at``) and a presence from an
  older connection than the one applied (``session_started_at``) are dropped as
  ``stale``, so a late or replayed message cannot undo a newer one.
- The enrolled ``profile`` is the operator's: a state report changes arch, runtime,
  agent version, running models, manifest and keyring versions and the last update
  result, never the profile.
- Each event (by ``event_id``) reaches the hooks at most once per consumer, after
  the transaction that recorded it committed. Hooks run on the worker thread; an
  exception in a hook is logged and counted, never propagated.
- paho callbacks never raise and never touch the database.
- The subscription is not shared: every consumer sees every device's retained state
  (MQTT 5 does not replay retained messages to shared subscriptions), and applying
  the same message twice changes nothing.
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from server.db import utcnow
from server.errors import ConfigurationError
from server.fleet.models import Device, DeviceStatus
from server.settings import Settings
from shared.errors import ContractError
from shared.messages import DeviceState, Event, Presence, PresenceStatus
from shared.topics import Channel, fleet_filter, parse_topic

__all__ = [
    "INVENTORY_CHANNELS",
    "DeviceMessage",
    "DropReason",
    "DroppedMessage",
    "InventoryConsumer",
    "InventoryHook",
    "apply_event",
    "apply_message",
    "apply_presence",
    "apply_state",
    "decode_message",
    "start_inventory_consumer",
]

log = logging.getLogger(__name__)

INVENTORY_CHANNELS = (Channel.STATE, Channel.PRESENCE, Channel.EVENTS)
_MESSAGE_TYPES: dict[Channel, type[DeviceState] | type[Presence] | type[Event]] = {
    Channel.STATE: DeviceState,
    Channel.PRESENCE: Presence,
    Channel.EVENTS: Event,
}


class DropReason(StrEnum):
    BAD_TOPIC = "bad_topic"
    MALFORMED = "malformed"
    DEVICE_MISMATCH = "device_mismatch"
    UNKNOWN_DEVICE = "unknown_device"
    NOT_ACCEPTED = "not_accepted"
    STALE = "stale"
    DUPLICATE_EVENT = "duplicate_event"
    QUEUE_FULL = "queue_full"
    DATABASE = "database"


class DroppedMessage(Exception):
    """A message the inventory does not apply; ``reason`` says why."""

    def __init__(self, reason: DropReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DeviceMessage:
    """One validated message from a device, as the hooks see it."""

    device_id: str
    channel: Channel
    message: DeviceState | Presence | Event
    received_at: datetime
    retained: bool

    @property
    def event(self) -> Event | None:
        return self.message if isinstance(self.message, Event) else None


InventoryHook = Callable[[DeviceMessage], None]


# ----------------------------------------------------------------------------- pure core


def decode_message(
    topic: str, payload: bytes, *, received_at: datetime, retained: bool = False
) -> DeviceMessage:
    """Validate one MQTT message of an inventory channel, or raise :class:`DroppedMessage`."""
    try:
        parsed = parse_topic(topic)
    except ContractError as e:
        raise DroppedMessage(DropReason.BAD_TOPIC, str(e)) from e
    message_type = _MESSAGE_TYPES.get(parsed.channel)
    if message_type is None:
        raise DroppedMessage(DropReason.BAD_TOPIC, f"channel {parsed.channel} is not inventory")
    try:
        message = message_type.from_bytes(payload)
    except ContractError as e:
        raise DroppedMessage(DropReason.MALFORMED, str(e)) from e
    if message.device_id != parsed.device_id:
        raise DroppedMessage(
            DropReason.DEVICE_MISMATCH,
            f"payload of {message.device_id!r} on the topic of {parsed.device_id!r}",
        )
    return DeviceMessage(parsed.device_id, parsed.channel, message, received_at, retained)


def _seen(device: Device, moment: datetime | None, received_at: datetime) -> None:
    if moment is None:
        return
    moment = min(moment, received_at)  # a device clock ahead of ours is not the future
    if device.last_seen is None or moment > device.last_seen:
        device.last_seen = moment


def apply_state(
    device: Device, state: DeviceState, *, received_at: datetime, retained: bool = False
) -> None:
    """Record what the device runs now; :class:`DroppedMessage` (stale) if older than known."""
    if device.state_reported_at is not None and state.reported_at < device.state_reported_at:
        raise DroppedMessage(DropReason.STALE, "state older than the one applied")
    device.arch = state.arch
    device.runtime_name = state.runtime.name
    device.runtime_version = state.runtime.version
    device.agent_version = state.agent_version
    device.manifest_version = state.manifest_version
    device.keyring_version = state.keyring_version
    device.models_json = _json([m.model_dump(mode="json", by_alias=True) for m in state.models])
    device.last_update_json = (
        None
        if state.last_update is None
        else _json(state.last_update.model_dump(mode="json", by_alias=True))
    )
    if state.agent_update is not None:  # absent: an agent that predates agent updates
        device.agent_update_json = _json(state.agent_update.model_dump(mode="json"))
    device.state_reported_at = state.reported_at
    _seen(device, state.reported_at if retained else received_at, received_at)


def apply_presence(
    device: Device, presence: Presence, *, received_at: datetime, retained: bool = False
) -> None:
    """Record online / offline; :class:`DroppedMessage` (stale) if from an older connection."""
    started = presence.session_started_at
    previous = device.presence_session_at
    if started is not None and previous is not None and started < previous:
        raise DroppedMessage(DropReason.STALE, "presence of an older connection")
    device.online = presence.status == PresenceStatus.ONLINE
    if started is not None:
        device.presence_session_at = started
    if not retained:
        _seen(device, received_at, received_at)
    elif device.online:
        _seen(device, started, received_at)


def apply_event(
    device: Device, event: Event, *, received_at: datetime, retained: bool = False
) -> None:
    """Record the device's latest update event (an older one leaves ``last_event`` alone)."""
    previous = device.last_event
    previous_at = None if previous is None else _parse_time(previous.get("at"))
    if previous_at is None or event.at >= previous_at:
        device.last_event_json = _json(
            event.model_dump(
                mode="json",
                include={
                    "event_id",
                    "kind",
                    "at",
                    "manifest_version",
                    "rollout_id",
                    "model_name",
                    "model_version",
                    "reason",
                    "detail",
                },
            )
        )
    _seen(device, event.at if retained else received_at, received_at)


def apply_message(device: Device | None, message: DeviceMessage) -> None:
    """Apply a decoded message to its device's record, or raise :class:`DroppedMessage`."""
    if device is None:
        raise DroppedMessage(DropReason.UNKNOWN_DEVICE, message.device_id)
    if device.id != message.device_id:
        raise ValueError(f"message of {message.device_id!r} applied to {device.id!r}")
    if device.status != DeviceStatus.ACCEPTED:
        raise DroppedMessage(DropReason.NOT_ACCEPTED, f"{device.id} is {device.status}")
    body = message.message
    kwargs = {"received_at": message.received_at, "retained": message.retained}
    if isinstance(body, DeviceState):
        apply_state(device, body, **kwargs)  # type: ignore[arg-type]
    elif isinstance(body, Presence):
        apply_presence(device, body, **kwargs)  # type: ignore[arg-type]
    else:
        apply_event(device, body, **kwargs)  # type: ignore[arg-type]


def _parse_time(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------- the consumer


@dataclass(frozen=True, slots=True)
class _Raw:
    topic: str
    payload: bytes
    retained: bool
    received_at: datetime


ClientFactory = Callable[[], mqtt.Client]


class InventoryConsumer:
    """Keep the ``devices`` table in step with what devices report over MQTT.

    ``client_factory`` returns a configured, unconnected paho client (credentials,
    TLS); :meth:`from_url` builds one from a broker URL. ``username`` / ``password``,
    when given, are the broker login (over any the factory set). ``clock`` stamps each
    message as it arrives. Register hooks with :meth:`add_hook` (before or after
    :meth:`start`); each gets every applied :class:`DeviceMessage`.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_factory: ClientFactory | None = None,
        username: str | None = None,
        password: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        batch_size: int = 256,
        max_queued: int = 10_000,
        remembered_events: int = 10_000,
        reconnect_delay: tuple[float, float] = (0.5, 30.0),
        database_retries: int = 3,
    ) -> None:
        if min(batch_size, max_queued, remembered_events) < 1:
            raise ValueError("batch_size, max_queued and remembered_events must be at least 1")
        self.engine = engine
        self.host = host
        self.port = port
        self.batch_size = batch_size
        self.topic_filters = [fleet_filter(channel) for channel in INVENTORY_CHANNELS]
        self._client_factory = client_factory or _default_client
        self._login = None if username is None else (username, password)
        self._clock = clock
        self._reconnect_delay = reconnect_delay
        self._database_retries = database_retries
        self._queue: queue.Queue[_Raw | None] = queue.Queue(maxsize=max_queued)
        self._hooks: list[InventoryHook] = []
        self._seen_events: OrderedDict[str, None] = OrderedDict()
        self._remembered_events = remembered_events
        self._lock = threading.Lock()
        self._progress = threading.Condition(self._lock)
        self._counters = {"received": 0, "applied": 0, "batches": 0, "hook_errors": 0}
        self._dropped = dict.fromkeys((r.value for r in DropReason), 0)
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._subscribe_mid: int | None = None
        self._client: mqtt.Client | None = None
        self._worker: threading.Thread | None = None

    @classmethod
    def from_url(cls, engine: Engine, url: str, **kwargs: Any) -> InventoryConsumer:
        """A consumer for ``mqtt://[user:password@]host[:port]`` or ``mqtts://...`` (TLS)."""
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ConfigurationError(
                f"inventory: broker URL must look like mqtt://host:port, not {url!r}"
            )
        tls = parsed.scheme == "mqtts"
        username = None if parsed.username is None else unquote(parsed.username)
        password = None if parsed.password is None else unquote(parsed.password)

        def factory() -> mqtt.Client:
            client = _default_client()
            if username is not None:
                client.username_pw_set(username, password)
            if tls:
                client.tls_set_context(ssl.create_default_context())
            return client

        return cls(
            engine,
            host=parsed.hostname,
            port=parsed.port or (8883 if tls else 1883),
            client_factory=factory,
            **kwargs,
        )

    # ----------------------------------------------------------------------- lifecycle

    def add_hook(self, hook: InventoryHook) -> None:
        """Call ``hook(message)`` for every applied message, on the worker thread."""
        with self._lock:
            self._hooks.append(hook)

    def remove_hook(self, hook: InventoryHook) -> None:
        with self._lock:
            self._hooks.remove(hook)

    def start(self, timeout: float = 10.0) -> bool:
        """Connect and subscribe; return whether the broker acknowledged within ``timeout``.

        When it did not, paho keeps trying in the background and the consumer catches
        up (retained state and presence) once it is subscribed.
        """
        if self._client is not None:
            raise RuntimeError("InventoryConsumer already started")
        self._stopping.clear()
        client = self._client_factory()
        if self._login is not None:
            client.username_pw_set(*self._login)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.reconnect_delay_set(*self._reconnect_delay)  # type: ignore[arg-type]
        self._client = client
        self._worker = threading.Thread(target=self._work, name="inventory-worker", daemon=True)
        self._worker.start()
        try:
            client.connect_async(self.host, self.port, keepalive=30)
        except (OSError, ValueError) as e:
            self.stop()
            raise ConfigurationError(f"inventory: bad broker address: {e}") from e
        client.loop_start()
        return self._subscribed.wait(timeout)

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect, apply what is already queued, then stop the worker."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._subscribed.clear()
        worker, self._worker = self._worker, None
        if worker is not None:
            self._stopping.set()
            self._queue.put(None)
            worker.join(timeout)

    def __enter__(self) -> InventoryConsumer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """``received``, ``applied``, ``batches``, ``hook_errors``, ``dropped`` by reason,
        and ``queued`` (waiting for the worker)."""
        with self._lock:
            return {**self._counters, "dropped": dict(self._dropped), "queued": self._queue.qsize()}

    def wait_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        """Wait until ``predicate(stats())`` holds (checked after every batch); for tests
        and for start-up code that wants the retained state applied."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while True:
                snapshot = {
                    **self._counters,
                    "dropped": dict(self._dropped),
                    "queued": self._queue.qsize(),
                }
                if predicate(snapshot):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._progress.wait(remaining)

    # ----------------------------------------------------------------------- paho's thread

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        try:
            if getattr(reason, "is_failure", False):
                log.warning("inventory: the broker refused the connection: %s", reason)
                return
            # A clean session forgets subscriptions: subscribe on every connection.
            result, mid = client.subscribe([(f, 1) for f in self.topic_filters])
            if result == mqtt.MQTT_ERR_SUCCESS:
                self._subscribe_mid = mid
        except Exception:  # an exception here would stop paho's network thread
            log.exception("inventory: cannot subscribe")

    def _on_disconnect(self, *args: Any) -> None:
        self._subscribed.clear()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        try:
            if mid == self._subscribe_mid and codes and not any(c.is_failure for c in codes):
                self._subscribed.set()
            elif mid == self._subscribe_mid:
                log.error("inventory: the broker refused the subscriptions: %s", codes)
        except Exception:
            log.exception("inventory: bad SUBACK")

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            try:
                topic = message.topic
            except UnicodeDecodeError:
                self._drop(DropReason.BAD_TOPIC)
                return
            raw = _Raw(topic, bytes(message.payload), bool(message.retain), self._clock())
            with self._lock:
                self._counters["received"] += 1
            try:
                self._queue.put_nowait(raw)
            except queue.Full:
                self._drop(DropReason.QUEUE_FULL)
        except Exception:  # an exception here would stop paho's network thread
            log.exception("inventory: cannot take a message")

    # ----------------------------------------------------------------------- the worker

    def _work(self) -> None:
        while True:
            first = self._queue.get()
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            raws = [raw for raw in batch if raw is not None]
            try:
                self._process(raws)
            except Exception:  # never let the worker die; the batch is counted as lost
                log.exception("inventory: a batch failed")
                self._drop(DropReason.DATABASE, len(raws))
            if None in batch:  # stop(): paho is stopped, so nothing can follow the sentinel
                return

    def _process(self, raws: list[_Raw]) -> None:
        decoded: list[DeviceMessage] = []
        batch_events: set[str] = set()
        for raw in raws:
            try:
                message = decode_message(
                    raw.topic, raw.payload, received_at=raw.received_at, retained=raw.retained
                )
            except DroppedMessage as e:
                self._drop(e.reason)
                continue
            event = message.event
            if event is not None:
                with self._lock:
                    duplicate = event.event_id in self._seen_events
                if duplicate or event.event_id in batch_events:
                    self._drop(DropReason.DUPLICATE_EVENT)
                    continue
                batch_events.add(event.event_id)
            decoded.append(message)
        if not decoded:
            self._finish_batch([], {})
            return
        applied, dropped = self._write(decoded)
        self._finish_batch(applied, dropped)
        for message in applied:
            self._run_hooks(message)

    def _write(
        self, decoded: list[DeviceMessage]
    ) -> tuple[list[DeviceMessage], dict[DropReason, int]]:
        ids = sorted({m.device_id for m in decoded})
        for attempt in range(self._database_retries + 1):
            applied: list[DeviceMessage] = []
            dropped: dict[DropReason, int] = {}
            try:
                with Session(self.engine, expire_on_commit=False) as session:
                    devices = {
                        d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))
                    }
                    for message in decoded:
                        try:
                            apply_message(devices.get(message.device_id), message)
                        except DroppedMessage as e:
                            dropped[e.reason] = dropped.get(e.reason, 0) + 1
                            continue
                        applied.append(message)
                    session.add_all(devices.values())
                    session.commit()
                return applied, dropped
            except SQLAlchemyError:
                log.warning(
                    "inventory: database write failed (attempt %d)", attempt + 1, exc_info=True
                )
                if attempt < self._database_retries:
                    self._stopping.wait(min(0.1 * 2**attempt, 2.0))
        return [], {DropReason.DATABASE: len(decoded)}

    def _finish_batch(self, applied: list[DeviceMessage], dropped: dict[DropReason, int]) -> None:
        with self._progress:
            self._counters["batches"] += 1
            self._counters["applied"] += len(applied)
            for reason, count in dropped.items():
                self._dropped[reason.value] += count
            for message in applied:
                if (event := message.event) is not None:
                    self._seen_events[event.event_id] = None
            while len(self._seen_events) > self._remembered_events:
                self._seen_events.popitem(last=False)
            self._progress.notify_all()

    def _run_hooks(self, message: DeviceMessage) -> None:
        with self._lock:
            hooks = list(self._hooks)
        for hook in hooks:
            try:
                hook(message)
            except Exception:
                log.exception("inventory: a hook failed on %s", message.channel)
                with self._lock:
                    self._counters["hook_errors"] += 1

    def _drop(self, reason: DropReason, count: int = 1) -> None:
        with self._progress:
            self._dropped[reason.value] += count
            self._progress.notify_all()


def _default_client() -> mqtt.Client:
    return mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"edgefleet-inventory@{uuid.uuid4().hex[:12]}",
        protocol=mqtt.MQTTv311,
        clean_session=True,
    )


def start_inventory_consumer(
    engine: Engine,
    settings: Settings,
    *,
    timeout: float = 5.0,
    clock: Callable[[], datetime] = utcnow,
    hooks: Sequence[InventoryHook] = (),
) -> InventoryConsumer | None:
    """The server's consumer, started -- or ``None`` when no broker URL is configured
    (``broker_url="embedded"`` before a broker was started) or the consumer is off.

    ``hooks`` are registered before the subscription, so they also see the retained
    state replayed to it. A broker that does not answer within ``timeout`` does not
    stop the server: paho keeps trying in the background.
    """
    if not settings.inventory_consumer or settings.broker_url == "embedded":
        return None
    consumer = InventoryConsumer.from_url(engine, settings.service_broker_url, clock=clock)
    for hook in hooks:
        consumer.add_hook(hook)
    if not consumer.start(timeout=timeout):
        log.warning(
            "inventory: not subscribed at %s within %g s; retrying in the background",
            consumer.host,
            timeout,
        )
    return consumer
