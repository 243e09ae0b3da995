"""The fleet's trust anchors that devices and operators may read: keyring and root key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from server.api.deps import KeysDep

router = APIRouter(prefix="/keyring", tags=["keys"])


class KeyringView(BaseModel):
    version: int
    root_keyid: str
    root_public_key: str
    online_keyids: list[str]
    issued_at: str
    expires_at: str
    envelope: dict[str, Any]


@router.get("", response_model=KeyringView, summary="The current root-signed keyring")
def current_keyring(keys: KeysDep) -> KeyringView:
    """Devices verify ``envelope`` against the root key baked into their image."""
    return KeyringView(
        version=keys.keyring.version,
        root_keyid=keys.root_public.keyid,
        root_public_key=keys.root_public.to_base64(),
        online_keyids=[k.keyid for k in keys.keyring.keys],
        issued_at=keys.keyring.issued_at.isoformat(),
        expires_at=keys.keyring.expires_at.isoformat(),
        envelope=keys.keyring_envelope.model_dump(mode="json", by_alias=True),
    )
