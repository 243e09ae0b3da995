"""Many simulated devices over one real broker, driven by one thread.

Each :class:`~server.simulator.device.SimulatedDevice` gets its own paho-mqtt 2.x
client (its own client id, persistent session, Last Will, credentials when given),
exactly what an agent opens. A thousand paho network threads would measure the
simulator instead of the server, so the clients run on paho's *external loop*: one
selector watches every socket and the thread calls ``loop_read``/``loop_write``/
``loop_misc`` itself.

The loop is built to cost little per report, so that a thousand devices reporting every
second load the server rather than the simulator's own core:

- timers (a report due, a device's housekeeping second, a reconnect) sit in one heap,
  so a pass of the loop touches only the devices something is due for -- never all of
  them;
- writes are flushed once per pass: a publish marks its client dirty, the flush writes
  what paho holds, and only a socket that would block is watched for writability (no
  selector change per publish);
- a report's window is built by :mod:`server.simulator.windows` (tens of microseconds);
- nothing is logged per report.

What always holds: paho's callbacks only append to a list or count; devices are fed
their messages after the read round, on the same thread, so a device never sees two
messages at once. Connections open at a bounded rate (``connect_rate`` per second) and
a lost connection is re-opened with capped exponential backoff plus jitter. Telemetry
windows are staggered over the report interval so reports arrive as a steady stream
rather than a burst; a device that falls behind its schedule skips the windows it
missed (counted in ``telemetry_skipped``), never bursts. ``telemetry_acked`` counts the
reports the broker acknowledged (QoS 1 PUBACK); :meth:`FleetSimulator.stop` stops new
reports and waits (up to ``drain_timeout``) for those in flight to be acknowledged
before it disconnects, so "acknowledged" is what the broker took responsibility for.
"""

from __future__ import annotations

import contextlib
import heapq
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

_CONNECT, _MISC, _REPORT = 0, 1, 2
_MISC_INTERVAL = 1.0


@dataclass
class SimulatorStats:
    devices: int = 0
    connected: int = 0
    connects: int = 0
    disconnects: int = 0
    published: int = 0
    telemetry_sent: int = 0
    """Reports handed to the devices' clients."""
    telemetry_acked: int = 0
    """Reports the broker acknowledged (PUBACK)."""
    telemetry_skipped: int = 0
    """Report windows the schedule asked for but that were not sent (late or offline)."""
    messages_received: int = 0
    bytes_received: int = 0
    block_requests: int = 0
    installs: int = 0
    rejections: int = 0
    cpu_seconds: float = 0.0
    """CPU time of the loop's thread: what simulating the fleet cost."""
    active_versions: dict[str, int] = field(default_factory=dict)


