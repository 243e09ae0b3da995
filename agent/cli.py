"""The ``edgefleet-agent`` command. Works with the ``agent`` extra alone."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from agent import __version__
from agent.errors import AgentError, ConfigError
from shared.bundle import read_bundle
from shared.errors import ContractError
from shared.signing import Envelope, VerifyKey
from shared.trust import TrustState, accept_keyring

app = typer.Typer(
    name="edgefleet-agent",
    help="The edgefleet agent: verified model updates and offline inference on an edge device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgefleet-agent {__version__}")
        raise typer.Exit


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """The edgefleet agent: verified model updates and offline inference on an edge device."""


def _load_root_key(path: Path) -> VerifyKey:
    try:
        return VerifyKey.from_base64(path.read_text().strip())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the root public key {path}: {e}") from e


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="The bundle file to check.")],
    root_key: Annotated[Path, typer.Option(help="The fleet's root public key (root.pub).")],
    keyring: Annotated[Path, typer.Option(help="A root-signed keyring (keyring.json).")],
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the whole file.")] = None,
    length: Annotated[int | None, typer.Option(help="Expected length of the file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Verify a model bundle offline, exactly as the agent does before activating it."""
    try:
        state = accept_keyring(
            TrustState.from_root_keys([_load_root_key(root_key)]),
            Envelope.from_bytes(keyring.read_bytes()),
            now=datetime.now(UTC),
        )
        assert state.keyring is not None
        with bundle.open("rb") as f:
            verified = read_bundle(
                f,
                trusted_keys=state.keyring.verify_keys(),
                threshold=state.keyring.threshold,
                expected_sha256=sha256,
                expected_length=length,
            )
    except (ConfigError, OSError) as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from e
    except ContractError as e:
        reason = getattr(e, "reason", "malformed")
        if as_json:
            sys.stdout.write(
                json.dumps({"verified": False, "reason": str(reason), "detail": str(e)}) + "\n"
            )
        else:
            err.print(f"[red]REJECTED[/] ({reason}): {e}")
        raise typer.Exit(1) from e
    m = verified.manifest
    info = {
        "verified": True,
        "model_name": m.model_name,
        "model_version": m.model_version,
        "target": m.target,
        "runtime": m.runtime,
        "format": m.format,
        "sha256": verified.sha256,
        "length": verified.length,
        "model_sha256": m.model_file.sha256,
        "self_tests": len(m.self_tests),
        "metrics": m.metrics,
    }
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    typer.echo(f"OK  {m.model_name} v{m.model_version} for {m.target} ({m.runtime}, {m.format})")
    for key in ("sha256", "length", "model_sha256", "self_tests", "metrics"):
        typer.echo(f"    {key:13} {info[key]}")


