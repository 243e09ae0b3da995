"""``edgefleet groups``: static groups (explicit members) and dynamic ones (a selector)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json, fail

__all__ = ["app"]

app = typer.Typer(help="Device groups: static (explicit members) or dynamic (a selector).")

NameArg = Annotated[str, typer.Argument(help="Group name.")]
DevicesArg = Annotated[list[str], typer.Argument(help="Device ids.")]


def _console() -> Console:
    return Console()


def _print_group(g: dict[str, Any]) -> None:
    console = _console()
    rule = f"selector {g['selector']}" if g["kind"] == "dynamic" else "explicit members"
    window = g["maintenance_window"] or "none"
    console.print(f"[bold]{g['name']}[/] {g['kind']} · {rule} · maintenance window {window}")
    if g.get("description"):
        console.print(f"  {g['description']}")
    console.print(f"  members ({len(g['members'])}): {', '.join(g['members']) or '-'}")
    if g["unaccepted_matches"]:
        console.print(
            f"  not accepted yet ({len(g['unaccepted_matches'])}): "
            + ", ".join(g["unaccepted_matches"])
        )


@app.command("create")
def create(
    name: NameArg,
    selector: Annotated[
        str | None,
        typer.Option(help="Makes it dynamic, e.g. 'profile=edge-arm64-litert and site=berlin'."),
    ] = None,
    maintenance_window: Annotated[
        str | None, typer.Option(help="HH:MM-HH:MM in UTC, e.g. 02:00-04:00.")
    ] = None,
    description: Annotated[str, typer.Option(help="What the group is for.")] = "",
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a group: static, or dynamic when --selector is given."""
    body = {
        "name": name,
        "selector": selector,
        "maintenance_window": maintenance_window,
        "description": description,
    }
    with api(server) as client:
        g = client.post("/groups", json=body)
    if as_json:
        emit_json(g)
        return
    _print_group(g)


@app.command("update")
def update(
    name: NameArg,
    selector: Annotated[str | None, typer.Option(help="New selector (dynamic groups).")] = None,
    maintenance_window: Annotated[
        str | None, typer.Option(help="HH:MM-HH:MM in UTC, or 'none' to remove it.")
    ] = None,
    description: Annotated[str | None, typer.Option(help="New description.")] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a group's selector, maintenance window or description."""
    body: dict[str, Any] = {}
    if selector is not None:
        body["selector"] = selector
    if maintenance_window is not None:
        body["maintenance_window"] = (
            None if maintenance_window.lower() == "none" else maintenance_window
        )
    if description is not None:
        body["description"] = description
    if not body:
        fail("nothing to change: give --selector, --maintenance-window or --description", code=2)
    with api(server) as client:
        g = client.request("PATCH", f"/groups/{name}", json=body)
    if as_json:
        emit_json(g)
        return
    _print_group(g)


@app.command("add")
def add(
    name: NameArg, devices: DevicesArg, server: ServerOption = None, as_json: JsonOption = False
) -> None:
    """Add devices to a static group (all or none)."""
    with api(server) as client:
        g = client.post(f"/groups/{name}/members", json={"device_ids": devices})
    if as_json:
        emit_json(g)
        return
    _print_group(g)


@app.command("remove")
def remove(
    name: NameArg, devices: DevicesArg, server: ServerOption = None, as_json: JsonOption = False
) -> None:
    """Remove devices from a static group (all or none)."""
    with api(server) as client:
        g = client.post(f"/groups/{name}/members/remove", json={"device_ids": devices})
    if as_json:
        emit_json(g)
        return
    _print_group(g)


@app.command("list")
def list_groups(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """List groups with their rule and how many accepted devices they hold now."""
    with api(server) as client:
        groups = client.get("/groups")
    if as_json:
        emit_json(groups)
        return
    table = Table("group", "kind", "rule", "members", "maintenance window")
    for g in groups:
        table.add_row(
            g["name"],
            g["kind"],
            g["selector"] or "explicit",
            str(g["member_count"]),
            g["maintenance_window"] or "-",
        )
    _console().print(table)


@app.command("show")
def show(name: NameArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Show a group and its members now."""
    with api(server) as client:
        g = client.get(f"/groups/{name}")
    if as_json:
        emit_json(g)
        return
    _print_group(g)


@app.command("delete")
def delete(name: NameArg, server: ServerOption = None) -> None:
    """Delete a group (its devices stay)."""
    with api(server) as client:
        client.delete(f"/groups/{name}")
    _console().print(f"group {name}: deleted")
