"""``edgefleet alerts``: the alerts the rules opened, and the rules (``alerts rules ...``).

A rule is a condition over a model and/or a device group (default: the whole fleet):

- ``latency_p95`` -- p95 latency above each profile's SLA (``--sla-ratio``) or ``--sla-ms``
- ``error_rate`` -- errors / requests above ``--max-error-rate``
- ``drift`` -- ``--metric psi|js`` at or above ``--threshold`` on at least ``--share`` of
  the group's devices, for ``--windows`` consecutive windows of ``--window-hours``
- ``accuracy`` -- accuracy from labelled feedback below ``--min-accuracy``
- ``offline`` -- devices offline for longer than ``--offline-for`` (e.g. 30m)

Options a kind does not take are refused by the server, naming them. Every list/show
command takes ``--json`` and then prints only JSON on stdout.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json, fail, timestamp
from server.commands.rollouts import parse_duration

__all__ = [
    "Features",
    "MaxErrorRate",
    "Metric",
    "MinAccuracy",
    "MinDevices",
    "MinInferences",
    "MinLabels",
    "MinRequests",
    "MinSamples",
    "Share",
    "SlaMs",
    "SlaRatio",
    "Threshold",
    "WindowHours",
    "Windows",
    "app",
    "condition_body",
    "rules_app",
]

app = typer.Typer(help="Alerts opened by the rules (latency, errors, drift, accuracy, offline).")
rules_app = typer.Typer(help="Alert rules: a condition over a model and/or a device group.")
app.add_typer(rules_app, name="rules")

RuleArg = Annotated[str, typer.Argument(help="Rule name.")]
_SEVERITY_STYLE = {"info": "cyan", "warning": "yellow", "critical": "red"}

# The condition's options, shared with `edgefleet retraining policies create`.
WindowHours = Annotated[int | None, typer.Option(help="Hours in one window (default 1).")]
Windows = Annotated[
    int | None, typer.Option(help="Consecutive windows it must hold in (drift: 3, else 1).")
]
Metric = Annotated[str | None, typer.Option(help="drift: psi (default) or js.")]
Threshold = Annotated[
    float | None, typer.Option(help="drift: a device drifted at or above this (0.25 / 0.1).")
]
Share = Annotated[
    float | None, typer.Option(help="drift: share of devices that must drift (default 0.3).")
]
Features = Annotated[str | None, typer.Option(help="drift: only these features, comma-separated.")]
MinSamples = Annotated[
    int | None, typer.Option(help="drift: values a device needs on a feature (default 500).")
]
MinDevices = Annotated[
    int | None, typer.Option(help="drift: devices judged; offline: devices that fire it.")
]
SlaMs = Annotated[float | None, typer.Option(help="latency_p95: a fixed limit in ms.")]
SlaRatio = Annotated[
    float | None, typer.Option(help="latency_p95: the limit is the SLA times this.")
]
MinInferences = Annotated[
    int | None, typer.Option(help="latency_p95: inferences a window needs (default 100).")
]
MaxErrorRate = Annotated[float | None, typer.Option(help="error_rate: e.g. 0.05 for 5 %.")]
MinRequests = Annotated[
    int | None, typer.Option(help="error_rate: requests a window needs (default 100).")
]
MinAccuracy = Annotated[float | None, typer.Option(help="accuracy: the SLA, e.g. 0.9.")]
MinLabels = Annotated[
    int | None, typer.Option(help="accuracy: labels a window needs (default 50).")
]
OfflineFor = Annotated[str | None, typer.Option(help="offline: e.g. 30m, 2h.")]


def condition_body(kind: str, **options: Any) -> dict[str, Any]:
    """The API's ``condition`` from CLI options (those left out are left to the server)."""
    body: dict[str, Any] = {"kind": kind}
    for key, value in options.items():
        if value is None:
            continue
        if key == "features":
            value = [f.strip() for f in str(value).split(",") if f.strip()]
        elif key == "offline_for":
            value = parse_duration(str(value), option="--offline-for")
        body[key] = value
    return body


def _console() -> Console:
    return Console()


def _severity(value: str) -> str:
    return f"[{_SEVERITY_STYLE.get(value, 'white')}]{value}[/]"


