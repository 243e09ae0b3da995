"""Liveness and readiness: is the process up, and can it reach its database."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response, status
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from server import __version__
from server.api.deps import SessionDep, SettingsDep
from shared import PROTOCOL_VERSION

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    protocol: str
    database: Literal["ok", "unreachable"]
    broker: str


@router.get("/health", response_model=Health, summary="Liveness and readiness")
def health(session: SessionDep, settings: SettingsDep, response: Response) -> Health:
    try:
        session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        database: Literal["ok", "unreachable"] = "ok"
    except SQLAlchemyError:
        database = "unreachable"
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Health(
        status="ok" if database == "ok" else "degraded",
        version=__version__,
        protocol=PROTOCOL_VERSION,
        database=database,
        broker="embedded" if settings.broker_url == "embedded" else "external",
    )
