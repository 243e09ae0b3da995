"""Enrollment through the real API on a real database: tokens, accept / reject / revoke,
refusals, and the credentials that come out of it."""

from __future__ import annotations

import getpass
import threading
from datetime import timedelta
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.app import create_app
from server.errors import ServerError
from server.fleet.auth import (
    DeviceAuthenticator,
    authenticate_device,
    hash_password,
    verify_password,
)
from server.fleet.enrollment import DeviceFacts, create_token, enroll, next_status
from server.fleet.errors import DeviceAuthError, DeviceNotAcceptedError, StatusChangeError
from server.fleet.models import Device, DeviceCredential, DeviceStatus, ProvisioningToken
from tests.conftest import MosquittoProcess, mosquitto_binary, operator_client
from tests.server.fleet.conftest import (
    OTHER_PROFILE,
    PROFILE,
    START,
    Fleet,
    enroll_body,
    fleet_settings,
)

pytestmark = pytest.mark.database


def authenticate(fleet: Fleet, username: str, password: str) -> Device:
    with Session(fleet.app.state.engine) as session:
        return authenticate_device(session, username, password)


def test_a_pending_device_is_accepted_and_then_authenticates(fleet: Fleet) -> None:
    token = fleet.token(name="line 2", profile=PROFILE, max_uses=3)
    assert token["token"].startswith(f"efp.{token['id']}.")
    assert (token["state"], token["uses"], token["group"]) == ("active", 0, None)

    response = fleet.enroll(token["token"], "press-cam-07", tags={"site": "berlin"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "pending" and body["device_id"] == "press-cam-07"
    assert "pending until an operator accepts it" in body["message"]
    credentials = body["credentials"]
    assert credentials["username"] == credentials["client_id"] == "press-cam-07"
    assert len(credentials["password"]) >= 40
    assert body["root_public_key"] and len(body["root_keyid"]) == 64

    # Pending: the right password is known, but the device is not let in yet.
    with pytest.raises(DeviceNotAcceptedError, match="pending"):
        authenticate(fleet, "press-cam-07", credentials["password"])
    device = fleet.device("press-cam-07")
    assert device["status"] == "pending" and device["tags"] == {"site": "berlin"}
    assert device["enrolled_at"].startswith("2026-11-30T09:00")

    fleet.clock.advance(minutes=5)
    accepted = fleet.client.post("/api/v1/devices/press-cam-07/accept")
    assert accepted.status_code == 200 and accepted.json()["status"] == "accepted"
    assert accepted.json()["accepted_at"].startswith("2026-11-30T09:05")
    assert authenticate(fleet, "press-cam-07", credentials["password"]).id == "press-cam-07"
    with pytest.raises(DeviceAuthError, match="invalid device credentials"):
        authenticate(fleet, "press-cam-07", credentials["password"] + "x")
    with pytest.raises(DeviceAuthError, match="invalid device credentials"):
        authenticate(fleet, "nobody", credentials["password"])
    authority = DeviceAuthenticator(fleet.app.state.engine)
    assert authority.authenticate("press-cam-07", credentials["password"])
    assert not authority.authenticate("press-cam-07", "wrong")

    listed = fleet.client.get("/api/v1/provisioning-tokens").json()
    assert [(t["id"], t["uses"], t["state"]) for t in listed] == [(token["id"], 1, "active")]
    assert "token" not in listed[0] and "secret_hash" not in listed[0]
    with Session(fleet.app.state.engine) as session:
        stored = session.exec(select(DeviceCredential)).one()
        assert credentials["password"] not in stored.password_hash
        assert stored.password_hash.startswith("$7$")


def test_a_rejected_device_cannot_log_in_nor_be_accepted_until_deleted(fleet: Fleet) -> None:
    token = fleet.token(max_uses=2)
    body = fleet.enroll(token["token"], "stranger").json()
    rejected = fleet.client.post("/api/v1/devices/stranger/reject")
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    with pytest.raises(DeviceAuthError):
        authenticate(fleet, "stranger", body["credentials"]["password"])
    again = fleet.client.post("/api/v1/devices/stranger/accept")
    assert again.status_code == 409
    assert "rejected and its credentials are revoked" in again.json()["detail"]

    assert fleet.client.delete("/api/v1/devices/stranger").status_code == 204
    assert fleet.client.get("/api/v1/devices/stranger").status_code == 404
    fresh = fleet.enroll(token["token"], "stranger")
    assert fresh.status_code == 201 and fresh.json()["status"] == "pending"


def test_a_revoked_device_loses_its_credentials(fleet: Fleet) -> None:
    body = fleet.enrolled("cam-1")
    password = body["credentials"]["password"]
    assert authenticate(fleet, "cam-1", password).status == DeviceStatus.ACCEPTED
    fleet.clock.advance(hours=1)
    revoked = fleet.client.post("/api/v1/devices/cam-1/revoke")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    with pytest.raises(DeviceAuthError, match="invalid device credentials"):
        authenticate(fleet, "cam-1", password)
    assert not DeviceAuthenticator(fleet.app.state.engine).authenticate("cam-1", password)
    with Session(fleet.app.state.engine) as session:
        credential = session.exec(select(DeviceCredential)).one()
        assert credential.revoked_at == START + timedelta(hours=1)
    assert fleet.client.post("/api/v1/devices/cam-1/accept").status_code == 409
    assert fleet.client.post("/api/v1/devices/cam-1/revoke").status_code == 200  # no-op
    # An accepted device is not deleted by accident.
    other = fleet.enrolled("cam-2")
    assert other["status"] == "accepted"
    refused = fleet.client.delete("/api/v1/devices/cam-2")
    assert refused.status_code == 409 and "reject or revoke it" in refused.json()["detail"]


def test_auto_accept(fleet: Fleet) -> None:
    token = fleet.token(auto_accept=True, profile=PROFILE)
    body = fleet.enroll(token["token"], "gw-1").json()
    assert body["status"] == "accepted" and "accepted" in body["message"]
    assert authenticate(fleet, "gw-1", body["credentials"]["password"]).id == "gw-1"


def test_an_expired_token_is_refused(fleet: Fleet) -> None:
    token = fleet.token(expires_in_seconds=3600)
    fleet.clock.advance(minutes=59)
    assert fleet.enroll(token["token"], "early").status_code == 201
    token = fleet.token(expires_in_seconds=3600)
    fleet.clock.advance(hours=1)
    response = fleet.enroll(token["token"], "late")
    assert response.status_code == 403
    assert f"provisioning token {token['id']} expired at" in response.json()["detail"]
    assert fleet.client.get("/api/v1/devices/late").status_code == 404
    shown = fleet.client.get(f"/api/v1/provisioning-tokens/{token['id']}").json()
    assert (shown["state"], shown["uses"]) == ("expired", 0)


def test_a_used_up_token_is_refused(fleet: Fleet) -> None:
    token = fleet.token(max_uses=2)
    assert fleet.enroll(token["token"], "one").status_code == 201
    assert fleet.enroll(token["token"], "two").status_code == 201
    response = fleet.enroll(token["token"], "three")
    assert response.status_code == 403
    assert "is used up (2 of 2 uses)" in response.json()["detail"]
    shown = fleet.client.get(f"/api/v1/provisioning-tokens/{token['id']}").json()
    assert (shown["state"], shown["uses"]) == ("used_up", 2)


def test_a_revoked_token_is_refused_but_its_devices_stay(fleet: Fleet) -> None:
    token = fleet.token(max_uses=5, auto_accept=True)
    first = fleet.enroll(token["token"], "first").json()
    revoked = fleet.client.post(f"/api/v1/provisioning-tokens/{token['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    response = fleet.enroll(token["token"], "second")
    assert response.status_code == 403 and "was revoked" in response.json()["detail"]
    assert authenticate(fleet, "first", first["credentials"]["password"]).id == "first"


def test_unknown_and_mistyped_tokens_get_the_same_answer(fleet: Fleet) -> None:
    token = fleet.token()
    wrong_secret = token["token"][:-4] + ("AAAA" if not token["token"].endswith("AAAA") else "BBBB")
    answers = [
        fleet.enroll(text, "dev")
        for text in ("efp.0123456789ab." + "A" * 43, wrong_secret, "not-a-token", "")
    ]
    assert {r.status_code for r in answers} == {401}
    assert {r.json()["detail"] for r in answers} == {"unknown provisioning token"}
    assert fleet.client.get(f"/api/v1/provisioning-tokens/{token['id']}").json()["uses"] == 0


def test_a_token_for_another_profile_is_refused(fleet: Fleet) -> None:
    token = fleet.token(profile=OTHER_PROFILE)
    response = fleet.enroll(token["token"], "x86-box")
    assert response.status_code == 403
    assert f"is for profile {OTHER_PROFILE!r}, not {PROFILE!r}" in response.json()["detail"]


def test_an_enrolled_id_cannot_be_taken_over(fleet: Fleet) -> None:
    original = fleet.enrolled("cam-7")
    thief = fleet.token(max_uses=1, auto_accept=True)
    response = fleet.enroll(thief["token"], "cam-7", tags={"site": "elsewhere"})
    assert response.status_code == 409
    assert "already registered (status accepted)" in response.json()["detail"]
    assert fleet.device("cam-7")["tags"] == {}
    assert authenticate(fleet, "cam-7", original["credentials"]["password"]).id == "cam-7"
    # The refused attempt did not spend the token.
    assert fleet.client.get(f"/api/v1/provisioning-tokens/{thief['id']}").json()["uses"] == 0
    with Session(fleet.app.state.engine) as session:
        assert len(session.exec(select(DeviceCredential)).all()) == 1


def test_bad_facts_are_named_and_spend_nothing(fleet: Fleet) -> None:
    token = fleet.token(max_uses=5)
    bad_id = fleet.enroll(token["token"], "cam/7")
    assert bad_id.status_code == 422 and "invalid device id" in bad_id.text
    several = fleet.enroll(
        token["token"],
        "cam-8",
        profile="no-such-profile",
        tags={"profile": "x", "site": ""},
    )
    assert several.status_code == 422
    detail = several.json()["detail"]
    assert "unknown profile 'no-such-profile'; the profiles are" in detail
    assert "tag name 'profile' is reserved" in detail
    assert "tag 'site': the value must be 1-128 characters" in detail
    no_runtime = fleet.enroll(
        token["token"],
        "cam-9",
        runtime={"name": "onnxruntime", "version": "1.20.0"},
        runtimes={"onnxruntime": "1.20.0"},
    )
    assert no_runtime.status_code == 422
    assert f"profile {PROFILE!r} runs litert, which this device does not have" in no_runtime.text
    missing = fleet.client.post("/api/v1/enroll", json={"token": token["token"]})
    assert missing.status_code == 422
    assert fleet.client.get("/api/v1/provisioning-tokens").json()[0]["uses"] == 0
    assert fleet.client.get("/api/v1/devices").json() == []


def test_a_token_places_devices_in_its_static_group(fleet: Fleet) -> None:
    assert fleet.client.post("/api/v1/groups", json={"name": "line-2"}).status_code == 201
    dynamic = fleet.client.post("/api/v1/groups", json={"name": "berlin", "selector": "site=b"})
    assert dynamic.status_code == 201
    refused = fleet.client.post("/api/v1/provisioning-tokens", json={"group": "berlin"})
    assert refused.status_code == 409 and "is dynamic" in refused.json()["detail"]
    unknown = fleet.client.post("/api/v1/provisioning-tokens", json={"group": "nope"})
    assert unknown.status_code == 404
    token = fleet.token(group="line-2", max_uses=2, auto_accept=True)
    assert token["group"] == "line-2"
    assert fleet.enroll(token["token"], "cam-1").json()["group"] == "line-2"
    assert fleet.client.get("/api/v1/groups/line-2").json()["members"] == ["cam-1"]
    assert fleet.device("cam-1")["groups"] == ["line-2"]
    in_use = fleet.client.delete("/api/v1/groups/line-2")
    assert in_use.status_code == 409 and "still in use" in in_use.json()["detail"]


def test_token_limits_are_checked(fleet: Fleet) -> None:
    for body, expected in [
        ({"expires_in_seconds": 10}, "expires_in_seconds"),
        ({"max_uses": 0}, "max_uses"),
        ({"profile": "no-such-profile"}, "unknown profile 'no-such-profile'"),
    ]:
        response = fleet.client.post("/api/v1/provisioning-tokens", json=body)
        assert response.status_code == 422 and expected in response.text, body
    assert fleet.client.post("/api/v1/provisioning-tokens/nope/revoke").status_code == 404


def test_concurrent_enrollments_use_a_token_no_more_than_allowed(engine: Engine) -> None:
    with Session(engine) as session:
        issued = create_token(session, now=START, expires_in=timedelta(hours=1), max_uses=2)
        token_id = issued.record.id
        session.commit()
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def attempt(index: int) -> None:
        facts = DeviceFacts(
            device_id=f"racer-{index}",
            profile=PROFILE,
            arch="x86_64",
            runtime_name="litert",
            runtime_version="2.3.0",
            agent_version="0.1.0",
        )
        barrier.wait()
        with Session(engine) as session:
            try:
                enroll(session, token=issued.token, facts=facts, now=START)
                session.commit()
                outcomes.append("enrolled")
            except ServerError as e:
                outcomes.append(f"{e.status_code}")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["403"] * 4 + ["enrolled"] * 2
    with Session(engine) as session:
        assert session.get(ProvisioningToken, token_id).uses == 2  # type: ignore[union-attr]
        assert len(session.exec(select(Device)).all()) == 2


def test_status_changes_follow_the_rules() -> None:
    assert next_status("pending", "accept") == DeviceStatus.ACCEPTED
    assert next_status("accepted", "accept") == DeviceStatus.ACCEPTED
    assert next_status("accepted", "revoke") == DeviceStatus.REVOKED
    with pytest.raises(StatusChangeError, match="it is accepted; revoke it instead"):
        next_status("accepted", "reject")
    with pytest.raises(StatusChangeError, match="it is revoked"):
        next_status("revoked", "accept")


def test_password_hashes() -> None:
    encoded = hash_password("s3cret", iterations=1000, salt=b"0123456789ab")
    assert encoded.startswith("$7$1000$MDEyMzQ1Njc4OWFi$")
    assert verify_password("s3cret", encoded)
    assert not verify_password("s3cret!", encoded)
    assert hash_password("s3cret") != hash_password("s3cret")  # salted
    for broken in ("", "$7$", "$6$1000$AAAA$BBBB", encoded.replace("$1000$", "$0$"), encoded[:-8]):
        assert not verify_password("s3cret", broken)


def test_the_broker_hint_never_carries_the_servers_own_credentials(
    db_url: str, tmp_path: Path
) -> None:
    settings = fleet_settings(
        db_url,
        tmp_path,
        broker_url="mqtts://ingest:s3cret@broker.example:8883",
        inventory_consumer=False,
        run_jobs=False,
    )
    with operator_client(create_app(settings)) as client:
        token = client.post("/api/v1/provisioning-tokens", json={}).json()["token"]
        body = client.post("/api/v1/enroll", json=enroll_body(token, "dev-1")).json()
    assert body["credentials"]["broker_url"] == "mqtts://broker.example:8883"


def _connack(port: int, username: str, password: str) -> str:
    """The CONNACK reason a real broker gives these credentials."""
    answered = threading.Event()
    reasons: list[str] = []

    def on_connect(
        client: object, userdata: object, flags: object, reason: object, *_: object
    ) -> None:
        reasons.append(str(reason))
        answered.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username, protocol=mqtt.MQTTv311)
    client.username_pw_set(username, password)
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert answered.wait(10), "no CONNACK"
    finally:
        client.disconnect()
        client.loop_stop()
    return reasons[0]


@pytest.mark.broker
def test_a_stored_password_hash_is_a_mosquitto_password_file_line(tmp_path: Path) -> None:
    """What lets the broker configuration (issue 8) be written from the database alone."""
    binary = mosquitto_binary()
    if binary is None:
        pytest.skip("needs a mosquitto binary")
    password = "device-password-from-enrollment"
    password_file = tmp_path / "passwords"
    password_file.write_text(f"cam-1:{hash_password(password)}\n")
    password_file.chmod(0o600)
    broker = MosquittoProcess(binary, tmp_path / "broker")
    broker.conf_file.write_text(
        f"listener {broker.port} 127.0.0.1\nuser {getpass.getuser()}\n"
        f"allow_anonymous false\npassword_file {password_file}\n"
    )
    broker.start()
    try:
        assert _connack(broker.port, "cam-1", password) == "Success"
        assert _connack(broker.port, "cam-1", password + "x") != "Success"
    finally:
        broker.stop()
