"""The agent's serving cost, against baselines measured in the same run.

Figures (issue 4's targets):

- ``predict()`` p50 with monitoring on, single digits row, divided by the bare
  ``Interpreter.invoke()`` p50 on the same model (target ≤ 1.15), and divided by
  invoke with its ``set_tensor``/``get_tensor`` (what any caller must do); beside them,
  where the time goes: ``predict()`` alone and ``WindowMonitor.record()`` alone;
- RSS of a process that has loaded the model through the agent (target ≤ 80 MB),
  beside a bare Python that imported numpy; and, for information, the RSS of the
  running ``edgefleet-agent`` once it has served its first prediction;
- cold start: ``edgefleet-agent run`` process start to the first prediction served over
  its local API (target ≤ 1.5 s), beside the start of a bare ``python -c 'import numpy'``.

The latencies are measured in interleaved rounds (every candidate once per round, the
median of each round's p50s reported), so that load from other processes on the
machine falls on the baseline and the candidates alike.

    python bench/serving.py [--quick] [--results PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from brokers import free_port
from results import BenchResults, add_results_argument

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def reference_bundle(work: Path, epochs: int) -> tuple[bytes, Path, str, object]:
    """Train the digits reference CNN, convert it, sign it; lay out a device data dir."""
    from server.datasets.builtin import load_example
    from server.datasets.service import split_indices
    from server.datasets.types import LoadedDataset
    from server.keys import init_keys
    from server.pipeline.convert import convert_tflite
    from server.pipeline.evaluate import LiteRTRunner
    from server.pipeline.targets import self_test_atol
    from server.training.spec import default_spec
    from server.training.trainer import train_model
    from shared.bundle import BundleManifest, FileRef, SelfTest, build_bundle, read_bundle
    from shared.preprocessing import apply_preprocessing

    parsed = load_example("digits")
    splits = split_indices(parsed.y, task="classification", seed=0, fractions=(0.7, 0.15, 0.15))
    data = LoadedDataset(
        dataset_name="digits",
        version=1,
        sha256=parsed.content_sha256,
        schema=parsed.schema,
        x_train=parsed.x[splits["train"]],
        y_train=parsed.y[splits["train"]],
        x_val=parsed.x[splits["validation"]],
        y_val=parsed.y[splits["validation"]],
        x_test=parsed.x[splits["test"]],
        y_test=parsed.y[splits["test"]],
    )
    spec = default_spec("cnn2d", parsed.schema).model_copy(update={"epochs": epochs})
    trained = train_model(spec, data)
    steps = list(trained.preprocessing)
    model = convert_tflite(
        trained.model,
        quantization="float32",
        representative=apply_preprocessing(steps, data.x_train[:200]),
    )
    runner = LiteRTRunner(model)
    rows = data.x_test[:4]
    expected = runner.predict(apply_preprocessing(steps, rows))
    keys = init_keys(work / "keys", now=datetime.now(UTC), lifetime=timedelta(days=1))
    manifest = BundleManifest(
        model_name="digits",
        model_version=1,
        target="edge-x86_64-litert",
        runtime="litert",
        min_runtime_version="2.3.0",
        format="tflite",
        task="classification",
        model_file=FileRef(name="model.tflite", sha256="0" * 64, length=len(model)),
        inputs=runner.inputs,
        outputs=runner.outputs,
        feature_names=parsed.schema.feature_names,
        labels=parsed.schema.class_names,
        preprocessing=steps,
        drift_reference=__import__(
            "shared.drift", fromlist=["DriftReference"]
        ).DriftReference.from_data(
            data.x_train,
            feature_names=parsed.schema.feature_names,
            probabilities=trained.model.predict(
                apply_preprocessing(steps, data.x_train), verbose=0
            ),
        ),
        self_tests=[
            SelfTest(
                input=rows.tolist(),
                expected=expected.tolist(),
                atol=self_test_atol(
                    format="tflite",
                    quantization="float32",
                    outputs=runner.outputs,
                    expected=expected,
                ),
            )
        ],
        created_at=datetime.now(UTC),
    )
    bundle_bytes = build_bundle(manifest, model, keys.signing_keys)
    bundle = read_bundle(bundle_bytes, trusted_keys=keys.keyring.verify_keys())
    # a device that already runs it: trust state, staged bundle, active pointer
    from agent.store import BundleRef, ModelStore
    from agent.updater import TrustStore
    from shared.trust import TrustState, accept_keyring

    device = work / "device"
    state = accept_keyring(
        TrustState.from_root_keys([keys.root_public]), keys.keyring_envelope, now=datetime.now(UTC)
    )
    TrustStore(device, root_keys=[keys.root_public]).save(
        state, keyring_envelope=keys.keyring_envelope
    )
    store = ModelStore(device)
    tmp = store.temp_path()
    tmp.write_bytes(bundle_bytes)
    from shared.integrity import sha256_hex

    sha = sha256_hex(bundle_bytes)
    store.stage(tmp, sha256=sha, length=len(bundle_bytes))
    store.activate(
        "digits",
        BundleRef(
            sha256=sha, length=len(bundle_bytes), model_version=1, target="edge-x86_64-litert"
        ),
    )
    return model, device, keys.root_public.to_base64(), (bundle, data)


def p50(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3  # µs


def interleaved_p50s(
    candidates: dict[str, Callable[[], object]], rounds: int, repeats: int
) -> dict[str, float]:
    """Each candidate's p50 (µs): the median over ``rounds`` of a p50 of ``repeats`` calls."""
    for fn in candidates.values():
        for _ in range(200):  # warm-up
            fn()
    per_round: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            per_round[name].append(p50(fn, repeats))
    return {name: statistics.median(values) for name, values in per_round.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats (CI)")
    add_results_argument(parser)
    args = parser.parse_args()
    rounds, repeats = (5, 400) if args.quick else (10, 2000)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-agent-"))
    model, device, root_key, (bundle, data) = reference_bundle(work, 2 if args.quick else 10)

    from ai_edge_litert.interpreter import Interpreter

    from agent.monitoring import WindowMonitor
    from agent.runtime import LoadedModel
    from shared.preprocessing import apply_preprocessing

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    row = data.x_test[:1]
    x = apply_preprocessing(bundle.manifest.preprocessing, row)
    interpreter.set_tensor(inp, x)

    def invoke_io() -> None:
        interpreter.set_tensor(inp, x)
        interpreter.invoke()
        interpreter.get_tensor(out)

    loaded = LoadedModel.load(bundle)
    monitor = WindowMonitor(device_id="bench", window_seconds=3600)
    monitor.set_model(bundle.manifest)
    # record() alone goes to a monitor of its own, so both see the same stream of rows.
    monitor_alone = WindowMonitor(device_id="bench", window_seconds=3600)
    monitor_alone.set_model(bundle.manifest)
    one_prediction = loaded.predict(row)

    def monitored() -> None:
        t0 = time.perf_counter()
        prediction = loaded.predict(row)
        monitor.record(row, prediction, (time.perf_counter() - t0) * 1000)

    timings = interleaved_p50s(
        {
            "invoke": interpreter.invoke,
            "io": invoke_io,
            "monitored": monitored,
            "predict": lambda: loaded.predict(row),
            "record": lambda: monitor_alone.record(row, one_prediction, 0.02),
        },
        rounds,
        repeats,
    )
    bare_invoke, bare_io, predict_monitored = (
        timings["invoke"],
        timings["io"],
        timings["monitored"],
    )

    rss_code = (
        "import sys, json; from pathlib import Path; from datetime import UTC, datetime\n"
        "from agent.store import ModelStore; from agent.updater import TrustStore\n"
        "from agent.runtime import LoadedModel; from shared.signing import VerifyKey\n"
        "d = Path(sys.argv[1]); k = VerifyKey.from_base64(sys.argv[2])\n"
        "t = TrustStore(d, root_keys=[k]).load(now=datetime.now(UTC))\n"
        "b = ModelStore(d).load_active(trusted_keys=t.keyring.verify_keys())['digits']\n"
        "m = LoadedModel.load(b); m.predict([[0.0] * 64])\n"
        "print(int(open('/proc/self/statm').read().split()[1]) * 4096)\n"
    )
    rss = int(subprocess.check_output([sys.executable, "-c", rss_code, str(device), root_key]))
    rss_base = int(
        subprocess.check_output(
            [
                sys.executable,
                "-c",
                "import numpy; print(int(open('/proc/self/statm').read().split()[1]) * 4096)",
            ]
        )
    )

    port = free_port()
    config = work / "agent.toml"
    config.write_text(
        f'device_id = "bench-1"\nprofile = "edge-x86_64-litert"\ndata_dir = "{device}"\n'
        f'[trust]\nroot_keys = ["{root_key}"]\n[http]\nport = {port}\n'
    )
    agent_exe = Path(sys.executable).parent / "edgefleet-agent"
    body = json.dumps({"instances": row.tolist()}).encode()
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(agent_exe), "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    cold = None
    agent_rss = None
    try:
        while time.perf_counter() - started < 60:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/v1/predict",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        cold = time.perf_counter() - started
                        break
            except OSError:
                time.sleep(0.01)
        if cold is not None:
            statm = Path(f"/proc/{process.pid}/statm")
            if statm.exists():
                agent_rss = int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    finally:
        process.terminate()
        process.wait(10)
    started = time.perf_counter()
    subprocess.check_call([sys.executable, "-c", "import numpy"])
    cold_base = time.perf_counter() - started

    results = BenchResults("serving", quick=args.quick, path=args.results)
    results.note(
        f"digits CNN on the agent; latencies: median over {rounds} interleaved rounds of a "
        f"p50 of {repeats} calls"
    )
    ratio = predict_monitored / bare_invoke
    results.add(
        "predict() with monitoring p50 / bare invoke() p50",
        predict_monitored,
        "us",
        value_text=f"{predict_monitored:.1f} us",
        baseline=bare_invoke,
        baseline_text=f"{bare_invoke:.1f} us",
        ratio=ratio,
        ratio_text=f"{ratio:.2f}",
        goal="≤ 1.15",
        passed=ratio <= 1.15,
    )
    results.add(
        "predict() with monitoring p50 / set+invoke+get p50",
        predict_monitored,
        "us",
        value_text=f"{predict_monitored:.1f} us",
        baseline=bare_io,
        baseline_text=f"{bare_io:.1f} us",
        ratio=predict_monitored / bare_io,
        ratio_text=f"{predict_monitored / bare_io:.2f}",
    )
    results.add(
        "where it goes: predict() alone p50 / bare invoke() p50",
        timings["predict"],
        "us",
        value_text=f"{timings['predict']:.1f} us",
        baseline=bare_invoke,
        baseline_text=f"{bare_invoke:.1f} us",
        ratio=timings["predict"] / bare_invoke,
        ratio_text=f"{timings['predict'] / bare_invoke:.2f}",
    )
    results.add(
        "where it goes: WindowMonitor.record() alone p50 / bare invoke() p50",
        timings["record"],
        "us",
        value_text=f"{timings['record']:.2f} us",
        baseline=bare_invoke,
        baseline_text=f"{bare_invoke:.1f} us",
        ratio=timings["record"] / bare_invoke,
        ratio_text=f"{timings['record'] / bare_invoke:.2f}",
    )
    results.add(
        "RSS after loading the model (agent)",
        rss / 2**20,
        "MB",
        value_text=f"{rss / 2**20:.1f} MB",
        baseline=rss_base / 2**20,
        baseline_text=f"{rss_base / 2**20:.1f} MB (python + numpy)",
        ratio=rss / rss_base,
        ratio_text=f"{rss / rss_base:.2f}",
        goal="≤ 80 MB",
        passed=rss <= 80 * 2**20,
    )
    if agent_rss is not None:
        results.add(
            "RSS of the running edgefleet-agent after its first prediction",
            agent_rss / 2**20,
            "MB",
            value_text=f"{agent_rss / 2**20:.1f} MB",
            baseline=rss_base / 2**20,
            baseline_text=f"{rss_base / 2**20:.1f} MB (python + numpy)",
            ratio=agent_rss / rss_base,
            ratio_text=f"{agent_rss / rss_base:.2f}",
        )
    if cold is None:
        results.add(
            "cold start",
            None,
            value_text="did not serve within 60 s",
            goal="≤ 1.5 s",
            passed=False,
        )
    else:
        results.add(
            "cold start: process start → first prediction over the local API",
            cold,
            "s",
            value_text=f"{cold:.2f} s",
            baseline=cold_base,
            baseline_text=f"{cold_base:.2f} s (python -c 'import numpy')",
            ratio=cold / cold_base,
            ratio_text=f"{cold / cold_base:.2f}",
            goal="≤ 1.5 s",
            passed=cold <= 1.5,
        )
    results.finish()


if __name__ == "__main__":
    main()
