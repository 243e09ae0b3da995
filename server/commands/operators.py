"""``edgefleet operators`` and ``edgefleet audit``: operator tokens, and who did what.

``operators create | list | revoke`` work directly on the server's database (as
Django's ``createsuperuser`` does), so the first admin token can be made before anyone
can call the API; each change is written to the audit log as ``local:<user>``.
The database is ``--db``, else ``EDGEFLEET_DATABASE_URL``, else the SQLite file in
``--data-dir`` / ``EDGEFLEET_DATA_DIR``. ``audit`` reads ``/api/v1/audit`` (admin token).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlmodel import Session

from server.auth import audit as audit_log
from server.auth import tokens
from server.auth.models import OperatorPublic, Role
from server.commands.client import (
    JsonOption,
    ServerOption,
    api,
    emit_json,
    err,
    fail,
    timestamp,
)
from server.commands.tokens import parse_duration
from server.db import utcnow
from server.errors import ServerError

__all__ = ["app", "audit"]

app = typer.Typer(
    help="Operator tokens (viewer, operator, admin), on the server's database.",
    no_args_is_help=True,
)

DataDirOption = Annotated[
    Path | None,
    typer.Option(help="The server's data dir (its SQLite file). [env: EDGEFLEET_DATA_DIR]"),
]
DbOption = Annotated[
    str | None,
    typer.Option("--db", help="Database URL. [env: EDGEFLEET_DATABASE_URL]"),
]


@contextmanager
def _session(data_dir: Path | None, db: str | None) -> Iterator[Session]:
    """A session on the server's database (migrated first), committed at the end."""
    from pydantic import ValidationError

    from server.db import create_db_engine, migrate, session_scope
    from server.settings import Settings

    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if db is not None:
        overrides["database_url"] = db
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        fail(str(e.errors()[0]["msg"]), code=2)
    try:
        engine = create_db_engine(settings.resolved_database_url)
    except ServerError as e:
        fail(str(e), code=2)
    try:
        migrate(engine)
        with session_scope(engine) as session:
            yield session
    except ServerError as e:
        fail(str(e))
    finally:
        engine.dispose()


def _json(record: OperatorPublic) -> dict[str, Any]:
    data: dict[str, Any] = record.model_dump(mode="json")
    return data


@app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who or what the token is for.")],
    role: Annotated[Role, typer.Option(help="viewer, operator or admin.")],
    expires_days: Annotated[
        float | None, typer.Option(help="Days until it expires (default: until revoked).")
    ] = None,
    data_dir: DataDirOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an operator token. It is printed once (only it, on stdout); keep it safe."""
    actor = audit_log.local_actor()
    now = utcnow()
    with _session(data_dir, db) as session:
        issued = tokens.create_operator(
            session, name=name, role=role, now=now, created_by=actor, expires_days=expires_days
        )
        audit_log.record(
            session,
            actor=actor,
            action="operator.create",
            target=f"operator:{name}",
            detail={"role": role.value, "expires_days": expires_days},
            at=now,
        )
        public = OperatorPublic.of(issued.record, now=now)
    if as_json:
        emit_json({**_json(public), "token": issued.token})
        return
    typer.echo(issued.token)
    err.print(f"operator token {name!r} ({role.value}) created; it is shown only this once")


@app.command("list")
def list_operators(
    data_dir: DataDirOption = None, db: DbOption = None, as_json: JsonOption = False
) -> None:
    """Every operator token: name, role, state; never a secret."""
    now = utcnow()
    with _session(data_dir, db) as session:
        records = [OperatorPublic.of(t, now=now) for t in tokens.list_operators(session)]
    if as_json:
        emit_json([_json(r) for r in records])
        return
    table = Table("name", "role", "state", "token", "created", "expires", "last used")
    for r in records:
        table.add_row(
            r.name,
            r.role.value,
            r.state,
            f"{r.hint}…",
            timestamp(r.created_at.isoformat()),
            timestamp(None if r.expires_at is None else r.expires_at.isoformat()),
            timestamp(None if r.last_used_at is None else r.last_used_at.isoformat()),
        )
    Console().print(table)


@app.command("revoke")
def revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    data_dir: DataDirOption = None,
    db: DbOption = None,
) -> None:
    """Revoke an operator token: every request with it fails from now on."""
    now = utcnow()
    actor = audit_log.local_actor()
    with _session(data_dir, db) as session:
        tokens.revoke_operator(session, name=name, now=now)
        audit_log.record(
            session, actor=actor, action="operator.revoke", target=f"operator:{name}", at=now
        )
    typer.echo(f"{name}: revoked")


def audit(
    actor: Annotated[str | None, typer.Option(help="Only this actor's actions.")] = None,
    action: Annotated[
        str | None, typer.Option(help="An action (rollout.pause) or a prefix (rollout.).")
    ] = None,
    target: Annotated[str | None, typer.Option(help="Only this target (rollout:3).")] = None,
    since: Annotated[str | None, typer.Option(help="Only the last 30m, 24h, 7d, ...")] = None,
    limit: Annotated[int, typer.Option(min=1, max=audit_log.MAX_LIST)] = 100,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """The audit log of operator actions, newest first (needs an admin token)."""
    params: dict[str, Any] = {"limit": limit}
    for key, value in (("actor", actor), ("action", action), ("target", target)):
        if value is not None:
            params[key] = value
    if since is not None:
        try:
            params["since"] = (utcnow() - timedelta(seconds=parse_duration(since))).isoformat()
        except ValueError as e:
            fail(str(e), code=2)
    with api(server) as client:
        entries = client.get("/audit", params=params)
    if as_json:
        emit_json(entries)
        return
    table = Table("at", "actor", "action", "target", "detail")
    for entry in entries:
        table.add_row(
            timestamp(entry["at"]),
            entry["actor"],
            entry["action"],
            entry["target"],
            entry["detail"],
        )
    Console().print(table)
