"""A dashboard worth looking at: a real ``edgefleet server`` process on a real Mosquitto,
a trained and registered model, simulated devices in three groups reporting telemetry
(one group drifted), rollouts done, one waiting for approval, an open drift alert and a
retraining decision -- and a headless Chromium driven by Playwright to look at it.

- ``fleet`` (module): the server and everything in it; every test of a module shares it.
- ``browser`` (module): Playwright's Chromium, the system's ``/usr/bin/chromium`` with
  the launch flags that work here, and a fresh user-data directory per context.
- :func:`open_page` signs in with a ``#token=`` link and waits for the page to draw.

Screenshots go to ``test-output/dashboard/`` (gitignored) at the repository's root.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest

from server.commands.client import ApiClient
from server.profiles import get_profile
from server.settings import Settings
from server.simulator import Behaviour, FleetSimulator, SimulatedDevice
from server.simulator.enroll import enroll_devices
from shared.drift import DriftReference
from shared.signing import VerifyKey
from tests.conftest import BrokerEndpoint, free_port
from tests.server.conftest import DATABASES, EXTERNAL_URL, database_url

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "dashboard"
PROFILE = "edge-x86_64-litert"
DRIFTED = {"f20": 3.0, "f28": 3.0, "f36": 3.0, "f44": 2.5}
"""Features line-b's cameras shift, in reference standard deviations."""
HISTORY_HOURS = 6
"""Hours of past telemetry sent for each device, so the drift heatmap has a history."""
HISTORY_SEQ = 10**9
"""Past windows' ``seq`` start here, far above what the live devices count to."""
ACTIVATION_ONLY = {
    "max_error_rate": None,
    "max_latency_sla_ratio": None,
    "max_confidence_drop": None,
    "max_prediction_psi": None,
}

CHROMIUM_MISSING = (
    f"{CHROMIUM} is missing: the dashboard's browser tests need Debian's chromium "
    "(apt-get install chromium chromium-driver; .ci/run installs it)"
)


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until truthy: the server, broker and devices give no event to wait
    on from here."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{what} not met within {timeout:g} s (last: {last!r})")


@dataclass
class Fleet:
    url: str
    api: ApiClient
    admin_token: str
    viewer_token: str
    model: str
    versions: list[int]
    rollout_id: str
    """The rollout of v2 to line-a, waiting for approval after its canary."""
    simulator: FleetSimulator
    data_dir: Path
    log: Path
    devices: dict[str, list[str]] = field(default_factory=dict)
    """Group -> device ids."""

    def get(self, path: str, **params: Any) -> Any:
        return self.api.get(path, params=params or None)


