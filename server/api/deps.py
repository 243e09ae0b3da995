"""FastAPI dependencies, as ``Annotated`` aliases (the full-stack template's ``deps.py``).

Everything comes from ``app.state``, built by :func:`server.app.create_app`, so
tests can swap any of it with ``app.dependency_overrides``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from server.artifacts import ArtifactStore
from server.keys import FleetKeys
from server.settings import Settings

__all__ = ["ArtifactsDep", "KeysDep", "SessionDep", "SettingsDep"]


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine) as session:
        yield session


def get_keys(request: Request) -> FleetKeys:
    keys: FleetKeys = request.app.state.keys
    return keys


def get_artifacts(request: Request) -> ArtifactStore:
    store: ArtifactStore = request.app.state.artifacts
    return store


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[Session, Depends(get_session)]
KeysDep = Annotated[FleetKeys, Depends(get_keys)]
ArtifactsDep = Annotated[ArtifactStore, Depends(get_artifacts)]
