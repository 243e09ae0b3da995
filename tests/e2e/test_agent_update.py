"""An agent version rolled out over a device group, end to end, with real agent processes.

The server runs with its whole lifespan (engine, publisher, block server, ingestion,
inventory) behind uvicorn on a real Mosquitto; three devices are ``edgefleet-agent
launch`` processes enrolled with ``edgefleet-agent enroll``, each running its agent as a
child, and a model version from the real pipeline is rolled out to them first, so every
agent serves a model and self-tests it when a new version of the agent starts.

- A good release -- this checkout built by ``edgefleet agent-releases build --version
  0.1.1`` -- rolled out in two phases (``1dev,100``): the canary switches first, then
  the rest; the rollout completes; each device runs 0.1.1 from ``versions/0.1.1`` that
  ``current`` names, says so in its state, and still answers with the model it had.
- A broken release (its agent exits at start) with a failure budget of 0 and
  ``on_breach=abort``: the canary installs it, its launcher goes back by itself
  (``agent_crashed``), the server records the failure with that reason and aborts at the
  canary; no other device is ever sent the release, and the canary runs 0.1.0 again.

The second scenario, the cheaper one, also runs on PostgreSQL when
``EDGEFLEET_TEST_DATABASE_URL`` is set. Nothing is faked; the only waits are for the
processes, the broker and the engine.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlmodel import Session, col, select

from agent.selfupdate import INSTALL_MARKER
from server.app import create_app
from server.db import create_db_engine
from server.rollouts.models import DeviceEventRecord, IssuedManifestRecord
from server.settings import Settings
from shared.messages import DeviceState
from shared.topics import Channel, device_topic
from tests.agent.selfupdate_wheels import BROKEN_AT_START, REPO, build_wheel
from tests.conftest import BrokerEndpoint, TestClient, admin_token, free_port
from tests.e2e.agent_update_support import (
    LaunchedDevice,
    build_release,
    cli,
    cli_json,
    enroll_device,
    wait_until,
)
from tests.server.conftest import DATABASES, database_url, drop_everything, private_schema
from tests.server.fleet.conftest import serve
from tests.server.rollouts.harness import (
    ACTIVATION_ONLY,
    MODEL,
    PROFILE,
    Clock,
    publish_versions,
    trained_digits,
)

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BASE = "0.1.0"  # what the devices run: this checkout's installed version (checked at start)
GOOD = "0.1.1"
BROKEN = "0.1.2"
GROUP = "line"
DEVICES = 3
WAIT = 90.0


@dataclass
class Fleet:
    url: str
    app: Any
    devices: dict[str, LaunchedDevice]
    model_version: int
    samples: list[list[float]]
    http: httpx.Client

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        shown: dict[str, Any] = cli_json(self.url, "rollouts", "show", rollout_id)
        return shown

    def wait_rollout(self, rollout_id: str, *statuses: str) -> dict[str, Any]:
        def settled() -> dict[str, Any] | None:
            shown = self.http.get(f"/rollouts/{rollout_id}").json()
            return shown if shown["status"] in statuses else None

        try:
            wait_until(settled, WAIT, f"rollout {rollout_id} {' or '.join(statuses)}")
        except AssertionError as e:
            tails = "\n".join(f"--- {d}\n{x.log_tail(15)}" for d, x in self.devices.items())
            raise AssertionError(f"{e}\n{tails}") from None
        return self.rollout(rollout_id)

    def create_rollout(self, **body: Any) -> dict[str, Any]:
        response = self.http.post("/rollouts", json={"group": GROUP, **body})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created

    def publish(self, wheel: Path) -> dict[str, Any]:
        published: dict[str, Any] = cli_json(self.url, "agent-releases", "publish", str(wheel))
        return published

    def issued_agents(self, device_id: str) -> list[str | None]:
        """The agent version each desired state issued to ``device_id`` named, oldest first."""
        with Session(self.app.state.engine) as session:
            records = session.exec(
                select(IssuedManifestRecord)
                .where(IssuedManifestRecord.device_id == device_id)
                .order_by(col(IssuedManifestRecord.manifest_version))
            ).all()
        return [json.loads(r.agent_json)["version"] if r.agent_json else None for r in records]

    def agent_events(self, device_id: str, version: str) -> list[DeviceEventRecord]:
        """The events the server received from ``device_id`` about agent ``version``."""
        with Session(self.app.state.engine) as session:
            return list(
                session.exec(
                    select(DeviceEventRecord)
                    .where(DeviceEventRecord.device_id == device_id)
                    .where(DeviceEventRecord.agent_version == version)
                    .order_by(col(DeviceEventRecord.received_at))
                ).all()
            )

    def wait_agent_events(self, device_id: str, version: str, *kinds: str) -> list[str]:
        """The kinds of those events, once they include ``kinds``."""

        def seen() -> list[str] | None:
            got = [e.kind for e in self.agent_events(device_id, version)]
            return got if set(kinds) <= set(got) else None

        found: list[str] = wait_until(seen, 30, f"{kinds} of agent {version} from {device_id}")
        return found


@pytest.fixture(scope="session")
def e2e_schema() -> Iterator[str | None]:
    """A PostgreSQL schema of this test process's own (None: SQLite only)."""
    with private_schema("edgefleet_e2e_agent") as schema:
        yield schema


