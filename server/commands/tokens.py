"""``edgefleet tokens``: provisioning tokens that let devices enroll."""

from __future__ import annotations

import re
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json, err, fail

__all__ = ["app", "parse_duration"]

app = typer.Typer(help="Provisioning tokens: scoped to a group and profile, expiring, limited.")

_DURATION = re.compile(r"(\d+)\s*([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """``"24h"`` -> 86400; ``"1d12h"``, ``"90m"``, ``"45s"``, ``"2w"``; a bare number is seconds."""
    compact = text.strip().lower()
    if compact.isdigit():
        return int(compact)
    parts = _DURATION.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact.replace(" ", ""):
        raise ValueError(f"invalid duration {text!r}: use e.g. 30m, 24h, 7d or 1d12h")
    return sum(int(n) * _UNIT_SECONDS[u] for n, u in parts)


def _console() -> Console:
    return Console()


@app.command("create")
def create(
    group: Annotated[
        str | None, typer.Option(help="Static group the devices join on enrollment.")
    ] = None,
    profile: Annotated[str | None, typer.Option(help="The only profile it may enroll.")] = None,
    expires: Annotated[str, typer.Option(help="Lifetime: 30m, 24h, 7d, ...")] = "24h",
    uses: Annotated[int, typer.Option(help="How many devices it may enroll.")] = 1,
    auto_accept: Annotated[
        bool, typer.Option("--auto-accept", help="Accept its devices at once (not pending).")
    ] = False,
    name: Annotated[str, typer.Option(help="What the token is for.")] = "",
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a provisioning token. Its secret is printed once; keep it safe."""
    try:
        seconds = parse_duration(expires)
    except ValueError as e:
        fail(str(e), code=2)
    body = {
        "name": name,
        "group": group,
        "profile": profile,
        "expires_in_seconds": seconds,
        "max_uses": uses,
        "auto_accept": auto_accept,
    }
    with api(server) as client:
        t = client.post("/provisioning-tokens", json=body)
    if as_json:
        emit_json(t)
        return
    scope = ", ".join(
        part
        for part in (
            f"group {t['group']}" if t["group"] else "",
            f"profile {t['profile']}" if t["profile"] else "any profile",
            f"{t['max_uses']} use{'s' if t['max_uses'] != 1 else ''}",
            "auto-accept" if t["auto_accept"] else "devices wait for acceptance",
            f"expires {t['expires_at'][:19].replace('T', ' ')} UTC",
        )
        if part
    )
    err.print(f"token {t['id']}: {scope}")
    err.print("the token is shown once; pass it to `edgefleet-agent enroll --token`:")
    typer.echo(t["token"])


@app.command("list")
def list_tokens(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """List provisioning tokens (never their secrets)."""
    with api(server) as client:
        tokens: list[dict[str, Any]] = client.get("/provisioning-tokens")
    if as_json:
        emit_json(tokens)
        return
    table = Table("id", "name", "state", "group", "profile", "uses", "auto-accept", "expires")
    for t in tokens:
        table.add_row(
            t["id"],
            t["name"] or "-",
            t["state"],
            t["group"] or "-",
            t["profile"] or "any",
            f"{t['uses']}/{t['max_uses']}",
            "yes" if t["auto_accept"] else "no",
            t["expires_at"][:19].replace("T", " "),
        )
    _console().print(table)


@app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(help="Token id (the part after 'efp.').")],
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke a token; devices it already enrolled keep their credentials."""
    with api(server) as client:
        t = client.post(f"/provisioning-tokens/{token_id}/revoke")
    if as_json:
        emit_json(t)
        return
    _console().print(f"token {t['id']}: {t['state']}")
