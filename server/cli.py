"""The ``edgefleet`` command: run the server, run the demo, manage the fleet's keys.

Settings come from the environment (``EDGEFLEET_*``); options given here win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from server import __version__
from server.commands import agent_releases as agent_releases_commands
from server.commands import alerts as alerts_commands
from server.commands import broker as broker_commands
from server.commands import datasets as datasets_commands
from server.commands import devices as devices_commands
from server.commands import drift as drift_commands
from server.commands import feedback as feedback_commands
from server.commands import groups as groups_commands
from server.commands import image as image_commands
from server.commands import ingest as ingest_commands
from server.commands import keys as keys_commands
from server.commands import models as models_commands
from server.commands import operators as operators_commands
from server.commands import retraining as retraining_commands
from server.commands import rollouts as rollouts_commands
from server.commands import samples as samples_commands
from server.commands import simulate as simulate_commands
from server.commands import tokens as tokens_commands
from server.commands import train as train_commands

app = typer.Typer(
    name="edgefleet",
    help="edgefleet: train, sign and roll out models to fleets of edge devices over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(keys_commands.app, name="keys")
app.add_typer(datasets_commands.app, name="datasets")
datasets_commands.app.add_typer(samples_commands.app, name="samples")
app.command("train", help="Start a training run on a dataset version (--wait shows its progress).")(
    train_commands.train
)
app.add_typer(train_commands.app, name="runs")
app.add_typer(models_commands.app, name="models")
app.add_typer(devices_commands.app, name="devices")
app.add_typer(groups_commands.app, name="groups")
app.add_typer(rollouts_commands.app, name="rollouts")
app.add_typer(agent_releases_commands.app, name="agent-releases")
devices_commands.app.command("pin")(rollouts_commands.pin)
devices_commands.app.command("unpin")(rollouts_commands.unpin)
app.add_typer(tokens_commands.app, name="tokens")
app.add_typer(operators_commands.app, name="operators")
app.command("audit")(operators_commands.audit)
app.command(
    "simulate", help="Enroll simulated devices and run them against the server and broker."
)(simulate_commands.simulate)
app.command("broker-config")(broker_commands.broker_config)
app.command("drift", help="A model's fleet drift and SLA view (features, devices, latency).")(
    drift_commands.drift
)
app.add_typer(feedback_commands.app, name="feedback")
app.add_typer(alerts_commands.app, name="alerts")
app.add_typer(retraining_commands.app, name="retraining")
app.add_typer(image_commands.app, name="image")
app.command("ingest", help="Run N ingestion worker processes on a shared subscription.")(
    ingest_commands.ingest
)

err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgefleet {__version__}")
        raise typer.Exit


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """edgefleet: train, sign and roll out models to fleets of edge devices over MQTT."""


@app.command()
def server(
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Keys, artifacts and the SQLite file. [env: EDGEFLEET_DATA_DIR]"),
    ] = None,
    db: Annotated[
        str | None, typer.Option(help="Database URL (default: SQLite in the data dir).")
    ] = None,
    broker: Annotated[
        str | None, typer.Option(help="mqtt://host:port, or 'embedded' (default).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8750).")] = None,
) -> None:
    """Run the API server (and an embedded MQTT broker unless --broker names one)."""
    from pydantic import ValidationError

    from server.settings import Settings

    overrides = {
        k: v
        for k, v in {
            "data_dir": data_dir,
            "database_url": db,
            "broker_url": broker,
            "host": host,
            "port": port,
        }.items()
        if v is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        err.print(f"[red]error:[/] {e.errors()[0]['msg']}")
        raise typer.Exit(2) from e

    import uvicorn

    from server.app import create_app
    from server.broker import EmbeddedBroker
    from server.errors import ServerError
    from server.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    embedded = None
    try:
        if settings.broker_url == "embedded":
            from server.brokerconf.access import FleetAccess
            from server.db import create_db_engine, migrate

            # The embedded broker enforces the fleet's identities and topic rules, as a
            # Mosquitto configured by `edgefleet broker-config` does.
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            engine = create_db_engine(settings.resolved_database_url)
            migrate(engine)
            access = FleetAccess(
                engine,
                service_username=settings.broker_username,
                service_password=settings.broker_password.get_secret_value(),
            )
            embedded = EmbeddedBroker(port=settings.embedded_broker_port, access=access)
            embedded.start()
            settings = settings.model_copy(update={"broker_url": embedded.url})
            err.print(f"embedded MQTT broker on {embedded.url}")
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_config=None)
    except ServerError as e:
        err.print(f"[red]error:[/] {e}")
        raise typer.Exit(1) from e
    finally:
        if embedded is not None:
            embedded.stop()


@app.command()
def demo(
    exit_after: Annotated[
        float | None,
        typer.Option(help="Stop after this many seconds once the demo is done (for scripts)."),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(help="Where the demo keeps its state; recreated on every run.")
    ] = Path("edgefleet-demo"),
    port: Annotated[int, typer.Option(help="HTTP port of the demo server (0: any free).")] = 0,
) -> None:
    """Run the loop on embedded defaults: SQLite, an embedded broker, a local artifact folder."""
    from server.demo import run_demo

    raise typer.Exit(run_demo(data_dir=data_dir, exit_after=exit_after, port=port))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
