"""``edgefleet models``: the registry from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json

app = typer.Typer(help="Model versions, their per-target artifacts and gates, and aliases.")


def _console() -> Console:
    return Console()  # built per command, so it sees the terminal's current width


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


@app.command("list")
def list_models(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """List models with their latest version and aliases."""
    with api(server) as client:
        models = client.get("/models")
    if as_json:
        emit_json(models)
        return
    table = Table("model", "task", "latest", "aliases")
    for m in models:
        aliases = ", ".join(f"{a}→v{v}" for a, v in sorted(m["aliases"].items()))
        table.add_row(m["name"], m["task"], _fmt(m["latest_version"]), aliases or "-")
    _console().print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[
        str | None, typer.Argument(help="Version number, alias or 'latest'; omit for all.")
    ] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a model's versions, or one version with lineage, metrics and per-target artifacts."""
    with api(server) as client:
        data = client.get(
            f"/models/{name}" if version is None else f"/models/{name}/versions/{version}"
        )
    if as_json:
        emit_json(data)
        return
    if version is None:
        table = Table("version", "status", "source", "aliases", "targets passed", "created")
        for v in data["versions"]:
            table.add_row(
                str(v["version"]),
                v["status"],
                v["source"],
                ", ".join(v["aliases"]) or "-",
                ", ".join(v["targets_passed"]) or "-",
                v["created_at"][:19],
            )
        _console().print(f"[bold]{data['name']}[/] ({data['task']})")
        _console().print(table)
        return
    lineage = data["lineage"]
    _console().print(
        f"[bold]{data['model']} v{data['version']}[/] {data['status']} · {data['source']} · "
        f"dataset {lineage['dataset']}@{lineage['dataset_version']} · run {lineage['run_id']}"
        + (f" · aliases {', '.join(data['aliases'])}" if data["aliases"] else "")
    )
    if data["notes"]:
        _console().print(f"notes: {data['notes']}")
    if data["error"]:
        _console().print(f"[red]error:[/] {data['error']}")
    metrics = {k: v for k, v in data["metrics"].items() if isinstance(v, int | float)}
    _console().print("float model: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    table = Table(
        "target", "format", "quant", "size KiB", "metric", "Δ vs float", "p50 ms", "gate", "reasons"
    )
    for a in data["artifacts"]:
        table.add_row(
            a["target"],
            a["format"],
            a["quantization"],
            _fmt(None if a["size_bytes"] is None else a["size_bytes"] / 1024, ".1f"),
            f"{a['metric_name']} {_fmt(a['metric_value'], '.4f')}",
            _fmt(a["metric_delta"], "+.2f"),
            _fmt(a["latency_p50_ms"], ".3f"),
            "[green]pass[/]" if a["gate_passed"] else "[red]fail[/]",
            "; ".join(a["gate_reasons"]) or (a["error"] or ""),
        )
    _console().print(table)


@app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version number, alias or 'latest'.")],
    alias: Annotated[str, typer.Option("--alias", help="Alias to point at it, e.g. production.")],
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point an alias at a version (only one with an artifact that passed its gates)."""
    with api(server) as client:
        data = client.put(f"/models/{name}/aliases/{alias}", json={"version": version})
    if as_json:
        emit_json(data)
        return
    _console().print(f"{data['model']}: {data['alias']} → v{data['version']}")


@app.command("import")
def import_model(
    path: Annotated[Path, typer.Argument(help=".keras file, or a .zip holding one SavedModel.")],
    name: Annotated[str, typer.Option("--name", help="Model name (new or existing).")],
    dataset: Annotated[
        str, typer.Option("--dataset", help="NAME[@VERSION] to evaluate and calibrate on.")
    ],
    preprocessing: Annotated[
        str | None,
        typer.Option(help="JSON list of preprocessing steps, or @FILE holding it."),
    ] = None,
    notes: Annotated[str, typer.Option(help="Free text kept with the version.")] = "",
    wait: Annotated[bool, typer.Option("--wait", help="Follow the import until it ends.")] = False,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Bring your own model: it goes through the same evaluation, gates and signing."""
    from server.commands.train import _finish, _follow

    steps = preprocessing or ""
    if steps.startswith("@"):
        steps = Path(steps[1:]).read_text()
    with api(server) as client, path.open("rb") as f:
        accepted = client.post(
            f"/models/{name}/imports",
            files={"file": (path.name, f, "application/octet-stream")},
            data={"dataset": dataset, "preprocessing": steps, "notes": notes},
        )
        run = _follow(client, accepted["run_id"], show=not as_json) if wait else None
    if as_json:
        emit_json(run or accepted)
    else:
        _console().print(
            f"import run {accepted['run_id']} queued: {path.name} ({accepted['format']}) as "
            f"{name}, on {accepted['dataset']}@{accepted['dataset_version']}"
        )
    if run is not None:
        _finish(run, quiet=as_json)


@app.command("note")
def note(
    name: Annotated[str, typer.Argument(help="Model name.")],
    version: Annotated[str, typer.Argument(help="Version number, alias or 'latest'.")],
    text: Annotated[str, typer.Argument(help="The notes (replaces the version's notes).")],
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Keep notes with a version (why it exists, what changed, who asked)."""
    with api(server) as client:
        data = client.request("PATCH", f"/models/{name}/versions/{version}", json={"notes": text})
    if as_json:
        emit_json(data)
        return
    _console().print(f"{data['model']} v{data['version']}: notes saved")
