"""The embedded broker (amqtt on its own thread), driven by paho clients over MQTT 3.1.1.

Besides what the wire contract needs (retained messages, QoS 1, Last Will, persistent
sessions), these tests pin where amqtt differs from Mosquitto: MQTT 5 is refused, shared
subscriptions receive nothing, and the fixes ``server.broker`` applies hold.
"""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from server.broker import BrokerError, EmbeddedBroker
from server.errors import ConfigurationError
from shared.topics import Channel, device_topic, fleet_filter
from tests.conftest import BrokerEndpoint, Received, TestClient, Will

pytestmark = pytest.mark.broker

MakeClient = Callable[..., TestClient]


def endpoint_of(broker: EmbeddedBroker) -> BrokerEndpoint:
    return BrokerEndpoint(broker.host, broker.port, "embedded", broker.url)


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


@pytest.fixture
def connect(broker: EmbeddedBroker, mqtt_client: MakeClient) -> MakeClient:
    """``mqtt_client``, aimed at this test's embedded broker."""

    def make(client_id: str, **options: object) -> TestClient:
        return mqtt_client(client_id, endpoint=endpoint_of(broker), **options)

    return make


def test_it_starts_on_a_free_loopback_port(broker: EmbeddedBroker, connect: MakeClient) -> None:
    assert broker.running
    assert broker.host == "127.0.0.1"
    assert broker.port not in (0, 1883)
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    assert connect("probe").session_present is False


def test_retained_messages_reach_late_subscribers_with_qos_1(connect: MakeClient) -> None:
    topic = device_topic("cam-1", Channel.DESIRED)
    server = connect("server")
    server.publish(topic, b"desired v1", qos=1, retain=True)
    server.publish(topic, b"desired v2", qos=1, retain=True)

    device = connect("cam-1")
    assert device.subscribe(topic, qos=1) == 1
    assert device.expect() == Received(topic, b"desired v2", True)
    device.expect_nothing(0.2)


def test_the_last_will_is_published_and_retained(connect: MakeClient) -> None:
    topic = device_topic("cam-1", Channel.PRESENCE)
    server = connect("server")
    server.subscribe(topic)
    device = connect("cam-1", will=Will(topic, b"offline", qos=1, retain=True))
    device.publish(topic, b"online", qos=1, retain=True)
    assert server.expect().payload == b"online"

    device.drop()
    assert server.expect().payload == b"offline"
    late = connect("late")
    late.subscribe(topic)
    assert late.expect() == Received(topic, b"offline", True)


def test_a_persistent_session_gets_what_was_queued_while_away(connect: MakeClient) -> None:
    # amqtt's own AnonymousAuthPlugin would make this fail: see server.broker, fix 1.
    topic = device_topic("cam-1", Channel.ARTIFACT_BLOCK)
    device = connect("cam-1", clean_session=False)
    device.subscribe(topic, qos=1)
    device.disconnect()

    connect("server").publish(topic, b"block 0", qos=1)

    back = connect("cam-1", clean_session=False)
    assert back.session_present is True
    assert back.expect() == Received(topic, b"block 0", False)  # fix 3: RETAIN 0
    back.expect_nothing(0.2)


def test_a_clean_session_forgets_its_subscriptions(connect: MakeClient) -> None:
    topic = device_topic("cam-1", Channel.ARTIFACT_BLOCK)
    device = connect("cam-1", clean_session=False)
    device.subscribe(topic, qos=1)
    device.disconnect()
    connect("server").publish(topic, b"block 0", qos=1)

    fresh = connect("cam-1", clean_session=True)
    assert fresh.session_present is False
    fresh.expect_nothing(0.2)


