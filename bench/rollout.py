"""A rollout to a simulated fleet, through a real broker and a real server process.

Figures (issue 5's targets):

- time from the rollout's creation to every device activated (and the rate that
  makes, devices per second);
- bytes delivered ÷ (artifact size × devices): goal 1.0 -- nothing fetched twice;
- server CPU seconds per device during the rollout (the ``edgefleet server`` process
  alone, read from /proc), beside the CPU the same server spent idle for as long.

The server runs as its own process (``edgefleet server``, SQLite, the rollout engine,
block server, ingestion and inventory all on); the broker is a Mosquitto process of
its own when the binary is installed, else the server's embedded broker (then the
server's CPU includes the broker's). Simulated devices (server/simulator) enroll
through the API and speak the real protocol: signed desired state verified with the
agent's rules, artifact fetched by blocks, bundle verified.

    python bench/rollout.py [--quick] [--devices N] [--results PATH]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import brokers
from brokers import free_port, wait_port
from results import BenchResults, add_results_argument

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MODEL = "bench-mlp"
PROFILE = "edge-x86_64-litert"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def start_mosquitto(work: Path) -> tuple[subprocess.Popen[bytes] | None, str]:
    """A Mosquitto of our own, or the server's embedded broker where none is installed."""
    if brokers.mosquitto_binary() is None:
        return None, "embedded"
    process, port = brokers.start_mosquitto(
        work, "max_inflight_messages 64\nmax_queued_messages 10000\n"
    )
    return process, f"mqtt://127.0.0.1:{port}"


