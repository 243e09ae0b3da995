"""The agent's configuration: one TOML file, validated at start, with every limit in one place.

Example (``edgefleet-agent run --config agent.toml``)::

    device_id = "press-line2-cam07"
    profile = "edge-arm64-litert"
    data_dir = "/var/lib/edgefleet"
    window_seconds = 60

    [broker]
    url = "mqtts://broker.example:8883"     # or mqtt://host:1883
    username = "press-line2-cam07"
    password_file = "/etc/edgefleet/broker-password"
    ca_file = "/etc/edgefleet/ca.pem"

    [trust]
    root_keys = ["/etc/edgefleet/root.pub"]  # files holding base64 Ed25519 public keys

    [http]
    host = "127.0.0.1"
    port = 8761

    [self_update]                            # the agent's own updates, under
    max_starts = 3                           # `edgefleet-agent launch`

    [limits]                                 # every bound has a default; e.g.
    health_check_inferences = 20             # a new model is judged on its first 20
    health_check_max_seconds = 300           # ...or on what came within 5 minutes

What always holds: relative paths are resolved against the config file's folder; a
value outside its bounds is refused at load with the field named; nothing here does
network I/O.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError
from shared.signing import VerifyKey
from shared.topics import check_device_id

__all__ = [
    "AgentConfig",
    "BrokerConfig",
    "HttpConfig",
    "Limits",
    "SelfUpdateConfig",
    "load_config",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerConfig(_Section):
    url: str = Field(description="mqtt://host:port or mqtts://host:port")
    username: str | None = None
    password: str | None = Field(None, description="prefer password_file")
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive: int = Field(30, ge=5, le=3600)
    client_id: str | None = Field(None, description="default: the device id")

    @field_validator("url")
    @classmethod
    def _url(cls, url: str) -> str:
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ValueError("broker url must look like mqtt://host:port or mqtts://host:port")
        return url

    @property
    def host(self) -> str:
        host = urlparse(self.url).hostname
        assert host is not None
        return host

    @property
    def port(self) -> int:
        parsed = urlparse(self.url)
        return parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)

    @property
    def tls(self) -> bool:
        return urlparse(self.url).scheme == "mqtts"

    def resolved_password(self) -> str | None:
        if self.password_file is not None:
            try:
                return self.password_file.read_text().strip()
            except OSError as e:
                raise ConfigError(f"cannot read broker password_file: {e}") from e
        return self.password


class TrustConfig(_Section):
    root_keys: list[str] = Field(
        min_length=1, description="files holding a base64 root public key, or the base64 itself"
    )
    root_threshold: int = Field(1, ge=1)


class HttpConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(8761, ge=0, le=65535)
    unix_socket: Path | None = None


class DownloadConfig(_Section):
    method: Literal["mqtt", "http"] = "mqtt"
    http_base_url: str | None = Field(None, description="server URL for HTTP range downloads")
    block_size: int = Field(64 * 1024, ge=1024, le=256 * 1024)
    blocks_per_request: int = Field(8, ge=1, le=64)
    request_timeout_seconds: float = Field(15.0, gt=0)


class CaptureConfig(_Section):
    enabled: bool = False
    max_per_window: int = Field(32, ge=1, le=10_000)
    max_bytes: int = Field(1024 * 1024, ge=1024)


class Limits(_Section):
    """Every bound the agent enforces, in one place (enforced while streaming, not after)."""

    max_bundle_bytes: int = Field(256 * 1024 * 1024, gt=0)
    outbox_max_rows: int = Field(10_000, gt=0)
    outbox_max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    backoff_min_seconds: float = Field(1.0, gt=0)
    backoff_max_seconds: float = Field(120.0, gt=0)
    max_request_bytes: int = Field(4 * 1024 * 1024, gt=0, description="local API body limit")
    max_batch_rows: int = Field(1024, gt=0)
    prediction_log_size: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="recent predictions remembered by id (about 30 bytes each), so a label "
        "posted to /v1/feedback can be matched to the model and class that answered",
    )
    health_check_inferences: int = Field(
        20, ge=1, description="first real inferences a new model is judged on"
    )
    health_check_max_error_rate: float = Field(
        0.1, ge=0, le=1, description="share of those that may fail (runtime errors only)"
    )
    health_check_max_seconds: float = Field(
        300.0,
        gt=0,
        description="longest wait for them; then what came is judged (nothing: it passes on "
        "its self-test replay)",
    )
    agent_wheel_max_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="largest agent wheel fetched (its signed length)"
    )
    agent_wheel_max_unpacked_bytes: int = Field(
        256 * 1024 * 1024, gt=0, description="largest agent wheel once extracted"
    )
    agent_wheel_max_files: int = Field(20_000, gt=0, description="most files in an agent wheel")
    health_check_max_restarts: int = Field(
        2,
        ge=0,
        description="agent starts tolerated while an update is loaded, self-tested or on its "
        "health check; one more and it is given up (a model that crashes the process)",
    )

    @model_validator(mode="after")
    def _backoff(self) -> Limits:
        if self.backoff_max_seconds < self.backoff_min_seconds:
            raise ValueError("backoff_max_seconds is below backoff_min_seconds")
        return self


class SelfUpdateConfig(_Section):
    """The agent's own updates (``agent.selfupdate``) and the launcher that runs it."""

    enabled: bool = Field(
        True, description="take agent versions from the desired state (under the launcher only)"
    )
    max_starts: int = Field(
        3,
        ge=1,
        le=100,
        description="launcher starts of a new version before it is given up if it never "
        "reported healthy (kills and power cuts during its trial)",
    )
    keep_versions: int = Field(
        2, ge=2, le=10, description="installed versions kept: the current one and earlier ones"
    )
    stop_grace_seconds: float = Field(
        20.0, gt=0, le=600, description="how long the launcher waits for the agent to stop"
    )
    restart_backoff_min_seconds: float = Field(1.0, gt=0)
    restart_backoff_max_seconds: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _backoff(self) -> SelfUpdateConfig:
        if self.restart_backoff_max_seconds < self.restart_backoff_min_seconds:
            raise ValueError("restart_backoff_max_seconds is below restart_backoff_min_seconds")
        return self


