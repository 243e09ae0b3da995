"""Fixtures for the fault tests: a database for a server that dies, a broker that dies.

- ``fault_db_url``: one database per test -- PostgreSQL (a schema of this test process's
  own) when ``EDGEFLEET_TEST_DATABASE_URL`` is set, else a SQLite file -- wiped before.
- ``persistent_broker``: a Mosquitto process of the test's own with persistence on
  (``tests/broker/mosquitto.conf.template``: it saves after every change), which the test
  may SIGKILL and start again on the same port with the same data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.db import create_db_engine
from tests.conftest import MosquittoProcess
from tests.server.conftest import EXTERNAL_URL, database_url, drop_everything, private_schema


@pytest.fixture(scope="session")
def fault_schema() -> Iterator[str | None]:
    """A PostgreSQL schema of this test process's own (not the one tests/server uses)."""
    with private_schema("edgefleet_faults") as schema:
        yield schema


@pytest.fixture
def fault_db_url(tmp_path: Path, fault_schema: str | None) -> str:
    url = database_url("external" if EXTERNAL_URL else "sqlite", tmp_path, fault_schema)
    engine = create_db_engine(url)
    drop_everything(engine)
    engine.dispose()
    return url


@pytest.fixture
def persistent_broker(mosquitto_factory: Callable[[], MosquittoProcess]) -> MosquittoProcess:
    broker = mosquitto_factory()
    conf = broker.conf_file.read_text()
    assert "persistence true" in conf and "autosave_on_changes true" in conf, conf
    return broker
