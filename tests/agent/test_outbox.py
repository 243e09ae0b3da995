"""The durable outbox: bounds, drop accounting, seq across restarts, and delivery over a real
broker that goes away and comes back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config import BrokerConfig, Limits
from agent.outbox import Outbox, OutboxError, OutboxPublisher
from agent.transport import MqttTransport
from shared.messages import TelemetryReport
from shared.topics import Channel, device_topic
from tests.conftest import MosquittoProcess, TestClient

ROOT = Path(__file__).resolve().parents[2]
FAST = Limits(backoff_min_seconds=0.05, backoff_max_seconds=0.5)
WINDOW_START = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """A bounded poll on a condition (no event exists for 'the outbox is empty')."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.01)


def json_payload(seq: int, dropped: int) -> bytes:
    return json.dumps({"seq": seq, "dropped": dropped}).encode()


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    box = Outbox(tmp_path / "outbox.db", max_rows=1000, max_bytes=1 << 20)
    yield box
    box.close()


# ----------------------------------------------------------------------------- on disk only


def test_put_pending_ack_in_order(outbox: Outbox) -> None:
    ids = [outbox.put("t/a", f"m{i}".encode()) for i in range(5)]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert [m.payload for m in outbox.pending(10)] == [f"m{i}".encode() for i in range(5)]
    assert [m.row_id for m in outbox.pending(2, after=ids[1])] == ids[2:4]
    assert outbox.depth() == 5 and outbox.bytes() == 5 * (3 + 2)
    outbox.ack(ids[0])
    outbox.ack_many([ids[2], ids[2], 999_999])  # twice, and one that never existed
    assert [m.row_id for m in outbox.pending(10)] == [ids[1], ids[3], ids[4]]
    assert outbox.depth() == 3 and outbox.bytes() == 3 * 5
    assert outbox.take_dropped() == 0


def test_row_bound_drops_oldest_first_and_reports_then_resets(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=5, max_bytes=1 << 20) as box:
        ids = [box.put("t", bytes([i])) for i in range(8)]
        assert [m.row_id for m in box.pending(100)] == ids[3:]
        assert box.depth() == 5
        assert box.take_dropped() == 3
        assert box.take_dropped() == 0


def test_byte_bound_drops_oldest_first(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=100, max_bytes=100) as box:
        ids = [box.put("t", b"x" * 30) for _ in range(4)]  # 31 bytes each with the topic
        assert box.bytes() == 93 and box.depth() == 3
        assert [m.row_id for m in box.pending(10)] == ids[1:]
        box.put("t", b"y" * 90)  # needs every older row gone
        assert box.depth() == 1 and box.bytes() == 91
        assert box.take_dropped() == 4
        with pytest.raises(OutboxError, match="cannot fit"):
            box.put("t", b"z" * 100)
        assert box.depth() == 1  # the refused put changed nothing


def test_drop_count_and_seq_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_rows=2, max_bytes=1 << 20) as box:
        seqs = [box.next_seq() for _ in range(3)]
        for i in range(5):
            box.put("t", bytes([i]))
        for message in box.pending(10):
            box.ack(message.row_id)  # an empty outbox must not reset the seq
        last_row = box.put("t", b"last")
    with Outbox(path, max_rows=2, max_bytes=1 << 20) as box:
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        assert box.next_seq() == seqs[-1] + 1
        assert box.take_dropped() == 3
        assert box.depth() == 1 and box.bytes() == 5
        box.ack(last_row)
        assert box.put("t", b"again") > last_row  # row ids are never reused either


def test_put_report_carries_seq_and_dropped_atomically(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=3, max_bytes=1 << 20) as box:
        seqs = [box.put_report("t", json_payload) for _ in range(3)]
        assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
        box.put_report("t", json_payload)  # drops the first
        box.put_report("t", json_payload)  # carries that drop, drops the second

        def broken(seq: int, dropped: int) -> bytes:
            raise ValueError("cannot encode")

        with pytest.raises(ValueError, match="cannot encode"):
            box.put_report("t", broken)  # rolled back: no seq used, no count taken
        last = json.loads(box.pending(10)[-1].payload)
        assert last == {"seq": seqs[0] + 4, "dropped": 1}
        assert box.put_report("t", json_payload) == seqs[0] + 5


