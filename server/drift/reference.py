"""The drift reference of a model version, read from its signed bundle.

Every target variant of a version carries the same reference (it is built once per
version from the training split, :func:`server.pipeline.publish.build_drift_reference`),
so the first bundle that verifies and carries one answers.

What always holds: a reference is only taken from a bundle that verifies against the
fleet's current keyring and the sha256 and length the registry recorded. Bundles are
immutable and named by their hash, so parsed references are cached by that hash
(a small LRU shared by the process; it can never be stale).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from sqlmodel import Session

from server import registry
from server.artifacts import ArtifactStore
from server.drift.errors import NoReferenceError
from server.errors import NotFoundError
from server.keys import FleetKeys
from server.models import ModelVersion
from shared.bundle import read_bundle
from shared.drift import DriftReference
from shared.errors import ContractError

__all__ = ["version_reference"]

_CACHE_SIZE = 64
_cache: OrderedDict[str, DriftReference] = OrderedDict()
_lock = threading.Lock()


def _cached(sha256: str) -> DriftReference | None:
    with _lock:
        found = _cache.get(sha256)
        if found is not None:
            _cache.move_to_end(sha256)
        return found


def _remember(sha256: str, reference: DriftReference) -> None:
    with _lock:
        _cache[sha256] = reference
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def version_reference(
    session: Session,
    *,
    store: ArtifactStore,
    keys: FleetKeys,
    model_name: str,
    version: ModelVersion,
) -> DriftReference:
    """The version's drift reference, or :class:`NoReferenceError` saying why there is none."""
    artifacts = [
        a
        for a in registry.list_artifacts(session, version=version)
        if a.bundle_sha256 is not None and a.bundle_length is not None
    ]
    what = f"{model_name} v{version.version}"
    if not artifacts:
        raise NoReferenceError(f"{what} has no bundle, so no drift reference to compare with")
    problems = []
    for artifact in artifacts:
        sha256 = artifact.bundle_sha256
        assert sha256 is not None
        found = _cached(sha256)
        if found is not None:
            return found
        try:
            with store.path(sha256).open("rb") as stream:
                bundle = read_bundle(
                    stream,
                    trusted_keys=keys.keyring.verify_keys(),
                    threshold=keys.keyring.threshold,
                    expected_sha256=sha256,
                    expected_length=artifact.bundle_length,
                )
        except (OSError, ContractError, NotFoundError) as e:
            problems.append(f"{artifact.target}: {e}")
            continue
        reference = bundle.manifest.drift_reference
        if reference is None:
            problems.append(f"{artifact.target}: the bundle carries no drift reference")
            continue
        _remember(sha256, reference)
        return reference
    raise NoReferenceError(f"{what} has no usable drift reference ({'; '.join(problems)})")