def register_model(
    data_dir: Path, hidden: tuple[int, int], database_url: str | None = None
) -> tuple[int, int]:
    """Train a dense digits classifier (about 1 MB as float32 TFLite with the full-mode
    layers) and register it through the real pipeline into the server's database (its
    SQLite file unless ``database_url`` names another) and store; returns (version, size)."""
    import keras
    import numpy as np
    from sklearn.datasets import load_digits
    from sqlmodel import Session, select

    from server.artifacts import ArtifactStore
    from server.datasets.types import DatasetSchema, LoadedDataset
    from server.db import create_db_engine, session_scope
    from server.keys import load_fleet_keys
    from server.models import Dataset, DatasetVersion, TargetArtifact
    from server.pipeline.publish import publish_model_version
    from server.pipeline.targets import build_targets
    from server.pipeline.types import GateConfig
    from server.profiles import load_profiles
    from shared.preprocessing import Scale, apply_preprocessing

    digits = load_digits()
    x, y = digits.data.astype(np.float32), digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    schema = DatasetSchema(
        task="classification",
        label="digit",
        feature_names=[f"p{i}" for i in range(64)],
        feature_dtypes=["float64"] * 64,
        input_shape=[64],
        class_names=[str(d) for d in range(10)],
        rows=len(x),
    )
    data = LoadedDataset(
        dataset_name="digits",
        version=1,
        sha256="0" * 64,
        schema=schema,
        x_train=x[:1200],
        y_train=y[:1200],
        x_val=x[1200:1500],
        y_val=y[1200:1500],
        x_test=x[1500:],
        y_test=y[1500:],
    )
    steps = [Scale(factor=1 / 16)]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(hidden[0], activation="relu"),
            keras.layers.Dense(hidden[1], activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(apply_preprocessing(steps, data.x_train), data.y_train, epochs=3, verbose=0)
    predicted = model.predict(apply_preprocessing(steps, data.x_test), verbose=0).argmax(axis=1)
    accuracy = float(np.mean(predicted == data.y_test))
    profiles = {PROFILE: load_profiles()[PROFILE]}
    engine = create_db_engine(database_url or f"sqlite:///{data_dir / 'edgefleet.db'}")
    keys = load_fleet_keys(data_dir / "keys", now=datetime.now(UTC))
    builds = build_targets(
        model,
        data=data,
        preprocessing=steps,
        profiles=list(profiles.values()),
        gates=GateConfig(),
        float_metrics={"accuracy": accuracy},
    )
    with session_scope(engine) as session:
        dataset = Dataset(name="bench-digits", task="classification", label="digit")
        session.add(dataset)
        session.flush()
        row = DatasetVersion(
            dataset_id=dataset.id,  # type: ignore[arg-type]
            version=1,
            sha256="a" * 64,
            source_sha256="b" * 64,
            source_format="builtin",
            rows=len(x),
            data_schema_json=schema.model_dump_json(),
            splits_sha256="c" * 64,
            split_seed=0,
        )
        session.add(row)
        session.flush()
        dataset_version_id = row.id
    with Session(engine) as session:
        version = publish_model_version(
            session,
            store=ArtifactStore(data_dir / "artifacts"),
            keys=keys,
            profiles=profiles,
            model_name=MODEL,
            dataset=data,
            dataset_version_id=dataset_version_id,  # type: ignore[arg-type]
            keras_model=model,
            preprocessing=steps,
            float_metrics={"accuracy": accuracy},
            source="trained",
            run_id=None,
            build=lambda *_a, **_k: builds,
        )
        artifact = session.exec(
            select(TargetArtifact).where(TargetArtifact.model_version_id == version.id)
        ).one()
        number, size = version.version, int(artifact.bundle_length or 0)
    engine.dispose()
    return number, size


def run(devices: int, hidden: tuple[int, int], quick: bool, results: BenchResults) -> None:
    from server.commands.client import ApiClient
    from server.profiles import get_profile
    from server.simulator import FleetSimulator, SimulatedDevice
    from server.simulator.enroll import enroll_devices
    from shared.signing import VerifyKey

    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-rollout-"))
    mosquitto, broker = start_mosquitto(work)
    port = free_port()
    admin_token = secrets.token_urlsafe(32)
    env = {
        **os.environ,
        "EDGEFLEET_DATA_DIR": str(work / "server"),
        "EDGEFLEET_RUN_JOBS": "false",
        "EDGEFLEET_ROLLOUT_TICK_SECONDS": "0.5",
        "EDGEFLEET_LOG_LEVEL": "WARNING",
        # the bench is the operator (dev mode takes any admin token it is given), and
        # enrolls the whole fleet from one address with one token
        "EDGEFLEET_ADMIN_TOKEN": admin_token,
        "EDGEFLEET_ENROLL_PER_MINUTE_PER_ADDRESS": "1000000",
        "EDGEFLEET_ENROLL_PER_MINUTE_PER_TOKEN": "1000000",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "server", "--broker", broker, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    simulator = None
    try:
        wait_port(port, 60, "edgefleet server")
        client = ApiClient(f"http://127.0.0.1:{port}", token=admin_token)
        version, size = register_model(work / "server", hidden)
        profile = get_profile(PROFILE)
        client.post("/groups", json={"name": "bench"})
        token = client.post(
            "/provisioning-tokens",
            json={"group": "bench", "profile": PROFILE, "max_uses": devices, "auto_accept": True},
        )["token"]
        started = time.monotonic()
        enrolled = enroll_devices(
            client,
            token=token,
            device_ids=[f"bench-{i:04d}" for i in range(devices)],
            profile=profile,
        )
        enroll_seconds = time.monotonic() - started
        broker_url = enrolled[0].broker_url or broker
        host, _, broker_port = broker_url.removeprefix("mqtt://").partition(":")
        root = VerifyKey.from_base64(enrolled[0].root_public_key)
        fleet = [
            SimulatedDevice(
                e.device_id,
                profile=PROFILE,
                runtime=(profile.runtime.name, profile.runtime.version),
                root_keys=[root],
                wall_clock=lambda: datetime.now(UTC),
            )
            for e in enrolled
        ]
        simulator = FleetSimulator(
            fleet, host=host, port=int(broker_port or 1883), report_interval=30.0
        )
        simulator.start()
        deadline = time.monotonic() + 120
        while simulator.stats().connected < devices:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {simulator.stats().connected} of {devices} connected")
            time.sleep(0.2)
        idle_window = 3.0
        cpu_idle_start = cpu_seconds(server.pid)
        time.sleep(idle_window)
        cpu_idle = cpu_seconds(server.pid) - cpu_idle_start

        cpu_start = cpu_seconds(server.pid)
        started = time.monotonic()
        rollout = client.post(
            "/rollouts",
            json={
                "model": MODEL,
                "version": version,
                "group": "bench",
                "phases": "10,100",
                "wait_between_phases": 0,
                "max_devices_per_minute": 100_000,
                "gates": {
                    "max_error_rate": None,
                    "max_latency_sla_ratio": None,
                    "max_confidence_drop": None,
                    "max_prediction_psi": None,
                },
            },
        )
        deadline = time.monotonic() + (120 if quick else 900)
        while True:
            stats = simulator.stats()
            if stats.installs >= devices:
                break
            if time.monotonic() > deadline:
                shown = client.get(f"/rollouts/{rollout['id']}")
                raise SystemExit(
                    f"{stats.installs} of {devices} activated before the deadline; "
                    f"rollout: {shown.get('status')} {shown.get('counts')}"
                )
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(server.pid) - cpu_start
        stats = simulator.stats()
        delivered = stats.bytes_received / (size * devices)
        results.note(
            f"rollout benchmark ({'quick' if quick else 'full'}): {devices} simulated devices, "
            f"a {size / 1e6:.2f} MB signed bundle, broker: "
            f"{'Mosquitto (own process)' if mosquitto is not None else 'embedded'}; "
            f"enrolling them through the API took {enroll_seconds:.1f} s"
        )
        results.add(
            "rollout start → all activated",
            elapsed,
            "s",
            value_text=f"{elapsed:.1f} s",
            baseline_text=f"{devices / elapsed:.1f} devices/s",
        )
        results.add(
            "bytes delivered ÷ (artifact × devices)",
            delivered,
            value_text=f"{delivered:.3f}",
            baseline=1.0,
            baseline_text="1.0 (each byte once)",
            ratio=delivered,
            ratio_text=f"{delivered:.3f}",
            goal="1.0",
            passed=abs(delivered - 1.0) < 1e-9,
        )
        results.add(
            "server CPU per device",
            cpu / devices * 1000,
            "ms",
            value_text=f"{cpu / devices * 1000:.1f} ms",
            baseline=cpu_idle / idle_window,
            baseline_text=f"idle: {cpu_idle / idle_window:.2f} CPU-s/s",
            ratio=cpu / max(elapsed, 1e-9) / max(cpu_idle / idle_window, 1e-9),
            ratio_text=f"{cpu / max(elapsed, 1e-9):.2f} CPU-s/s busy",
        )
        results.add(
            "block requests per device",
            stats.block_requests / devices,
            value_text=f"{stats.block_requests / devices:.1f}",
        )
    finally:
        if simulator is not None:
            simulator.stop()
        server.send_signal(signal.SIGINT)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        if mosquitto is not None:
            mosquitto.terminate()
            mosquitto.wait(10)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small fleet (CI)")
    parser.add_argument("--devices", type=int, default=None)
    add_results_argument(parser)
    args = parser.parse_args()
    devices = args.devices or (20 if args.quick else 500)
    hidden = (96, 64) if args.quick else (512, 448)
    results = BenchResults("rollout", quick=args.quick, path=args.results)
    run(devices, hidden, args.quick, results)
    results.finish()


if __name__ == "__main__":
    main()
