"""Enrollment, the device's half: gather its facts, register with a provisioning token,
and keep the credentials the server hands out once.

``edgefleet-agent enroll --server URL --token T [--config FILE]``:

1. Read the agent's config if it exists (device id, profile, data dir); otherwise make
   one from the options (a device id is generated when none is given).
2. Gather the facts: device id, profile, CPU architecture, the model runtimes this
   machine can import (:func:`agent.runtime.available_runtimes`), agent version, tags.
3. ``POST {server}/api/v1/enroll`` (stdlib :mod:`urllib` only: this runs on the device).
4. Write the broker password to ``<data_dir>/broker-password`` and point the config's
   ``[broker]`` table at it (url, username, password_file).

What always holds:

- Everything that can be checked locally is checked before the server is asked, so a
  device is not registered for a config that cannot take its credentials.
- Secrets are written with mode 0600 (the data dir 0700), through a temporary file,
  fsync and rename: a file is either the old one or the complete new one. The config
  is validated as the agent will load it before it replaces the old one; outside its
  ``[broker]`` table the old config's text (and comments) is kept as it was.
- An agent that is already enrolled (a password file, or broker credentials in its
  config) is not enrolled again without ``force``.
- Failures are :class:`EnrollError` (with the HTTP status when the server refused);
  the server's reason is passed on word for word.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import socket
import tempfile
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, ValidationError

from agent import __version__
from agent.config import load_config
from agent.errors import AgentError, ConfigError
from shared.errors import TopicError
from shared.topics import check_device_id

__all__ = [
    "PASSWORD_FILE_NAME",
    "EnrollError",
    "EnrollResult",
    "Facts",
    "enroll",
    "gather_facts",
    "generate_device_id",
    "post_enrollment",
]

PASSWORD_FILE_NAME = "broker-password"  # noqa: S105 - a file name
ROOT_KEY_FILE_NAME = "root.pub"
MAX_RESPONSE_BYTES = 64 * 1024
_BROKER_HEADER = re.compile(r"^\s*\[\s*broker\s*\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[")
_COMMENT = re.compile(r"^\s*#")
_KEPT_BROKER_KEYS = ("ca_file", "cert_file", "key_file", "protocol", "keepalive")


class EnrollError(AgentError):
    """Enrollment failed; ``status_code`` is the server's HTTP status when it refused."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True, slots=True)
class Facts:
    device_id: str
    profile: str
    arch: str
    runtime_name: str
    runtime_version: str
    runtimes: Mapping[str, str]
    agent_version: str
    tags: Mapping[str, str]

    def request_body(self, token: str) -> dict[str, Any]:
        return {
            "token": token,
            "device_id": self.device_id,
            "profile": self.profile,
            "arch": self.arch,
            "runtime": {"name": self.runtime_name, "version": self.runtime_version},
            "runtimes": dict(self.runtimes),
            "agent_version": self.agent_version,
            "tags": dict(self.tags),
        }


@dataclass(frozen=True, slots=True)
class EnrollResult:
    device_id: str
    status: str
    message: str
    config_path: Path
    password_file: Path
    broker_url: str | None
    server_url: str


class _Credentials(BaseModel):
    model_config = ConfigDict(extra="ignore")

    username: str
    password: str
    client_id: str | None = None
    broker_url: str | None = None


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")

    device_id: str
    status: str
    credentials: _Credentials
    server_url: str | None = None
    root_public_key: str | None = None
    message: str = ""


# ----------------------------------------------------------------------------- facts


def generate_device_id() -> str:
    """``<hostname>-<8 hex>``, reduced to the characters a device id may have."""
    host = re.sub(r"[^A-Za-z0-9._-]+", "-", socket.gethostname()).strip("-.")[:40] or "device"
    return check_device_id(f"{host}-{secrets.token_hex(4)}")


def gather_facts(
    *,
    device_id: str,
    profile: str,
    tags: Mapping[str, str] | None = None,
    runtimes: Mapping[str, str] | None = None,
) -> Facts:
    """This machine's facts; ``runtimes`` defaults to what it can import now."""
    if runtimes is None:
        from agent.runtime import available_runtimes

        runtimes = available_runtimes()
    name, version = next(iter(runtimes.items()), ("none", "0"))
    return Facts(
        device_id=device_id,
        profile=profile,
        arch=platform.machine() or "unknown",
        runtime_name=name,
        runtime_version=version,
        runtimes=dict(runtimes),
        agent_version=__version__,
        tags=dict(tags or {}),
    )


# ----------------------------------------------------------------------------- HTTP


