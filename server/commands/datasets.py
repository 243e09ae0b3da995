"""``edgefleet datasets``: upload data, add the bundled examples, list and inspect versions.

Every command talks to the server's REST API (``--server`` or ``EDGEFLEET_SERVER``);
with ``--json`` it prints only the server's JSON on stdout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json, fail

__all__ = ["app"]

app = typer.Typer(
    help="Datasets: upload CSV or NPZ files, add the bundled examples, inspect versions.",
    no_args_is_help=True,
)
out = Console()

_EXAMPLES = ("digits", "vibration")


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _print_version(data: dict[str, Any], *, heading: str) -> None:
    schema = data["data_schema"]
    splits = data["split_sizes"]
    classes = schema["class_names"]
    task = schema["task"] + (f" ({len(classes)} classes)" if classes else "")
    out.print(
        f"[bold]{heading}[/] {data['dataset']} v{data['version']} · {data['rows']} rows · "
        f"{task} · label {schema['label']!r}"
    )
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_row("sha256", data["sha256"])
    table.add_row("source", f"{data['source_format']} {data['source_name']}".strip())
    table.add_row(
        "features",
        f"{len(schema['feature_names'])}: {_preview(schema['feature_names'])}",
    )
    table.add_row("input shape", "×".join(str(d) for d in schema["input_shape"]))
    if classes:
        table.add_row("classes", _preview(classes, limit=12))
    table.add_row(
        "splits",
        f"train {splits['train']} · validation {splits['validation']} · test {splits['test']}"
        f" (seed {data['split_seed']})",
    )
    table.add_row("created", str(data["created_at"])[:19])
    out.print(table)


@app.command("add")
def add(
    path: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, readable=True, help="A CSV or NPZ file."),
    ],
    name: Annotated[str, typer.Option("--name", help="Dataset name (created on first upload).")],
    label: Annotated[str, typer.Option("--label", help="Label column (CSV) or array (NPZ).")],
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            help="classification or regression. [default: the dataset's task, else inferred]",
        ),
    ] = None,
    description: Annotated[
        str | None, typer.Option("--description", help="What the dataset is.")
    ] = None,
    split_seed: Annotated[
        int, typer.Option("--split-seed", help="Seed of the train/validation/test split.")
    ] = 0,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Upload a CSV or NPZ file as a new version of a dataset."""
    if task is not None and task not in ("classification", "regression"):
        fail(f"--task must be classification or regression, not {task!r}", code=2)
    form = {"name": name, "label": label, "split_seed": str(split_seed)}
    if task:
        form["task"] = task
    if description:
        form["description"] = description
    with api(server) as client, path.open("rb") as file:
        data = client.post(
            "/datasets", data=form, files={"file": (path.name, file, "application/octet-stream")}
        )
    if as_json:
        emit_json(data)
        return
    _print_version(data, heading="added" if data["created"] else "unchanged, already")


@app.command("add-example")
def add_example(
    example: Annotated[str, typer.Argument(help="digits or vibration.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Dataset name. [default: the example's]")
    ] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a bundled example dataset (no download needed)."""
    if example not in _EXAMPLES:
        fail(f"no example named {example!r}; choose {' or '.join(_EXAMPLES)}", code=2)
    params = {"name": name} if name else {}
    with api(server) as client:
        data = client.post(f"/datasets/examples/{example}", params=params)
    if as_json:
        emit_json(data)
        return
    _print_version(data, heading="added" if data["created"] else "unchanged, already")


@app.command("list")
def list_datasets(server: ServerOption = None, as_json: JsonOption = False) -> None:
    """List datasets with their task, label and latest version."""
    with api(server) as client:
        datasets = client.get("/datasets")
    if as_json:
        emit_json(datasets)
        return
    if not datasets:
        out.print("no datasets yet: try [bold]edgefleet datasets add-example digits[/]")
        return
    table = Table("dataset", "task", "label", "latest", "versions", "created")
    for d in datasets:
        table.add_row(
            d["name"],
            d["task"],
            d["label"],
            "-" if d["latest_version"] is None else f"v{d['latest_version']}",
            str(d["version_count"]),
            str(d["created_at"])[:10],
        )
    out.print(table)


@app.command("show")
def show(
    name: Annotated[str, typer.Argument(help="Dataset name, or NAME@VERSION for one version.")],
    version: Annotated[
        str | None, typer.Argument(help="A version number or 'latest'; omit for all versions.")
    ] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a dataset's versions, or one version's schema, splits and lineage."""
    if "@" in name:
        if version is not None:
            fail("give the version either as NAME@VERSION or as a second argument", code=2)
        name, version = name.split("@", 1)
    with api(server) as client:
        data = client.get(
            f"/datasets/{name}" if version is None else f"/datasets/{name}/versions/{version}"
        )
    if as_json:
        emit_json(data)
        return
    if version is not None:
        _print_version(data, heading="dataset")
        if data["lineage"]:
            out.print(f"lineage: {json.dumps(data['lineage'], sort_keys=True)}")
        return
    out.print(
        f"[bold]{data['name']}[/] · {data['task']} · label {data['label']!r}"
        + (f" · {data['description']}" if data["description"] else "")
    )
    table = Table("version", "rows", "format", "source", "sha256", "created")
    for v in data["versions"]:
        table.add_row(
            f"v{v['version']}",
            str(v["rows"]),
            v["source_format"],
            v["source_name"] or "-",
            v["sha256"][:16],
            str(v["created_at"])[:19],
        )
    out.print(table)
