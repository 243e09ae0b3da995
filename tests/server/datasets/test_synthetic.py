"""The vibration generator: seeded, learnable, and each drift moves the distribution."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from server.datasets.ingest import DatasetInvalidError
from server.datasets.synthetic import (
    CLASS_NAMES,
    NEW_FAULT_CLASS,
    UNKNOWN_LABEL,
    VibrationDrift,
    generate_vibration,
)
from shared.drift import DriftAccumulator, DriftReference, compare


def spectrum(x: np.ndarray) -> np.ndarray:
    """FFT magnitude per axis: what tells the machine conditions apart."""
    windows = x.reshape(len(x), -1, 3)
    return np.abs(np.fft.rfft(windows, axis=1)).reshape(len(x), -1)


def median_psi(reference: DriftReference, x: np.ndarray) -> float:
    accumulator = DriftAccumulator(reference)
    accumulator.update(x)
    return float(np.median([f.psi for f in compare(reference, accumulator.sketch())]))


@pytest.fixture(scope="module")
def training() -> tuple[np.ndarray, np.ndarray, DriftReference]:
    samples = generate_vibration(1000, seed=0)
    reference = DriftReference.from_data(samples.x, feature_names=samples.feature_names)
    return samples.x, samples.y, reference


def test_shapes_names_and_balanced_classes() -> None:
    samples = generate_vibration(400, seed=3, window=32)
    assert samples.x.shape == (400, 96) and samples.x.dtype == np.float32
    assert samples.y.dtype == np.int64
    assert samples.input_shape == [32, 3]
    assert samples.feature_names[:4] == ["ax[0]", "ay[0]", "az[0]", "ax[1]"]
    assert len(samples.feature_names) == 96
    assert samples.class_names == list(CLASS_NAMES)
    assert np.bincount(samples.y).tolist() == [100, 100, 100, 100]


def test_same_seed_same_data_other_seed_other_data() -> None:
    first = generate_vibration(200, seed=5)
    again = generate_vibration(200, seed=5)
    other = generate_vibration(200, seed=6)
    assert np.array_equal(first.x, again.x) and np.array_equal(first.y, again.y)
    assert not np.array_equal(first.x, other.x)


def test_classes_are_learnable_from_the_spectrum(
    training: tuple[np.ndarray, np.ndarray, DriftReference],
) -> None:
    x, y, _ = training
    model = LogisticRegression(max_iter=2000).fit(spectrum(x), y)
    fresh = generate_vibration(400, seed=1)
    assert model.score(spectrum(fresh.x), fresh.y) > 0.9


def test_fresh_samples_do_not_drift(
    training: tuple[np.ndarray, np.ndarray, DriftReference],
) -> None:
    *_, reference = training
    assert median_psi(reference, generate_vibration(1000, seed=11).x) < 0.05


@pytest.mark.parametrize(
    "drift",
    [
        VibrationDrift(gain=1.5),
        VibrationDrift(offset=0.5),
        VibrationDrift(noise_std=0.5),
        VibrationDrift(new_fault_share=0.5),
    ],
    ids=["gain", "offset", "noise", "new-fault"],
)
def test_each_drift_moves_the_distribution(
    training: tuple[np.ndarray, np.ndarray, DriftReference], drift: VibrationDrift
) -> None:
    *_, reference = training
    assert median_psi(reference, generate_vibration(1000, seed=11, drift=drift).x) > 0.1


def test_gain_drift_scales_the_same_windows() -> None:
    plain = generate_vibration(100, seed=2)
    doubled = generate_vibration(100, seed=2, drift=VibrationDrift(gain=2.0))
    assert np.array_equal(doubled.x, plain.x * 2) and np.array_equal(doubled.y, plain.y)


def test_the_new_fault_is_labelled_only_when_asked() -> None:
    drift = VibrationDrift(new_fault_share=0.25)
    hidden = generate_vibration(200, seed=4, drift=drift)
    shown = generate_vibration(200, seed=4, drift=drift, include_new_class_label=True)
    assert hidden.class_names == list(CLASS_NAMES)
    assert shown.class_names == [*CLASS_NAMES, NEW_FAULT_CLASS]
    assert (hidden.y == UNKNOWN_LABEL).sum() == 50
    assert np.array_equal(shown.y == 4, hidden.y == UNKNOWN_LABEL)
    assert np.array_equal(shown.x, hidden.x)
    untouched = hidden.y != UNKNOWN_LABEL
    plain = generate_vibration(200, seed=4)
    assert np.array_equal(hidden.x[untouched], plain.x[untouched])


def test_a_model_trained_without_the_new_fault_meets_unseen_inputs(
    training: tuple[np.ndarray, np.ndarray, DriftReference],
) -> None:
    x, y, _ = training
    model = LogisticRegression(max_iter=2000).fit(spectrum(x), y)
    loose = generate_vibration(200, seed=8, drift=VibrationDrift(new_fault_share=1.0))
    assert (loose.y == UNKNOWN_LABEL).all()
    confidence = model.predict_proba(spectrum(loose.x)).max(axis=1)
    assert confidence.mean() > 0.8  # confidently wrong: only drift monitoring can tell


@pytest.mark.parametrize(
    "kwargs",
    [{"gain": 0.0}, {"noise_std": -1.0}, {"new_fault_share": 1.5}, {"offset": float("nan")}],
)
def test_bad_drift_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(DatasetInvalidError):
        VibrationDrift(**kwargs)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(DatasetInvalidError) as excinfo:
        generate_vibration(0, seed=0, window=4)
    assert len(excinfo.value.problems) == 2
