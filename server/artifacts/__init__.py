"""Artifacts: immutable files named by their SHA-256, in a folder or an S3-compatible bucket.

:class:`ArtifactStore` is the interface every caller types against and, built
directly, the embedded folder store; :class:`S3ArtifactStore` keeps the same
content in a bucket. :func:`artifact_store` picks one from the settings
(``EDGEFLEET_ARTIFACTS_URL``). See :mod:`server.artifacts.store` and
:mod:`server.artifacts.s3` for what each guarantees.
"""

from server.artifacts.factory import artifact_store
from server.artifacts.s3 import ArtifactStoreUnavailableError, S3ArtifactStore, S3Location
from server.artifacts.store import ArtifactStore, StoredArtifact, register_artifact

__all__ = [
    "ArtifactStore",
    "ArtifactStoreUnavailableError",
    "S3ArtifactStore",
    "S3Location",
    "StoredArtifact",
    "artifact_store",
    "register_artifact",
]