@pytest.fixture(scope="session")
def good_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout built as release GOOD, the way an operator builds one (no server
    needed: ``build`` runs pip on a copy of the checkout)."""
    return build_release(REPO, tmp_path_factory.mktemp("agent-wheel"), GOOD)


def fresh_database(kind: str, tmp_path: Path, schema: str | None) -> str:
    url = database_url(kind, tmp_path, schema)
    engine = create_db_engine(url)
    drop_everything(engine)
    engine.dispose()
    return url


@contextmanager
def running_fleet(
    db_url: str, tmp_path: Path, broker: BrokerEndpoint, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Fleet]:
    """The server, three enrolled devices under their launchers in group GROUP, and a model
    version rolled out to all of them (each answers /v1/predict with it)."""
    trained = trained_digits()  # built before the server starts its clocks
    settings = Settings(
        data_dir=tmp_path / "server",
        database_url=db_url,
        broker_url=broker.url,
        run_jobs=False,
        rollout_tick_seconds=0.2,
        ingest_client_id=f"ingest-{tmp_path.name[-40:]}",
    )
    app = create_app(settings, clock=Clock())
    with ExitStack() as stack:
        url = stack.enter_context(serve(app))
        token = admin_token(settings)
        monkeypatch.setenv("EDGEFLEET_TOKEN", token)  # for the CLIs
        http = stack.enter_context(
            httpx.Client(
                base_url=f"{url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30
            )
        )
        cli(url, "groups", "create", GROUP)
        # Ids of this test's own: the session's broker keeps other tests' retained messages.
        run = uuid.uuid4().hex[:6]
        devices: dict[str, LaunchedDevice] = {}
        for index in range(DEVICES):
            device_id = f"upd-{run}-{index}"
            one_use = cli_json(
                url, "tokens", "create", "--auto-accept", "--profile", PROFILE, "--group", GROUP
            )["token"]
            device = enroll_device(
                url,
                token=one_use,
                device_id=device_id,
                profile=PROFILE,
                folder=tmp_path / device_id,
                root_key=settings.keys_dir / "root.pub",
                port=free_port(),
            )
            device.start()
            stack.callback(device.stop)
            devices[device_id] = device
        for device in devices.values():
            device.running(BASE)
        wait_until(
            lambda: all(
                d["agent_version"] == BASE and d["state_reported_at"]
                for d in http.get("/devices", params={"group": GROUP}).json()
            ),
            30,
            "every agent's state in the inventory",
        )

        (version,) = publish_versions(app, 1)
        response = http.post(
            "/rollouts",
            json={
                "model": MODEL,
                "version": version,
                "group": GROUP,
                "phases": "100",
                "wait_between_phases": 0,
                "gates": ACTIVATION_ONLY,
            },
        )
        assert response.status_code == 201, response.text
        fleet = Fleet(url, app, devices, version, trained.data.x_test[:8].tolist(), http)
        done = fleet.wait_rollout(response.json()["id"], "completed", "paused", "aborted")
        assert done["status"] == "completed", done
        for device in devices.values():
            answer = device.predict(fleet.samples)
            assert (answer["model"], answer["version"]) == (MODEL, version)
        yield fleet


def retained_state(mqtt_client: Any, device_id: str) -> DeviceState:
    """The device's retained state, as the broker hands it to a new subscriber."""
    client: TestClient = mqtt_client(f"observer-{device_id}")
    client.subscribe(device_topic(device_id, Channel.STATE))
    received = client.expect(timeout=10)
    assert received.retain
    return DeviceState.from_bytes(received.payload)


