"""``edgefleet agent-releases``: publish a wheel of the agent, list and show releases, and
build the wheel of this checkout.

A published version can then be rolled out like a model:
``edgefleet rollouts create --agent-version V --group G``. Every list/show command takes
``--json`` and then prints only JSON on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json, fail, timestamp

__all__ = ["app"]

app = typer.Typer(help="Versions of the agent itself, to roll out to device groups.")


def _lines(r: dict[str, Any]) -> list[str]:
    return [
        f"agent {r['version']}",
        f"  wheel      {r['filename']} ({r['length']} bytes)",
        f"  sha256     {r['sha256']}",
        f"  python     {r.get('requires_python') or '-'}",
        f"  published  {timestamp(r['created_at'])} by {r['published_by']}",
        *([f"  notes      {r['notes']}"] if r.get("notes") else []),
    ]


@app.command("publish")
def publish(
    wheel: Annotated[Path, typer.Argument(help="The edgefleet wheel (*.whl) to publish.")],
    notes: Annotated[str, typer.Option(help="What changed, for the operators.")] = "",
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check and publish an agent wheel (pure Python, distribution edgefleet)."""
    try:
        data = wheel.read_bytes()
    except OSError as e:
        fail(f"cannot read {wheel}: {e.strerror or e}", code=2)
    with api(server) as client:
        r = client.post(
            "/agent-releases",
            content=data,
            params={"filename": wheel.name, "notes": notes},
            headers={"Content-Type": "application/octet-stream"},
        )
    if as_json:
        emit_json(r)
        return
    console = Console()
    for line in _lines(r):
        console.print(line, highlight=False)
    console.print(
        f"roll it out: edgefleet rollouts create --agent-version {r['version']} --group G"
    )


@app.command("list")
def list_(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Published agent versions, newest first."""
    with api(server) as client:
        rows = client.get("/agent-releases")
    if as_json:
        emit_json(rows)
        return
    table = Table(box=box.SIMPLE)
    for column in ("version", "published", "by", "bytes", "sha256"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["version"],
            timestamp(r["created_at"]),
            r["published_by"],
            str(r["length"]),
            r["sha256"][:16],
        )
    Console().print(table)


@app.command("show")
def show(
    version: Annotated[str, typer.Argument(help="Agent version.")],
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """One agent release."""
    with api(server) as client:
        r = client.get(f"/agent-releases/{version}")
    if as_json:
        emit_json(r)
        return
    console = Console()
    for line in _lines(r):
        console.print(line, highlight=False)


@app.command("build")
def build(
    source: Annotated[Path, typer.Option(help="The checkout to build.")] = Path("."),
    out: Annotated[Path, typer.Option(help="Folder to write the wheel to.")] = Path("dist"),
    version: Annotated[
        str | None, typer.Option(help="Build it as this version (default: pyproject's).")
    ] = None,
) -> None:
    """Build the edgefleet wheel of a checkout (pip wheel --no-deps, on a copy) and check it."""
    from server.agent_releases.errors import AgentReleaseError
    from server.agent_releases.service import build_wheel
    from server.agent_releases.wheel import inspect_wheel

    try:
        path = build_wheel(source.resolve(), out, version=version)
        facts = inspect_wheel(path.read_bytes(), filename=path.name)
    except AgentReleaseError as e:
        fail(str(e))
        raise AssertionError("unreachable") from e  # fail() exits
    typer.echo(f"{path} (agent {facts.version}, {facts.files} files)")
    typer.echo(f"publish it: edgefleet agent-releases publish {path}")
