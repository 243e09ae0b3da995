"""The trainer on real TensorFlow, with real (small) data."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from server.training.spec import ModelSpec, default_spec
from server.training.trainer import (
    EpochProgress,
    TrainingCancelled,
    fit_preprocessing,
    train_model,
)
from shared.preprocessing import Reshape, Scale, Standardize, apply_preprocessing
from tests.server.training.conftest import digits, regression_data, small_digits, vibration_data

FAST_MLP = ModelSpec(arch="mlp", hidden_units=[32], epochs=2, batch_size=64, seed=3)


def test_preprocessing_is_fitted_on_the_train_split_and_replays_with_shared() -> None:
    image = fit_preprocessing(np.array([[0, 8, 16, 4]], np.float32), [2, 2, 1])
    assert image == [Scale(factor=1 / 16), Reshape(shape=[2, 2, 1])]

    tabular = fit_preprocessing(np.array([[1, 10], [3, 10]], np.float32), [2])
    assert tabular == [Standardize(mean=[2.0, 10.0], std=[1.0, 1.0])]  # constant: unscaled

    # [steps=2, channels=2], flat rows step-major: the channel's stats repeat at every step.
    windows = np.array([[0, 100, 2, 100], [4, 102, 6, 102]], np.float32)
    series = fit_preprocessing(windows, [2, 2])
    assert isinstance(series[0], Standardize) and series[1] == Reshape(shape=[2, 2])
    assert series[0].mean == [3.0, 101.0, 3.0, 101.0]
    out = apply_preprocessing(series, windows)
    assert out.shape == (2, 2, 2)
    assert abs(float(out[..., 0].mean())) < 1e-6 and abs(float(out[..., 1].mean())) < 1e-6


def test_digits_cnn_reaches_the_reference_accuracy() -> None:
    """The default cnn2d on digits: >= 100k parameters, >= 95 % test accuracy in <= 15 epochs."""
    data = digits()
    spec = default_spec("cnn2d", data.schema)
    seen: list[EpochProgress] = []
    started = time.perf_counter()
    result = train_model(spec, data, on_epoch=seen.append)
    elapsed = time.perf_counter() - started
    assert result.parameters >= 100_000
    assert spec.epochs <= 15 and result.epochs_trained <= 15
    assert result.metrics["accuracy"] >= 0.95, result.metrics
    assert result.metrics["macro_f1"] >= 0.95
    confusion = np.array(result.metrics["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == len(data.y_test)
    assert np.trace(confusion) / confusion.sum() == pytest.approx(result.metrics["accuracy"])
    assert result.metrics["rows"] == len(data.y_test)
    assert [p.epoch for p in seen] == list(range(1, result.epochs_trained + 1))
    assert all(p.fold is None and p.stage == "training" and p.epochs == 15 for p in seen)
    assert {"accuracy", "val_loss", "val_accuracy"} <= set(seen[-1].metrics)
    assert [h["epoch"] for h in result.history] == [p.epoch for p in seen]
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(result.history[0])
    assert result.preprocessing == [Scale(factor=1 / 16), Reshape(shape=[8, 8, 1])]
    assert result.validation_metrics["accuracy"] > 0.9
    assert {"tensorflow", "keras", "numpy", "sklearn", "python"} <= set(result.environment)
    assert result.float_metrics.keys() == {"accuracy", "macro_f1"}
    print(
        f"\ndigits cnn2d: {result.parameters} parameters, test accuracy "
        f"{result.metrics['accuracy']:.4f}, {result.epochs_trained} epochs in {elapsed:.1f} s"
    )


def test_the_model_takes_raw_rows_through_its_preprocessing() -> None:
    data = small_digits()
    result = train_model(FAST_MLP, data)
    probabilities = result.model.predict(
        apply_preprocessing(result.preprocessing, data.x_test), verbose=0
    )
    assert probabilities.shape == (len(data.x_test), 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    predicted = probabilities.argmax(axis=1)
    assert float((predicted == data.y_test).mean()) == pytest.approx(result.metrics["accuracy"])


def test_regression_predicts_in_the_targets_units() -> None:
    data = regression_data()
    spec = ModelSpec(
        arch="mlp", hidden_units=[32], epochs=12, batch_size=32, learning_rate=1e-2, seed=1
    )
    result = train_model(spec, data)
    assert set(result.metrics) == {"rows", "rmse", "mae", "r2"}
    assert result.metrics["r2"] > 0.9, result.metrics
    assert result.metrics["rmse"] < 0.3 * float(np.std(data.y_test))
    assert result.metrics["mae"] <= result.metrics["rmse"]
    assert isinstance(result.preprocessing[0], Standardize) and len(result.preprocessing) == 1
    assert {"rmse", "mae", "val_rmse"} <= set(result.history[-1])
    prediction = result.model.predict(
        apply_preprocessing(result.preprocessing, data.x_test[:5]), verbose=0
    )
    assert prediction.shape == (5, 1)
    assert abs(float(prediction.mean()) - 5000) < 1500  # real units, not standardised ones


def test_cnn1d_on_time_series() -> None:
    data = vibration_data()
    spec = default_spec("cnn1d", data.schema).model_copy(update={"epochs": 4})
    result = train_model(spec, data)
    assert isinstance(result.preprocessing[0], Standardize)
    assert result.preprocessing[1] == Reshape(shape=[16, 3])
    assert result.metrics["accuracy"] > 0.8
    assert np.array(result.metrics["confusion_matrix"]).shape == (2, 2)


def test_k_fold_cross_validation_on_train_and_val() -> None:
    data = small_digits(300)
    spec = FAST_MLP.model_copy(update={"k_folds": 3, "epochs": 2})
    seen: list[EpochProgress] = []
    result = train_model(spec, data, on_epoch=seen.append)
    cv = result.cross_validation
    assert cv is not None and cv["k"] == 3 and cv["epochs"] == 2 and len(cv["folds"]) == 3
    assert sum(f["rows"] for f in cv["folds"]) == len(data.x_train) + len(data.x_val)
    assert set(cv["mean"]) == set(cv["std"]) == {"accuracy", "macro_f1"}
    assert cv["mean"]["accuracy"] == pytest.approx(np.mean([f["accuracy"] for f in cv["folds"]]))
    stages = [(p.fold, p.epoch) for p in seen]
    assert stages == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (None, 1), (None, 2)]
    assert all(p.folds == 3 for p in seen[:6]) and seen[0].stage == "cross-validation"


def test_should_stop_cancels_after_the_current_epoch() -> None:
    seen: list[EpochProgress] = []
    with pytest.raises(TrainingCancelled):
        train_model(
            FAST_MLP.model_copy(update={"epochs": 10}),
            small_digits(),
            on_epoch=seen.append,
            should_stop=lambda: len(seen) >= 2,
        )
    assert [p.epoch for p in seen] == [1, 2]
    with pytest.raises(TrainingCancelled):
        train_model(FAST_MLP, small_digits(), should_stop=lambda: True)


def test_the_same_seed_gives_the_same_model() -> None:
    data = small_digits()
    spec = FAST_MLP.model_copy(update={"dropout": 0.2})
    first, second = train_model(spec, data), train_model(spec, data)
    assert first.metrics == second.metrics
    assert first.history == second.history
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    other = train_model(spec.model_copy(update={"seed": 4}), data)
    assert other.history != first.history


def test_early_stopping_keeps_the_best_epoch() -> None:
    data = small_digits()
    noise = np.random.default_rng(0)  # labels that carry no signal: validation loss soon rises
    data = dataclasses.replace(
        data,
        y_train=noise.permutation(data.y_train),
        y_val=noise.permutation(data.y_val),
    )
    spec = FAST_MLP.model_copy(
        update={"epochs": 40, "early_stopping_patience": 2, "learning_rate": 0.01}
    )
    result = train_model(spec, data)
    assert result.epochs_trained < 40
    best = min(result.history, key=lambda h: h["val_loss"])
    assert result.best_epoch == best["epoch"]


@pytest.mark.parametrize("arch", ["mlp", "cnn1d", "cnn2d"])
def test_models_convert_to_tflite_builtin_ops_only(arch: str) -> None:
    import tensorflow as tf

    from server.training.keras_models import build_model

    data = {"mlp": regression_data(), "cnn1d": vibration_data(), "cnn2d": small_digits()}[arch]
    spec = default_spec(arch, data.schema).model_copy(update={"batch_norm": True})  # type: ignore[arg-type]
    model = build_model(spec, data.schema)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    assert len(converter.convert()) > 1000
