"""The agent's MQTT connection: one paho client, one network thread that this module owns.

What always holds:

- **Threads.** :class:`MqttTransport` runs paho's network loop on its own thread (paho's
  ``loop_start`` is not used) and a supervisor thread that restarts that loop if it ever
  dies. paho's callbacks only put what happened on a queue — received messages on
  :attr:`MqttTransport.inbox`, acknowledgements and connection changes on an internal
  queue that the network thread drains between two ``loop()`` calls — and every callback
  is wrapped so that it never raises (an exception in a callback would stop paho's loop).
  ``on_acked`` hooks run on the network thread after the callback has returned, guarded
  the same way: they must be quick and hand real work to a queue.
- **Session.** MQTT 3.1.1 by default with ``clean_session=False``; MQTT 5 when configured,
  with ``clean_start=False`` and a session expiry of :data:`SESSION_EXPIRY_SECONDS`. The
  client id is the configured one or else the device id, so the broker finds the session
  again after a restart of the agent.
- **Presence.** The Last Will is ``Presence(offline)``, QoS 1, retained, on the device's
  presence topic; every successful connect publishes ``Presence(online,
  session_started_at)`` retained; :meth:`MqttTransport.stop` publishes ``offline`` itself
  before its clean DISCONNECT (which suppresses the Will).
- **Reconnects are ours.** paho's automatic retry is off (``reconnect_on_failure=False``;
  its ``reconnect_delay_set`` timing is never used because ``loop_forever`` is never
  called). After a failed attempt or a lost connection the network thread waits
  :func:`backoff_delay` — capped exponential growth with full jitter between the minimum
  and the current ceiling — and tries again; the attempt counter resets only after a
  connection stayed up for ``backoff_max_seconds``, so a broker that accepts and then
  drops connections is not hammered at the minimum delay.
- **Subscriptions** are remembered and sent again after every connect, whether or not
  the broker kept the session.
- **Publishing never blocks.** :meth:`MqttTransport.publish` hands the message to paho and
  returns a :class:`PublishHandle` that completes on the PUBACK (QoS 1). A QoS 1 message
  published while disconnected, or left un-acknowledged when the connection drops, is
  kept in paho's memory and sent again (DUP) after the next CONNACK of the same client;
  at most ``max_queued`` messages wait there, beyond that publishing fails with
  :class:`TransportError`. What must survive a restart belongs in :mod:`agent.outbox`.
- Failures of the transport surface as :class:`TransportError`; connection failures are
  not raised at all — they are logged and retried.
"""

from __future__ import annotations

import functools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ParamSpec

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import BrokerConfig, Limits
from agent.errors import AgentError
from shared.messages import Presence, PresenceStatus
from shared.topics import Channel, check_device_id, device_topic

__all__ = [
    "SESSION_EXPIRY_SECONDS",
    "InboundMessage",
    "MqttTransport",
    "PublishHandle",
    "SubscribeHandle",
    "TransportError",
    "backoff_delay",
]

log = logging.getLogger(__name__)

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
"""MQTT 5: how long the broker keeps the device's session (and queued messages) while away."""

_LOOP_TIMEOUT = 0.2  # seconds one paho loop() may block in select(); bounds stop() latency
_DISCONNECT_FLUSH_SECONDS = 1.0
_SUPERVISOR_INTERVAL = 1.0
_P = ParamSpec("_P")


class TransportError(AgentError):
    """The MQTT transport cannot do what was asked (bad TLS files, paho's queue full, ...)."""


def backoff_delay(attempt: int, *, minimum: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry).

    The ceiling doubles with every attempt, from ``2 * minimum`` up to ``maximum``; the
    delay is drawn uniformly between ``minimum`` and that ceiling ("full jitter" above a
    floor), so a fleet that lost its broker at the same instant does not come back at the
    same instant. Always ``minimum <= delay <= maximum``.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if not 0 < minimum <= maximum:
        raise ValueError("backoff needs 0 < minimum <= maximum")
    ceiling = min(maximum, minimum * 2.0 ** min(attempt + 1, 64))
    return min(maximum, max(minimum, rng.uniform(minimum, ceiling)))


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One message received on a subscription."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


