"""The S3 artifact store against a real S3-compatible HTTP server (moto's, in-process, on a
free port), through boto3 over real HTTP: storage, integrity, the cache, and the server's
paths that read artifacts -- HTTP range downloads, MQTT blocks, bundle downloads, training.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient as HttpClient
from moto.server import ThreadedMotoServer
from pydantic import ValidationError
from sqlmodel import Session, select

from server.app import create_app
from server.artifacts import (
    ArtifactStore,
    ArtifactStoreUnavailableError,
    S3ArtifactStore,
    S3Location,
    artifact_store,
)
from server.artifacts.s3 import make_s3_client
from server.db import session_scope
from server.delivery.blocks import (
    ERROR_BUSY,
    ERROR_READ_FAILED,
    ERROR_UNKNOWN_ARTIFACT,
    BlockServer,
)
from server.errors import ArtifactError, ConfigurationError, NotFoundError
from server.models import TargetArtifact
from server.settings import Settings
from shared.bundle import read_bundle
from tests.conftest import BrokerEndpoint, TestClient, free_port, operator_client
from tests.server.drift.conftest import (
    MODEL,
    TARGET,
    make_reference,
    register_version,
)
from tests.server.test_blocks import Device, allow

PREFIX = "fleet/artifacts"
MiB = 1024 * 1024
CREDENTIALS = {"access_key_id": "edgefleet-test", "secret_access_key": "edgefleet-test-secret"}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A real S3 HTTP API on 127.0.0.1 (moto's server in a thread of this process)."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def client(endpoint: str) -> Any:
    return make_s3_client(
        endpoint_url=endpoint, region="us-east-1", addressing_style="path", **CREDENTIALS
    )


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"edgefleet-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


class Calls:
    """The S3 operations a client sent, by name (from botocore's own event hooks)."""

    def __init__(self, client: Any) -> None:
        self.names: list[str] = []
        client.meta.events.register("before-call.s3.*", self._seen)

    def _seen(self, model: Any, **_kwargs: Any) -> None:
        self.names.append(model.name)

    def uploads(self) -> list[str]:
        wanted = ("PutObject", "CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload")
        return [n for n in self.names if n in wanted]


@pytest.fixture
def make_store(client: Any, bucket: str, tmp_path: Path) -> Callable[..., S3ArtifactStore]:
    """Stores on the same bucket, each with a cache folder of its own (as separate
    processes or hosts have)."""
    made = 0

    def make(**options: Any) -> S3ArtifactStore:
        nonlocal made
        made += 1
        options.setdefault("max_bytes", 64 * MiB)
        options.setdefault("cache_bytes", 256 * MiB)
        return S3ArtifactStore(
            S3Location(bucket, PREFIX),
            client=client,
            cache_dir=tmp_path / f"cache-{made}",
            **options,
        )

    return make


def keys_in(client: Any, bucket: str) -> list[str]:
    listing = client.list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def incomplete_uploads(client: Any, bucket: str) -> list[Any]:
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def cached_files(store: ArtifactStore) -> list[Path]:
    return sorted(p for p in store.root.rglob("*") if p.is_file())


def s3_settings(endpoint: str, bucket: str, data_dir: Path, **options: Any) -> Settings:
    return Settings(
        data_dir=data_dir,
        artifacts_url=f"s3://{bucket}/{PREFIX}",
        s3_endpoint_url=endpoint,
        s3_region="us-east-1",
        s3_addressing_style="path",
        s3_access_key_id=CREDENTIALS["access_key_id"],
        s3_secret_access_key=CREDENTIALS["secret_access_key"],
        **options,
    )


# ----------------------------------------------------------------------------- the store


def test_put_read_ranges_and_exists_under_content_addressed_keys(
    make_store: Callable[..., S3ArtifactStore], client: Any, bucket: str
) -> None:
    store = make_store()
    data = os.urandom(3 * MiB + 17)
    stored = store.put_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    assert (stored.sha256, stored.length) == (sha, len(data))
    assert keys_in(client, bucket) == [f"{PREFIX}/{sha[:2]}/{sha}"]
    assert store.exists(sha) and store.length(sha) == len(data)

    # Another process, with an empty cache, reads it back from the bucket.
    other = make_store()
    assert cached_files(other) == []
    assert other.exists(sha) and other.length(sha) == len(data)
    with other.open(sha) as f:
        f.seek(1_000_000)
        assert f.read(4096) == data[1_000_000:1_004_096]
        f.seek(len(data) - 10)
        assert f.read(100) == data[-10:]
    assert other.path(sha).read_bytes() == data
    verified = other.verify(sha)
    assert (verified.sha256, verified.length, verified.path) == (sha, len(data), other.path(sha))
    assert [p.name for p in cached_files(other)] == [sha]  # the temporary folder is empty


def test_storing_known_content_uploads_nothing(
    make_store: Callable[..., S3ArtifactStore], client: Any, bucket: str
) -> None:
    calls = Calls(client)
    data = os.urandom(100_000)
    first = make_store().put_bytes(data)
    assert calls.uploads() == ["PutObject"]
    again = make_store().put_stream(io.BytesIO(data))  # another process, same content
    assert again.sha256 == first.sha256 and again.length == first.length
    assert calls.uploads() == ["PutObject"]
    assert len(keys_in(client, bucket)) == 1


def test_large_artifacts_go_up_in_parts(
    make_store: Callable[..., S3ArtifactStore], client: Any, bucket: str
) -> None:
    calls = Calls(client)
    store = make_store(multipart_chunk_bytes=5 * MiB)
    data = os.urandom(12 * MiB + 5)
    stored = store.put_bytes(data)
    uploads = calls.uploads()
    assert uploads[0] == "CreateMultipartUpload" and uploads[-1] == "CompleteMultipartUpload"
    assert uploads.count("UploadPart") == 3 and "PutObject" not in uploads
    assert incomplete_uploads(client, bucket) == []
    with make_store().open(stored.sha256) as f:
        assert hashlib.sha256(f.read()).hexdigest() == stored.sha256


def test_oversize_content_is_refused_while_streaming_and_leaves_nothing(
    make_store: Callable[..., S3ArtifactStore], client: Any, bucket: str
) -> None:
    calls = Calls(client)
    store = make_store(max_bytes=2 * MiB, cache_bytes=2 * MiB)

    class Endless(io.RawIOBase):
        reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            self.reads += 1
            buffer[: len(buffer)] = b"x" * len(buffer)
            return len(buffer)

    stream = Endless()
    with pytest.raises(ArtifactError, match=f"limit of {2 * MiB}"):
        store.put_stream(stream)  # type: ignore[arg-type]
    assert stream.reads == 3  # the first chunk past the limit stops it
    assert calls.uploads() == [] and keys_in(client, bucket) == []
    assert cached_files(store) == []


def test_content_with_the_wrong_hash_is_refused_and_leaves_nothing(
    make_store: Callable[..., S3ArtifactStore], client: Any, bucket: str
) -> None:
    store = make_store()
    claimed = hashlib.sha256(b"what the caller said it sends").hexdigest()
    with pytest.raises(ArtifactError, match="damaged"):
        store.put_stream(io.BytesIO(b"something else"), expected_sha256=claimed)
    assert keys_in(client, bucket) == [] and incomplete_uploads(client, bucket) == []
    assert cached_files(store) == []
    right = store.put_stream(io.BytesIO(b"something else"), expected_sha256=None)
    assert store.put_stream(io.BytesIO(b"something else"), expected_sha256=right.sha256) == right


def test_a_damaged_object_in_the_bucket_is_refused_never_served(
    make_store: Callable[..., S3ArtifactStore], client: Any, bucket: str
) -> None:
    data = os.urandom(50_000)
    sha = hashlib.sha256(data).hexdigest()
    key = f"{PREFIX}/{sha[:2]}/{sha}"
    client.put_object(Bucket=bucket, Key=key, Body=data[:-1] + bytes([data[-1] ^ 1]))
    store = make_store()
    with pytest.raises(ArtifactError, match="damaged"):
        store.open(sha)
    with pytest.raises(ArtifactError, match="damaged"):
        store.verify(sha)
    assert cached_files(store) == []
    # A truncated object (wrong length) is replaced when the real content is stored.
    client.put_object(Bucket=bucket, Key=key, Body=data[:1000])
    assert store.put_bytes(data).length == len(data)
    with make_store().open(sha) as f:
        assert f.read() == data


def test_unknown_and_malformed_ids(make_store: Callable[..., S3ArtifactStore]) -> None:
    store = make_store()
    unknown = "0" * 64
    assert not store.exists(unknown)
    for read in (store.open, store.path, store.length, store.verify):
        with pytest.raises(NotFoundError, match="not in s3://"):
            read(unknown)
    with pytest.raises(NotFoundError, match="not a sha256"):
        store.open("../../etc/passwd")
    assert cached_files(store) == []


def test_the_cache_keeps_the_most_recently_used_within_its_bound(
    make_store: Callable[..., S3ArtifactStore],
) -> None:
    size = 256 * 1024
    writer = make_store()
    blobs = [os.urandom(size) for _ in range(5)]
    shas = [writer.put_bytes(b).sha256 for b in blobs]
    store = make_store(max_bytes=size, cache_bytes=3 * size)
    for sha in shas[:3]:
        store.path(sha)
    store.path(shas[0])  # used again: now the most recent
    store.path(shas[3])  # evicts the least recently used: shas[1]
    assert {p.name for p in cached_files(store)} == {shas[0], shas[2], shas[3]}
    with store.open(shas[4]) as f:  # evicts shas[2]; the open file stays readable
        store.path(shas[1])  # evicts shas[0]
        assert f.read() == blobs[4]
    assert {p.name for p in cached_files(store)} == {shas[1], shas[3], shas[4]}
    assert sum(p.stat().st_size for p in cached_files(store)) <= 3 * size
    assert store.path(shas[0]).read_bytes() == blobs[0]  # fetched again, intact


def test_an_unreachable_store_is_a_503_and_leaves_nothing(tmp_path: Path) -> None:
    dead = make_s3_client(
        endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", **CREDENTIALS
    )
    store = S3ArtifactStore(S3Location("edgefleet-down"), client=dead, cache_dir=tmp_path / "c")
    with pytest.raises(ArtifactStoreUnavailableError, match="s3://edgefleet-down") as caught:
        store.put_bytes(b"bundle")
    assert caught.value.status_code == 503
    assert cached_files(store) == []
    with pytest.raises(ConfigurationError, match="s3://edgefleet-down"):
        store.check()


# ----------------------------------------------------------------------------- settings


def test_settings_pick_the_store(endpoint: str, bucket: str, tmp_path: Path) -> None:
    folder = artifact_store(Settings(data_dir=tmp_path / "plain"))
    assert type(folder) is ArtifactStore and folder.root == tmp_path / "plain" / "artifacts"

    s3 = artifact_store(s3_settings(endpoint, bucket, tmp_path / "data"))
    assert isinstance(s3, S3ArtifactStore)
    assert str(s3.location) == f"s3://{bucket}/{PREFIX}"
    assert s3.root == tmp_path / "data" / "artifacts-cache"

    missing = s3_settings(endpoint, "edgefleet-missing", tmp_path / "data")
    with pytest.raises(ConfigurationError, match="bucket 'edgefleet-missing' does not exist"):
        artifact_store(missing)
    with (  # the server refuses to start, naming the bucket
        pytest.raises(ConfigurationError, match="bucket 'edgefleet-missing' does not exist"),
        HttpClient(create_app(missing)),
    ):
        pass


def test_the_store_settings_travel_to_another_process(
    endpoint: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the job runner hands its training worker: the same store, even when the
    settings were built in code rather than read from the environment."""
    given = s3_settings(endpoint, bucket, tmp_path / "data", s3_verify_tls=False)
    assert "EDGEFLEET_ARTIFACTS_URL" not in Settings(data_dir=tmp_path).artifact_environment()
    env = given.artifact_environment()
    assert env["EDGEFLEET_ARTIFACTS_URL"] == f"s3://{bucket}/{PREFIX}"
    assert env["EDGEFLEET_S3_VERIFY_TLS"] == "false"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    received = Settings(data_dir=tmp_path / "data")
    fields = [n for n in Settings.model_fields if f"EDGEFLEET_{n.upper()}" in env]
    assert {n: getattr(received, n) for n in fields} == {n: getattr(given, n) for n in fields}


def test_the_embedded_default_never_imports_boto3(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; import server.app, server.training.worker; "
        "from server.artifacts import artifact_store; from server.settings import Settings; "
        f"artifact_store(Settings(data_dir=Path({str(tmp_path)!r}))).put_bytes(b'x'); "
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"artifacts_url": "https://bucket/x"}, "must be s3://bucket"),
        ({"artifacts_url": "s3://"}, "must be s3://bucket"),
        ({"artifacts_url": "s3://bucket/a//b"}, "plain path"),
        ({"artifacts_url": "s3://bucket?versioning=1"}, "plain path"),
        ({"s3_access_key_id": "key"}, "go together"),
        ({"artifacts_url": "s3://bucket", "artifacts_cache_bytes": 1024}, "at least"),
        (
            {
                "artifacts_url": "s3://bucket",
                "mode": "prod",
                "secret_key": "x" * 40,
                "s3_verify_tls": False,
            },
            "EDGEFLEET_S3_CA_BUNDLE",
        ),
    ],
)
def test_settings_refuse_a_store_that_cannot_work(options: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(**options)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGEFLEET_ARTIFACTS_URL", "s3://models-prod/edgefleet/")
    monkeypatch.setenv("EDGEFLEET_S3_ENDPOINT_URL", "https://minio.internal:9000")
    monkeypatch.setenv("EDGEFLEET_S3_ADDRESSING_STYLE", "path")
    monkeypatch.setenv("EDGEFLEET_ARTIFACTS_CACHE_DIR", str(tmp_path / "cache"))
    settings = Settings()
    assert settings.artifacts_s3_location == ("models-prod", "edgefleet")
    assert settings.s3_endpoint_url == "https://minio.internal:9000"
    assert settings.artifacts_cache_path == tmp_path / "cache"


# ----------------------------------------------------------------------------- delivery


@pytest.mark.database
def test_http_range_downloads_are_served_from_the_bucket(
    endpoint: str, bucket: str, client: Any, db_url: str, tmp_path: Path
) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    class Authority:
        def authenticate(self, device_id: str, password: str) -> bool:
            return (device_id, password) == ("dev-a", "secret-a")

        def allowed(self, device_id: str, sha256: str) -> bool:
            return device_id == "dev-a"

    settings = s3_settings(endpoint, bucket, tmp_path / "data", database_url=db_url)
    app = create_app(settings)
    with operator_client(app) as http:
        app.state.artifact_authority = Authority()
        store = app.state.artifacts
        assert isinstance(store, S3ArtifactStore)
        sha = store.put_bytes(payload).sha256
        for cached in cached_files(store):
            os.chmod(cached, 0o644)
            cached.unlink()  # as on another API replica: only the bucket has it
        url = f"/api/v1/devices/dev-a/artifacts/{sha}"
        part = http.get(url, auth=("dev-a", "secret-a"), headers={"Range": "bytes=1000-"})
        assert part.status_code == 206, part.text
        assert part.headers["content-range"] == f"bytes 1000-{len(payload) - 1}/{len(payload)}"
        assert part.content == payload[1000:]
        whole = http.get(url, auth=("dev-a", "secret-a"))
        assert whole.status_code == 200 and whole.content == payload
        missing = http.get(
            f"/api/v1/devices/dev-a/artifacts/{'0' * 64}", auth=("dev-a", "secret-a")
        )
        assert missing.status_code == 404
    assert keys_in(client, bucket) == [f"{PREFIX}/{sha[:2]}/{sha}"]
    assert not any((tmp_path / "data" / "artifacts").rglob("??/*"))  # nothing in the folder


@pytest.mark.broker
def test_mqtt_blocks_are_served_from_the_bucket(
    make_store: Callable[..., S3ArtifactStore],
    client: Any,
    bucket: str,
    mqtt_broker: BrokerEndpoint,
    mqtt_client: Callable[..., TestClient],
) -> None:
    data = os.urandom(300_000 + 123)
    sha = make_store().put_bytes(data).sha256
    store = make_store()  # the block server's process: an empty cache
    unknown = hashlib.sha256(b"never stored").hexdigest()
    tampered = hashlib.sha256(b"the real bundle").hexdigest()
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{tampered[:2]}/{tampered}", Body=b"evil")
    device = Device(mqtt_client(f"blk-s3-{uuid.uuid4().hex[:8]}"), f"s3-{uuid.uuid4().hex[:8]}")
    server = BlockServer(
        store,
        authorize=allow(*((device.device_id, known) for known in (sha, unknown, tampered))),
        host=mqtt_broker.host,
        port=mqtt_broker.port,
        reconnect_delay=(0.1, 1.0),
        workers=1,
    )
    server.start()
    try:
        request_id = device.ask(sha, offset=len(data) - 10_000, block_size=8192, count=4)
        frames = [device.frame(), device.frame()]
        assert [(h.request_id, h.offset, h.length, h.total_length) for h, _ in frames] == [
            (request_id, len(data) - 10_000, 8192, len(data)),
            (request_id, len(data) - 1808, 1808, len(data)),
        ]
        assert b"".join(block for _, block in frames) == data[-10_000:]
        missing = device.ask(unknown)
        header, _ = device.frame()
        assert (header.request_id, header.error) == (missing, ERROR_UNKNOWN_ARTIFACT)
        damaged = device.ask(tampered)
        header, _ = device.frame()
        assert (header.request_id, header.error) == (damaged, ERROR_READ_FAILED)
    finally:
        server.stop()
    assert [p.name for p in cached_files(store)] == [sha]
    assert server.stats()["rejected"]["read_failed"] == 1


@pytest.mark.broker
def test_mqtt_blocks_say_retry_while_the_store_is_down(
    mqtt_broker: BrokerEndpoint, mqtt_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    dead = make_s3_client(
        endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", **CREDENTIALS
    )
    store = S3ArtifactStore(S3Location("edgefleet-down"), client=dead, cache_dir=tmp_path / "c")
    sha = hashlib.sha256(b"a bundle").hexdigest()
    device = Device(mqtt_client(f"blk-s3-{uuid.uuid4().hex[:8]}"), f"s3-{uuid.uuid4().hex[:8]}")
    server = BlockServer(
        store,
        authorize=allow((device.device_id, sha)),
        host=mqtt_broker.host,
        port=mqtt_broker.port,
        reconnect_delay=(0.1, 1.0),
        workers=1,
    )
    server.start()
    try:
        request_id = device.ask(sha)
        header, block = device.frame()
        assert (header.request_id, header.error, block) == (request_id, ERROR_BUSY, b"")
        assert server.stats()["rejected"]["store_unavailable"] == 1
    finally:
        server.stop()


# ----------------------------------------------------------------------------- the app


@pytest.mark.database
def test_an_app_on_s3_publishes_a_model_and_serves_its_bundle(
    endpoint: str,
    bucket: str,
    client: Any,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Configured as production is, from EDGEFLEET_* variables alone."""
    monkeypatch.setenv("EDGEFLEET_ARTIFACTS_URL", f"s3://{bucket}/{PREFIX}")
    monkeypatch.setenv("EDGEFLEET_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("EDGEFLEET_S3_REGION", "us-east-1")
    monkeypatch.setenv("EDGEFLEET_S3_ADDRESSING_STYLE", "path")
    monkeypatch.setenv("EDGEFLEET_S3_ACCESS_KEY_ID", CREDENTIALS["access_key_id"])
    monkeypatch.setenv("EDGEFLEET_S3_SECRET_ACCESS_KEY", CREDENTIALS["secret_access_key"])
    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, run_jobs=False)
    app = create_app(settings)
    reference = make_reference()
    with operator_client(app) as http:
        with session_scope(app.state.engine) as session:
            register_version(
                session, store=app.state.artifacts, keys=app.state.keys, reference=reference
            )
        with Session(app.state.engine) as session:
            row = session.exec(select(TargetArtifact)).one()
            sha, length = row.bundle_sha256, row.bundle_length
        assert sha is not None and f"{PREFIX}/{sha[:2]}/{sha}" in keys_in(client, bucket)
        url = f"/api/v1/models/{MODEL}/versions/1/artifacts/{TARGET}/bundle"
        whole = http.get(url)
        assert whole.status_code == 200, whole.text
        bundle = read_bundle(
            io.BytesIO(whole.content),
            trusted_keys=app.state.keys.keyring.verify_keys(),
            expected_sha256=sha,
            expected_length=length,
        )
        assert (bundle.manifest.model_name, bundle.manifest.model_version) == (MODEL, 1)
        tail = http.get(url, headers={"Range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == whole.content[-100:]
        drift = http.get("/api/v1/drift", params={"model": MODEL})
        assert drift.status_code == 200, drift.text  # its reference is read from the bundle
        assert drift.json()["reference_id"] == reference.reference_id
    assert not any((tmp_path / "data" / "artifacts").rglob("??/*"))


@pytest.mark.slow
@pytest.mark.database
def test_training_on_s3_publishes_bundles_into_the_bucket(
    endpoint: str,
    bucket: str,
    client: Any,
    db_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job runner's worker process picks the store from the same environment."""
    for name, value in {
        "EDGEFLEET_ARTIFACTS_URL": f"s3://{bucket}/{PREFIX}",
        "EDGEFLEET_S3_ENDPOINT_URL": endpoint,
        "EDGEFLEET_S3_REGION": "us-east-1",
        "EDGEFLEET_S3_ADDRESSING_STYLE": "path",
        "EDGEFLEET_S3_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "EDGEFLEET_S3_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
    }.items():
        monkeypatch.setenv(name, value)
    app = create_app(Settings(data_dir=tmp_path / "data", database_url=db_url))
    with operator_client(app) as http:
        added = http.post("/api/v1/datasets/examples/vibration")
        assert added.status_code == 201, added.text
        run = http.post(
            "/api/v1/runs",
            json={"dataset": "vibration", "model": "vib", "arch": "mlp", "epochs": 2},
        )
        assert run.status_code == 202, run.text
        run_id = run.json()["id"]
        while (state := http.get(f"/api/v1/runs/{run_id}").json())["status"] in (
            "queued",
            "running",
        ):
            time.sleep(0.5)
        assert state["status"] == "succeeded", state
        version = http.get("/api/v1/models/vib/versions/1").json()
        published = [a for a in version["artifacts"] if a["bundle_sha256"]]
        assert published, version
        keys = keys_in(client, bucket)
        for artifact in published:
            sha = artifact["bundle_sha256"]
            assert f"{PREFIX}/{sha[:2]}/{sha}" in keys
            got = http.get(f"/api/v1/models/vib/versions/1/artifacts/{artifact['target']}/bundle")
            assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == sha
    assert not any((tmp_path / "data" / "artifacts").rglob("??/*"))
