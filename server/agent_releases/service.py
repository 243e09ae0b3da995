"""Agent releases in the database: publish, list, show; and the wheel of a checkout.

What always holds:

- :func:`publish_release` stores nothing unless :func:`~server.agent_releases.wheel.inspect_wheel`
  accepted the wheel and its version is new: a refused wheel leaves no artifact, no row.
- A published wheel is in the content-addressed store and indexed in ``artifacts``
  (:data:`~shared.messages.AGENT_WHEEL_MEDIA_TYPE`), so the delivery paths serve it
  to a device once that device's signed desired state names it -- and only then.
- Functions that take a session flush but never commit; the caller commits.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from pydantic import TypeAdapter, ValidationError
from sqlmodel import Session, col, select

from server.agent_releases.errors import (
    AgentReleaseError,
    AgentReleaseExistsError,
    AgentReleaseNotFoundError,
)
from server.agent_releases.models import AgentRelease
from server.agent_releases.wheel import WheelFacts, inspect_wheel
from server.artifacts import ArtifactStore, register_artifact
from shared.messages import AGENT_WHEEL_MEDIA_TYPE, AgentVersion

__all__ = [
    "build_wheel",
    "get_release",
    "list_releases",
    "publish_release",
    "releases_by_id",
]

log = logging.getLogger(__name__)
_VERSION = TypeAdapter(AgentVersion)


def publish_release(
    session: Session,
    *,
    store: ArtifactStore,
    data: bytes,
    filename: str | None,
    published_by: str,
    now: datetime,
    notes: str = "",
) -> tuple[AgentRelease, WheelFacts]:
    """Check ``data`` as an agent wheel, store it, register it; refuse a known version."""
    facts = inspect_wheel(data, filename=filename)
    existing = session.exec(
        select(AgentRelease).where(AgentRelease.version == facts.version)
    ).first()
    if existing is not None:
        raise AgentReleaseExistsError(
            f"agent {facts.version} is published already (sha256 {existing.sha256[:16]}...); "
            "a version names one wheel: build the change under a new version"
        )
    stored = store.put_bytes(data)
    register_artifact(session, stored=stored, media_type=AGENT_WHEEL_MEDIA_TYPE)
    release = AgentRelease(
        version=facts.version,
        sha256=stored.sha256,
        length=stored.length,
        filename=filename or f"edgefleet-{facts.version}-py3-none-any.whl",
        requires_python=facts.requires_python,
        notes=notes,
        published_by=published_by,
        created_at=now,
    )
    session.add(release)
    session.flush()
    log.info(
        "agent release published",
        extra={"version": facts.version, "sha256": stored.sha256, "length": stored.length},
    )
    return release, facts


def list_releases(session: Session) -> list[AgentRelease]:
    """Every release, newest first."""
    query = select(AgentRelease).order_by(
        col(AgentRelease.created_at).desc(), col(AgentRelease.id).desc()
    )
    return list(session.exec(query))


def get_release(session: Session, *, version: str) -> AgentRelease:
    found = session.exec(select(AgentRelease).where(AgentRelease.version == version)).first()
    if found is None:
        raise AgentReleaseNotFoundError(f"no agent release {version!r}")
    return found


def releases_by_id(session: Session) -> dict[int, AgentRelease]:
    """Every release by its id (the number agent rollouts count versions by)."""
    return {r.id: r for r in session.exec(select(AgentRelease)) if r.id is not None}


_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", "edgefleet-data", "node_modules",
)  # fmt: skip
_PROJECT_VERSION = re.compile(r'^(version\s*=\s*)"[^"]*"', re.MULTILINE)


def build_wheel(source: Path, out_dir: Path, *, version: str | None = None) -> Path:
    """Build the ``edgefleet`` wheel of the checkout at ``source`` into ``out_dir``; return
    its path. The build runs on a copy (``pip wheel --no-deps --no-build-isolation``), so
    the checkout is left as it was; ``version`` sets the copy's project version first --
    a build of this code as another release, for a test or a hotfix."""
    if version is not None:
        try:
            _VERSION.validate_python(version)
        except ValidationError as e:
            raise AgentReleaseError(f"{version!r} is not a version an agent can report") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgefleet-wheel-") as tmp:
        tree = Path(tmp) / "src"
        shutil.copytree(source, tree, ignore=_COPY_IGNORE, symlinks=True)
        if version is not None:
            project = tree / "pyproject.toml"
            text, count = _PROJECT_VERSION.subn(rf'\g<1>"{version}"', project.read_text(), 1)
            if count != 1:
                raise AgentReleaseError(f'{source}/pyproject.toml has no version = "..." line')
            project.write_text(text)
        wheels_dir = Path(tmp) / "wheels"
        command = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels_dir),
            str(tree),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise AgentReleaseError(f"pip wheel failed in {source}: " + " | ".join(tail))
        wheels = sorted(wheels_dir.glob("edgefleet-*.whl"))
        if len(wheels) != 1:
            raise AgentReleaseError(f"pip wheel made {len(wheels)} edgefleet wheels, not one")
        target = out_dir / wheels[0].name
        shutil.copyfile(wheels[0], target)
    log.info("agent wheel built", extra={"path": str(target), "source": str(source)})
    return target
