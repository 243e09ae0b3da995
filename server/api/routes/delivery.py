"""HTTP range download of artifacts, for devices that fetch over HTTP instead of MQTT blocks.

``GET /api/v1/devices/{device_id}/artifacts/{sha256}`` serves one stored artifact with
HTTP Range support (``206`` with ``Content-Range`` for a range, ``416`` for one past the
end, ``200`` without a range), so an interrupted download resumes from the bytes the
device holds (agent/download.py ``http_download``).

What always holds:

- The device authenticates with HTTP Basic: its device id and the password it received
  at enrollment. The device id in the path must be the authenticated one.
- Only artifacts that the device's signed desired state names are served -- the same
  rule as the MQTT block server -- so a device credential cannot be used to pull any
  model in the store. Authentication and that check come before the store is looked
  at, so existence never leaks to a caller who may not have the file.
- At most ``max_concurrent_transfers`` responses stream at once (shared with nothing
  else); past that a device gets ``503`` with ``Retry-After`` and retries with backoff,
  so a fleet-wide rollout cannot saturate the server.
"""

from __future__ import annotations

import threading
from typing import Annotated, Protocol

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import FileResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.types import Receive, Scope, Send

from server.errors import NotFoundError

__all__ = ["ArtifactAuthority", "TransferLimiter", "router"]

router = APIRouter(prefix="/devices", tags=["delivery"])
_basic = HTTPBasic(auto_error=False, realm="edgefleet devices")
RETRY_AFTER_SECONDS = 5


class ArtifactAuthority(Protocol):
    """Who may fetch what: the fleet's device credentials and signed desired states."""

    def authenticate(self, device_id: str, password: str) -> bool:
        """True if ``password`` is the live credential of an accepted device ``device_id``."""
        ...

    def allowed(self, device_id: str, sha256: str) -> bool:
        """True if the device's current signed desired state names artifact ``sha256``."""
        ...


class TransferLimiter:
    """A counter of transfers in flight, bounded; never blocks (callers get 503 instead)."""

    def __init__(self, max_concurrent: int) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.max_concurrent = max_concurrent
        self._lock = threading.Lock()
        self.in_flight = 0
        self.refused = 0
        self.served = 0

    def try_acquire(self) -> bool:
        with self._lock:
            if self.in_flight >= self.max_concurrent:
                self.refused += 1
                return False
            self.in_flight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self.served += 1


class _LimitedFileResponse(FileResponse):
    """A file response that gives its transfer slot back however the transfer ends."""

    def __init__(self, *args: object, limiter: TransferLimiter, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._limiter.release()


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": 'Basic realm="edgefleet devices"'},
    )


@router.get(
    "/{device_id}/artifacts/{sha256}",
    summary="Download an artifact named by the device's desired state (HTTP Range supported)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "the whole artifact"},
        206: {"description": "the requested byte range"},
        401: {"description": "missing or wrong device credentials"},
        403: {"description": "the device's desired state does not name this artifact"},
        404: {"description": "named, but not in the store"},
        416: {"description": "the range starts past the end"},
        503: {"description": "too many transfers in flight; retry after Retry-After seconds"},
    },
)
def download_artifact(
    device_id: str,
    sha256: str,
    request: Request,
    credentials: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
) -> FileResponse:
    authority: ArtifactAuthority | None = getattr(request.app.state, "artifact_authority", None)
    if credentials is None:
        raise _unauthorized("device credentials required (HTTP Basic: device id and password)")
    if authority is None or credentials.username != device_id:
        raise _unauthorized(f"these credentials are not those of device {device_id!r}")
    if not authority.authenticate(device_id, credentials.password):
        raise _unauthorized(f"device {device_id!r}: wrong password, or not an accepted device")
    if not authority.allowed(device_id, sha256):
        raise HTTPException(
            status_code=status.HTTP_403_FORBIDDEN,
            detail=f"the desired state of {device_id!r} does not name artifact {sha256[:16]}...",
        )
    store = request.app.state.artifacts
    try:
        path = store.path(sha256)
    except NotFoundError as e:
        raise HTTPException(status_code=404, detail=str(e)) from e
    if not path.is_file():
        raise HTTPException(status_code=404, detail=f"artifact {sha256[:16]}... is not stored")
    limiter: TransferLimiter = request.app.state.transfer_limiter
    if not limiter.try_acquire():
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"{limiter.max_concurrent} transfers in flight; retry later",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    try:
        return _LimitedFileResponse(
            path, media_type="application/octet-stream", limiter=limiter, filename=sha256
        )
    except BaseException:
        limiter.release()
        raise