def classes(answer: dict[str, Any]) -> list[Any]:
    return [p["class"] for p in answer["predictions"]]


def test_a_good_release_reaches_the_canary_first_then_the_group(
    tmp_path: Path,
    mqtt_broker: BrokerEndpoint,
    mqtt_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    good_wheel: Path,
) -> None:
    url = fresh_database("sqlite", tmp_path, None)
    with running_fleet(url, tmp_path, mqtt_broker, monkeypatch) as fleet:
        before = {d: classes(x.predict(fleet.samples)) for d, x in fleet.devices.items()}
        pids = {d: x.children() for d, x in fleet.devices.items()}
        base_wheel = tmp_path / f"edgefleet-{BASE}-py3-none-any.whl"
        base_wheel.write_bytes(build_wheel(BASE))
        fleet.publish(base_wheel)
        release = fleet.publish(good_wheel)
        assert release["version"] == GOOD
        listed = cli_json(fleet.url, "agent-releases", "list")
        assert [r["version"] for r in listed] == [GOOD, BASE]

        created = fleet.create_rollout(
            agent_version=GOOD,
            phases="1dev,100",
            wait_between_phases=1,
            gates=ACTIVATION_ONLY,
            health_timeout_s=30,
        )
        assert created["kind"] == "agent" and created["agent_version"] == GOOD
        done = fleet.wait_rollout(created["id"], "completed", "paused", "aborted")
        assert done["status"] == "completed", done
        assert [p["targeted"] for p in done["phase_progress"]] == [1, 2]
        outcomes = {d["device_id"]: d for d in done["devices"]}
        assert set(outcomes) == set(fleet.devices)
        assert {d["state"] for d in outcomes.values()} == {"activated"}
        assert {d["previous_agent_version"] for d in outcomes.values()} == {BASE}
        (canary,) = [d for d in outcomes.values() if d["phase"] == 1]
        rest = [d for d in outcomes.values() if d["phase"] == 2]
        assert len(rest) == DEVICES - 1
        # The canary had switched and committed before anyone else was targeted, and
        # before anyone else began to download the release.
        assert all(canary["outcome_at"] < d["targeted_at"] for d in rest), done["devices"]
        for device_id in fleet.devices:
            kinds = fleet.wait_agent_events(
                device_id, GOOD, "downloading", "verified", "activated", "health_check_passed"
            )
            assert "rolled_back" not in kinds and "failed" not in kinds, kinds
        committed = next(
            e.received_at
            for e in fleet.agent_events(canary["device_id"], GOOD)
            if e.kind == "health_check_passed"
        )
        for d in rest:
            started = next(
                e.received_at
                for e in fleet.agent_events(d["device_id"], GOOD)
                if e.kind == "downloading"
            )
            assert committed < started, (d["device_id"], committed, started)

        for device_id, device in fleet.devices.items():
            state = retained_state(mqtt_client, device_id)
            assert state.agent_version == GOOD
            update = state.agent_update
            assert update is not None
            assert (update.outcome, update.version, update.previous_version) == (
                "activated",
                GOOD,
                BASE,
            )
            assert update.rollout_id == created["id"]
            shown = cli_json(fleet.url, "devices", "show", device_id)
            assert shown["agent_version"] == GOOD
            assert shown["agent_update"]["outcome"] == "activated"
            assert f"activated: {BASE} -> {GOOD}" in cli(fleet.url, "devices", "show", device_id)

            status = device.running(GOOD)
            assert status["agent_trial"] is None
            assert status["agent_update"]["outcome"] == "activated"
            assert os.readlink(device.home.current_link) == f"versions/{GOOD}"
            assert (device.home.versions_dir / GOOD / INSTALL_MARKER).is_file()
            assert (device.home.versions_dir / GOOD / "agent" / "agent.py").is_file()
            assert device.home.read_state().pending is None
            assert device.children() != pids[device_id]  # a new process runs the new code
            answer = device.predict(fleet.samples)
            assert (answer["model"], answer["version"]) == (MODEL, fleet.model_version)
            assert classes(answer) == before[device_id]  # the same model, the same answers


