"""Dataset versions in the database and the store, on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, func, select

from server.artifacts import ArtifactStore
from server.datasets import service
from server.datasets.ingest import (
    DatasetConflictError,
    DatasetDamagedError,
    DatasetInvalidError,
    DatasetNotFoundError,
    ParsedDataset,
    from_arrays,
)
from server.errors import ConflictError, NotFoundError
from server.models import Artifact, Dataset, DatasetVersion

pytestmark = pytest.mark.database


def make_parsed(seed: int = 0, *, rows: int = 60, regression: bool = False) -> ParsedDataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 3))
    labels = x[:, 0] * 2.5 if regression else np.array(["a", "b", "c"] * (rows // 3))
    return from_arrays(
        x,
        labels,
        label="target",
        feature_names=["f0", "f1", "f2"],
        task="regression" if regression else None,
        source_format="csv",
    )


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def session(engine: Engine) -> Session:
    with Session(engine) as session:
        yield session  # type: ignore[misc]


def count(session: Session, table: type) -> int:
    return session.exec(select(func.count()).select_from(table)).one()


def test_versions_count_up_and_are_content_addressed(
    session: Session, store: ArtifactStore
) -> None:
    first = service.add_dataset_version(
        session, store=store, name="sensors", parsed=make_parsed(0), description="three sensors"
    )
    second = service.add_dataset_version(
        session, store=store, name="sensors", parsed=make_parsed(1), source_name="more.csv"
    )
    assert (first.version, second.version) == (1, 2)
    assert first.sha256 == make_parsed(0).content_sha256
    assert store.exists(first.sha256) and store.exists(first.splits_sha256)
    assert second.source_name == "more.csv" and second.source_format == "csv"
    dataset = service.get_dataset(session, name="sensors")
    assert (dataset.task, dataset.label, dataset.description) == (
        "classification",
        "target",
        "three sensors",
    )
    assert [v.version for v in service.list_versions(session, dataset=dataset)] == [1, 2]
    media = {a.sha256: a.media_type for a in session.exec(select(Artifact))}
    assert media[first.sha256] == service.ARRAYS_MEDIA_TYPE
    assert media[first.splits_sha256] == service.SPLITS_MEDIA_TYPE
    other = service.add_dataset_version(session, store=store, name="other", parsed=make_parsed(0))
    assert other.version == 1 and other.sha256 == first.sha256  # same content, another dataset


def test_the_same_content_returns_the_existing_version(
    session: Session, store: ArtifactStore
) -> None:
    first = service.add_dataset_version(session, store=store, name="d", parsed=make_parsed(0))
    again = service.add_dataset_version(
        session, store=store, name="d", parsed=make_parsed(0), split_seed=99
    )
    assert again.id == first.id and again.split_seed == 0
    assert count(session, DatasetVersion) == 1
    found = service.find_version_by_content(session, name="d", sha256=first.sha256)
    assert found is not None and found.id == first.id


def test_another_task_or_label_is_a_conflict(session: Session, store: ArtifactStore) -> None:
    service.add_dataset_version(session, store=store, name="d", parsed=make_parsed(0))
    with pytest.raises(DatasetConflictError, match="classification dataset labelled by 'target'"):
        service.add_dataset_version(
            session, store=store, name="d", parsed=make_parsed(0, regression=True)
        )
    relabelled = from_arrays(
        np.ones((30, 2)), np.arange(30) % 2, label="other", feature_names=["a", "b"]
    )
    with pytest.raises(ConflictError) as excinfo:
        service.add_dataset_version(session, store=store, name="d", parsed=relabelled)
    assert excinfo.value.status_code == 409
    assert count(session, DatasetVersion) == 1


def test_bad_names_fractions_and_lineage_are_refused(
    session: Session, store: ArtifactStore
) -> None:
    parsed = make_parsed(0)
    for name in ["", "-leading", "has space", "a@1", "x" * 129]:
        with pytest.raises(DatasetInvalidError, match="invalid dataset name"):
            service.add_dataset_version(session, store=store, name=name, parsed=parsed)
    with pytest.raises(DatasetInvalidError, match="add up to 1"):
        service.add_dataset_version(
            session, store=store, name="d", parsed=parsed, fractions=(0.5, 0.2, 0.2)
        )
    with pytest.raises(DatasetInvalidError, match="plain JSON"):
        service.add_dataset_version(
            session, store=store, name="d", parsed=parsed, lineage={"when": object()}
        )
    assert count(session, Dataset) == 0


def test_resolve_version(session: Session, store: ArtifactStore) -> None:
    service.add_dataset_version(session, store=store, name="d", parsed=make_parsed(0))
    service.add_dataset_version(session, store=store, name="d", parsed=make_parsed(1))
    assert service.resolve_version(session, "d").version == 2
    assert service.resolve_version(session, "d@1").version == 1
    assert service.resolve_version(session, "d@latest").version == 2
    with pytest.raises(NotFoundError, match="no dataset named 'nope'"):
        service.resolve_version(session, "nope@1")
    with pytest.raises(DatasetNotFoundError, match="no version 7; it has versions 1 to 2"):
        service.resolve_version(session, "d@7")
    with pytest.raises(DatasetInvalidError, match="neither a number nor 'latest'"):
        service.resolve_version(session, "d@v1")


def test_load_applies_seeded_stratified_splits(session: Session, store: ArtifactStore) -> None:
    parsed = make_parsed(0, rows=300)
    row = service.add_dataset_version(session, store=store, name="d", parsed=parsed, split_seed=7)
    loaded = service.load_dataset_version(session, store=store, dataset_version_id=row.id)
    assert (loaded.dataset_name, loaded.version, loaded.sha256) == ("d", 1, row.sha256)
    assert loaded.schema == parsed.schema
    assert (len(loaded.x_train), len(loaded.x_val), len(loaded.x_test)) == (210, 45, 45)
    for y in (loaded.y_train, loaded.y_val, loaded.y_test):
        assert np.bincount(y).tolist() == [len(y) // 3] * 3  # stratified
    rebuilt = np.concatenate([loaded.x_train, loaded.x_val, loaded.x_test])
    assert sorted(map(tuple, rebuilt.tolist())) == sorted(map(tuple, parsed.x.tolist()))
    assert service.split_sizes(store=store, dataset_version=row) == {
        "train": 210,
        "validation": 45,
        "test": 45,
    }
    # the same seed gives the same splits file; another seed another one
    same = service.split_indices(parsed.y, task="classification", seed=7)
    other = service.split_indices(parsed.y, task="classification", seed=8)
    assert np.array_equal(
        same["test"], service.split_indices(parsed.y, task="classification", seed=7)["test"]
    )
    assert not np.array_equal(same["test"], other["test"])


def test_regression_versions_load_float_targets(session: Session, store: ArtifactStore) -> None:
    parsed = make_parsed(0, rows=100, regression=True)
    row = service.add_dataset_version(session, store=store, name="r", parsed=parsed)
    loaded = service.load_dataset_version(session, store=store, dataset_version_id=row.id)
    assert loaded.y_train.dtype == np.float32 and loaded.n_classes is None
    assert len(loaded.y_train) + len(loaded.y_val) + len(loaded.y_test) == 100


def test_damaged_files_are_detected_on_load(session: Session, store: ArtifactStore) -> None:
    row = service.add_dataset_version(session, store=store, name="d", parsed=make_parsed(0))
    path = store.path(row.sha256)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetDamagedError, match="damaged") as excinfo:
        service.load_dataset_version(session, store=store, dataset_version_id=row.id)
    assert excinfo.value.status_code == 500
    store.path(row.splits_sha256).unlink()
    with pytest.raises(DatasetDamagedError, match="missing"):
        service.split_sizes(store=store, dataset_version=row)
    with pytest.raises(DatasetNotFoundError):
        service.load_dataset_version(session, store=store, dataset_version_id=row.id + 100)


def test_a_failing_store_write_leaves_nothing(
    session: Session, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_put = store.put_bytes
    calls = []

    def put_then_fail(data: bytes):  # type: ignore[no-untyped-def]
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError("disk full")
        return real_put(data)

    monkeypatch.setattr(store, "put_bytes", put_then_fail)
    with pytest.raises(OSError, match="disk full"):
        service.add_dataset_version(session, store=store, name="d", parsed=make_parsed(0))
    assert len(calls) == 2
    assert (
        count(session, Dataset) == count(session, DatasetVersion) == count(session, Artifact) == 0
    )
    with pytest.raises(DatasetNotFoundError):
        service.resolve_version(session, "d")


def test_a_failing_database_step_leaves_no_rows(
    session: Session, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_commit = session.commit

    def commit_fails() -> None:
        raise RuntimeError("connection lost")

    monkeypatch.setattr(session, "commit", commit_fails)
    with pytest.raises(RuntimeError, match="connection lost"):
        service.add_dataset_version(session, store=store, name="d", parsed=make_parsed(0))
    monkeypatch.setattr(session, "commit", real_commit)
    assert (
        count(session, Dataset) == count(session, DatasetVersion) == count(session, Artifact) == 0
    )
    row = service.add_dataset_version(session, store=store, name="d", parsed=make_parsed(0))
    assert row.version == 1  # the files already stored are simply reused


def test_list_datasets_by_name(session: Session, store: ArtifactStore) -> None:
    for name in ["zeta", "alpha"]:
        service.add_dataset_version(session, store=store, name=name, parsed=make_parsed(0))
    assert [d.name for d in service.list_datasets(session)] == ["alpha", "zeta"]


@pytest.mark.parametrize("fractions", [(0.8, 0.2, 0.0), (0.6, 0.2, 0.2)])
def test_split_indices_partition_every_row(fractions: tuple[float, float, float]) -> None:
    y = np.array([0] * 5 + [1] * 50 + [2] * 7)
    splits = service.split_indices(y, task="classification", seed=0, fractions=fractions)
    everything = np.concatenate(list(splits.values()))
    assert sorted(everything.tolist()) == list(range(len(y)))
    for rows in splits.values():
        assert np.all(np.diff(rows) > 0)
    assert set(y[splits["train"]].tolist()) == {0, 1, 2}
    tiny = service.split_indices(
        np.array([0, 0, 1, 1]), task="classification", seed=0, fractions=(0.4, 0.3, 0.3)
    )
    assert [len(tiny[name]) for name in service.SPLIT_NAMES] == [2, 0, 2]  # one row each kept
