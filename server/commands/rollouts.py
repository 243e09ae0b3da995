"""``edgefleet rollouts``: ship a model version -- or, with ``--agent-version``, a published
agent release -- to a device group in phases, watch it, steer it.

Also the pin commands that :mod:`server.cli` registers under ``edgefleet devices``
(``pin`` / ``unpin``): a pin holds one device on one version, whatever rolls out.

Durations are written ``90s``, ``10m``, ``1h30m``, ``2d`` (a bare number is seconds);
phases as the API takes them (``5,25,100`` or ``3dev,50,100``). Every list/show command
takes ``--json`` and then prints only JSON on stdout. ``watch`` refreshes until the
rollout is completed (exit 0) or aborted (exit 1), or until Ctrl-C (exit 0).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from server.commands.client import JsonOption, ServerOption, api, emit_json, fail, timestamp

__all__ = ["app", "parse_duration", "pin", "unpin"]

app = typer.Typer(help="Staged rollouts of a model version to a device group, with health gates.")

RolloutArg = Annotated[str, typer.Argument(help="Rollout id.")]
DeviceArg = Annotated[str, typer.Argument(help="Device id.")]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_FINAL = ("completed", "aborted")
_STATUS_STYLE = {
    "pending": "white",
    "running": "cyan",
    "waiting_approval": "yellow",
    "paused": "yellow",
    "aborting": "red",
    "aborted": "red",
    "completed": "green",
}


def _console() -> Console:
    return Console()


def parse_duration(text: str, *, option: str = "duration") -> float:
    """``"90s"``, ``"10m"``, ``"1h30m"``, ``"2d"`` or ``"45"`` -> seconds; exits on a bad one."""
    cleaned = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", cleaned):
        return float(cleaned)
    if cleaned and "".join(m.group(0) for m in _DURATION.finditer(cleaned)) == cleaned:
        return sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(cleaned))
    fail(f"{option} {text!r}: write e.g. 90s, 10m, 1h30m or 2d", code=2)
    raise AssertionError("unreachable")  # fail() exits


def _status_text(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


# ----------------------------------------------------------------------------- rendering


def _what(r: dict[str, Any]) -> str:
    """What a rollout moves: ``pumps v3`` or ``agent 0.2.0``."""
    if r.get("kind") == "agent":
        return f"agent {r.get('agent_version')}"
    return f"{r['model_name']} v{r['model_version']}"


def _summary_line(r: dict[str, Any]) -> str:
    reason = f" ({r['status_reason']})" if r.get("status_reason") else ""
    return (
        f"[bold]{r['id']}[/] {_what(r)} → group {r['group']} · "
        f"{_status_text(r['status'])}{reason} · phase {r['phase']}/{r['phases']}"
    )


def _bar(done: int, total: int, width: int = 8) -> str:
    filled = 0 if total <= 0 else round(width * min(done, total) / total)
    return "█" * filled + "░" * (width - filled) + f" {done}/{total}"


def _phases_table(r: dict[str, Any]) -> Table:
    """One row per phase; fits an 80-column terminal."""
    table = _table("phases")
    table.add_column("phase", no_wrap=True)
    table.add_column("progress", no_wrap=True)
    for column in ("ok", "failed", "back", "updating"):
        table.add_column(column, justify="right")
    table.add_column("state")
    earlier = 0
    for p in r["phase_progress"]:
        wanted = max(p["target"] - earlier, p["targeted"])
        earlier += p["targeted"]
        done = p["activated"] + p["failed"] + p["timed_out"] + p["rolled_back"]
        table.add_row(
            f"{p['phase']}: {p['size']}",
            _bar(done, wanted),
            str(p["activated"]),
            str(p["failed"] + p["timed_out"]),
            str(p["rolled_back"]),
            str(p["in_progress"] + p["retry_pending"]),
            p["state"] + (" (approval)" if p["approval_required"] else ""),
        )
    return table


def _table(title: str) -> Table:
    return Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)


def _gates_table(r: dict[str, Any]) -> Table:
    table = _table("health gates")
    table.add_column("gate", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("summary")
    style = {"holds": "green", "breached": "red", "insufficient_data": "yellow"}
    for g in r["gates"]:
        value = "-" if g["value"] is None else f"{g['value']:.4g}"
        table.add_row(
            g["gate"],
            f"[{style.get(g['status'], 'white')}]{g['status'].replace('_', ' ')}[/]",
            value,
            f"{g['threshold']:.4g}",
            g["summary"],
        )
    return table


def _devices_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = _table(title)
    for column in ("device", "state", "phase", "tries", "reason"):
        table.add_column(column, no_wrap=True)
    table.add_column("detail")
    for d in rows:
        table.add_row(
            d["device_id"],
            d["state"],
            "-" if d["phase"] is None else str(d["phase"]),
            str(d["attempts"]),
            d["reason"] or "-",
            d["detail"] or "-",
        )
    return table


def _excluded_table(rows: list[dict[str, Any]]) -> Table:
    table = _table("excluded devices")
    for column in ("device", "profile", "reason"):
        table.add_column(column, no_wrap=True)
    table.add_column("why")
    for d in rows:
        table.add_row(d["device_id"], d["profile"], d["reason"] or "-", d["detail"] or "-")
    return table


def _render(r: dict[str, Any], *, all_devices: bool = True) -> Group:
    parts: list[Any] = [
        Text.from_markup(_summary_line(r)),
        Text(
            f"  {r['group_members']} device(s) in the group, {r['eligible']} eligible · "
            f"started {timestamp(r['started_at'])} · updated {timestamp(r['updated_at'])}"
        ),
        _phases_table(r),
    ]
    if r["gates"]:
        parts.append(_gates_table(r))
    shown = (
        r["devices"]
        if all_devices
        else [d for d in r["devices"] if d["state"] not in ("activated",)]
    )
    if shown:
        parts.append(_devices_table(shown, "devices" if all_devices else "devices not activated"))
    if r["excluded"]:
        parts.append(_excluded_table(r["excluded"]))
    return Group(*parts)


# ----------------------------------------------------------------------------- commands


@app.command("create")
def create(
    group: Annotated[str, typer.Option(help="Device group (static or dynamic).")],
    model: Annotated[str | None, typer.Option(help="Model name.")] = None,
    version: Annotated[
        str | None, typer.Option(help="Version number, alias (e.g. production) or latest.")
    ] = None,
    agent_version: Annotated[
        str | None,
        typer.Option(help="Roll out this published agent release instead of a model."),
    ] = None,
    health_timeout: Annotated[
        str | None,
        typer.Option(help="Agent rollouts: time the new agent has to report healthy, e.g. 5m."),
    ] = None,
    phases: Annotated[
        str, typer.Option(help="Cumulative waves: percentages (5,25,100) or a count (3dev).")
    ] = "5,25,100",
    wait: Annotated[
        str | None, typer.Option(help="Observation time after each phase, e.g. 10m.")
    ] = None,
    rate: Annotated[int | None, typer.Option(help="At most this many devices per minute.")] = None,
    timeout: Annotated[
        str | None, typer.Option(help="A device silent this long after targeting fails, e.g. 15m.")
    ] = None,
    on_breach: Annotated[
        str | None, typer.Option(help="What a breached health gate does: pause or abort.")
    ] = None,
    approval: Annotated[
        bool, typer.Option("--approval", help="Each phase but the last waits for 'approve'.")
    ] = False,
    max_failure_rate: Annotated[
        float | None,
        typer.Option(
            help="Activation gate: the share of a phase's devices that may fail (0 = none)."
        ),
    ] = None,
    gates: Annotated[
        str | None,
        typer.Option(
            help="Health gates as JSON or @FILE, e.g. '{\"max_error_rate\": 0.02}' "
            "(see the API's HealthThresholds); unset fields keep their defaults."
        ),
    ] = None,
    max_attempts: Annotated[
        int | None,
        typer.Option(help="Times a device that failed the update is sent it (1 = no retry)."),
    ] = None,
    rollout_id: Annotated[
        str | None, typer.Option("--id", help="Rollout id (default: <model>-v<version>-<random>).")
    ] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a rollout of a model version (--model, --version) or of an agent release
    (--agent-version); the server starts it at once (phase 1 is the canary)."""
    if agent_version is not None and (model is not None or version is not None):
        fail("give --model and --version, or --agent-version, not both", code=2)
    if agent_version is None and (model is None or version is None):
        fail("give --model and --version (or --agent-version for an agent rollout)", code=2)
    if health_timeout is not None and agent_version is None:
        fail("--health-timeout is for agent rollouts (--agent-version)", code=2)
    if on_breach is not None and on_breach not in ("pause", "abort"):
        fail(f"--on-breach {on_breach!r}: use pause or abort", code=2)
    if rate is not None and rate < 1:
        fail("--rate must be at least 1 device per minute", code=2)
    if max_failure_rate is not None and not 0 <= max_failure_rate <= 1:
        fail("--max-failure-rate must be between 0 and 1", code=2)
    if max_attempts is not None and max_attempts < 1:
        fail("--max-attempts must be at least 1", code=2)
    body: dict[str, Any] = {"group": group, "phases": phases, "approval": approval}
    thresholds = _json_option(gates, option="--gates") if gates is not None else {}
    if max_failure_rate is not None:
        thresholds["max_activation_failure_rate"] = max_failure_rate
    if thresholds:
        body["gates"] = thresholds
    if max_attempts is not None:
        body["retry"] = {"max_attempts": max_attempts}
    if agent_version is not None:
        body["agent_version"] = agent_version
    else:
        body.update(model=model, version=version)
    if health_timeout is not None:
        body["health_timeout_s"] = round(parse_duration(health_timeout, option="--health-timeout"))
    if wait is not None:
        body["wait_between_phases"] = parse_duration(wait, option="--wait")
    if timeout is not None:
        body["device_timeout"] = parse_duration(timeout, option="--timeout")
    if rate is not None:
        body["max_devices_per_minute"] = rate
    if on_breach is not None:
        body["on_breach"] = on_breach
    if rollout_id is not None:
        body["id"] = rollout_id
    with api(server) as client:
        r = client.post("/rollouts", json=body)
    if as_json:
        emit_json(r)
        return
    console = _console()
    console.print(_summary_line(r))
    console.print(
        f"  phases {', '.join(p['size'] for p in r['phase_progress'])} over "
        f"{r['eligible']} eligible of {r['group_members']} device(s)"
        + (f"; {len(r['excluded'])} excluded" if r["excluded"] else "")
    )
    console.print(f"  follow it: edgefleet rollouts watch {r['id']}")


