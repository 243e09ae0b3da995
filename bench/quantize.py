"""Quantization payoff on the digits reference CNN, against float32 measured in the same run.

The reference model: a CNN over sklearn's 8x8 digits (input 8x8x1, two convolutions,
a dense layer; more than 100k parameters), trained here with a fixed seed on 70% of
the rows and measured on the other 30%. Every figure comes from the artifact run in
its target runtime (ai-edge-litert for TFLite, onnxruntime for ONNX), never Keras:

- int8 (full-integer) size / float32 size, goal <= 0.30, with accuracy drop <= 1.0 point;
- float16 size / float32 size, goal <= 0.55, with accuracy drop <= 0.1 point;
- single-sample latency p50 of int8 and float32 side by side in ai-edge-litert;
- ONNX int8 (QDQ) against ONNX float32, for information;
- wall time of convert + evaluate (+ gate) for every shipped profile, one at a time.

Ratios are printed, not asserted: this is a benchmark, not a timed test.

    python bench/quantize.py [--quick] [--results PATH]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from results import BenchResults, add_results_argument

from server.datasets.types import DatasetSchema, LoadedDataset
from server.pipeline.evaluate import LiteRTRunner, latency_p50_ms
from server.pipeline.targets import build_targets
from server.pipeline.types import GateConfig, TargetBuild
from server.profiles import load_profiles
from shared.preprocessing import Reshape, Scale, apply_preprocessing

STEPS = [Scale(factor=1 / 16), Reshape(shape=[8, 8, 1])]


def load_digits_dataset() -> LoadedDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.data))
    x = bunch.data[order].astype(np.float32)
    y = bunch.target[order].astype(np.int64)
    n_train = int(0.7 * len(x))
    schema = DatasetSchema(
        task="classification",
        label="digit",
        feature_names=[f"px{i}" for i in range(64)],
        feature_dtypes=["float64"] * 64,
        input_shape=[8, 8, 1],
        class_names=[str(d) for d in range(10)],
        rows=len(x),
    )
    return LoadedDataset(
        dataset_name="digits",
        version=1,
        sha256="0" * 64,
        schema=schema,
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_val=x[n_train : n_train + 1],
        y_val=y[n_train : n_train + 1],
        x_test=x[n_train:],
        y_test=y[n_train:],
    )


def reference_cnn(data: LoadedDataset, epochs: int) -> Any:
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(
        apply_preprocessing(STEPS, data.x_train),
        data.y_train,
        epochs=epochs,
        batch_size=32,
        verbose=0,
    )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats (CI)")
    add_results_argument(parser)
    args = parser.parse_args()
    epochs = 8 if args.quick else 30
    repeats = 200 if args.quick else 2000

    data = load_digits_dataset()
    started = time.perf_counter()
    model = reference_cnn(data, epochs)
    train_seconds = time.perf_counter() - started
    x_test = apply_preprocessing(STEPS, data.x_test)
    keras_accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(axis=1) == data.y_test))

    profiles = load_profiles()
    builds: dict[str, TargetBuild] = {}
    seconds: dict[str, float] = {}
    for name, profile in profiles.items():
        started = time.perf_counter()
        (builds[name],) = build_targets(
            model,
            data=data,
            preprocessing=STEPS,
            profiles=[profile],
            gates=GateConfig(),
            float_metrics={"accuracy": keras_accuracy},
        )
        seconds[name] = time.perf_counter() - started

    float32 = builds["edge-x86_64-litert"]
    float16 = builds["edge-gpu-litert-fp16"]
    int8 = builds["edge-arm64-litert"]
    onnx32 = builds["cloud-x86_64-onnx"]
    onnx8 = builds["onprem-x86_64-onnx-int8"]
    for build in builds.values():
        if build.model is None or build.metric_value is None:
            raise SystemExit(f"{build.profile} did not build: {build.error}")

    sample = x_test[:1]
    latency_float = latency_p50_ms(LiteRTRunner(float32.model or b""), sample, repeats)
    latency_int8 = latency_p50_ms(LiteRTRunner(int8.model or b""), sample, repeats)

    def accuracy(build: TargetBuild) -> float:
        return 100.0 * (build.metric_value or 0.0)

    results = BenchResults("quantize", quick=args.quick, path=args.results)

    def size_row(label: str, build: TargetBuild, base: TargetBuild, goal: float | None) -> None:
        ratio = build.size_bytes / base.size_bytes
        results.add(
            f"{label} size / {base.quantization} size",
            build.size_bytes,
            "B",
            baseline=base.size_bytes,
            ratio=ratio,
            ratio_text=f"{ratio:.3f}",
            goal="" if goal is None else f"≤ {goal:.2f}",
            passed=None if goal is None else ratio <= goal,
        )

    def drop_row(label: str, build: TargetBuild, base: TargetBuild, goal: float | None) -> None:
        drop = accuracy(base) - accuracy(build)
        results.add(
            f"{label} accuracy drop",
            accuracy(build),
            "%",
            value_text=f"{accuracy(build):.2f}%",
            baseline=accuracy(base),
            baseline_text=f"{accuracy(base):.2f}% ({base.format} {base.quantization})",
            ratio=accuracy(build) / accuracy(base),
            ratio_text=f"{accuracy(build) / accuracy(base):.4f} ({drop:+.2f} pt)",
            goal="" if goal is None else f"drop ≤ {goal:.1f} pt",
            passed=None if goal is None else drop <= goal + 1e-9,
        )

    params = model.count_params()
    results.note(
        f"digits reference CNN: {params:,} parameters, {epochs} epochs in {train_seconds:.1f} s; "
        f"{len(data.x_train)} training rows, {len(data.x_test)} test rows; Keras float accuracy "
        f"{100 * keras_accuracy:.2f}%; latency over {repeats} single-sample runs"
    )
    size_row("TFLite int8", int8, float32, 0.30)
    drop_row("TFLite int8", int8, float32, 1.0)
    size_row("TFLite float16", float16, float32, 0.55)
    drop_row("TFLite float16", float16, float32, 0.1)
    results.add(
        "latency p50, int8 vs float32 (ai-edge-litert)",
        latency_int8,
        "ms",
        value_text=f"{latency_int8:.4f} ms",
        baseline=latency_float,
        baseline_text=f"{latency_float:.4f} ms",
        ratio=latency_int8 / latency_float,
        ratio_text=f"{latency_int8 / latency_float:.2f}",
        goal="side by side",
    )
    size_row("ONNX int8 (QDQ)", onnx8, onnx32, None)
    drop_row("ONNX int8 (QDQ)", onnx8, onnx32, None)
    base_seconds = seconds["edge-x86_64-litert"]
    for name in profiles:
        build = builds[name]
        results.add(
            f"convert + evaluate: {name} ({build.format} {build.quantization})",
            seconds[name],
            "s",
            value_text=f"{seconds[name]:.2f} s",
            baseline=base_seconds,
            baseline_text=f"{base_seconds:.2f} s (edge-x86_64-litert)",
            ratio=seconds[name] / base_seconds,
            ratio_text=f"{seconds[name] / base_seconds:.2f}",
            goal="its gates",
            passed=build.gate.passed,
        )
        if not build.gate.passed:
            results.note(f"{name}: gate failed: " + "; ".join(build.gate.reasons))
    pipeline_seconds = train_seconds + sum(seconds.values())
    results.add(
        f"whole pipeline: train {epochs} epochs + convert + evaluate, {len(profiles)} profiles",
        pipeline_seconds,
        "s",
        value_text=f"{pipeline_seconds:.1f} s",
        baseline=train_seconds,
        baseline_text=f"{train_seconds:.1f} s (training alone)",
        ratio=pipeline_seconds / train_seconds,
        ratio_text=f"{pipeline_seconds / train_seconds:.2f}",
        goal="≤ 90 s",
        passed=pipeline_seconds <= 90.0,
    )
    results.finish()


if __name__ == "__main__":
    main()
