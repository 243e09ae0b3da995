"""One place that turns the settings into an artifact store, for the app, the training
worker and the CLI alike.

What always holds: with ``artifacts_url`` unset the store is the folder
``<data_dir>/artifacts``; with ``s3://bucket/prefix`` it is that bucket (checked to
answer before it is returned), cached in ``artifacts_cache_dir``. Nothing else picks.
"""

from __future__ import annotations

from server.artifacts.s3 import S3ArtifactStore, S3Location, make_s3_client
from server.artifacts.store import ArtifactStore
from server.settings import Settings

__all__ = ["artifact_store"]


def artifact_store(settings: Settings, *, check: bool = True) -> ArtifactStore:
    """The store the settings name; with ``check``, an S3 bucket that does not answer
    raises :class:`~server.errors.ConfigurationError` here rather than at the first upload."""
    location = settings.artifacts_s3_location
    if location is None:
        return ArtifactStore(settings.artifacts_dir, max_bytes=settings.max_artifact_bytes)
    bucket, prefix = location
    secret = settings.s3_secret_access_key
    verify: bool | str = settings.s3_verify_tls
    if settings.s3_verify_tls and settings.s3_ca_bundle is not None:
        verify = str(settings.s3_ca_bundle)
    client = make_s3_client(
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key_id=settings.s3_access_key_id,
        secret_access_key=None if secret is None else secret.get_secret_value(),
        addressing_style=settings.s3_addressing_style,
        verify=verify,
        max_connections=max(10, settings.max_concurrent_transfers),
    )
    store = S3ArtifactStore(
        S3Location(bucket, prefix),
        client=client,
        cache_dir=settings.artifacts_cache_path,
        cache_bytes=settings.artifacts_cache_bytes,
        max_bytes=settings.max_artifact_bytes,
        multipart_chunk_bytes=settings.s3_multipart_chunk_bytes,
    )
    if check:
        store.check()
    return store