def test_drops_are_never_lost_when_reports_carrying_them_are_dropped(tmp_path: Path) -> None:
    """Gaps in seq that reach the server always equal the dropped_reports it receives."""
    with Outbox(tmp_path / "o.db", max_rows=5, max_bytes=1 << 20) as box:
        seqs = [box.put_report("t", json_payload) for _ in range(50)]
        survivors = [json.loads(m.payload) for m in box.pending(100)]
        assert [s["seq"] for s in survivors] == seqs[-5:]
        reported = sum(s["dropped"] for s in survivors) + box.dropped()
        assert reported == 45  # every dropped report is accounted for, none twice
        box.discard([box.pending(1)[0].row_id])  # a refused report counts as dropped too
        assert box.dropped() + sum(json.loads(m.payload)["dropped"] for m in box.pending(9)) == 46


def test_seq_strictly_increases_across_a_sigkilled_writer(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    script = (
        "import sys\n"
        "from agent.outbox import Outbox\n"
        "box = Outbox(sys.argv[1], max_rows=100000, max_bytes=1 << 30)\n"
        "while True:\n"
        "    seq = box.put_report('t', lambda s, d: b'%d' % s)\n"
        "    print(seq, flush=True)\n"
    )
    writer = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert writer.stdout is not None
        printed = [int(writer.stdout.readline()) for _ in range(30)]
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    assert printed == list(range(printed[0], printed[0] + 30))
    with Outbox(path, max_rows=100000, max_bytes=1 << 30) as box:
        stored = [int(m.payload) for m in box.pending(100000)]
        assert set(printed) <= set(stored)  # what was committed stays committed
        assert stored == sorted(stored) and len(set(stored)) == len(stored)
        assert box.next_seq() > max(stored)


# ----------------------------------------------------------------------------- over a broker


class Device:
    """A transport, an outbox and its publisher for one device."""

    def __init__(
        self, broker: MosquittoProcess, path: Path, *, window: int = 8, max_rows: int = 1000
    ) -> None:
        self.device_id = f"box-{uuid.uuid4().hex[:8]}"
        self.topic = device_topic(self.device_id, Channel.TELEMETRY)
        self.outbox = Outbox(path, max_rows=max_rows, max_bytes=1 << 24)
        self.transport = MqttTransport(
            BrokerConfig(url=broker.endpoint.url, keepalive=5),
            device_id=self.device_id,
            limits=FAST,
        )
        self.publisher = OutboxPublisher(self.outbox, self.transport, window=window)
        self.transport.start()
        self.publisher.start()
        assert self.transport.connected.wait(10)

    def report(self) -> int:
        def build(seq: int, dropped: int) -> bytes:
            return TelemetryReport(
                device_id=self.device_id,
                seq=seq,
                window_start=WINDOW_START,
                window_end=WINDOW_START,
                dropped_reports=dropped,
            ).to_bytes()

        return self.publisher.put_report(self.topic, build)

    def close(self) -> None:
        self.publisher.stop()
        self.transport.stop()
        self.outbox.close()


def receive_reports(subscriber: TestClient, want: set[int], timeout: float = 20.0) -> list:
    """Reports until every seq in ``want`` was seen (duplicates kept), or the timeout."""
    reports: list[TelemetryReport] = []
    deadline = time.monotonic() + timeout
    while not want <= {r.seq for r in reports}:
        left = deadline - time.monotonic()
        if left <= 0:
            missing = sorted(want - {r.seq for r in reports})
            raise AssertionError(f"reports never arrived: {missing}")
        reports.append(TelemetryReport.from_bytes(subscriber.expect(timeout=left).payload))
    reports.extend(TelemetryReport.from_bytes(r.payload) for r in subscriber.drain(wait=0.2))
    return reports


@pytest.fixture
def device_factory(tmp_path: Path) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(broker: MosquittoProcess, **kwargs: int) -> Device:
        device = Device(broker, tmp_path / f"outbox-{len(made)}.db", **kwargs)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


@pytest.mark.broker
def test_reports_put_while_the_broker_is_down_all_arrive_once_it_is_back(
    mosquitto_factory: Callable[[], MosquittoProcess],
    mqtt_client: Callable[..., TestClient],
    device_factory: Callable[..., Device],
) -> None:
    """The done-when of issue 4: stop the broker, pile up 50 reports, restart, none lost."""
    broker = mosquitto_factory()
    device = device_factory(broker)
    subscriber_id = f"ingest-{device.device_id}"
    subscriber = mqtt_client(subscriber_id, clean_session=False, endpoint=broker.endpoint)
    subscriber.subscribe(device.topic)

    before = {device.report() for _ in range(5)}
    assert {r.seq for r in receive_reports(subscriber, before)} == before
    wait_until(lambda: device.outbox.depth() == 0, what="the outbox to empty")

    broker.stop()  # SIGTERM: Mosquitto saves the subscriber's persistent session
    wait_until(lambda: not device.transport.connected.is_set(), what="the device to notice")
    during = {device.report() for _ in range(50)}
    assert device.outbox.depth() == 50
    broker.start()

    subscriber = mqtt_client(subscriber_id, clean_session=False, endpoint=broker.endpoint)
    reports = receive_reports(subscriber, during)
    seqs = [r.seq for r in reports]
    # No PUBACK could be lost here (nothing was in flight when the broker stopped), so
    # every report arrives exactly once.
    assert sorted(seqs) == sorted(during)
    assert sorted(before | during) == list(range(min(before), max(during) + 1))
    assert all(r.dropped_reports == 0 for r in reports)
    wait_until(lambda: device.outbox.depth() == 0, what="the outbox to empty")
    assert device.publisher.max_in_flight_seen <= device.publisher.window
    assert device.transport.connection_count == 2


@pytest.mark.broker
def test_reports_dropped_while_the_broker_is_down_are_reported(
    mosquitto_factory: Callable[[], MosquittoProcess],
    mqtt_client: Callable[..., TestClient],
    device_factory: Callable[..., Device],
) -> None:
    broker = mosquitto_factory()
    device = device_factory(broker, max_rows=20)
    subscriber_id = f"ingest-{device.device_id}"
    mqtt_client(subscriber_id, clean_session=False, endpoint=broker.endpoint).subscribe(
        device.topic
    )
    broker.stop()
    wait_until(lambda: not device.transport.connected.is_set(), what="the device to notice")
    put = [device.report() for _ in range(50)]
    assert device.outbox.depth() == 20
    broker.start()
    subscriber = mqtt_client(subscriber_id, clean_session=False, endpoint=broker.endpoint)
    survivors = receive_reports(subscriber, set(put[-20:]))
    wait_until(lambda: device.outbox.depth() == 0, what="the outbox to empty")
    final = device.report()  # carries the drops no delivered report has counted yet
    reports = survivors + receive_reports(subscriber, {final})
    assert sorted({r.seq for r in reports}) == [*put[-20:], final]
    assert sum(r.dropped_reports for r in reports) == 30  # exactly the gap in seq
    wait_until(lambda: device.outbox.depth() == 0, what="the outbox to empty")


@pytest.mark.broker
def test_unacknowledged_rows_are_sent_again_after_a_reconnect(
    mosquitto_factory: Callable[[], MosquittoProcess],
    mqtt_client: Callable[..., TestClient],
    device_factory: Callable[..., Device],
) -> None:
    broker = mosquitto_factory()
    device = device_factory(broker, window=4)
    subscriber_id = f"ingest-{device.device_id}"
    subscriber = mqtt_client(subscriber_id, clean_session=False, endpoint=broker.endpoint)
    subscriber.subscribe(device.topic)
    # A round trip handled after the SUBSCRIBE proves Mosquitto has saved the session
    # (autosave_on_changes writes at the end of the iteration that changed it).
    receive_reports(subscriber, {device.report()})
    wait_until(lambda: device.outbox.depth() == 0, what="the outbox to empty")
    process = broker._process
    assert process is not None
    os.kill(process.pid, signal.SIGSTOP)  # the broker reads nothing and acks nothing
    try:
        put = {device.report() for _ in range(10)}
        wait_until(lambda: device.publisher.in_flight == 4, what="a full in-flight window")
        assert device.outbox.depth() == 10  # nothing deleted without its PUBACK
    finally:
        broker.kill()  # SIGKILL works on a stopped process; the sockets close
    broker.start()
    subscriber = mqtt_client(subscriber_id, clean_session=False, endpoint=broker.endpoint)
    reports = receive_reports(subscriber, put)
    assert {r.seq for r in reports} == put  # duplicates would be fine; losses are not
    wait_until(lambda: device.outbox.depth() == 0, what="the outbox to empty")
    assert device.publisher.max_in_flight_seen == 4


def test_the_write_ahead_log_shrinks_back_after_a_burst(tmp_path: Path) -> None:
    """A burst of reports (here 8 MB, sent and acknowledged) must not grow the WAL to
    SQLite's default 4 MB on a small device disk: it is checkpointed at the limit."""
    from agent.outbox import _WAL_SIZE_LIMIT

    wal = tmp_path / "outbox.db-wal"
    with Outbox(tmp_path / "outbox.db", max_rows=100_000, max_bytes=64 << 20) as box:
        payload = os.urandom(4096)
        peak = 0
        for _ in range(2000):
            box.ack(box.put("ef/v1/dev/d1/telemetry", payload))
            peak = max(peak, wal.stat().st_size if wal.exists() else 0)
    # SQLite's default would let it reach 4 MB and stay there; one transaction over the
    # limit is the most it may exceed it by
    assert peak <= _WAL_SIZE_LIMIT + 64 * 1024
