"""``edgefleet demo``: the loop as far as it is built, on embedded defaults, end to end.

It starts the server (SQLite file, embedded broker, local artifact folder, the job
runner), adds the bundled digits dataset, trains the reference CNN as a background
run, and shows the per-target artifacts the pipeline built -- converted, evaluated in
each target's runtime, gated and signed -- then promotes the version. It publishes a
signed desired state over MQTT and plays one device: the device verifies the manifest
and the bundle with ``shared``'s trust rules, runs the bundle's self-tests, infers on
a normal and on a drifted data stream, and reports telemetry with drift sketches; the
server side merges them and shows the drift. Tampered and replayed documents are
refused on the way.

The device half is the agent's own code: ``shared``'s trust rules and
:class:`agent.runtime.LoadedModel` (preprocessing, LiteRT, self-tests).
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlmodel import Session

from agent.runtime import LoadedModel
from server.commands.client import ApiClient
from shared.bundle import check_target, read_bundle
from shared.drift import DriftAccumulator, compare, merge_sketches
from shared.errors import ContractError
from shared.latency import latency_counts, latency_quantile
from shared.messages import (
    ArtifactRef,
    Deployment,
    DesiredMessage,
    DesiredState,
    LatencyHistogram,
    ModelWindow,
    TelemetryReport,
)
from shared.signing import PayloadType, sign_envelope
from shared.topics import Channel, device_topic, fleet_filter
from shared.trust import TrustState, accept_desired

__all__ = ["run_demo"]

MARKER = ".edgefleet-demo"
MODEL_NAME = "digits-cnn"
TRAIN_EPOCHS = 8
TARGET = "edge-x86_64-litert"
DEVICE_ID = "demo-cam-1"
WINDOW_ROWS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _prepare_dir(data_dir: Path) -> None:
    if data_dir.exists():
        if not (data_dir / MARKER).exists():
            raise SystemExit(
                f"{data_dir} exists and was not made by the demo; pass --data-dir elsewhere"
            )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    (data_dir / MARKER).write_text("made by `edgefleet demo`; deleted by its next run\n")


def _drift(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A camera whose gain went up and whose sensor got noisy."""
    drifted = x * 1.6 + rng.normal(0.0, 2.0, size=x.shape)
    return np.clip(drifted, 0.0, 16.0).astype(np.float32)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide what native libraries print straight to fd 2 while they load.

    TensorFlow's absl logging writes start-up notices (oneDNN, CUDA probing) before
    any log level applies; they are noise in a demo. Python errors still surface as
    exceptions.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _follow_run(client: ApiClient, run_id: int, console: Console) -> dict[str, Any]:
    """Poll a run with a progress bar over its epochs, then its publishing phases."""
    with Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} epochs"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(f"run {run_id}", total=TRAIN_EPOCHS, detail="queued")
        while True:
            run: dict[str, Any] = client.get(f"/runs/{run_id}")
            state = run.get("progress") or {}
            detail = run["phase"] or run["status"]
            loss = state.get("loss")
            if run["phase"] == "training" and loss is not None:
                detail = f"loss {loss:.3f}"
            progress.update(task, completed=state.get("epoch") or 0, detail=detail)
            if run["status"] in ("succeeded", "failed", "cancelled"):
                if run["status"] == "succeeded":
                    progress.update(task, completed=TRAIN_EPOCHS, detail="done")
                return run
            time.sleep(0.3)


def _print_artifacts(console: Console, version: dict[str, Any]) -> None:
    table = Table(title=f"{version['model']} v{version['version']}: one artifact per target")
    left = ("target", "format", "quant", "gate")
    for column in ("target", "format", "quant", "KiB", "accuracy", "Δ pt", "p50 ms", "gate"):
        table.add_column(
            column, justify="left" if column in left else "right", no_wrap=column == "target"
        )
    for a in version["artifacts"]:
        gate = (
            "[green]pass[/]" if a["gate_passed"] else "[red]fail[/] " + "; ".join(a["gate_reasons"])
        )
        table.add_row(
            a["target"],
            a["format"],
            a["quantization"],
            f"{(a['size_bytes'] or 0) / 1024:.0f}",
            "-" if a["metric_value"] is None else f"{a['metric_value']:.3f}",
            "-" if a["metric_delta"] is None else f"{a['metric_delta']:+.2f}",
            "-" if a["latency_p50_ms"] is None else f"{a['latency_p50_ms']:.3f}",
            gate,
        )
    console.print(table)
    test = version["metrics"]
    console.print(
        f"  float model on the test split: accuracy {test.get('accuracy', 0):.3f}, "
        f"macro-F1 {test.get('macro_f1', 0):.3f}"
    )


