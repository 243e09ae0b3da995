"""Many simulated devices over one real broker, driven by one thread.

Each :class:`~server.simulator.device.SimulatedDevice` gets its own paho-mqtt 2.x
client (its own client id, persistent session, Last Will, credentials when given),
exactly what an agent opens. A thousand paho network threads would measure the
simulator instead of the server, so the clients run on paho's *external loop*: one
selector watches every socket, paho's ``on_socket_*`` callbacks keep the selector's
interest up to date, and the thread calls ``loop_read``/``loop_write``/``loop_misc``.

What always holds: paho's callbacks only append to a list; devices are fed their
messages after the read round, on the same thread, so a device never sees two
messages at once. Connections open at a bounded rate (``connect_rate`` per second) and
a lost connection is re-opened with capped exponential backoff plus jitter.
Telemetry windows are staggered over the report interval so reports arrive as a
steady stream rather than a burst.
"""

from __future__ import annotations

import contextlib
import logging
import random
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from server.simulator.device import Outgoing, SimulatedDevice
from shared.topics import Channel

__all__ = ["FleetSimulator", "SimulatorStats"]

log = logging.getLogger(__name__)


@dataclass
class SimulatorStats:
    devices: int = 0
    connected: int = 0
    connects: int = 0
    disconnects: int = 0
    published: int = 0
    telemetry_sent: int = 0
    messages_received: int = 0
    bytes_received: int = 0
    block_requests: int = 0
    installs: int = 0
    rejections: int = 0
    active_versions: dict[str, int] = field(default_factory=dict)


class _Link:
    """One device's client and its connection bookkeeping."""

    def __init__(self, device: SimulatedDevice, client: mqtt.Client) -> None:
        self.device = device
        self.client = client
        self.connected = False
        self.reconnect_at = 0.0
        self.backoff = 0.5
        self.next_report = 0.0
        self.next_misc = 0.0


