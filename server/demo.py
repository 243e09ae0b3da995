"""``edgefleet demo``: the whole loop on embedded defaults, end to end.

What it does, in order, printing progress as it goes:

1. Starts the embedded MQTT broker and the server (SQLite file, local artifact folder,
   job runner, rollout engine, telemetry ingestion, inventory, alert evaluator) on free
   loopback ports, so it never meets a Mosquitto or a server on the default ports.
2. Adds the bundled digits dataset and trains the reference CNN as a background run;
   shows the per-target artifacts the pipeline built (converted, evaluated in each
   target's runtime, gated, signed) and promotes the version to ``candidate``.
3. Builds a fleet of real agents: two static groups (``line-a``, ``line-b``), an
   auto-accepting provisioning token per group scoped to the x86 edge profile, and
   :data:`AGENTS_PER_GROUP` ``edgefleet-agent`` processes per group, each with its own
   data folder, local API port and opt-in sample capture, enrolled with
   ``edgefleet-agent enroll`` and run with ``edgefleet-agent run --config FILE``.
4. Streams camera frames (the digits test split, one row per request) into every
   agent's local API, and labels every answer through the agent's ``/v1/feedback``, as
   an inspection station would. A drift alert rule per group is set up.
5. Rolls the promoted version out to ``line-a`` as a canary (one device, observed for
   two telemetry windows, then the rest) and then to ``line-b``, shown live from the
   rollout API: devices per phase and the health gates the agents' telemetry feeds
   (activation failures, inference errors, latency p95 against the profile's SLA).
   Then it prints which device runs which version, from the inventory API.
6. Tampered and misdirected documents are refused on the way: a bundle with one
   flipped bit (``edgefleet-agent verify``), and -- published straight to a device's
   topic, which anyone on the open embedded broker can do -- a desired state signed
   for another device and one signed by a key the fleet's root never listed; the
   agent refuses both and reports why (read back from the inventory).
7. Glare comes on ``line-b``'s cameras (:func:`_glare`: the left edge of the lens),
   so their input drifts on those pixels and on no other. The fleet drift per group,
   from the drift API: ``line-b`` drifted on the glare pixels, ``line-a`` not; the
   drift alert opens for ``line-b`` only.
8. The labelled frames ``line-b``'s agents captured under glare become a new version
   of the training data (with lineage). The retraining policy -- the same drift
   condition, on either line -- fires for ``line-b`` with its evidence (devices,
   features), trains on that newest version, the new version passes its gates and
   becomes ``candidate``, and its canary rollout to ``line-b`` completes; ``line-a``
   stays on the first version (inventory again).

It then prints a summary with the API's URL, writes it as JSON to
``<data dir>/demo-summary.json``, and serves until Ctrl-C (``--exit-after`` ends it
for scripts). Whatever way it ends -- done, Ctrl-C, SIGTERM, an error -- the streams
stop, every agent gets SIGTERM (and SIGKILL if it has not exited 10 s later), then
the server and the broker stop.

Nothing here is simulated: the agents verify real signatures, fetch bundles over the
MQTT block protocol, self-test, pass their health check on real traffic and report
real telemetry; every figure printed is read back from the server's API.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.auth.tokens import read_admin_token
from server.commands.client import ApiClient, ApiError

__all__ = ["AGENTS_PER_GROUP", "GROUPS", "MODEL_NAME", "SUMMARY_FILE", "run_demo"]

MARKER = ".edgefleet-demo"
SUMMARY_FILE = "demo-summary.json"
MODEL_NAME = "digits-cnn"
TRAIN_EPOCHS = 8
PROFILE = "edge-x86_64-litert"
GROUPS = ("line-a", "line-b")
DRIFTED_GROUP = "line-b"
AGENTS_PER_GROUP = 3
"""Real agent processes per group: six in all, as issue 7 asks (measured here: the demo
takes no longer than with two per group)."""
WINDOW_SECONDS = 5.0
"""The agents' telemetry window: short, so the server hears from them quickly."""
FRAMES_PER_SECOND = 40.0
"""Requests (one row each) a camera sends its agent per second."""
FEEDBACK_BATCH = 40
"""Labels a stream posts to its agent's ``/v1/feedback`` at a time (a second's worth)."""
CAPTURE_PER_WINDOW = 32
"""Input rows an agent captures per telemetry window (opt-in sample capture)."""
CANARY_OBSERVATION_SECONDS = 2 * WINDOW_SECONDS
"""How long the canary is watched after it activated: two telemetry windows of evidence."""
GLARE_COLUMNS = (0, 1)
"""Columns of the 8x8 image that glare brightens on ``line-b``'s cameras."""
ROLLOUT_GATES: dict[str, Any] = {
    "max_activation_failure_rate": 0.0,
    "max_error_rate": 0.01,
    "max_latency_sla_ratio": 1.0,
    # The quality gates compare the new version's confidence and predicted classes with
    # devices still on the previous version; a first rollout has none, so they could
    # only ever lack evidence. They are for the rollouts that replace a version.
    "max_confidence_drop": None,
    "max_prediction_psi": None,
    "min_inferences": 100,
}
DRIFT_MIN_SAMPLES = 500
"""Values of a feature a device needs before the drift API judges that device on it."""
DRIFT_CONDITION: dict[str, Any] = {
    "kind": "drift",
    "metric": "psi",
    "threshold": 0.25,
    "min_device_share": 0.3,
    "windows": 1,
    "min_samples": DRIFT_MIN_SAMPLES,
}
"""The alert rules' and the retraining policy's condition: one (hourly) window, the hour
in progress, so the demo need not wait for the hour to end."""
ALERT_INTERVAL_SECONDS = 2.0
"""How often the server judges alert rules and retraining policies (60 s by default)."""
MIN_LABELLED_SAMPLES = 150
"""Labelled glare frames the drifted group must have sent before they become data."""

AGENT_STOP_SECONDS = 10.0
ROLLOUT_TIMEOUT_SECONDS = 120.0
FLEET_TIMEOUT_SECONDS = 60.0
DRIFT_TIMEOUT_SECONDS = 60.0
POLL_SECONDS = 0.5


class DemoError(Exception):
    """The demo cannot go on; the message says what went wrong and where to look."""


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


