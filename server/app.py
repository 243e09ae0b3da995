"""The FastAPI application factory.

:func:`create_app` builds everything from a :class:`~server.settings.Settings`
object -- engine, migrations, keys, artifact store -- and keeps it on
``app.state``; nothing lives in module globals, so tests and several replicas can
each build their own app.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from server import __version__
from server.api.routes import (
    datasets,
    delivery,
    devices,
    enrollment,
    groups,
    health,
    keyring,
    models,
    runs,
)
from server.artifacts import ArtifactStore
from server.db import create_db_engine, migrate, session_scope
from server.errors import ServerError
from server.fleet.inventory import start_inventory_consumer
from server.keys import init_keys, load_fleet_keys, record_keyring
from server.settings import Settings, get_settings

__all__ = ["API_PREFIX", "create_app"]

API_PREFIX = "/api/v1"
log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        now = datetime.now(UTC)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_db_engine(settings.resolved_database_url)
        migrate(engine)
        lifetime = timedelta(days=settings.keyring_lifetime_days)
        keys = (
            init_keys(settings.keys_dir, now=now, lifetime=lifetime)
            if settings.mode == "dev"
            else load_fleet_keys(settings.keys_dir, now=now)
        )
        with session_scope(engine) as session:
            record_keyring(session, keys=keys)
        app.state.settings = settings
        app.state.engine = engine
        app.state.keys = keys
        app.state.artifacts = ArtifactStore(
            settings.artifacts_dir, max_bytes=settings.max_artifact_bytes
        )
        app.state.transfer_limiter = delivery.TransferLimiter(settings.max_concurrent_transfers)
        runner = None
        if settings.run_jobs:
            from server.training.jobs import JobRunner

            runner = JobRunner(
                engine, settings=settings, max_concurrent=settings.max_concurrent_runs
            )
            runner.start()
        app.state.job_runner = runner
        app.state.inventory = start_inventory_consumer(engine, settings)
        log.info(
            "server ready",
            extra={"data_dir": str(settings.data_dir), "keyring_version": keys.keyring.version},
        )
        try:
            yield
        finally:
            if runner is not None:
                runner.stop()
            if app.state.inventory is not None:
                app.state.inventory.stop()
            engine.dispose()

    app = FastAPI(
        title="edgefleet",
        version=__version__,
        summary="Signed model rollouts, offline inference and fleet drift for edge devices.",
        lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url="/docs",
    )

    @app.exception_handler(ServerError)
    async def server_error(_request: Request, exc: ServerError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})

    for router in (
        health.router,
        keyring.router,
        datasets.router,
        runs.router,
        models.router,
        delivery.router,
        enrollment.router,
        devices.router,
        groups.router,
    ):
        app.include_router(router, prefix=API_PREFIX)
    return app