def post_enrollment(server_url: str, body: Mapping[str, Any], *, timeout: float = 30.0) -> Any:
    """POST the enrollment; the server's JSON answer, or :class:`EnrollError`."""
    url = _enroll_url(server_url)
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked to be http(s)
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"edgefleet-agent/{__version__}",
        },
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            raw = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise EnrollError(
            f"the server refused the enrollment (HTTP {e.code}): {_detail(e)}", e.code
        ) from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise EnrollError(f"cannot reach the server at {server_url}: {reason}") from e
    if len(raw) > MAX_RESPONSE_BYTES:
        raise EnrollError(f"the server's answer is larger than {MAX_RESPONSE_BYTES} bytes")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise EnrollError(f"the server's answer is not JSON: {e}") from e


def _enroll_url(server_url: str) -> str:
    parsed = urlparse(server_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(f"server URL must look like https://host[:port], not {server_url!r}")
    return server_url.rstrip("/") + "/api/v1/enroll"


def _detail(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read(MAX_RESPONSE_BYTES))
    except (ValueError, OSError):
        return str(error.reason)
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI's validation errors
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', []) if p != 'body')}: {item.get('msg')}"
            for item in detail
            if isinstance(item, dict)
        )
    return str(detail)


# ----------------------------------------------------------------------------- files


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` atomically with ``data``, created with ``mode``."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def _table(name: str, values: Mapping[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _replace_broker_table(text: str, broker: Mapping[str, Any], config: Path) -> str:
    """``text`` with its ``[broker]`` table replaced by ``broker`` (or one appended)."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if _BROKER_HEADER.match(line)]
    if len(starts) > 1:
        raise ConfigError(f"{config} has more than one [broker] table")
    if not starts:
        return text.rstrip("\n") + "\n\n" + _table("broker", broker)
    start = starts[0]
    end = next((i for i in range(start + 1, len(lines)) if _ANY_HEADER.match(lines[i])), len(lines))
    while end > start + 1 and (not lines[end - 1].strip() or _COMMENT.match(lines[end - 1])):
        end -= 1  # comments just above the next table belong to it
    before = "\n".join(lines[:start]).rstrip("\n")
    after = "\n".join(lines[end:])
    parts = [before + "\n\n" if before else "", _table("broker", broker)]
    if after:
        parts.append("\n" + after.rstrip("\n") + "\n")
    return "".join(parts)


# ----------------------------------------------------------------------------- enroll


@dataclass(frozen=True, slots=True)
class _Plan:
    config_path: Path
    config_text: str | None  # None: a new config is written
    device_id: str
    profile: str
    data_dir: Path
    kept_broker: dict[str, Any]
    broker_url: str | None
    root_key: str | None  # for a new config: a key file, or None to take the server's


def _plan(
    config_path: Path,
    *,
    device_id: str | None,
    profile: str | None,
    data_dir: Path | None,
    broker_url: str | None,
    root_key: Path | None,
    force: bool,
) -> _Plan:
    if config_path.exists():
        config = load_config(config_path)  # raises ConfigError naming the problem
        text = config_path.read_text(encoding="utf-8")
        raw = tomllib.loads(text)
        for option, given, have in (
            ("--device-id", device_id, config.device_id),
            ("--profile", profile, config.profile),
        ):
            if given is not None and given != have:
                raise ConfigError(f"{config_path} says {have!r}; {option} {given!r} disagrees")
        if data_dir is not None and data_dir.resolve() != config.data_dir.resolve():
            raise ConfigError(f"{config_path} keeps its data in {config.data_dir}, not {data_dir}")
        if "broker" in raw and not any(_BROKER_HEADER.match(x) for x in text.splitlines()):
            raise ConfigError(
                f"{config_path} sets broker as an inline table or dotted keys; "
                "write it as a [broker] table so enrollment can fill it in"
            )
        broker = config.broker
        if not force and broker is not None and broker.username is not None:
            raise ConfigError(
                f"{config_path} already has broker credentials (user {broker.username!r}); "
                "pass --force to enroll again"
            )
        kept = {k: v for k, v in (raw.get("broker") or {}).items() if k in _KEPT_BROKER_KEYS}
        return _Plan(
            config_path=config_path,
            config_text=text,
            device_id=config.device_id,
            profile=config.profile,
            data_dir=config.data_dir,
            kept_broker=kept,
            broker_url=broker_url or (None if broker is None else broker.url),
            root_key=None,
        )
    if profile is None:
        raise ConfigError(f"{config_path} does not exist: pass --profile to make a new config")
    if root_key is not None and not root_key.is_file():
        raise ConfigError(f"--root-key {root_key} is not a file")
    try:
        chosen_id = generate_device_id() if device_id is None else check_device_id(device_id)
    except TopicError as e:
        raise ConfigError(str(e)) from e
    return _Plan(
        config_path=config_path,
        config_text=None,
        device_id=chosen_id,
        profile=profile,
        data_dir=(data_dir or config_path.parent / "edgefleet-data").resolve(),
        kept_broker={},
        broker_url=broker_url,
        root_key=None if root_key is None else str(root_key.resolve()),
    )


def enroll(
    server_url: str,
    token: str,
    *,
    config_path: Path,
    device_id: str | None = None,
    profile: str | None = None,
    data_dir: Path | None = None,
    tags: Mapping[str, str] | None = None,
    broker_url: str | None = None,
    root_key: Path | None = None,
    force: bool = False,
    runtimes: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    warn: Callable[[str], None] = lambda _message: None,
) -> EnrollResult:
    """Enroll this device and store its credentials; see the module docstring."""
    _enroll_url(server_url)
    config_path = config_path.resolve()
    plan = _plan(
        config_path,
        device_id=device_id,
        profile=profile,
        data_dir=data_dir,
        broker_url=broker_url,
        root_key=root_key,
        force=force,
    )
    password_file = plan.data_dir / PASSWORD_FILE_NAME
    if password_file.exists() and not force:
        raise ConfigError(
            f"{password_file} exists: this device is enrolled already; pass --force to enroll again"
        )
    try:
        plan.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        config_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {plan.data_dir}: {e}") from e
    for directory in {plan.data_dir, config_path.parent}:
        if not os.access(directory, os.W_OK):
            raise ConfigError(f"{directory} is not writable")
    if plan.config_text is not None:  # the edited config must load, whatever the server says
        placeholder = {
            "url": plan.broker_url or "mqtt://broker.invalid:1883",
            "username": plan.device_id,
            "password_file": str(password_file),
        }
        _check_config(
            config_path,
            _replace_broker_table(plan.config_text, placeholder | plan.kept_broker, config_path),
            replace=False,
        )
    facts = gather_facts(
        device_id=plan.device_id, profile=plan.profile, tags=tags, runtimes=runtimes
    )
    body = post_enrollment(server_url, facts.request_body(token), timeout=timeout)
    try:
        answer = _Answer.model_validate(body)
    except ValidationError as e:
        raise EnrollError(f"the server's answer is not an enrollment: {e}") from e
    if answer.device_id != plan.device_id:
        raise EnrollError(
            f"the server enrolled {answer.device_id!r}, not this device ({plan.device_id!r})"
        )
    broker = plan.broker_url or answer.credentials.broker_url
    _write_private(password_file, answer.credentials.password.encode("utf-8") + b"\n")
    if plan.config_text is None:
        root = plan.root_key
        if root is None:
            if answer.root_public_key is None:
                raise EnrollError("the server sent no root key; pass --root-key")
            key_file = config_path.parent / ROOT_KEY_FILE_NAME
            _write_private(key_file, answer.root_public_key.encode("ascii") + b"\n", mode=0o644)
            root = str(key_file)
            warn(
                f"trusting the root key the server sent ({key_file}); "
                "compare it with the fleet's root.pub, or pass --root-key"
            )
        text = _new_config(plan, answer, broker, password_file, root)
        mode = 0o600
    else:
        fields = _broker_fields(answer, broker, password_file) | plan.kept_broker
        text = (
            plan.config_text
            if broker is None
            else _replace_broker_table(plan.config_text, fields, config_path)
        )
        mode = config_path.stat().st_mode & 0o777
    if broker is None:
        warn(
            "the server named no broker: add url under [broker] in "
            f"{config_path} (username {answer.credentials.username!r}, "
            f"password_file {str(password_file)!r})"
        )
    _check_config(config_path, text, mode=mode)
    return EnrollResult(
        device_id=answer.device_id,
        status=answer.status,
        message=answer.message,
        config_path=config_path,
        password_file=password_file,
        broker_url=broker,
        server_url=answer.server_url or server_url,
    )


def _broker_fields(answer: _Answer, broker: str | None, password_file: Path) -> dict[str, Any]:
    return {
        "url": broker,
        "username": answer.credentials.username,
        "password_file": str(password_file),
    }


def _new_config(
    plan: _Plan, answer: _Answer, broker: str | None, password_file: Path, root_key: str
) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    top = {
        "device_id": answer.device_id,
        "profile": plan.profile,
        "data_dir": str(plan.data_dir),
    }
    text = f"# Written by `edgefleet-agent enroll` on {stamp}.\n"
    text += "\n".join(f"{k} = {_toml_value(v)}" for k, v in top.items()) + "\n"
    if broker is not None:
        text += "\n" + _table("broker", _broker_fields(answer, broker, password_file))
    text += "\n" + _table("trust", {"root_keys": [root_key]})
    if answer.server_url:
        text += "\n" + _table("download", {"http_base_url": answer.server_url})
    return text


def _check_config(path: Path, text: str, *, mode: int = 0o600, replace: bool = True) -> None:
    """Validate ``text`` as the agent loads it (from the same folder); then, if ``replace``,
    make it ``path``."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".toml", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            load_config(Path(temp))
        except ConfigError as e:
            raise ConfigError(
                f"{path} would not load after enrollment: {e}".replace(temp, str(path))
            ) from e
        if replace:
            os.replace(temp, path)
    finally:
        Path(temp).unlink(missing_ok=True)
    if replace:
        _fsync_dir(path.parent)
