"""``edgefleet feedback``: post the true label of a past prediction; show live accuracy.

Both talk to the server's API (``--server`` or ``EDGEFLEET_SERVER``); with ``--json``
they print only the server's JSON on stdout.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json

__all__ = ["app"]

app = typer.Typer(
    help="Feedback: true labels for past predictions, and the live accuracy they give.",
    no_args_is_help=True,
)
out = Console()


def _accuracy(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


@app.command("add")
def add(
    device: Annotated[str, typer.Option("--device", help="The device that served it.")],
    prediction: Annotated[
        str, typer.Option("--prediction", help="The prediction id its /v1/predict answered.")
    ],
    model: Annotated[str, typer.Option("--model", help="Model name.")],
    version: Annotated[int, typer.Option("--version", min=1, help="Model version.")],
    predicted: Annotated[str, typer.Option("--predicted", help="The label the model answered.")],
    label: Annotated[str, typer.Option("--label", help="The true label.")],
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Post the true label of one past prediction (the same label again changes nothing)."""
    body = {
        "device_id": device,
        "prediction_id": prediction,
        "model": model,
        "model_version": version,
        "predicted_label": predicted,
        "true_label": label,
    }
    with api(server) as client:
        result = client.post("/feedback", json=body)
    if as_json:
        emit_json(result)
        return
    verdict = "[green]correct[/]" if result["correct"] else "[red]wrong[/]"
    state = "recorded" if result["created"] else "already recorded"
    out.print(
        f"{state}: {result['model']} v{result['model_version']} predicted "
        f"{result['predicted_label']!r} for {result['device_id']}/{result['prediction_id']}, "
        f"true label {result['true_label']!r} ({verdict})"
    )


@app.command("accuracy")
def accuracy(
    model: Annotated[str, typer.Option("--model", help="Model name.")],
    version: Annotated[
        str | None, typer.Option("--version", help="A version, alias or 'latest'. [default: all]")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", help="A device group.")] = None,
    devices: Annotated[
        str | None, typer.Option("--devices", help="Comma-separated device ids (not with --group).")
    ] = None,
    since: Annotated[str, typer.Option("--since", help="24h, 7d, ... or an ISO time.")] = "24h",
    until: Annotated[str | None, typer.Option("--until", help="End (default now).")] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Accuracy of a model's labelled predictions, per version (and per label for one)."""
    params: dict[str, Any] = {"model": model, "since": since}
    for key, value in (("version", version), ("group", group), ("devices", devices)):
        if value:
            params[key] = value
    if until:
        params["until"] = until
    with api(server) as client:
        report = client.get("/feedback/accuracy", params=params)
    if as_json:
        emit_json(report)
        return
    scope = f"group {report['group']}" if report["group"] else "the whole fleet"
    if report["devices"]:
        scope = f"{len(report['devices'])} devices"
    overall = report["overall"]
    out.print(
        f"[bold]{report['model']}[/] · {scope} · {str(report['since'])[:16]} to "
        f"{str(report['until'])[:16]} UTC · accuracy [bold]{_accuracy(overall['accuracy'])}[/] "
        f"({overall['correct']:,} of {overall['total']:,} labelled predictions)"
    )
    if report["versions"]:
        table = Table("version", "accuracy", "correct", "labelled", title="per version")
        for row in report["versions"]:
            table.add_row(
                str(row["version"]),
                _accuracy(row["accuracy"]),
                f"{row['correct']:,}",
                f"{row['total']:,}",
            )
        out.print(table)
    if report["labels"]:
        table = Table("true label", "recall", "correct", "labelled", title="per true label")
        for row in report["labels"]:
            table.add_row(
                row["label"], _accuracy(row["accuracy"]), f"{row['correct']:,}", f"{row['total']:,}"
            )
        out.print(table)
    if not report["versions"]:
        out.print("no labelled predictions in this range")
