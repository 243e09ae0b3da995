"""Database fixtures: every database test runs on SQLite, and also on the database named by
``EDGEFLEET_TEST_DATABASE_URL`` when it is set (``.ci/run`` points it at PostgreSQL)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import MetaData
from sqlalchemy.engine import Engine
from sqlmodel import Session

from server.db import create_db_engine, migrate
from server.models import Dataset, DatasetVersion

EXTERNAL_URL = os.environ.get("EDGEFLEET_TEST_DATABASE_URL")
DATABASES = ["sqlite"] + (["external"] if EXTERNAL_URL else [])
PRODUCTION_DATABASE = DATABASES[-1]
"""For the slowest end-to-end tests, whose database-specific parts other tests cover on
both: PostgreSQL when the run has it, else SQLite. Use with
``@pytest.mark.parametrize("db_url", [PRODUCTION_DATABASE], indirect=True)``."""


def database_url(kind: str, tmp_path: Path, schema: str | None) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'edgefleet-test.db'}"
    assert EXTERNAL_URL is not None
    if schema is None:
        return EXTERNAL_URL
    separator = "&" if "?" in EXTERNAL_URL else "?"
    return f"{EXTERNAL_URL}{separator}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def private_schema(prefix: str) -> Iterator[str | None]:
    """A PostgreSQL schema ``<prefix>_<pid>`` of this test process's own, made empty and
    dropped afterwards, so concurrent runs never collide (None: no PostgreSQL)."""
    if not EXTERNAL_URL or not EXTERNAL_URL.startswith("postgresql"):
        yield None
        return
    from sqlalchemy import text

    schema = f"{prefix}_{os.getpid()}"
    engine = create_db_engine(EXTERNAL_URL)
    with engine.begin() as connection:
        connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield schema
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        engine.dispose()


@pytest.fixture(scope="session")
def external_schema() -> Iterator[str | None]:
    """A PostgreSQL schema of this test process's own, so concurrent runs never collide."""
    with private_schema("edgefleet_test") as schema:
        yield schema


def drop_everything(engine: Engine) -> None:
    metadata = MetaData()
    metadata.reflect(engine)
    metadata.drop_all(engine)


@pytest.fixture(params=DATABASES)
def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, external_schema: str | None
) -> Iterator[str]:
    """A URL to an empty database (the external one is wiped before and after)."""
    url = database_url(request.param, tmp_path, external_schema)
    engine = create_db_engine(url)
    drop_everything(engine)
    engine.dispose()
    yield url
    engine = create_db_engine(url)
    drop_everything(engine)
    engine.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to the newest schema."""
    engine = create_db_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


def add_dataset_row(session: Session, *, name: str = "digits", rows: int = 1797) -> DatasetVersion:
    """A dataset with one version, as rows only (for tests of what hangs off a version)."""
    dataset = Dataset(name=name, task="classification", label="y")
    session.add(dataset)
    session.flush()
    version = DatasetVersion(
        dataset_id=dataset.id,  # type: ignore[arg-type]
        version=1,
        sha256="a" * 64,
        source_sha256="b" * 64,
        source_format="builtin",
        rows=rows,
        data_schema_json="{}",
        splits_sha256="c" * 64,
        split_seed=0,
    )
    session.add(version)
    session.flush()
    return version
