from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from server.artifacts import ArtifactStore, register_artifact
from server.db import session_scope
from server.errors import ArtifactError, NotFoundError
from server.models import Artifact


def test_content_addressed_and_deduplicated(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    data = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    first = store.put_bytes(data)
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert first.length == len(data)
    assert first.path == tmp_path / "artifacts" / first.sha256[:2] / first.sha256
    assert store.put_stream(io.BytesIO(data)) == first
    with store.open(first.sha256) as f:
        assert f.read() == data
    assert store.verify(first.sha256) == first
    assert not os.access(first.path, os.W_OK) or os.geteuid() == 0  # stored read-only
    assert list((tmp_path / "artifacts" / "tmp").iterdir()) == []


def test_size_limit_while_streaming_leaves_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts", max_bytes=1024)

    class Endless(io.RawIOBase):
        reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
            self.reads += 1
            buffer[: len(buffer)] = b"x" * len(buffer)
            return len(buffer)

    stream = Endless()
    with pytest.raises(ArtifactError, match="limit of 1024"):
        store.put_stream(stream)  # type: ignore[arg-type]
    assert stream.reads == 1  # stopped at the first chunk past the limit
    leftovers = [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()]
    assert leftovers == []


def test_damage_is_detected(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    stored = store.put_bytes(b"model bytes")
    os.chmod(stored.path, 0o644)
    stored.path.write_bytes(b"model bytez")
    with pytest.raises(ArtifactError, match="damaged"):
        store.verify(stored.sha256)


def test_unknown_and_malformed_ids(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(NotFoundError):
        store.open("0" * 64)
    with pytest.raises(NotFoundError, match="not a sha256"):
        store.open("../../etc/passwd")
    assert not store.exists("f" * 64)


@pytest.mark.database
def test_index_rows_are_idempotent(engine: Engine, tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    stored = store.put_bytes(b"bundle")
    for _ in range(2):
        with session_scope(engine) as session:
            register_artifact(session, stored=stored, media_type="application/vnd.edgefleet.bundle")
    with Session(engine) as session:
        rows = session.exec(select(Artifact)).all()
        assert [(r.sha256, r.length) for r in rows] == [(stored.sha256, 6)]