class AgentConfig(_Section):
    device_id: str
    profile: str = Field(min_length=1, max_length=64)
    data_dir: Path
    window_seconds: float = Field(60.0, ge=1.0, le=86_400.0)
    broker: BrokerConfig | None = Field(None, description="none: run offline only")
    trust: TrustConfig
    http: HttpConfig = Field(default_factory=HttpConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    limits: Limits = Field(default_factory=Limits)
    self_update: SelfUpdateConfig = Field(default_factory=SelfUpdateConfig)
    latency_sla_ms_p95: float | None = Field(None, gt=0, description="from the profile")

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, device_id: str) -> str:
        return check_device_id(device_id)

    def root_keys(self) -> list[VerifyKey]:
        keys = []
        for entry in self.trust.root_keys:
            path = Path(entry)
            try:
                text = path.read_text().strip() if path.is_file() else entry.strip()
                keys.append(VerifyKey.from_base64(text))
            except (OSError, ValueError) as e:
                raise ConfigError(f"trust.root_keys: {entry!r} is not a usable key: {e}") from e
        if self.trust.root_threshold > len(keys):
            raise ConfigError("trust.root_threshold is higher than the number of root keys")
        return keys


def _resolve(base: Path, value: object) -> object:
    return value if not isinstance(value, str) or Path(value).is_absolute() else str(base / value)


def load_config(path: Path) -> AgentConfig:
    """Read and validate the TOML file; raise :class:`ConfigError` naming every problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    base = path.resolve().parent
    if "data_dir" in data:
        data["data_dir"] = _resolve(base, data["data_dir"])
    for section, keys in (
        ("broker", ("password_file", "ca_file", "cert_file", "key_file")),
        ("http", ("unix_socket",)),
    ):
        for key in keys:
            if isinstance(data.get(section), dict) and key in data[section]:
                data[section][key] = _resolve(base, data[section][key])
    trust = data.get("trust")
    if isinstance(trust, dict) and isinstance(trust.get("root_keys"), list):
        trust["root_keys"] = [
            str(_resolve(base, k)) if isinstance(k, str) and (base / k).is_file() else k
            for k in trust["root_keys"]
        ]
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"{path}: {problems}") from e
