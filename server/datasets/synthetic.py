"""A seeded generator of multi-sensor vibration windows, with drifted variants.

It is the bundled ``vibration`` example and what the demo and the tests use to make
drift: no download, and the same seed always gives the same arrays (bit for bit, on
one platform and numpy version).

Signal model. One sample is a window of ``window`` readings from a three-axis
accelerometer on a rotating machine (axes ``x`` and ``y`` radial, ``z`` axial).
Frequencies are in cycles per window of 64 readings (scaled with ``window``), so the
Nyquist limit is 32. Each sample draws a shaft speed ``f`` (1x) uniformly in [3, 5], a
load factor in [0.8, 1.2] that scales every component, and random phases. Every class
has a small residual 1x on all axes (0.3 radial, 0.1 axial) and white sensor noise (std
0.15) on top of:

- ``normal``: nothing more.
- ``imbalance``: a strong 1x rotating force -- amplitude 1.2 on ``x`` and ``y`` in
  quadrature, 0.15 axial.
- ``misalignment``: strong 2x -- 0.8 radial, and axially 0.6 at 1x plus 0.9 at 2x.
- ``bearing_fault``: an impulse train at the outer-race defect frequency (3.2x, with
  jitter), each impulse ringing a structural resonance at 22 cycles per window that
  decays within a few readings; strongest on ``y`` (1.6), then ``x`` (1.0), ``z`` (0.5);
  sensor noise std 0.25.
- ``looseness`` (the *new* fault, only in drifted data): 1x to 6x harmonics with
  amplitude 0.7/sqrt(h) plus a 0.5x sub-harmonic (0.4), clipped at 80 % of the peak
  (rattling), on all axes.

Drift (:class:`VibrationDrift`) is applied after the clean signal: ``gain`` multiplies
it (a sensor's sensitivity), ``offset`` adds a constant (a DC bias), ``noise_std`` adds
white noise, and ``new_fault_share`` of the rows become ``looseness``. The rows that
stay uses the same random stream as undrifted data with the same seed, so a drift of
``gain=2`` gives exactly twice the undrifted windows on those rows.

Rows are flattened row-major from ``(window, 3)``: feature ``ay[5]`` is reading 5 of
axis ``y``. Classes are balanced (row ``i`` gets class ``i % 4``, then shuffled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from server.datasets.ingest import DatasetInvalidError

__all__ = [
    "AXES",
    "CLASS_NAMES",
    "NEW_FAULT_CLASS",
    "UNKNOWN_LABEL",
    "VibrationDrift",
    "VibrationSamples",
    "generate_vibration",
]

CLASS_NAMES = ("normal", "imbalance", "misalignment", "bearing_fault")
NEW_FAULT_CLASS = "looseness"
UNKNOWN_LABEL = -1
"""The label of ``looseness`` rows when the new class is not reported."""
AXES = ("ax", "ay", "az")
MAX_SAMPLES = 1_000_000
_REFERENCE_WINDOW = 64
_NORMAL, _IMBALANCE, _MISALIGNMENT, _BEARING = range(4)


@dataclass(frozen=True, slots=True)
class VibrationDrift:
    """How drifted data differs from the training data (defaults: no drift)."""

    gain: float = 1.0
    offset: float = 0.0
    noise_std: float = 0.0
    new_fault_share: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not self.gain > 0:
            problems.append(f"gain must be positive, not {self.gain}")
        if not self.noise_std >= 0:
            problems.append(f"noise_std must be 0 or more, not {self.noise_std}")
        if not 0.0 <= self.new_fault_share <= 1.0:
            problems.append(f"new_fault_share must be between 0 and 1, not {self.new_fault_share}")
        if not np.isfinite(self.offset):
            problems.append("offset must be finite")
        if problems:
            raise DatasetInvalidError(problems)


class VibrationSamples(NamedTuple):
    x: np.ndarray
    """float32, ``(n_samples, window * 3)``."""
    y: np.ndarray
    """int64 class indices (``UNKNOWN_LABEL`` for unreported ``looseness`` rows)."""
    feature_names: list[str]
    class_names: list[str]
    input_shape: list[int]


def generate_vibration(
    n_samples: int,
    *,
    seed: int,
    window: int = 64,
    drift: VibrationDrift | None = None,
    include_new_class_label: bool = False,
) -> VibrationSamples:
    """``n_samples`` labelled windows; see the module docstring for the signal model.

    ``include_new_class_label`` adds ``looseness`` to the class names (index 4) and
    labels its rows with it; otherwise those rows are labelled :data:`UNKNOWN_LABEL`.
    """
    problems = []
    if not 1 <= n_samples <= MAX_SAMPLES:
        problems.append(f"n_samples must be between 1 and {MAX_SAMPLES}, not {n_samples}")
    if not 16 <= window <= 4096:
        problems.append(f"window must be between 16 and 4096 readings, not {window}")
    if problems:
        raise DatasetInvalidError(problems)
    drift = drift or VibrationDrift()
    base_stream, noise_stream, drift_stream = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(base_stream)
    noise_rng = np.random.default_rng(noise_stream)
    drift_rng = np.random.default_rng(drift_stream)

    t = np.arange(window, dtype=np.float64) / _REFERENCE_WINDOW
    y = rng.permutation(np.arange(n_samples) % len(CLASS_NAMES)).astype(np.int64)
    shaft = rng.uniform(3.0, 5.0, n_samples)
    load = rng.uniform(0.8, 1.2, n_samples)
    phase = rng.uniform(0.0, 2 * np.pi, (n_samples, 3))
    jitter = rng.uniform(0.0, 1.0, n_samples)
    signal = _residual(t, shaft, phase)
    for cls, component in (
        (_IMBALANCE, _imbalance),
        (_MISALIGNMENT, _misalignment),
        (_BEARING, _bearing_fault),
    ):
        rows = y == cls
        signal[rows] += component(t, shaft[rows], phase[rows], jitter[rows])
    noise_std = np.where(y == _BEARING, 0.25, 0.15)
    signal += noise_rng.normal(0.0, 1.0, signal.shape) * noise_std[:, None, None]
    signal *= load[:, None, None]

    class_names = list(CLASS_NAMES)
    n_new = round(drift.new_fault_share * n_samples)
    if n_new:
        rows = np.sort(drift_rng.choice(n_samples, size=n_new, replace=False))
        new_shaft = drift_rng.uniform(3.0, 5.0, n_new)
        new_phase = drift_rng.uniform(0.0, 2 * np.pi, (n_new, 3))
        new_load = drift_rng.uniform(0.8, 1.2, n_new)
        new = _residual(t, new_shaft, new_phase) + _looseness(t, new_shaft, new_phase, drift_rng)
        new += drift_rng.normal(0.0, 0.15, new.shape)
        signal[rows] = new * new_load[:, None, None]
        y[rows] = len(CLASS_NAMES) if include_new_class_label else UNKNOWN_LABEL
    if include_new_class_label:
        class_names.append(NEW_FAULT_CLASS)

    if drift.gain != 1.0:
        signal *= drift.gain
    if drift.offset:
        signal += drift.offset
    if drift.noise_std:
        signal += drift_rng.normal(0.0, drift.noise_std, signal.shape)

    feature_names = [f"{axis}[{step}]" for step in range(window) for axis in AXES]
    return VibrationSamples(
        x=signal.reshape(n_samples, window * 3).astype(np.float32),
        y=y,
        feature_names=feature_names,
        class_names=class_names,
        input_shape=[window, 3],
    )


def _wave(t: np.ndarray, frequency: np.ndarray, phase: np.ndarray) -> np.ndarray:
    """``sin(2 pi f t + phase)`` as ``(rows, window)``."""
    wave: np.ndarray = np.sin(2 * np.pi * frequency[:, None] * t[None, :] + phase[:, None])
    return wave


def _axes(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    return np.stack([x, y, z], axis=-1)


def _residual(t: np.ndarray, shaft: np.ndarray, phase: np.ndarray) -> np.ndarray:
    return _axes(
        0.3 * _wave(t, shaft, phase[:, 0]),
        0.3 * _wave(t, shaft, phase[:, 0] + np.pi / 2),
        0.1 * _wave(t, shaft, phase[:, 2]),
    )


def _imbalance(
    t: np.ndarray, shaft: np.ndarray, phase: np.ndarray, _jitter: np.ndarray
) -> np.ndarray:
    return _axes(
        1.2 * _wave(t, shaft, phase[:, 0]),
        1.2 * _wave(t, shaft, phase[:, 0] + np.pi / 2),
        0.15 * _wave(t, shaft, phase[:, 2]),
    )


def _misalignment(
    t: np.ndarray, shaft: np.ndarray, phase: np.ndarray, _jitter: np.ndarray
) -> np.ndarray:
    double = 2 * shaft
    return _axes(
        0.8 * _wave(t, double, phase[:, 1]),
        0.8 * _wave(t, double, phase[:, 1] + np.pi / 2),
        0.6 * _wave(t, shaft, phase[:, 2]) + 0.9 * _wave(t, double, phase[:, 2]),
    )


def _bearing_fault(
    t: np.ndarray, shaft: np.ndarray, _phase: np.ndarray, jitter: np.ndarray
) -> np.ndarray:
    defect = 3.2 * shaft  # impulses per window
    resonance = 22.0
    decay = 4.0 / _REFERENCE_WINDOW  # four readings
    # time since the latest impulse, impulses at (k + jitter) / defect
    since = np.mod(t[None, :] - jitter[:, None] / defect[:, None], 1.0 / defect[:, None])
    ringing = np.exp(-since / decay) * np.sin(2 * np.pi * resonance * since)
    return _axes(1.0 * ringing, 1.6 * ringing, 0.5 * ringing)


def _looseness(
    t: np.ndarray, shaft: np.ndarray, phase: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    rattle = 0.4 * _wave(t, 0.5 * shaft, phase[:, 0])
    for harmonic in range(1, 7):
        harmonic_phase = rng.uniform(0.0, 2 * np.pi, len(shaft))
        rattle = rattle + 1.0 / np.sqrt(harmonic) * _wave(t, harmonic * shaft, harmonic_phase)
    # a loose part moves freely one way and hits a stop the other: a truncated waveform
    stop = 0.3 * np.abs(rattle).max(axis=1, keepdims=True)
    rattle = np.minimum(rattle, stop)
    return _axes(rattle, 0.9 * np.roll(rattle, 3, axis=1), 0.6 * rattle)
