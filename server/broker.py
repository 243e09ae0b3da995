"""The embedded MQTT broker: what ``edgefleet server`` and ``edgefleet demo`` start when no
broker URL is configured.

It runs amqtt's :class:`amqtt.broker.Broker` on an asyncio event loop in a daemon thread that
:class:`EmbeddedBroker` owns; callers see a blocking ``start()`` / ``stop()`` and never touch
the loop. It is a development default, not a production broker:

- **MQTT 3.1.1 only.** amqtt answers an MQTT 5 CONNECT with CONNACK return code 1
  ("unacceptable protocol version") and closes the connection. The wire contract needs
  nothing beyond 3.1.1 (see ``shared.topics``).
- **No shared subscriptions.** amqtt grants a ``$share/<group>/<filter>`` subscription but
  treats it as a literal filter that matches no topic, so it receives nothing. With one
  embedded broker there is one ingestion consumer; scale-out needs Mosquitto or EMQX.
- **Open, unless given the fleet's access.** Without ``access`` every client is let in
  and may use every topic (the demo and most tests). With a
  :class:`~server.brokerconf.access.FleetAccess` it enforces what the Mosquitto
  configuration does (:mod:`server.brokerconf`): only accepted devices with their live
  password and the server's service identity log in, anonymous clients are refused, and
  every publish, subscription, delivery and Last Will is checked against
  :mod:`server.brokerconf.rules` -- a device only ever touches ``ef/v1/dev/<its id>/``,
  in the directions the contract gives it. It listens on loopback unless told otherwise.
- **Never 1883 by default.** Port 0 (the default) picks a free port, so it cannot collide
  with a local Mosquitto; ``url`` says where it ended up.
- **In memory.** Retained messages and persistent sessions live until ``stop()``; a
  persistent session left alone for :data:`SESSION_EXPIRY_SECONDS` is dropped, and at most
  ``max_queued_messages`` QoS 1/2 messages are queued for a session while it is away (newer
  ones are dropped, as Mosquitto does).

Where amqtt 0.12 departs from MQTT 3.1.1 in ways the wire contract would notice, the broker
subclass below corrects it (each fix is pinned by ``tests/server/test_embedded_broker.py``):

1. ``AnonymousAuthPlugin(allow_anonymous=True)`` marks every session anonymous, and amqtt
   neither queues messages for an anonymous session while it is away nor keeps it after a
   disconnect: ``clean_session=False`` silently behaved like ``True``. An own
   authentication plugin admits everyone without that mark.
2. On every CONNECT amqtt sent the new client the retained messages of *every* filter any
   client had subscribed to, so a device would receive other devices' retained topics.
   Retained messages now go only to the session's own subscriptions.
3. Messages queued for an offline session were delivered with the RETAIN flag set; they
   now arrive with RETAIN 0 [MQTT-3.3.1-9], like any message from an existing subscription.
4. amqtt looks a client's session up by client id -- deleting it for a clean session, or
   copying the newcomer's username, password and Last Will into it -- *before* it
   authenticates the client, and a refused client still took the session over. With
   ``access`` the broker authenticates from the CONNECT packet first; a refused client is
   answered "not authorized" and touches no session.

What amqtt 0.12 cannot enforce, even with ``access`` (tests/security/test_broker_acl.py
pins what it does enforce):

- **Client certificates as identity.** amqtt's TLS listener requests a client
  certificate but never requires one nor takes the username from it (there is no
  ``require_certificate`` / ``use_identity_as_username``). Certificate devices need
  Mosquitto; the embedded broker is plain TCP on loopback.
- **Rewriting a device's client id to its username.** Mosquitto's device listener does
  that (``use_username_as_clientid``); here a device that sends another client id than
  its own id is refused instead, which keeps one device from taking over another's
  session just the same.
- **Disconnecting a device when it is revoked.** Nothing tells amqtt to drop a live
  connection: a device revoked while connected keeps its TCP connection, but within
  :data:`~server.brokerconf.access.DEFAULT_RECHECK_SECONDS` of the revocation every
  publish it sends is dropped and nothing more is delivered to it; it cannot log in
  again. (Mosquitto disconnects it when the server makes it reload.)
- **Shared subscriptions** (above): the service identity may subscribe to
  ``$share/...`` filters, and receives nothing through them.

This module must stay importable without TensorFlow: ``edgefleet server`` imports it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.mqtt.connack import NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from amqtt.utils import gen_client_id

from server.brokerconf.rules import may_publish, may_receive, may_subscribe
from server.errors import ConfigurationError

if TYPE_CHECKING:
    from amqtt.adapters import ReaderAdapter, WriterAdapter

    from server.brokerconf.access import FleetAccess, Identity

__all__ = [
    "MAX_QUEUED_MESSAGES",
    "SESSION_EXPIRY_SECONDS",
    "BrokerError",
    "EmbeddedBroker",
]

logger = logging.getLogger(__name__)

MAX_QUEUED_MESSAGES = 1000
"""Per offline persistent session; Mosquitto's default ``max_queued_messages``."""

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
"""A persistent session disconnected for longer than this is forgotten."""

