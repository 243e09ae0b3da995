"""``edgefleet retraining``: policies that watch a model on its groups, and their decisions.

A policy fires for a group when its condition holds there (the conditions of
``edgefleet alerts rules``: ``drift``, ``accuracy``, ``latency_p95``, ``error_rate``). The
decision it takes waits for ``approve`` / ``reject`` (unless the policy has
``--no-approval``), then trains on the drifted version's dataset at its newest version;
a version that passes its gates is promoted to ``--alias`` (``candidate``), and with
``--canary PHASES`` a canary rollout of it to the group starts.

Every list/show command takes ``--json`` and then prints only JSON on stdout.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.alerts import (
    Features,
    MaxErrorRate,
    Metric,
    MinAccuracy,
    MinDevices,
    MinInferences,
    MinLabels,
    MinRequests,
    MinSamples,
    Share,
    SlaMs,
    SlaRatio,
    Threshold,
    WindowHours,
    Windows,
    condition_body,
)
from server.commands.client import JsonOption, ServerOption, api, emit_json, timestamp
from server.commands.rollouts import parse_duration

__all__ = ["app", "policies_app"]

app = typer.Typer(help="Retraining policies per model, and the decisions they take.")
policies_app = typer.Typer(help="Retraining policies: when to retrain a model, and what then.")
app.add_typer(policies_app, name="policies")

PolicyArg = Annotated[str, typer.Argument(help="Policy name.")]
DecisionArg = Annotated[int, typer.Argument(help="Decision id.")]
NoteOption = Annotated[str, typer.Option(help="Why (kept with the decision).")]
_STATUS_STYLE = {
    "pending_approval": "yellow",
    "training": "cyan",
    "completed": "green",
    "failed": "red",
    "rejected": "white",
}


def _console() -> Console:
    return Console()


def _status(value: str) -> str:
    return f"[{_STATUS_STYLE.get(value, 'white')}]{value}[/]"


# ----------------------------------------------------------------------------- policies


def _print_policy(p: dict[str, Any]) -> None:
    console = _console()
    state = "enabled" if p["enabled"] else "[yellow]disabled[/]"
    console.print(
        f"[bold]{p['name']}[/] {p['model']} · {p['kind']} on {', '.join(p['groups'])} · {state}"
    )
    condition = {k: v for k, v in p["condition"].items() if k != "kind"}
    console.print(f"  condition: {json.dumps(condition)}")
    then = ["waits for approval" if p["approval"] else "trains at once"]
    then.append(f"promotes to {p['alias']!r}")
    if p["canary"]:
        then.append(f"canary rollout {p['canary']['phases']} to the group")
    console.print(
        f"  then: {', '.join(then)} · cooldown {p['cooldown_seconds'] / 3600:g} h"
        + (f" · training {json.dumps(p['training'])}" if any(p["training"].values()) else "")
    )
    if p["last_error"]:
        console.print(f"  [red]last evaluation failed:[/] {p['last_error']}")


@policies_app.command("list")
def list_policies(
    model: Annotated[str | None, typer.Option(help="Model name.")] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """List retraining policies."""
    with api(server) as client:
        policies = client.get("/retraining/policies", params={"model": model} if model else {})
    if as_json:
        emit_json(policies)
        return
    table = Table()
    for column in ("policy", "model", "kind", "groups", "approval", "canary", "enabled"):
        table.add_column(column)
    for p in policies:
        table.add_row(
            p["name"],
            p["model"],
            p["kind"],
            ", ".join(p["groups"]),
            "yes" if p["approval"] else "no",
            p["canary"]["phases"] if p["canary"] else "-",
            "yes" if p["enabled"] else "no",
        )
    console = _console()
    console.print(table)
    if not policies:
        console.print("no policies; add one with: edgefleet retraining policies create NAME ...")


@policies_app.command("show")
def show_policy(name: PolicyArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Show a policy."""
    with api(server) as client:
        p = client.get(f"/retraining/policies/{name}")
    if as_json:
        emit_json(p)
        return
    _print_policy(p)


