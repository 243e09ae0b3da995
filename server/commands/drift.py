"""``edgefleet drift``: a model version's drift and SLA view, from the server's API.

Prints the features by PSI with warn / act marks, the share of devices that drifted,
the devices ranked by PSI, the prediction shift and the latency and error summary;
``--json`` prints the API's answer (plus ``timeseries`` with ``--feature``) and
nothing else on stdout.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from server.commands.client import JsonOption, ServerOption, api, emit_json

__all__ = ["drift"]

MAX_FEATURE_ROWS = 25

_MARK = {"act": "[bold red]ACT[/]", "warn": "[yellow]warn[/]", "ok": "[green]ok[/]"}
_RANK = {"ok": 0, "warn": 1, "act": 2}


def _console() -> Console:
    return Console()


def _time(text: str) -> str:
    return text[:16].replace("T", " ")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g} ms"


def _print(report: dict[str, Any], series: dict[str, Any] | None) -> None:
    console = _console()
    scope = f"group {report['group']}" if report["group"] else "the whole fleet"
    devices = report["devices"]
    if devices["in_scope"] is not None and not report["group"]:
        scope = f"{devices['in_scope']} devices"
    console.print(
        f"[bold]{report['model']} v{report['version']}[/] · {scope} · "
        f"{_time(report['since'])} to {_time(report['until'])} UTC · "
        f"reference {report['reference_id'][:12]}"
    )
    if report["widened"]:
        console.print(
            "[yellow]note:[/] hourly rows of the range's ends are deleted; whole days shown"
        )
    if report["clipped"]:
        console.print(
            "[yellow]note:[/] the start of the range is deleted (retention); it was moved up"
        )
    thresholds = report["thresholds"]
    features = sorted(report["features"], key=lambda f: -f["psi"])
    if not features:
        console.print("no drift counts in this range")
    else:
        table = Table(
            "feature", "PSI", "JS", "KS", "values", "devices ≥ act", "", title="features by PSI"
        )
        for f in features[:MAX_FEATURE_ROWS]:
            table.add_row(
                f["name"],
                f"{f['psi']:.3f}",
                f"{f['js_distance']:.3f}",
                f"{f['ks']:.3f}",
                f"{f['n']:,}",
                _share(f["devices_act_share"]),
                _MARK[f["level"]],
            )
        console.print(table)
        if len(features) > MAX_FEATURE_ROWS:
            rest = features[MAX_FEATURE_ROWS:]
            worst = max((f["level"] for f in rest), key=_RANK.__getitem__)
            console.print(f"  ... and {len(rest)} more features (worst: {worst})")
    console.print(
        f"devices drifted (PSI ≥ {thresholds['act']}): [bold]{devices['act']}[/] of "
        f"{devices['evaluated']} evaluated ({_share(devices['drifted_share'])}) · warn "
        f"(≥ {thresholds['warn']}): {devices['warn']} · "
        f"{devices['with_drift_data'] - devices['evaluated']} with fewer than "
        f"{thresholds['min_samples']} values"
    )
    if report["top_devices"]:
        table = Table(
            "device", "PSI", "feature", "values", "features ≥ act", "", title="top devices"
        )
        for d in report["top_devices"]:
            table.add_row(
                d["device_id"],
                f"{d['psi']:.3f}",
                d["feature"],
                f"{d['n']:,}",
                str(d["features_act"]),
                _MARK[d["level"]],
            )
        console.print(table)
    predictions = report["predictions"] or {}
    parts = [
        f"{label} PSI {shift['psi']:.3f} {_MARK[shift['level']]}"
        for label, shift in (
            ("classes", predictions.get("classes")),
            ("confidence", predictions.get("confidence")),
            ("value", predictions.get("value")),
        )
        if shift
    ]
    if parts:
        console.print("predictions: " + " · ".join(parts))
    sla = report["sla"]
    console.print(
        f"latency p50 {_ms(sla['p50_ms'])} · p95 {_ms(sla['p95_ms'])} · p99 {_ms(sla['p99_ms'])}"
        f" · errors {sla['errors']:,} of {sla['inferences'] + sla['errors']:,} "
        f"({_rate(sla['error_rate'])}) · {sla['windows']:,} windows"
    )
    if series is not None:
        for line in series["series"]:
            table = Table(
                "from",
                "to",
                "values",
                "PSI",
                "JS",
                "",
                title=f"{line['feature']} per {series['bucket']}",
            )
            for p in line["points"]:
                table.add_row(
                    _time(p["start"]),
                    _time(p["end"]),
                    f"{p['n']:,}",
                    "-" if p["psi"] is None else f"{p['psi']:.3f}",
                    "-" if p["js_distance"] is None else f"{p['js_distance']:.3f}",
                    "" if p["level"] is None else _MARK[p["level"]],
                )
            console.print(table)


def drift(
    model: Annotated[str, typer.Option("--model", help="Model name.")],
    version: Annotated[
        str | None,
        typer.Option(help="Version, alias or 'latest' (default: the newest with data)."),
    ] = None,
    group: Annotated[str | None, typer.Option(help="Only this group's devices.")] = None,
    devices: Annotated[
        str | None, typer.Option(help="Only these devices (comma-separated ids).")
    ] = None,
    since: Annotated[
        str, typer.Option(help="Start: 30m, 24h, 7d, ... ago, or an ISO 8601 time.")
    ] = "24h",
    until: Annotated[str | None, typer.Option(help="End, as --since (default: now).")] = None,
    top: Annotated[int, typer.Option(help="Devices in the ranking.")] = 10,
    min_samples: Annotated[
        int, typer.Option(help="Values a device needs on a feature before its PSI counts.")
    ] = 500,
    feature: Annotated[
        list[str] | None,
        typer.Option("--feature", help="Also show this feature per hour or day; repeatable."),
    ] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a model's drift (features by PSI, devices drifted) and its latency and errors."""
    params: dict[str, Any] = {
        k: v
        for k, v in {
            "model": model,
            "version": version,
            "group": group,
            "devices": devices,
            "since": since,
            "until": until,
            "top": top,
            "min_samples": min_samples,
        }.items()
        if v is not None
    }
    series = None
    with api(server) as client:
        report = client.get("/drift", params=params)
        if feature:
            series = client.get(
                "/drift/timeseries",
                params={k: v for k, v in params.items() if k not in ("top", "min_samples")}
                | {"version": str(report["version"]), "feature": feature},
            )
    if as_json:
        emit_json(report if series is None else report | {"timeseries": series})
        return
    _print(report, series)