@pytest.mark.database
@pytest.mark.parametrize("database", DATABASES)
def test_a_release_that_crashes_is_rolled_back_by_the_canary_and_stops_the_rollout(
    tmp_path: Path,
    mqtt_broker: BrokerEndpoint,
    mqtt_client: Any,
    monkeypatch: pytest.MonkeyPatch,
    e2e_schema: str | None,
    database: str,
) -> None:
    url = fresh_database(database, tmp_path, e2e_schema)
    with running_fleet(url, tmp_path, mqtt_broker, monkeypatch) as fleet:
        base_wheel = tmp_path / f"edgefleet-{BASE}-py3-none-any.whl"
        base_wheel.write_bytes(build_wheel(BASE))
        fleet.publish(base_wheel)
        broken_wheel = tmp_path / f"edgefleet-{BROKEN}-py3-none-any.whl"
        broken_wheel.write_bytes(build_wheel(BROKEN, inject={"agent/agent.py": BROKEN_AT_START}))
        fleet.publish(broken_wheel)

        created = fleet.create_rollout(
            agent_version=BROKEN,
            phases="1dev,100",
            wait_between_phases=1,
            gates={**ACTIVATION_ONLY, "max_activation_failure_rate": 0},
            retry={"max_attempts": 1},
            on_breach="abort",
            health_timeout_s=10,
        )
        done = fleet.wait_rollout(created["id"], "completed", "paused", "aborted")
        assert done["status"] == "aborted", done
        assert "activation" in done["status_reason"], done["status_reason"]
        (canary,) = done["devices"]  # phase 2 never started
        assert canary["phase"] == 1 and canary["state"] == "failed"
        assert canary["reason"] == "agent_crashed", canary
        assert "exited with code 1 before it reported healthy" in canary["detail"], canary
        assert canary["previous_agent_version"] == BASE
        assert [p["targeted"] for p in done["phase_progress"]] == [1, 0]

        device = fleet.devices[canary["device_id"]]
        status = device.running(BASE)
        assert status["agent_update"]["outcome"] == "rolled_back"
        assert status["agent_update"]["reason"] == "agent_crashed"
        assert not device.home.current_link.is_symlink()  # back on the base install
        assert not (device.home.versions_dir / BROKEN).exists()
        state = retained_state(mqtt_client, device.device_id)
        assert state.agent_version == BASE
        assert state.agent_update is not None
        assert (state.agent_update.outcome, state.agent_update.reason) == (
            "rolled_back",
            "agent_crashed",
        )
        shown = cli_json(fleet.url, "devices", "show", device.device_id)
        assert shown["agent_version"] == BASE
        assert shown["agent_update"]["outcome"] == "rolled_back"
        assert shown["agent_update"]["reason"] == "agent_crashed"
        answer = device.predict(fleet.samples)
        assert (answer["model"], answer["version"]) == (MODEL, fleet.model_version)
        # It was installed and started; the version it went back to reported why.
        kinds = fleet.wait_agent_events(
            device.device_id, BROKEN, "verified", "health_check_failed", "rolled_back"
        )
        assert "activated" not in kinds and "health_check_passed" not in kinds, kinds
        rolled_back = next(
            e for e in fleet.agent_events(device.device_id, BROKEN) if e.kind == "rolled_back"
        )
        assert rolled_back.reason == "agent_crashed" and rolled_back.rollout_id == created["id"]
        launcher_log = device.log_file.read_text()
        assert f"starting the agent: {BROKEN}" in launcher_log
        assert BROKEN_AT_START.decode().split('"')[1] in launcher_log  # its code ran
        # The canary was sent the release, then its previous agent back; nobody else ever
        # received a desired state naming it.
        assert BROKEN in fleet.issued_agents(device.device_id)
        for device_id, other in fleet.devices.items():
            if device_id == device.device_id:
                continue
            assert BROKEN not in fleet.issued_agents(device_id)
            assert fleet.agent_events(device_id, BROKEN) == []
            assert other.running(BASE)["agent_update"] is None
            assert not other.home.versions_dir.exists() or not any(
                other.home.versions_dir.iterdir()
            )