class _Completion:
    """Something that completes once, from the network thread; waitable from any thread."""

    def __init__(self) -> None:
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until complete; ``True`` if it is."""
        return self._done.wait(timeout)


class PublishHandle(_Completion):
    """A message handed to the transport; completes when the broker acknowledged it.

    For QoS 1 that is the PUBACK; for QoS 0, the moment the bytes were written.
    ``reason_code`` is the PUBACK's (always 0 for MQTT 3.1.1; 0x80 and above is a
    refusal under MQTT 5).
    """

    def __init__(self, topic: str, mid: int, qos: int) -> None:
        super().__init__()
        self.topic = topic
        self.mid = mid
        self.qos = qos
        self.reason_code: int | None = None
        self._hooks: list[Callable[[PublishHandle], None]] = []
        self._hooks_lock = threading.Lock()

    @property
    def acked(self) -> bool:
        return self.done

    @property
    def refused(self) -> bool:
        return self.reason_code is not None and self.reason_code >= 0x80

    def on_acked(self, hook: Callable[[PublishHandle], None]) -> None:
        """Call ``hook(handle)`` once the message is acknowledged.

        It runs on the transport's network thread (or right here, if the ack already
        came); it must be quick. An exception from it is logged, never propagated into
        the transport.
        """
        with self._hooks_lock:
            if not self.done:
                self._hooks.append(hook)
                return
        hook(self)

    def _complete(self, reason_code: int) -> list[Callable[[PublishHandle], None]]:
        with self._hooks_lock:
            self.reason_code = reason_code
            self._done.set()
            hooks, self._hooks = self._hooks, []
        return hooks

    def __repr__(self) -> str:
        state = f"acked rc={self.reason_code}" if self.done else "pending"
        return f"<PublishHandle mid={self.mid} {self.topic!r} qos={self.qos} {state}>"


class SubscribeHandle(_Completion):
    """A subscription; completes on the first SUBACK (after the next connect if offline)."""

    def __init__(self, topic: str, qos: int) -> None:
        super().__init__()
        self.topic = topic
        self.qos = qos
        self.granted_qos: int | None = None

    @property
    def refused(self) -> bool:
        return self.granted_qos is not None and self.granted_qos >= 0x80

    def _complete(self, code: int) -> None:
        self.granted_qos = code
        self._done.set()


def _never_raises(callback: Callable[_P, None]) -> Callable[_P, None]:
    """Wrap a paho callback: an exception is logged and swallowed, never reaches paho's loop."""

    @functools.wraps(callback)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            log.exception(
                "MQTT callback %s failed; the network loop goes on",
                callback.__name__,
                extra={"event": "mqtt_callback_failed", "callback": callback.__name__},
            )

    return guarded


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _no_op_socket_hook(client: Any, userdata: Any, sock: Any) -> None:
    """Registered so paho never writes to the socket from a publishing thread.

    Without a thread of its own (``_thread is None``) and without these hooks, paho calls
    ``loop_write()`` directly from whichever thread publishes, racing our network thread.
    With a hook set it only queues the packet and wakes our ``select()``.
    """


