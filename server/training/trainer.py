"""Train one model on one dataset version: preprocessing, fit, evaluation, cross-validation.

:func:`train_model` is a function of its inputs: no database, no files, no network.
The worker (:mod:`server.training.worker`) feeds it a dataset and records what it
returns; tests call it directly.

What always holds:

- Preprocessing is fitted on the *train* split only and is exactly what serving will
  replay: the model is trained and evaluated on ``apply_preprocessing(steps, raw)``,
  the same function the agent runs. Image-like inputs (3-D ``input_shape``) are scaled
  by ``1 / max|x|``; time series (2-D, ``[steps, channels]``) are standardised per
  *channel* (the same mean and std at every step, so a pattern looks the same wherever
  it occurs in the window); tabular inputs are standardised per feature. A ``Reshape``
  to ``input_shape`` ends the steps when that shape has more than one dimension.
- Test metrics come from the test split, which training never sees (early stopping and
  the history use the validation split). Cross-validation folds are cut from train+val,
  each fold with its own preprocessing fitted on its own training part.
- Metrics are computed with scikit-learn: accuracy, macro-F1 and the confusion matrix
  (rows: true class, columns: predicted) for classification; RMSE, MAE and R² for
  regression.
- The same spec (with its seed) and data give the same model and metrics (same machine
  and package versions: TensorFlow's CPU kernels are deterministic here without
  ``enable_op_determinism``, which the test suite checks).
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from server.datasets.types import DatasetSchema, LoadedDataset
from server.training.keras_models import build_model
from server.training.spec import ModelSpec, SpecError, TrainingError, check_fits
from shared.preprocessing import Reshape, Scale, Standardize, apply_preprocessing

__all__ = [
    "EpochProgress",
    "SpecError",
    "TrainedModel",
    "TrainingCancelled",
    "TrainingError",
    "environment",
    "evaluate",
    "fit_preprocessing",
    "train_model",
]

PreprocessingSteps = list[Standardize | Scale | Reshape]


class TrainingCancelled(TrainingError):
    """``should_stop`` asked training to stop; nothing was produced."""

    status_code = 409


@dataclass(frozen=True)
class EpochProgress:
    """One finished epoch of one fit (the final model's, or a cross-validation fold's)."""

    epoch: int
    """1-based, within this fit."""
    epochs: int
    """Epochs this fit will run at most (early stopping may end it sooner)."""
    loss: float
    metrics: dict[str, float]
    """Keras' other logs for the epoch: ``accuracy`` or ``rmse``/``mae``, ``val_loss``, ..."""
    fold: int | None = None
    """1-based cross-validation fold, or None for the final model."""
    folds: int | None = None

    @property
    def stage(self) -> str:
        return "training" if self.fold is None else "cross-validation"


@dataclass
class TrainedModel:
    model: Any
    """The fitted ``keras.Model`` (input: preprocessed samples of ``schema.input_shape``)."""
    preprocessing: PreprocessingSteps
    metrics: dict[str, Any]
    """On the test split: accuracy, macro_f1, confusion_matrix -- or rmse, mae, r2."""
    validation_metrics: dict[str, Any]
    history: list[dict[str, float]]
    """One dict per epoch of the final fit: ``epoch``, ``loss``, ``val_loss``, ..."""
    cross_validation: dict[str, Any] | None
    """``{"k", "epochs", "folds": [metrics...], "mean": {...}, "std": {...}}`` or None."""
    environment: dict[str, str]
    parameters: int
    epochs_trained: int
    best_epoch: int
    spec: ModelSpec

    @property
    def float_metrics(self) -> dict[str, float]:
        """The scalar test metrics (what the pipeline compares converted models against):
        accuracy and macro_f1, or rmse, mae and r2 (when defined)."""
        return {
            name: float(value)
            for name, value in self.metrics.items()
            if name != "rows" and isinstance(value, int | float) and math.isfinite(value)
        }


def environment() -> dict[str, str]:
    """Versions of what produced a model, recorded with every run."""
    import sklearn
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "sklearn": sklearn.__version__,
        "platform": platform.platform(),
    }


def fit_preprocessing(x_train: np.ndarray, input_shape: list[int]) -> PreprocessingSteps:
    """The steps that turn raw flat rows into model input, fitted on ``x_train`` only."""
    x = np.asarray(x_train, dtype=np.float64)
    steps: PreprocessingSteps
    if len(input_shape) == 3:
        peak = float(np.max(np.abs(x))) if x.size else 0.0
        steps = [Scale(factor=1.0 / peak if peak > 0 else 1.0)]
    elif len(input_shape) == 2:
        steps_count, channels = input_shape
        per_channel = x.reshape(-1, steps_count, channels)
        mean = per_channel.mean(axis=(0, 1))
        std = per_channel.std(axis=(0, 1))
        steps = [Standardize(mean=_tile(mean, steps_count), std=_tile(_safe(std), steps_count))]
    else:
        steps = [Standardize(mean=x.mean(axis=0).tolist(), std=_safe(x.std(axis=0)).tolist())]
    if len(input_shape) > 1:
        steps.append(Reshape(shape=list(input_shape)))
    return steps