def _start_server(
    data_dir: Path, database: str | None, broker: BrokerEndpoint, port: int, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("EDGEFLEET_") or key.startswith("EDGEFLEET_TEST_")
    }
    env |= {
        "EDGEFLEET_RUN_JOBS": "false",
        "EDGEFLEET_ROLLOUT_TICK_SECONDS": "0.5",
        "EDGEFLEET_ALERT_INTERVAL_SECONDS": "2",
        "EDGEFLEET_LOG_LEVEL": "WARNING",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                *(sys.executable, "-m", "server.cli", "server"),
                *("--data-dir", str(data_dir), "--broker", broker.url),
                *("--host", "127.0.0.1", "--port", str(port)),
                *(("--db", database) if database else ()),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _publish_model(
    data_dir: Path, database: str | None, count: int
) -> tuple[str, list[int], DriftReference]:
    """Register ``count`` versions of a small digits classifier in the running server's
    database and store, through the real pipeline (conversion, gates, signed bundles);
    with the drift reference of the first (read back from its signed bundle)."""
    from sqlmodel import Session

    from server import registry
    from server.artifacts import ArtifactStore
    from server.db import create_db_engine
    from server.drift.reference import version_reference
    from server.keys import load_fleet_keys
    from tests.server.rollouts.harness import MODEL, publish_versions

    # the server's own database and keys (it runs with no EDGEFLEET_* settings but ours)
    settings = Settings(data_dir=data_dir, database_url=database, mode="dev")
    engine = create_db_engine(settings.resolved_database_url)
    try:
        state = SimpleNamespace(
            engine=engine,
            artifacts=ArtifactStore(settings.artifacts_dir),
            keys=load_fleet_keys(settings.keys_dir, now=datetime.now(UTC)),
        )
        versions = publish_versions(SimpleNamespace(state=state), count)
        with Session(engine) as session:
            first = registry.get_version(session, model_name=MODEL, version=str(versions[0]))
            reference = version_reference(
                session, store=state.artifacts, keys=state.keys, model_name=MODEL, version=first
            )
        return MODEL, versions, reference
    finally:
        engine.dispose()


def _send_history(
    broker: BrokerEndpoint,
    reference: DriftReference,
    *,
    model: str,
    version: int,
    devices: dict[str, list[str]],
    hours: int,
) -> None:
    """The telemetry the devices would have sent over the past ``hours``: one window per
    device and hour, rows from the digits test split run through the real model (so the
    predictions are real), line-b's glare pixels brightening hour by hour. Published on
    each device's telemetry topic with ``seq`` numbers its live reports never reach."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.drift import DriftAccumulator
    from shared.latency import latency_counts
    from shared.messages import LatencyHistogram, ModelWindow, Resources, TelemetryReport
    from shared.preprocessing import apply_preprocessing
    from shared.topics import Channel, device_topic
    from tests.server.rollouts.harness import trained_digits

    trained = trained_digits()
    rng = np.random.default_rng(7)
    names = [f.name for f in reference.features]
    spread = trained.data.x_train.std(axis=0)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dashboard-history")
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        now = datetime.now(UTC)
        for group, ids in devices.items():
            for device_id in ids:
                for step, hours_ago in enumerate(range(hours, 0, -1)):
                    rows = trained.data.x_test[rng.choice(len(trained.data.x_test), 400)].copy()
                    if group == "line-b":
                        # none in the first hours, then brighter and brighter
                        glare = max(0, step - 1) / (hours - 2)
                        for name, shift in DRIFTED.items():
                            j = names.index(name)
                            rows[:, j] += glare * shift * spread[j]
                    probabilities = trained.model.predict(
                        apply_preprocessing(trained.steps, rows), verbose=0
                    )
                    counts = DriftAccumulator(reference)
                    counts.update(rows, probabilities=probabilities)
                    end = now - timedelta(hours=hours_ago)
                    report = TelemetryReport(
                        device_id=device_id,
                        seq=HISTORY_SEQ + step,
                        window_start=end - timedelta(minutes=10),
                        window_end=end,
                        models=[
                            ModelWindow(
                                model_name=model,
                                model_version=version,
                                target=PROFILE,
                                inferences=len(rows),
                                latency_ms=LatencyHistogram(
                                    counts=latency_counts(
                                        rng.lognormal(np.log(8.0), 0.25, len(rows))
                                    ).tolist()
                                ),
                                drift=counts.sketch(),
                            )
                        ],
                        resources=Resources(rss_bytes=60 * 2**20, cpu_seconds=1.0),
                    )
                    client.publish(
                        device_topic(device_id, Channel.TELEMETRY), report.to_bytes(), qos=1
                    ).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


FINISHED_OR_PAUSED = ("completed", "aborted", "paused")


def _rollout_in(api: ApiClient, rollout_id: str, *statuses: str) -> dict[str, Any] | None:
    shown: dict[str, Any] = api.get(f"/rollouts/{rollout_id}")
    if shown["status"] in statuses:
        return shown
    return None


@pytest.fixture(scope="module", params=DATABASES)
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The server's database: its default SQLite file (None), and also, when
    ``EDGEFLEET_TEST_DATABASE_URL`` is set, a PostgreSQL schema of this module's own."""
    if request.param == "sqlite":
        yield None
        return
    assert EXTERNAL_URL is not None
    if not EXTERNAL_URL.startswith("postgresql"):
        yield EXTERNAL_URL
        return
    from sqlalchemy import text

    from server.db import create_db_engine

    schema = f"edgefleet_dashboard_{os.getpid()}"
    admin = create_db_engine(EXTERNAL_URL)
    with admin.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield database_url("external", Path("."), schema)
    finally:
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(scope="module")
def fleet(
    mqtt_broker: BrokerEndpoint,
    database: str | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("dashboard")
    data_dir, log = work / "server", work / "server.log"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(data_dir, database, mqtt_broker, port, log)
    simulator: FleetSimulator | None = None

    def log_tail() -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-40:])

    try:

        def healthy() -> bool:
            assert server.poll() is None, f"the server exited:\n{log_tail()}"
            try:
                return httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 90, "the server answering")
        from server.auth.tokens import read_admin_token

        admin = read_admin_token(data_dir)
        assert admin, f"the dev-mode server wrote no admin token to {data_dir}"
        api = ApiClient(url, token=admin)
        model, versions, reference = _publish_model(data_dir, database, 2)
        viewer = api.post("/operators", json={"name": "watcher", "role": "viewer"})["token"]

        groups = {"line-a": 5, "line-b": 5, "spares": 1}
        profile = get_profile(PROFILE)
        enrolled = {}
        for group, count in groups.items():
            api.post("/groups", json={"name": group, "description": f"cameras of {group}"})
            token = api.post(
                "/provisioning-tokens",
                json={"group": group, "profile": PROFILE, "max_uses": count, "auto_accept": True},
            )["token"]
            enrolled[group] = enroll_devices(
                api,
                token=token,
                device_ids=[f"{group}-{i:02d}" for i in range(count)],
                profile=profile,
                tags={"line": group},
            )
        root = VerifyKey.from_base64(enrolled["line-a"][0].root_public_key)
        passwords = {e.device_id: (e.username, e.password) for es in enrolled.values() for e in es}

        def behaviour(group: str, index: int) -> Behaviour:
            if group == "line-b":
                # line-b's cameras see glare; one of them fails every self-test
                return Behaviour(drift=DRIFTED, reject_installs=index == 4, latency_ms=12.0)
            return Behaviour()

        # "spares" stay switched off: enrolled, never seen
        devices = [
            SimulatedDevice(
                e.device_id,
                profile=PROFILE,
                runtime=(profile.runtime.name, profile.runtime.version),
                arch=profile.arch,
                root_keys=[root],
                behaviour=behaviour(group, i),
                wall_clock=lambda: datetime.now(UTC),
            )
            for group in ("line-a", "line-b")
            for i, e in enumerate(enrolled[group])
        ]
        simulator = FleetSimulator(
            devices,
            host=mqtt_broker.host,
            port=mqtt_broker.port,
            credentials=passwords.get,
            report_interval=1.0,
            inferences_per_report=150,
        )
        simulator.start()
        wait_for(lambda: simulator.stats().connected == len(devices), 30, "devices connected")

        first = {}
        for group, extra in (("line-a", {}), ("line-b", {"max_activation_failure_rate": 0.5})):
            first[group] = api.post(
                "/rollouts",
                json={
                    "model": model,
                    "version": versions[0],
                    "group": group,
                    "phases": "100",
                    "wait_between_phases": 0,
                    "retry": {"max_attempts": 1},  # a failed self-test stays failed
                    "gates": {**ACTIVATION_ONLY, **extra},
                },
            )["id"]
        for group, rollout_id in first.items():
            try:
                shown = wait_for(
                    functools.partial(_rollout_in, api, rollout_id, *FINISHED_OR_PAUSED),
                    60,
                    f"the first rollout to {group} finished",
                )
            except AssertionError as e:
                raise AssertionError(f"{e}: {api.get(f'/rollouts/{rollout_id}')}") from e
            assert shown["status"] == "completed", shown
        api.put(f"/models/{model}/aliases/production", json={"version": str(versions[0])})
        history = {g: [d.device_id for d in devices if d.device_id.startswith(g)] for g in first}
        history["line-b"].remove("line-b-04")  # its install failed: it never ran the model
        _send_history(
            mqtt_broker,
            reference,
            model=model,
            version=versions[0],
            devices=history,
            hours=HISTORY_HOURS,
        )

        def history_stored() -> bool:
            heat = api.get(
                "/dashboard/drift/heatmap",
                params={"model": model, "version": "1", "since": f"{HISTORY_HOURS + 1}h"},
            )
            filled = [sum(v is not None for v in r["values"]) for r in heat["rows"]]
            return bool(filled) and min(filled[: 2 * len(heat["features"])]) >= HISTORY_HOURS

        wait_for(history_stored, 60, "the past hours' telemetry stored")
        canary = api.post(
            "/rollouts",
            json={
                "model": model,
                "version": versions[1],
                "group": "line-a",
                "phases": "1dev,100",
                "approval": True,
                "wait_between_phases": 4,  # telemetry for the gates, then the approval
                "gates": {"min_inferences": 100},
            },
        )["id"]
        api.post(
            "/alert-rules",
            json={
                "name": "line-b-drift",
                "model": model,
                "group": "line-b",
                "severity": "critical",
                "description": "glare on line-b's cameras",
                "condition": {"kind": "drift", "windows": 1, "min_samples": 300},
            },
        )
        api.post(
            "/retraining/policies",
            json={
                "name": "retrain-on-drift",
                "model": model,
                "groups": ["line-b"],
                # as the architecture's example: drifted for 3 windows (hours) in a row
                "condition": {"kind": "drift", "windows": 3, "min_samples": 300},
                "approval": True,
            },
        )
        try:
            shown = wait_for(
                lambda: _rollout_in(api, canary, "waiting_approval", "paused", "aborted"),
                60,
                "the canary phase waiting for approval",
            )
        except AssertionError as e:
            raise AssertionError(f"{e}: {api.get(f'/rollouts/{canary}')}") from e
        assert shown["status"] == "waiting_approval", shown
        wait_for(lambda: api.get("/alerts", params={"status": "open"}), 60, "an open alert")
        wait_for(lambda: api.get("/retraining/decisions"), 60, "a retraining decision")
        yield Fleet(
            url=url,
            api=api,
            admin_token=admin,
            viewer_token=viewer,
            model=model,
            versions=versions,
            rollout_id=canary,
            simulator=simulator,
            data_dir=data_dir,
            log=log,
            devices={g: [e.device_id for e in es] for g, es in enrolled.items()},
        )
    except BaseException:
        sys.stderr.write(f"edgefleet server log tail:\n{log_tail()}\n")
        raise
    finally:
        if simulator is not None:
            simulator.stop()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


