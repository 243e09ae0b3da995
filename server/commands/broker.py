"""``edgefleet broker-config``: write a Mosquitto configuration for the fleet, from its database.

It writes ``mosquitto.conf``, the device and service password files and ACLs
(:mod:`server.brokerconf.render` says what is in them) into ``--out``, and prints how to
start Mosquitto with them and how to point the server at them, so the server keeps the
password and ACL files in step with every enrollment and revocation. Run it again at
any time: it rewrites only what changed and makes a running Mosquitto reload.

It reads the database directly (the API never hands out password hashes), so it runs
where the server's database is reachable, with the server's settings
(``EDGEFLEET_DATABASE_URL`` or ``EDGEFLEET_DATA_DIR``, ``EDGEFLEET_BROKER_USERNAME``,
``EDGEFLEET_BROKER_PASSWORD``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from server.commands.client import JsonOption, err, fail

__all__ = ["broker_config"]

DEFAULT_SERVICE_PORT = 1884


def _file(path: Path | None, what: str) -> Path | None:
    if path is None:
        return None
    resolved = path.expanduser().resolve()
    if not resolved.is_file():
        fail(f"{what} {path}: no such file", code=2)
    return resolved


def broker_config(
    out: Annotated[Path, typer.Option("--out", help="Folder for the configuration files.")],
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Device port (default 8883 with TLS, else 1883)."),
    ] = None,
    bind: Annotated[
        str | None, typer.Option(help="Address the device listener binds (default: all).")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Broker certificate (PEM): TLS for devices.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="Private key of --tls-cert (PEM).")
    ] = None,
    ca: Annotated[
        Path | None, typer.Option("--ca", help="CA certificate (PEM) that signs client certs.")
    ] = None,
    client_certs: Annotated[
        bool,
        typer.Option(
            "--client-certs",
            help="Devices log in with a client certificate (CN = device id) instead of a "
            "password; needs --tls-cert, --tls-key and --ca.",
        ),
    ] = False,
    service_port: Annotated[
        int,
        typer.Option(min=1, max=65535, help="Port of the listener for the server's own clients."),
    ] = DEFAULT_SERVICE_PORT,
    service_bind: Annotated[
        str, typer.Option(help="Address of the server's listener (keep it internal).")
    ] = "127.0.0.1",
    service_tls: Annotated[
        bool,
        typer.Option("--service-tls", help="TLS (same certificate) on the server's listener too."),
    ] = False,
    pid_file: Annotated[
        Path | None,
        typer.Option(help="Mosquitto writes its pid here; the server signals it to reload."),
    ] = None,
    user: Annotated[
        str | None, typer.Option(help="System user Mosquitto runs as (its default: mosquitto).")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="The server's data dir. [env: EDGEFLEET_DATA_DIR]")
    ] = None,
    db: Annotated[str | None, typer.Option(help="The server's database URL.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a Mosquitto configuration for the fleet (listeners, TLS, passwords, ACLs)."""
    import logging

    from pydantic import ValidationError
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from server.brokerconf.errors import BrokerConfigError
    from server.brokerconf.render import Listener, MosquittoLayout, TlsFiles
    from server.brokerconf.writer import write_broker_config
    from server.db import create_db_engine
    from server.errors import ServerError
    from server.settings import Settings

    directory = out.expanduser().resolve()
    pid_path = None if pid_file is None else pid_file.expanduser().resolve()
    overrides: dict[str, Any] = {"broker_config_dir": directory, "broker_pid_file": pid_path}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if db is not None:
        overrides["database_url"] = db
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        fail(e.errors()[0]["msg"], code=2)
    if (tls_cert is None) != (tls_key is None):
        fail("--tls-cert and --tls-key go together", code=2)
    if (client_certs or service_tls) and tls_cert is None:
        fail("--client-certs and --service-tls need --tls-cert and --tls-key", code=2)
    tls = None
    if tls_cert is not None:
        tls = TlsFiles(
            certfile=_file(tls_cert, "--tls-cert"),  # type: ignore[arg-type]
            keyfile=_file(tls_key, "--tls-key"),  # type: ignore[arg-type]
            cafile=_file(ca, "--ca"),
            client_certificates=client_certs,
        )
    device_port = port or (8883 if tls is not None else 1883)
    service_listener_tls = None
    if service_tls and tls is not None:
        service_listener_tls = TlsFiles(tls.certfile, tls.keyfile, tls.cafile)
    layout = MosquittoLayout(
        directory=directory,
        device_listeners=(Listener(device_port, bind, tls),),
        service_listener=Listener(service_port, service_bind, service_listener_tls),
        pid_file=pid_path,
        user=user,
    )

    url = settings.resolved_database_url
    database = make_url(url)
    if database.get_backend_name() == "sqlite" and not Path(database.database or "").is_file():
        fail(f"no edgefleet database at {database.database}: run `edgefleet server` once first")
    # what the writer logs for a server's operators, this command says in its own words
    logging.getLogger("server.brokerconf").setLevel(logging.ERROR)
    try:
        engine = create_db_engine(url)
        try:
            if not inspect(engine).has_table("device_credentials"):
                fail(f"{database.render_as_string()} has no fleet tables: run the server once")
            result = write_broker_config(
                engine,
                layout,
                service_username=settings.broker_username,
                service_password=settings.broker_password.get_secret_value(),
            )
        finally:
            engine.dispose()
    except (BrokerConfigError, ServerError) as e:
        fail(str(e))
    except SQLAlchemyError as e:
        fail(f"cannot read the database: {e}")

    device_scheme = "mqtts" if tls is not None else "mqtt"
    service_scheme = "mqtts" if service_listener_tls is not None else "mqtt"
    device_host = bind if bind not in (None, "0.0.0.0", "::") else "<this host>"  # noqa: S104
    environment = {
        "EDGEFLEET_BROKER_URL": f"{service_scheme}://{service_bind}:{service_port}",
        "EDGEFLEET_DEVICE_BROKER_URL": f"{device_scheme}://{device_host}:{device_port}",
        "EDGEFLEET_BROKER_CONFIG_DIR": str(directory),
        "EDGEFLEET_BROKER_USERNAME": settings.broker_username,
    }
    if pid_path is not None:
        environment["EDGEFLEET_BROKER_PID_FILE"] = str(pid_path)
    start = f"mosquitto -c {directory / 'mosquitto.conf'}"
    if as_json:
        report = {
            "directory": str(directory),
            "changed": list(result.changed),
            "devices": result.devices,
            "reloaded": result.signalled,
            "start": start,
            "server_environment": environment,
        }
        sys.stdout.write(json.dumps(report) + "\n")
        return
    changed = ", ".join(result.changed) or "nothing (already current)"
    typer.echo(f"wrote {directory}: {changed}; {result.devices} device(s) can log in")
    if result.signalled:
        typer.echo("the running Mosquitto was told to reload")
    elif pid_path is not None and result.changed:
        typer.echo(f"no Mosquitto runs for {pid_path}: it reads the files when it starts")
    typer.echo(f"\nstart Mosquitto with:\n  {start}")
    typer.echo(
        "  (it must be able to read the files: they are readable by their group, e.g. "
        "chgrp mosquitto, and by no one else)"
    )
    typer.echo("\nrun the server with (and EDGEFLEET_BROKER_PASSWORD set as it is now):")
    for name, value in environment.items():
        typer.echo(f"  {name}={value}")
    if tls is None:
        err.print(
            "[yellow]warning:[/] devices connect without TLS: their passwords cross the "
            "network in clear text. Give --tls-cert and --tls-key outside a lab."
        )
    if pid_path is None:
        err.print(
            "[yellow]note:[/] without --pid-file the server cannot make Mosquitto reload; "
            "revocations then take effect when Mosquitto restarts."
        )
