"""``edgefleet keys``: the fleet's key hierarchy -- offline root, online keys, keyring.

Every command works on files, not through the API: the keys folder of the server
(``--keys-dir``, default ``$EDGEFLEET_DATA_DIR/keys``) and, for each step that signs a
new keyring, the offline root key the operator brings (``--root-key PATH``, e.g. on a
USB stick). A running server picks the new keyring up from its keys folder by itself
(:class:`server.keys.KeyringWatcher`) and re-signs every device's desired state with it.

``init`` is the development shortcut (root key kept in the keys folder, as ``edgefleet
demo`` and ``edgefleet server`` in dev mode do); production starts with ``init-root``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from server.commands.client import JsonOption, emit_json, err, fail
from server.errors import ServerError
from server.keys import (
    KeyringChange,
    add_online_key,
    expires_soon,
    init_keys,
    init_root,
    load_root_key,
    read_keyring,
    renew_keyring,
    revoke_online_key,
    rotate_online_key,
)

__all__ = ["app"]

app = typer.Typer(
    help="The fleet's signing keys: an offline root, online keys, the root-signed keyring.",
    no_args_is_help=True,
)


def _default_keys_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_DATA_DIR", "edgefleet-data")) / "keys"


KeysDirOption = Annotated[
    Path | None,
    typer.Option(
        "--keys-dir",
        help="The server's keys folder. [default: $EDGEFLEET_DATA_DIR/keys, edgefleet-data/keys]",
    ),
]
RootKeyOption = Annotated[
    Path,
    typer.Option("--root-key", help="The offline root key file (root.key from `keys init-root`)."),
]
ExpiresOption = Annotated[
    int, typer.Option("--expires-days", min=1, max=3650, help="The new keyring's lifetime.")
]
DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="The server's database, for the audit log and keyring history. [env: "
        "EDGEFLEET_DATABASE_URL; default: edgefleet.db beside the keys folder, if present]",
    ),
]
ThresholdOption = Annotated[
    int | None,
    typer.Option(
        min=1, max=8, help="Distinct online keys a desired state needs (default: unchanged)."
    ),
]


def _now() -> datetime:
    return datetime.now(UTC)


def _run(step: Callable[[], Any]) -> Any:
    try:
        return step()
    except ServerError as e:
        fail(str(e))


def _keyring_info(keys_dir: Path, now: datetime) -> dict[str, Any]:
    if not (keys_dir / "root.pub").exists():
        fail(
            f"no fleet keys in {keys_dir}: create them with `edgefleet keys init-root` "
            "(production) or `edgefleet keys init` (development)"
        )
    current = _run(lambda: read_keyring(keys_dir))
    if current is None:
        fail(f"there is no keyring in {keys_dir}: create one with `edgefleet keys add-online`")
    keyring, _ = current
    root_pub = (keys_dir / "root.pub").read_text().strip()
    here = {p.stem for p in (keys_dir / "online").glob("*.key")}
    return {
        "keys_dir": str(keys_dir),
        "root_public_key": root_pub,
        "root_key_here": (keys_dir / "root.key").exists(),
        "version": keyring.version,
        "issued_at": keyring.issued_at.isoformat(),
        "expires_at": keyring.expires_at.isoformat(),
        "expired": now >= keyring.expires_at,
        "expires_soon": expires_soon(keyring, now=now),
        "threshold": keyring.threshold,
        "online_keys": [
            {"keyid": k.keyid, "public_key": k.public_key, "private_key_here": k.keyid in here}
            for k in keyring.keys
        ],
    }


def _database_url(keys_dir: Path, db: str | None) -> str | None:
    """The server's database when one is configured (or its SQLite file exists), else None."""
    if db or os.environ.get("EDGEFLEET_DATABASE_URL"):
        return db or os.environ["EDGEFLEET_DATABASE_URL"]
    sqlite = keys_dir.parent / "edgefleet.db"
    return f"sqlite:///{sqlite.resolve()}" if sqlite.exists() else None


def _audit(
    keys_dir: Path, db: str | None, action: str, target: str, detail: dict[str, Any]
) -> None:
    """Record the step in the audit log (and a new keyring in the keyring history).

    The keyring is written already; a database that cannot be reached only warns, so the
    audit is never the reason a key step fails."""
    url = _database_url(keys_dir, db)
    if url is None:
        return
    from sqlalchemy.exc import SQLAlchemyError

    from server.auth import audit
    from server.db import create_db_engine, migrate, session_scope
    from server.models import KeyringRecord

    engine = None
    try:
        engine = create_db_engine(url)
        migrate(engine)
        with session_scope(engine) as session:
            audit.record(
                session, actor=audit.local_actor(), action=action, target=target, detail=detail
            )
            current = read_keyring(keys_dir)
            if current is not None and session.get(KeyringRecord, current[0].version) is None:
                keyring, envelope = current
                session.add(
                    KeyringRecord(
                        version=keyring.version,
                        issued_at=keyring.issued_at,
                        expires_at=keyring.expires_at,
                        envelope=envelope.to_bytes().decode("ascii"),
                    )
                )
    except (SQLAlchemyError, ServerError) as e:
        err.print(f"[yellow]warning:[/] not recorded in the audit log ({url.split('://')[0]}): {e}")
    finally:
        if engine is not None:
            engine.dispose()


