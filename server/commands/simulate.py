"""``edgefleet simulate``: a fleet of simulated devices against a running server and broker.

The devices enroll through the API (a provisioning token for the group is created when
none is given), connect to the broker with their own credentials, follow their signed
desired states (fetching artifacts by blocks, verifying them) and send telemetry with
real drift sketches -- shifted by ``--drift`` for the features it names, and for a share
of the fleet by ``--drift-group`` (``0.3:p5=2,p6=-1``: the next 30 % of the devices, by
index, drift ``p5`` by 2 and ``p6`` by -1 standard deviations). With drift groups every
device carries the tag ``drift_group`` (``none``, ``1``, ``2``, ...), so the server's
drift view can be asked per group.

All devices run in this one process, on one thread (:mod:`server.simulator.fleet`);
a report costs the simulator tens of microseconds, so a thousand devices reporting
every second take a fraction of a core.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import Progress
from rich.table import Table

from server.commands.client import ApiError, ServerOption, api, emit_json, err, fail

__all__ = ["simulate"]


def _pairs(values: list[str], what: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name:
            fail(f"{what} {value!r}: expected NAME=VALUE", code=2)
        pairs[name.strip()] = rest.strip()
    return pairs


def _drift_groups(specs: list[str], devices: int) -> list[tuple[str, dict[str, float]]]:
    """The drift group (its number, its shifts) of the first devices by index, from
    ``SHARE:FEATURE=SHIFT[,FEATURE=SHIFT...]`` specs; devices past them are in none."""
    by_device: list[tuple[str, dict[str, float]]] = []
    for number, spec in enumerate(specs, start=1):
        share_text, sep, rest = spec.partition(":")
        try:
            share = float(share_text)
        except ValueError:
            share = -1.0
        if not sep or not 0 < share <= 1:
            fail(f"--drift-group {spec!r}: expected SHARE:FEATURE=SHIFT, 0 < SHARE <= 1", code=2)
        shifts = {}
        for name, value in _pairs([p for p in rest.split(",") if p], "--drift-group").items():
            try:
                shifts[name] = float(value)
            except ValueError:
                fail(f"--drift-group {spec!r}: the shift of {name} must be a number", code=2)
        if not shifts:
            fail(f"--drift-group {spec!r}: name at least one FEATURE=SHIFT", code=2)
        by_device += [(str(number), shifts)] * round(share * devices)
    if len(by_device) > devices:
        fail("--drift-group: the shares add up to more than the whole fleet", code=2)
    return by_device


def _stats_table(stats: object, elapsed: float) -> Table:
    table = Table(title=f"simulated fleet, {elapsed:.0f} s", show_header=False)
    for name in (
        "devices",
        "connected",
        "installs",
        "rejections",
        "telemetry_sent",
        "telemetry_acked",
        "telemetry_skipped",
    ):
        table.add_row(name.replace("_", " "), str(getattr(stats, name)))
    versions = getattr(stats, "active_versions", {})
    table.add_row("running", ", ".join(f"{k}: {v}" for k, v in sorted(versions.items())) or "-")
    table.add_row("MB received", f"{getattr(stats, 'bytes_received', 0) / 1e6:.1f}")
    return table


def simulate(
    devices: Annotated[int, typer.Option(min=1, max=20000, help="How many devices.")] = 10,
    group: Annotated[str, typer.Option(help="Static group they join (created if missing).")] = (
        "simulated"
    ),
    profile: Annotated[str, typer.Option(help="Their device profile.")] = "edge-x86_64-litert",
    prefix: Annotated[str, typer.Option(help="Device ids are PREFIX-0000, PREFIX-0001, ...")] = (
        "sim"
    ),
    token: Annotated[
        str | None, typer.Option(help="Provisioning token (default: one is created).")
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="mqtt://host:port (default: what enrollment says).")
    ] = None,
    report_interval: Annotated[float, typer.Option(help="Seconds between telemetry windows.")] = (
        10.0
    ),
    inferences: Annotated[int, typer.Option(help="Inferences per window and model.")] = 100,
    drift: Annotated[
        list[str] | None,
        typer.Option(help="FEATURE=SHIFT in standard deviations (repeatable)."),
    ] = None,
    drift_group: Annotated[
        list[str] | None,
        typer.Option(
            help="SHARE:FEATURE=SHIFT[,FEATURE=SHIFT...]: the next SHARE of the devices drift "
            "so (repeatable; devices are tagged drift_group=1, 2, ...).",
        ),
    ] = None,
    latency_ms: Annotated[float, typer.Option(help="Median inference latency.")] = 8.0,
    error_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Failing share.")] = 0.0,
    tag: Annotated[list[str] | None, typer.Option(help="KEY=VALUE tag (repeatable).")] = None,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: Ctrl-C).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print final figures as JSON.")] = False,
    server: ServerOption = None,
) -> None:
    """Enroll simulated devices and run them until Ctrl-C (or --duration)."""
    from server.errors import ServerError
    from server.profiles import get_profile
    from server.simulator import Behaviour, FleetSimulator, SimulatedDevice
    from server.simulator.enroll import enroll_devices
    from shared.signing import VerifyKey

    shifts = {}
    for name, value in _pairs(drift or [], "--drift").items():
        try:
            shifts[name] = float(value)
        except ValueError:
            fail(f"--drift {name}={value}: the shift must be a number", code=2)
    tags = _pairs(tag or [], "--tag")
    groups = _drift_groups(drift_group or [], devices)

    def group_of(index: int) -> tuple[str, dict[str, float]]:
        return groups[index] if index < len(groups) else ("none", {})

    def device_tags(index: int) -> dict[str, str]:
        return {**tags, "drift_group": group_of(index)[0]} if groups else tags

    try:
        device_profile = get_profile(profile)
    except ServerError as e:
        fail(f"profile {profile!r}: {e}", code=2)
    ids = [f"{prefix}-{i:04d}" for i in range(devices)]
    with api(server) as client:
        if token is None:
            try:
                client.get(f"/groups/{urllib.parse.quote(group)}")
            except ApiError as e:
                if e.status_code != 404:
                    raise
                client.post("/groups", json={"name": group})
            token = client.post(
                "/provisioning-tokens",
                json={
                    "name": f"simulate {devices} x {profile}",
                    "group": group,
                    "profile": profile,
                    "expires_in_seconds": 3600,
                    "max_uses": devices,
                    "auto_accept": True,
                },
            )["token"]
        console = Console(stderr=True)
        with Progress(console=console, transient=True, disable=as_json) as progress:
            task = progress.add_task("enrolling", total=devices)
            enrolled = enroll_devices(
                client,
                token=token,
                device_ids=ids,
                profile=device_profile,
                tags=device_tags,
                progress=lambda n: progress.update(task, completed=n),
            )
    broker_url = broker or enrolled[0].broker_url
    if not broker_url:
        fail("the server names no broker for devices; give --broker mqtt://HOST:PORT", code=2)
    parsed = urllib.parse.urlsplit(broker_url)
    if parsed.scheme not in ("mqtt", "tcp") or not parsed.hostname:
        fail(f"--broker {broker_url!r}: expected mqtt://HOST:PORT (TLS is not simulated)", code=2)
    root = VerifyKey.from_base64(enrolled[0].root_public_key)
    behaviours = {
        name: Behaviour(latency_ms=latency_ms, error_rate=error_rate, drift={**shifts, **extra})
        for name, extra in [("none", {}), *dict(groups).items()]
    }
    passwords = {e.device_id: (e.username, e.password) for e in enrolled}
    fleet = FleetSimulator(
        [
            SimulatedDevice(
                e.device_id,
                profile=device_profile.name,
                runtime=(device_profile.runtime.name, device_profile.runtime.version),
                arch=device_profile.arch,
                root_keys=[root],
                behaviour=behaviours[group_of(index)[0]],
                wall_clock=lambda: datetime.now(UTC),
            )
            for index, e in enumerate(enrolled)
        ],
        host=parsed.hostname,
        port=parsed.port or 1883,
        credentials=passwords.get,
        report_interval=report_interval,
        inferences_per_report=inferences,
    )
    pending = [e.device_id for e in enrolled if e.status != "accepted"]
    if pending:
        err.print(
            f"[yellow]{len(pending)} devices wait for acceptance[/] (edgefleet devices accept)"
        )
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fleet.start()
    started = time.monotonic()
    try:
        live = None if as_json else Live(console=Console(stderr=True), auto_refresh=False)
        with live or contextlib.nullcontext():
            while not stop.wait(1.0):
                elapsed = time.monotonic() - started
                if live is not None:
                    live.update(_stats_table(fleet.stats(), elapsed), refresh=True)
                if duration is not None and elapsed >= duration:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
        signal.signal(signal.SIGTERM, previous)
    stats = fleet.stats()
    if as_json:
        emit_json(stats.__dict__)
    else:
        Console().print(_stats_table(stats, time.monotonic() - started))