_PORT_PICK_ATTEMPTS = 3  # a port picked as free can be taken before amqtt binds it
_AMQTT_HOOKS = (
    "_initialize_client_session",
    "_authenticate",
    "_publish_retained_messages_for_subscription",
    "_publish_session_retained_messages",
    "_retain_broadcast_message",
    "_get_handler",
)


class BrokerError(ConfigurationError):
    """The embedded broker could not start or stop (busy port, bad address, timeout)."""


class EmbeddedBroker:
    """An amqtt broker on its own event loop and thread, started and stopped from sync code.

    ``EmbeddedBroker(port=0)`` listens on a free loopback port once :meth:`start` returns;
    :attr:`url` (``mqtt://127.0.0.1:<port>``) is what clients connect to. Use it as a
    context manager or call :meth:`stop`; stopping twice is harmless. With ``access`` it
    admits and confines clients as the module docstring says.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        access: FleetAccess | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise BrokerError(f"invalid port {port} for the embedded MQTT broker: use 0-65535")
        if max_queued_messages < 1:
            raise BrokerError("max_queued_messages must be at least 1")
        self._host = host
        self._requested_port = port
        self._port = port
        self._max_queued_messages = max_queued_messages
        self._access = access
        self._lock = threading.Lock()
        self._running: _Running | None = None

    # ------------------------------------------------------------------------- public

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The port it listens (or last listened) on; the requested one before :meth:`start`."""
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"mqtt://{host}:{self._port}"

    @property
    def running(self) -> bool:
        return self._running is not None

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; return once the listener accepts TCP connections.

        Raises :class:`BrokerError` when the port is taken, the address cannot be bound,
        or the broker is not up within ``timeout`` seconds.
        """
        missing = [name for name in _AMQTT_HOOKS if not hasattr(Broker, name)]
        if missing:
            raise BrokerError(
                "this amqtt version lacks what the embedded broker patches "
                f"({', '.join(missing)}); install the amqtt version pyproject.toml names"
            )
        with self._lock:
            if self._running is not None:
                raise BrokerError(f"the embedded MQTT broker is already running on {self.url}")
            deadline = time.monotonic() + timeout
            picking = self._requested_port == 0
            for attempt in range(1, (_PORT_PICK_ATTEMPTS if picking else 1) + 1):
                port = _free_port(self._host) if picking else self._requested_port
                if not picking:
                    _check_bindable(self._host, port)
                try:
                    self._running = self._launch(port, deadline, timeout)
                except _AddressInUse as e:
                    if picking and attempt < _PORT_PICK_ATTEMPTS:
                        logger.debug("free port %d was taken before the broker bound it", port)
                        continue
                    raise _in_use_error(self._host, port) from e.__cause__
                self._port = port
                logger.info("embedded MQTT broker listening on %s", self.url)
                return

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect every client, close the listener and join the thread. Idempotent."""
        with self._lock:
            running = self._running
            if running is None:
                return
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                running.loop.call_soon_threadsafe(running.stop_requested.set)
            running.thread.join(timeout)
            if running.thread.is_alive():
                raise BrokerError(f"the embedded MQTT broker did not stop within {timeout:g} s")
            self._running = None
            logger.info("embedded MQTT broker on %s stopped", self.url)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedBroker({self.url}, {state})"

    # ------------------------------------------------------------------------- the thread

    def _launch(self, port: int, deadline: float, timeout: float) -> _Running:
        startup = _Startup()
        thread = threading.Thread(
            target=self._run, args=(port, startup), name=f"mqtt-broker-{port}", daemon=True
        )
        thread.start()
        if not startup.done.wait(max(0.0, deadline - time.monotonic())):
            startup.abandon()
            thread.join(1.0)
            raise BrokerError(
                f"the embedded MQTT broker did not start on {self._host}:{port} "
                f"within {timeout:g} s"
            )
        if startup.error is not None:
            thread.join(timeout=5.0)
            raise _translate(startup.error, self._host, port)
        assert startup.loop is not None and startup.stop_requested is not None
        return _Running(thread, startup.loop, startup.stop_requested)

    def _run(self, port: int, startup: _Startup) -> None:
        try:
            asyncio.run(self._serve(port, startup))
        except Exception as e:
            if not startup.done.is_set():
                startup.error = e
                startup.done.set()
            else:
                logger.exception("the embedded MQTT broker stopped with an error")

    async def _serve(self, port: int, startup: _Startup) -> None:
        startup.loop = asyncio.get_running_loop()
        startup.stop_requested = stop_requested = asyncio.Event()
        if startup.abandoned.is_set():
            return
        try:
            broker = _FleetBroker(
                self._config(port),
                max_queued_messages=self._max_queued_messages,
                authenticates_first=self._access is not None,
            )
            await broker.start()
        except Exception as e:
            startup.error = e
            startup.done.set()
            return
        startup.done.set()
        try:
            await stop_requested.wait()
        finally:
            await broker.shutdown()

    def _config(self, port: int) -> dict[str, Any]:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            # Only our plugins: amqtt's defaults add packet/event loggers and $SYS publishing.
            "plugins": self._plugins(),
            "session_expiry_interval": SESSION_EXPIRY_SECONDS,
        }

    def _plugins(self) -> dict[str, dict[str, Any]]:
        if self._access is None:
            return {f"{__name__}.{_OpenAccess.__name__}": {}}
        return {
            f"{__name__}.{_FleetAuth.__name__}": {"access": self._access},
            f"{__name__}.{_FleetTopics.__name__}": {"access": self._access},
        }


