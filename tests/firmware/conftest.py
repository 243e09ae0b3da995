"""Fixtures for the provisioned images: a wheelhouse for edge-x86_64-litert, cached.

The first run downloads the agent's dependencies for manylinux x86-64 / this Python from
the package index (``pip download --platform ... --only-binary=:all:``, time-outs on every
request) into a cache folder -- ``$EDGEFLEET_TEST_CACHE`` or ``~/.cache/edgefleet-tests``
-- and later runs resolve from that folder alone. An image is then built with
``--wheelhouse-from`` the cache: the same code path a build without network takes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from server.image import ImageBuildError, build_agent_wheel, download_wheelhouse
from server.image.build import SOURCE_ROOT, image_requirements
from server.profiles import get_profile

PROFILE = "edge-x86_64-litert"
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def _cache_root() -> Path:
    configured = os.environ.get("EDGEFLEET_TEST_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet-tests"


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every wheel the x86-64 agent needs (but the agent's own), in a cache folder."""
    cache = _cache_root() / f"wheelhouse-{PROFILE}-py{PYTHON_VERSION}"
    scratch = tmp_path_factory.mktemp("agent-wheel")
    agent_wheel = build_agent_wheel(scratch)
    version = agent_wheel.name.split("-")[1]
    requirements = image_requirements(get_profile(PROFILE), version, SOURCE_ROOT / "pyproject.toml")
    extras = requirements[0].removeprefix("edgefleet").split("==")[0]
    pinned = [f"edgefleet{extras} @ {agent_wheel.as_uri()}", *requirements[1:]]
    check = tmp_path_factory.mktemp("wheelhouse-check")
    try:  # enough in the cache already?
        download_wheelhouse(
            pinned,
            check,
            arch="x86_64",
            python_version=PYTHON_VERSION,
            find_links=[scratch, cache],
            offline=True,
        )
    except ImageBuildError:
        try:
            download_wheelhouse(
                pinned,
                cache,
                arch="x86_64",
                python_version=PYTHON_VERSION,
                find_links=[scratch],
                timeout=900,
            )
        except ImageBuildError as e:
            pytest.fail(f"cannot fill the wheelhouse cache {cache}: {e}")
    for stale in cache.glob("edgefleet-*.whl"):  # the agent is always built fresh
        stale.unlink()
    return cache
