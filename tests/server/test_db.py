from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select

import server.models  # noqa: F401  (tables on the metadata)
from server.db import alembic_config, create_db_engine, migrate, session_scope
from server.errors import ConfigurationError
from server.models import Artifact

pytestmark = pytest.mark.database


def test_migrations_build_exactly_the_models_schema(db_url: str) -> None:
    engine = create_db_engine(db_url)
    migrate(engine)
    assert {"artifacts", "keyrings", "alembic_version"} <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, SQLModel.metadata) == []
    migrate(engine)  # idempotent at every start
    engine.dispose()


def test_downgrade_to_base_and_up_again(db_url: str) -> None:
    from alembic import command

    engine = create_db_engine(db_url)
    migrate(engine)
    command.downgrade(alembic_config(engine), "base")
    assert "artifacts" not in inspect(engine).get_table_names()
    migrate(engine)
    assert "artifacts" in inspect(engine).get_table_names()
    engine.dispose()


def test_processes_starting_together_on_an_empty_postgresql_migrate_one_by_one(
    db_url: str,
) -> None:
    """API replicas and ingest workers started at once all migrate at their start; on
    PostgreSQL an advisory lock lets one process upgrade while the others wait, then find
    the schema current -- none fails on a table another one is creating."""
    if not db_url.startswith("postgresql"):
        pytest.skip("PostgreSQL's advisory lock; SQLite serves one server process")
    import subprocess
    import sys

    code = (
        "import sys; from server.db import create_db_engine, migrate; "
        "migrate(create_db_engine(sys.argv[1]))"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, db_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], "\n".join(outputs)
    engine = create_db_engine(db_url)
    assert "artifacts" in inspect(engine).get_table_names()
    engine.dispose()


def test_timestamps_come_back_aware_and_in_utc(engine: Engine) -> None:
    berlin = timezone(timedelta(hours=1))
    moment = datetime(2026, 11, 29, 13, 0, 0, 123456, tzinfo=berlin)
    with session_scope(engine) as session:
        session.add(Artifact(sha256="a" * 64, length=3, media_type="x", created_at=moment))
    with Session(engine) as session:
        row = session.exec(select(Artifact)).one()
        assert row.created_at == moment
        assert row.created_at.tzinfo is not None
        assert row.created_at.utcoffset() == timedelta(0)


def test_naive_timestamps_are_refused(engine: Engine) -> None:
    with pytest.raises(Exception, match="naive"), session_scope(engine) as session:
        session.add(
            Artifact(sha256="b" * 64, length=3, media_type="x", created_at=datetime(2026, 1, 1))
        )


def test_session_scope_rolls_back_on_error(engine: Engine) -> None:
    with pytest.raises(RuntimeError), session_scope(engine) as session:
        session.add(
            Artifact(sha256="c" * 64, length=1, media_type="x", created_at=datetime.now(UTC))
        )
        session.flush()
        raise RuntimeError("boom")
    with Session(engine) as session:
        assert session.exec(select(Artifact)).all() == []


def test_bad_urls_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="cannot use database URL"):
        create_db_engine("nosuchdriver://user:secret@host/db")
    try:
        create_db_engine("nosuchdriver://user:secret@host/db")
    except ConfigurationError as e:
        assert "secret" not in str(e)
