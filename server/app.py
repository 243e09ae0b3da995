"""The FastAPI application factory.

:func:`create_app` builds everything from a :class:`~server.settings.Settings`
object -- engine, migrations, keys, artifact store -- and keeps it on
``app.state``; nothing lives in module globals, so tests and several replicas can
each build their own app.

When ``broker_url`` names a broker, the lifespan also starts, in this order, the
desired-state publisher, the MQTT block server, the telemetry ingestor, the rollout
engine and the inventory consumer (whose hooks log device events for the rollouts and
wake the engine), and stops them in the reverse order. Each can be turned off in the
settings (an API-only replica runs none of the engine, blocks or ingestion). A broker
that is away does not stop the server from starting: every client keeps connecting in
the background, and the engine holds desired states back until the publisher is
connected. ``app.state.artifact_authority`` (who may fetch which artifact over HTTP)
is set with or without a broker.

``clock`` (default: the system clock) is the one time source of the engine, the
publisher, the inventory's receive stamps and the API's ``now``: tests move it.
"""

from __future__ import annotations

import logging
import ssl
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote, urlparse

import paho.mqtt.client as mqtt
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from paho.mqtt.enums import CallbackAPIVersion

from server import __version__
from server.api.deps import get_now
from server.api.routes import (
    agent_releases,
    alerts,
    datasets,
    delivery,
    devices,
    drift,
    enrollment,
    feedback,
    groups,
    health,
    keyring,
    models,
    retraining,
    rollouts,
    runs,
    samples,
)
from server.artifacts import artifact_store
from server.auth import install as install_operator_access
from server.auth import routes as auth_routes
from server.auth.deps import operator_access, require_admin
from server.brokerconf.hooks import STATE_ATTRIBUTE as BROKER_CONFIG_STATE
from server.brokerconf.hooks import start_broker_config_writer, start_credentials_follower
from server.dashboard import mount_dashboard
from server.db import create_db_engine, migrate, session_scope, utcnow
from server.delivery.blocks import BlockServer
from server.drift.retention import RetentionJob, RetentionPolicy
from server.errors import ConfigurationError, ServerError
from server.fleet.inventory import InventoryHook, start_inventory_consumer
from server.ingest.telemetry import TelemetryIngestor
from server.ingest.workers import IngestWorkers, device_consumers, server_worker_specs
from server.keys import (
    FleetKeys,
    KeyringWatcher,
    init_keys,
    keyring_recorder,
    load_fleet_keys,
    record_keyring,
)
from server.profiles import DEFAULT_PROFILES_DIR, load_profiles
from server.rollouts.desired import DesiredPublisher
from server.rollouts.engine import RolloutEngine
from server.rollouts.errors import PublishError
from server.rollouts.service import ManifestAuthority, device_message_recorder
from server.settings import Settings, get_settings

__all__ = ["API_PREFIX", "artifact_path", "create_app"]

API_PREFIX = "/api/v1"
log = logging.getLogger(__name__)


def artifact_path(device_id: str, sha256: str) -> str:
    """The HTTP range-download path of an artifact for a device (relative to the server)."""
    return f"{API_PREFIX}/devices/{device_id}/artifacts/{sha256}"


@dataclass(frozen=True, slots=True)
class _Broker:
    """Where the server's own MQTT clients connect, from ``mqtt[s]://[user:pw@]host[:port]``."""

    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool

    @classmethod
    def parse(cls, url: str) -> _Broker:
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ConfigurationError(f"broker URL must look like mqtt://host:port, not {url!r}")
        tls = parsed.scheme == "mqtts"
        return cls(
            host=parsed.hostname,
            port=parsed.port or (8883 if tls else 1883),
            username=None if parsed.username is None else unquote(parsed.username),
            password=None if parsed.password is None else unquote(parsed.password),
            tls=tls,
        )

    def factory(
        self, client_id: str, *, clean_session: bool = True, manual_ack: bool = False
    ) -> Callable[[], mqtt.Client]:
        """Makes configured, unconnected MQTT 3.1.1 clients (credentials, TLS)."""

        def make() -> mqtt.Client:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv311,
                clean_session=clean_session,
                manual_ack=manual_ack,
            )
            if self.username is not None:
                client.username_pw_set(self.username, self.password)
            if self.tls:
                client.tls_set_context(ssl.create_default_context())
            return client

        return make