class _Link:
    """One device's client and its connection bookkeeping."""

    __slots__ = (
        "backoff",
        "client",
        "connected",
        "device",
        "dirty",
        "next_report",
        "reconnect_due",
        "scheduled",
        "telemetry_mids",
        "write_armed",
    )

    def __init__(self, device: SimulatedDevice, client: mqtt.Client) -> None:
        self.device = device
        self.client = client
        self.connected = False
        self.reconnect_due = False  # a reconnect timer is in the heap
        self.backoff = 0.5
        self.next_report = 0.0
        self.scheduled = False  # its report and housekeeping timers run
        self.dirty = False  # paho holds bytes to write: flushed after this pass
        self.write_armed = False  # its socket is watched for writability
        self.telemetry_mids: set[int] = set()


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
        drain_timeout: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        self.port = port
        self.report_interval = report_interval
        self.inferences_per_report = inferences_per_report
        self.connect_rate = connect_rate
        self.keepalive = keepalive
        self.drain_timeout = drain_timeout
        self._clock = clock
        self._jitter = random.Random()  # noqa: S311 (backoff jitter and staggering, not crypto)
        self._credentials = credentials
        self._selector = selectors.DefaultSelector()
        self._inbox: deque[tuple[_Link, str, bytes]] = deque()
        self._dirty: list[_Link] = []
        self._timers: list[tuple[float, int, int, _Link]] = []
        self._order = 0  # tie-breaker: timers due at once run in the order they were set
        self._links = [self._link(device) for device in devices]
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # counters: written by the loop's thread only, read by stats() from any thread
        self._connects = 0
        self._disconnects = 0
        self._published = 0
        self._telemetry_sent = 0
        self._telemetry_acked = 0
        self._telemetry_skipped = 0
        self._messages_received = 0
        self._cpu_seconds = 0.0
        self._reports_enabled = report_interval > 0

    # ------------------------------------------------------------------ public

    @property
    def devices(self) -> list[SimulatedDevice]:
        return [link.device for link in self._links]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-simulator", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop sending reports, wait for those in flight to be acknowledged (at most
        ``drain_timeout``), disconnect every device; wait ``timeout`` for all of it."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.drain_timeout + 10.0 if timeout is None else timeout)

    def run_for(self, seconds: float) -> None:
        """Run on the calling thread for ``seconds`` (benchmarks)."""
        deadline = self._clock() + seconds
        self._run(until=deadline)

    def stats(self) -> SimulatorStats:
        stats = SimulatorStats(
            devices=len(self._links),
            connects=self._connects,
            disconnects=self._disconnects,
            published=self._published,
            telemetry_sent=self._telemetry_sent,
            telemetry_acked=self._telemetry_acked,
            telemetry_skipped=self._telemetry_skipped,
            messages_received=self._messages_received,
            cpu_seconds=self._cpu_seconds,
        )
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
        client.on_publish = self._on_publish
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
        if link.connected and not self._stopping.is_set():  # not the ones stop() asks for
            self._disconnects += 1
        link.connected = False
        if not self._stopping.is_set():
            self._schedule_reconnect(link, self._clock())

    def _on_message(self, client: mqtt.Client, link: _Link, message: mqtt.MQTTMessage) -> None:
        self._inbox.append((link, message.topic, bytes(message.payload)))

    def _on_publish(
        self, client: mqtt.Client, link: _Link, mid: int, reason: Any, props: Any
    ) -> None:
        if mid in link.telemetry_mids:
            link.telemetry_mids.discard(mid)
            self._telemetry_acked += 1

    def _on_socket_open(self, client: mqtt.Client, link: _Link, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.register(sock, selectors.EVENT_READ, link)
        link.write_armed = False

    def _on_socket_close(self, client: mqtt.Client, link: _Link, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        link.write_armed = False

    def _on_register_write(self, client: mqtt.Client, link: _Link, sock: Any) -> None:
        if not link.dirty:  # written at the end of this pass (see _flush)
            link.dirty = True
            self._dirty.append(link)

    def _on_unregister_write(self, client: mqtt.Client, link: _Link, sock: Any) -> None:
        if link.write_armed:
            link.write_armed = False
            with contextlib.suppress(KeyError, ValueError):
                self._selector.modify(sock, selectors.EVENT_READ, link)

    # ------------------------------------------------------------------ the loop

    def _at(self, when: float, kind: int, link: _Link) -> None:
        self._order += 1
        heapq.heappush(self._timers, (when, self._order, kind, link))

    def _schedule_reconnect(self, link: _Link, now: float) -> None:
        if link.reconnect_due:
            return
        link.reconnect_due = True
        self._at(now + link.backoff * (0.5 + self._jitter.random()), _CONNECT, link)
        link.backoff = min(link.backoff * 2, 30.0)

    def _run(self, until: float | None = None) -> None:
        cpu_start = time.thread_time() - self._cpu_seconds
        start = self._clock()
        spacing = 1.0 / self.connect_rate if self.connect_rate > 0 else 0.0
        for index, link in enumerate(self._links):  # first connections at a bounded rate
            link.reconnect_due = True
            self._at(start + index * spacing, _CONNECT, link)
        drain_until: float | None = None
        while True:
            now = self._clock()
            if drain_until is None and (
                self._stopping.is_set() or (until is not None and now >= until)
            ):
                self._reports_enabled = False
                drain_until = now + self.drain_timeout
            if drain_until is not None and (now >= drain_until or not self._in_flight()):
                break
            timeout = 0.05
            if self._timers:
                timeout = min(timeout, max(0.0, self._timers[0][0] - now))
            for key, events in self._selector.select(timeout=timeout):
                link = key.data
                if events & selectors.EVENT_READ:
                    link.client.loop_read()
                if events & selectors.EVENT_WRITE:
                    link.client.loop_write()
            self._deliver(self._clock())
            self._due(self._clock())
            self._flush()
            self._cpu_seconds = time.thread_time() - cpu_start
        self._stopping.set()  # the disconnects below are asked for, not lost connections
        for link in self._links:
            with contextlib.suppress(Exception):
                link.client.disconnect()
                link.client.loop_write()
        self._cpu_seconds = time.thread_time() - cpu_start

    def _in_flight(self) -> bool:
        return any(link.telemetry_mids for link in self._links if link.connected)

    def _due(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, kind, link = heapq.heappop(timers)
            if kind == _REPORT:
                self._report(link, now)
            elif kind == _MISC:
                self._at(now + _MISC_INTERVAL, _MISC, link)
                if link.connected:
                    link.client.loop_misc()
                    self._publish(link, link.device.tick(now))
            else:
                link.reconnect_due = False
                if not link.connected and not self._stopping.is_set():
                    self._connect(link, now)

    def _report(self, link: _Link, now: float) -> None:
        interval = self.report_interval
        if not self._reports_enabled:
            return  # stopping: no timer set again
        link.next_report += interval
        if link.next_report < now:  # fell behind: skip the missed windows, never burst
            missed = int((now - link.next_report) // interval) + 1
            self._telemetry_skipped += missed
            link.next_report += missed * interval
        self._at(link.next_report, _REPORT, link)
        if not link.connected:
            self._telemetry_skipped += 1
            return
        message = link.device.telemetry(self.inferences_per_report)
        info = link.client.publish(message.topic, message.payload, qos=message.qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:  # paho's queue is full: the window is lost
            self._telemetry_skipped += 1
            return
        link.telemetry_mids.add(info.mid)
        self._published += 1
        self._telemetry_sent += 1

    def _connect(self, link: _Link, now: float) -> None:
        try:
            link.client.connect(self.host, self.port, keepalive=self.keepalive)
        except OSError as e:
            log.debug("%s: connect failed: %s", link.device.device_id, e)
            self._schedule_reconnect(link, now)
            return
        self._connects += 1

    def _deliver(self, now: float) -> None:
        while self._inbox:
            link, topic, payload = self._inbox.popleft()
            device = link.device
            if topic == "$connected":
                for sub in device.subscriptions():
                    link.client.subscribe(sub, qos=1)
                out = device.on_connect()
                if not link.scheduled:  # the device's timers run from its first session on
                    link.scheduled = True
                    self._at(now + _MISC_INTERVAL * self._jitter.random(), _MISC, link)
                    if self._reports_enabled:  # staggered over one interval
                        link.next_report = now + self._jitter.random() * self.report_interval
                        self._at(link.next_report, _REPORT, link)
            else:
                self._messages_received += 1
                if topic.endswith(Channel.ARTIFACT_BLOCK.value):
                    out = device.on_block(payload, now)
                elif topic.endswith(Channel.DESIRED.value):
                    out = device.on_desired(payload, now)
                else:
                    out = []
            self._publish(link, out)

    def _publish(self, link: _Link, out: list[Outgoing]) -> None:
        for message in out:
            link.client.publish(
                message.topic, message.payload, qos=message.qos, retain=message.retain
            )
        self._published += len(out)

    def _flush(self) -> None:
        """Write what the clients hold; watch for writability only where it would block."""
        dirty, self._dirty = self._dirty, []
        for link in dirty:
            link.dirty = False
            client = link.client
            client.loop_write()
            if client.want_write() and not link.write_armed:
                sock = client.socket()
                if sock is not None:
                    with contextlib.suppress(KeyError, ValueError):
                        self._selector.modify(
                            sock, selectors.EVENT_READ | selectors.EVENT_WRITE, link
                        )
                        link.write_armed = True
