#!/bin/sh
# Installs the edgefleet agent from this provisioned image (`edgefleet image build`).
#
#   sudo sh install.sh [--device-id ID] [--root-key /path/to/fleet/root.pub]
#
# 1. Verifies the image first: MANIFEST.sig (signed by the fleet's online keys, listed in
#    the root-signed keyring.json) over MANIFEST.json, and every file's size and sha256;
#    an extra, missing or changed file stops the install before anything is written.
#    Without --root-key the image's own root.pub is the anchor, which proves the image is
#    intact, not who built it; pass the fleet's root.pub obtained out of band for that.
# 2. Creates a virtual environment and installs the agent from wheelhouse/ only
#    (pip --no-index; no package index, no pip configuration of this machine).
# 3. Writes the config (agent.toml) and the fleet's root key, keeping an existing config
#    (and so the device's identity) on a re-install.
# 4. As root on a systemd machine: an unprivileged user, the hardened unit, enabled.
# 5. Enrolls with the image's provisioning token (`edgefleet-agent enroll`) unless the
#    device is enrolled already, then starts the agent (systemd) or says how to.
#
# Options:
#   --prefix DIR        where the venv goes        (root: /opt/edgefleet; else ~/.local/share/edgefleet)
#   --config-dir DIR    agent.toml and root.pub    (root: /etc/edgefleet; else ~/.config/edgefleet)
#   --data-dir DIR      the agent's only writable folder (root: /var/lib/edgefleet; else PREFIX/data)
#   --device-id ID      default: <hostname>-<first 12 hex of /etc/machine-id> (random if none)
#   --root-key FILE     verify against this root public key, given out of band
#   --python PY         the Python to install with (default python3; must match the image's)
#   --user NAME         the service user (default edgefleet; root + systemd only)
#   --http-host HOST    address of the local inference API (default 127.0.0.1)
#   --no-enroll         install and configure only
#   --no-systemd        do not install the systemd unit (it is still written to PREFIX)
#   --configure-only    skip verification and packages (the venv exists): config + enroll
#   --allow-expired-keyring   accept an image whose keyring has expired
set -eu
umask 022

# Filled in by `edgefleet image build`.
EF_PROFILE=@@PROFILE@@
EF_SERVER=@@SERVER_URL@@
EF_PYTHON_VERSION=@@PYTHON_VERSION@@
EF_AGENT_VERSION=@@AGENT_VERSION@@

HERE=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

PREFIX='' CONFIG_DIR='' DATA_DIR='' DEVICE_ID='' ROOT_KEY='' PY=python3 SERVICE_USER=edgefleet
HTTP_HOST=127.0.0.1 ENROLL=1 SYSTEMD=1 CONFIGURE_ONLY=0 ALLOW_EXPIRED=''
need() { [ $# -ge 2 ] || die "$1 needs a value"; }
while [ $# -gt 0 ]; do
    case $1 in
        --prefix) need "$@"; PREFIX=$2; shift 2 ;;
        --config-dir) need "$@"; CONFIG_DIR=$2; shift 2 ;;
        --data-dir) need "$@"; DATA_DIR=$2; shift 2 ;;
        --device-id) need "$@"; DEVICE_ID=$2; shift 2 ;;
        --root-key) need "$@"; ROOT_KEY=$2; shift 2 ;;
        --python) need "$@"; PY=$2; shift 2 ;;
        --user) need "$@"; SERVICE_USER=$2; shift 2 ;;
        --http-host) need "$@"; HTTP_HOST=$2; shift 2 ;;
        --no-enroll) ENROLL=0; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --configure-only) CONFIGURE_ONLY=1; shift ;;
        --allow-expired-keyring) ALLOW_EXPIRED=--allow-expired-keyring; shift ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
if [ "$IS_ROOT" = 1 ]; then
    : "${PREFIX:=/opt/edgefleet}" "${CONFIG_DIR:=/etc/edgefleet}" "${DATA_DIR:=/var/lib/edgefleet}"