def _finish(
    change: KeyringChange, keys_dir: Path, db: str | None, as_json: bool, what: str, action: str
) -> None:
    info = {
        "keys_dir": str(keys_dir),
        "version": change.keyring.version,
        "expires_at": change.keyring.expires_at.isoformat(),
        "threshold": change.keyring.threshold,
        "online_keyids": [k.keyid for k in change.keyring.keys],
        "added": list(change.added),
        "removed": list(change.removed),
    }
    _audit(
        keys_dir,
        db,
        action,
        f"keyring:v{change.keyring.version}",
        {k: info[k] for k in ("added", "removed", "threshold", "expires_at")},
    )
    if as_json:
        emit_json(info)
        return
    typer.echo(f"{what}: keyring v{info['version']} written to {keys_dir / 'keyring.json'}")
    for keyid in change.added:
        typer.echo(f"  + {keyid}")
    for keyid in change.removed:
        typer.echo(f"  - {keyid}")
    typer.echo(
        f"  expires {info['expires_at']}, threshold {info['threshold']} of "
        f"{len(change.keyring.keys)}"
    )
    err.print(
        "A running server uses it within seconds and re-signs every device's desired state; "
        "put the root key back offline."
    )


@app.command("init")
def keys_init(
    keys_dir: KeysDirOption = None,
    lifetime_days: Annotated[int, typer.Option(min=1, help="Keyring lifetime in days.")] = 90,
    as_json: JsonOption = False,
) -> None:
    """Development: create the root key, an online key and a keyring, all in the keys folder
    (only what is missing). For production use `init-root` on offline media instead."""
    folder = keys_dir or _default_keys_dir()
    keys = _run(lambda: init_keys(folder, now=_now(), lifetime=timedelta(days=lifetime_days)))
    info = {
        "keys_dir": str(folder),
        "root_keyid": keys.root_public.keyid,
        "root_public_key": keys.root_public.to_base64(),
        "keyring_version": keys.keyring.version,
        "keyring_expires_at": keys.keyring.expires_at.isoformat(),
        "online_keyids": [k.keyid for k in keys.online],
    }
    if as_json:
        emit_json(info)
        return
    for name, value in info.items():
        typer.echo(f"{name:20} {value}")
    if (folder / "root.key").exists():
        err.print(
            "[yellow]root.key[/] signs keyrings only: move it offline; the server runs without it."
        )


