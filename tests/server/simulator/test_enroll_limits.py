"""Simulated fleets enroll through the API's rate limits instead of failing on them: a
device refused with 429 is asked again a second later (the limiter's clock is moved by
the test's ``sleep`` instead of waiting), and gives up with the server's reason once its
patience is spent."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.app import create_app
from server.commands.client import ApiClient, ApiError
from server.profiles import DEFAULT_PROFILES_DIR, load_profiles
from server.settings import Settings
from server.simulator.enroll import enroll_devices
from tests.conftest import operator_client

pytestmark = pytest.mark.database


class LimiterClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


@pytest.fixture
def enrolling(db_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        broker_url="embedded",
        inventory_consumer=False,
        alert_evaluator=False,
        run_jobs=False,
        enroll_per_minute_per_token=2,
    )
    app = create_app(settings)
    with operator_client(app) as http:
        clock = LimiterClock()
        app.state.enroll_by_token._clock = clock
        token = http.post(
            "/api/v1/provisioning-tokens", json={"auto_accept": True, "max_uses": 10}
        ).json()["token"]
        client = ApiClient("http://testserver")
        client._http = http  # the app in-process; ApiClient's own error handling stays
        http.base_url = "http://testserver/api/v1"
        yield client, token, clock


def test_a_fleet_bigger_than_the_limit_still_enrolls(enrolling) -> None:  # type: ignore[no-untyped-def]
    client, token, clock = enrolling
    profile = load_profiles(DEFAULT_PROFILES_DIR)["edge-x86_64-litert"]
    ids = [f"sim-{i}" for i in range(4)]
    enrolled = enroll_devices(
        client, token=token, device_ids=ids, profile=profile, sleep=clock.sleep
    )
    assert [e.device_id for e in enrolled] == ids
    assert clock.sleeps > 0  # two came at once; the other two waited for the bucket


def test_patience_runs_out_with_the_servers_reason(enrolling) -> None:  # type: ignore[no-untyped-def]
    client, token, clock = enrolling
    profile = load_profiles(DEFAULT_PROFILES_DIR)["edge-x86_64-litert"]
    with pytest.raises(ApiError) as refused:
        enroll_devices(
            client,
            token=token,
            device_ids=["a", "b", "c"],
            profile=profile,
            max_wait=3,
            sleep=clock.sleep,
        )
    assert refused.value.status_code == 429 and "enrolling c" in str(refused.value)
    assert clock.sleeps == 3
