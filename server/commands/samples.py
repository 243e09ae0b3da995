"""``edgefleet datasets samples``: what devices captured, and a dataset version made of it.

``show`` summarises a model's captured rows (how many have a label, await one, or can
never get one); ``add`` adds the labelled ones, with the model's training data, as a
new version of the model's dataset with lineage. Both talk to the server's API; with
``--json`` they print only its JSON on stdout.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json

__all__ = ["app"]

app = typer.Typer(
    help="Samples devices captured (opt-in): summary, and a dataset version made of them.",
    no_args_is_help=True,
)
out = Console()

ModelOption = Annotated[str, typer.Option("--model", help="Model name.")]
VersionOption = Annotated[
    str | None, typer.Option("--version", help="Only samples of this model version. [default: all]")
]
GroupOption = Annotated[str | None, typer.Option("--group", help="A device group.")]
DevicesOption = Annotated[
    str | None, typer.Option("--devices", help="Comma-separated device ids (not with --group).")
]
SinceOption = Annotated[str, typer.Option("--since", help="Windows ending from: 7d, 24h, ISO.")]
UntilOption = Annotated[str | None, typer.Option("--until", help="Windows ending before.")]


def _summary_table(summary: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    versions = ", ".join(f"v{v}" for v in summary["versions"]) or "-"
    table.add_row("captured", f"{summary['rows']:,} rows in {summary['batches']:,} batches")
    table.add_row("devices", f"{summary['devices']:,}")
    table.add_row("model versions", versions)
    table.add_row("labelled", f"{summary['labelled_rows']:,}")
    table.add_row("awaiting a label", f"{summary['unlabelled_rows']:,}")
    table.add_row("no prediction id", f"{summary['rows_without_prediction_id']:,}")
    if summary["first_window_end"]:
        table.add_row(
            "windows",
            f"{str(summary['first_window_end'])[:19]} to {str(summary['last_window_end'])[:19]}",
        )
    return table


def _params(
    model: str,
    version: str | None,
    group: str | None,
    devices: str | None,
    since: str,
    until: str | None,
) -> dict[str, Any]:
    params: dict[str, Any] = {"model": model, "since": since}
    for key, value in (("version", version), ("group", group), ("until", until)):
        if value:
            params[key] = value
    if devices:
        params["devices"] = [d.strip() for d in devices.split(",") if d.strip()]
    return params


@app.command("show")
def show(
    model: ModelOption,
    version: VersionOption = None,
    group: GroupOption = None,
    devices: DevicesOption = None,
    since: SinceOption = "7d",
    until: UntilOption = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """What devices captured for a model, and how much of it is labelled."""
    with api(server) as client:
        summary = client.get(
            "/samples", params=_params(model, version, group, devices, since, until)
        )
    if as_json:
        emit_json(summary)
        return
    scope = f"group {summary['group']}" if summary["group"] else "the whole fleet"
    out.print(f"[bold]{summary['model']}[/] samples · {scope}")
    out.print(_summary_table(summary))


@app.command("add")
def add(
    model: ModelOption,
    version: VersionOption = None,
    group: GroupOption = None,
    devices: DevicesOption = None,
    since: SinceOption = "7d",
    until: UntilOption = None,
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            help="NAME@VERSION to extend. [default: the dataset version the model was trained on]",
        ),
    ] = None,
    split_seed: Annotated[int, typer.Option("--split-seed", help="Seed of the new splits.")] = 0,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add the labelled samples to the model's dataset as a new version, with lineage."""
    body = _params(model, version, group, devices, since, until)
    body.update({"base": base, "split_seed": split_seed})
    with api(server) as client:
        result = client.post("/samples/dataset-versions", json=body)
    if as_json:
        emit_json(result)
        return
    lineage = result["lineage"]
    state = "added" if result["created"] else "already there:"
    out.print(
        f"{state} [bold]{result['dataset']} v{result['version']}[/] · {result['rows']:,} rows: "
        f"v{result['base_version']}'s {lineage['base']['rows']:,} + {result['added_rows']:,} "
        f"labelled sample rows from {lineage['device_count']} devices"
    )
    left = lineage["unlabelled_rows"] + lineage["rows_without_prediction_id"]
    refused = sum(lineage["refused_rows"].values())
    if left or refused:
        out.print(
            f"left out: {lineage['unlabelled_rows']:,} awaiting a label, "
            f"{lineage['rows_without_prediction_id']:,} without a prediction id, "
            f"{refused:,} that do not fit the dataset"
        )
