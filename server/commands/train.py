"""``edgefleet train`` and ``edgefleet runs list|show|cancel|watch``: training runs from the shell.

Training runs on the server, in the background; ``--wait`` (or ``runs watch``) follows
a run until it ends, with a progress bar per fit on a terminal and one plain line per
epoch otherwise. Waiting exits 0 when the run succeeded, 1 when it failed and 3 when it
was cancelled; Ctrl-C stops waiting, not the run.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from server.commands.client import ApiClient, JsonOption, ServerOption, api, emit_json, fail
from server.training.spec import Arch

__all__ = ["EXIT_CANCELLED", "EXIT_FAILED", "app", "train"]

EXIT_FAILED = 1
EXIT_CANCELLED = 3
POLL_INTERVAL = 0.5
FINISHED = ("succeeded", "failed", "cancelled")

app = typer.Typer(help="Training runs: list, show, cancel, watch.", no_args_is_help=True)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def train(
    dataset: Annotated[
        str, typer.Option("--dataset", help="Dataset NAME or NAME@VERSION (default: newest).")
    ],
    model: Annotated[str, typer.Option("--model", help="Model NAME this run makes a version of.")],
    arch: Annotated[
        Arch | None,
        typer.Option("--arch", help="mlp, cnn1d or cnn2d (default: by the data's shape)."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, max=500, help="Epochs (default: by arch).")
    ] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Follow the run until it ends; exit 1 if it fails, 3 if cancelled."
        ),
    ] = False,
    json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """Train a model on a dataset version, as a background run on the server."""
    body: dict[str, Any] = {"dataset": dataset, "model": model}
    if arch is not None:
        body["arch"] = arch
    if epochs is not None:
        body["epochs"] = epochs
    with api(server) as client:
        run = client.post("/runs", json=body)
        if not json:
            out.print(
                f"run {run['id']} queued: {run['model_name']} on {run['dataset']} "
                f"({run['arch']}, {run['epochs']} epochs, seed {run['seed']})"
            )
        if wait:
            run = _follow(client, run["id"], show=not json)
    if json:
        emit_json(run)
    if wait:
        _finish(run, quiet=json)


@app.command("list")
def list_runs(
    model: Annotated[str | None, typer.Option("--model", help="Only this model's runs.")] = None,
    status: Annotated[
        str | None,
        typer.Option("--status", help="queued, running, succeeded, failed or cancelled."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
    json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """Training runs, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if model:
        params["model"] = model
    if status:
        params["status"] = status
    with api(server) as client:
        runs = client.get("/runs", params=params)
    if json:
        emit_json(runs)
        return
    if not runs:
        out.print("no training runs")
        return
    table = Table("ID", "MODEL", "DATASET", "ARCH", "STATUS", "PROGRESS", "RESULT", "CREATED")
    for run in runs:
        table.add_row(
            str(run["id"]),
            run["model_name"],
            run["dataset"] or str(run["dataset_version_id"]),
            run["arch"] or "",
            run["status"],
            _progress_text(run),
            _result_text(run["metrics"]) or _short(run["error"]),
            str(run["created_at"])[:19].replace("T", " "),
        )
    out.print(table)


