"""WindowMonitor: windows on an injected clock, exact counts, drift, capture, threads, cost.

The model is real: sklearn's digits and a small Keras CNN converted to TFLite, run
by ai-edge-litert through :class:`InterpreterModel`, a minimal stand-in for
``agent.runtime.LoadedModel`` (the local API tests use it too).
"""

from __future__ import annotations

import functools
import hashlib
import os
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import CaptureConfig
from agent.monitoring import WindowMonitor, percentiles
from agent.runtime import InputError, Prediction
from shared.bundle import BundleManifest, FileRef, TensorSpec
from shared.drift import DriftAccumulator, DriftReference
from shared.latency import LATENCY_BOUNDS_MS, latency_counts, latency_quantile
from shared.messages import TelemetryReport
from shared.preprocessing import Reshape, Scale, apply_preprocessing

WINDOW = 60.0
START = datetime(2025, 5, 1, 12, 0, tzinfo=UTC)

# ----------------------------------------------------------------------------- a real model


@dataclass(frozen=True)
class Digits:
    manifest: BundleManifest
    tflite: bytes
    x: np.ndarray  # raw rows (0..16), float32 (n, 64)
    y: np.ndarray


@functools.cache
def digits() -> Digits:
    """Digits, a small CNN trained for a few epochs and converted to float32 TFLite."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    from sklearn.datasets import load_digits

    from server.pipeline.convert import convert_tflite

    bunch = load_digits()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    steps = [Scale(factor=1 / 16), Reshape(shape=[8, 8, 1])]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(apply_preprocessing(steps, x[:1000]), y[:1000], epochs=3, verbose=0)
    tflite = convert_tflite(model, quantization="float32", representative=np.zeros((1, 8, 8, 1)))
    names = [f"pixel_{i}" for i in range(64)]
    probabilities = model.predict(apply_preprocessing(steps, x[:1000]), verbose=0)
    manifest = BundleManifest(
        model_name="digits",
        model_version=3,
        target="edge-x86_64-litert",
        runtime="litert",
        min_runtime_version="1.0",
        format="tflite",
        task="classification",
        model_file=FileRef(
            name="model.tflite", sha256=hashlib.sha256(tflite).hexdigest(), length=len(tflite)
        ),
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 8, 8, 1])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 10])],
        feature_names=names,
        labels=["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
        preprocessing=steps,
        drift_reference=DriftReference.from_data(
            x[:1000], feature_names=names, probabilities=probabilities
        ),
        created_at=START,
    )
    return Digits(manifest=manifest, tflite=tflite, x=x[1000:], y=y[1000:])


class InterpreterModel:
    """The ``agent.runtime.LoadedModel`` interface over a bare LiteRT interpreter."""

    def __init__(self, manifest: BundleManifest, tflite: bytes) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.manifest = manifest
        self.n_features = len(manifest.feature_names or [])
        self.interpreter = Interpreter(model_content=tflite)
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]["index"]
        self._output = self.interpreter.get_output_details()[0]["index"]
        self._batch = 1
        self._lock = threading.Lock()

    def predict(self, rows: Any) -> Prediction:
        x = np.asarray(rows, dtype=np.float32)
        x = x[None, :] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise InputError(f"expected {self.n_features} features per row, got {x.shape}")
        model_input = apply_preprocessing(self.manifest.preprocessing, x)
        with self._lock:
            if len(x) != self._batch:
                self.interpreter.resize_tensor_input(self._input, [len(x), 8, 8, 1])
                self.interpreter.allocate_tensors()
                self._batch = len(x)
            self.interpreter.set_tensor(self._input, model_input)
            self.interpreter.invoke()
            outputs = self.interpreter.get_tensor(self._output)
        classes = outputs.argmax(axis=1)
        labels = self.manifest.labels or []
        return Prediction(
            self.manifest.model_name,
            self.manifest.model_version,
            outputs,
            probabilities=outputs,
            classes=classes,
            labels=[labels[c] for c in classes.tolist()],
            confidence=outputs.max(axis=1),
        )


@pytest.fixture(scope="module")
def model() -> InterpreterModel:
    d = digits()
    return InterpreterModel(d.manifest, d.tflite)


# ----------------------------------------------------------------------------- helpers


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> datetime:
        return START + timedelta(seconds=self.now - 1000.0)


def make_monitor(
    clock: FakeClock, tmp_path: Path | None = None, capture: CaptureConfig | None = None
) -> WindowMonitor:
    return WindowMonitor(
        device_id="cam-7",
        window_seconds=WINDOW,
        capture=capture,
        data_dir=tmp_path,
        clock=clock,
        wall_clock=clock.wall,
        rng=np.random.default_rng(0),
    )


def regression_manifest(reference: DriftReference | None) -> BundleManifest:
    m = digits().manifest
    return m.model_copy(
        update={
            "model_name": "load",
            "task": "regression",
            "labels": None,
            "feature_names": [f.name for f in reference.features] if reference else None,
            "drift_reference": reference,
        }
    )


def value_prediction(values: np.ndarray) -> Prediction:
    return Prediction("load", 3, values.reshape(-1, 1).astype(np.float32))


# ----------------------------------------------------------------------------- windows


def test_a_window_closes_on_the_injected_clock(model: InterpreterModel, tmp_path: Path) -> None:
    clock = FakeClock()
    monitor = make_monitor(clock, tmp_path)
    monitor.set_model(model.manifest)
    assert not monitor.window_due() and monitor.seconds_until_due() == WINDOW
    clock.now += WINDOW - 0.001
    assert not monitor.window_due()
    clock.now += 0.001
    assert monitor.window_due()

    report = monitor.close_window(seq=7, dropped_reports=2)
    assert (report.seq, report.dropped_reports, report.device_id) == (7, 2, "cam-7")
    assert report.window_start == START
    assert report.window_end == START + timedelta(seconds=WINDOW)
    assert not monitor.window_due()  # the next window starts at the close
    clock.now += WINDOW
    assert monitor.close_window(seq=8).window_start == report.window_end


def test_an_end_is_never_before_its_start_when_the_wall_clock_steps_back(
    model: InterpreterModel,
) -> None:
    clock = FakeClock()
    monitor = make_monitor(clock)
    clock.now -= 3600  # NTP stepped the wall clock back an hour
    report = monitor.close_window(seq=1)
    assert report.window_end == report.window_start


def test_counts_latency_buckets_and_percentiles(model: InterpreterModel) -> None:
    clock = FakeClock()
    monitor = make_monitor(clock)
    monitor.set_model(model.manifest)
    x = digits().x
    latencies = [0.04, 0.05, 0.051, 1.0, 1.0, 2.5, 10.0, 99_000.0] + [0.3] * 92
    for i, latency in enumerate(latencies):
        monitor.record(x[i], model.predict(x[i]), latency)
    batch = x[:5]
    monitor.record(batch, model.predict(batch), 0.3)
    monitor.record_error("input")
    monitor.record_error("runtime")
    monitor.record_error("input")

    window = monitor.close_window(seq=1).models[0]
    assert (window.model_name, window.model_version, window.target) == (
        "digits",
        3,
        "edge-x86_64-litert",
    )
    assert window.inferences == 105  # rows, not calls
    assert window.errors == 3
    expected = latency_counts([*latencies, 0.3])
    assert window.latency_ms.counts == expected.tolist()
    assert sum(window.latency_ms.counts) == 101  # calls
    p = percentiles(window.latency_ms.counts)
    assert p == {
        q: latency_quantile(expected, v) for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))
    }
    assert p["p50"] == min(b for b in LATENCY_BOUNDS_MS if b >= 0.3)
    assert percentiles([0] * len(expected)) == {"p50": None, "p95": None, "p99": None}
    assert percentiles(latency_counts([99_000.0]))["p99"] == float("inf")


def test_drift_equals_an_accumulator_fed_the_same_rows(model: InterpreterModel) -> None:
    clock = FakeClock()
    monitor = make_monitor(clock)
    monitor.set_model(model.manifest)
    x = digits().x[:700].copy()
    x[3, 5] = np.nan  # a NaN pixel is counted in its own slot
    x[4, 6] = 99.0  # above every training value: overflow
    outputs = []
    # single rows and batches, enough to fold the pending rows at least once
    batches = [x[i : i + 1] for i in range(300)] + [
        x[300 + 100 * k : 400 + 100 * k] for k in range(4)
    ]
    for rows in batches:
        clean = np.nan_to_num(rows)
        prediction = model.predict(clean)
        outputs.append(prediction.probabilities)
        monitor.record(rows, prediction, 0.2)
        if len(outputs) == 150:
            monitor.flush()

    sketch = monitor.close_window(seq=1).models[0].drift
    reference = DriftAccumulator(model.manifest.drift_reference)  # type: ignore[arg-type]
    reference.update(x, probabilities=np.concatenate(outputs))
    expected = reference.sketch()
    assert sketch is not None and sketch.reference_id == expected.reference_id
    assert [f.counts for f in sketch.features] == [f.counts for f in expected.features]
    assert sketch.features[5].counts[-1] == 1 and sketch.features[6].counts[-2] >= 1
    assert sketch.predictions == expected.predictions  # class and confidence counts
    for got, want in zip(sketch.features, expected.features, strict=True):
        assert (got.moments.n, got.moments.min, got.moments.max) == (
            want.moments.n,
            want.moments.min,
            want.moments.max,
        )
        assert got.moments.mean == pytest.approx(want.moments.mean, rel=1e-9, abs=1e-12)
        assert got.moments.m2 == pytest.approx(want.moments.m2, rel=1e-9, abs=1e-9)


def test_regression_drift_counts_the_predicted_value() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(500, 3))
    values = train.sum(axis=1)
    reference = DriftReference.from_data(
        train, feature_names=["a", "b", "c"], predicted_values=values
    )
    manifest = regression_manifest(reference)
    monitor = make_monitor(FakeClock())
    monitor.set_model(manifest)
    live = rng.normal(loc=0.5, size=(40, 3))
    for row in live:
        monitor.record(row, value_prediction(row.sum(keepdims=True)), 0.1)
    sketch = monitor.close_window(seq=1).models[0].drift
    expected = DriftAccumulator(reference)
    expected.update(live, predicted_values=live.sum(axis=1))
    assert sketch is not None and sketch.predictions is not None
    assert sketch.predictions.value is not None and expected.sketch().predictions is not None
    assert sketch.predictions.value.counts == expected.sketch().predictions.value.counts  # type: ignore[union-attr]
    assert sketch.predictions.class_counts is None


def test_a_model_without_a_reference_reports_no_drift() -> None:
    monitor = make_monitor(FakeClock())
    monitor.set_model(regression_manifest(None))
    monitor.record(np.ones(4), value_prediction(np.ones(1)), 0.1)
    window = monitor.close_window(seq=1).models[0]
    assert window.inferences == 1 and window.drift is None


def test_rows_that_do_not_fit_the_reference_are_skipped_not_raised(
    model: InterpreterModel,
) -> None:
    monitor = make_monitor(FakeClock())
    monitor.set_model(model.manifest)
    good = digits().x[:1]
    monitor.record(np.ones((1, 3)), model.predict(good), 0.1)  # a caller's bug: wrong width
    monitor.record(good, model.predict(good), 0.1)
    assert monitor.snapshot()["models"][0]["drift_skipped_rows"] == 1
    window = monitor.close_window(seq=1).models[0]
    assert window.inferences == 2 and window.drift is not None
    assert sum(window.drift.features[0].counts) == 1


def test_the_report_validates_round_trips_and_carries_resources(
    model: InterpreterModel, tmp_path: Path
) -> None:
    clock = FakeClock()
    monitor = make_monitor(clock, tmp_path)
    monitor.set_model(model.manifest)
    x = digits().x[:50]
    monitor.record(x, model.predict(x), 0.7)
    clock.now += 61.5
    report = monitor.close_window(seq=12, dropped_reports=1)
    assert TelemetryReport.from_bytes(report.to_bytes()) == report
    assert len(report.to_bytes()) < TelemetryReport.MAX_BYTES
    r = report.resources
    assert r.rss_bytes is not None and r.rss_bytes > 10 * 1024 * 1024
    assert r.cpu_seconds is not None and r.cpu_seconds > 0
    assert r.disk_free_bytes is not None and r.disk_free_bytes > 0
    assert r.uptime_seconds == pytest.approx(61.5)


def test_counts_reset_but_the_active_model_stays_listed(model: InterpreterModel) -> None:
    clock = FakeClock()
    monitor = make_monitor(clock)
    assert monitor.close_window(seq=0).models == []
    monitor.set_model(model.manifest)
    x = digits().x[:3]
    monitor.record(x, model.predict(x), 0.5)
    assert monitor.close_window(seq=1).models[0].inferences == 3
    idle = monitor.close_window(seq=2).models
    assert len(idle) == 1 and idle[0].inferences == 0 and idle[0].errors == 0
    assert sum(idle[0].latency_ms.counts) == 0 and idle[0].drift is None


def test_a_model_replaced_mid_window_still_reports_its_share(model: InterpreterModel) -> None:
    clock = FakeClock()
    monitor = make_monitor(clock)
    v3 = model.manifest
    v4 = v3.model_copy(update={"model_version": 4})
    x = digits().x[:2]
    monitor.set_model(v3)
    monitor.record(x, model.predict(x), 0.5)
    monitor.set_model(v4)
    monitor.record(x[:1], model.predict(x[:1]), 0.5)
    monitor.record(x[:1], model.predict(x[:1]), 0.5, manifest=v3)  # in flight at the switch
    windows = {w.model_version: w for w in monitor.close_window(seq=1).models}
    assert (windows[3].inferences, windows[4].inferences) == (3, 1)
    assert [w.model_version for w in monitor.close_window(seq=2).models] == [4]


def test_errors_without_a_model_are_kept_apart() -> None:
    monitor = make_monitor(FakeClock())
    monitor.record_error("unavailable")
    assert monitor.snapshot()["unattributed_errors"] == {"unavailable": 1}
    assert monitor.close_window(seq=1).models == []
    assert monitor.snapshot()["unattributed_errors"] == {}


# ----------------------------------------------------------------------------- capture


def test_capture_is_off_by_default(model: InterpreterModel) -> None:
    monitor = make_monitor(FakeClock())
    monitor.set_model(model.manifest)
    x = digits().x[:20]
    monitor.record(x, model.predict(x), 0.5)
    monitor.close_window(seq=1)
    assert monitor.take_samples() == []


def test_capture_keeps_at_most_max_per_window_rows(model: InterpreterModel) -> None:
    monitor = make_monitor(
        FakeClock(), capture=CaptureConfig(enabled=True, max_per_window=5, max_bytes=1024 * 1024)
    )
    monitor.set_model(model.manifest)
    x = digits().x[:300]
    for start in range(0, 300, 7):
        monitor.record(x[start : start + 7], model.predict(x[start : start + 7]), 0.5)
    monitor.close_window(seq=4)
    (samples,) = monitor.take_samples()
    assert (samples.model_name, samples.model_version, samples.seq) == ("digits", 3, 4)
    assert samples.rows.shape == (5, 64)
    assert all(any(np.array_equal(row, seen) for seen in x) for row in samples.rows)
    assert monitor.take_samples() == []  # taken once


def test_capture_is_capped_in_bytes(model: InterpreterModel) -> None:
    capture = CaptureConfig(enabled=True, max_per_window=100, max_bytes=1024)
    monitor = make_monitor(FakeClock(), capture=capture)
    monitor.set_model(model.manifest)
    x = digits().x[:50]
    for window in range(3):
        monitor.record(x, model.predict(x), 0.5)
        monitor.close_window(seq=window)
    samples = monitor.take_samples()
    assert sum(s.rows.nbytes for s in samples) <= 1024  # older windows dropped first
    assert [s.seq for s in samples] == [2]
    assert samples[0].rows.shape == (2, 64)  # 1024 bytes hold two rows of 64 float64


def test_capture_is_a_uniform_sample() -> None:
    monitor = make_monitor(
        FakeClock(), capture=CaptureConfig(enabled=True, max_per_window=2, max_bytes=1024)
    )
    monitor.set_model(regression_manifest(None))
    hits = np.zeros(10, dtype=np.int64)
    for window in range(1000):
        for i in range(10):  # one row per call, to exercise the skip-ahead path
            monitor.record(np.array([float(i)]), value_prediction(np.zeros(1)), 0.1)
        monitor.close_window(seq=window)
        for samples in monitor.take_samples():
            hits[samples.rows[:, 0].astype(int)] += 1
    assert hits.sum() == 2000
    assert hits.min() > 140 and hits.max() < 260, hits  # 200 each, about 12.6 sd


# ----------------------------------------------------------------------------- threads, cost


def test_concurrent_records_add_up(model: InterpreterModel) -> None:
    monitor = make_monitor(FakeClock())
    monitor.set_model(model.manifest)
    x = digits().x[:1]
    prediction = model.predict(x)
    threads, per_thread = 8, 500
    barrier = threading.Barrier(threads)

    def work() -> None:
        barrier.wait()
        for i in range(per_thread):
            monitor.record(x, prediction, 0.1 * (i % 20))
            if i % 100 == 0:
                monitor.record_error("input")

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    window = monitor.close_window(seq=1).models[0]
    assert window.inferences == threads * per_thread
    assert window.errors == threads * 5
    assert sum(window.latency_ms.counts) == threads * per_thread
    assert window.drift is not None
    assert all(sum(f.counts) == threads * per_thread for f in window.drift.features)
    assert window.drift.predictions is not None
    assert sum(window.drift.predictions.class_counts or []) == threads * per_thread


def p50_seconds(fn: Any, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def test_record_costs_little_next_to_an_inference(model: InterpreterModel) -> None:
    """The per-inference cost of monitoring, measured against a bare ``invoke()``."""
    monitor = make_monitor(FakeClock())
    monitor.set_model(model.manifest)
    x = digits().x[:1]
    prediction = model.predict(x)  # leaves the interpreter set up for one row
    invoke = p50_seconds(model.interpreter.invoke, 3000)
    record = p50_seconds(lambda: monitor.record(x, prediction, 0.1), 3000)
    print(f"\ninvoke p50 {invoke * 1e6:.2f} us, record p50 {record * 1e6:.2f} us")
    assert record < 25e-6  # generous: a few microseconds on a laptop
