"""Server settings, read from the environment (``EDGEFLEET_*``) -- 12-factor style.

Build them with :func:`get_settings` (cached) or construct :class:`Settings`
directly in tests; the FastAPI app takes them through a dependency so tests can
override them. Outside ``mode=dev`` the settings refuse the built-in development
secret: a production server must be given its own.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEV_SECRET", "Settings", "get_settings"]

DEV_SECRET = "edgefleet-dev-secret-do-not-use-in-production"  # noqa: S105 - refused outside dev


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
    keyring_lifetime_days: int = Field(90, gt=0)
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

    @model_validator(mode="after")
    def _no_dev_secrets_in_production(self) -> Settings:
        if self.mode != "dev" and self.secret_key.get_secret_value() == DEV_SECRET:
            raise ValueError(
                "EDGEFLEET_SECRET_KEY is the built-in development secret; "
                "set a secret of your own, or EDGEFLEET_MODE=dev for development"
            )
        if self.mode != "dev" and len(self.secret_key.get_secret_value()) < 32:
            raise ValueError("EDGEFLEET_SECRET_KEY must be at least 32 characters in prod mode")
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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