@policies_app.command("create")
def create_policy(
    name: PolicyArg,
    model: Annotated[str, typer.Option(help="The model retrained.")],
    group: Annotated[list[str], typer.Option(help="A group it watches (repeat for more).")],
    kind: Annotated[str, typer.Option(help="drift, accuracy, latency_p95 or error_rate.")] = (
        "drift"
    ),
    approval: Annotated[
        bool, typer.Option("--approval/--no-approval", help="Wait for an operator's approval.")
    ] = True,
    cooldown: Annotated[str, typer.Option(help="At most one firing per group per, e.g. 24h.")] = (
        "24h"
    ),
    epochs: Annotated[int | None, typer.Option(help="Epochs of the retraining run.")] = None,
    alias: Annotated[str, typer.Option(help="Alias the new version gets.")] = "candidate",
    canary: Annotated[
        str | None, typer.Option(help="Start a canary rollout to the group, e.g. 10,100.")
    ] = None,
    canary_approval: Annotated[
        bool,
        typer.Option(
            "--canary-approval/--no-canary-approval",
            help="Each canary phase but the last waits for approval.",
        ),
    ] = True,
    description: Annotated[str, typer.Option(help="What the policy is for.")] = "",
    window_hours: WindowHours = None,
    windows: Windows = None,
    metric: Metric = None,
    threshold: Threshold = None,
    share: Share = None,
    features: Features = None,
    min_samples: MinSamples = None,
    min_devices: MinDevices = None,
    sla_ms: SlaMs = None,
    sla_ratio: SlaRatio = None,
    min_inferences: MinInferences = None,
    max_error_rate: MaxErrorRate = None,
    min_requests: MinRequests = None,
    min_accuracy: MinAccuracy = None,
    min_labels: MinLabels = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a retraining policy."""
    body: dict[str, Any] = {
        "name": name,
        "model": model,
        "groups": group,
        "condition": condition_body(
            kind,
            window_hours=window_hours,
            windows=windows,
            metric=metric,
            threshold=threshold,
            min_device_share=share,
            features=features,
            min_samples=min_samples,
            min_devices=min_devices,
            sla_ms=sla_ms,
            sla_ratio=sla_ratio,
            min_inferences=min_inferences,
            max_error_rate=max_error_rate,
            min_requests=min_requests,
            min_accuracy=min_accuracy,
            min_labels=min_labels,
        ),
        "approval": approval,
        "cooldown": parse_duration(cooldown, option="--cooldown"),
        "training": {"epochs": epochs},
        "alias": alias,
        "canary": None if canary is None else {"phases": canary, "approval": canary_approval},
        "description": description,
    }
    with api(server) as client:
        p = client.post("/retraining/policies", json=body)
    if as_json:
        emit_json(p)
        return
    _print_policy(p)


def _set_enabled(name: str, enabled: bool, server: str | None, as_json: bool) -> None:
    with api(server) as client:
        p = client.request("PATCH", f"/retraining/policies/{name}", json={"enabled": enabled})
    if as_json:
        emit_json(p)
        return
    _print_policy(p)


@policies_app.command("enable")
def enable_policy(
    name: PolicyArg, server: ServerOption = None, as_json: JsonOption = False
) -> None:
    """Enable a policy."""
    _set_enabled(name, True, server, as_json)


@policies_app.command("disable")
def disable_policy(
    name: PolicyArg, server: ServerOption = None, as_json: JsonOption = False
) -> None:
    """Disable a policy (decisions already taken go on)."""
    _set_enabled(name, False, server, as_json)


@policies_app.command("delete")
def delete_policy(name: PolicyArg, server: ServerOption = None) -> None:
    """Delete a policy (its decisions stay; pending ones are rejected)."""
    with api(server) as client:
        client.delete(f"/retraining/policies/{name}")
    _console().print(f"policy {name} deleted")


# ----------------------------------------------------------------------------- decisions


def _print_decision(d: dict[str, Any]) -> None:
    console = _console()
    console.print(
        f"[bold]decision {d['id']}[/] {_status(d['status'])} · policy {d['policy']} · "
        f"{d['model']} v{d['version']} in group {d['group']} · {timestamp(d['created_at'])}"
    )
    console.print(f"  fired: {d['summary']}")
    console.print(f"  now: {d['status_reason']}")
    dataset = d["plan"].get("dataset") or {}
    if dataset.get("note"):
        console.print(f"  data: {dataset['note']}")
    if d["run"]:
        run = d["run"]
        console.print(
            f"  run {run['id']}: {run['status']}"
            + (f" ({run['phase']})" if run["phase"] else "")
            + (f" · {run['error']}" if run["error"] else "")
        )
    if d["candidate_version"]:
        console.print(f"  candidate: {d['model']} v{d['candidate_version']}")
    if d["rollout_id"]:
        console.print(f"  rollout: {d['rollout_id']} (edgefleet rollouts watch {d['rollout_id']})")
    devices = d["evidence"].get("devices") or []
    if devices:
        shown = ", ".join(
            f"{x['device_id']} ({x['feature']} {x['value']:.3g})"
            if "feature" in x
            else x["device_id"]
            for x in devices[:8]
        )
        more = f" and {len(devices) - 8} more" if len(devices) > 8 else ""
        console.print(f"  devices: {shown}{more}")
    features = d["evidence"].get("features") or []
    if features:
        console.print(f"  features: {', '.join(features[:10])}")
    if d["status"] == "pending_approval":
        console.print(
            f"  approve: edgefleet retraining approve {d['id']} · "
            f"reject: edgefleet retraining reject {d['id']}"
        )


@app.command("decisions")
def decisions(
    decision_id: Annotated[
        int | None, typer.Argument(help="Show this decision (default: list them).")
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(help="pending_approval, training, completed, failed or rejected."),
    ] = None,
    policy: Annotated[str | None, typer.Option(help="Policy name.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name.")] = None,
    group: Annotated[str | None, typer.Option(help="Device group.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the policies' decisions, newest first, or show one with its evidence."""
    with api(server) as client:
        if decision_id is not None:
            d = client.get(f"/retraining/decisions/{decision_id}")
        else:
            params = {
                k: v
                for k, v in {
                    "status": status,
                    "policy": policy,
                    "model": model,
                    "group": group,
                    "limit": limit,
                }.items()
                if v is not None
            }
            found = client.get("/retraining/decisions", params=params)
    if decision_id is not None:
        if as_json:
            emit_json(d)
        else:
            _print_decision(d)
        return
    if as_json:
        emit_json(found)
        return
    table = Table()
    for column in ("id", "status", "policy", "model", "group", "candidate", "taken", "why"):
        table.add_column(column, no_wrap=column not in ("why",))
    for x in found:
        table.add_row(
            str(x["id"]),
            _status(x["status"]),
            x["policy"],
            f"{x['model']} v{x['version']}",
            x["group"],
            "-" if x["candidate_version"] is None else f"v{x['candidate_version']}",
            timestamp(x["created_at"]),
            x["summary"],
        )
    console = _console()
    console.print(table)
    if not found:
        console.print("no decisions match")


def _command(verb: str, decision_id: int, note: str, server: str | None, as_json: bool) -> None:
    with api(server) as client:
        d = client.post(f"/retraining/decisions/{decision_id}/{verb}", json={"note": note})
    if as_json:
        emit_json(d)
        return
    _print_decision(d)


@app.command("approve")
def approve(
    decision_id: DecisionArg,
    note: NoteOption = "",
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Approve a pending decision: its retraining run is queued."""
    _command("approve", decision_id, note, server, as_json)


@app.command("reject")
def reject(
    decision_id: DecisionArg,
    note: NoteOption = "",
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Reject a pending decision."""
    _command("reject", decision_id, note, server, as_json)