else
    [ -n "${HOME:-}" ] || die "HOME is not set: pass --prefix, --config-dir and --data-dir"
    : "${PREFIX:=$HOME/.local/share/edgefleet}" "${CONFIG_DIR:=$HOME/.config/edgefleet}"
    : "${DATA_DIR:=$PREFIX/data}"
fi
for dir in "$PREFIX" "$CONFIG_DIR" "$DATA_DIR"; do
    case $dir in
        /*) ;;
        *) die "$dir: give absolute paths" ;;
    esac
    case $dir in
        *[!A-Za-z0-9._/+-]*) die "$dir: use letters, digits and . _ / + - in paths (they go into a systemd unit)" ;;
    esac
done
VENV=$PREFIX/venv
CONFIG=$CONFIG_DIR/agent.toml
USE_SYSTEMD=0
if [ "$SYSTEMD" = 1 ] && [ "$IS_ROOT" = 1 ] && [ -d /run/systemd/system ]; then
    USE_SYSTEMD=1
fi

command -v "$PY" >/dev/null 2>&1 || die "no $PY here: the device needs Python $EF_PYTHON_VERSION"
HAVE=$("$PY" -I -c 'import sys; print("%d.%d" % sys.version_info[:2])') || die "$PY does not run"
[ "$HAVE" = "$EF_PYTHON_VERSION" ] ||
    die "this image holds wheels for Python $EF_PYTHON_VERSION; $PY is $HAVE (pass --python)"

# --- 1. verify: nothing is written before this passes --------------------------------------
if [ "$CONFIGURE_ONLY" = 0 ]; then
    set -- "$HERE"
    [ -n "$ROOT_KEY" ] && set -- "$@" --root-key "$ROOT_KEY"
    [ -n "$ALLOW_EXPIRED" ] && set -- "$@" "$ALLOW_EXPIRED"
    "$PY" -I -B "$HERE/verify.py" "$@" || die "the image did not verify; nothing was installed"
fi

# --- 2. packages, from the wheelhouse only --------------------------------------------------
if [ "$CONFIGURE_ONLY" = 0 ]; then
    say "installing edgefleet $EF_AGENT_VERSION ($EF_PROFILE) into $VENV"
    mkdir -p "$PREFIX"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || die "cannot create a venv (python3-venv?)"
    (
        # This machine's pip settings (index URLs, find-links, constraints) do not apply.
        unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIREMENT
        export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
        "$VENV/bin/python" -I -m pip install --no-index --no-cache-dir \
            --find-links "$HERE/wheelhouse" -r "$HERE/requirements.txt"
    ) || die "pip could not install the agent from the image's wheelhouse"
elif [ ! -x "$VENV/bin/edgefleet-agent" ]; then
    die "--configure-only: no agent in $VENV"
fi

# --- 3. configuration ----------------------------------------------------------------------
mkdir -p "$CONFIG_DIR"
mkdir -p "$DATA_DIR"
chmod 0700 "$DATA_DIR"
if [ -f "$CONFIG_DIR/root.pub" ]; then
    cmp -s "$HERE/root.pub" "$CONFIG_DIR/root.pub" ||
        die "$CONFIG_DIR/root.pub holds another fleet's root key; this image is for another fleet"
else
    cp "$HERE/root.pub" "$CONFIG_DIR/root.pub"
    chmod 0644 "$CONFIG_DIR/root.pub"
fi
if [ -f "$CONFIG" ]; then
    say "keeping the existing $CONFIG (this device's identity)"
else
    if [ -z "$DEVICE_ID" ]; then
        host=$(hostname 2>/dev/null || cat /etc/hostname 2>/dev/null || echo device)
        host=$(printf '%s' "$host" | tr -c 'A-Za-z0-9._-' '-' | cut -c1-40)
        suffix=$(tr -dc '0-9a-f' 2>/dev/null </etc/machine-id | cut -c1-12 || true)
        [ -n "$suffix" ] || suffix=$(od -An -N4 -tx1 /dev/urandom | tr -dc '0-9a-f')
        DEVICE_ID=${host:-device}-$suffix
    fi
    case $DEVICE_ID in
        ''|*[!A-Za-z0-9._-]*) die "device id $DEVICE_ID: use letters, digits and . _ -" ;;
    esac
    "$VENV/bin/python" -I -B - "$HERE/agent.toml" "$CONFIG.new" "$DEVICE_ID" "$DATA_DIR" \
        "$CONFIG_DIR/root.pub" "$HTTP_HOST" <<'EOF' || die "cannot write $CONFIG"
import json, os, sys
source, target, device_id, data_dir, root_key, http_host = sys.argv[1:]
with open(source, encoding="utf-8") as f:
    text = f.read()
for name, value in (("DEVICE_ID", device_id), ("DATA_DIR", data_dir),
                    ("ROOT_KEY", root_key), ("HTTP_HOST", http_host)):
    text = text.replace("@" + name + "@", json.dumps(value))  # a JSON string is TOML too
with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640), "w") as f:
    f.write(text)
from pathlib import Path
from agent.config import load_config
from agent.errors import ConfigError
try:
    load_config(Path(target))  # refuses what the agent would refuse
except ConfigError as e:
    os.unlink(target)
    sys.exit(f"install.sh: error: {e}")
EOF
    mv "$CONFIG.new" "$CONFIG"
    say "device $DEVICE_ID: config $CONFIG"
fi

# --- 4. the service ------------------------------------------------------------------------
UNIT=$PREFIX/edgefleet-agent.service
if [ "$CONFIGURE_ONLY" = 0 ]; then
    sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@CONFIG_DIR@|$CONFIG_DIR|g" \
        -e "s|@DATA_DIR@|$DATA_DIR|g" -e "s|@USER@|$SERVICE_USER|g" \
        "$HERE/edgefleet-agent.service" >"$UNIT"
fi
if [ "$USE_SYSTEMD" = 1 ]; then
    case $SERVICE_USER in
        ''|*[!a-z0-9_-]*) die "--user $SERVICE_USER: use lowercase letters, digits, _ and -" ;;
    esac
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        if command -v useradd >/dev/null 2>&1; then
            useradd --system --user-group --home-dir "$DATA_DIR" --no-create-home \
                --shell /usr/sbin/nologin "$SERVICE_USER"
        else
            adduser -S -D -H -h "$DATA_DIR" -s /sbin/nologin "$SERVICE_USER"
        fi
    fi
fi

# --- 5. enrollment -------------------------------------------------------------------------
if [ "$ENROLL" = 1 ] && [ ! -f "$DATA_DIR/broker-password" ]; then
    say "enrolling with $EF_SERVER"
    EDGEFLEET_ENROLL_TOKEN=$(cat "$HERE/token") "$VENV/bin/edgefleet-agent" enroll \
        --server "$EF_SERVER" --config "$CONFIG" ||
        die "the agent is installed but not enrolled; run this script again once $EF_SERVER answers"
fi

if [ "$USE_SYSTEMD" = 1 ]; then
    chown -R "$SERVICE_USER:" "$DATA_DIR"
    chgrp "$SERVICE_USER" "$CONFIG" && chmod 0640 "$CONFIG"
    install -m 0644 "$UNIT" /etc/systemd/system/edgefleet-agent.service
    systemctl daemon-reload
    if [ "$ENROLL" = 1 ]; then
        systemctl enable edgefleet-agent.service
        systemctl restart edgefleet-agent.service
        say "the agent runs: systemctl status edgefleet-agent; journalctl -u edgefleet-agent"
    else
        say "installed; enroll, then: systemctl enable --now edgefleet-agent"
    fi
else
    say "installed. Run the agent with:"
    say "  $VENV/bin/edgefleet-agent launch --config $CONFIG"
    [ "$CONFIGURE_ONLY" = 1 ] || say "  (systemd unit for it: $UNIT)"
fi