# ----------------------------------------------------------------------------- amqtt parts

_IDENTITY = "edgefleet.identity"  # Session.attributes key: the Identity a client logged in as
_VERIFIED = "edgefleet.verified"  # set by the authentication that ran before the session lookup


class _OpenAccess(BaseAuthPlugin):
    """Admit every client without marking its session anonymous (see fix 1 above)."""

    @dataclass
    class Config:
        pass

    async def authenticate(self, *, session: Session) -> bool:
        return True


class _FleetAuth(BaseAuthPlugin):
    """Admit the service identity and accepted devices (:class:`FleetAccess`); refuse the rest.

    A Last Will on a topic the identity may not publish to is refused with the login
    (Mosquitto instead drops such a Will when it would be sent).
    """

    @dataclass
    class Config:
        access: Any = None

    async def authenticate(self, *, session: Session) -> bool:
        access: FleetAccess = self.config.access
        identity = await asyncio.to_thread(
            access.login, session.username, session.password, session.client_id
        )
        if identity is None:
            return False
        if session.will_flag and not may_publish(identity.rules, session.will_topic or ""):
            return False
        session.attributes[_IDENTITY] = identity
        return True


class _FleetTopics(BaseTopicPlugin):
    """Every publish, subscription and delivery against the identity's rules, while its
    device is still accepted."""

    @dataclass
    class Config:
        access: Any = None

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Any = None
    ) -> bool:
        identity: Identity | None = None if session is None else session.attributes.get(_IDENTITY)
        if identity is None or topic is None:
            return False
        access: FleetAccess = self.config.access
        allowed = access.cached_verdict(identity)
        if allowed is None:
            allowed = await asyncio.to_thread(access.still_allowed, identity)
        if not allowed:
            return False
        if action == Action.PUBLISH:
            return may_publish(identity.rules, topic)
        if action == Action.SUBSCRIBE:
            return may_subscribe(identity.rules, topic)
        if action == Action.RECEIVE:
            return may_receive(identity.rules, topic)
        return False


