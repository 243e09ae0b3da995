"""The rollout engine with the whole server around it, on a real broker, with simulated
devices that speak the real protocol (signed desired states, block transfers, events,
state, telemetry with drift sketches) and a clock the test moves instead of waiting.

The model is built by the real pipeline (:func:`tests.server.rollouts.harness.trained_digits`);
every desired state is signed by the server and checked by each device with the agent's
own acceptance rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from server.simulator.device import Behaviour
from shared.topics import Channel, device_topic
from tests.conftest import BrokerEndpoint, MosquittoProcess, TestClient
from tests.server.rollouts.harness import (
    ACTIVATION_ONLY,
    MODEL,
    Clock,
    RolloutServer,
    SimFleet,
    deployed,
    desired_of,
    publish_versions,
    trained_digits,
    wait_for,
)

pytestmark = [pytest.mark.broker, pytest.mark.database]


@pytest.fixture(scope="module", autouse=True)
def _model() -> None:
    trained_digits()  # built once, before any test's timeouts start counting


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(
    db_url: str, tmp_path: Path, mqtt_broker: BrokerEndpoint, clock: Clock
) -> Iterator[RolloutServer]:
    with RolloutServer(
        db_url=db_url, data_dir=tmp_path / "data", broker=mqtt_broker, clock=clock
    ) as server:
        yield server


def outcomes(rollout: dict[str, Any]) -> dict[str, str]:
    return {d["device_id"]: d["state"] for d in rollout["devices"]}


def test_a_breached_latency_gate_pauses_the_rollout_after_the_canary(
    server: RolloutServer, mqtt_broker: BrokerEndpoint
) -> None:
    (version,) = publish_versions(server.app, 1)
    slow = {f"slow-{i}": Behaviour(latency_ms=90.0) for i in range(4)}
    with SimFleet(server, mqtt_broker, slow) as fleet:
        server.group("line-1", members=list(slow))
        created = server.create_rollout(
            version=version,
            group="line-1",
            phases="1dev,100",
            wait_between_phases=0,
            gates={
                "max_error_rate": None,
                "max_confidence_drop": None,
                "max_prediction_psi": None,
                "max_latency_sla_ratio": 1.0,
                "min_inferences": 150,
            },
        )
        paused = server.wait_rollout(
            created["id"], lambda r: r["status"] == "paused", what="paused by the latency gate"
        )
        assert paused["status_reason"].startswith("latency_p95 breached")
        latency = next(g for g in paused["gates"] if g["gate"] == "latency_p95")
        assert latency["status"] == "breached"
        assert latency["value"] > 1.0 and latency["threshold"] == 1.0
        assert latency["evidence"]["profiles"]["edge-x86_64-litert"]["sla_ms"] == 20.0
        # Only the canary moved: the other three never got a desired state.
        (canary,) = paused["devices"]
        assert canary["state"] == "activated" and canary["phase"] == 1
        assert fleet.running(canary["device_id"]) == version
        for device_id in set(slow) - {canary["device_id"]}:
            assert server.issued(device_id) == []
            assert fleet.running(device_id) is None
        assert paused["phase_progress"][1]["targeted"] == 0


def test_a_silent_device_times_out_and_is_reverted_while_the_rest_completes(
    server: RolloutServer, mqtt_broker: BrokerEndpoint, clock: Clock
) -> None:
    (version,) = publish_versions(server.app, 1)
    behaviours = {"ok-0": Behaviour(), "ok-1": Behaviour(), "mute-0": Behaviour(silent=True)}
    with SimFleet(server, mqtt_broker, behaviours) as fleet:
        server.group("yard", members=list(behaviours))
        created = server.create_rollout(
            version=version,
            group="yard",
            phases="100",
            wait_between_phases=0,
            device_timeout=600,
            gates={**ACTIVATION_ONLY, "max_activation_failure_rate": 0.5},
        )
        rollout_id = created["id"]
        waiting = server.wait_rollout(
            rollout_id,
            lambda r: (
                outcomes(r) == {"ok-0": "activated", "ok-1": "activated", "mute-0": "in_progress"}
            ),
            what="two activated, one silent",
        )
        assert waiting["status"] == "running"
        # Nothing has happened to the silent device for ten minutes: it counts as failed.
        clock.advance(minutes=11)
        done = server.wait_rollout(rollout_id, lambda r: r["status"] == "completed")
        mute = next(d for d in done["devices"] if d["device_id"] == "mute-0")
        assert (mute["state"], mute["reason"]) == ("timed_out", "timed_out")
        assert "no progress reported for 0:10:00" in mute["detail"]
        activation = next(g for g in done["gates"] if g["gate"] == "activation_failures")
        assert activation["status"] == "holds" and activation["value"] == pytest.approx(1 / 3)
        assert done["counts"]["timed_out"] == 1 and done["counts"]["activated"] == 2
        # Its desired state went back to what it ran before: nothing of this model.
        first, reverted = server.issued("mute-0")
        assert deployed(first) == {MODEL: version}
        (deployment,) = desired_of(first).deployments
        assert deployment.artifact.url == (  # for agents that download over HTTP
            f"/api/v1/devices/mute-0/artifacts/{deployment.artifact.sha256}"
        )
        assert deployed(reverted) == {} and reverted.manifest_version > first.manifest_version
        assert fleet.running("ok-0") == fleet.running("ok-1") == version


def test_a_device_that_joins_a_dynamic_group_later_gets_the_running_rollout(
    server: RolloutServer, mqtt_broker: BrokerEndpoint
) -> None:
    (version,) = publish_versions(server.app, 1)
    tags = {"b-0": {"site": "berlin"}, "b-1": {"site": "berlin"}, "p-0": {"site": "paris"}}
    behaviours = {device_id: Behaviour() for device_id in tags}
    with SimFleet(server, mqtt_broker, behaviours, tags=tags) as fleet:
        server.group("berlin", selector="site=berlin")
        created = server.create_rollout(
            version=version,
            group="berlin",
            phases="100",
            wait_between_phases=3600,  # observed for an hour: still running meanwhile
            gates=ACTIVATION_ONLY,
        )
        rollout_id = created["id"]
        before = server.wait_rollout(
            rollout_id,
            lambda r: outcomes(r) == {"b-0": "activated", "b-1": "activated"},
            what="both berlin devices activated",
        )
        assert before["status"] == "running" and before["group_members"] == 2
        assert server.issued("p-0") == []
        server.call("PATCH", "/devices/p-0/tags", json={"set": {"site": "berlin"}})
        after = server.wait_rollout(
            rollout_id,
            lambda r: outcomes(r).get("p-0") == "activated",
            what="the late joiner activated",
        )
        assert after["group_members"] == 3 and after["status"] == "running"
        joiner = next(d for d in after["devices"] if d["device_id"] == "p-0")
        assert joiner["phase"] == 1 and joiner["attempts"] == 1
        assert fleet.running("p-0") == version


def test_a_server_restart_mid_rollout_resumes_where_it_was(
    db_url: str, tmp_path: Path, mqtt_broker: BrokerEndpoint, clock: Clock
) -> None:
    behaviours = {f"r-{i}": Behaviour() for i in range(3)}
    options: dict[str, Any] = {
        "db_url": db_url,
        "data_dir": tmp_path / "data",
        "broker": mqtt_broker,
        "clock": clock,
    }
    with ExitStack() as stack:
        with RolloutServer(**options) as first:
            (version,) = publish_versions(first.app, 1)
            fleet = stack.enter_context(SimFleet(first, mqtt_broker, behaviours))
            first.group("hall", members=list(behaviours))
            created = first.create_rollout(
                version=version,
                group="hall",
                phases="1dev,100",
                approval=True,
                wait_between_phases=0,
                gates=ACTIVATION_ONLY,
            )
            rollout_id = created["id"]
            waiting = first.wait_rollout(
                rollout_id, lambda r: r["status"] == "waiting_approval", what="canary done"
            )
            (canary,) = waiting["devices"]
        # The server is down (the devices go on); a new one starts on the same database.
        with RolloutServer(**options) as second:
            resumed = second.rollout(rollout_id)
            assert resumed["status"] == "waiting_approval" and resumed["phase"] == 1
            assert resumed["devices"] == [canary]
            second.call("POST", f"/rollouts/{rollout_id}/approve", json={"phase": 1})
            done = second.wait_rollout(rollout_id, lambda r: r["status"] == "completed")
            assert set(outcomes(done).values()) == {"activated"} and len(done["devices"]) == 3
            # The canary was neither targeted again nor sent a second manifest.
            assert next(d for d in done["devices"] if d["device_id"] == canary["device_id"]) == (
                canary
            )
            assert len(second.issued(canary["device_id"])) == 1
            assert {fleet.running(d) for d in behaviours} == {version}


def test_a_pin_wins_and_desired_states_are_re_signed_before_they_expire(
    server: RolloutServer, mqtt_broker: BrokerEndpoint, clock: Clock
) -> None:
    old, new = publish_versions(server.app, 2)
    behaviours = {"pinned": Behaviour(), "free": Behaviour()}
    with SimFleet(server, mqtt_broker, behaviours) as fleet:
        server.group("dock", members=list(behaviours))
        server.call("PUT", f"/devices/pinned/pins/{MODEL}", json={"version": old, "note": "audit"})
        wait_for(lambda: fleet.running("pinned") == old, what="the pin delivered on its own")
        created = server.create_rollout(
            version=new, group="dock", phases="100", wait_between_phases=0, gates=ACTIVATION_ONLY
        )
        done = server.wait_rollout(created["id"], lambda r: r["status"] == "completed")
        assert outcomes(done) == {"free": "activated"}
        (excluded,) = done["excluded"]
        assert (excluded["device_id"], excluded["reason"]) == ("pinned", "pinned")
        assert excluded["detail"] == f"pinned to {MODEL} v{old}"
        assert fleet.running("pinned") == old and fleet.running("free") == new
        issued = {d: server.issued(d)[-1] for d in behaviours}
        accepted = {d: fleet.devices[d].trust.manifest_version for d in behaviours}
        assert accepted == {d: m.manifest_version for d, m in issued.items()}

        # Five and a half days on, each manifest is within two days of its expiry:
        clock.advance(days=5, hours=12)

        def re_signed() -> bool:
            return all(
                fleet.devices[d].trust.manifest_version > issued[d].manifest_version
                for d in behaviours
            )

        wait_for(re_signed, what="re-signed manifests accepted by the devices")
        for device_id in behaviours:
            latest = server.issued(device_id)[-1]
            assert latest.reason == "expiring"
            assert latest.content_digest == issued[device_id].content_digest
            assert latest.expires_at > issued[device_id].expires_at
        assert fleet.running("pinned") == old and fleet.running("free") == new

        # Without its pin the device keeps what it runs until a rollout targets it.
        pins_before = len(server.issued("pinned"))
        server.call("DELETE", f"/devices/pinned/pins/{MODEL}", expect=204)
        again = server.create_rollout(
            version=new, group="dock", phases="100", wait_between_phases=0, gates=ACTIVATION_ONLY
        )
        server.wait_rollout(again["id"], lambda r: r["status"] == "completed")
        assert fleet.running("pinned") == new
        assert [deployed(m) for m in server.issued("pinned")[pins_before - 1 :]] == [
            {MODEL: old},
            {MODEL: new},
        ]


def test_desired_states_wait_for_a_broker_that_is_away_and_go_out_when_it_is_back(
    db_url: str,
    tmp_path: Path,
    mosquitto_factory: Callable[[], MosquittoProcess],
    mqtt_client: Callable[..., TestClient],
    clock: Clock,
) -> None:
    broker = mosquitto_factory()
    with RolloutServer(
        db_url=db_url, data_dir=tmp_path / "data", broker=broker.endpoint, clock=clock
    ) as server:
        (version,) = publish_versions(server.app, 1)
        server.enroll("far-1")  # its enrolled runtime makes it eligible before it reports
        server.group("remote", members=["far-1"])
        broker.stop()
        wait_for(lambda: not server.app.state.desired_publisher.connected, 10, "disconnected")
        created = server.create_rollout(
            version=version, group="remote", phases="100", gates=ACTIVATION_ONLY
        )
        targeted = server.wait_rollout(
            created["id"], lambda r: [d["state"] for d in r["devices"]] == ["in_progress"]
        )
        assert targeted["status"] == "running"
        assert server.issued("far-1") == []  # nothing issued while it cannot be sent
        broker.start()
        watcher = mqtt_client("watcher", endpoint=broker.endpoint)
        watcher.subscribe(device_topic("far-1", Channel.DESIRED))
        # Live or retained, depending on whether it went out before the watcher subscribed.
        _, payload, _ = watcher.expect(timeout=30)
        # Marked sent once the broker's PUBACK came back (just after the watcher saw it).
        (issued,) = wait_for(
            lambda: [m for m in server.issued("far-1") if m.sent_at is not None], 10, "sent"
        )
        assert bytes(issued.payload) == payload and len(server.issued("far-1")) == 1
        assert deployed(issued) == {MODEL: version}


def test_two_replicas_on_one_database_never_both_apply_a_step(
    db_url: str, tmp_path: Path, mqtt_broker: BrokerEndpoint, clock: Clock
) -> None:
    behaviours = {f"twin-{i}": Behaviour() for i in range(4)}
    # Replicas share the database, the artifact store and the keys (one data folder here),
    # and split block requests and telemetry between them with shared subscriptions.
    options: dict[str, Any] = {
        "db_url": db_url,
        "data_dir": tmp_path / "data",
        "broker": mqtt_broker,
        "clock": clock,
        "block_share_group": "blocks",
        "ingest_share_group": "ingest",
    }
    with (
        RolloutServer(ingest_client_id=f"a-{tmp_path.name[-40:]}", **options) as a,
        RolloutServer(ingest_client_id=f"b-{tmp_path.name[-40:]}", **options) as b,
    ):
        (version,) = publish_versions(a.app, 1)
        with SimFleet(a, mqtt_broker, behaviours) as fleet:
            a.group("pair", members=list(behaviours))
            created = b.create_rollout(
                version=version,
                group="pair",
                phases="1dev,2dev,100",
                wait_between_phases=0,
                gates=ACTIVATION_ONLY,
            )
            done = a.wait_rollout(created["id"], lambda r: r["status"] == "completed")
            assert set(outcomes(done).values()) == {"activated"} and len(done["devices"]) == 4
            assert all(d["attempts"] == 1 for d in done["devices"])
            # Each device was sent one manifest, by whichever replica got there first,
            # and installed the version once.
            for device_id in behaviours:
                (issued,) = a.issued(device_id)
                assert deployed(issued) == {MODEL: version}
                assert fleet.devices[device_id].installs == 1
        stats = [a.app.state.rollout_engine.stats(), b.app.state.rollout_engine.stats()]
        # At least one send per device; the other replica's maintenance may re-send a
        # manifest whose send it has not yet seen recorded -- the same signed bytes, which
        # a device takes as a re-delivery (one issued manifest and one install each, above).
        assert sum(s["published"] for s in stats) >= len(behaviours)
        assert all(s["step_errors"] == 0 for s in stats)
