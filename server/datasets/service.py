"""Datasets in the database and the artifact store: immutable versions and seeded splits.

Keyword-only functions on a sqlmodel ``Session`` and an
:class:`~server.artifacts.ArtifactStore`; the split computation itself
(:func:`split_indices`) is pure.

What always holds:

- A version is immutable and content-addressed: ``sha256`` is the
  :attr:`~server.datasets.ingest.ParsedDataset.content_sha256` of its arrays and the
  store address of the canonical NPZ holding them; ``splits_sha256`` addresses an NPZ
  of the ``train``, ``validation`` and ``test`` row indices (plus the ``seed`` and
  ``fractions`` that made them). Both files are registered in ``artifacts``.
- Adding writes both files to the store *first*, then the rows in one transaction
  that it commits; a failure at any step leaves no rows (at most an unreferenced,
  complete file in the store, which is harmless).
- Versions of a dataset are numbered 1, 2, 3, ... A dataset keeps the task and label
  of its first version: an upload with another one is refused (409). Adding content
  the dataset already has returns that version (with its original splits) instead of
  a new one.
- Splits are a pure function of ``(y, task, seed, fractions)``: stratified per class
  for classification (every class with enough rows appears in every split), a
  seeded shuffle for regression.
- Loading a version re-hashes both stored files before using them.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from server.artifacts import ArtifactStore, register_artifact
from server.datasets.ingest import (
    DatasetConflictError,
    DatasetDamagedError,
    DatasetInvalidError,
    DatasetNotFoundError,
    ParsedDataset,
    canonical_schema_json,
    write_canonical_npz,
)
from server.datasets.types import DatasetSchema, LoadedDataset, Task
from server.errors import ArtifactError, NotFoundError
from server.models import Dataset, DatasetVersion

__all__ = [
    "ARRAYS_MEDIA_TYPE",
    "DEFAULT_FRACTIONS",
    "SPLITS_MEDIA_TYPE",
    "SPLIT_NAMES",
    "add_dataset_version",
    "check_dataset_name",
    "find_version_by_content",
    "get_dataset",
    "get_version",
    "latest_version",
    "list_datasets",
    "list_versions",
    "load_dataset_version",
    "resolve_version",
    "split_indices",
    "split_sizes",
]

ARRAYS_MEDIA_TYPE = "application/vnd.edgefleet.dataset+npz"
SPLITS_MEDIA_TYPE = "application/vnd.edgefleet.dataset-splits+npz"
SPLIT_NAMES = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
MAX_DESCRIPTION_LENGTH = 10_000
MAX_LINEAGE_BYTES = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_ATTEMPTS = 3
"""Concurrent uploads to one dataset can race for a version number; the loser retries."""


# ----------------------------------------------------------------------------- pure parts


def check_dataset_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise DatasetInvalidError(
            [
                f"invalid dataset name {name!r}: use 1 to 128 letters, digits, '.', '_' or "
                "'-', starting with a letter or digit"
            ]
        )
    return name


def split_indices(
    y: np.ndarray,
    *,
    task: Task,
    seed: int,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> dict[str, np.ndarray]:
    """Row indices of the train, validation and test splits (sorted int64, disjoint,
    covering every row). Classification splits each class by the fractions
    (stratified); regression splits one shuffled order."""
    _check_fractions(fractions)
    rng = np.random.default_rng(seed)
    groups = (
        [np.flatnonzero(y == c) for c in np.unique(y)]
        if task == "classification"
        else [np.arange(len(y))]
    )
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for rows in groups:
        order = rng.permutation(rows)
        n_validation, n_test = _split_counts(len(order), fractions)
        n_train = len(order) - n_validation - n_test
        parts["train"].append(order[:n_train])
        parts["validation"].append(order[n_train : n_train + n_validation])
        parts["test"].append(order[n_train + n_validation :])
    return {
        name: np.sort(np.concatenate(chunks)).astype(np.int64) if chunks else np.empty(0, np.int64)
        for name, chunks in parts.items()
    }


def _split_counts(n: int, fractions: Sequence[float]) -> tuple[int, int]:
    n_validation = math.floor(n * fractions[1] + 0.5)
    n_test = math.floor(n * fractions[2] + 0.5)
    # a class with a handful of rows keeps at least one for training
    while n_validation + n_test >= n and n_validation + n_test > 0:
        if n_validation >= n_test:
            n_validation -= 1
        else:
            n_test -= 1
    return n_validation, n_test


def _check_fractions(fractions: Sequence[float]) -> None:
    if (
        len(fractions) != 3
        or any(not (0.0 <= f <= 1.0) for f in fractions)
        or fractions[0] <= 0.0
        or abs(sum(fractions) - 1.0) > 1e-9
    ):
        raise DatasetInvalidError(
            [
                f"split fractions {list(fractions)} must be three shares (train, validation, "
                "test) between 0 and 1 that add up to 1, with some rows for training"
            ]
        )


def _splits_npz(splits: dict[str, np.ndarray], *, seed: int, fractions: Sequence[float]) -> bytes:
    return write_canonical_npz(
        {
            **splits,
            "seed": np.asarray(seed, dtype=np.int64),
            "fractions": np.asarray(fractions, dtype=np.float64),
        }
    )


def _lineage_json(lineage: dict[str, Any] | None) -> str:
    try:
        text = json.dumps(lineage or {}, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise DatasetInvalidError([f"lineage must be plain JSON: {e}"]) from e
    if len(text.encode()) > MAX_LINEAGE_BYTES:
        raise DatasetInvalidError([f"lineage is larger than {MAX_LINEAGE_BYTES} bytes as JSON"])
    return text


# ----------------------------------------------------------------------------- reading


def list_datasets(session: Session) -> list[Dataset]:
    return list(session.exec(select(Dataset).order_by(Dataset.name)))


def get_dataset(session: Session, *, name: str) -> Dataset:
    dataset = session.exec(select(Dataset).where(Dataset.name == name)).first()
    if dataset is None:
        raise DatasetNotFoundError(f"no dataset named {name!r}")
    return dataset


def list_versions(session: Session, *, dataset: Dataset) -> list[DatasetVersion]:
    return list(
        session.exec(
            select(DatasetVersion)
            .where(DatasetVersion.dataset_id == dataset.id)
            .order_by(DatasetVersion.version)  # type: ignore[arg-type]
        )
    )


def latest_version(session: Session, *, dataset: Dataset) -> DatasetVersion | None:
    return session.exec(
        select(DatasetVersion)
        .where(DatasetVersion.dataset_id == dataset.id)
        .order_by(DatasetVersion.version.desc())  # type: ignore[attr-defined]
    ).first()


def get_version(session: Session, *, name: str, version: int | str) -> DatasetVersion:
    """A version by number (``3`` or ``"3"``) or ``"latest"``."""
    dataset = get_dataset(session, name=name)
    text = str(version).strip()
    if text == "latest":
        found = latest_version(session, dataset=dataset)
        if found is None:
            raise DatasetNotFoundError(f"dataset {name!r} has no versions yet")
        return found
    if not text.isdigit():
        raise DatasetInvalidError(
            [f"dataset version {text!r} is neither a number nor 'latest' (as in {name}@2)"]
        )
    found = session.exec(
        select(DatasetVersion).where(
            DatasetVersion.dataset_id == dataset.id, DatasetVersion.version == int(text)
        )
    ).first()
    if found is None:
        latest = latest_version(session, dataset=dataset)
        if latest is None:
            have = "it has no versions yet"
        elif latest.version == 1:
            have = "it has only version 1"
        else:
            have = f"it has versions 1 to {latest.version}"
        raise DatasetNotFoundError(f"dataset {name!r} has no version {text}; {have}")
    return found


def resolve_version(session: Session, ref: str) -> DatasetVersion:
    """``NAME`` (its latest version) or ``NAME@VERSION`` (a number or ``latest``)."""
    name, _, version = ref.strip().partition("@")
    return get_version(session, name=name, version=version or "latest")


def find_version_by_content(session: Session, *, name: str, sha256: str) -> DatasetVersion | None:
    """The version of dataset ``name`` holding exactly this content, if any."""
    return session.exec(
        select(DatasetVersion)
        .join(Dataset, DatasetVersion.dataset_id == Dataset.id)  # type: ignore[arg-type]
        .where(Dataset.name == name, DatasetVersion.sha256 == sha256)
    ).first()


def split_sizes(*, store: ArtifactStore, dataset_version: DatasetVersion) -> dict[str, int]:
    """Rows in each split of a version (read from its stored, re-verified splits file)."""
    with _load_npz(store, dataset_version.splits_sha256, what="splits") as splits:
        return {name: int(splits[name].shape[0]) for name in SPLIT_NAMES}


def load_dataset_version(
    session: Session, *, store: ArtifactStore, dataset_version_id: int
) -> LoadedDataset:
    """A version's arrays with its stored splits applied, after re-hashing both files."""
    version = session.get(DatasetVersion, dataset_version_id)
    if version is None:
        raise DatasetNotFoundError(f"no dataset version with id {dataset_version_id}")
    dataset = session.get(Dataset, version.dataset_id)
    assert dataset is not None  # a foreign key
    label = f"{dataset.name} v{version.version}"
    schema = DatasetSchema.model_validate_json(version.data_schema_json)
    with _load_npz(store, version.sha256, what=f"arrays of {label}") as arrays:
        x = arrays["x"]
        y = arrays["y"]
        stored_schema = bytes(arrays["schema_json"]).decode()
    if stored_schema != canonical_schema_json(schema) or x.shape != (
        schema.rows,
        len(schema.feature_names),
    ):
        raise DatasetDamagedError(f"the stored arrays of {label} do not match its recorded schema")
    with _load_npz(store, version.splits_sha256, what=f"splits of {label}") as splits:
        indices = {name: splits[name] for name in SPLIT_NAMES}
    return LoadedDataset(
        dataset_name=dataset.name,
        version=version.version,
        sha256=version.sha256,
        schema=schema,
        x_train=x[indices["train"]],
        y_train=y[indices["train"]],
        x_val=x[indices["validation"]],
        y_val=y[indices["validation"]],
        x_test=x[indices["test"]],
        y_test=y[indices["test"]],
    )