class MqttTransport:
    """The device's MQTT connection. See the module docstring for what always holds.

    ``clock`` (monotonic seconds) measures how long connections last; ``rng`` jitters the
    backoff; ``now`` stamps ``session_started_at``. ``max_queued`` bounds paho's in-memory
    queue of QoS 1 messages (in flight or waiting), ``max_inflight`` how many of them are
    on the wire un-acknowledged, ``inbox_max`` the inbox (a full inbox drops and logs).
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        device_id: str,
        limits: Limits,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        now: Callable[[], datetime] = _utc_now,
        max_queued: int = 1000,
        max_inflight: int = 64,
        inbox_max: int = 1000,
        supervisor_interval: float = _SUPERVISOR_INTERVAL,
    ) -> None:
        self.device_id = check_device_id(device_id)
        self.config = config
        self.limits = limits
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 (jitter, not crypto)
        self._now = now
        self._supervisor_interval = supervisor_interval
        self.presence_topic = device_topic(device_id, Channel.PRESENCE)

        self.inbox: queue.Queue[InboundMessage] = queue.Queue(maxsize=inbox_max)
        self.connected = threading.Event()
        self.session_present: bool | None = None
        self.connection_count = 0
        self.loop_restarts = 0
        self.inbox_dropped = 0
        self.last_error: str | None = None

        self._events: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _handles, _suback_waiters, _subscriptions
        self._handles: dict[int, PublishHandle] = {}
        self._suback_waiters: dict[int, SubscribeHandle] = {}
        self._subscriptions: dict[str, SubscribeHandle] = {}
        self._stopping = threading.Event()
        self._loop_exited = threading.Event()
        self._network_thread: threading.Thread | None = None
        self._supervisor_thread: threading.Thread | None = None
        self._attempt = 0
        self._connected_at: float | None = None
        if max_queued <= 0:
            raise TransportError("max_queued must be positive")
        self._max_queued = max_queued
        self._max_inflight = max_inflight
        self._client = self._make_client()

    # ----------------------------------------------------------------- set-up

    def _make_client(self) -> mqtt.Client:
        config = self.config
        v5 = config.protocol == "5"
        try:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=config.client_id or self.device_id,
                clean_session=None if v5 else False,
                protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                reconnect_on_failure=False,
            )
            client.max_queued_messages_set(self._max_queued)
            client.max_inflight_messages_set(self._max_inflight)
            client.suppress_exceptions = True  # a second net under _never_raises
            client.on_connect = self._on_connect
            client.on_disconnect = self._on_disconnect
            client.on_publish = self._on_publish
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
            client.on_socket_register_write = _no_op_socket_hook
            client.on_socket_unregister_write = _no_op_socket_hook
            offline = Presence(device_id=self.device_id, status=PresenceStatus.OFFLINE)
            client.will_set(self.presence_topic, offline.to_bytes(), qos=1, retain=True)
            if config.username is not None:
                client.username_pw_set(config.username, config.resolved_password())
            if config.tls:
                client.tls_set(
                    ca_certs=str(config.ca_file) if config.ca_file else None,
                    certfile=str(config.cert_file) if config.cert_file else None,
                    keyfile=str(config.key_file) if config.key_file else None,
                )
            properties = None
            if v5:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
            client.connect_async(
                config.host,
                config.port,
                keepalive=config.keepalive,
                clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                properties=properties,
            )
        except (OSError, ValueError) as e:  # ssl.SSLError and missing files are OSErrors
            raise TransportError(f"cannot set up the MQTT client for {config.url}: {e}") from e
        return client

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start the network and supervisor threads; return at once (see :attr:`connected`)."""
        if self._supervisor_thread is not None:
            raise TransportError("the transport is already started")
        self._stopping.clear()
        self._start_network_thread()
        self._supervisor_thread = threading.Thread(
            target=self._supervise, name=f"mqtt-supervisor-{self.device_id}", daemon=True
        )
        self._supervisor_thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish ``offline``, disconnect cleanly and end both threads."""
        if self._supervisor_thread is None:
            return
        if self.connected.is_set():
            try:
                self._publish_presence(PresenceStatus.OFFLINE).wait(min(timeout, 2.0))
            except TransportError as e:
                log.warning("could not publish offline presence: %s", e)
        self._stopping.set()
        self._supervisor_thread.join(timeout)
        if self._network_thread is not None:
            self._network_thread.join(timeout)
        self._supervisor_thread = None
        self._network_thread = None
        self.connected.clear()
        log.info(
            "MQTT transport stopped",
            extra={"event": "mqtt_stopped", "device_id": self.device_id},
        )

    def __enter__(self) -> MqttTransport:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- the caller's side

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> PublishHandle:
        """Hand a message to the connection; never blocks on the network."""
        if qos not in (0, 1):
            raise TransportError("the agent publishes with QoS 0 or 1")
        with self._lock:
            try:
                info = self._client.publish(topic, payload, qos=qos, retain=retain)
            except ValueError as e:
                raise TransportError(f"cannot publish to {topic!r}: {e}") from e
            if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
                raise TransportError(f"paho's outgoing queue is full; {topic!r} not queued")
            if qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise TransportError(f"not connected; QoS 0 message to {topic!r} dropped")
            handle = PublishHandle(topic, info.mid, qos)
            self._handles[info.mid] = handle
        return handle

    def subscribe(self, topic: str, qos: int = 1) -> SubscribeHandle:
        """Subscribe now (or at the next connect) and again after every reconnect."""
        if qos not in (0, 1, 2):
            raise TransportError(f"invalid QoS {qos}")
        handle = SubscribeHandle(topic, qos)
        with self._lock:
            self._subscriptions[topic] = handle
            if self.connected.is_set():
                self._send_subscribe(handle)
        return handle

    def pending_acks(self) -> int:
        """Messages handed over whose acknowledgement has not come yet."""
        with self._lock:
            return len(self._handles)

    # ----------------------------------------------------------------- paho's thread: enqueue only

    @_never_raises
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._events.put(("connect", int(reason.value), bool(flags.session_present), str(reason)))

    @_never_raises
    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._events.put(("disconnect", str(reason)))

    @_never_raises
    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._events.put(("publish", mid, int(reason.value) if reason is not None else 0))

    @_never_raises
    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self._events.put(("subscribe", mid, [int(code.value) for code in codes]))

    @_never_raises
    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            log.warning("dropped a message whose topic is not UTF-8")
            return
        inbound = InboundMessage(topic, bytes(message.payload), message.qos, bool(message.retain))
        try:
            self.inbox.put_nowait(inbound)
        except queue.Full:
            self.inbox_dropped += 1
            log.error(
                "inbox full: dropped a message on %s",
                topic,
                extra={"event": "mqtt_inbox_full", "topic": topic},
            )

    # ----------------------------------------------------------------- the network thread

    def _start_network_thread(self) -> None:
        self._loop_exited.clear()
        self._network_thread = threading.Thread(
            target=self._network_main, name=f"mqtt-network-{self.device_id}", daemon=True
        )
        self._network_thread.start()

    def _network_main(self) -> None:
        try:
            while not self._stopping.is_set():
                if self._client.socket() is None:
                    self._open_connection()
                    continue
                rc = self._client.loop(_LOOP_TIMEOUT)
                self._drain_events()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._connection_lost(mqtt.error_string(rc))
            self._close_connection()
        except Exception:
            # Not expected; the supervisor starts a new loop on the same client.
            log.exception(
                "the MQTT network loop died",
                extra={"event": "mqtt_loop_died", "device_id": self.device_id},
            )
        finally:
            self._loop_exited.set()

    def _open_connection(self) -> None:
        try:
            self._client.reconnect()
        except OSError as e:  # refused, unreachable, DNS, TLS handshake
            self.last_error = str(e) or type(e).__name__
            log.warning(
                "cannot connect to %s: %s",
                self.config.url,
                self.last_error,
                extra={"event": "mqtt_connect_failed", "url": self.config.url},
            )
            self._wait_before_retry()

    def _connection_lost(self, why: str) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if (
            self._connected_at is not None
            and self._clock() - self._connected_at >= self.limits.backoff_max_seconds
        ):
            self._attempt = 0  # the connection was stable: start over from the minimum
        self._connected_at = None
        self.last_error = why
        if was_connected:
            log.warning(
                "lost the connection to %s: %s",
                self.config.url,
                why,
                extra={"event": "mqtt_connection_lost", "url": self.config.url},
            )
        self._wait_before_retry()

    def _wait_before_retry(self) -> None:
        delay = backoff_delay(
            self._attempt,
            minimum=self.limits.backoff_min_seconds,
            maximum=self.limits.backoff_max_seconds,
            rng=self._rng,
        )
        self._attempt += 1
        self._stopping.wait(delay)

    def _close_connection(self) -> None:
        """On stop: send DISCONNECT and let the loop write it (no Last Will then)."""
        if self._client.socket() is None:
            return
        self._client.disconnect()
        deadline = self._clock() + _DISCONNECT_FLUSH_SECONDS
        while self._client.socket() is not None and self._clock() < deadline:
            self._client.loop(0.05)
        self._drain_events()

    def _drain_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            kind = event[0]
            if kind == "publish":
                self._acked(event[1], event[2])
            elif kind == "subscribe":
                self._subacked(event[1], event[2])
            elif kind == "connect":
                self._connected(event[1], event[2], event[3])
            elif kind == "disconnect":
                self.connected.clear()

    def _connected(self, reason_code: int, session_present: bool, reason: str) -> None:
        if reason_code != 0:
            self.last_error = f"connection refused: {reason}"
            log.error(
                "%s refused the connection: %s",
                self.config.url,
                reason,
                extra={"event": "mqtt_connect_refused", "url": self.config.url},
            )
            return
        self._connected_at = self._clock()
        self.session_present = session_present
        self.connection_count += 1
        try:
            self._publish_presence(PresenceStatus.ONLINE, session_started_at=self._now())
        except TransportError as e:
            log.warning("could not publish online presence: %s", e)
        with self._lock:
            for handle in self._subscriptions.values():
                self._send_subscribe(handle)
            self.connected.set()
        log.info(
            "connected to %s (session present: %s)",
            self.config.url,
            session_present,
            extra={
                "event": "mqtt_connected",
                "url": self.config.url,
                "session_present": session_present,
                "connection_count": self.connection_count,
            },
        )

    def _acked(self, mid: int, reason_code: int) -> None:
        with self._lock:
            handle = self._handles.pop(mid, None)
        if handle is None:
            return
        for hook in handle._complete(reason_code):
            try:
                hook(handle)
            except Exception:
                log.exception(
                    "an on_acked hook failed; the network loop goes on",
                    extra={"event": "mqtt_hook_failed", "topic": handle.topic},
                )

    def _subacked(self, mid: int, codes: list[int]) -> None:
        with self._lock:
            handle = self._suback_waiters.pop(mid, None)
        if handle is None:
            return
        code = codes[0] if codes else 0x80
        if code >= 0x80:
            log.error(
                "the broker refused the subscription to %s",
                handle.topic,
                extra={"event": "mqtt_subscribe_refused", "topic": handle.topic},
            )
        handle._complete(code)

    def _send_subscribe(self, handle: SubscribeHandle) -> None:
        """Called with ``_lock`` held."""
        try:
            rc, mid = self._client.subscribe(handle.topic, handle.qos)
        except ValueError as e:
            log.error("cannot subscribe to %r: %s", handle.topic, e)
            return
        if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._suback_waiters[mid] = handle

    def _publish_presence(
        self, status: PresenceStatus, *, session_started_at: datetime | None = None
    ) -> PublishHandle:
        presence = Presence(
            device_id=self.device_id, status=status, session_started_at=session_started_at
        )
        return self.publish(self.presence_topic, presence.to_bytes(), qos=1, retain=True)

    # ----------------------------------------------------------------- the supervisor

    def _supervise(self) -> None:
        crashes = 0
        started = self._clock()
        while not self._stopping.is_set():
            thread = self._network_thread
            if self._loop_exited.wait(self._supervisor_interval) and thread is not None:
                thread.join(1.0)
            if self._stopping.is_set():
                return
            if thread is not None and thread.is_alive():
                continue
            if self._clock() - started >= self.limits.backoff_max_seconds:
                crashes = 0
            self._stopping.wait(
                backoff_delay(
                    crashes,
                    minimum=self.limits.backoff_min_seconds,
                    maximum=self.limits.backoff_max_seconds,
                    rng=self._rng,
                )
            )
            if self._stopping.is_set():
                return
            crashes += 1
            self.loop_restarts += 1
            log.warning(
                "restarting the MQTT network loop (restart %d)",
                self.loop_restarts,
                extra={"event": "mqtt_loop_restarted", "restarts": self.loop_restarts},
            )
            started = self._clock()
            self._start_network_thread()
