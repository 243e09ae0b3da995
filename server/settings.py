"""Server settings, read from the environment (``EDGEFLEET_*``) -- 12-factor style.

Build them with :func:`get_settings` (cached) or construct :class:`Settings`
directly in tests; the FastAPI app takes them through a dependency so tests can
override them. Outside ``mode=dev`` the settings refuse the built-in development
secrets -- the secret key, the broker password wherever the server uses it, and an
admin token that is short or a built-in development value: a production server must be
given its own.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEV_BROKER_PASSWORD", "DEV_SECRET", "Settings", "get_settings"]

DEV_SECRET = "edgefleet-dev-secret-do-not-use-in-production"  # noqa: S105 - refused outside dev
DEV_BROKER_PASSWORD = "edgefleet-dev-broker-password"  # noqa: S105 - refused outside dev
_MIN_BROKER_PASSWORD = 16
_MIN_ADMIN_TOKEN = 32
_STORE_FIELDS = ("artifacts_", "s3_", "max_artifact_bytes")
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]")


class Settings(BaseSettings):
    """Everything the server needs to start. Each field maps to ``EDGEFLEET_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="ignore")

    mode: Literal["dev", "prod"] = Field("dev", description="prod refuses development secrets")
    data_dir: Path = Field(Path("edgefleet-data"), description="keys, artifacts, SQLite file")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file in data_dir"
    )
    broker_url: str = Field(
        "embedded", description="mqtt://host:port, mqtts://..., or 'embedded' for an in-process one"
    )
    embedded_broker_port: int = Field(
        0, ge=0, le=65535, description="port of the embedded broker; 0 picks a free one"
    )
    host: str = "127.0.0.1"
    port: int = Field(8750, ge=0, le=65535)
    secret_key: SecretStr = SecretStr(DEV_SECRET)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["console", "json"] = "console"
    max_artifact_bytes: int = Field(512 * 1024 * 1024, gt=0)
    artifacts_url: str | None = Field(
        None,
        description="where artifacts live: unset = the folder <data_dir>/artifacts; "
        "s3://bucket/prefix = an S3-compatible object store (needs the 's3' extra)",
    )
    artifacts_cache_dir: Path | None = Field(
        None,
        description="with an S3 store: the local read-through cache; default "
        "<data_dir>/artifacts-cache",
    )
    artifacts_cache_bytes: int = Field(
        4 * 1024**3,
        gt=0,
        description="with an S3 store: the cache's size bound (least recently used files go "
        "first); at least max_artifact_bytes",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="the S3 API endpoint of a self-hosted store (MinIO, Ceph RGW, ...), "
        "e.g. https://s3.example.internal:9000; unset = AWS S3 in s3_region",
    )
    s3_region: str | None = Field(
        None, description="the bucket's region; unset = AWS_REGION / ~/.aws/config"
    )
    s3_access_key_id: str | None = Field(
        None,
        description="with s3_secret_access_key; both unset = the standard AWS credential "
        "chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws, an instance or pod role)",
    )
    s3_secret_access_key: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="path for most self-hosted stores, virtual for AWS"
    )
    s3_verify_tls: bool = Field(
        True, description="check the store's TLS certificate; refused off in prod mode"
    )
    s3_ca_bundle: Path | None = Field(
        None, description="PEM file of the CA that signed a self-hosted store's certificate"
    )
    s3_multipart_chunk_bytes: int = Field(
        16 * 1024 * 1024,
        ge=5 * 1024 * 1024,
        le=5 * 1024**3,
        description="uploads larger than this go up in parts of this size (S3: 5 MiB to 5 GiB)",
    )
    keyring_lifetime_days: int = Field(90, gt=0)
    drift_retention_days: dict[Literal["raw", "hour", "day"], int] = Field(
        default_factory=dict,
        description="days kept per tier: raw telemetry (default 7), hourly drift rollups (30), "
        'daily drift rollups (400); e.g. {"raw": 3}',
    )
    run_jobs: bool = Field(
        True, description="run queued training jobs in this process (off for API-only replicas)"
    )
    max_concurrent_runs: int = Field(1, ge=1, le=64, description="training jobs at once")
    max_concurrent_transfers: int = Field(
        32, ge=1, le=4096, description="artifact downloads (HTTP and MQTT blocks) served at once"
    )
    device_broker_url: str | None = Field(
        None, description="broker URL handed to devices when they enroll; default: broker_url"
    )
    inventory_consumer: bool = Field(
        True, description="keep the device inventory from MQTT (when broker_url names a broker)"
    )
    profiles_dir: Path | None = Field(
        None, description="folder of <profile>/profile.toml; default: the shipped firmware_images"
    )
    manifest_lifetime_days: float = Field(
        7.0, gt=0, le=365, description="how long a signed desired state stays valid"
    )
    manifest_refresh_margin_days: float = Field(
        2.0, gt=0, description="re-sign a desired state once it expires within this margin"
    )
    rollout_engine: bool = Field(
        True,
        description="run the rollout engine here (when broker_url names a broker); "
        "off for API-only replicas",
    )
    rollout_tick_seconds: float = Field(
        1.0, gt=0, le=60, description="how often the engine steps every active rollout"
    )
    rollout_maintenance_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="how often the engine re-sends unacknowledged and re-signs expiring "
        "desired states",
    )
    rollout_baseline_hours: float = Field(
        24.0, gt=0, description="telemetry before a rollout's start its quality gates compare with"
    )
    publish_timeout_seconds: float = Field(
        10.0, gt=0, le=300, description="wait for the broker's PUBACK of a desired state"
    )
    block_server: bool = Field(
        True, description="serve artifact blocks over MQTT (when broker_url names a broker)"
    )
    block_share_group: str | None = Field(
        None, description="shared-subscription group for artifact requests, with several servers"
    )
    telemetry_ingestor: bool = Field(
        True, description="store device telemetry (when broker_url names a broker)"
    )
    ingest_client_id: str = Field(
        "edgefleet-ingest@server",
        min_length=1,
        max_length=64,
        description="MQTT client id of the telemetry ingestor (a persistent session); the "
        "'@', which no device id may contain, keeps a device from taking over its session",
    )
    ingest_share_group: str | None = Field(
        None, description="shared-subscription group, when several processes ingest"
    )
    samples_retention_days: int = Field(
        30,
        ge=1,
        le=3650,
        description="days captured device samples are kept (by the end of the window they "
        "came from); dataset versions made of them keep their copy",
    )
    ingest_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="ingestion processes: 1 ingests inside the server; more start that many "
        "worker processes on a shared subscription (group ingest_share_group, default 'ingest'), "
        "with client ids made from ingest_client_id (edgefleet-ingest-0@server, ...)",
    )
    broker_username: str = Field(
        "server@edgefleet",
        pattern=r"^[A-Za-z0-9._@+-]{1,128}$",
        description="the server's own broker identity (its MQTT clients log in with it); "
        "the default holds an '@', which no device id can, so no device can take it",
    )
    broker_password: SecretStr = Field(
        SecretStr(DEV_BROKER_PASSWORD),
        description="password of broker_username; refused outside dev when it is used",
    )
    broker_config_dir: Path | None = Field(
        None,
        description="folder of the Mosquitto configuration 'edgefleet broker-config' wrote; "
        "the server keeps its password and ACL files in step with the fleet",
    )
    broker_pid_file: Path | None = Field(
        None, description="Mosquitto's pid file: the server sends SIGHUP after each change"
    )
    broker_config_poll_seconds: float = Field(
        2.0,
        gt=0,
        le=300,
        description="how often a server with broker_config_dir checks the database for "
        "credential changes made through other API processes",
    )

    admin_token: SecretStr | None = Field(
        None,
        description="a bearer token accepted as admin (to bootstrap operator tokens); unset "
        "in dev mode, a random one is made at the first start in <data_dir>/admin-token",
    )
    auth_failures_per_minute: int = Field(
        20,
        ge=1,
        le=1_000_000,
        description="failed bearer-token attempts one source address may make per minute "
        "(bursts up to it) before it gets 429s",
    )
    enroll_per_minute_per_address: int = Field(
        120,
        ge=1,
        le=1_000_000,
        description="enrollments one source address may attempt per minute (bursts up to it)",
    )
    enroll_per_minute_per_token: int = Field(
        60,
        ge=1,
        le=1_000_000,
        description="enrollments one provisioning token may be tried for per minute",
    )

    alert_evaluator: bool = Field(
        True,
        description="evaluate alert rules and retraining policies in this process "
        "(off for API-only replicas; several evaluators never duplicate an alert)",
    )
    alert_interval_seconds: float = Field(
        60.0, gt=0, le=3600, description="how often every alert rule and policy is evaluated"
    )
    alert_webhook_timeout_seconds: float = Field(
        10.0, gt=0, le=120, description="a webhook receiver's time to answer one POST"
    )
    alert_webhook_max_attempts: int = Field(
        8, ge=1, le=100, description="attempts of one webhook delivery before it is failed"
    )
    alert_webhook_backoff_min_seconds: float = Field(
        5.0, gt=0, le=3600, description="wait after a webhook's first failed attempt (doubles)"
    )
    alert_webhook_backoff_max_seconds: float = Field(
        600.0, gt=0, le=86400, description="longest wait between a webhook's attempts"
    )

    @model_validator(mode="after")
    def _no_dev_secrets_in_production(self) -> Settings:
        if self.mode != "dev" and self.secret_key.get_secret_value() == DEV_SECRET:
            raise ValueError(
                "EDGEFLEET_SECRET_KEY is the built-in development secret; "
                "set a secret of your own, or EDGEFLEET_MODE=dev for development"
            )
        if self.mode != "dev" and len(self.secret_key.get_secret_value()) < 32:
            raise ValueError("EDGEFLEET_SECRET_KEY must be at least 32 characters in prod mode")
        if self.manifest_refresh_margin_days >= self.manifest_lifetime_days:
            raise ValueError(
                "EDGEFLEET_MANIFEST_REFRESH_MARGIN_DAYS must be shorter than "
                "EDGEFLEET_MANIFEST_LIFETIME_DAYS"
            )
        return self

    @model_validator(mode="after")
    def _no_dev_broker_password_in_production(self) -> Settings:
        # Refused where the server would present it to a broker or write it into one's
        # configuration; a server on the embedded broker (dev) never needs it.
        url_has_password = urlsplit(self.broker_url).password is not None
        used = self.broker_config_dir is not None or (
            self.broker_url != "embedded" and not url_has_password
        )
        password = self.broker_password.get_secret_value()
        if self.mode != "dev" and used:
            if password == DEV_BROKER_PASSWORD:
                raise ValueError(
                    "EDGEFLEET_BROKER_PASSWORD is the built-in development password; "
                    "set one of your own, or EDGEFLEET_MODE=dev for development"
                )
            if len(password) < _MIN_BROKER_PASSWORD:
                raise ValueError(
                    f"EDGEFLEET_BROKER_PASSWORD must be at least {_MIN_BROKER_PASSWORD} "
                    "characters in prod mode"
                )
        return self

    @model_validator(mode="after")
    def _no_dev_admin_token_in_production(self) -> Settings:
        if self.mode == "dev" or self.admin_token is None:
            return self
        token = self.admin_token.get_secret_value()
        if token in (DEV_SECRET, DEV_BROKER_PASSWORD) or token.strip() != token:
            raise ValueError(
                "EDGEFLEET_ADMIN_TOKEN is a built-in development value; "
                "set a token of your own, or EDGEFLEET_MODE=dev for development"
            )
        if len(token) < _MIN_ADMIN_TOKEN:
            raise ValueError(
                f"EDGEFLEET_ADMIN_TOKEN must be at least {_MIN_ADMIN_TOKEN} characters in prod "
                "mode (edgefleet operators create makes such tokens)"
            )
        if token in (self.secret_key.get_secret_value(), self.broker_password.get_secret_value()):
            raise ValueError(
                "EDGEFLEET_ADMIN_TOKEN must differ from EDGEFLEET_SECRET_KEY and "
                "EDGEFLEET_BROKER_PASSWORD"
            )
        return self

    @model_validator(mode="after")
    def _artifact_store_consistent(self) -> Settings:
        location = self.artifacts_s3_location  # raises on a malformed URL
        if (self.s3_access_key_id is None) != (self.s3_secret_access_key is None):
            raise ValueError(
                "EDGEFLEET_S3_ACCESS_KEY_ID and EDGEFLEET_S3_SECRET_ACCESS_KEY go together: "
                "set both, or neither to use the standard AWS credential chain"
            )
        if location is not None and self.artifacts_cache_bytes < self.max_artifact_bytes:
            raise ValueError(
                "EDGEFLEET_ARTIFACTS_CACHE_BYTES must be at least EDGEFLEET_MAX_ARTIFACT_BYTES: "
                "the cache holds any artifact the server reads"
            )
        if location is not None and self.mode != "dev" and not self.s3_verify_tls:
            raise ValueError(
                "EDGEFLEET_S3_VERIFY_TLS=false is refused in prod mode; give the store's CA "
                "in EDGEFLEET_S3_CA_BUNDLE, or EDGEFLEET_MODE=dev for development"
            )
        return self

    @model_validator(mode="after")
    def _webhook_backoff_in_order(self) -> Settings:
        if self.alert_webhook_backoff_min_seconds > self.alert_webhook_backoff_max_seconds:
            raise ValueError(
                "EDGEFLEET_ALERT_WEBHOOK_BACKOFF_MIN_SECONDS must not exceed "
                "EDGEFLEET_ALERT_WEBHOOK_BACKOFF_MAX_SECONDS"
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'edgefleet.db').resolve()}"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def artifacts_s3_location(self) -> tuple[str, str] | None:
        """``(bucket, prefix)`` of an ``s3://`` artifacts URL; None for the folder."""
        if self.artifacts_url is None or not self.artifacts_url.strip():
            return None
        parsed = urlsplit(self.artifacts_url.strip())
        bucket = parsed.netloc
        if parsed.scheme != "s3" or not _BUCKET.fullmatch(bucket):
            raise ValueError(
                f"EDGEFLEET_ARTIFACTS_URL must be s3://bucket or s3://bucket/prefix (a bucket "
                f"name of 3-63 letters, digits, '.', '-', '_'), not {self.artifacts_url!r}; "
                "leave it unset for the folder in the data dir"
            )
        if parsed.query or parsed.fragment or "//" in parsed.path.strip("/"):
            raise ValueError(
                f"EDGEFLEET_ARTIFACTS_URL {self.artifacts_url!r}: a prefix is a plain path "
                "(no query, no fragment, no empty segment)"
            )
        return bucket, parsed.path.strip("/")

    @property
    def artifacts_cache_path(self) -> Path:
        return self.artifacts_cache_dir or self.data_dir / "artifacts-cache"

    def artifact_environment(self) -> dict[str, str]:
        """The ``EDGEFLEET_*`` variables that give another process (the training worker)
        this artifact store, whether these settings came from the environment or not."""
        env: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if not name.startswith(_STORE_FIELDS) or value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, Path):
                value = value.resolve()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            env[f"EDGEFLEET_{name.upper()}"] = str(value)
        return env

    @property
    def service_broker_url(self) -> str:
        """``broker_url`` as the server's own MQTT clients use it: with the service identity
        (``broker_username`` / ``broker_password``) unless the URL names a user itself."""
        parsed = urlsplit(self.broker_url)
        if self.broker_url == "embedded" or parsed.username is not None or not parsed.hostname:
            return self.broker_url
        userinfo = (
            f"{quote(self.broker_username, safe='')}:"
            f"{quote(self.broker_password.get_secret_value(), safe='')}"
        )
        return urlunsplit(parsed._replace(netloc=f"{userinfo}@{parsed.netloc}"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
