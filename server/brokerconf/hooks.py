"""How the running server reaches its :class:`~server.brokerconf.writer.BrokerConfigWriter`.

The writer exists only when ``EDGEFLEET_BROKER_CONFIG_DIR`` is set (the folder
``edgefleet broker-config`` wrote). :func:`start_broker_config_writer` builds it and brings
the files in step at start-up; the API routes that change credentials take it through
:data:`BrokerConfigDep` and call ``credentials_changed()`` after their commit. An app whose
start-up did not build one gets it built on first use (and kept on ``app.state``), so
the routes work the same either way.

Changes made through other API processes (which may not see the folder) reach it through
:func:`start_credentials_follower`: a thread that polls the database's credentials
revision every ``broker_config_poll_seconds``.
"""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.engine import Engine

from server.brokerconf.follow import CredentialsFollower
from server.brokerconf.writer import BrokerConfigWriter
from server.settings import Settings

__all__ = [
    "STATE_ATTRIBUTE",
    "BrokerConfigDep",
    "broker_config_writer",
    "get_broker_config_writer",
    "start_broker_config_writer",
    "start_credentials_follower",
]

STATE_ATTRIBUTE = "broker_config_writer"
_CREATING = threading.Lock()  # two first requests at once must share one writer


def broker_config_writer(engine: Engine, settings: Settings) -> BrokerConfigWriter | None:
    """The writer ``settings`` ask for, or ``None`` when no configuration folder is set."""
    if settings.broker_config_dir is None:
        return None
    return BrokerConfigWriter(
        engine,
        settings.broker_config_dir,
        service_username=settings.broker_username,
        service_password=settings.broker_password.get_secret_value(),
        pid_file=settings.broker_pid_file,
    )


def start_broker_config_writer(engine: Engine, settings: Settings) -> BrokerConfigWriter | None:
    """:func:`broker_config_writer`, with the files brought in step with the database now.

    Raises :class:`~server.brokerconf.errors.BrokerConfigError` when that fails: a server
    that was asked to keep the broker's configuration and cannot should not start.
    """
    writer = broker_config_writer(engine, settings)
    if writer is not None:
        writer.refresh()
    return writer


def start_credentials_follower(
    writer: BrokerConfigWriter | None, settings: Settings
) -> CredentialsFollower | None:
    """A started :class:`CredentialsFollower` for ``writer`` (``None``: no folder, none)."""
    if writer is None:
        return None
    follower = CredentialsFollower(writer, poll_seconds=settings.broker_config_poll_seconds)
    follower.start()
    return follower


def get_broker_config_writer(request: Request) -> BrokerConfigWriter | None:
    """FastAPI dependency: the app's writer (built on first use), or ``None``."""
    state = request.app.state
    writer: BrokerConfigWriter | None = getattr(state, STATE_ATTRIBUTE, None)
    if writer is not None or state.settings.broker_config_dir is None:
        return writer
    with _CREATING:
        writer = getattr(state, STATE_ATTRIBUTE, None)
        if writer is None:
            writer = broker_config_writer(state.engine, state.settings)
            setattr(state, STATE_ATTRIBUTE, writer)
    return writer


BrokerConfigDep = Annotated[BrokerConfigWriter | None, Depends(get_broker_config_writer)]
