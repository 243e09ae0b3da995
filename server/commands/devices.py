"""``edgefleet devices``: the fleet inventory, and accepting, rejecting and revoking devices."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json, fail, timestamp

__all__ = ["app", "parse_tags"]

app = typer.Typer(help="Enrolled devices: inventory, status (accept / reject / revoke), tags.")

DeviceArg = Annotated[str, typer.Argument(help="Device id.")]


def _console() -> Console:
    return Console()


def _models(device: dict[str, Any]) -> str:
    return ", ".join(f"{m['model_name']} v{m['model_version']}" for m in device["models"]) or "-"


def parse_tags(pairs: list[str]) -> dict[str, str]:
    """``["site=berlin", "line=2"]`` -> ``{"site": "berlin", "line": "2"}``; exits on a bad one."""
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            fail(f"tag {pair!r}: use NAME=VALUE", code=2)
        tags[key] = value
    return tags


@app.command("list")
def list_devices(
    status: Annotated[
        str | None, typer.Option(help="pending, accepted, rejected or revoked.")
    ] = None,
    profile: Annotated[str | None, typer.Option(help="Profile name.")] = None,
    arch: Annotated[str | None, typer.Option(help="CPU architecture, e.g. aarch64.")] = None,
    runtime: Annotated[str | None, typer.Option(help="Runtime name, e.g. litert.")] = None,
    runtime_version: Annotated[str | None, typer.Option(help="Runtime version.")] = None,
    agent_version: Annotated[str | None, typer.Option(help="Agent version.")] = None,
    tag: Annotated[
        list[str] | None, typer.Option(help="NAME=VALUE, or NAME to have the tag; repeatable.")
    ] = None,
    group: Annotated[str | None, typer.Option(help="Devices the group's rule selects.")] = None,
    online: Annotated[
        bool | None, typer.Option("--online/--offline", help="Only online / offline devices.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Runs model NAME or NAME@VERSION.")] = None,
    selector: Annotated[
        str | None, typer.Option(help="A group selector, e.g. 'site in (berlin, paris)'.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many devices.")] = 1000,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """List devices, filtered by any inventory field (filters combine with 'and')."""
    params: dict[str, Any] = {
        k: v
        for k, v in {
            "status": status,
            "profile": profile,
            "arch": arch,
            "runtime": runtime,
            "runtime_version": runtime_version,
            "agent_version": agent_version,
            "group": group,
            "online": None if online is None else str(online).lower(),
            "model": model,
            "selector": selector,
            "limit": limit,
        }.items()
        if v is not None
    }
    if tag:
        params["tag"] = tag
    with api(server) as client:
        devices = client.get("/devices", params=params)
    if as_json:
        emit_json(devices)
        return
    table = Table(
        "device", "status", "profile", "runtime", "agent", "online", "last seen", "models"
    )
    for d in devices:
        table.add_row(
            d["id"],
            d["status"],
            d["profile"],
            f"{d['runtime']['name']} {d['runtime']['version']}",
            d["agent_version"],
            "[green]yes[/]" if d["online"] else "no",
            timestamp(d["last_seen"]),
            _models(d),
        )
    _console().print(table)
    if not devices:
        _console().print("no devices match")


@app.command("show")
def show(device_id: DeviceArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Show one device: facts, tags, groups, models, presence and its last update."""
    with api(server) as client:
        d = client.get(f"/devices/{device_id}")
    if as_json:
        emit_json(d)
        return
    console = _console()
    console.print(f"[bold]{d['id']}[/] {d['status']} · profile {d['profile']} · {d['arch']}")
    rows = {
        "runtime": f"{d['runtime']['name']} {d['runtime']['version']}",
        "agent": d["agent_version"],
        "tags": ", ".join(f"{k}={v}" for k, v in sorted(d["tags"].items())) or "-",
        "groups": ", ".join(d["groups"] or []) or "-",
        "online": "yes" if d["online"] else "no",
        "last seen": timestamp(d["last_seen"]),
        "models": _models(d),
        "manifest": str(d["manifest_version"]),
        "enrolled": timestamp(d["enrolled_at"]),
        "accepted": timestamp(d["accepted_at"]),
    }
    update = d["last_update"]
    if update is not None:
        reason = f" ({update['reason']})" if update.get("reason") else ""
        rows["last update"] = (
            f"{update['outcome']}{reason}, manifest {update['manifest_version']}, "
            f"{timestamp(update['at'])}"
        )
    agent_update = d.get("agent_update")
    if agent_update:
        reason = f" ({agent_update['reason']})" if agent_update.get("reason") else ""
        rows["agent update"] = (
            f"{agent_update['outcome']}{reason}: "
            f"{agent_update.get('previous_version') or '-'} -> {agent_update['version']}, "
            f"manifest {agent_update['manifest_version']}, {timestamp(agent_update['at'])}"
        )
    event = d["last_event"]
    if event is not None:
        rows["last event"] = f"{event['kind']} {timestamp(event['at'])}"
    for name, value in rows.items():
        console.print(f"  {name:12} {value}")


def _status(action: str, device_id: str, server: str | None, as_json: bool) -> None:
    with api(server) as client:
        d = client.post(f"/devices/{device_id}/{action}")
    if as_json:
        emit_json(d)
        return
    _console().print(f"{d['id']}: {d['status']}")


@app.command("accept")
def accept(device_id: DeviceArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Accept a pending device: it may connect and receive models."""
    _status("accept", device_id, server, as_json)


@app.command("reject")
def reject(device_id: DeviceArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Reject a pending device: its credentials stop working."""
    _status("reject", device_id, server, as_json)


@app.command("revoke")
def revoke(device_id: DeviceArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Revoke a device: its credentials stop working."""
    _status("revoke", device_id, server, as_json)


@app.command("tag")
def tag(
    device_id: DeviceArg,
    tags: Annotated[list[str] | None, typer.Argument(help="NAME=VALUE to set.")] = None,
    remove: Annotated[
        list[str] | None, typer.Option("--remove", help="Tag name to remove; repeatable.")
    ] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Set and remove a device's tags in one change (dynamic groups follow at once)."""
    body = {"set": parse_tags(tags or []), "remove": remove or []}
    if not body["set"] and not body["remove"]:
        fail("give NAME=VALUE tags to set, or --remove NAME", code=2)
    with api(server) as client:
        d = client.request("PATCH", f"/devices/{device_id}/tags", json=body)
    if as_json:
        emit_json(d)
        return
    tags_text = ", ".join(f"{k}={v}" for k, v in sorted(d["tags"].items())) or "no tags"
    _console().print(f"{d['id']}: {tags_text}; groups: {', '.join(d['groups'] or []) or '-'}")


@app.command("delete")
def delete(device_id: DeviceArg, server: ServerOption = None) -> None:
    """Forget a rejected or revoked device, so its id may enroll again."""
    with api(server) as client:
        client.delete(f"/devices/{device_id}")
    _console().print(f"{device_id}: deleted")