class _FleetBroker(Broker):
    """amqtt's broker with the fixes the module docstring lists."""

    def __init__(
        self, config: dict[str, Any], *, max_queued_messages: int, authenticates_first: bool
    ) -> None:
        super().__init__(config)
        self._max_queued_messages = max_queued_messages
        self._authenticates_first = authenticates_first

    async def _initialize_client_session(
        self, reader: ReaderAdapter, writer: WriterAdapter, remote_address: str, remote_port: int
    ) -> tuple[BrokerProtocolHandler, Session]:
        # Fix 4: authenticate before any session is looked up, deleted or taken over. The
        # rest follows amqtt 0.12's own method.
        if not self._authenticates_first:
            return await super()._initialize_client_session(
                reader, writer, remote_address, remote_port
            )
        try:
            handler, incoming = await BrokerProtocolHandler.init_from_connect(
                reader, writer, self.plugins_manager
            )
        except MQTTError:
            await writer.close()
            raise
        except NoDataError as e:
            raise AMQTTError(e) from e
        if not await super()._authenticate(incoming, None):
            refusal = ConnackPacket.build(0, NOT_AUTHORIZED)
            await refusal.to_stream(writer)
            await writer.close()
            raise MQTTError(
                f"refused {incoming.client_id!r} (username {incoming.username!r}) from "
                f"{remote_address}:{remote_port}: not authorized"
            )
        incoming.attributes[_VERIFIED] = True
        session = incoming
        if incoming.clean_session:
            if incoming.client_id:
                await self._delete_session(incoming.client_id)
            else:
                incoming.client_id = gen_client_id()
            incoming.parent = 0
        elif incoming.client_id in self._sessions:
            session, _ = self._sessions[incoming.client_id]
            for name in (
                "will_flag",
                "will_message",
                "will_topic",
                "will_qos",
                "will_retain",
                "keep_alive",
                "username",
                "password",
            ):
                setattr(session, name, getattr(incoming, name))
            session.attributes.update(incoming.attributes)
            session.parent = 1
        else:
            incoming.parent = 0
        delay = self.config.get("timeout-disconnect-delay", 0)
        if session.keep_alive > 0 and isinstance(delay, int):
            session.keep_alive += delay
        return handler, session

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        if session.attributes.pop(_VERIFIED, False):  # fix 4 already authenticated it
            return True
        return await super()._authenticate(session, listener)

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # Fix 2: amqtt also calls this on CONNECT for every filter of every client.
        topic_filter = subscription[0]
        subscribers = self.subscriptions.get(topic_filter, [])
        if any(subscriber.client_id == session.client_id for subscriber, _ in subscribers):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    async def _publish_session_retained_messages(self, session: Session) -> None:
        # Fix 3: what was queued while the session was away goes out with RETAIN 0.
        handler = self._get_handler(session)
        if handler is None:
            return
        deliveries = []
        while not session.retained_messages.empty():
            queued = session.retained_messages.get_nowait()
            deliveries.append(
                asyncio.ensure_future(
                    handler.mqtt_publish(queued.topic, queued.data, queued.qos, retain=False)
                )
            )
        if deliveries:
            await asyncio.wait(deliveries)

    async def _retain_broadcast_message(
        self, broadcast: dict[str, Any], qos: int, target_session: Session
    ) -> None:
        if target_session.retained_messages.qsize() >= self._max_queued_messages:
            logger.warning(
                "dropped a message on %s for offline client %s: %d messages already queued",
                broadcast.get("topic"),
                target_session.client_id,
                self._max_queued_messages,
            )
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)


# ----------------------------------------------------------------------------- helpers


@dataclass(frozen=True, slots=True)
class _Running:
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    stop_requested: asyncio.Event


class _Startup:
    """What the broker thread reports back to ``start()``."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.abandoned = threading.Event()
        self.error: Exception | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop_requested: asyncio.Event | None = None

    def abandon(self) -> None:
        """``start()`` gave up: stop the broker if it still comes up."""
        self.abandoned.set()
        if self.loop is not None and self.stop_requested is not None:
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self.stop_requested.set)


class _AddressInUse(Exception):
    pass


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _free_port(host: str) -> int:
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
            return port
    except OSError as e:
        raise _bind_error(host, 0, e) from e


def _check_bindable(host: str, port: int) -> None:
    """Fail early, with a clear message, where amqtt would log a traceback first."""
    try:
        with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
            # as asyncio.start_server(reuse_address=True) does: TIME_WAIT is no obstacle
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise _bind_error(host, port, e) from e


def _in_use_error(host: str, port: int) -> BrokerError:
    return BrokerError(
        f"cannot start the embedded MQTT broker: {host}:{port} is already in use "
        "(another broker?); choose another port, 0 for any free one, or give a broker URL"
    )


def _bind_error(host: str, port: int, error: OSError) -> BrokerError:
    if error.errno == errno.EADDRINUSE:
        return _in_use_error(host, port)
    reason = error.strerror or str(error)
    return BrokerError(f"cannot start the embedded MQTT broker on {host}:{port}: {reason}")


def _translate(error: Exception, host: str, port: int) -> Exception:
    """Turn amqtt's start-up failure into a BrokerError (or _AddressInUse, to retry)."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError):
            if cause.errno == errno.EADDRINUSE:
                in_use = _AddressInUse()
                in_use.__cause__ = error
                return in_use
            translated = _bind_error(host, port, cause)
            translated.__cause__ = error
            return translated
        cause = cause.__cause__ or cause.__context__
    translated = BrokerError(f"the embedded MQTT broker could not start on {host}:{port}: {error}")
    translated.__cause__ = error
    return translated
