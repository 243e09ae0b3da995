"""Continuous training end to end, everything real but the clock: the server (its job runner,
rollout engine, ingestor and evaluator) on a real broker; version 1 of a digits model
trained by a real run in a worker process; simulated devices that install it and report
drifted inputs in one group; the policy fires there -- not in the steady group -- with
its evidence; approval starts a real retraining run on the version's dataset; the new
version passes its gates, becomes ``candidate``, and a canary rollout of it to the
drifted group starts and targets a device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server.simulator.device import Behaviour
from tests.conftest import BrokerEndpoint
from tests.server.conftest import PRODUCTION_DATABASE
from tests.server.rollouts.harness import (
    ACTIVATION_ONLY,
    MODEL,
    Clock,
    RolloutServer,
    SimFleet,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.database]

FEATURE = "px36"  # a central pixel of the 8x8 digits: it varies, so a shift shows
DRIFTED = {f"drifted-{i}": Behaviour(drift={FEATURE: 3.0}) for i in range(3)}
STEADY = {f"steady-{i}": Behaviour() for i in range(2)}
SPEC = {"hidden_units": [16], "epochs": 2, "batch_size": 64}
RUN_TIMEOUT = 240.0


@pytest.fixture
def server(db_url: str, tmp_path: Path, mqtt_broker: BrokerEndpoint) -> Iterator[RolloutServer]:
    with RolloutServer(
        db_url=db_url,
        data_dir=tmp_path / "data",
        broker=mqtt_broker,
        clock=Clock(),
        run_jobs=True,
        alert_interval_seconds=0.2,
    ) as server:
        yield server


def wait_run(server: RolloutServer, run_id: int) -> dict[str, Any]:
    run: dict[str, Any] = wait_for(
        lambda: (
            (r := server.call("GET", f"/runs/{run_id}"))["status"] not in ("queued", "running")
            and r
        ),
        RUN_TIMEOUT,
        f"training run {run_id}",
    )
    assert run["status"] == "succeeded", run
    return run


def reports_from(server: RolloutServer, fleet: SimFleet, count: int) -> None:
    """Wait until every device sent ``count`` more telemetry reports."""
    start = fleet.simulator.stats().telemetry_sent
    wait_for(
        lambda: fleet.simulator.stats().telemetry_sent >= start + count * len(fleet.devices),
        30,
        "telemetry",
    )


# The demo runs this loop on SQLite end to end; the retraining tests beside this one
# cover each step on both databases.
@pytest.mark.parametrize("db_url", [PRODUCTION_DATABASE], indirect=True)
def test_drift_in_a_group_retrains_to_a_gated_candidate_and_starts_its_canary(
    server: RolloutServer, mqtt_broker: BrokerEndpoint
) -> None:
    server.call("POST", "/datasets/examples/digits", 201)
    first = server.call(
        "POST",
        "/runs",
        202,
        json={"dataset": "digits", "model": MODEL, "arch": "mlp", "spec": SPEC},
    )
    wait_run(server, first["id"])
    assert server.call("GET", f"/models/{MODEL}")["versions"][0]["version"] == 1

    with SimFleet(server, mqtt_broker, DRIFTED | STEADY) as fleet:
        for group, members in (("drifted", DRIFTED), ("steady", STEADY)):
            server.group(group, members=list(members))
            rollout = server.create_rollout(
                version=1, group=group, phases="100", gates=ACTIVATION_ONLY, wait_between_phases=0
            )
            server.wait_rollout(rollout["id"], lambda r: r["status"] == "completed", 60)
        server.call(
            "POST",
            "/retraining/policies",
            201,
            json={
                "name": "digits-drift",
                "model": MODEL,
                "groups": ["drifted", "steady"],
                "condition": {"kind": "drift", "windows": 2, "min_samples": 300},
                "training": {"epochs": 2},
                "canary": {"phases": "1dev,100", "approval": True},
            },
        )
        # two drifted hours: the devices' reports are stamped by the server's clock
        reports_from(server, fleet, 4)
        server.clock.advance(hours=1)
        reports_from(server, fleet, 4)
        (decision,) = wait_for(
            lambda: server.call("GET", "/retraining/decisions"), 30, "the policy's decision"
        )
        assert decision["group"] == "drifted" and decision["status"] == "pending_approval"
        assert decision["version"] == 1
        shown = server.call("GET", f"/retraining/decisions/{decision['id']}")
        assert {d["device_id"] for d in shown["evidence"]["devices"]} == set(DRIFTED)
        assert shown["evidence"]["features"][0] == FEATURE
        assert {w["verdict"] for w in shown["evidence"]["windows"]} == {"firing"}
        assert (shown["plan"]["dataset"]["dataset"], shown["plan"]["dataset"]["version"]) == (
            "digits",
            1,
        )

        approved = server.call(
            "POST", f"/retraining/decisions/{decision['id']}/approve", json={"note": "e2e"}
        )
        assert approved["status"] == "training"
        retrained = wait_run(server, approved["run_id"])
        lineage = retrained["lineage"]
        assert (lineage["dataset"], lineage["dataset_version"], lineage["model_version"]) == (
            "digits",
            1,
            2,
        )
        assert retrained["spec"]["hidden_units"] == [16] and retrained["epochs"] == 2

        done = wait_for(
            lambda: (
                (d := server.call("GET", f"/retraining/decisions/{decision['id']}"))["status"]
                != "training"
                and d
            ),
            30,
            "the decision carried on",
        )
        assert done["status"] == "completed", done["status_reason"]
        assert done["candidate_version"] == 2
        model = server.call("GET", f"/models/{MODEL}")
        assert model["aliases"]["candidate"] == 2
        canary = server.wait_rollout(
            done["rollout_id"],
            lambda r: r["counts"]["activated"] == 1,
            60,
            "the canary's first device on the candidate",
        )
        assert canary["model_version"] == 2 and canary["group"] == "drifted"
        assert canary["status"] in ("running", "waiting_approval") and canary["phase"] == 1
        (targeted,) = canary["devices"]
        assert targeted["device_id"] in DRIFTED and targeted["state"] == "activated"
        assert fleet.running(targeted["device_id"]) == 2
        assert server.call("GET", "/retraining/decisions", params={"group": "steady"}) == []
