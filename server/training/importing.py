"""Bring your own model: a ``.keras`` file or a zipped SavedModel, evaluated and published
like a trained one.

An import is a run of kind ``import``: the API stores the upload in the artifact store
and queues the run; a worker loads the model, checks it against the dataset (input
shape after the given preprocessing, output shape, class probabilities), measures it
on the test split, and hands it to :func:`server.pipeline.publish.publish_model_version`
with ``source="imported"`` -- the same conversion, evaluation in the target runtimes,
gates and signed bundles as a trained model, and the same lineage (dataset version ->
run -> model version).

What always holds: a zipped SavedModel is unpacked only into a fresh temporary folder,
member by member, refusing absolute paths, ``..``, links and archives that expand past
a limit; the model is never executed beyond ``predict`` on dataset rows.
"""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from server.datasets.types import LoadedDataset
from server.errors import InvalidInputError
from shared.preprocessing import PreprocessingStep, apply_preprocessing

__all__ = [
    "ImportSpec",
    "ModelFormatError",
    "check_model_against",
    "detect_format",
    "load_model",
    "parse_preprocessing",
]

MAX_EXPANDED_BYTES = 2 * 1024 * 1024 * 1024
_STEPS = TypeAdapter(list[PreprocessingStep])


class ModelFormatError(InvalidInputError):
    """The upload is not a model we can load, or does not fit its dataset."""


class ImportSpec(BaseModel):
    """What an import run records in ``training_runs.spec_json``."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["import"] = "import"
    artifact_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    filename: str = Field(max_length=256)
    format: Literal["keras", "savedmodel"]
    preprocessing: list[PreprocessingStep] = Field(default_factory=list)
    notes: str = Field("", max_length=4000)


def parse_preprocessing(text: str | None) -> list[PreprocessingStep]:
    """Preprocessing steps from JSON text (a list of steps); empty or None means none."""
    if not text or not text.strip():
        return []
    try:
        return _STEPS.validate_json(text)
    except ValueError as e:
        raise ModelFormatError(f"preprocessing is not a valid list of steps: {e}") from e


def detect_format(path: Path) -> Literal["keras", "savedmodel"]:
    """``keras`` for a Keras 3 ``.keras`` archive, ``savedmodel`` for a zipped SavedModel."""
    if not zipfile.is_zipfile(path):
        raise ModelFormatError("the upload is neither a .keras file nor a zipped SavedModel")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
    if "config.json" in names and any(n.endswith(".weights.h5") for n in names):
        return "keras"
    if any(PurePosixPath(n).name == "saved_model.pb" for n in names):
        return "savedmodel"
    raise ModelFormatError(
        "the archive holds neither a Keras model (config.json + model.weights.h5) "
        "nor a SavedModel (saved_model.pb)"
    )


def _safe_extract(archive: zipfile.ZipFile, target: Path) -> None:
    total = 0
    for info in archive.infolist():
        name = PurePosixPath(info.filename)
        if name.is_absolute() or ".." in name.parts:
            raise ModelFormatError(f"refusing archive member {info.filename!r}")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ModelFormatError(f"refusing link {info.filename!r} in the archive")
        total += info.file_size
        if total > MAX_EXPANDED_BYTES:
            raise ModelFormatError("the archive expands past its size limit")
        archive.extract(info, target)


def load_model(path: Path, *, model_format: str, input_shape: list[int], work_dir: Path) -> Any:
    """Load the uploaded model as a Keras model (a SavedModel is wrapped in TFSMLayer)."""
    import keras

    if model_format == "keras":
        named = work_dir / "model.keras"  # Keras picks the loader by the file's extension
        shutil.copyfile(path, named)
        try:
            return keras.saving.load_model(named, compile=False, safe_mode=True)
        except Exception as e:  # a damaged or foreign .keras file
            raise ModelFormatError(f"cannot load the .keras model: {e}") from e
    with zipfile.ZipFile(path) as archive:
        _safe_extract(archive, work_dir)
    roots = [p.parent for p in work_dir.rglob("saved_model.pb")]
    if len(roots) != 1:
        raise ModelFormatError("the archive must hold exactly one SavedModel")
    import tensorflow as tf

    try:
        signatures = list(tf.saved_model.load(str(roots[0])).signatures)
    except Exception as e:
        raise ModelFormatError(f"cannot load the SavedModel: {e}") from e
    endpoint = next(
        (s for s in ("serving_default", "serve") if s in signatures),
        signatures[0] if signatures else None,
    )
    if endpoint is None:
        raise ModelFormatError("the SavedModel has no serving signature")
    inputs = keras.Input(tuple(input_shape))
    outputs = keras.layers.TFSMLayer(str(roots[0]), call_endpoint=endpoint)(inputs)
    if isinstance(outputs, dict):  # serving signatures return named outputs
        if len(outputs) != 1:
            raise ModelFormatError(
                f"the SavedModel's {endpoint!r} signature has {len(outputs)} outputs "
                f"({', '.join(sorted(outputs))}); one is needed"
            )
        outputs = next(iter(outputs.values()))
    return keras.Model(inputs, outputs)


def check_model_against(
    model: Any, *, dataset: LoadedDataset, preprocessing: list[PreprocessingStep]
) -> None:
    """Refuse a model whose input or output does not fit the dataset, naming the mismatch."""
    rows = dataset.x_test[:4]
    try:
        x = apply_preprocessing(preprocessing, rows)
    except Exception as e:
        raise ModelFormatError(f"the preprocessing does not fit the dataset: {e}") from e
    expected = getattr(model, "input_shape", None)
    if isinstance(expected, tuple) and not _shape_fits(expected[1:], x.shape[1:]):
        raise ModelFormatError(
            f"the model does not accept the dataset's rows: it takes inputs of shape "
            f"{tuple(expected[1:])}, the rows after preprocessing have shape {tuple(x.shape[1:])}"
        )
    try:
        outputs = np.asarray(model.predict(x, verbose=0))
    except Exception as e:
        raise ModelFormatError(
            f"the model does not accept the dataset's rows after preprocessing (shape "
            f"{tuple(x.shape)}): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    if dataset.schema.task == "classification":
        n_classes = dataset.n_classes or 0
        if outputs.ndim != 2 or outputs.shape[1] != n_classes:
            raise ModelFormatError(
                f"a classifier for this dataset outputs ({n_classes}) class probabilities per "
                f"row; this model outputs shape {tuple(outputs.shape[1:])}"
            )
        sums = outputs.sum(axis=1)
        if np.any(outputs < -1e-6) or not np.allclose(sums, 1.0, atol=1e-3):
            raise ModelFormatError(
                "the classifier's outputs are not class probabilities (end it with a softmax)"
            )
    elif outputs.reshape(len(rows), -1).shape[1] != 1:
        raise ModelFormatError(
            f"a regressor outputs one value per row; this model outputs shape "
            f"{tuple(outputs.shape[1:])}"
        )


def _shape_fits(expected: tuple[Any, ...], actual: tuple[int, ...]) -> bool:
    return len(expected) == len(actual) and all(
        e is None or e == a for e, a in zip(expected, actual, strict=True)
    )


def temporary_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="edgefleet-import-")


def spec_json(spec: ImportSpec) -> str:
    return json.dumps(spec.model_dump(mode="json"))