class _BackgroundStart:
    """Starts a component whose ``start(timeout)`` raises while the broker is away, again
    and again in the background, so the server comes up without its broker (as the
    inventory consumer and paho's own reconnects do).

    :meth:`close` never waits for an attempt in progress: an attempt that succeeds after
    it stops the component again at once.
    """

    def __init__(
        self,
        name: str,
        start: Callable[[float], None],
        stop: Callable[[], None],
        *,
        attempt_seconds: float = 5.0,
        retry_seconds: float = 3.0,
    ) -> None:
        self.name = name
        self._start, self._stop = start, stop
        self._attempt, self._retry = attempt_seconds, retry_seconds
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = False
        self._thread = threading.Thread(target=self._run, name=f"start-{name}", daemon=True)

    def begin(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._start(self._attempt)
            except ServerError as e:
                log.warning("%s not started yet (retrying): %s", self.name, e)
                self._stopping.wait(self._retry)
                continue
            with self._lock:
                if self._stopping.is_set():
                    self._stop()
                else:
                    self._started = True
            return

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            if self._started:
                self._started = False
                self._stop()


def _start_broker_services(
    app: FastAPI,
    stack: ExitStack,
    *,
    settings: Settings,
    keys: FleetKeys,
    clock: Callable[[], datetime],
) -> list[InventoryHook]:
    """Publisher, block server, ingestor and engine; returns the inventory hooks to add."""
    engine = app.state.engine
    authority: ManifestAuthority = app.state.artifact_authority
    hooks: list[InventoryHook] = [device_message_recorder(engine)]
    broker = _Broker.parse(settings.service_broker_url)
    suffix = uuid.uuid4().hex[:8]
    publisher = DesiredPublisher(
        keys,
        host=broker.host,
        port=broker.port,
        client_factory=broker.factory(f"edgefleet-desired@{suffix}"),
        publish_timeout=settings.publish_timeout_seconds,
        lifetime=timedelta(days=settings.manifest_lifetime_days),
        refresh_margin=timedelta(days=settings.manifest_refresh_margin_days),
        clock=clock,
    )
    try:
        publisher.start(wait=False)  # paho connects and reconnects in the background
    except PublishError as e:
        raise ConfigurationError(f"cannot publish desired states: {e}") from e
    stack.callback(publisher.stop)
    app.state.desired_publisher = publisher
    if settings.block_server:
        blocks = BlockServer(
            app.state.artifacts,
            authorize=authority.allowed,
            host=broker.host,
            port=broker.port,
            client_factory=broker.factory(f"edgefleet-blocks@{suffix}"),
            max_concurrent_transfers=settings.max_concurrent_transfers,
            share_group=settings.block_share_group,
        )
        starter = _BackgroundStart("block server", blocks.start, blocks.stop)
        starter.begin()
        stack.callback(starter.close)
        app.state.block_server = blocks
    if settings.telemetry_ingestor and settings.ingest_workers > 1:
        workers = IngestWorkers(server_worker_specs(settings))
        workers.start()
        stack.callback(workers.stop)
        app.state.ingest_workers = workers
    elif settings.telemetry_ingestor:
        ingestor = TelemetryIngestor(
            engine,
            host=broker.host,
            port=broker.port,
            share_group=settings.ingest_share_group,
            client_factory=broker.factory(
                settings.ingest_client_id, clean_session=False, manual_ack=True
            ),
            consumers=device_consumers(samples_retention_days=settings.samples_retention_days),
        )
        ingestor.start()
        stack.callback(ingestor.stop)
        app.state.telemetry_ingestor = ingestor
    if settings.rollout_engine:
        if not settings.inventory_consumer:
            log.warning("rollouts: the inventory consumer is off, so no device reports reach them")
        profiles = load_profiles(settings.profiles_dir or DEFAULT_PROFILES_DIR)
        rollout_engine = RolloutEngine(
            engine,
            publisher=publisher,
            latency_sla_ms={name: p.latency_sla_ms_p95 for name, p in profiles.items()},
            clock=clock,
            tick_seconds=settings.rollout_tick_seconds,
            maintenance_seconds=settings.rollout_maintenance_seconds,
            baseline_window=timedelta(hours=settings.rollout_baseline_hours),
            artifact_path=artifact_path,
            authority=authority,
        )
        rollout_engine.start()
        stack.callback(rollout_engine.stop)
        app.state.rollout_engine = rollout_engine
        hooks.append(rollout_engine.on_device_message)
    return hooks


def _document_error_details(app: FastAPI) -> None:
    """A 422 carries FastAPI's list of validation errors, or -- from the server's own checks
    (:class:`ServerError`) -- one message naming the problem: the document says both."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        error = schema.get("components", {}).get("schemas", {}).get("HTTPValidationError")
        if error is not None and "detail" in error.get("properties", {}):
            listed = error["properties"]["detail"]
            error["properties"]["detail"] = {
                "anyOf": [listed, {"type": "string"}],
                "title": "Detail",
            }
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: Settings | None = None, *, clock: Callable[[], datetime] | None = None
) -> FastAPI:
    settings = settings or get_settings()
    now_of = clock or utcnow

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        now = now_of()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_db_engine(settings.resolved_database_url)
        with ExitStack() as stack:
            stack.callback(engine.dispose)
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
            app.state.clock = now_of
            install_operator_access(app, settings)
            app.state.artifacts = artifact_store(settings)  # the folder, or an S3 bucket
            app.state.transfer_limiter = delivery.TransferLimiter(settings.max_concurrent_transfers)
            app.state.artifact_authority = ManifestAuthority(engine)
            app.state.desired_publisher = None
            app.state.block_server = None
            app.state.telemetry_ingestor = None
            app.state.ingest_workers = None
            app.state.rollout_engine = None
            runner = None
            if settings.run_jobs:
                from server.training.jobs import JobRunner

                runner = JobRunner(
                    engine, settings=settings, max_concurrent=settings.max_concurrent_runs
                )
                runner.start()
                stack.callback(runner.stop)
            app.state.job_runner = runner
            # Storage does not grow without bound: raw telemetry and fine drift rollups
            # expire per tier (EDGEFLEET_DRIFT_RETENTION_DAYS), checked hourly.
            retention = RetentionJob(
                engine,
                policy=RetentionPolicy.from_days(settings.drift_retention_days),
                clock=now_of,
            )
            retention.start()
            stack.callback(retention.stop)
            app.state.retention_job = retention
            # Alert rules and retraining policies, judged every alert_interval_seconds on
            # the drift rollups, the inventory and labelled feedback; their webhooks go
            # out on a thread of their own.
            app.state.alert_evaluator = None
            if settings.alert_evaluator:
                from server.alerts.evaluate import EvaluationContext
                from server.alerts.evaluator import AlertEvaluator
                from server.alerts.webhook import WebhookPolicy
                from server.feedback.service import accuracy
                from server.retraining.engine import RetrainingStep

                sla_profiles = load_profiles(settings.profiles_dir or DEFAULT_PROFILES_DIR)
                context = EvaluationContext(
                    store=app.state.artifacts,
                    keys=lambda: app.state.keys,  # the current ones: the keys folder is followed
                    latency_sla_ms={n: p.latency_sla_ms_p95 for n, p in sla_profiles.items()},
                    accuracy_source=accuracy,
                )
                evaluator = AlertEvaluator(
                    engine,
                    context=context,
                    clock=now_of,
                    interval=settings.alert_interval_seconds,
                    webhook=WebhookPolicy(
                        timeout_seconds=settings.alert_webhook_timeout_seconds,
                        max_attempts=settings.alert_webhook_max_attempts,
                        backoff_min_seconds=settings.alert_webhook_backoff_min_seconds,
                        backoff_max_seconds=settings.alert_webhook_backoff_max_seconds,
                    ),
                    steps=[RetrainingStep(engine, context=context)],
                )
                evaluator.start()
                stack.callback(evaluator.stop)
                app.state.alert_evaluator = evaluator
            # A Mosquitto configured by `edgefleet broker-config` is brought in step with
            # the fleet's credentials now, not only at the next enrollment.
            broker_config = start_broker_config_writer(engine, settings)
            setattr(app.state, BROKER_CONFIG_STATE, broker_config)
            # ... and follows changes made through any API process (other hosts too).
            follower = start_credentials_follower(broker_config, settings)
            if follower is not None:
                stack.callback(follower.stop)
            hooks: list[InventoryHook] = []
            if settings.broker_url != "embedded":
                hooks = _start_broker_services(
                    app, stack, settings=settings, keys=keys, clock=now_of
                )
            inventory = start_inventory_consumer(engine, settings, clock=now_of, hooks=hooks)
            app.state.inventory = inventory
            if inventory is not None:
                stack.callback(inventory.stop)
            # The server follows its keys folder: `edgefleet keys rotate-online | revoke |
            # renew` take effect without a restart, and the desired states are re-signed
            # with the new keyring at the rollout engine's next pass.
            watcher = KeyringWatcher(settings.keys_dir, keys, clock=now_of)
            watcher.subscribe(lambda new: setattr(app.state, "keys", new))
            watcher.subscribe(keyring_recorder(engine))
            publisher = app.state.desired_publisher
            if publisher is not None:
                watcher.subscribe(lambda new: setattr(publisher, "keys", new))
            watcher.start()
            stack.callback(watcher.stop)
            log.info(
                "server ready",
                extra={
                    "data_dir": str(settings.data_dir),
                    "keyring_version": keys.keyring.version,
                    "rollout_engine": app.state.rollout_engine is not None,
                },
            )
            yield

    app = FastAPI(
        title="edgefleet",
        version=__version__,
        summary="Signed model rollouts, offline inference and fleet drift for edge devices.",
        lifespan=lifespan,
        openapi_url=f"{API_PREFIX}/openapi.json",
        docs_url="/docs",
    )

    if clock is not None:
        app.dependency_overrides[get_now] = clock

    @app.exception_handler(ServerError)
    async def server_error(_request: Request, exc: ServerError) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content={"detail": str(exc)})

    # Device-facing and public routes: health, the keyring, enrollment (a provisioning
    # token) and artifact delivery (device HTTP Basic credentials).
    for router in (health.router, keyring.router, delivery.router, enrollment.router):
        app.include_router(router, prefix=API_PREFIX)
    # Operator routes: a bearer token whose role fits the method (server.auth.deps) ...
    for router in (
        auth_routes.router,
        datasets.router,
        runs.router,
        models.router,
        devices.router,
        groups.router,
        drift.router,
        feedback.router,
        samples.router,
        rollouts.router,
        rollouts.pins_router,
        agent_releases.router,
        alerts.rules_router,
        alerts.router,
        retraining.router,
    ):
        app.include_router(router, prefix=API_PREFIX, dependencies=[Depends(operator_access)])
    # ... and the admin's: operator tokens, the audit log, provisioning tokens.
    for router in (auth_routes.admin_router, enrollment.tokens_router):
        app.include_router(router, prefix=API_PREFIX, dependencies=[Depends(require_admin)])
    _document_error_details(app)
    mount_dashboard(app)
    return app