@app.command("init-root")
def keys_init_root(
    out: Annotated[
        Path,
        typer.Option(
            "--out", help="Folder for root.key and root.pub: offline media, never the server."
        ),
    ],
    keys_dir: KeysDirOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create the fleet's root key in --out; the keys folder gets root.pub only."""
    folder = keys_dir or _default_keys_dir()
    if out.resolve() == folder.resolve():
        fail("--out must not be the server's keys folder: the root key belongs offline", code=2)
    public = _run(lambda: init_root(out, folder))
    _audit(
        folder, db, "key.init_root", f"root:{public.keyid}", {"root_public_key": public.to_base64()}
    )
    info = {
        "root_key": str(out / "root.key"),
        "root_public_key": public.to_base64(),
        "root_keyid": public.keyid,
        "keys_dir": str(folder),
    }
    if as_json:
        emit_json(info)
        return
    typer.echo(f"root key     {info['root_key']}  (keep it offline)")
    typer.echo(f"root public  {info['root_public_key']}  (bake it into device images)")
    typer.echo(f"copied to    {folder / 'root.pub'}")
    err.print(
        "Next: `edgefleet keys add-online --root-key "
        f"{out / 'root.key'}` creates the first online key and keyring."
    )


def _change_keyring(
    root_key: Path,
    keys_dir: Path | None,
    expires_days: int,
    db: str | None,
    as_json: bool,
    *,
    what: str,
    action: str,
    step: Callable[[Path, Any, datetime, timedelta], KeyringChange],
) -> None:
    """The steps every keyring change shares: the keys folder, the offline root key checked
    against its ``root.pub``, the change itself (``step(folder, root, now, lifetime)``),
    then the audit row and the report."""
    folder = keys_dir or _default_keys_dir()
    root = _run(lambda: load_root_key(root_key, folder))
    change = _run(lambda: step(folder, root, _now(), timedelta(days=expires_days)))
    _finish(change, folder, db, as_json, what, action)


@app.command("add-online")
def keys_add_online(
    root_key: RootKeyOption,
    keys_dir: KeysDirOption = None,
    expires_days: ExpiresOption = 90,
    threshold: ThresholdOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an online signing key and a root-signed keyring listing it beside the others."""
    _change_keyring(
        root_key,
        keys_dir,
        expires_days,
        db,
        as_json,
        what="online key added",
        action="key.add",
        step=lambda folder, root, now, lifetime: add_online_key(
            folder, root=root, now=now, lifetime=lifetime, threshold=threshold
        ),
    )


@app.command("rotate-online")
def keys_rotate_online(
    root_key: RootKeyOption,
    old: Annotated[
        str | None,
        typer.Option(help="Key id (or a prefix of 8+ digits) to retire; needed with several."),
    ] = None,
    keys_dir: KeysDirOption = None,
    expires_days: ExpiresOption = 90,
    threshold: ThresholdOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Replace an online key: a new key in, the old one out, the keyring one version up.

    Devices follow at their next desired state; one that accepted a huge manifest version
    from the old key starts its version floor again from the new key (fast-forward recovery).
    """
    _change_keyring(
        root_key,
        keys_dir,
        expires_days,
        db,
        as_json,
        what="online key rotated",
        action="key.rotate",
        step=lambda folder, root, now, lifetime: rotate_online_key(
            folder, root=root, now=now, lifetime=lifetime, old_keyid=old, threshold=threshold
        ),
    )


@app.command("revoke")
def keys_revoke(
    keyid: Annotated[str, typer.Argument(help="Key id, or a prefix of 8+ hex digits.")],
    root_key: RootKeyOption,
    keys_dir: KeysDirOption = None,
    expires_days: ExpiresOption = 90,
    threshold: ThresholdOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """A keyring without KEYID: once devices hold it, nothing that key signs is accepted."""
    _change_keyring(
        root_key,
        keys_dir,
        expires_days,
        db,
        as_json,
        what="online key revoked",
        action="key.revoke",
        step=lambda folder, root, now, lifetime: revoke_online_key(
            folder, keyid, root=root, now=now, lifetime=lifetime, threshold=threshold
        ),
    )


@app.command("renew")
def keys_renew(
    root_key: RootKeyOption,
    keys_dir: KeysDirOption = None,
    expires_days: ExpiresOption = 90,
    threshold: ThresholdOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Re-sign the keyring with the same online keys and a new expiry (or threshold)."""
    _change_keyring(
        root_key,
        keys_dir,
        expires_days,
        db,
        as_json,
        what="keyring renewed",
        action="key.renew",
        step=lambda folder, root, now, lifetime: renew_keyring(
            folder, root=root, now=now, lifetime=lifetime, threshold=threshold
        ),
    )


@app.command("list")
def keys_list(keys_dir: KeysDirOption = None, as_json: JsonOption = False) -> None:
    """The online keys the current keyring lists, and whether their private half is here."""
    folder = keys_dir or _default_keys_dir()
    info = _keyring_info(folder, _now())
    if as_json:
        emit_json(info["online_keys"])
        return
    for key in info["online_keys"]:
        where = "private key here" if key["private_key_here"] else "private key elsewhere"
        typer.echo(f"{key['keyid']}  online  {where}")


@app.command("show")
def keys_show(keys_dir: KeysDirOption = None, as_json: JsonOption = False) -> None:
    """The current keyring: version, expiry, threshold, keys; warns when it expires soon."""
    folder = keys_dir or _default_keys_dir()
    now = _now()
    info = _keyring_info(folder, now)
    if info["expired"]:
        err.print(
            f"[red]warning:[/] keyring v{info['version']} expired at {info['expires_at']}: "
            "devices refuse every desired state until `edgefleet keys renew`"
        )
    elif info["expires_soon"]:
        err.print(
            f"[yellow]warning:[/] keyring v{info['version']} expires at {info['expires_at']}: "
            "renew it with `edgefleet keys renew --root-key PATH`"
        )
    if info["root_key_here"]:
        err.print(
            f"[yellow]note:[/] {folder / 'root.key'} is on this machine (development "
            "layout); in production the root key is kept offline"
        )
    if as_json:
        emit_json(info)
        return
    typer.echo(f"keyring      v{info['version']} ({folder / 'keyring.json'})")
    typer.echo(f"issued       {info['issued_at']}")
    typer.echo(f"expires      {info['expires_at']}")
    typer.echo(f"threshold    {info['threshold']} of {len(info['online_keys'])}")
    typer.echo(f"root         {info['root_public_key']}")
    for key in info["online_keys"]:
        here = "" if key["private_key_here"] else "  (private key elsewhere)"
        typer.echo(f"online key   {key['keyid']}{here}")