def _safe(std: np.ndarray) -> np.ndarray:
    # A (near-)constant feature would be blown up by its tiny std: leave it unscaled.
    return np.where(std < 1e-6, 1.0, std)


def _tile(per_channel: np.ndarray, steps: int) -> list[float]:
    # Flat rows are step-major ([t0c0, t0c1, ..., t1c0, ...]), as Reshape([steps, channels]) reads.
    return np.tile(per_channel, steps).astype(float).tolist()


def _check_data(data: LoadedDataset) -> None:
    schema = data.schema
    width = len(schema.feature_names)
    for split in ("train", "val", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        if x.ndim != 2 or x.shape[1] != width:
            raise TrainingError(
                f"the {split} split has shape {x.shape}, expected (rows, {width}) flat features"
            )
        if len(y) != len(x):
            raise TrainingError(f"the {split} split has {len(x)} rows but {len(y)} labels")
    if len(data.x_train) == 0 or len(data.x_test) == 0:
        raise TrainingError("the train and test splits must both have rows")
    if schema.task == "classification":
        classes = len(schema.class_names or [])
        labels = np.concatenate([data.y_train, data.y_val, data.y_test])
        if labels.size and (labels.min() < 0 or labels.max() >= classes):
            raise TrainingError(f"class indices must lie in 0..{classes - 1}")


def train_model(
    spec: ModelSpec,
    data: LoadedDataset,
    *,
    on_epoch: Callable[[EpochProgress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainedModel:
    """Fit ``spec`` on ``data`` and evaluate it; see the module docstring for what holds.

    ``on_epoch`` is called after every epoch (of every cross-validation fold, then of the
    final fit); ``should_stop`` is asked after every epoch and before every fit, and
    ``True`` stops training and raises :class:`TrainingCancelled`.
    """
    check_fits(spec, data.schema)
    _check_data(data)
    stop = should_stop or (lambda: False)

    cross_validation = None
    if spec.k_folds:
        cross_validation = _cross_validate(spec, data, on_epoch, stop)

    if stop():
        raise TrainingCancelled("training was cancelled")
    steps = fit_preprocessing(data.x_train, data.schema.input_shape)
    x_train = apply_preprocessing(steps, data.x_train)
    x_val = apply_preprocessing(steps, data.x_val) if len(data.x_val) else None
    x_test = apply_preprocessing(steps, data.x_test)
    fit = _fit(
        spec,
        data.schema,
        x_train,
        data.y_train,
        x_val,
        data.y_val if x_val is not None else None,
        on_epoch=on_epoch,
        should_stop=stop,
        early_stopping=spec.early_stopping_patience is not None,
    )
    test_metrics = evaluate(fit.model, data.schema, x_test, data.y_test)
    val_metrics = (
        evaluate(fit.model, data.schema, x_val, data.y_val, confusion=False)
        if x_val is not None
        else {}
    )
    return TrainedModel(
        model=fit.model,
        preprocessing=steps,
        metrics=test_metrics,
        validation_metrics=val_metrics,
        history=fit.history,
        cross_validation=cross_validation,
        environment=environment(),
        parameters=int(fit.model.count_params()),
        epochs_trained=len(fit.history),
        best_epoch=fit.best_epoch,
        spec=spec,
    )


@dataclass
class _Fit:
    model: Any
    history: list[dict[str, float]]
    best_epoch: int


def _fit(
    spec: ModelSpec,
    schema: DatasetSchema,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    *,
    on_epoch: Callable[[EpochProgress], None] | None,
    should_stop: Callable[[], bool],
    early_stopping: bool,
    fold: int | None = None,
    folds: int | None = None,
) -> _Fit:
    if should_stop():
        raise TrainingCancelled("training was cancelled")
    y_train = _targets(schema, y_train)
    if schema.task == "regression":
        model = build_model(
            spec, schema, target_mean=float(np.mean(y_train)), target_std=float(np.std(y_train))
        )
    else:
        model = build_model(spec, schema)
    progress = _ProgressCallback(spec.epochs, on_epoch, should_stop, fold, folds)
    callbacks: list[Any] = [progress]
    monitor = "val_loss" if x_val is not None else "loss"
    stopper = None
    if early_stopping and spec.early_stopping_patience is not None:
        stopper = keras.callbacks.EarlyStopping(
            monitor=monitor, patience=spec.early_stopping_patience, restore_best_weights=True
        )
        callbacks.insert(0, stopper)
    validation = (
        (x_val, _targets(schema, y_val)) if x_val is not None and y_val is not None else None
    )
    try:
        model.fit(
            x_train,
            y_train,
            epochs=spec.epochs,
            batch_size=spec.batch_size,
            validation_data=validation,
            callbacks=callbacks,
            shuffle=True,
            verbose=0,
        )
    except TrainingCancelled:
        raise
    except Exception as e:  # TensorFlow's errors, out of memory, NaN checks
        raise TrainingError(f"training failed: {type(e).__name__}: {e}") from e
    if progress.cancelled:
        raise TrainingCancelled("training was cancelled")
    if progress.history and not all(math.isfinite(h.get("loss", 0.0)) for h in progress.history):
        raise TrainingError(
            "the loss became NaN or infinite; try a lower learning_rate or batch_norm"
        )
    best = len(progress.history)
    if stopper is not None and stopper.best_weights is not None:
        best = int(stopper.best_epoch) + 1
    return _Fit(model=model, history=progress.history, best_epoch=best)


def _targets(schema: DatasetSchema, y: np.ndarray) -> np.ndarray:
    if schema.task == "classification":
        return np.asarray(y, dtype=np.int64)
    return np.asarray(y, dtype=np.float32)


class _ProgressCallback(keras.callbacks.Callback):
    """Reports each epoch, keeps the history, and stops the fit when asked to."""

    def __init__(
        self,
        epochs: int,
        on_epoch: Callable[[EpochProgress], None] | None,
        should_stop: Callable[[], bool],
        fold: int | None,
        folds: int | None,
    ) -> None:
        super().__init__()
        self.epochs = epochs
        self.on_epoch = on_epoch
        self.should_stop = should_stop
        self.fold = fold
        self.folds = folds
        self.history: list[dict[str, float]] = []
        self.cancelled = False

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        values = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
        self.history.append({"epoch": epoch + 1, **values})
        if self.on_epoch is not None:
            loss = values.pop("loss", float("nan"))
            self.on_epoch(
                EpochProgress(
                    epoch=epoch + 1,
                    epochs=self.epochs,
                    loss=loss,
                    metrics=values,
                    fold=self.fold,
                    folds=self.folds,
                )
            )
        if self.should_stop():
            self.cancelled = True
            self.model.stop_training = True


def evaluate(
    model: Any, schema: DatasetSchema, x: np.ndarray, y: np.ndarray, *, confusion: bool = True
) -> dict[str, Any]:
    """Metrics of ``model`` on preprocessed ``x`` against ``y`` (see the module docstring)."""
    from sklearn import metrics

    predictions = np.asarray(model.predict(x, batch_size=256, verbose=0))
    result: dict[str, Any] = {"rows": len(y)}
    if schema.task == "classification":
        classes = list(range(len(schema.class_names or [])))
        predicted = predictions.argmax(axis=1)
        result["accuracy"] = float(metrics.accuracy_score(y, predicted))
        result["macro_f1"] = float(
            metrics.f1_score(y, predicted, labels=classes, average="macro", zero_division=0)
        )
        if confusion:
            result["confusion_matrix"] = metrics.confusion_matrix(
                y, predicted, labels=classes
            ).tolist()
    else:
        predicted = predictions.reshape(-1)
        result["rmse"] = float(math.sqrt(metrics.mean_squared_error(y, predicted)))
        result["mae"] = float(metrics.mean_absolute_error(y, predicted))
        # R² is undefined on fewer than two rows or a constant target.
        defined = len(y) >= 2 and float(np.var(y)) > 0
        result["r2"] = float(metrics.r2_score(y, predicted)) if defined else None
    return result


def _cross_validate(
    spec: ModelSpec,
    data: LoadedDataset,
    on_epoch: Callable[[EpochProgress], None] | None,
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """k-fold on train+val: each fold trains ``spec.epochs`` epochs, without early stopping
    (the held-out fold is what is being measured, so it must not choose the epoch)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    assert spec.k_folds is not None
    x = np.concatenate([data.x_train, data.x_val])
    y = np.concatenate([data.y_train, data.y_val])
    k = spec.k_folds
    if len(x) < 2 * k:
        raise TrainingError(f"{k}-fold cross-validation needs at least {2 * k} train+val rows")
    splitter: Any = KFold(n_splits=k, shuffle=True, random_state=spec.seed)
    if data.schema.task == "classification":
        counts = np.bincount(y.astype(np.int64))
        if counts[counts > 0].min() >= k:  # stratify when every class can be in every fold
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=spec.seed)
    folds: list[dict[str, Any]] = []
    for fold, (train_index, test_index) in enumerate(splitter.split(x, y), start=1):
        steps = fit_preprocessing(x[train_index], data.schema.input_shape)
        fit = _fit(
            spec,
            data.schema,
            apply_preprocessing(steps, x[train_index]),
            y[train_index],
            None,
            None,
            on_epoch=on_epoch,
            should_stop=should_stop,
            early_stopping=False,
            fold=fold,
            folds=k,
        )
        held_out = apply_preprocessing(steps, x[test_index])
        folds.append(evaluate(fit.model, data.schema, held_out, y[test_index], confusion=False))
    names = [
        name for name, value in folds[0].items() if name != "rows" and isinstance(value, float)
    ]
    summary: dict[str, Any] = {"k": k, "epochs": spec.epochs, "folds": folds}
    summary["mean"] = {n: float(np.mean([f[n] for f in folds if f[n] is not None])) for n in names}
    summary["std"] = {n: float(np.std([f[n] for f in folds if f[n] is not None])) for n in names}
    return summary
