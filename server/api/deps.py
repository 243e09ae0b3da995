"""FastAPI dependencies, as ``Annotated`` aliases (the full-stack template's ``deps.py``).

Everything comes from ``app.state``, built by :func:`server.app.create_app`, so
tests can swap any of it with ``app.dependency_overrides``.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlmodel import Session

from server.artifacts import ArtifactStore
from server.db import utcnow
from server.keys import FleetKeys
from server.profiles import DEFAULT_PROFILES_DIR, Profile, load_profiles
from server.settings import Settings

__all__ = ["ArtifactsDep", "KeysDep", "NowDep", "ProfilesDep", "SessionDep", "SettingsDep"]


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


def get_now() -> datetime:
    """The current time (UTC); tests move it with ``app.dependency_overrides``."""
    return utcnow()


def get_profiles(request: Request) -> dict[str, Profile]:
    directory = request.app.state.settings.profiles_dir or DEFAULT_PROFILES_DIR
    return load_profiles(directory)


NowDep = Annotated[datetime, Depends(get_now)]
ProfilesDep = Annotated[dict[str, Profile], Depends(get_profiles)]
