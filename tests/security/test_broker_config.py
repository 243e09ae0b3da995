"""The Mosquitto configuration's text and how it is kept in step (no broker needed here;
``test_broker_acl.py`` runs a real one on it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.brokerconf.errors import BrokerConfigError
from server.brokerconf.hooks import start_broker_config_writer
from server.brokerconf.render import (
    DEVICE_ACL,
    DEVICE_PASSWORDS,
    SERVICE_PASSWORDS,
    Listener,
    Login,
    MosquittoLayout,
    TlsFiles,
    fleet_files,
    render_mosquitto_conf,
    render_passwords,
)
from server.brokerconf.writer import BrokerConfigWriter, signal_reload
from server.db import create_db_engine
from server.fleet.auth import hash_password, verify_password
from server.settings import DEV_BROKER_PASSWORD, Settings
from tests.security.conftest import (
    SERVICE_PASSWORD,
    SERVICE_USER,
    enrolled_fleet,
    fleet_settings,
)

HASH = hash_password("pw", iterations=1000, salt=b"0123456789ab")
SERVICE = Login(SERVICE_USER, HASH)


def layout(tmp_path: Path, **changes: object) -> MosquittoLayout:
    tls = TlsFiles(tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem", True)
    values: dict[str, object] = {
        "directory": tmp_path,
        "device_listeners": (Listener(8883, None, tls), Listener(1883, "127.0.0.1")),
        "service_listener": Listener(1884, "127.0.0.1"),
        "pid_file": tmp_path / "mosquitto.pid",
    }
    values.update(changes)
    return MosquittoLayout(**values)  # type: ignore[arg-type]


def test_every_listener_refuses_anonymous_clients_and_only_devices_lose_their_client_ids(
    tmp_path: Path,
) -> None:
    text = render_mosquitto_conf(layout(tmp_path))
    blocks = text.split("\nlistener ")[1:]
    assert len(blocks) == 3 and "per_listener_settings true" in text
    assert all("allow_anonymous false" in block for block in blocks)
    certificates, passwords, service = blocks
    assert "use_identity_as_username true" in certificates and "password_file" not in certificates
    assert f"password_file {tmp_path / DEVICE_PASSWORDS}" in passwords
    assert all("use_username_as_clientid true" in b for b in (certificates, passwords))
    assert "use_username_as_clientid" not in service and "devices." not in service
    assert f"pid_file {tmp_path / 'mosquitto.pid'}" in text


@pytest.mark.parametrize(
    "changes",
    [
        {"directory": Path("relative")},
        {"pid_file": Path("/tmp/x\nlistener 1 0.0.0.0")},
        {"service_listener": Listener(8883)},  # a port taken twice
        {"device_listeners": ()},
        {"device_listeners": (Listener(70000),)},
        {"device_listeners": (Listener(1883, "0.0.0.0\nallow_anonymous true"),)},
        {"device_listeners": (Listener(1, None, TlsFiles(Path("/c"), Path("/k"), None, True)),)},
        {"user": "root\nallow_anonymous true"},
    ],
)
def test_a_layout_that_could_not_be_written_safely_is_refused(
    tmp_path: Path, changes: dict[str, object]
) -> None:
    with pytest.raises(BrokerConfigError):
        render_mosquitto_conf(layout(tmp_path, **changes))


@pytest.mark.parametrize(
    "login",
    [
        Login("a:b", HASH),
        Login("a\nb", HASH),
        Login("a b", HASH),
        Login("", HASH),
        Login("dev-a", HASH + "\nroot:x"),
        Login("dev-a", "plain-password"),
    ],
)
def test_nothing_is_smuggled_into_a_password_file(login: Login) -> None:
    with pytest.raises(BrokerConfigError):
        render_passwords([login])


def test_fleet_files_name_each_device_alone_and_the_service_apart() -> None:
    files = fleet_files([Login("dev-b", HASH), Login("dev-a", HASH)], SERVICE)
    acl = files[DEVICE_ACL].splitlines()
    assert acl[1:3] == ["user dev-a", "topic read ef/v1/dev/dev-a/desired"]
    assert not any(line.startswith("pattern") for line in acl)
    assert "%u" not in files[DEVICE_ACL] and "+" not in files[DEVICE_ACL]
    assert files[SERVICE_PASSWORDS].splitlines()[1] == f"{SERVICE_USER}:{HASH}"
    assert fleet_files([Login("dev-a", HASH)], SERVICE) == fleet_files(
        [Login("dev-a", HASH)], SERVICE
    )
    with pytest.raises(BrokerConfigError):
        fleet_files([Login(SERVICE_USER, HASH)], SERVICE)
    with pytest.raises(BrokerConfigError):
        fleet_files([Login("not/a/device", HASH)], SERVICE)


def service_hash(out: Path) -> str:
    return (out / SERVICE_PASSWORDS).read_text().splitlines()[1].partition(":")[2]


def test_the_writer_rewrites_only_what_changed_and_keeps_the_service_hash(
    tmp_path: Path,
) -> None:
    out = tmp_path / "conf"
    with enrolled_fleet(
        tmp_path, {"dev-a": "accepted", "dev-p": "pending"}, broker_config_dir=out
    ) as fleet:
        passwords = (out / DEVICE_PASSWORDS).read_text()
        assert "dev-a:" in passwords and "dev-p:" not in passwords
        assert oct((out / DEVICE_PASSWORDS).stat().st_mode & 0o777) == "0o640"
        engine = create_db_engine(fleet.settings.resolved_database_url)
        try:
            again = BrokerConfigWriter(
                engine, out, service_username=SERVICE_USER, service_password=SERVICE_PASSWORD
            ).refresh()
            assert again.changed == () and again.signalled is False and again.devices == 1
            fleet.client.post("/api/v1/devices/dev-p/accept")
            assert "dev-p:" in (out / DEVICE_PASSWORDS).read_text()
            other_password = BrokerConfigWriter(
                engine, out, service_username=SERVICE_USER, service_password="another-password"
            ).refresh()
            assert other_password.changed == (SERVICE_PASSWORDS,)
            assert verify_password("another-password", service_hash(out))
            # what a server does at start-up: nothing without a folder, else bring it in step
            assert start_broker_config_writer(engine, fleet_settings(tmp_path)) is None
            (out / DEVICE_ACL).write_text("# edited by hand\n")
            started = start_broker_config_writer(engine, fleet.settings)
            assert started is not None and "user dev-p" in (out / DEVICE_ACL).read_text()
        finally:
            engine.dispose()
    assert verify_password(SERVICE_PASSWORD, service_hash(out))
    assert not [name for name in os.listdir(out) if name.startswith(".") and "lock" not in name]


def test_a_reload_signal_goes_to_mosquitto_only(tmp_path: Path) -> None:
    pid_file = tmp_path / "mosquitto.pid"
    assert signal_reload(pid_file) is False  # no broker running yet
    pid_file.write_text(f"{os.getpid()}\n")  # a live process that is not mosquitto
    with pytest.raises(BrokerConfigError, match="not mosquitto"):
        signal_reload(pid_file)
    pid_file.write_text("garbage")
    with pytest.raises(BrokerConfigError, match="process id"):
        signal_reload(pid_file)


def test_the_service_identity_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    dev = Settings(broker_url="mqtt://broker:1883")
    assert dev.service_broker_url == (
        f"mqtt://server%40edgefleet:{DEV_BROKER_PASSWORD}@broker:1883"
    )
    assert Settings(broker_url="mqtt://ingest:pw@broker").service_broker_url == (
        "mqtt://ingest:pw@broker"
    )
    assert Settings().service_broker_url == "embedded"
    monkeypatch.setenv("EDGEFLEET_MODE", "prod")
    monkeypatch.setenv("EDGEFLEET_SECRET_KEY", "k" * 40)
    assert Settings().mode == "prod"  # the embedded broker does not need the password
    for used in ({"broker_url": "mqtts://broker:8883"}, {"broker_config_dir": Path("/x")}):
        with pytest.raises(ValidationError, match="development password"):
            Settings(**used)
        with pytest.raises(ValidationError, match="at least 16"):
            Settings(broker_password="short", **used)  # type: ignore[arg-type]
    strong = Settings(broker_url="mqtts://broker:8883", broker_password="p@ss:word/" * 3)  # type: ignore[arg-type]
    assert strong.service_broker_url.startswith("mqtts://server%40edgefleet:p%40ss%3Aword%2F")
    with pytest.raises(ValidationError):
        Settings(broker_username="server\nuser")
