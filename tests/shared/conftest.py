"""Keys, clocks and documents for the wire-contract tests (deterministic: fixed seeds)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from shared.messages import DesiredMessage, DesiredState, KeyEntry, Keyring
from shared.signing import PayloadType, SigningKey, sign_envelope

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def key(label: str) -> SigningKey:
    return SigningKey.from_seed(hashlib.sha256(label.encode()).digest())


@pytest.fixture
def now() -> datetime:
    return NOW


@pytest.fixture
def root_key() -> SigningKey:
    return key("root")


@pytest.fixture
def online_key() -> SigningKey:
    return key("online-1")


def make_keyring(
    *online: SigningKey, version: int = 1, threshold: int = 1, days: int = 30
) -> Keyring:
    return Keyring(
        version=version,
        issued_at=NOW + timedelta(days=days - 60),
        expires_at=NOW + timedelta(days=days),
        threshold=threshold,
        keys=[KeyEntry(keyid=k.keyid, public_key=k.public.to_base64()) for k in online],
    )


def make_desired(
    *,
    device_id: str = "cam-1",
    manifest_version: int = 1,
    expires_in: timedelta = timedelta(hours=6),
    deployments: list[dict[str, object]] | None = None,
) -> DesiredState:
    return DesiredState(
        device_id=device_id,
        manifest_version=manifest_version,
        issued_at=NOW - timedelta(minutes=5),
        expires_at=NOW + expires_in,
        rollout_id="r-1",
        deployments=deployments
        or [
            {
                "model_name": "digits",
                "model_version": 3,
                "target": "edge-arm64-litert",
                "artifact": {"sha256": "ab" * 32, "length": 4096},
            }
        ],
    )


def make_message(
    desired: DesiredState,
    *,
    root: SigningKey,
    signers: list[SigningKey],
    keyring: Keyring | None = None,
) -> DesiredMessage:
    keyring = keyring or make_keyring(*signers)
    return DesiredMessage(
        keyring=sign_envelope(keyring.to_bytes(), PayloadType.KEYRING, [root]),
        manifest=sign_envelope(desired.to_bytes(), PayloadType.DESIRED_STATE, signers),
    )