def _load_npz(store: ArtifactStore, sha256: str, *, what: str) -> Any:
    """Read a stored file once, check its hash, and open it as an NPZ."""
    try:
        with store.open(sha256) as f:
            data = f.read()
    except (NotFoundError, ArtifactError, OSError) as e:
        raise DatasetDamagedError(f"the {what} ({sha256[:16]}...) are missing: {e}") from e
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DatasetDamagedError(f"the {what} ({sha256[:16]}...) are damaged: the hash differs")
    return np.load(io.BytesIO(data), allow_pickle=False)


# ----------------------------------------------------------------------------- writing


def add_dataset_version(
    session: Session,
    *,
    store: ArtifactStore,
    name: str,
    parsed: ParsedDataset,
    description: str = "",
    source_name: str = "",
    split_seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    lineage: dict[str, Any] | None = None,
) -> DatasetVersion:
    """Add ``parsed`` as the next version of dataset ``name`` (created on first use),
    or return the version that already holds this content. Commits.

    ``description`` is the dataset's; a non-empty one given with a new version replaces
    it. ``source_name`` is the uploaded file's name. Nothing else may be pending in
    ``session``: this function commits, and rolls back on failure.
    """
    check_dataset_name(name)
    problems = []
    if len(description) > MAX_DESCRIPTION_LENGTH:
        problems.append(f"the description is longer than {MAX_DESCRIPTION_LENGTH} characters")
    if not -(2**63) <= split_seed < 2**63:
        problems.append("the split seed must fit in 64 bits")
    if problems:
        raise DatasetInvalidError(problems)
    lineage_json = _lineage_json(lineage)
    _check_fractions(fractions)
    schema = parsed.schema

    existing = session.exec(select(Dataset).where(Dataset.name == name)).first()
    if existing is not None:
        _check_compatible(existing, schema)
        found = find_version_by_content(session, name=name, sha256=parsed.content_sha256)
        if found is not None:
            return found

    # the files first: a crash after this leaves unreferenced files, never dangling rows
    arrays = store.put_bytes(parsed.canonical_npz())
    if arrays.sha256 != parsed.content_sha256:
        raise DatasetDamagedError("the stored arrays do not hash to the content hash")
    splits = store.put_bytes(
        _splits_npz(
            split_indices(parsed.y, task=schema.task, seed=split_seed, fractions=fractions),
            seed=split_seed,
            fractions=fractions,
        )
    )

    for attempt in range(1, _ATTEMPTS + 1):
        try:
            dataset = session.exec(select(Dataset).where(Dataset.name == name)).first()
            if dataset is None:
                dataset = Dataset(
                    name=name, task=schema.task, label=schema.label, description=description
                )
                session.add(dataset)
                session.flush()
            else:
                _check_compatible(dataset, schema)
                found = find_version_by_content(session, name=name, sha256=arrays.sha256)
                if found is not None:
                    session.rollback()
                    return found
                if description:
                    dataset.description = description
                    session.add(dataset)
            register_artifact(session, stored=arrays, media_type=ARRAYS_MEDIA_TYPE)
            register_artifact(session, stored=splits, media_type=SPLITS_MEDIA_TYPE)
            highest = session.exec(
                select(func.max(DatasetVersion.version)).where(
                    DatasetVersion.dataset_id == dataset.id
                )
            ).one()
            row = DatasetVersion(
                dataset_id=dataset.id,  # type: ignore[arg-type]
                version=(highest or 0) + 1,
                sha256=arrays.sha256,
                source_sha256=parsed.source_sha256,
                source_format=parsed.source_format,
                source_name=source_name[:256],
                rows=schema.rows,
                data_schema_json=canonical_schema_json(schema),
                splits_sha256=splits.sha256,
                split_seed=split_seed,
                lineage_json=lineage_json,
            )
            session.add(row)
            session.commit()
            session.refresh(row)
            return row
        except IntegrityError as e:
            session.rollback()
            if attempt == _ATTEMPTS:
                raise DatasetConflictError(
                    f"dataset {name!r} was changed by another upload at the same time; try again"
                ) from e
        except BaseException:
            session.rollback()
            raise
    raise AssertionError("unreachable")


def _check_compatible(dataset: Dataset, schema: DatasetSchema) -> None:
    if dataset.task == schema.task and dataset.label == schema.label:
        return
    raise DatasetConflictError(
        f"dataset {dataset.name!r} is a {dataset.task} dataset labelled by {dataset.label!r}; "
        f"this upload is {schema.task} labelled by {schema.label!r}. Add it with label "
        f"{dataset.label!r} and task {dataset.task}, or under another dataset name"
    )