@app.command(
    "verify-image",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def verify_image_command(ctx: typer.Context) -> None:
    """Check a device image (folder or .tar.gz) before installing it: its signed
    manifest against the fleet's root key, and every file's hash. `--help` for options."""
    from agent.image_verify import main as verify_image_main

    raise typer.Exit(verify_image_main(list(ctx.args)))


ConfigOption = Annotated[Path, typer.Option("--config", help="The agent's TOML file.")]


@app.command()
def run(config: ConfigOption) -> None:
    """Run the agent: serve the last good model, take signed updates, report telemetry."""
    import signal
    import threading

    from agent.agent import Agent
    from agent.config import load_config

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    try:
        agent = Agent(load_config(config))
        agent.start()
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from e
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    address = getattr(agent, "api_address", None)
    err.print(f"agent {__version__} {agent.config.device_id} running; local API {address}")
    while not stop.wait(0.2):
        if agent.restart_requested.is_set():
            break
    agent.stop()
    if agent.restart_requested.is_set() and not stop.is_set():
        from agent.selfupdate import RESTART_EXIT_CODE

        raise typer.Exit(RESTART_EXIT_CODE)  # the launcher starts the version switched to


@app.command()
def launch(config: ConfigOption) -> None:
    """Run the agent under its launcher: the version `current` names, as a child process,
    rolled back by itself if a new version does not report healthy in time."""
    from agent.config import load_config
    from agent.launcher import Launcher

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    cfg = _config_or_exit(config, load_config)
    try:
        code = Launcher(config, cfg).run()
    except AgentError as e:  # another launcher runs; the data folder is unusable
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from e
    raise typer.Exit(code)


@app.command()
def versions(
    config: ConfigOption, as_json: Annotated[bool, typer.Option("--json")] = False
) -> None:
    """The agent versions on this device: the one running, those installed, an update on
    trial and how the last one ended (read from the data folder; no agent needed)."""
    from agent.config import load_config
    from agent.selfupdate import AgentHome, SelfUpdateError

    cfg = _config_or_exit(config, load_config)
    home = AgentHome(cfg.data_dir)
    try:
        state = home.read_state()
        current = home.current()
    except SelfUpdateError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from e
    pending = state.pending
    info = {
        "base_version": __version__,
        "current": current or __version__,
        "current_is_base": current is None,
        "installed": home.versions(),
        "previous": state.previous_target,
        "pending": None
        if pending is None
        else {
            "version": pending.version,
            "previous": pending.previous,
            "attempts": pending.attempts,
            "deadline": None
            if pending.deadline is None
            else datetime.fromtimestamp(pending.deadline, UTC).isoformat(),
            "failed": pending.failed,
        },
        "last_update": None if state.result is None else state.result.model_dump(mode="json"),
    }
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    for key, value in info.items():
        typer.echo(f"{key:16} {value}")


@app.command()
def status(config: ConfigOption, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What the running agent serves, its version, connection state and outbox depth."""
    from agent.config import load_config

    cfg = _config_or_exit(config, load_config)
    data = _local_api(cfg, "GET", "/v1/status")
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    for key, value in data.items():
        typer.echo(f"{key:17} {value}")


@app.command()
def predict(
    config: ConfigOption,
    input_file: Annotated[
        Path, typer.Option("--input", help="JSON (a row or a list of rows) or .npy file.")
    ],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Predict offline with the active model, straight from the device's model store."""
    import numpy as np

    from agent.config import load_config
    from agent.runtime import InputError, LoadedModel
    from agent.store import ModelStore
    from agent.updater import TrustStore

    cfg = _config_or_exit(config, load_config)
    try:
        rows = (
            np.load(input_file, allow_pickle=False)
            if input_file.suffix == ".npy"
            else np.asarray(json.loads(input_file.read_text()), dtype=np.float64)
        )
    except (OSError, ValueError) as e:
        err.print(f"[red]error:[/] cannot read {input_file}: {e}")
        raise typer.Exit(2) from e
    trust_store = TrustStore(
        cfg.data_dir, root_keys=cfg.root_keys(), root_threshold=cfg.trust.root_threshold
    )
    trust = trust_store.load(now=datetime.now(UTC))
    if trust.keyring is None:
        err.print("[red]error:[/] no model has been installed on this device yet")
        raise typer.Exit(1)
    keys, threshold = trust_store.bundle_keys(trust)
    bundles = ModelStore(cfg.data_dir).load_active(
        trusted_keys=keys,
        threshold=threshold,
        read_only=True,  # the agent may be running beside us, mid-update
    )
    if not bundles:
        err.print("[red]error:[/] no verified model is active on this device")
        raise typer.Exit(1)
    name, bundle = sorted(bundles.items())[0]
    try:
        result = LoadedModel.load(bundle, limits=cfg.limits).predict(rows)
    except InputError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from e
    out = {
        "model": name,
        "version": bundle.manifest.model_version,
        "labels": result.labels,
        "confidence": None if result.confidence is None else result.confidence.tolist(),
        "outputs": result.outputs.tolist(),
    }
    if as_json:
        sys.stdout.write(json.dumps(out) + "\n")
        return
    typer.echo(f"{name} v{out['version']}")
    for i, row in enumerate(result.outputs):
        label = None if result.labels is None else result.labels[i]
        conf = None if result.confidence is None else float(result.confidence[i])
        typer.echo(
            f"  {i}: {label if label is not None else row.tolist()}"
            + (f"  ({conf:.3f})" if conf is not None else "")
        )


@app.command()
def enroll(
    server: Annotated[str, typer.Option("--server", help="The fleet server, https://host:port.")],
    token: Annotated[
        str,
        typer.Option(
            "--token", envvar="EDGEFLEET_ENROLL_TOKEN", help="Provisioning token (efp.…)."
        ),
    ],
    config: Annotated[
        Path, typer.Option("--config", help="The agent's TOML file; made when missing.")
    ] = Path("agent.toml"),
    device_id: Annotated[
        str | None, typer.Option(help="Device id for a new config (default: generated).")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="Device profile (needed for a new config).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data folder for a new config (default: next to it).")
    ] = None,
    tag: Annotated[list[str] | None, typer.Option(help="NAME=VALUE; repeatable.")] = None,
    broker: Annotated[
        str | None, typer.Option(help="Broker URL, if the server does not name it.")
    ] = None,
    root_key: Annotated[
        Path | None, typer.Option(help="The fleet's root.pub, for a new config.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Enroll again (new identity).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
) -> None:
    """Register this device with a provisioning token and keep its broker credentials."""
    from agent.enroll import EnrollError
    from agent.enroll import enroll as enroll_device

    tags = {}
    for pair in tag or []:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            err.print(f"[red]error:[/] tag {pair!r}: use NAME=VALUE")
            raise typer.Exit(2)
        tags[key] = value
    try:
        result = enroll_device(
            server,
            token,
            config_path=config,
            device_id=device_id,
            profile=profile,
            data_dir=data_dir,
            tags=tags,
            broker_url=broker,
            root_key=root_key,
            force=force,
            warn=lambda message: err.print(f"[yellow]note:[/] {message}"),
        )
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from e
    except EnrollError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from e
    info = {
        "device_id": result.device_id,
        "status": result.status,
        "config": str(result.config_path),
        "password_file": str(result.password_file),
        "broker_url": result.broker_url,
        "server_url": result.server_url,
    }
    if as_json:
        sys.stdout.write(json.dumps(info) + "\n")
        return
    typer.echo(f"device {result.device_id}: {result.status}")
    if result.status == "pending":
        typer.echo(f"  an operator accepts it with: edgefleet devices accept {result.device_id}")
    typer.echo(f"  config      {result.config_path}")
    typer.echo(f"  credentials {result.password_file} (mode 0600)")
    typer.echo(f"  broker      {result.broker_url or '(not known: set [broker] url)'}")


def _config_or_exit(path: Path, loader: Any) -> Any:
    try:
        return loader(path)
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from e


def _local_api(cfg: Any, method: str, path: str) -> Any:
    import http.client

    try:
        connection = http.client.HTTPConnection(cfg.http.host, cfg.http.port, timeout=10)
        connection.request(method, path)
        response = connection.getresponse()
        return json.loads(response.read())
    except (OSError, ValueError) as e:
        err.print(
            f"[red]error:[/] no agent answers on {cfg.http.host}:{cfg.http.port} ({e}); "
            "is `edgefleet-agent run` running?"
        )
        raise typer.Exit(1) from e


def main() -> None:
    app()


if __name__ == "__main__":
    main()
