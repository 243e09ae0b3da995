"""The text of a Mosquitto configuration for the fleet: ``mosquitto.conf``, password files, ACLs.

Pure: every function takes data and returns text; :mod:`server.brokerconf.writer` reads
the database and writes the files.

The configuration (Mosquitto 2.0, ``per_listener_settings true``) has two kinds of
listener:

- **device listeners** (plain, TLS, or TLS with client certificates). Devices log in
  with the password from enrollment (``devices.passwd``), or with a client certificate
  whose CN is their device id (``require_certificate`` + ``use_identity_as_username``).
  ``use_username_as_clientid`` replaces whatever client id a device sends with its
  username, so no device can take over another's session, and a client id carrying
  ``+``, ``#`` or ``/`` has no effect at all. ``devices.acl`` names each accepted device
  with its own topics (:func:`server.brokerconf.rules.device_rules`) -- an explicit
  ``user`` block per device rather than a ``pattern ... %u`` line, so that a device whose
  certificate still verifies after it was revoked has no topic at all.
- **the service listener** (usually loopback) for the server's own clients, which log
  in with the service identity (``service.passwd``) and get
  :func:`~server.brokerconf.rules.service_rules` (``service.acl``). Several server
  clients share that one username, which is why this listener keeps client ids as
  sent, and why device passwords do not work here nor the service password there.

Anonymous clients are refused on every listener. What always holds: a rendered file
never contains a line break, ``:`` or whitespace smuggled in through a name, a hash or a
path (each is checked and refused with :class:`BrokerConfigError`), and the same input
renders the same text, so an unchanged fleet rewrites nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from server.brokerconf.errors import BrokerConfigError
from server.brokerconf.rules import Access, Rules, device_rules, service_rules
from shared.errors import TopicError

__all__ = [
    "CONF_FILE",
    "DEVICE_ACL",
    "DEVICE_PASSWORDS",
    "FLEET_FILES",
    "SERVICE_ACL",
    "SERVICE_PASSWORDS",
    "Listener",
    "Login",
    "MosquittoLayout",
    "TlsFiles",
    "fleet_files",
    "render_acl",
    "render_mosquitto_conf",
    "render_passwords",
]

CONF_FILE = "mosquitto.conf"
DEVICE_PASSWORDS = "devices.passwd"
DEVICE_ACL = "devices.acl"
SERVICE_PASSWORDS = "service.passwd"
SERVICE_ACL = "service.acl"
FLEET_FILES = (DEVICE_ACL, DEVICE_PASSWORDS, SERVICE_ACL, SERVICE_PASSWORDS)
"""The files kept in step with the database, in the order they are replaced: an ACL before
its password file, so that between the two renames the broker is never more permissive
than either the old or the new configuration."""

_HEADER = "# Written by edgefleet from its database; edits here are overwritten.\n"
_USERNAME = re.compile(r"[A-Za-z0-9._@+-]{1,128}")
_HASH = re.compile(r"\$7\$[0-9]{1,10}\$[A-Za-z0-9+/]+={0,2}\$[A-Za-z0-9+/]+={0,2}")
_BIND = re.compile(r"[A-Za-z0-9.:_-]{1,253}")
_SYSTEM_USER = re.compile(r"[A-Za-z_][A-Za-z0-9._-]{0,31}")
_PRINTABLE_PATH = re.compile(r"[^\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Login:
    """One line of a Mosquitto password file: a username and its ``$7$`` PBKDF2 hash."""

    username: str
    password_hash: str


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A TLS listener's files. ``client_certificates`` makes it require a certificate
    signed by ``cafile`` and take the certificate's CN as the username."""

    certfile: Path
    keyfile: Path
    cafile: Path | None = None
    client_certificates: bool = False


@dataclass(frozen=True, slots=True)
class Listener:
    port: int
    bind: str | None = None
    tls: TlsFiles | None = None


@dataclass(frozen=True, slots=True)
class MosquittoLayout:
    """Where the files live and how Mosquitto listens.

    ``user`` is the system user Mosquitto runs as (it drops to ``mosquitto`` when
    started as root unless told otherwise); ``pid_file`` is where it writes its pid,
    which the server reads to make it reload.
    """

    directory: Path
    device_listeners: tuple[Listener, ...]
    service_listener: Listener
    pid_file: Path | None = None
    user: str | None = None
    persistence: bool = True
    extra_lines: tuple[str, ...] = field(default=())
    """Global options appended verbatim after checking (e.g. ``log_type all``)."""


# ----------------------------------------------------------------------------- checks


def _path(path: Path, what: str) -> str:
    text = str(path)
    if not path.is_absolute() or not _PRINTABLE_PATH.fullmatch(text) or text != text.strip():
        raise BrokerConfigError(
            f"{what} must be an absolute path without control characters or surrounding "
            f"spaces, not {text!r}"
        )
    return text


def _username(name: str) -> str:
    if not _USERNAME.fullmatch(name):
        raise BrokerConfigError(
            f"broker username {name!r} cannot go into a Mosquitto password file: use 1-128 "
            "characters of letters, digits, '.', '_', '@', '+' or '-'"
        )
    return name


