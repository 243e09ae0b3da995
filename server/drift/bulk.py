"""Bulk statements for ingestion's hot path, run on the session's DBAPI connection.

SQLAlchemy's executemany costs tens of microseconds of Python per row (parameter
processing, insertmanyvalues batching); ingestion writes several rows per report, so
these few statements -- insert-or-ignore, upsert, insert ... RETURNING -- are written
once per table and dialect and run with the driver's own ``execute`` / ``executemany``.

What always holds:

- They run in the session's transaction (its connection), so they commit or roll back
  with everything else the session did.
- Values are bound exactly as SQLAlchemy binds them: each column's own bind processor
  (:class:`server.db.UTCDateTime` and the dialect's datetime storage) is applied, so
  rows written here and rows written through SQLAlchemy are the same rows.
- SQLite (qmark parameters) and PostgreSQL through psycopg 3 (format parameters, bytea
  read in binary) are supported; anything else raises :class:`NotImplementedError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlmodel import Session

__all__ = ["insert_ignore", "insert_returning", "upsert"]

_MAX_PARAMETERS = 30_000
"""Parameters per multi-row statement (SQLite allows 32,766, PostgreSQL 65,535)."""


def _dialect(session: Session) -> str:
    name = session.get_bind().dialect.name
    if name not in ("sqlite", "postgresql"):
        raise NotImplementedError(
            f"bulk statements are written for sqlite and postgresql, not {name}"
        )
    return name


def _processors(session: Session, table: Table, columns: Sequence[str]) -> list[Any]:
    dialect = session.get_bind().dialect
    return [table.c[name].type.dialect_impl(dialect).bind_processor(dialect) for name in columns]


def _bind(rows: Sequence[Sequence[Any]], processors: list[Any]) -> list[tuple[Any, ...]]:
    active = [(i, p) for i, p in enumerate(processors) if p is not None]
    if not active:
        return [tuple(row) for row in rows]
    cache: list[dict[Any, Any]] = [{} for _ in processors]
    out = []
    for row in rows:
        values = list(row)
        for i, process in active:
            value = values[i]
            seen = cache[i]
            bound = seen.get(value, _MISSING)
            if bound is _MISSING:
                bound = seen[value] = process(value)
            values[i] = bound
        out.append(tuple(values))
    return out


_MISSING = object()


def _cursor(session: Session, dialect: str) -> Any:
    raw: Any = session.connection().connection.dbapi_connection
    return raw.cursor(binary=True) if dialect == "postgresql" else raw.cursor()


def _placeholders(dialect: str, count: int) -> str:
    mark = "%s" if dialect == "postgresql" else "?"
    return "(" + ", ".join([mark] * count) + ")"


def _insert_head(table: Table, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "  # noqa: S608 - our names


def insert_ignore(
    session: Session,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    conflict: Sequence[str],
) -> None:
    """Insert ``rows`` (values in ``columns`` order); rows whose ``conflict`` key exists
    are left as they are."""
    if not rows:
        return
    dialect = _dialect(session)
    sql = (
        _insert_head(table, columns)
        + _placeholders(dialect, len(columns))
        + f" ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
    )
    _executemany(session, dialect, sql, _bind(rows, _processors(session, table, columns)))


def upsert(
    session: Session,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    conflict: Sequence[str],
    update: Sequence[str],
) -> None:
    """Insert ``rows``; where the ``conflict`` key exists, set ``update`` to the new values."""
    if not rows:
        return
    dialect = _dialect(session)
    sets = ", ".join(f"{name} = excluded.{name}" for name in update)
    sql = (
        _insert_head(table, columns)
        + _placeholders(dialect, len(columns))
        + f" ON CONFLICT ({', '.join(conflict)}) DO UPDATE SET {sets}"
    )
    _executemany(session, dialect, sql, _bind(rows, _processors(session, table, columns)))


def _executemany(session: Session, dialect: str, sql: str, rows: list[tuple[Any, ...]]) -> None:
    cursor = _cursor(session, dialect)
    try:
        cursor.executemany(sql, rows)
    finally:
        cursor.close()


def insert_returning(
    session: Session,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    conflict: Sequence[str],
    returning: Sequence[str],
    *,
    on_conflict: str = "DO NOTHING",
) -> list[tuple[Any, ...] | None]:
    """Insert ``rows`` (SQLite: in multi-row statements; PostgreSQL: one statement per
    row, pipelined, in order); per row, in order, what ``RETURNING
    returning`` gave for it (None: nothing). ``returning`` starts with ``conflict``,
    and ``conflict`` are the first columns of ``columns``: that is how returned rows
    are matched to the rows given.

    ``on_conflict`` is the clause after ``ON CONFLICT (conflict)``: ``DO NOTHING``
    returns the inserted rows only; a ``DO UPDATE`` returns the conflicting rows too,
    locked for the rest of the transaction.
    """
    width = len(conflict)
    if tuple(columns[:width]) != tuple(conflict) or tuple(returning[:width]) != tuple(conflict):
        raise ValueError("the conflict columns must come first in columns and returning")
    if not rows:
        return []
    dialect = _dialect(session)
    bound = _bind(rows, _processors(session, table, columns))
    index = {row[:width]: i for i, row in enumerate(bound)}
    per_statement = max(1, _MAX_PARAMETERS // len(columns))
    row_sql = _placeholders(dialect, len(columns))
    tail = f" ON CONFLICT ({', '.join(conflict)}) {on_conflict} RETURNING {', '.join(returning)}"
    found: list[tuple[Any, ...] | None] = [None] * len(rows)
    cursor = _cursor(session, dialect)
    if dialect == "postgresql":  # one short statement, pipelined: psycopg parses it once
        try:
            cursor.executemany(_insert_head(table, columns) + row_sql + tail, bound, returning=True)
            while True:
                for values in cursor.fetchall():
                    found[index[tuple(values[:width])]] = tuple(values)
                if not cursor.nextset():
                    break
        finally:
            cursor.close()
        return found
    try:
        for start in range(0, len(bound), per_statement):
            chunk = bound[start : start + per_statement]
            sql = _insert_head(table, columns) + ", ".join([row_sql] * len(chunk)) + tail
            cursor.execute(sql, [value for row in chunk for value in row])
            for values in cursor.fetchall():
                found[index[tuple(values[:width])]] = tuple(values)
    finally:
        cursor.close()
    return found
