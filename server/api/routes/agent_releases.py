"""Agent releases: publish a wheel of the agent, list and show the published versions.

``POST /agent-releases`` takes the wheel as the raw request body
(``application/octet-stream``), its file name in ``?filename=`` and optional
``?notes=``; it needs the operator role (as every write) and is audited. A wheel that
fails the check answers 422 naming the problem; a version published already, 409.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel, Field

from server.agent_releases import service
from server.agent_releases.errors import InvalidWheelError
from server.agent_releases.models import AgentRelease
from server.api.deps import ArtifactsDep, NowDep, SessionDep
from server.auth import audit
from server.auth.deps import PrincipalDep
from shared.messages import AGENT_WHEEL_MEDIA_TYPE
from shared.wheel import DEFAULT_LIMITS as WHEEL_LIMITS

__all__ = ["MAX_WHEEL_BYTES", "AgentReleasePublic", "router"]

router = APIRouter(prefix="/agent-releases", tags=["agent releases"])

MAX_WHEEL_BYTES = WHEEL_LIMITS.max_wheel_bytes or 64 * 1024 * 1024
"""The largest agent wheel the server takes (read while streaming, refused past it)."""


class AgentReleasePublic(BaseModel):
    version: str
    sha256: str
    length: int
    media_type: str = AGENT_WHEEL_MEDIA_TYPE
    filename: str
    requires_python: str | None
    notes: str
    published_by: str
    created_at: datetime
    files: int | None = Field(None, description="files in the wheel (on publish only)")

    @classmethod
    def of(cls, release: AgentRelease, *, files: int | None = None) -> AgentReleasePublic:
        return cls(
            version=release.version,
            sha256=release.sha256,
            length=release.length,
            filename=release.filename,
            requires_python=release.requires_python,
            notes=release.notes,
            published_by=release.published_by,
            created_at=release.created_at,
            files=files,
        )


async def _read_body(request: Request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_WHEEL_BYTES:
            raise InvalidWheelError(
                f"the wheel is larger than the limit of {MAX_WHEEL_BYTES} bytes"
            )
        chunks.append(chunk)
    if not size:
        raise InvalidWheelError("no wheel: the request body is empty")
    return b"".join(chunks)


@router.post(
    "",
    response_model=AgentReleasePublic,
    status_code=status.HTTP_201_CREATED,
    summary="Publish an agent version: the wheel as the request body",
    responses={
        409: {"description": "that version is published already"},
        422: {"description": "not a pure-Python wheel of the agent (the problem is named)"},
    },
)
async def publish_release(
    request: Request,
    session: SessionDep,
    store: ArtifactsDep,
    now: NowDep,
    who: PrincipalDep,
    filename: str | None = Query(None, max_length=255, description="the wheel's file name"),
    notes: str = Query("", max_length=2000),
) -> AgentReleasePublic:
    data = await _read_body(request)
    release, facts = service.publish_release(
        session,
        store=store,
        data=data,
        filename=filename,
        published_by=who.name,
        now=now,
        notes=notes,
    )
    audit.record(
        session,
        actor=who.name,
        action="agent_release.publish",
        target=f"agent:{release.version}",
        detail={"sha256": release.sha256, "length": release.length, "filename": release.filename},
        at=now,
    )
    session.commit()
    return AgentReleasePublic.of(release, files=facts.files)


@router.get("", response_model=list[AgentReleasePublic], summary="Agent releases, newest first")
def list_releases(session: SessionDep) -> list[AgentReleasePublic]:
    return [AgentReleasePublic.of(r) for r in service.list_releases(session)]


@router.get(
    "/{version}",
    response_model=AgentReleasePublic,
    summary="One agent release",
    responses={404: {"description": "no such version"}},
)
def show_release(version: str, session: SessionDep) -> AgentReleasePublic:
    return AgentReleasePublic.of(service.get_release(session, version=version))