def test_a_new_client_gets_only_the_retained_messages_it_subscribed_to(
    connect: MakeClient,
) -> None:
    # Without fix 2, cam-2 would receive cam-1's retained state on connect, because the
    # server subscribed to the fleet filter that matches it.
    server = connect("server")
    server.subscribe(fleet_filter(Channel.STATE))
    connect("cam-1").publish(device_topic("cam-1", Channel.STATE), b"state", qos=1, retain=True)
    assert server.expect().payload == b"state"

    device = connect("cam-2")
    device.expect_nothing(0.3)
    device.subscribe(device_topic("cam-2", Channel.DESIRED))
    device.expect_nothing(0.2)


def test_an_offline_session_queues_a_bounded_number_of_messages(
    mqtt_client: MakeClient,
) -> None:
    with EmbeddedBroker(max_queued_messages=3) as small:
        endpoint = endpoint_of(small)
        topic = device_topic("cam-1", Channel.ARTIFACT_BLOCK)
        device = mqtt_client("cam-1", clean_session=False, endpoint=endpoint)
        device.subscribe(topic, qos=1)
        device.disconnect()
        server = mqtt_client("server", endpoint=endpoint)
        for n in range(5):
            server.publish(topic, f"block {n}".encode(), qos=1)

        back = mqtt_client("cam-1", clean_session=False, endpoint=endpoint)
        got = sorted(back.expect().payload for _ in range(3))
        assert got == [b"block 0", b"block 1", b"block 2"]  # the newest are dropped
        back.expect_nothing(0.2)


def test_shared_subscriptions_are_granted_but_receive_nothing(connect: MakeClient) -> None:
    # Pins the limitation the e2e tests skip for: if amqtt learns $share, this fails.
    consumer = connect("ingest-1")
    assert consumer.subscribe(fleet_filter(Channel.TELEMETRY, share_group="ingest")) == 1
    connect("cam-1").publish(device_topic("cam-1", Channel.TELEMETRY), b"report", qos=1)
    consumer.expect_nothing(0.3)


def test_mqtt_5_clients_are_refused_cleanly(broker: EmbeddedBroker, connect: MakeClient) -> None:
    # amqtt only speaks 3.1.1: it answers CONNECT with protocol level 5 by a 3.1.1 CONNACK
    # with return code 1 ("unacceptable protocol version") and closes the connection; paho 5
    # reports that as the reason code "Unsupported protocol version".
    reasons: queue.Queue[object] = queue.Queue()
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id="mqtt5",
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    client.on_connect = lambda client, userdata, flags, reason, props: reasons.put(reason)
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        reason = reasons.get(timeout=5.0)
    finally:
        client.loop_stop()
    assert isinstance(reason, mqtt.ReasonCode)
    assert reason.is_failure
    assert str(reason) == "Unsupported protocol version"
    assert not client.is_connected()

    connect("after-mqtt5").subscribe("still/serving")  # the broker is unharmed


def test_stop_frees_the_port_and_is_idempotent(mqtt_client: MakeClient) -> None:
    first = EmbeddedBroker()
    first.start()
    port = first.port
    client = mqtt_client("connected-at-stop", endpoint=endpoint_of(first))
    first.stop()
    assert not first.running
    first.stop()
    assert first.port == port

    with EmbeddedBroker(port=port) as second:
        assert second.port == port
        mqtt_client("on-second", endpoint=endpoint_of(second))
    client.close()


def test_a_port_in_use_is_refused_with_a_clear_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        broker = EmbeddedBroker(port=port)
        with pytest.raises(BrokerError, match=rf"127\.0\.0\.1:{port} is already in use") as error:
            broker.start()
    assert isinstance(error.value, ConfigurationError)
    assert not broker.running
    broker.stop()  # nothing to stop, still fine


def test_start_twice_and_bad_ports_are_errors(broker: EmbeddedBroker) -> None:
    with pytest.raises(BrokerError, match="already running"):
        broker.start()
    with pytest.raises(BrokerError, match="invalid port"):
        EmbeddedBroker(port=70000)


def test_importing_the_broker_does_not_import_tensorflow() -> None:
    code = "import sys, server.broker; print('tensorflow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