def _check_layout(layout: MosquittoLayout) -> None:
    _path(layout.directory, "the configuration folder")
    listeners = (*layout.device_listeners, layout.service_listener)
    if not layout.device_listeners:
        raise BrokerConfigError("a broker configuration needs at least one device listener")
    ports = [listener.port for listener in listeners]
    if len(set(ports)) != len(ports):
        raise BrokerConfigError(f"every listener needs a port of its own, not {ports}")
    for listener in listeners:
        if not 1 <= listener.port <= 65535:
            raise BrokerConfigError(f"listener port {listener.port} is not in 1-65535")
        if listener.bind is not None and not _BIND.fullmatch(listener.bind):
            raise BrokerConfigError(f"listener address {listener.bind!r} is not a host or address")
        tls = listener.tls
        if tls is not None:
            _path(tls.certfile, "the TLS certificate")
            _path(tls.keyfile, "the TLS key")
            if tls.cafile is not None:
                _path(tls.cafile, "the CA certificate")
            if tls.client_certificates and tls.cafile is None:
                raise BrokerConfigError("client certificates need the CA that signs them (--ca)")
    if layout.service_listener.tls is not None and layout.service_listener.tls.client_certificates:
        raise BrokerConfigError("the service listener takes the service password, not certificates")
    if layout.pid_file is not None:
        _path(layout.pid_file, "the pid file")
    if layout.user is not None and not _SYSTEM_USER.fullmatch(layout.user):
        raise BrokerConfigError(f"{layout.user!r} is not a system user name")
    for line in layout.extra_lines:
        if not _PRINTABLE_PATH.fullmatch(line):
            raise BrokerConfigError(f"extra configuration line {line!r} has control characters")


# ----------------------------------------------------------------------------- rendering


def render_passwords(logins: Iterable[Login]) -> str:
    """A Mosquitto password file (``username:$7$...`` lines, sorted by username)."""
    lines = {}
    for login in logins:
        _username(login.username)
        if not _HASH.fullmatch(login.password_hash):
            raise BrokerConfigError(
                f"the password hash of {login.username!r} is not in Mosquitto's $7$ format"
            )
        if login.username in lines:
            raise BrokerConfigError(f"username {login.username!r} appears twice")
        lines[login.username] = f"{login.username}:{login.password_hash}\n"
    return _HEADER + "".join(lines[name] for name in sorted(lines))


def render_acl(entries: Iterable[tuple[str, Rules]]) -> str:
    """A Mosquitto ACL file: one ``user`` block per username with its ``topic`` lines.

    Nothing comes before the first ``user`` line, so anonymous clients (were they ever
    let in) would have no topic at all.
    """
    blocks = []
    for username, rules in sorted(entries, key=lambda entry: entry[0]):
        lines = [f"user {_username(username)}"]
        for rule in rules:
            access = "read" if rule.access == Access.READ else "write"
            lines.append(f"topic {access} {rule.topic_filter}")
            if rule.shared:
                lines.append(f"topic {access} $share/+/{rule.topic_filter}")
        blocks.append("\n".join(lines) + "\n")
    return _HEADER + "\n".join(blocks)


def fleet_files(devices: Sequence[Login], service: Login) -> dict[str, str]:
    """The four files kept in step with the database, by file name.

    ``devices`` are the accepted devices' live logins (their usernames are device ids);
    ``service`` is the server's own. A device login with the service's username, or
    with a username that is no device id, is refused.
    """
    for login in devices:
        if login.username == service.username:
            raise BrokerConfigError(
                f"device {login.username!r} has the server's own broker username"
            )
    try:
        device_acl = render_acl((login.username, device_rules(login.username)) for login in devices)
    except TopicError as e:
        raise BrokerConfigError(f"a device login is not a device id: {e}") from e
    return {
        DEVICE_ACL: device_acl,
        DEVICE_PASSWORDS: render_passwords(devices),
        SERVICE_ACL: render_acl([(service.username, service_rules())]),
        SERVICE_PASSWORDS: render_passwords([service]),
    }


def _listener_lines(listener: Listener, *, passwords: Path, acl: Path, devices: bool) -> list[str]:
    head = f"listener {listener.port}" + (f" {listener.bind}" if listener.bind else "")
    lines = [head, "protocol mqtt", "allow_anonymous false"]
    tls = listener.tls
    identity = tls is not None and tls.client_certificates
    if not identity:  # with use_identity_as_username Mosquitto ignores the password file
        lines.append(f"password_file {passwords}")
    lines.append(f"acl_file {acl}")
    if devices:
        lines.append("use_username_as_clientid true")
    if tls is not None:
        if tls.cafile is not None:
            lines.append(f"cafile {tls.cafile}")
        lines += [f"certfile {tls.certfile}", f"keyfile {tls.keyfile}"]
        if identity:
            lines += ["require_certificate true", "use_identity_as_username true"]
    return lines


def render_mosquitto_conf(layout: MosquittoLayout) -> str:
    """``mosquitto.conf`` for ``layout`` (see the module docstring for its shape)."""
    _check_layout(layout)
    directory = layout.directory
    lines = [
        "# Written by `edgefleet broker-config`. The password and ACL files next to it are",
        "# rewritten by the server whenever a device is accepted, rejected or revoked;",
        "# Mosquitto re-reads them on SIGHUP.",
        "per_listener_settings true",
    ]
    if layout.user is not None:
        lines.append(f"user {layout.user}")
    if layout.pid_file is not None:
        lines.append(f"pid_file {_path(layout.pid_file, 'the pid file')}")
    if layout.persistence:
        lines += ["persistence true", f"persistence_location {directory}/"]
    lines += list(layout.extra_lines)
    for listener in layout.device_listeners:
        lines += ["", "# devices: own topics only (devices.acl)"]
        lines += _listener_lines(
            listener,
            passwords=directory / DEVICE_PASSWORDS,
            acl=directory / DEVICE_ACL,
            devices=True,
        )
    lines += ["", "# the server's own clients (service.acl)"]
    lines += _listener_lines(
        layout.service_listener,
        passwords=directory / SERVICE_PASSWORDS,
        acl=directory / SERVICE_ACL,
        devices=False,
    )
    return "\n".join(lines) + "\n"
