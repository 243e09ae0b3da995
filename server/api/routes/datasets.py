"""Datasets over HTTP: upload (CSV or NPZ), bundled examples, datasets and their versions.

The upload is read as a stream: the multipart body is parsed as it arrives and the file
part is refused the moment it passes ``IngestLimits.max_bytes`` (a declared
``Content-Length`` that is already too large is refused before reading anything).
Refused data answers 422 with every problem in the detail; an unknown dataset or
version 404; an upload that contradicts its dataset's task or label 409. Adding
content a dataset already has answers 200 with the existing version; a new version
answers 201.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, TYPE_CHECKING, Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlmodel import Session

from server.api.deps import ArtifactsDep, SessionDep
from server.artifacts import ArtifactStore
from server.datasets import service
from server.datasets.builtin import EXAMPLES, load_example
from server.datasets.ingest import (
    DEFAULT_LIMITS,
    DatasetInvalidError,
    DatasetNotFoundError,
    IngestLimits,
    ParsedDataset,
    parse_upload,
)
from server.datasets.types import DatasetSchema, Task
from server.models import Dataset, DatasetVersion

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

__all__ = [
    "DatasetDetail",
    "DatasetSummary",
    "DatasetVersionAdded",
    "DatasetVersionDetail",
    "DatasetVersionSummary",
    "SplitSizes",
    "get_ingest_limits",
    "router",
]

router = APIRouter(prefix="/datasets", tags=["datasets"])

_FORM_FIELDS = ("name", "label", "task", "description", "split_seed")
_MAX_FIELD_BYTES = 64 * 1024
_FORM_OVERHEAD = 256 * 1024
"""Room for the form fields and part headers on top of the file itself."""
_SPOOL_IN_MEMORY = 8 * 1024 * 1024


def get_ingest_limits() -> IngestLimits:
    """The upload limits; tests swap them with ``app.dependency_overrides``."""
    return DEFAULT_LIMITS


IngestLimitsDep = Annotated[IngestLimits, Depends(get_ingest_limits)]


# ----------------------------------------------------------------------------- public models


class SplitSizes(BaseModel):
    train: int
    validation: int
    test: int


class DatasetVersionSummary(BaseModel):
    version: int
    sha256: str = Field(description="content hash of the stored arrays (schema, x, y)")
    rows: int
    source_format: str = Field(description="csv, npz or builtin")
    source_name: str = Field(description="the uploaded file's name, or the example's")
    created_at: datetime


class DatasetSummary(BaseModel):
    name: str
    task: Task
    label: str
    description: str
    latest_version: int | None
    version_count: int
    created_at: datetime


class DatasetDetail(DatasetSummary):
    versions: list[DatasetVersionSummary]


class DatasetVersionDetail(BaseModel):
    dataset: str
    version: int
    sha256: str = Field(description="content hash of the stored arrays (schema, x, y)")
    source_sha256: str = Field(description="hash of the file as uploaded")
    source_format: str
    source_name: str
    rows: int
    data_schema: DatasetSchema
    split_seed: int
    split_sizes: SplitSizes
    splits_sha256: str
    lineage: dict[str, Any]
    created_at: datetime


class DatasetVersionAdded(DatasetVersionDetail):
    created: bool = Field(description="false when the dataset already had this exact content")


# ----------------------------------------------------------------------------- views


def _summary(session: Session, dataset: Dataset) -> DatasetSummary:
    versions = service.list_versions(session, dataset=dataset)
    return DatasetSummary(
        name=dataset.name,
        task=dataset.task,  # type: ignore[arg-type]
        label=dataset.label,
        description=dataset.description,
        latest_version=versions[-1].version if versions else None,
        version_count=len(versions),
        created_at=dataset.created_at,
    )


def _version_detail(
    session: Session, store: ArtifactStore, version: DatasetVersion
) -> DatasetVersionDetail:
    dataset = session.get(Dataset, version.dataset_id)
    assert dataset is not None
    return DatasetVersionDetail(
        dataset=dataset.name,
        version=version.version,
        sha256=version.sha256,
        source_sha256=version.source_sha256,
        source_format=version.source_format,
        source_name=version.source_name,
        rows=version.rows,
        data_schema=DatasetSchema.model_validate_json(version.data_schema_json),
        split_seed=version.split_seed,
        split_sizes=SplitSizes(**service.split_sizes(store=store, dataset_version=version)),
        splits_sha256=version.splits_sha256,
        lineage=json.loads(version.lineage_json or "{}"),
        created_at=version.created_at,
    )


def _add(
    session: Session,
    store: ArtifactStore,
    *,
    name: str,
    parsed: ParsedDataset,
    response: Response,
    **options: Any,
) -> DatasetVersionAdded:
    existing = service.find_version_by_content(session, name=name, sha256=parsed.content_sha256)
    version = service.add_dataset_version(session, store=store, name=name, parsed=parsed, **options)
    created = existing is None or existing.id != version.id
    if not created:
        response.status_code = status.HTTP_200_OK
    detail = _version_detail(session, store, version)
    return DatasetVersionAdded(**detail.model_dump(), created=created)


# ----------------------------------------------------------------------------- routes


@router.get("", response_model=list[DatasetSummary], summary="List datasets")
def list_datasets(session: SessionDep) -> list[DatasetSummary]:
    return [_summary(session, d) for d in service.list_datasets(session)]


@router.get("/{name}", response_model=DatasetDetail, summary="A dataset and its versions")
def show_dataset(name: str, session: SessionDep) -> DatasetDetail:
    dataset = service.get_dataset(session, name=name)
    versions = [
        DatasetVersionSummary(
            version=v.version,
            sha256=v.sha256,
            rows=v.rows,
            source_format=v.source_format,
            source_name=v.source_name,
            created_at=v.created_at,
        )
        for v in service.list_versions(session, dataset=dataset)
    ]
    return DatasetDetail(**_summary(session, dataset).model_dump(), versions=versions)


@router.get(
    "/{name}/versions/{version}",
    response_model=DatasetVersionDetail,
    summary="One version (a number or 'latest'): schema, rows, splits, hashes, lineage",
)
def show_version(
    name: str, version: str, session: SessionDep, store: ArtifactsDep
) -> DatasetVersionDetail:
    found = service.get_version(session, name=name, version=version)
    return _version_detail(session, store, found)


@router.post(
    "/examples/{example}",
    response_model=DatasetVersionAdded,
    status_code=status.HTTP_201_CREATED,
    summary="Add a bundled example (digits or vibration) as a dataset version",
)
def add_example(
    example: str,
    session: SessionDep,
    store: ArtifactsDep,
    response: Response,
    name: Annotated[
        str | None, Query(description="dataset name (default: the example's name)")
    ] = None,
) -> DatasetVersionAdded:
    if example not in EXAMPLES:
        raise DatasetNotFoundError(
            f"no example dataset named {example!r}; the examples are {', '.join(sorted(EXAMPLES))}"
        )
    dataset_name = service.check_dataset_name(name or example)
    info = EXAMPLES[example]
    return _add(
        session,
        store,
        name=dataset_name,
        parsed=load_example(example),
        response=response,
        description=info.description,
        source_name=example,
        lineage=info.lineage,
    )


_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file", "name", "label"],
                "properties": {
                    "file": {"type": "string", "format": "binary", "description": "CSV or NPZ"},
                    "name": {"type": "string", "description": "dataset name"},
                    "label": {"type": "string", "description": "label column (CSV) or array"},
                    "task": {
                        "type": "string",
                        "enum": ["classification", "regression"],
                        "description": "default: the dataset's task, else inferred",
                    },
                    "description": {"type": "string"},
                    "split_seed": {"type": "integer", "default": 0},
                },
            }
        }
    },
}


@router.post(
    "",
    response_model=DatasetVersionAdded,
    status_code=status.HTTP_201_CREATED,
    summary="Upload a CSV or NPZ file as a new dataset version",
    openapi_extra={"requestBody": _UPLOAD_BODY},
)
async def upload_dataset(
    request: Request,
    session: SessionDep,
    store: ArtifactsDep,
    limits: IngestLimitsDep,
    response: Response,
) -> DatasetVersionAdded:
    upload = await _receive_upload(request, max_file_bytes=limits.max_bytes)
    try:
        return await run_in_threadpool(_ingest_upload, upload, session, store, limits, response)
    finally:
        upload.close()


def _ingest_upload(
    upload: _Upload,
    session: Session,
    store: ArtifactStore,
    limits: IngestLimits,
    response: Response,
) -> DatasetVersionAdded:
    problems = list(upload.problems)
    fields = upload.fields
    name = fields.get("name", "").strip()
    label = fields.get("label", "").strip()
    task_text = fields.get("task", "").strip()
    seed_text = fields.get("split_seed", "").strip() or "0"
    if not name:
        problems.append("the form field 'name' (the dataset name) is missing")
    else:
        try:
            service.check_dataset_name(name)
        except DatasetInvalidError as e:
            problems.extend(e.problems)
    if not label:
        problems.append("the form field 'label' (the label column or array) is missing")
    if task_text not in ("", "classification", "regression"):
        problems.append(f"task must be classification or regression, not {task_text!r}")
    try:
        split_seed = int(seed_text)
    except ValueError:
        problems.append(f"split_seed must be an integer, not {seed_text!r}")
        split_seed = 0
    if upload.file is None:
        problems.append("the form has no 'file' part with the CSV or NPZ file")
    task: Task | None = task_text or None  # type: ignore[assignment]
    if task is None and name and not problems:
        with contextlib.suppress(DatasetNotFoundError):  # a new dataset: infer the task
            task = service.get_dataset(session, name=name).task  # type: ignore[assignment]
    parsed = None
    if upload.file is not None and label:
        try:
            parsed = parse_upload(upload.file, label=label, task=task, limits=limits)
        except DatasetInvalidError as e:
            problems.extend(e.problems)
    if problems or parsed is None:
        raise DatasetInvalidError(problems)
    return _add(
        session,
        store,
        name=name,
        parsed=parsed,
        response=response,
        description=fields.get("description", ""),
        source_name=upload.filename,
        split_seed=split_seed,
        lineage={"source": "upload", "filename": upload.filename},
    )


# ----------------------------------------------------------------------------- streaming upload


@dataclass
class _Upload:
    fields: dict[str, str] = field(default_factory=dict)
    filename: str = ""
    file: IO[bytes] | None = None
    problems: list[str] = field(default_factory=list)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _UploadReceiver:
    """python-multipart callbacks: fields into memory, the file part into a spooled
    temporary file, both bounded while they arrive."""

    def __init__(self, max_file_bytes: int) -> None:
        self.max_file_bytes = max_file_bytes
        self.upload = _Upload()
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._part_name = ""
        self._part_is_file = False
        self._skip = False
        self._data = bytearray()
        self._file_bytes = 0
        self.pending: list[bytes] = []

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._data = bytearray()
        self._skip = False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._part_name = options.get(b"name", b"").decode("utf-8", errors="replace")
        self._part_is_file = b"filename" in options
        upload = self.upload
        if self._part_is_file:
            if self._part_name != "file" or upload.file is not None:
                upload.problems.append(
                    f"unexpected file part {self._part_name!r}; send one file as 'file'"
                )
                self._skip = True
                return
            upload.filename = options[b"filename"].decode("utf-8", errors="replace")[:256]
            upload.file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)  # noqa: SIM115 - closed by _Upload.close
        elif self._part_name not in _FORM_FIELDS:
            upload.problems.append(
                f"unknown form field {self._part_name!r} (known: {', '.join(_FORM_FIELDS)})"
            )
            self._skip = True

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._skip:
            return
        chunk = data[start:end]
        if self._part_is_file:
            self._file_bytes += len(chunk)
            if self._file_bytes > self.max_file_bytes:
                raise DatasetInvalidError(
                    [f"the file is larger than the limit of {self.max_file_bytes} bytes"]
                )
            self.pending.append(chunk)
            return
        if len(self._data) + len(chunk) > _MAX_FIELD_BYTES:
            raise DatasetInvalidError(
                [f"form field {self._part_name!r} is longer than {_MAX_FIELD_BYTES} bytes"]
            )
        self._data.extend(chunk)

    def on_part_end(self) -> None:
        if not self._skip and not self._part_is_file:
            self.upload.fields[self._part_name] = self._data.decode("utf-8", errors="replace")

    def flush(self) -> None:
        """Write what arrived to the spooled file (called off the event loop)."""
        if self.pending and self.upload.file is not None:
            self.upload.file.write(b"".join(self.pending))
        self.pending.clear()


async def _receive_upload(request: Request, *, max_file_bytes: int) -> _Upload:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise DatasetInvalidError(
            [
                "send the upload as multipart/form-data with a 'file' part and the fields "
                "'name' and 'label'"
            ]
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_file_bytes + _FORM_OVERHEAD:
        raise DatasetInvalidError(
            [
                f"the upload is {int(declared)} bytes, more than the file limit of "
                f"{max_file_bytes} bytes"
            ]
        )
    receiver = _UploadReceiver(max_file_bytes)
    parser = MultipartParser(
        options[b"boundary"],
        cast("MultipartCallbacks", receiver.callbacks()),
        max_header_count=16,
        max_header_size=8192,
    )
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if receiver.pending:
                await run_in_threadpool(receiver.flush)
        parser.finalize()
    except FormParserError as e:
        receiver.upload.close()
        raise DatasetInvalidError([f"the upload is not valid multipart/form-data: {e}"]) from e
    except BaseException:
        receiver.upload.close()
        raise
    if receiver.upload.file is not None:
        receiver.upload.file.seek(0)
    return receiver.upload