def _start_api(settings: Any, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    from server.app import create_app

    config = uvicorn.Config(
        create_app(settings), host="127.0.0.1", port=port, log_config=None, log_level="warning"
    )
    api = uvicorn.Server(config)
    thread = threading.Thread(target=api.run, name="demo-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not api.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("the demo server did not start; see the log above")
        time.sleep(0.05)
    return api, thread


class MqttPeer:
    """A paho client whose callbacks only enqueue (never block, never raise)."""

    def __init__(self, url: str, client_id: str) -> None:
        import paho.mqtt.client as mqtt

        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        self.client.on_connect = lambda *_: self._connected.set()
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        self.client.connect(host, int(port))
        self.client.loop_start()
        if not self._connected.wait(10):
            raise SystemExit(f"could not connect to the broker at {url}")

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def next(self, timeout: float = 10.0) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_demo(*, data_dir: Path, exit_after: float | None, port: int = 0) -> int:
    from server.broker import EmbeddedBroker
    from server.logs import configure_logging
    from server.settings import Settings

    console = Console()
    started = time.monotonic()
    configure_logging("WARNING")
    rng = np.random.default_rng(7)
    _prepare_dir(data_dir)

    def step(text: str) -> None:
        console.print(f"[bold cyan]▶[/] {text}")

    step("starting the embedded MQTT broker and the server (SQLite, local artifacts)")
    broker = EmbeddedBroker(port=0)
    broker.start()
    settings = Settings(data_dir=data_dir, broker_url=broker.url, mode="dev")
    api_port = port or _free_port()
    api, api_thread = _start_api(settings, api_port)
    app_state = api.config.app.state
    keys, store, engine = app_state.keys, app_state.artifacts, app_state.engine
    base_url = f"http://127.0.0.1:{api_port}"
    console.print(f"  API {base_url}/api/v1/health · docs {base_url}/docs · broker {broker.url}")

    client = ApiClient(base_url)
    step("adding the bundled digits dataset (a content-addressed version, seeded splits)")
    dataset = client.post("/datasets/examples/digits", json={})
    console.print(
        f"  {dataset['dataset']} v{dataset['version']} · {dataset['rows']} rows · "
        f"sha256 {dataset['sha256'][:16]}…"
    )

    step("training the reference CNN as a background run (queued → running → succeeded)")
    run = client.post(
        "/runs",
        json={"dataset": "digits", "model": MODEL_NAME, "arch": "cnn2d", "epochs": TRAIN_EPOCHS},
    )
    run = _follow_run(client, run["id"], console)
    if run["status"] != "succeeded":
        raise SystemExit(f"training run {run['id']} {run['status']}: {run.get('error')}")
    model_version = run["lineage"]["model_version"]

    step("per-target artifacts: converted, evaluated in the target runtime, gated, signed")
    version = client.get(f"/models/{MODEL_NAME}/versions/{model_version}")
    _print_artifacts(console, version)
    client.put(f"/models/{MODEL_NAME}/aliases/candidate", json={"version": str(model_version)})
    console.print(f"  {MODEL_NAME} v{model_version} promoted to [bold]candidate[/]")
    artifact = next(a for a in version["artifacts"] if a["target"] == TARGET)
    if not artifact["gate_passed"]:
        raise SystemExit(f"the {TARGET} artifact failed its gates: {artifact['gate_reasons']}")
    with store.open(artifact["bundle_sha256"]) as f:
        bundle_bytes = f.read()
    stored = store.verify(artifact["bundle_sha256"])
    from server.datasets.service import load_dataset_version, resolve_version

    with Session(engine) as session:
        row = resolve_version(session, f"{dataset['dataset']}@{dataset['version']}")
        streams = load_dataset_version(session, store=store, dataset_version_id=row.id)

    step(f"publishing a signed desired state for {DEVICE_ID} (retained, QoS 1)")
    now = datetime.now(UTC)

    def desired_message(version: int) -> DesiredMessage:
        desired = DesiredState(
            device_id=DEVICE_ID,
            manifest_version=version,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            rollout_id="demo",
            deployments=[
                Deployment(
                    model_name=MODEL_NAME,
                    model_version=model_version,
                    target=TARGET,
                    artifact=ArtifactRef(sha256=stored.sha256, length=stored.length),
                )
            ],
        )
        return DesiredMessage(
            keyring=keys.keyring_envelope,
            manifest=sign_envelope(
                desired.to_bytes(), PayloadType.DESIRED_STATE, keys.signing_keys
            ),
        )

    server_peer = MqttPeer(broker.url, "demo-server")
    server_peer.subscribe(fleet_filter(Channel.TELEMETRY))
    server_peer.publish(
        device_topic(DEVICE_ID, Channel.DESIRED), desired_message(2).to_bytes(), retain=True
    )

    step(f"{DEVICE_ID}: verifying the manifest and the bundle, then running the self-tests")
    device_peer = MqttPeer(broker.url, DEVICE_ID)
    device_peer.subscribe(device_topic(DEVICE_ID, Channel.DESIRED))
    _, raw = device_peer.next()
    trust = TrustState.from_root_keys([keys.root_public])
    acceptance = accept_desired(
        trust, DesiredMessage.from_bytes(raw), device_id=DEVICE_ID, now=datetime.now(UTC)
    )
    deployment = acceptance.desired.deployments[0]
    with store.open(deployment.artifact.sha256) as f:
        bundle = read_bundle(
            f,
            trusted_keys=acceptance.state.keyring.verify_keys(),  # type: ignore[union-attr]
            expected_sha256=deployment.artifact.sha256,
            expected_length=deployment.artifact.length,
        )
    check_target(
        bundle.manifest,
        model_name=deployment.model_name,
        model_version=deployment.model_version,
        target=deployment.target,
        runtimes=["litert"],
    )
    with _native_stderr_silenced():  # "Created TensorFlow Lite XNNPACK delegate"
        device_model = LoadedModel.load(bundle)
    device_model.run_self_tests()
    console.print(
        f"  accepted manifest v{acceptance.state.manifest_version}; bundle verified "
        f"({bundle.length} bytes, sha256 ok); {len(bundle.manifest.self_tests)} self-test(s) pass"
    )

    refused = _show_refusals(acceptance.state, desired_message, bundle_bytes, keys)
    for what, reason in refused:
        console.print(f"  refused as it should be: {what} → [yellow]{reason}[/]")

    step("inferring offline on a normal stream, then on a drifted one (gain ×1.6, noise)")
    seq = 0
    accuracy: dict[str, float] = {}
    stream_sketches: dict[str, list[Any]] = {"normal": [], "drifted": []}
    received: dict[str, list[TelemetryReport]] = {"normal": [], "drifted": []}
    with Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} windows"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for name, x in (("normal", streams.x_test), ("drifted", _drift(streams.x_test, rng))):
            windows = range(0, len(x), WINDOW_ROWS)
            task = progress.add_task(name, total=len(windows))
            correct = 0
            for start in windows:
                rows = x[start : start + WINDOW_ROWS]
                window_start = datetime.now(UTC)
                accumulator = DriftAccumulator(bundle.manifest.drift_reference)  # type: ignore[arg-type]
                latencies = []
                predictions = []
                for row in rows:  # one inference per request, as on a device
                    t0 = time.perf_counter()
                    probs = device_model.predict(row).probabilities
                    latencies.append((time.perf_counter() - t0) * 1000)
                    accumulator.update(row, probabilities=probs)
                    predictions.append(int(probs.argmax()))
                labels = streams.y_test[start : start + WINDOW_ROWS]
                correct += int((np.asarray(predictions) == labels).sum())
                report = TelemetryReport(
                    device_id=DEVICE_ID,
                    seq=seq,
                    window_start=window_start,
                    window_end=datetime.now(UTC),
                    models=[
                        ModelWindow(
                            model_name=MODEL_NAME,
                            model_version=model_version,
                            target=TARGET,
                            inferences=len(rows),
                            latency_ms=LatencyHistogram(counts=latency_counts(latencies).tolist()),
                            drift=accumulator.sketch(),
                        )
                    ],
                )
                device_peer.publish(device_topic(DEVICE_ID, Channel.TELEMETRY), report.to_bytes())
                seq += 1
                _, payload = server_peer.next()
                ingested = TelemetryReport.from_bytes(payload)
                received[name].append(ingested)
                sketch = ingested.models[0].drift
                assert sketch is not None
                stream_sketches[name].append(sketch)
                progress.advance(task)
            accuracy[name] = correct / len(x)

    step("server: merging the windows' sketches and measuring drift against the reference")
    table = Table(title="drift of the device's input, per stream (top 5 features by PSI)")
    for column in ("stream", "feature", "PSI", "JS distance", "KS", "out of range"):
        table.add_column(column, justify="right" if column not in ("stream", "feature") else "left")
    summary = {}
    for name in ("normal", "drifted"):
        merged = merge_sketches(stream_sketches[name])
        results = sorted(
            compare(bundle.manifest.drift_reference, merged),  # type: ignore[arg-type]
            key=lambda d: d.psi,
            reverse=True,
        )
        summary[name] = (
            float(np.median([d.psi for d in results])),
            sum(d.psi >= 0.25 for d in results),
        )
        for d in results[:5]:
            table.add_row(
                name,
                d.name,
                f"{d.psi:.3f}",
                f"{d.js_distance:.3f}",
                f"{d.ks:.3f}",
                f"{d.out_of_range_share:.1%}",
            )
    console.print(table)
    hist = np.sum([r.models[0].latency_ms.counts for r in received["normal"]], axis=0)
    p50, p95 = latency_quantile(hist, 0.5), latency_quantile(hist, 0.95)
    for name in ("normal", "drifted"):
        median_psi, drifted_features = summary[name]
        console.print(
            f"  {name:8} accuracy {accuracy[name]:.3f} · median PSI {median_psi:.3f} · "
            f"{drifted_features}/64 features with PSI ≥ 0.25"
        )
    console.print(
        f"  {seq} telemetry reports over MQTT, all ingested · single-row latency "
        f"p50 ≤ {p50} ms, p95 ≤ {p95} ms"
    )
    server_peer.close()
    device_peer.close()

    console.print(
        f"\n[bold green]done[/] in {time.monotonic() - started:.0f} s. "
        f"Server: {base_url}/docs · state in {data_dir}/"
    )
    try:
        if exit_after is None:
            console.print("serving until Ctrl-C")
            while api_thread.is_alive():
                api_thread.join(0.5)
        else:
            api_thread.join(max(0.0, exit_after))
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        api.should_exit = True
        api_thread.join(10)
        broker.stop()
    return 0


def _show_refusals(
    state: TrustState, desired_message: Any, bundle_bytes: bytes, keys: Any
) -> list[tuple[str, str]]:
    """Attacks a device must refuse, each with the reason it reports."""
    results = []
    replay = desired_message(1)  # an older manifest version
    tampered = bytearray(bundle_bytes)
    tampered[len(tampered) // 2] ^= 0x01
    cases: list[tuple[str, Any]] = [
        (
            "replayed older manifest",
            lambda: accept_desired(state, replay, device_id=DEVICE_ID, now=datetime.now(UTC)),
        ),
        (
            "manifest for another device",
            lambda: accept_desired(
                state, desired_message(3), device_id="demo-cam-2", now=datetime.now(UTC)
            ),
        ),
        (
            "bundle with one flipped bit",
            lambda: read_bundle(bytes(tampered), trusted_keys=[k.public for k in keys.online]),
        ),
    ]
    for what, attempt in cases:
        try:
            attempt()
        except ContractError as e:
            results.append((what, getattr(e, "reason", type(e).__name__)))
        else:  # pragma: no cover - would be a security bug
            raise SystemExit(f"SECURITY: {what} was accepted")
    return results