class FleetSimulator:
    """Run ``devices`` against the broker at ``host:port`` until :meth:`stop`."""

    def __init__(
        self,
        devices: Iterable[SimulatedDevice],
        *,
        host: str,
        port: int,
        credentials: Callable[[str], tuple[str, str] | None] | None = None,
        report_interval: float = 10.0,
        inferences_per_report: int = 100,
        connect_rate: float = 200.0,
        keepalive: int = 60,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self.report_interval = report_interval
        self.inferences_per_report = inferences_per_report
        self.connect_rate = connect_rate
        self.keepalive = keepalive
        self._clock = clock
        self._jitter = random.Random()  # noqa: S311 (backoff jitter and staggering, not crypto)
        self._credentials = credentials
        self._selector = selectors.DefaultSelector()
        self._inbox: deque[tuple[_Link, str, bytes]] = deque()
        self._links = [self._link(device) for device in devices]
        self._by_socket: dict[int, _Link] = {}
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stats = SimulatorStats(devices=len(self._links))
        self._reports_enabled = report_interval > 0

    # ------------------------------------------------------------------ public

    @property
    def devices(self) -> list[SimulatedDevice]:
        return [link.device for link in self._links]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-simulator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_for(self, seconds: float) -> None:
        """Run on the calling thread for ``seconds`` (benchmarks)."""
        deadline = self._clock() + seconds
        self._run(until=deadline)

    def stats(self) -> SimulatorStats:
        with self._lock:
            stats = SimulatorStats(**{**self._stats.__dict__})
        versions: dict[str, int] = {}
        for link in self._links:
            for name, active in list(link.device.active.items()):
                key = f"{name}@{active.deployment.model_version}"
                versions[key] = versions.get(key, 0) + 1
        stats.active_versions = versions
        stats.connected = sum(1 for link in self._links if link.connected)
        stats.bytes_received = sum(link.device.bytes_received for link in self._links)
        stats.block_requests = sum(link.device.requests_sent for link in self._links)
        stats.installs = sum(link.device.installs for link in self._links)
        stats.rejections = sum(link.device.rejections for link in self._links)
        return stats

    # ------------------------------------------------------------------ clients

    def _link(self, device: SimulatedDevice) -> _Link:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device.device_id,
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        link = _Link(device, client)
        will = device.will()
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        if self._credentials is not None:
            creds = self._credentials(device.device_id)
            if creds is not None:
                client.username_pw_set(*creds)
        client.max_queued_messages_set(1000)
        client.user_data_set(link)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return link

    # paho callbacks: bookkeeping only, never raise
    def _on_connect(
        self, client: mqtt.Client, link: _Link, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("%s: connection refused: %s", link.device.device_id, reason)
            return
        link.connected = True
        link.backoff = 0.5
        self._inbox.append((link, "$connected", b""))

    def _on_disconnect(
        self, client: mqtt.Client, link: _Link, flags: Any, reason: Any, props: Any
    ) -> None:
        if link.connected:
            with self._lock:
                self._stats.disconnects += 1
        link.connected = False
        link.reconnect_at = self._clock() + link.backoff * (0.5 + self._jitter.random())
        link.backoff = min(link.backoff * 2, 30.0)

    def _on_message(self, client: mqtt.Client, link: _Link, message: mqtt.MQTTMessage) -> None:
        self._inbox.append((link, message.topic, bytes(message.payload)))

    def _on_socket_open(self, client: mqtt.Client, link: _Link, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.register(sock, selectors.EVENT_READ, link)

    def _on_socket_close(self, client: mqtt.Client, link: _Link, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _on_register_write(self, client: mqtt.Client, link: _Link, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link)

    def _on_unregister_write(self, client: mqtt.Client, link: _Link, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.modify(sock, selectors.EVENT_READ, link)

    # ------------------------------------------------------------------ the loop

    def _run(self, until: float | None = None) -> None:
        pending = deque(self._links)  # not yet connected for the first time
        next_connect = self._clock()
        spacing = 1.0 / self.connect_rate if self.connect_rate > 0 else 0.0
        while not self._stopping.is_set() and (until is None or self._clock() < until):
            now = self._clock()
            while pending and now >= next_connect:
                self._connect(pending.popleft(), now)
                next_connect += spacing
            for key, events in self._selector.select(timeout=0.05):
                link = key.data
                if events & selectors.EVENT_READ:
                    link.client.loop_read(10)
                if events & selectors.EVENT_WRITE:
                    link.client.loop_write()
            self._deliver(self._clock())
            self._housekeeping(self._clock())
        for link in self._links:
            with contextlib.suppress(Exception):
                link.client.disconnect()
                link.client.loop_write()

    def _connect(self, link: _Link, now: float) -> None:
        try:
            link.client.connect(self.host, self.port, keepalive=self.keepalive)
        except OSError as e:
            log.debug("%s: connect failed: %s", link.device.device_id, e)
            link.reconnect_at = now + link.backoff * (0.5 + self._jitter.random())
            link.backoff = min(link.backoff * 2, 30.0)
            return
        with self._lock:
            self._stats.connects += 1
        link.next_misc = now + 1.0
        if self._reports_enabled:  # staggered over one interval
            link.next_report = now + self._jitter.random() * self.report_interval

    def _deliver(self, now: float) -> None:
        while self._inbox:
            link, topic, payload = self._inbox.popleft()
            device = link.device
            if topic == "$connected":
                for sub in device.subscriptions():
                    link.client.subscribe(sub, qos=1)
                out = device.on_connect()
            else:
                with self._lock:
                    self._stats.messages_received += 1
                if topic.endswith(Channel.ARTIFACT_BLOCK.value):
                    out = device.on_block(payload, now)
                elif topic.endswith(Channel.DESIRED.value):
                    out = device.on_desired(payload, now)
                else:
                    out = []
            self._publish(link, out)

    def _housekeeping(self, now: float) -> None:
        for link in self._links:
            if not link.connected:
                if link.reconnect_at and now >= link.reconnect_at:
                    link.reconnect_at = 0.0
                    self._connect(link, now)
                continue
            if now >= link.next_misc:
                link.next_misc = now + 1.0
                link.client.loop_misc()
                self._publish(link, link.device.tick(now))
            if self._reports_enabled and now >= link.next_report:
                link.next_report += self.report_interval
                if link.next_report < now:  # fell behind: skip, never burst
                    link.next_report = now + self.report_interval
                self._publish(link, [link.device.telemetry(self.inferences_per_report)])
                with self._lock:
                    self._stats.telemetry_sent += 1

    def _publish(self, link: _Link, out: list[Outgoing]) -> None:
        for message in out:
            link.client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )
        if out:
            with self._lock:
                self._stats.published += len(out)
            if link.client.want_write():
                link.client.loop_write()