@app.command("show")
def show_run(
    run_id: Annotated[int, typer.Argument(help="The run's id.")],
    json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """One run: status, progress, metrics, lineage and environment."""
    with api(server) as client:
        run = client.get(f"/runs/{run_id}")
    if json:
        emit_json(run)
        return
    lineage = run["lineage"]
    made = (
        f"{lineage['model']} version {lineage['model_version']}"
        if lineage["model_version"] is not None
        else "(no model version yet)"
    )
    out.print(f"[bold]run {run['id']}[/]  {run['status']}  {run['phase']}")
    out.print(f"lineage   {run['dataset']} -> run {run['id']} -> {made}")
    spec = run["spec"]
    out.print(
        f"spec      {spec.get('arch')}, {spec.get('epochs')} epochs, batch "
        f"{spec.get('batch_size')}, lr {spec.get('learning_rate')}, seed {spec.get('seed')}"
        + (f", {spec['k_folds']}-fold CV" if spec.get("k_folds") else "")
    )
    if run["progress"]:
        out.print(f"progress  {_progress_text(run)}  {_epoch_text(run['progress'])}")
    metrics = run["metrics"]
    if metrics:
        out.print(f"test      {_result_text(metrics)}")
        cv = metrics.get("cross_validation")
        if cv:
            out.print(f"cv        {_cv_text(cv)}")
        out.print(
            f"model     {metrics.get('parameters', 0):,} parameters, "
            f"{metrics.get('epochs_trained')} epochs trained (best {metrics.get('best_epoch')})"
        )
    if run["environment"]:
        env = run["environment"]
        out.print(
            "versions  "
            + ", ".join(
                f"{k} {env[k]}" for k in ("tensorflow", "keras", "numpy", "python") if k in env
            )
        )
    if run["error"]:
        out.print(f"[red]error[/]     {run['error']}")


@app.command("cancel")
def cancel_run(
    run_id: Annotated[int, typer.Argument(help="The run's id.")],
    json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """Cancel a run: a queued one at once, a running one as soon as its worker is stopped."""
    with api(server) as client:
        run = client.post(f"/runs/{run_id}/cancel")
    if json:
        emit_json(run)
    elif run["status"] == "cancelled":
        out.print(f"run {run_id} cancelled")
    else:
        out.print(f"run {run_id}: cancellation requested; its worker is being stopped")


@app.command("watch")
def watch_run(
    run_id: Annotated[int, typer.Argument(help="The run's id.")],
    json: JsonOption = False,
    server: ServerOption = None,
) -> None:
    """Follow a run until it ends; exit 1 if it fails, 3 if it is cancelled."""
    with api(server) as client:
        run = _follow(client, run_id, show=not json)
    if json:
        emit_json(run)
    _finish(run, quiet=json)


# ----------------------------------------------------------------------------- following a run


def _follow(client: ApiClient, run_id: int, *, show: bool) -> dict[str, Any]:
    """Poll the run until it ends, showing its progress (a bar on a terminal)."""
    view: _View = _BarView(out) if show and out.is_terminal else _LineView(out if show else None)
    try:
        with view:
            while True:
                run: dict[str, Any] = client.get(f"/runs/{run_id}")
                view.update(run)
                if run["status"] in FINISHED:
                    return run
                time.sleep(POLL_INTERVAL)
    except KeyboardInterrupt:
        err.print(
            f"stopped waiting; run {run_id} goes on on the server "
            f"(`edgefleet runs cancel {run_id}` cancels it)"
        )
        raise typer.Exit(130) from None


def _finish(run: dict[str, Any], *, quiet: bool) -> None:
    if run["status"] == "succeeded":
        if not quiet:
            lineage = run["lineage"]
            version = lineage.get("model_version")
            made = f"model {lineage['model']} version {version}" if version else "no model version"
            out.print(f"run {run['id']} succeeded: {made}; test {_result_text(run['metrics'])}")
        return
    if run["status"] == "cancelled":
        err.print(f"run {run['id']} was cancelled")
        raise typer.Exit(EXIT_CANCELLED)
    fail(f"run {run['id']} failed: {run['error'] or 'no error recorded'}", code=EXIT_FAILED)


class _View:
    def __enter__(self) -> _View:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def update(self, run: dict[str, Any]) -> None:
        raise NotImplementedError


class _LineView(_View):
    """One line per phase change and per new epoch (logs, pipes, CI)."""

    def __init__(self, console: Console | None) -> None:
        self.console = console
        self.phase: str | None = None
        self.epoch: tuple[Any, ...] | None = None

    def update(self, run: dict[str, Any]) -> None:
        if self.console is None:
            return
        phase = run["phase"] or run["status"]
        if phase != self.phase:
            self.phase = phase
            self.console.print(f"run {run['id']}: {phase}")
        progress = run["progress"]
        key = (progress.get("stage"), progress.get("fold"), progress.get("epoch"))
        if progress.get("epoch") and key != self.epoch:
            self.epoch = key
            self.console.print(f"  {_fit_label(progress)}{_epoch_text(progress)}")


class _BarView(_View):
    """A rich progress bar per fit (each cross-validation fold, then the final model)."""

    def __init__(self, console: Console) -> None:
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self.fit: tuple[Any, ...] | None = None
        self.task: TaskID | None = None
        self.phase: str | None = None

    def __enter__(self) -> _BarView:
        self.bar.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.bar.stop()

    def update(self, run: dict[str, Any]) -> None:
        phase = run["phase"] or run["status"]
        if phase != self.phase and phase != "training":
            self.bar.console.print(f"run {run['id']}: {phase}")
        self.phase = phase
        progress = run["progress"]
        if not progress.get("epoch"):
            return
        fit = (progress.get("stage"), progress.get("fold"))
        if fit != self.fit:
            self.fit = fit
            label = _fit_label(progress).strip() or "training"
            self.task = self.bar.add_task(label, total=progress.get("epochs"), info="")
        assert self.task is not None
        self.bar.update(self.task, completed=progress["epoch"], info=_metrics_text(progress))


# ----------------------------------------------------------------------------- text


def _fit_label(progress: dict[str, Any]) -> str:
    if progress.get("fold"):
        return f"fold {progress['fold']}/{progress['folds']}  "
    return ""


def _metrics_text(progress: dict[str, Any]) -> str:
    parts = [f"loss {progress['loss']:.4f}"] if progress.get("loss") is not None else []
    for name, value in (progress.get("metrics") or {}).items():
        if isinstance(value, int | float):
            parts.append(f"{name} {value:.4f}")
    return "  ".join(parts)


def _epoch_text(progress: dict[str, Any]) -> str:
    return f"epoch {progress.get('epoch')}/{progress.get('epochs')}  {_metrics_text(progress)}"


def _progress_text(run: dict[str, Any]) -> str:
    progress = run["progress"]
    if run["status"] != "running" or not progress.get("epoch"):
        return run["phase"] if run["status"] == "running" else ""
    return f"{_fit_label(progress)}epoch {progress['epoch']}/{progress['epochs']}"


def _result_text(metrics: dict[str, Any]) -> str:
    test = metrics.get("test") or {}
    names = ("accuracy", "macro_f1") if "accuracy" in test else ("rmse", "mae", "r2")
    return ", ".join(
        f"{name} {test[name]:.4f}" for name in names if isinstance(test.get(name), int | float)
    )


def _short(text: str | None, width: int = 48) -> str:
    first = (text or "").strip().splitlines()[:1]
    line = first[0] if first else ""
    return line if len(line) <= width else line[: width - 1] + "…"


def _cv_text(cv: dict[str, Any]) -> str:
    mean, std = cv.get("mean", {}), cv.get("std", {})
    return f"{cv.get('k')}-fold: " + ", ".join(
        f"{name} {mean[name]:.4f} ± {std.get(name, 0.0):.4f}" for name in mean
    )