def _glare(x: np.ndarray, *, width: int, rng: np.random.Generator) -> np.ndarray:
    """A camera with glare on the left edge of its lens: brighter and noisy there only."""
    drifted = x.astype(np.float32, copy=True)
    columns = [row * width + col for row in range(x.shape[1] // width) for col in GLARE_COLUMNS]
    glare = drifted[:, columns] * 1.6 + 3.0 + rng.normal(0.0, 2.0, size=(len(x), len(columns)))
    drifted[:, columns] = np.clip(glare, 0.0, 16.0)
    return drifted


def _glare_features(feature_names: Sequence[str], width: int) -> list[str]:
    return [
        feature_names[row * width + col]
        for row in range(len(feature_names) // width)
        for col in GLARE_COLUMNS
    ]


def _elapsed(since: float) -> str:
    return f"{time.monotonic() - since:5.1f}s"


def _table(title: str) -> Table:
    """A table that fits an 80-column terminal."""
    return Table(
        box=box.SIMPLE_HEAD,
        title=title,
        title_justify="left",
        pad_edge=False,
        collapse_padding=True,
        show_edge=False,
    )


# ----------------------------------------------------------------------------- the server


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
            raise DemoError("the demo server did not start; see the log above")
        time.sleep(0.05)
    return api, thread


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
    table = _table(
        f"{version['model']} v{version['version']}: one artifact per target "
        "(accuracy, its change in points, p50 latency in ms)"
    )
    left = ("target", "format", "quant", "gate")
    for column in ("target", "format", "quant", "KiB", "acc", "Δ pt", "p50", "gate"):
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


# ----------------------------------------------------------------------------- the agents


def _agent_command() -> list[str]:
    """``edgefleet-agent`` from this environment (the module when no script is installed)."""
    script = Path(sys.executable).parent / "edgefleet-agent"
    if script.is_file():
        return [str(script)]
    found = shutil.which("edgefleet-agent")
    return [found] if found else [sys.executable, "-m", "agent.cli"]


@dataclass
class AgentProcess:
    """One real agent: its folder, its config, its local API port and its process."""

    device_id: str
    group: str
    folder: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = None
    exit_code: int | None = None

    @property
    def config(self) -> Path:
        return self.folder / "agent.toml"

    @property
    def log_path(self) -> Path:
        return self.folder / "agent.log"

    def write_config(self, root_key: Path) -> None:
        """The config a provisioned image would carry; enrollment adds its ``[broker]``."""
        self.folder.mkdir(parents=True)
        self.config.write_text(
            f'device_id = "{self.device_id}"\n'
            f'profile = "{PROFILE}"\n'
            'data_dir = "data"\n'
            f"window_seconds = {WINDOW_SECONDS}\n"
            "\n[trust]\n"
            f"root_keys = [{json.dumps(str(root_key.resolve()))}]\n"
            "\n[http]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            "\n[capture]\n"
            "# keep some raw frames per window, so labelled ones can become training data\n"
            "enabled = true\n"
            f"max_per_window = {CAPTURE_PER_WINDOW}\n"
            "\n[limits]\n"
            "# judged on its first real inferences; without traffic, after 15 s\n"
            "health_check_max_seconds = 15\n"
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        self.log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*_agent_command(), "run", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the demo, which stops the agents in order
        )

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise DemoError(
                f"agent {self.device_id} exited with code {self.process.returncode}; "
                f"the end of {self.log_path}:\n{self.log_tail()}"
            )


def _enroll(agents: Sequence[AgentProcess], tokens: dict[str, str], server_url: str) -> None:
    """``edgefleet-agent enroll`` for every agent at once; each must succeed."""
    running: list[tuple[AgentProcess, subprocess.Popen[bytes]]] = []
    try:
        for agent in agents:
            command = [*_agent_command(), "enroll", "--server", server_url]
            command += ["--token", tokens[agent.group], "--config", str(agent.config), "--json"]
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            running.append((agent, process))
        for agent, process in running:
            try:
                out, err = process.communicate(timeout=FLEET_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired as e:
                raise DemoError(f"edgefleet-agent enroll for {agent.device_id} hangs") from e
            if process.returncode != 0:
                raise DemoError(
                    f"edgefleet-agent enroll for {agent.device_id} failed: "
                    f"{(err or out).decode(errors='replace').strip()}"
                )
            status = json.loads(out)["status"]
            if status != "accepted":
                raise DemoError(f"{agent.device_id} enrolled but is {status}, not accepted")
    finally:
        for _, process in running:  # after a failure, the others are not waited for
            if process.poll() is None:
                process.kill()
                process.wait()


def _stop_agents(agents: Sequence[AgentProcess]) -> None:
    """SIGTERM every agent, then SIGKILL those still running after AGENT_STOP_SECONDS (or
    at once on a second Ctrl-C)."""
    started = [a.process for a in agents if a.process is not None]
    for process in started:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + AGENT_STOP_SECONDS
    try:
        for process in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
        for agent in agents:
            if agent.process is not None:
                agent.exit_code = agent.process.returncode
            if agent.log_file is not None:
                agent.log_file.close()
                agent.log_file = None


# ----------------------------------------------------------------------------- the streams


class CameraStream(threading.Thread):
    """Sends one row per request to an agent's local API at a steady rate, as a camera
    would, and labels each answer afterwards, as the line's inspection station would: the
    true labels go back to the agent's ``/v1/feedback`` in batches of
    :data:`FEEDBACK_BATCH` (the agent forwards them to the server through its outbox).

    While ``glare`` is set, the frames come from ``glared`` (the same frames through a
    lens with glare) instead of ``rows``.
    """

    def __init__(
        self,
        device_id: str,
        port: int,
        rows: np.ndarray,
        labels: np.ndarray,
        stop: threading.Event,
        *,
        label_names: Sequence[str],
        glared: np.ndarray | None = None,
        glare: threading.Event | None = None,
    ) -> None:
        super().__init__(name=f"stream-{device_id}", daemon=True)
        self.device_id = device_id
        self._port = port
        self._bodies = [json.dumps({"instance": row.tolist()}).encode() for row in rows]
        self._glared = (
            None
            if glared is None
            else [json.dumps({"instance": row.tolist()}).encode() for row in glared]
        )
        self._glare = glare
        self._labels = labels.tolist()
        self._label_names = list(label_names)
        self._stopping = stop
        self._pending: list[dict[str, Any]] = []
        self.answered = 0
        self.correct = 0
        self.since_glare_answered = 0
        self.since_glare_correct = 0
        self.labelled = 0
        self.label_failures = 0

    def accuracy(self, *, since_glare: bool) -> tuple[int, int]:
        """(correct, answered) before the glare came on the drifted group (or since)."""
        if since_glare:
            return self.since_glare_correct, self.since_glare_answered
        return (
            self.correct - self.since_glare_correct,
            self.answered - self.since_glare_answered,
        )

    def run(self) -> None:
        period = 1.0 / FRAMES_PER_SECOND
        connection: http.client.HTTPConnection | None = None
        sent = 0
        next_at = time.monotonic()
        try:
            while not self._stopping.is_set():
                i = sent % len(self._bodies)
                since_glare = self._glare is not None and self._glare.is_set()
                bodies = self._glared if since_glare and self._glared is not None else self._bodies
                try:
                    if connection is None:
                        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=5)
                    status, body = self._post(connection, "/v1/predict", bodies[i])
                    if len(self._pending) >= FEEDBACK_BATCH:
                        self._send_feedback(connection)
                except (OSError, http.client.HTTPException):
                    if connection is not None:
                        connection.close()
                    connection = None  # the agent is starting, or closed an idle connection
                    self._stopping.wait(0.5)
                    continue
                if status == 503:  # no model active yet: the rollout has not come
                    self._stopping.wait(0.25)
                    continue
                sent += 1
                if status == 200:
                    answer = json.loads(body)
                    right = answer["predictions"][0]["class"] == self._labels[i]
                    self.answered += 1
                    self.correct += right
                    self.since_glare_answered += since_glare
                    self.since_glare_correct += since_glare and right
                    self._pending.append(
                        {
                            "prediction_id": answer["prediction_ids"][0],
                            "true_label": self._label_names[self._labels[i]],
                        }
                    )
                next_at = max(next_at + period, time.monotonic() - period)
                self._stopping.wait(max(0.0, next_at - time.monotonic()))
        finally:
            if connection is not None:
                connection.close()

    @staticmethod
    def _post(connection: http.client.HTTPConnection, path: str, body: bytes) -> tuple[int, bytes]:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()

    def _send_feedback(self, connection: http.client.HTTPConnection) -> None:
        batch, self._pending = self._pending, []
        status, _ = self._post(connection, "/v1/feedback", json.dumps({"feedback": batch}).encode())
        if status == 202:
            self.labelled += len(batch)
        else:  # e.g. the model was replaced and its predictions are no longer known
            self.label_failures += len(batch)


# ----------------------------------------------------------------------------- MQTT


class MqttPeer:
    """A paho client whose callbacks only enqueue (never block, never raise)."""

    def __init__(self, url: str, client_id: str) -> None:
        import queue

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        self.client.on_connect = lambda *_: self._connected.set()
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        try:
            self.client.connect(host, int(port))
        except OSError as e:
            raise DemoError(f"could not connect to the broker at {url}: {e}") from e
        self.client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise DemoError(f"could not connect to the broker at {url}")

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def next(self, timeout: float = 10.0) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ----------------------------------------------------------------------------- the demo


@dataclass
class _Demo:
    data_dir: Path
    console: Console
    started: float = field(default_factory=time.monotonic)
    broker: Any = None
    api: Any = None
    api_thread: threading.Thread | None = None
    base_url: str = ""
    client: ApiClient | None = None
    agents: list[AgentProcess] = field(default_factory=list)
    streams: list[CameraStream] = field(default_factory=list)
    stop_streams: threading.Event = field(default_factory=threading.Event)
    summary: dict[str, Any] = field(default_factory=lambda: {"completed": False})
    settings: Any = None
    artifact_sha256: str = ""
    glare: threading.Event = field(default_factory=threading.Event)
    glare_started: datetime | None = None
    token: str = ""

    def step(self, text: str) -> None:
        self.console.print(f"[bold cyan]▶[/] {text}")

    @property
    def api_client(self) -> ApiClient:
        assert self.client is not None
        return self.client

    # -- 1. server

    def start_server(self, port: int) -> None:
        from server.broker import EmbeddedBroker
        from server.settings import Settings

        self.step("starting the embedded MQTT broker and the server (SQLite, local artifacts)")
        self.broker = EmbeddedBroker(port=0)
        self.broker.start()
        settings = Settings(
            data_dir=self.data_dir / "server",
            broker_url=self.broker.url,
            mode="dev",
            rollout_tick_seconds=0.5,
            alert_interval_seconds=ALERT_INTERVAL_SECONDS,
        )
        self.settings = settings
        api_port = port or _free_port()
        self.api, self.api_thread = _start_api(settings, api_port)
        self.base_url = f"http://127.0.0.1:{api_port}"
        # dev mode: the server made an admin token at its first start; the demo acts with it
        self.token = read_admin_token(settings.data_dir) or ""
        if not self.token:
            raise DemoError(f"the server wrote no admin token in {settings.data_dir}")
        self.client = ApiClient(self.base_url, token=self.token)
        self.console.print(
            f"  API {self.base_url}/api/v1 · docs {self.base_url}/docs · broker {self.broker.url}"
        )

    # -- 2. model

    def train_and_promote(self) -> tuple[int, Any]:
        from sqlmodel import Session

        from server.datasets.service import load_dataset_version, resolve_version

        client = self.api_client
        self.step("adding the bundled digits dataset (a content-addressed version, seeded splits)")
        dataset = client.post("/datasets/examples/digits", json={})
        self.console.print(
            f"  {dataset['dataset']} v{dataset['version']} · {dataset['rows']} rows · "
            f"sha256 {dataset['sha256'][:16]}…"
        )
        self.step("training the reference CNN as a background run (queued → running → succeeded)")
        run = client.post(
            "/runs",
            json={
                "dataset": "digits",
                "model": MODEL_NAME,
                "arch": "cnn2d",
                "epochs": TRAIN_EPOCHS,
            },
        )
        run = _follow_run(client, run["id"], self.console)
        if run["status"] != "succeeded":
            raise DemoError(f"training run {run['id']} {run['status']}: {run.get('error')}")
        model_version: int = run["lineage"]["model_version"]

        self.step("per-target artifacts: converted, evaluated in the target runtime, gated, signed")
        version = client.get(f"/models/{MODEL_NAME}/versions/{model_version}")
        _print_artifacts(self.console, version)
        artifact = next(a for a in version["artifacts"] if a["target"] == PROFILE)
        if not artifact["gate_passed"]:
            raise DemoError(f"the {PROFILE} artifact failed its gates: {artifact['gate_reasons']}")
        client.put(f"/models/{MODEL_NAME}/aliases/candidate", json={"version": str(model_version)})
        self.console.print(f"  {MODEL_NAME} v{model_version} promoted to [bold]candidate[/]")
        self.artifact_sha256 = artifact["bundle_sha256"]
        state = self.api.config.app.state
        with Session(state.engine) as session:
            row = resolve_version(session, f"{dataset['dataset']}@{dataset['version']}")
            assert row.id is not None
            loaded = load_dataset_version(session, store=state.artifacts, dataset_version_id=row.id)
        return model_version, loaded

    # -- 3. fleet

    def build_fleet(self) -> None:
        client = self.api_client
        n = len(GROUPS) * AGENTS_PER_GROUP
        self.step(
            f"enrolling {n} real agents in {len(GROUPS)} groups "
            f"({AGENTS_PER_GROUP} each, profile {PROFILE})"
        )
        tokens = {}
        for group in GROUPS:
            client.post("/groups", json={"name": group, "description": "edgefleet demo line"})
            tokens[group] = client.post(
                "/provisioning-tokens",
                json={
                    "name": f"demo {group}",
                    "group": group,
                    "profile": PROFILE,
                    "max_uses": AGENTS_PER_GROUP,
                    "auto_accept": True,
                    "expires_in_seconds": 3600,
                },
            )["token"]
            self.console.print(
                f"  group {group} (static) · provisioning token: auto-accept, {PROFILE}, "
                f"{AGENTS_PER_GROUP} uses"
            )
        root_key = self.settings.keys_dir / "root.pub"
        for group in GROUPS:
            for i in range(1, AGENTS_PER_GROUP + 1):
                device_id = f"{group}-cam{i}"
                agent = AgentProcess(
                    device_id, group, self.data_dir / "agents" / device_id, _free_port()
                )
                agent.write_config(root_key)
                self.agents.append(agent)
        _enroll(self.agents, tokens, self.base_url)
        self.console.print(
            f"  edgefleet-agent enroll --server {self.base_url} --token efp.… : "
            f"{n} devices accepted, broker credentials kept in their data folders"
        )
        for agent in self.agents:
            agent.start()
        self._wait_for_fleet()

    def _wait_for_fleet(self) -> None:
        client = self.api_client
        deadline = time.monotonic() + FLEET_TIMEOUT_SECONDS
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} online"),
            TimeElapsedColumn(),
            console=self.console,
        ) as progress:
            task = progress.add_task("edgefleet-agent run", total=len(self.agents))
            while True:
                for agent in self.agents:
                    agent.check_alive()
                devices = {d["id"]: d for d in client.get("/devices")}
                ready = [
                    a
                    for a in self.agents
                    if devices.get(a.device_id, {}).get("online")
                    and devices[a.device_id]["state_reported_at"]
                ]
                progress.update(task, completed=len(ready))
                if len(ready) == len(self.agents):
                    break
                if time.monotonic() > deadline:
                    missing = sorted(
                        {a.device_id for a in self.agents} - {a.device_id for a in ready}
                    )
                    raise DemoError(
                        f"agents not online after {FLEET_TIMEOUT_SECONDS:.0f} s: {missing}"
                    )
                time.sleep(0.3)
        table = _table("the fleet, online and running no model yet (inventory API)")
        for column in ("device", "group", "status", "runtime", "agent", "local API"):
            table.add_column(column, no_wrap=True)
        for agent in self.agents:
            d = devices[agent.device_id]
            table.add_row(
                agent.device_id,
                agent.group,
                d["status"],
                f"{d['runtime']['name']} {d['runtime']['version']}",
                d["agent_version"],
                f"127.0.0.1:{agent.port}",
            )
        self.console.print(table)

    # -- 4. streams

    def start_streams(self, dataset: Any) -> list[str]:
        """A camera stream per agent from the test split, labelled after each answer;
        the drifted group's cameras can switch to glare (:meth:`start_glare`). Returns the
        features the glare touches."""
        shape = dataset.schema.input_shape  # (8, 8, 1): rows, columns, channels
        width = int(shape[1]) if len(shape) > 1 else math.isqrt(dataset.n_features)
        drifted = _glare_features(dataset.schema.feature_names, width)
        label_names = dataset.schema.class_names or [str(c) for c in range(10)]
        self.step(
            f"streaming camera frames into every agent's local API ({FRAMES_PER_SECOND:g}/s "
            "each); an inspection station labels every answer through the agent's /v1/feedback"
        )
        rng = np.random.default_rng(7)
        for agent in self.agents:
            order = rng.permutation(len(dataset.x_test))
            rows = dataset.x_test[order]
            glared = _glare(rows, width=width, rng=rng) if agent.group == DRIFTED_GROUP else None
            stream = CameraStream(
                agent.device_id,
                agent.port,
                rows,
                dataset.y_test[order],
                self.stop_streams,
                label_names=label_names,
                glared=glared,
                glare=self.glare,
            )
            stream.start()
            self.streams.append(stream)
        self.console.print(
            "  no model is on the devices yet: they answer 503 until the rollout brings one"
        )
        return drifted

    def start_glare(self, drifted_features: Sequence[str]) -> None:
        self.step(
            f"the sun comes out: {DRIFTED_GROUP}'s cameras get glare on the left edge of the lens "
            f"({len(drifted_features)} pixels); "
            f"{' and '.join(g for g in GROUPS if g != DRIFTED_GROUP)} stays as it was"
        )
        self.glare_started = datetime.now(UTC)
        self.glare.set()

    # -- 5. rollouts

    def roll_out(self, group: str, version: int) -> dict[str, Any]:
        client = self.api_client
        self.step(
            f"canary rollout of {MODEL_NAME} v{version} to {group}: 1 device, observed for "
            f"{CANARY_OBSERVATION_SECONDS:g} s, then 100 %"
        )
        created = client.post(
            "/rollouts",
            json={
                "model": MODEL_NAME,
                "version": "candidate",
                "group": group,
                "phases": [
                    {"count": 1, "wait": CANARY_OBSERVATION_SECONDS},
                    {"percent": 100, "wait": 0},
                ],
                "device_timeout": 60,
                "gates": ROLLOUT_GATES,
            },
        )
        rollout_id = created["id"]
        self.console.print(
            f"  rollout {rollout_id}: {created['eligible']} of {created['group_members']} "
            f"devices eligible · gates: activation failures, inference errors ≤ 1 %, latency "
            f"p95 ≤ the profile's SLA, each on ≥ {ROLLOUT_GATES['min_inferences']} inferences"
        )
        return self._watch(rollout_id)

    def _watch(self, rollout_id: str) -> dict[str, Any]:
        """Follow a rollout through the API, printing each change, until it ends."""
        client = self.api_client
        started = time.monotonic()
        deadline = started + ROLLOUT_TIMEOUT_SECONDS
        device_states: dict[str, str] = {}
        gate_states: dict[str, str] = {}
        status = ""
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(bar_width=20),
            TextColumn("{task.completed}/{task.total} devices {task.fields[state]}"),
            console=self.console,
        ) as progress:
            tasks: dict[int, Any] = {}

            def say(text: str) -> None:
                progress.console.print(f"  [dim]{_elapsed(started)}[/] {text}")

            while True:
                r = client.get(f"/rollouts/{rollout_id}")
                earlier = 0
                for p in r["phase_progress"]:
                    wanted = max(p["target"] - earlier, p["targeted"])
                    earlier += p["targeted"]
                    done = p["activated"] + p["failed"] + p["timed_out"] + p["rolled_back"]
                    if p["phase"] not in tasks:
                        size = "1 device" if p["size"] == "1 devices" else p["size"]
                        tasks[p["phase"]] = progress.add_task(
                            f"phase {p['phase']} ({size})", total=wanted, state=""
                        )
                    progress.update(
                        tasks[p["phase"]], total=wanted, completed=done, state=p["state"]
                    )
                changed = r["status"] != status
                status = r["status"]
                final = status in ("completed", "aborted")
                status_line = (
                    f"rollout {status}"
                    + escape(f" ({r['status_reason']})" if r["status_reason"] else "")
                    + f" · phase {r['phase']}/{r['phases']}"
                )
                if changed and not final and status != "pending":  # pending: until a tick
                    say(status_line)
                for d in r["devices"]:
                    if device_states.get(d["device_id"]) != d["state"]:
                        device_states[d["device_id"]] = d["state"]
                        why = f" ({d['reason']}: {d['detail']})" if d["reason"] else ""
                        say(f"phase {d['phase']}: {d['device_id']} {d['state']}{escape(why)}")
                for g in r["gates"]:
                    if g["status"] == "insufficient_data":  # evidence still coming in
                        continue
                    if gate_states.get(g["gate"]) != g["status"]:
                        gate_states[g["gate"]] = g["status"]
                        color = {"holds": "green", "breached": "red"}.get(g["status"], "yellow")
                        say(
                            f"gate {g['gate']}: [{color}]{g['status'].replace('_', ' ')}[/] · "
                            f"{escape(g['summary'])}"
                        )
                if changed and final:
                    say(status_line)
                if status in ("completed", "aborted"):
                    break
                if status == "paused":
                    raise DemoError(
                        f"rollout {rollout_id} paused: {r['status_reason']}; "
                        f"see `edgefleet rollouts show {rollout_id} --server {self.base_url}`"
                    )
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"rollout {rollout_id} still {status} after "
                        f"{ROLLOUT_TIMEOUT_SECONDS:.0f} s: {r['status_reason']}"
                    )
                for agent in self.agents:
                    agent.check_alive()
                time.sleep(POLL_SECONDS)
        if status != "completed":
            raise DemoError(f"rollout {rollout_id} {status}: {r['status_reason']}")
        self.console.print(
            f"  [green]completed[/] in {time.monotonic() - started:.0f} s: "
            f"{r['counts'].get('activated', 0)} of {r['eligible']} devices activated"
        )
        return dict(r)

    def show_inventory(self, versions: dict[str, int]) -> dict[str, dict[str, Any]]:
        """Every device with what it runs, once each has reported its group's version in
        ``versions`` in its retained state (a device's activation event can come before
        its new state)."""
        self.step("who runs what, from the inventory (the devices' retained state topics)")
        deadline = time.monotonic() + 15
        while True:
            devices = {g: self.api_client.get("/devices", params={"group": g}) for g in GROUPS}
            reported = all(
                any(
                    m["model_name"] == MODEL_NAME and m["model_version"] == versions[group]
                    for m in d["models"]
                )
                for group, found in devices.items()
                for d in found
            )
            if reported or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        table = _table("devices")
        for column in ("device", "group", "online", "runs", "manifest", "last update", "answers"):
            table.add_column(
                column, no_wrap=True, justify="right" if column == "answers" else "left"
            )
        answered = {s.device_id: s for s in self.streams}
        shown: dict[str, dict[str, Any]] = {}
        for group, found in devices.items():
            for d in found:
                runs = ", ".join(f"{m['model_name']} v{m['model_version']}" for m in d["models"])
                last = d["last_update"] or {}
                stream = answered.get(d["id"])
                table.add_row(
                    d["id"],
                    group,
                    "yes" if d["online"] else "no",
                    runs or "-",
                    str(d["manifest_version"]),
                    last.get("outcome", "-"),
                    "-" if stream is None else f"{stream.answered:,}",
                )
                shown[d["id"]] = {
                    "group": group,
                    "online": d["online"],
                    "models": {m["model_name"]: m["model_version"] for m in d["models"]},
                    "manifest_version": d["manifest_version"],
                }
        self.console.print(table)
        return shown

    # -- 6. refusals

    def show_refusals(self) -> list[dict[str, str]]:
        self.step("tampered and misdirected documents are refused")
        refused = [self._flipped_bundle()]
        refused += self._misdirected_manifests()
        for r in refused:
            self.console.print(
                f"  refused as it should be: {r['what']} → [yellow]{r['reason']}[/]"
                f" [dim]({escape(r['by'])})[/]"
            )
        return refused

    def _flipped_bundle(self) -> dict[str, str]:
        store = self.api.config.app.state.artifacts
        with store.open(self.artifact_sha256) as f:
            tampered = bytearray(f.read())
        tampered[len(tampered) // 2] ^= 0x01
        path = self.data_dir / "tampered-bundle.efb"
        path.write_bytes(bytes(tampered))
        keys = self.settings.keys_dir
        result = subprocess.run(
            [
                *_agent_command(),
                "verify",
                str(path),
                "--root-key",
                str(keys / "root.pub"),
                "--keyring",
                str(keys / "keyring.json"),
                "--json",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        try:
            answer = json.loads(result.stdout)
        except ValueError as e:
            raise DemoError(f"edgefleet-agent verify said: {result.stderr.decode()}") from e
        if result.returncode != 1 or answer.get("verified") is not False:
            raise DemoError(f"SECURITY: a bundle with a flipped bit verified: {answer}")
        return {
            "what": "bundle with one flipped bit",
            "reason": answer["reason"],
            "by": "edgefleet-agent verify",
        }

    def _misdirected_manifests(self) -> list[dict[str, str]]:
        """Publish to a device's desired topic, as anyone on the open embedded broker can:
        another device's signed desired state, then one signed by an unknown key."""
        from shared.messages import DesiredMessage, DesiredState
        from shared.signing import PayloadType, SigningKey, sign_envelope
        from shared.topics import Channel, device_topic

        source = next(a for a in self.agents if a.group != DRIFTED_GROUP)
        victim = next(a for a in self.agents if a.group == DRIFTED_GROUP)
        peer = MqttPeer(self.broker.url, "demo-intruder")
        try:
            peer.subscribe(device_topic(source.device_id, Channel.DESIRED))
            try:
                _, genuine = peer.next(timeout=10)  # the retained, signed desired state
            except Exception as e:
                raise DemoError(f"no retained desired state for {source.device_id}") from e
            message = DesiredMessage.from_bytes(genuine)
            desired = DesiredState.from_bytes(message.manifest.payload_bytes())
            now = datetime.now(UTC)
            forged_state = desired.model_copy(
                update={
                    "device_id": victim.device_id,
                    "manifest_version": desired.manifest_version + 100,
                    "issued_at": now,
                    "expires_at": now + timedelta(hours=1),
                }
            )
            forged = DesiredMessage(
                keyring=message.keyring,
                manifest=sign_envelope(
                    forged_state.to_bytes(), PayloadType.DESIRED_STATE, [SigningKey.generate()]
                ),
            )
            attempts = [
                (f"{source.device_id}'s signed desired state sent to {victim.device_id}", genuine),
                ("desired state signed by a key the fleet's root never listed", forged.to_bytes()),
            ]
            results = []
            topic = device_topic(victim.device_id, Channel.DESIRED)
            for what, payload in attempts:
                before = self._last_event_id(victim.device_id)
                peer.publish(topic, payload)  # not retained: the server's own stays in place
                event = self._wait_for_refusal(victim.device_id, before)
                results.append({"what": what, "reason": event["reason"], "by": victim.device_id})
        finally:
            peer.close()
        return results

    def _last_event_id(self, device_id: str) -> str | None:
        event = self.api_client.get(f"/devices/{device_id}")["last_event"] or {}
        return event.get("event_id")

    def _wait_for_refusal(self, device_id: str, previous_event: str | None) -> dict[str, Any]:
        """The device's next update event, read back from the inventory: a refusal."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            event: dict[str, Any] = self.api_client.get(f"/devices/{device_id}")["last_event"] or {}
            if event.get("event_id") not in (None, previous_event):
                if event["kind"] != "rejected":
                    raise DemoError(f"SECURITY: {device_id} reported {event} for a forged document")
                return event
            time.sleep(0.2)
        raise DemoError(f"{device_id} reported no refusal within 20 s")

    # -- 7. drift

    def show_drift(self, version: int, drifted_features: Sequence[str]) -> dict[str, Any]:
        client = self.api_client
        self.step(
            f"fleet drift per group, from the drift API (PSI warn ≥ 0.1, act ≥ 0.25; a device "
            f"is judged once it has ≥ {DRIFT_MIN_SAMPLES} values of a feature)"
        )
        members = {g: sum(a.group == g for a in self.agents) for g in GROUPS}
        deadline = time.monotonic() + DRIFT_TIMEOUT_SECONDS
        since = "1h" if self.glare_started is None else self.glare_started.isoformat()

        def query(group: str) -> dict[str, Any]:
            report: dict[str, Any] = client.get(
                "/drift",
                params={
                    "model": MODEL_NAME,
                    "version": str(version),
                    "group": group,
                    "since": since,
                    "min_samples": DRIFT_MIN_SAMPLES,
                    "top": 10,
                },
            )
            return report

        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} devices with enough values"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            task = progress.add_task("telemetry windows", total=len(self.agents))
            while True:
                reports = {g: query(g) for g in GROUPS}
                evaluated = sum(r["devices"]["evaluated"] for r in reports.values())
                progress.update(task, completed=evaluated)
                if all(reports[g]["devices"]["evaluated"] == members[g] for g in GROUPS):
                    break
                if time.monotonic() > deadline:
                    raise DemoError(
                        f"after {DRIFT_TIMEOUT_SECONDS:.0f} s only {evaluated} of "
                        f"{len(self.agents)} devices have {DRIFT_MIN_SAMPLES} values per feature"
                    )
                time.sleep(1.0)

        table = _table(f"{MODEL_NAME} v{version}: drift by group (top features by PSI)")
        for column in ("group", "feature", "PSI", "JS", "out of range", "devices ≥ act"):
            table.add_column(column, justify="left" if column in ("group", "feature") else "right")
        result: dict[str, Any] = {}
        for group, report in reports.items():
            features = sorted(report["features"], key=lambda f: -f["psi"])
            for f in features[:4]:
                color = {"act": "red", "warn": "yellow"}.get(f["level"], "green")
                table.add_row(
                    group,
                    f["name"],
                    f"[{color}]{f['psi']:.3f}[/]",
                    f"{f['js_distance']:.3f}",
                    f"{f['out_of_range_share']:.1%}",
                    "-" if f["devices_act_share"] is None else f"{f['devices_act_share']:.0%}",
                )
            table.add_section()
            correct, answered = self._accuracy(group, since_glare=True)
            result[group] = {
                "devices": report["devices"]["in_scope"],
                "evaluated": report["devices"]["evaluated"],
                "drifted": report["devices"]["act"],
                "features_act": [f["name"] for f in features if f["level"] == "act"],
                "features_warn": [f["name"] for f in features if f["level"] == "warn"],
                "max_psi": features[0]["psi"] if features else None,
                "median_psi": float(np.median([f["psi"] for f in features])) if features else None,
                "inferences": report["sla"]["inferences"],
                "latency_p95_ms": report["sla"]["p95_ms"],
                "accuracy": None if not answered else correct / answered,
            }
        self.console.print(table)
        glare = set(drifted_features)
        for group in GROUPS:
            r = result[group]
            act = r["features_act"]
            where = (
                "none" if not act else f"{len(act)} ({len(glare & set(act))} of them glare pixels)"
            )
            accuracy = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
            self.console.print(
                f"  drift {group}: {r['drifted']} of {r['evaluated']} devices drifted · "
                f"features at act: {where} · median PSI {r['median_psi'] or 0:.3f} · "
                f"{r['inferences']:,} inferences, p95 ≤ {r['latency_p95_ms']:.2g} ms · "
                f"accuracy of the answers since the glare {accuracy}"
            )
        return result

    def _accuracy(self, group: str, *, since_glare: bool) -> tuple[int, int]:
        """(correct, answered) of a group's streams, before the glare or since it began."""
        in_group = {a.device_id for a in self.agents if a.group == group}
        counts = [
            s.accuracy(since_glare=since_glare) for s in self.streams if s.device_id in in_group
        ]
        return sum(c for c, _ in counts), sum(n for _, n in counts)

    # -- 8. alerts

    def create_alert_rules(self) -> None:
        """A drift rule per group: PSI over the act level on >= 30 % of its devices."""
        self.step(
            "alert rules: drift per group (PSI ≥ 0.25 on ≥ 30 % of the group's devices, "
            f"judged every {ALERT_INTERVAL_SECONDS:g} s over the hour in progress)"
        )
        for group in GROUPS:
            self.api_client.post(
                "/alert-rules",
                json={
                    "name": f"drift-{group}",
                    "model": MODEL_NAME,
                    "group": group,
                    "condition": DRIFT_CONDITION,
                    "description": f"the cameras of {group} see something the model never saw",
                },
            )

    def wait_for_alert(self) -> dict[str, Any]:
        """The drift alert of the drifted group, once open (and none of the others)."""
        client = self.api_client
        deadline = time.monotonic() + DRIFT_TIMEOUT_SECONDS
        while True:
            opened = client.get("/alerts", params={"status": "open"})
            mine = [a for a in opened if a["rule"] == f"drift-{DRIFTED_GROUP}"]
            if mine:
                break
            if time.monotonic() > deadline:
                raise DemoError(f"no drift alert opened for {DRIFTED_GROUP} in time")
            time.sleep(POLL_SECONDS)
        alert: dict[str, Any] = mine[0]
        others = sorted({a["rule"] for a in opened} - {alert["rule"]})
        self.console.print(
            f"  [bold red]alert #{alert['id']} open[/] ({alert['severity']}): "
            f"{escape(alert['summary'])}"
        )
        self.console.print(f"  other open alerts: {', '.join(others) if others else 'none'}")
        return {
            "id": alert["id"],
            "rule": alert["rule"],
            "group": alert["group"],
            "summary": alert["summary"],
            "value": alert["value"],
            "other_open": others,
        }

    # -- 9. retraining

    def build_samples_dataset(self) -> dict[str, Any]:
        """The drifted group's labelled frames since the glare began, added to the dataset
        the model was trained on as a new version (with lineage)."""
        client = self.api_client
        assert self.glare_started is not None
        since = self.glare_started.isoformat()
        self.step(
            f"{DRIFTED_GROUP}'s agents captured frames ({CAPTURE_PER_WINDOW} per window); "
            "with the station's labels they become a new dataset version"
        )
        deadline = time.monotonic() + DRIFT_TIMEOUT_SECONDS
        while True:
            summary = client.get(
                "/samples", params={"model": MODEL_NAME, "group": DRIFTED_GROUP, "since": since}
            )
            if summary["labelled_rows"] >= MIN_LABELLED_SAMPLES:
                break
            if time.monotonic() > deadline:
                raise DemoError(
                    f"only {summary['labelled_rows']} labelled samples from {DRIFTED_GROUP} "
                    f"after {DRIFT_TIMEOUT_SECONDS:.0f} s ({summary['rows']} captured)"
                )
            time.sleep(1.0)
        version: dict[str, Any] = client.post(
            "/samples/dataset-versions",
            json={"model": MODEL_NAME, "group": DRIFTED_GROUP, "since": since},
        )
        self.console.print(
            f"  {version['dataset']} v{version['version']}: {version['rows']:,} rows = "
            f"v{version['base_version']} + {version['added_rows']} labelled frames from "
            f"{version['samples']['devices']} devices of {DRIFTED_GROUP}"
        )
        return {
            "dataset": version["dataset"],
            "version": version["version"],
            "rows": version["rows"],
            "base_version": version["base_version"],
            "added_rows": version["added_rows"],
        }

    def retrain(self) -> dict[str, Any]:
        """The retraining policy fires for the drifted group: a decision with its evidence,
        a retraining run on the newest data, a gated candidate, and its canary rollout to
        that group -- each read back from the API as it happens."""
        client = self.api_client
        self.step(
            "retraining policy: the same drift condition on either line retrains the model on "
            "the newest data and canaries the candidate to the line that drifted (no approval "
            "in the demo)"
        )
        client.post(
            "/retraining/policies",
            json={
                "name": "digits-drift",
                "model": MODEL_NAME,
                "groups": list(GROUPS),
                "condition": DRIFT_CONDITION,
                "approval": False,
                "cooldown": 3600,
                "training": {"epochs": TRAIN_EPOCHS},
                "canary": {
                    "phases": "1dev,100",
                    "approval": False,
                    "wait_between_phases": CANARY_OBSERVATION_SECONDS,
                    "device_timeout": 60,
                    "gates": ROLLOUT_GATES,
                },
            },
        )
        deadline = time.monotonic() + DRIFT_TIMEOUT_SECONDS
        while not (decisions := client.get("/retraining/decisions")):
            if time.monotonic() > deadline:
                raise DemoError("the retraining policy did not fire in time")
            time.sleep(POLL_SECONDS)
        if any(d["group"] != DRIFTED_GROUP for d in decisions):
            raise DemoError(f"the policy fired for {[d['group'] for d in decisions]}")
        decision = client.get(f"/retraining/decisions/{decisions[0]['id']}")
        evidence = decision["evidence"]
        devices = evidence.get("devices", [])
        features = evidence.get("features", [])
        self.console.print(
            f"  decision #{decision['id']} for {decision['group']}: {escape(decision['summary'])}"
        )
        self.console.print(
            f"  evidence: {len(devices)} devices "
            f"({', '.join(d['device_id'] for d in devices[:3])}), top features "
            f"{', '.join(features[:4])}"
        )
        self.console.print(f"  dataset: {escape(decision['plan']['dataset']['note'])}")
        run_id = decision["run_id"]
        if run_id is None:
            decision = self._wait_decision(decision["id"], lambda d: d["run_id"] is not None)
            run_id = decision["run_id"]
        run = _follow_run(client, run_id, self.console)
        if run["status"] != "succeeded":
            raise DemoError(f"retraining run {run_id} {run['status']}: {run.get('error')}")
        decision = self._wait_decision(decision["id"], lambda d: d["status"] != "training")
        if decision["status"] != "completed" or decision["rollout_id"] is None:
            raise DemoError(
                f"decision #{decision['id']} {decision['status']}: {decision['status_reason']}"
            )
        candidate = decision["candidate_version"]
        self.console.print(
            f"  {MODEL_NAME} v{candidate} passed its gates and is [bold]candidate[/]; canary "
            f"rollout {decision['rollout_id']} to {decision['group']}"
        )
        rollout = self._watch(decision["rollout_id"])
        return {
            "decision": decision["id"],
            "group": decision["group"],
            "summary": decision["summary"],
            "evidence_devices": [d["device_id"] for d in devices],
            "evidence_features": features,
            "run": run_id,
            "candidate_version": candidate,
            "rollout": decision["rollout_id"],
            "rollout_status": rollout["status"],
        }

    def _wait_decision(self, decision_id: int, done: Any) -> dict[str, Any]:
        deadline = time.monotonic() + ROLLOUT_TIMEOUT_SECONDS
        while True:
            decision: dict[str, Any] = self.api_client.get(f"/retraining/decisions/{decision_id}")
            if done(decision):
                return decision
            if decision["status"] in ("failed", "rejected"):
                raise DemoError(
                    f"decision #{decision_id} {decision['status']}: {decision['status_reason']}"
                )
            if time.monotonic() > deadline:
                raise DemoError(f"decision #{decision_id} still {decision['status']}")
            time.sleep(POLL_SECONDS)

    # -- the end

    def write_summary(self) -> None:
        self.summary["agents"] = {
            a.device_id: {
                "group": a.group,
                "pid": None if a.process is None else a.process.pid,
                "exit_code": a.exit_code,
                "log": str(a.log_path),
            }
            for a in self.agents
        }
        path = self.data_dir / SUMMARY_FILE
        path.write_text(json.dumps(self.summary, indent=2) + "\n")

    def close(self) -> None:
        """Streams, agents, server, broker -- in that order; safe to call at any point, and
        each part is stopped even when stopping an earlier one failed."""
        try:
            self.stop_streams.set()
            for stream in self.streams:
                stream.join(5)
        finally:
            try:
                _stop_agents(self.agents)
            finally:
                try:
                    if self.api is not None:
                        self.api.should_exit = True
                        if self.api_thread is not None:
                            self.api_thread.join(15)
                finally:
                    if self.broker is not None:
                        self.broker.stop()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP end the demo like Ctrl-C does, so the agents are stopped either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = {
        signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_demo(*, data_dir: Path, exit_after: float | None, port: int = 0) -> int:
    from server.logs import configure_logging

    console = Console()
    configure_logging("WARNING")
    _prepare_dir(data_dir)
    demo = _Demo(data_dir=data_dir, console=console)
    code = 0
    with _sigterm_as_interrupt():
        try:
            _run(demo, port=port)
            code = _serve(demo, exit_after)
        except KeyboardInterrupt:
            console.print("interrupted; stopping the agents and the server")
            code = 130
        except (DemoError, ApiError) as e:
            console.print(f"[bold red]demo failed:[/] {escape(str(e))}")
            code = 1
        finally:
            with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: still clean up
                demo.close()
                if demo.agents:  # how each agent ended, however the demo did
                    demo.write_summary()
    stopped = [a.exit_code for a in demo.agents]
    if stopped:
        clean = sum(c == 0 for c in stopped)
        console.print(
            f"{clean} of {len(stopped)} agents stopped cleanly; server and broker stopped"
        )
    return code


def _run(demo: _Demo, *, port: int) -> None:
    demo.start_server(port)
    version, dataset = demo.train_and_promote()
    demo.build_fleet()
    drifted_features = demo.start_streams(dataset)
    demo.create_alert_rules()
    rollouts = {group: demo.roll_out(group, version) for group in GROUPS}
    devices = demo.show_inventory(dict.fromkeys(GROUPS, version))
    refused = demo.show_refusals()
    demo.start_glare(drifted_features)
    drift = demo.show_drift(version, drifted_features)
    alert = demo.wait_for_alert()
    samples = demo.build_samples_dataset()
    retraining = demo.retrain()
    candidate = retraining["candidate_version"]
    versions = {g: candidate if g == DRIFTED_GROUP else version for g in GROUPS}
    devices = demo.show_inventory(versions)
    elapsed = time.monotonic() - demo.started
    demo.summary.update(
        {
            "completed": True,
            "server": demo.base_url,
            "broker": demo.broker.url,
            "model": MODEL_NAME,
            "version": version,
            "rollouts": {
                group: {
                    "id": r["id"],
                    "status": r["status"],
                    "devices": {d["device_id"]: d["state"] for d in r["devices"]},
                }
                for group, r in rollouts.items()
            },
            "devices": devices,
            "refused": refused,
            "drifted_group": DRIFTED_GROUP,
            "drifted_features": list(drifted_features),
            "drift": drift,
            "alert": alert,
            "samples_dataset": samples,
            "retraining": retraining,
            "seconds": round(elapsed, 1),
        }
    )
    demo.write_summary()
    on_version = {
        g: sum(
            d["group"] == g and d["models"].get(MODEL_NAME) == versions[g] for d in devices.values()
        )
        for g in GROUPS
    }
    verdicts = "; ".join(
        f"{g} drifted on {len(drift[g]['features_act'])} features"
        if drift[g]["drifted"]
        else f"{g} shows no drift"
        for g in GROUPS
    )
    url = demo.base_url
    steady = [g for g in GROUPS if g != DRIFTED_GROUP]
    demo.console.print(
        f"\n[bold green]done[/] in {elapsed:.0f} s: {MODEL_NAME} v{version} trained, signed and "
        f"rolled out to {' and '.join(GROUPS)}; {verdicts}; alert #{alert['id']} opened; the "
        f"retraining policy trained v{candidate} on the labelled glare frames and rolled it out "
        f"to {DRIFTED_GROUP} ({on_version[DRIFTED_GROUP]} devices run v{candidate}; "
        f"{' and '.join(steady)} {'stays' if len(steady) == 1 else 'stay'} on v{version})."
    )
    demo.console.print(  # links and commands whole, to be copied, however wide the terminal
        f"  dashboard {url}/#token={demo.token}\n"
        f"           drift of v{version} on {DRIFTED_GROUP}: "
        f"{url}/drift?model={MODEL_NAME}&version={version}&group={DRIFTED_GROUP}&since=1h\n"
        f"           the retraining decision: {url}/retraining?model={MODEL_NAME}\n"
        f"  API      {url}/api/v1   docs {url}/docs\n"
        f"  token    export EDGEFLEET_TOKEN=$(cat {demo.settings.data_dir}/admin-token)\n"
        f"  look     edgefleet drift --model {MODEL_NAME} --group {DRIFTED_GROUP} --server {url}\n"
        f"           edgefleet alerts list --server {url}\n"
        f"           edgefleet retraining decisions --server {url}\n"
        f"           edgefleet rollouts list --server {url}\n"
        f"  state    {demo.data_dir}/ (summary in {SUMMARY_FILE}; "
        "agent logs in agents/*/agent.log)",
        soft_wrap=True,
    )


def _serve(demo: _Demo, exit_after: float | None) -> int:
    """Keep the server, agents and streams running until Ctrl-C or ``exit_after``."""
    assert demo.api_thread is not None
    if exit_after is None:
        demo.console.print("serving until Ctrl-C")
    deadline = None if exit_after is None else time.monotonic() + max(0.0, exit_after)
    try:
        while demo.api_thread.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                break
            for agent in demo.agents:
                if agent.process is not None and agent.exit_code is None:
                    code = agent.process.poll()
                    if code is not None:  # keep serving the others; say where to look
                        agent.exit_code = code
                        demo.console.print(
                            f"[yellow]agent {agent.device_id} exited with code {code}[/]; "
                            f"see {agent.log_path}"
                        )
            demo.api_thread.join(0.5 if deadline is None else min(0.5, deadline - time.monotonic()))
    except KeyboardInterrupt:
        demo.console.print("stopping")
    return 0
