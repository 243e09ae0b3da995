"""``edgefleet server`` on embedded defaults, as a real process: the embedded broker lets in
enrolled devices with their own credentials and the server's own clients with the service
identity, and nobody else."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from server.auth.tokens import read_admin_token
from shared.messages import Presence, PresenceStatus
from shared.topics import Channel, device_topic

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connect(port: int, client_id: str, username: str | None, password: str | None) -> bool:
    """True if the broker accepts the CONNECT."""
    outcome: dict[str, bool] = {}
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    if username is not None:
        client.username_pw_set(username, password)

    def on_connect(_c: object, _u: object, _f: object, reason: object, _p: object) -> None:
        outcome["ok"] = not reason.is_failure  # type: ignore[attr-defined]
        done.set()

    def on_disconnect(*_args: object) -> None:
        outcome.setdefault("ok", False)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        done.wait(10)
        if outcome.get("ok"):
            online = Presence(device_id=client_id, status=PresenceStatus.ONLINE)
            client.publish(
                device_topic(client_id, Channel.PRESENCE), online.to_bytes(), qos=1, retain=True
            ).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()
    return outcome.get("ok", False)


def test_the_embedded_broker_admits_enrolled_devices_only(tmp_path: Path) -> None:
    http_port, mqtt_port = free_port(), free_port()
    env = {
        **os.environ,
        "EDGEFLEET_RUN_JOBS": "false",
        "EDGEFLEET_EMBEDDED_BROKER_PORT": str(mqtt_port),
    }
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "server.cli", "server"),
            *("--data-dir", str(tmp_path / "data"), "--port", str(http_port)),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    api = f"http://127.0.0.1:{http_port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{api}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, server.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        # Operator routes take the admin token the dev-mode server wrote at its first start.
        admin = read_admin_token(tmp_path / "data")
        assert admin is not None and admin.startswith("ef_op_")
        headers = {"Authorization": f"Bearer {admin}"}
        token = httpx.post(
            f"{api}/provisioning-tokens",
            json={"auto_accept": True, "max_uses": 1},
            headers=headers,
        ).json()["token"]
        enrolled = httpx.post(
            f"{api}/enroll",
            json={
                "token": token,
                "device_id": "cam-7",
                "profile": "edge-x86_64-litert",
                "arch": "x86_64",
                "runtime": {"name": "litert", "version": "2.3.0"},
                "runtimes": {"litert": "2.3.0"},
                "agent_version": "0.1.0",
            },
        ).json()
        password = enrolled["credentials"]["password"]
        assert enrolled["credentials"]["broker_url"].endswith(f":{mqtt_port}")

        assert connect(mqtt_port, "cam-7", "cam-7", password)
        assert not connect(mqtt_port, "cam-7", "cam-7", password + "x")
        assert not connect(mqtt_port, "intruder", None, None)
        assert not connect(mqtt_port, "cam-8", "cam-8", password)
        # The server's own inventory consumer got in (with the service identity): it saw
        # the device's presence.
        deadline = time.monotonic() + 15
        while not httpx.get(f"{api}/devices/cam-7", headers=headers).json()["last_seen"]:
            assert time.monotonic() < deadline, "the inventory never heard of the device"
            time.sleep(0.2)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