# ----------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def playwright_driver() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


@dataclass
class Browser:
    driver: Any
    base: Path
    contexts: list[Any] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    """Every URL any page asked for."""
    errors: list[str] = field(default_factory=list)
    """Console errors and uncaught exceptions of every page."""

    def context(self) -> Any:
        """A fresh browser profile (its own user-data directory, so its own localStorage)."""
        directory = self.base / f"profile-{len(self.contexts)}"
        context = self.driver.chromium.launch_persistent_context(
            str(directory),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1440, "height": 1000},
        )
        context.set_default_timeout(20_000)
        context.on("request", lambda request: self.requests.append(request.url))
        self.contexts.append(context)
        return context

    def watch(self, page: Any) -> Any:
        def on_console(message: Any) -> None:
            if message.type == "error":
                self.errors.append(f"{page.url}: {message.text}")

        page.on("console", on_console)
        page.on("pageerror", lambda error: self.errors.append(f"{page.url}: {error}"))
        return page

    def close(self) -> None:
        for context in self.contexts:
            with contextlib.suppress(Exception):
                context.close()


@pytest.fixture(scope="module")
def browser(
    playwright_driver: Any, fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Browser]:
    """Browser profiles for one ``fleet`` (so what they fetched is that server's alone)."""
    found = Browser(playwright_driver, tmp_path_factory.mktemp("chromium"))
    try:
        yield found
    finally:
        found.close()


def open_page(
    browser: Browser, context: Any, fleet: Fleet, path: str, *, token: str | None = None
) -> Any:
    """Open ``path`` signed in with ``token`` (a ``#token=`` link) and wait until the page
    has drawn its data once."""
    page = browser.watch(context.new_page())
    link = f"{fleet.url}{path}"
    if token is not None:
        link += f"#token={token}"
    page.goto(link)
    name = path.split("?")[0].strip("/") or "fleet"
    page.wait_for_selector(f'body[data-loaded-page="{name}"]')
    return page


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    target = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(target), full_page=True)
    return target