def _json_option(text: str, *, option: str) -> dict[str, Any]:
    """A JSON object given inline or as @FILE; exits naming the option when it is not one."""
    source = text
    if text.startswith("@"):
        try:
            source = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as e:
            fail(f"{option}: cannot read {text[1:]}: {e.strerror or e}", code=2)
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        fail(f"{option}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", code=2)
    if not isinstance(value, dict):
        fail(f"{option}: give a JSON object, e.g. '{{\"max_error_rate\": 0.02}}'", code=2)
    return value


@app.command("list")
def list_rollouts(
    status: Annotated[
        str | None,
        typer.Option(
            help="pending, running, waiting_approval, paused, aborting, aborted, completed."
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name.")] = None,
    kind: Annotated[str | None, typer.Option(help="model or agent.")] = None,
    group: Annotated[str | None, typer.Option(help="Device group.")] = None,
    active: Annotated[
        bool | None, typer.Option("--active/--finished", help="Only unfinished / finished ones.")
    ] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """List rollouts, newest first."""
    params: dict[str, Any] = {
        k: v
        for k, v in {
            "status": status,
            "model": model,
            "kind": kind,
            "group": group,
            "active": None if active is None else str(active).lower(),
        }.items()
        if v is not None
    }
    with api(server) as client:
        rollouts = client.get("/rollouts", params=params)
    if as_json:
        emit_json(rollouts)
        return
    table = Table()
    widest = max((len(r["id"]) for r in rollouts), default=7)
    table.add_column("rollout", no_wrap=True, min_width=widest)
    table.add_column("kind", no_wrap=True)
    table.add_column("what", no_wrap=True)
    for column in ("group", "status", "phase", "devices", "updated"):
        table.add_column(column)
    for r in rollouts:
        counts = r["counts"]
        failed = counts.get("failed", 0) + counts.get("timed_out", 0)
        moving = counts.get("in_progress", 0) + counts.get("retry_pending", 0)
        table.add_row(
            r["id"],
            r.get("kind", "model"),
            _what(r),
            r["group"],
            _status_text(r["status"]),
            f"{r['phase']}/{r['phases']}",
            f"{counts.get('activated', 0)} ok, {failed} failed, {moving} updating",
            timestamp(r["updated_at"]),
        )
    console = _console()
    console.print(table)
    if not rollouts:
        console.print("no rollouts match")


@app.command("show")
def show(rollout_id: RolloutArg, server: ServerOption = None, as_json: JsonOption = False) -> None:
    """Show a rollout: phases, gates against their thresholds, every device and exclusion."""
    with api(server) as client:
        r = client.get(f"/rollouts/{rollout_id}")
    if as_json:
        emit_json(r)
        return
    _console().print(_render(r))


@app.command("watch")
def watch(
    rollout_id: RolloutArg,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
    server: ServerOption = None,
) -> None:
    """Live progress per phase until the rollout completes or aborts (or Ctrl-C)."""
    if interval <= 0:
        fail("--interval must be positive", code=2)
    console = _console()
    with api(server) as client:
        r = client.get(f"/rollouts/{rollout_id}")
        try:
            with Live(_render(r, all_devices=False), console=console, auto_refresh=False) as live:
                while r["status"] not in _FINAL:
                    time.sleep(interval)  # polling the API: there is no event to wait on
                    r = client.get(f"/rollouts/{rollout_id}")
                    live.update(_render(r, all_devices=False), refresh=True)
        except KeyboardInterrupt:
            console.print("stopped watching; the rollout goes on")
            return
    if r["status"] == "aborted":
        raise typer.Exit(1)


def _command(
    rollout_id: str, action: str, body: dict[str, Any], server: str | None, as_json: bool
) -> None:
    with api(server) as client:
        r = client.post(f"/rollouts/{rollout_id}/{action}", json=body)
    if as_json:
        emit_json(r)
        return
    _console().print(_summary_line(r))


@app.command("pause")
def pause(
    rollout_id: RolloutArg,
    reason: Annotated[str | None, typer.Option(help="Why (shown with the status).")] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Pause: no new targets or retries; devices already updating finish."""
    _command(rollout_id, "pause", {"reason": reason}, server, as_json)


@app.command("resume")
def resume(
    rollout_id: RolloutArg,
    override_gates: Annotated[
        bool, typer.Option("--override-gates", help="Ignore breached gates in this phase.")
    ] = False,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resume a paused rollout."""
    _command(rollout_id, "resume", {"override_gates": override_gates}, server, as_json)


@app.command("approve")
def approve(
    rollout_id: RolloutArg,
    phase: Annotated[
        int | None, typer.Option(help="The phase you approve (1-based; must be the current).")
    ] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Approve the current phase, so the rollout moves on to the next."""
    _command(rollout_id, "approve", {"phase": phase}, server, as_json)


@app.command("abort")
def abort(
    rollout_id: RolloutArg,
    reason: Annotated[str | None, typer.Option(help="Why (shown with the status).")] = None,
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Abort: every device the rollout moved goes back to its previous version."""
    _command(rollout_id, "abort", {"reason": reason}, server, as_json)


# ----------------------------------------------------------------------------- pins


def pin(
    device_id: DeviceArg,
    model: Annotated[str, typer.Option(help="Model name.")],
    version: Annotated[str, typer.Option(help="Version number or alias.")],
    note: Annotated[str, typer.Option(help="Why (kept with the pin).")] = "",
    server: ServerOption = None,
    as_json: JsonOption = False,
) -> None:
    """Pin a device to a model version: it runs that version whatever rolls out."""
    with api(server) as client:
        p = client.put(
            f"/devices/{device_id}/pins/{model}", json={"version": version, "note": note}
        )
    if as_json:
        emit_json(p)
        return
    _console().print(f"{p['device_id']}: pinned to {p['model_name']} v{p['model_version']}")


def unpin(
    device_id: DeviceArg,
    model: Annotated[str, typer.Option(help="Model name.")],
    server: ServerOption = None,
) -> None:
    """Remove a device's pin on a model: it follows the rollouts again."""
    with api(server) as client:
        client.delete(f"/devices/{device_id}/pins/{model}")
    _console().print(f"{device_id}: no longer pinned on {model}")