def _status(value: str) -> str:
    return "[red]open[/]" if value == "open" else "[green]resolved[/]"


# ----------------------------------------------------------------------------- alerts


@app.command("list")
def list_alerts(
    status: Annotated[str, typer.Option(help="open (default), resolved, or all.")] = "open",
    rule: Annotated[str | None, typer.Option(help="Rule name.")] = None,
    kind: Annotated[str | None, typer.Option(help="Condition kind.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name.")] = None,
    group: Annotated[str | None, typer.Option(help="Device group.")] = None,
    severity: Annotated[str | None, typer.Option(help="info, warning or critical.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Open at some time since: 24h, 7d or an ISO time.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """List alerts, newest first."""
    if status not in ("open", "resolved", "all"):
        fail(f"--status {status!r}: use open, resolved or all", code=2)
    params = {
        k: v
        for k, v in {
            "status": None if status == "all" else status,
            "rule": rule,
            "kind": kind,
            "model": model,
            "group": group,
            "severity": severity,
            "since": since,
            "limit": limit,
        }.items()
        if v is not None
    }
    with api(server) as client:
        alerts = client.get("/alerts", params=params)
    if as_json:
        emit_json(alerts)
        return
    table = Table()
    for column in ("id", "severity", "status", "rule", "subject", "opened", "summary"):
        table.add_column(column, no_wrap=column not in ("summary", "subject"))
    for a in alerts:
        table.add_row(
            str(a["id"]),
            _severity(a["severity"]),
            _status(a["status"]),
            a["rule"],
            a["subject"],
            timestamp(a["opened_at"]),
            a["summary"],
        )
    console = _console()
    console.print(table)
    if not alerts:
        console.print("no alerts match")


@app.command("show")
def show(
    alert_id: Annotated[int, typer.Argument(help="Alert id.")],
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show an alert: what fired, its evidence per window, its webhook deliveries."""
    with api(server) as client:
        a = client.get(f"/alerts/{alert_id}")
    if as_json:
        emit_json(a)
        return
    console = _console()
    console.print(
        f"[bold]alert {a['id']}[/] {_severity(a['severity'])} {_status(a['status'])} · "
        f"rule {a['rule']} ({a['kind']}) · {a['subject']}"
    )
    console.print(f"  opened {timestamp(a['opened_at'])} · {a['summary']}")
    if a["resolved_at"]:
        console.print(f"  resolved {timestamp(a['resolved_at'])} · {a['resolution']}")
    windows = a["evidence"].get("windows", [])
    if windows:
        table = Table(title="evidence when it opened", title_justify="left")
        for column in ("window", "verdict", "value", "limit", "summary"):
            table.add_column(column, no_wrap=column != "summary")
        for w in windows:
            value = "-" if w.get("value") is None else f"{w['value']:.4g}"
            limit = "-" if w.get("threshold") is None else f"{w['threshold']:.4g}"
            span = f"{timestamp(w['start'])} → {w['end'][11:16]}"
            table.add_row(
                span,
                w["verdict"],
                value,
                limit,
                w["summary"],
            )
        console.print(table)
    devices = a["evidence"].get("devices") or []
    if devices:
        shown = ", ".join(
            d["device_id"] + (f" ({d['feature']} {d['value']:.3g})" if "feature" in d else "")
            for d in devices[:10]
        )
        more = f" and {len(devices) - 10} more" if len(devices) > 10 else ""
        console.print(f"  devices: {shown}{more}")
    if a["deliveries"]:
        table = Table(title="webhook deliveries", title_justify="left")
        for column in ("event", "webhook", "status", "attempts", "last"):
            table.add_column(column)
        for d in a["deliveries"]:
            last = d["last_error"] or (
                f"HTTP {d['last_status_code']}" if d["last_status_code"] else "-"
            )
            table.add_row(d["event"], d["webhook"], d["status"], str(d["attempts"]), last)
        console.print(table)


# ----------------------------------------------------------------------------- rules


def _print_rule(r: dict[str, Any]) -> None:
    console = _console()
    scope = f"group {r['group']}" if r["group"] else "the fleet"
    model = f"{r['model']} in " if r["model"] else ""
    state = "enabled" if r["enabled"] else "[yellow]disabled[/]"
    console.print(
        f"[bold]{r['name']}[/] {r['kind']} · {model}{scope} · {_severity(r['severity'])} · "
        f"{state} · {r['open_alerts']} open"
    )
    condition = {k: v for k, v in r["condition"].items() if k != "kind"}
    console.print(f"  condition: {json.dumps(condition)}")
    if r["webhook"]:
        console.print(f"  webhook: {r['webhook']}")
    if r["description"]:
        console.print(f"  {r['description']}")
    if r["last_error"]:
        console.print(f"  [red]last evaluation failed:[/] {r['last_error']}")


@rules_app.command("list")
def list_rules(
    model: Annotated[str | None, typer.Option(help="Model name.")] = None,
    group: Annotated[str | None, typer.Option(help="Device group.")] = None,
    kind: Annotated[str | None, typer.Option(help="Condition kind.")] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """List alert rules."""
    params = {k: v for k, v in {"model": model, "group": group, "kind": kind}.items() if v}
    with api(server) as client:
        rules = client.get("/alert-rules", params=params)
    if as_json:
        emit_json(rules)
        return
    table = Table()
    for column in ("rule", "kind", "model", "scope", "severity", "enabled", "open", "evaluated"):
        table.add_column(column, no_wrap=True)
    for r in rules:
        table.add_row(
            r["name"],
            r["kind"],
            r["model"] or "-",
            r["group"] or "fleet",
            _severity(r["severity"]),
            "yes" if r["enabled"] else "no",
            str(r["open_alerts"]),
            timestamp(r["last_evaluated_at"]) + (" [red](failed)[/]" if r["last_error"] else ""),
        )
    console = _console()
    console.print(table)
    if not rules:
        console.print("no rules; add one with: edgefleet alerts rules create NAME --kind ...")


@rules_app.command("show")
def show_rule(name: RuleArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Show a rule: its condition, scope, webhook and last evaluation."""
    with api(server) as client:
        r = client.get(f"/alert-rules/{name}")
    if as_json:
        emit_json(r)
        return
    _print_rule(r)


@rules_app.command("create")
def create_rule(
    name: RuleArg,
    kind: Annotated[str, typer.Option(help="latency_p95, error_rate, drift, accuracy or offline.")],
    model: Annotated[str | None, typer.Option(help="Model (every kind but offline).")] = None,
    group: Annotated[str | None, typer.Option(help="Device group (default: the fleet).")] = None,
    severity: Annotated[str, typer.Option(help="info, warning or critical.")] = "warning",
    webhook: Annotated[str | None, typer.Option(help="POST alerts to this URL.")] = None,
    description: Annotated[str, typer.Option(help="What the rule is for.")] = "",
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
    offline_for: OfflineFor = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create an alert rule; the server judges it at once and then every interval."""
    condition = condition_body(
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
        offline_for=offline_for,
    )
    body = {
        "name": name,
        "model": model,
        "group": group,
        "condition": condition,
        "severity": severity,
        "webhook_url": webhook,
        "description": description,
    }
    with api(server) as client:
        r = client.post("/alert-rules", json=body)
    if as_json:
        emit_json(r)
        return
    _print_rule(r)


def _set_enabled(name: str, enabled: bool, server: str | None, as_json: bool) -> None:
    with api(server) as client:
        r = client.request("PATCH", f"/alert-rules/{name}", json={"enabled": enabled})
    if as_json:
        emit_json(r)
        return
    _print_rule(r)


@rules_app.command("enable")
def enable_rule(name: RuleArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Enable a rule."""
    _set_enabled(name, True, server, as_json)


@rules_app.command("disable")
def disable_rule(name: RuleArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Disable a rule (its open alerts resolve)."""
    _set_enabled(name, False, server, as_json)


@rules_app.command("delete")
def delete_rule(name: RuleArg, server: ServerOption = None) -> None:
    """Delete a rule (its alerts stay, resolved)."""
    with api(server) as client:
        client.delete(f"/alert-rules/{name}")
    _console().print(f"rule {name} deleted")
