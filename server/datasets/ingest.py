"""Turning an upload (CSV, NPZ) or in-memory arrays into a validated :class:`ParsedDataset`.

Pure: no database and no disk -- the functions read only the bytes or the stream they
are given. The errors of the whole datasets package are drawn here too, rooted at
:class:`DatasetError`.

What always holds:

- A parse either returns a complete :class:`ParsedDataset` or raises one
  :class:`DatasetInvalidError` whose ``problems`` name *every* problem found (each
  kind capped at a few examples plus a count), never the first one only.
- :func:`read_limited` never reads more than ``IngestLimits.max_bytes + 1`` bytes: the
  size limit is enforced while reading, not after.
- A :class:`ParsedDataset` is canonical and immutable: ``x`` is read-only float32 of
  shape ``(rows, n_features)`` holding NaN for missing values (one NaN bit pattern, no
  ``-0.0``); ``y`` is read-only int64 class indices (classification) or float32 targets
  (regression) with no missing values.
- ``content_sha256`` is the SHA-256 of :meth:`ParsedDataset.canonical_npz`: an
  uncompressed NPZ written with fixed ZIP metadata holding ``schema_json`` (the schema
  as JSON with sorted keys, UTF-8 bytes), ``x`` and ``y``. It depends only on the schema
  and the values, so the same data uploaded as CSV or as NPZ (with the same feature
  names and label) has the same hash; it is also the stored file's address.

CSV conventions: UTF-8 (a BOM is fine), a header row naming every column, comma
separated (a header with no comma but tabs or semicolons switches to that separator),
quoted fields as the ``csv`` module reads them, blank lines ignored. Empty cells and
``NA``, ``N/A``, ``NaN``, ``null``, ``None``, ``?`` (any case) are missing values;
``true``/``false`` are booleans (1/0). Every column but the label is a feature.

NPZ conventions: an array ``x`` of shape ``(rows, ...)``, the label array under the
label's name (shape ``(rows,)``), optionally ``feature_names`` (one string per
flattened feature; default ``x[i]`` or ``x[i,j,...]``, row-major) and ``class_names``
(the class order: integer labels then index it, string labels must be among it).
``input_shape`` is ``x.shape[1:]``. Other arrays are ignored; pickled arrays are
refused.

Feature dtypes (``schema.feature_dtypes``) follow the values, not the notation: ``bool``
when every present value is a boolean, ``int64`` when every present value is a whole
number, ``float64`` otherwise. Task inference, when no task is given:
classification if the label is non-numeric, or whole-numbered with at most
:data:`MAX_INFERRED_CLASSES` distinct values; regression otherwise. Class names are the
sorted distinct label values (numbers sorted numerically and written as ``3`` or
``0.5``); ``y`` holds each row's class index.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import IO, Any, Literal

import numpy as np
from pydantic import ValidationError

from server.datasets.types import DatasetSchema, Task
from server.errors import ConflictError, InvalidInputError, NotFoundError, ServerError

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_INFERRED_CLASSES",
    "MAX_NAME_LENGTH",
    "DatasetConflictError",
    "DatasetDamagedError",
    "DatasetError",
    "DatasetInvalidError",
    "DatasetNotFoundError",
    "IngestLimits",
    "ParsedDataset",
    "SourceFormat",
    "UploadFormat",
    "canonical_schema_json",
    "from_arrays",
    "parse_csv",
    "parse_npz",
    "parse_upload",
    "read_limited",
    "write_canonical_npz",
]

SourceFormat = Literal["csv", "npz", "builtin"]
UploadFormat = Literal["csv", "npz"]

MAX_INFERRED_CLASSES = 50
"""A whole-numbered label with more distinct values than this is inferred as regression."""
MAX_NAME_LENGTH = 128
"""Longest feature name: drift references (``shared.drift``) name features in at most 128."""
MAX_LABEL_NAME_LENGTH = 256
_MAX_LISTED = 20
"""Problems of one kind listed one by one before the rest are summed up in a count."""
_MAX_LOCATIONS = 5
_CSV_CHUNK_ROWS = 50_000
_READ_CHUNK = 1024 * 1024
_MISSING_TOKENS = ("", "na", "n/a", "nan", "null", "none", "?")
_ZIP_MAGIC = b"PK\x03\x04"
_GZIP_MAGIC = b"\x1f\x8b"
_BOM = b"\xef\xbb\xbf"
_NPZ_RESERVED = ("x", "feature_names", "class_names")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
MiB = 1024 * 1024


# ----------------------------------------------------------------------------- errors


class DatasetError(ServerError):
    """Root of the datasets package's errors."""


class DatasetInvalidError(DatasetError, InvalidInputError):
    """The data (or a request about it) was refused; ``problems`` names every reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems) or ["the dataset is not valid"]
        count = len(self.problems)
        listed = "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, start=1))
        super().__init__(f"the dataset was refused, {count} problem{'s' * (count > 1)}: {listed}")


class DatasetNotFoundError(DatasetError, NotFoundError):
    """No dataset, version or example by that name."""


class DatasetConflictError(DatasetError, ConflictError):
    """The upload contradicts the dataset it is added to (another task or label)."""


class DatasetDamagedError(DatasetError):
    """A stored dataset file is missing or no longer matches its hash (a server fault)."""

    status_code = 500


# ----------------------------------------------------------------------------- limits


@dataclass(frozen=True, slots=True)
class IngestLimits:
    """The bounds every upload is held to; the defaults suit the embedded server."""

    max_bytes: int = 256 * MiB
    """Largest upload, enforced while reading."""
    max_expanded_bytes: int = 1024 * MiB
    """NPZ: the arrays' total uncompressed size (a small compressed file can expand)."""
    max_nan_share: float = 0.05
    """Per feature: the largest share of missing (NaN) values."""
    min_rows_per_class: int = 5
    min_rows: int = 10
    """Fewer rows cannot be split into train, validation and test."""
    max_features: int = 65_536
    max_classes: int = 1_000

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_expanded_bytes <= 0:
            raise ValueError("byte limits must be positive")
        if not 0.0 <= self.max_nan_share <= 1.0:
            raise ValueError("max_nan_share must be between 0 and 1")
        if self.min_rows_per_class < 1 or self.min_rows < 1:
            raise ValueError("row minimums must be at least 1")
        if self.max_features < 1 or self.max_classes < 2:
            raise ValueError("max_features must be at least 1 and max_classes at least 2")


DEFAULT_LIMITS = IngestLimits()


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True, eq=False)
class ParsedDataset:
    """Validated, canonical rows of one dataset version, ready to be stored."""

    x: np.ndarray
    y: np.ndarray
    schema: DatasetSchema
    source_format: SourceFormat
    source_sha256: str
    """SHA-256 of the file as uploaded (for built-in data: the content hash)."""

    def __post_init__(self) -> None:
        x = np.array(self.x, dtype=np.float32, order="C", copy=True)
        x += np.float32(0.0)  # -0.0 + 0.0 == +0.0: one encoding per value
        x[np.isnan(x)] = np.float32("nan")
        schema = self.schema
        if x.ndim != 2 or x.shape != (schema.rows, len(schema.feature_names)):
            raise ValueError(
                f"x has shape {x.shape}; the schema says ({schema.rows}, "
                f"{len(schema.feature_names)})"
            )
        if math.prod(schema.input_shape) != x.shape[1]:
            raise ValueError(f"input_shape {schema.input_shape} does not hold {x.shape[1]} values")
        if schema.task == "classification":
            y = np.array(self.y, dtype=np.int64, copy=True)
            n_classes = len(schema.class_names or [])
            if y.size and (y.min() < 0 or y.max() >= n_classes):
                raise ValueError("class indices must lie in [0, len(class_names))")
        else:
            y = np.array(self.y, dtype=np.float32, copy=True)
            if not np.isfinite(y).all():
                raise ValueError("regression targets must be finite")
        if y.shape != (schema.rows,):
            raise ValueError(f"y has shape {y.shape}; expected ({schema.rows},)")
        if len(self.source_sha256) != 64:
            raise ValueError("source_sha256 must be a hex SHA-256 digest")
        x.flags.writeable = False
        y.flags.writeable = False
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def canonical_npz(self) -> bytes:
        """The stored form: ``schema_json``, ``x`` and ``y`` in a deterministic NPZ."""
        schema_bytes = canonical_schema_json(self.schema).encode()
        return write_canonical_npz(
            {"schema_json": np.frombuffer(schema_bytes, dtype=np.uint8), "x": self.x, "y": self.y}
        )

    @cached_property
    def content_sha256(self) -> str:
        return hashlib.sha256(self.canonical_npz()).hexdigest()


def canonical_schema_json(schema: DatasetSchema) -> str:
    """The schema as compact JSON with sorted keys (what is hashed and stored)."""
    return json.dumps(schema.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


def write_canonical_npz(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An NPZ whose bytes depend only on the arrays: sorted members, no compression,
    fixed timestamps and attributes, little-endian C-order data, no pickles."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in sorted(arrays):
            array = np.asarray(arrays[name])
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_STORED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


# ----------------------------------------------------------------------------- entry points


def read_limited(stream: IO[bytes], *, max_bytes: int) -> bytes:
    """Everything ``stream`` yields, refused as soon as it passes ``max_bytes``."""
    parts: list[bytes] = []
    total = 0
    while chunk := stream.read(min(_READ_CHUNK, max_bytes + 1 - total)):
        total += len(chunk)
        if total > max_bytes:
            raise DatasetInvalidError(
                [f"the file is larger than the limit of {_human_bytes(max_bytes)}"]
            )
        parts.append(chunk)
    return b"".join(parts)


def parse_upload(
    source: IO[bytes] | bytes,
    *,
    label: str,
    task: Task | None = None,
    source_format: UploadFormat | None = None,
    limits: IngestLimits = DEFAULT_LIMITS,
) -> ParsedDataset:
    """Parse an uploaded file; its format is ``source_format`` or told by its first bytes
    (a ZIP archive is NPZ, anything else CSV)."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise DatasetInvalidError(
                [f"the file is larger than the limit of {_human_bytes(limits.max_bytes)}"]
            )
    else:
        data = read_limited(source, max_bytes=limits.max_bytes)
    if source_format is None:
        source_format = "npz" if data.startswith(_ZIP_MAGIC) else "csv"
    if source_format == "npz":
        return parse_npz(data, label=label, task=task, limits=limits)
    return parse_csv(data, label=label, task=task, limits=limits)


def parse_csv(
    data: bytes, *, label: str, task: Task | None = None, limits: IngestLimits = DEFAULT_LIMITS
) -> ParsedDataset:
    """Parse CSV text with a header row; see the module docstring for the conventions."""
    return _CsvReader(data, label=label, limits=limits).parse(task)


def parse_npz(
    data: bytes, *, label: str, task: Task | None = None, limits: IngestLimits = DEFAULT_LIMITS
) -> ParsedDataset:
    """Parse an NPZ archive; see the module docstring for the conventions."""
    source_sha256 = _sha256(data)
    problems = _Problems()
    _check_label_name(label, problems)
    if label in _NPZ_RESERVED:
        problems.add(
            f"the label cannot be called {label!r}: that array name is reserved "
            f"({', '.join(_NPZ_RESERVED)})"
        )
    if not data:
        raise DatasetInvalidError(["the file is empty"])
    members = _npz_members(data, limits)
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in ("x", label, "feature_names", "class_names"):
            if name not in members or name in arrays:
                continue
            try:
                with archive.open(members[name]) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
            except ValueError as e:
                if "pickle" in str(e).lower() or "object" in str(e).lower():
                    problems.add(
                        f"array {name!r} holds Python objects; only numeric and string arrays "
                        "are read (pickles are refused)"
                    )
                else:
                    problems.add(f"array {name!r} cannot be read: {e}")
            except (OSError, EOFError, zipfile.BadZipFile) as e:
                problems.add(f"array {name!r} cannot be read: {e}")
    available = ", ".join(sorted(members)) or "none"
    if "x" not in members:
        problems.add(f"the NPZ file has no array 'x' with the features (its arrays: {available})")
    if label not in members and label not in _NPZ_RESERVED:
        problems.add(f"the NPZ file has no array {label!r} for the label (its arrays: {available})")
    x = arrays.get("x")
    features: np.ndarray | None = None
    input_shape: list[int] | None = None
    if x is not None:
        if x.dtype.kind not in "biuf":
            problems.add(f"array 'x' is not numeric (dtype {x.dtype})")
        elif x.ndim < 2:
            problems.add(
                f"array 'x' has shape {x.shape}; it must be (rows, ...) with at least one "
                "feature per row"
            )
        elif math.prod(x.shape[1:]) == 0:
            problems.add(f"array 'x' has shape {x.shape}: no features")
        else:
            features = x
            input_shape = list(x.shape[1:])
    labels = None if label in _NPZ_RESERVED else arrays.get(label)
    if labels is not None:
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            problems.add(f"label array {label!r} has shape {labels.shape}; expected (rows,)")
            labels = None
        elif labels.dtype.kind not in "biufUS":
            problems.add(f"label array {label!r} is neither numbers nor strings ({labels.dtype})")
            labels = None
        elif features is not None and len(labels) != len(features):
            problems.add(
                f"label array {label!r} has {len(labels)} rows but 'x' has {len(features)}"
            )
            labels = None
    feature_names = _npz_strings(arrays.get("feature_names"), "feature_names", problems)
    class_names = _npz_strings(arrays.get("class_names"), "class_names", problems)
    return _assemble(
        x=features,
        labels=labels,
        label=label,
        feature_names=feature_names,
        input_shape=input_shape,
        class_names=class_names,
        task=task,
        limits=limits,
        problems=problems,
        source_format="npz",
        source_sha256=source_sha256,
    )


def from_arrays(
    x: np.ndarray,
    labels: np.ndarray | Sequence[Any],
    *,
    label: str,
    feature_names: Sequence[str] | None = None,
    input_shape: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    task: Task | None = None,
    source_format: SourceFormat = "builtin",
    source_sha256: str | None = None,
    limits: IngestLimits = DEFAULT_LIMITS,
) -> ParsedDataset:
    """Validate in-memory arrays by the NPZ conventions (built-in examples, generators).

    ``x`` is ``(rows, ...)``; ``input_shape`` defaults to ``x.shape[1:]`` and may
    reshape it (``(rows, 64)`` as ``[8, 8, 1]``). ``source_sha256`` defaults to the
    content hash.
    """
    problems = _Problems()
    _check_label_name(label, problems)
    features = np.asarray(x)
    if features.ndim < 2 or features.dtype.kind not in "biuf":
        problems.add(f"x must be a numeric array of shape (rows, ...), not {features.shape}")
        raise DatasetInvalidError(problems.items)
    shape = list(input_shape) if input_shape is not None else list(features.shape[1:])
    if math.prod(shape) != math.prod(features.shape[1:]) or not all(d > 0 for d in shape):
        problems.add(f"input_shape {shape} does not fit rows of shape {list(features.shape[1:])}")
    return _assemble(
        x=features,
        labels=np.asarray(labels),
        label=label,
        feature_names=None if feature_names is None else list(feature_names),
        input_shape=shape,
        class_names=None if class_names is None else list(class_names),
        task=task,
        limits=limits,
        problems=problems,
        source_format=source_format,
        source_sha256=source_sha256,
    )


# ----------------------------------------------------------------------------- CSV


@dataclass
class _ColumnStats:
    missing: int = 0
    non_numeric: int = 0
    first_non_numeric: tuple[str, int] | None = None
    booleans: int = 0
    fractional: bool = False


class _CsvReader:
    def __init__(self, data: bytes, *, label: str, limits: IngestLimits) -> None:
        self.data = data
        self.label = label
        self.limits = limits
        self.problems = _Problems()

    def parse(self, task: Task | None) -> ParsedDataset:
        data, problems = self.data, self.problems
        source_sha256 = _sha256(data)
        _check_label_name(self.label, problems)
        if not data.removeprefix(_BOM).strip():
            raise DatasetInvalidError(["the file is empty"])
        if data.startswith(_GZIP_MAGIC):
            raise DatasetInvalidError(
                ["the file is gzip-compressed; upload the CSV (or NPZ) file itself"]
            )
        if data.startswith(_ZIP_MAGIC):
            raise DatasetInvalidError(["the file is a ZIP archive, not CSV text (NPZ?)"])
        text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8-sig", newline="")
        reader = csv.reader(text, delimiter=_sniff_delimiter(data), skipinitialspace=True)
        try:
            return self._parse_rows(reader, task, source_sha256)
        except UnicodeDecodeError as e:
            raise DatasetInvalidError(
                [f"the file is not UTF-8 text (byte {e.object[e.start]:#04x} cannot be decoded)"]
            ) from e
        except csv.Error as e:
            raise DatasetInvalidError([f"line {reader.line_num}: not readable as CSV: {e}"]) from e

    def _parse_rows(self, reader: Any, task: Task | None, source_sha256: str) -> ParsedDataset:
        problems, label = self.problems, self.label
        header: list[str] | None = None
        for row in reader:
            if any(cell.strip() for cell in row):
                header = [cell.strip() for cell in row]
                break
        if header is None:
            raise DatasetInvalidError(["the file is empty"])
        self._check_header(header)
        label_index = header.index(label) if label in header else None
        if label_index is None:
            near = [h for h in header if h.lower() == label.lower()]
            hint = f"; did you mean {near[0]!r}?" if near else ""
            problems.add(
                f"no column named {label!r} for the label (columns: {_names_preview(header)}){hint}"
            )
        feature_columns = [j for j in range(len(header)) if j != label_index]
        if len(feature_columns) > self.limits.max_features:
            problems.add(
                f"the file has {len(feature_columns)} feature columns, above the limit of "
                f"{self.limits.max_features}"
            )
            raise DatasetInvalidError(problems.items)

        stats = [_ColumnStats() for _ in feature_columns]
        x_chunks: list[np.ndarray] = []
        label_chunks: list[np.ndarray] = []
        line_chunks: list[np.ndarray] = []
        ragged: list[tuple[int, int]] = []
        rows: list[list[str]] = []
        lines: list[int] = []

        def flush() -> None:
            if not rows:
                return
            line_array = np.asarray(lines, dtype=np.int64)
            chunk = np.empty((len(rows), len(feature_columns)), dtype=np.float32)
            columns = list(zip(*rows, strict=True))
            for k, j in enumerate(feature_columns):
                chunk[:, k] = _parse_feature_tokens(columns[j], line_array, stats[k])
            x_chunks.append(chunk)
            if label_index is not None:
                label_chunks.append(_strip(columns[label_index]))
            line_chunks.append(line_array)
            rows.clear()
            lines.clear()

        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank lines, and the ",,," rows spreadsheets leave behind
            if len(row) != len(header):
                ragged.append((reader.line_num, len(row)))
                continue
            rows.append(row)
            lines.append(reader.line_num)
            if len(rows) >= _CSV_CHUNK_ROWS:
                flush()
        flush()

        if ragged:
            where = _locations(np.asarray([line for line, _ in ragged]), "line")
            problems.add(
                f"{len(ragged)} row{'s' * (len(ragged) > 1)} {'have' if len(ragged) > 1 else 'has'}"
                f" a different number of values than the header's {len(header)} columns "
                f"({where}; e.g. {ragged[0][1]} values)"
            )
        n_rows = sum(len(c) for c in x_chunks)
        x = (
            np.concatenate(x_chunks)
            if x_chunks
            else np.empty((0, len(feature_columns)), dtype=np.float32)
        )
        line_numbers = np.concatenate(line_chunks) if line_chunks else np.empty(0, np.int64)
        skip: set[int] = set()
        dtypes: list[str] = []
        for k, s in enumerate(stats):
            name = header[feature_columns[k]]
            if s.non_numeric:
                token, line = s.first_non_numeric or ("", 0)
                problems.add(
                    f"feature {name!r} is not numeric: {s.non_numeric} value"
                    f"{'s' * (s.non_numeric > 1)} such as {token!r} (line {line})",
                    kind="non_numeric",
                    what="non-numeric features",
                )
                skip.add(k)
            present = n_rows - s.missing - s.non_numeric
            if present and s.booleans == present:
                dtypes.append("bool")
            else:
                dtypes.append("float64" if s.fractional or not present else "int64")
        labels = np.concatenate(label_chunks) if label_chunks else None
        return _assemble(
            x=x,
            labels=labels,
            label=label,
            feature_names=[header[j] for j in feature_columns],
            input_shape=[len(feature_columns)],
            class_names=None,
            task=task,
            limits=self.limits,
            problems=problems,
            source_format="csv",
            source_sha256=source_sha256,
            feature_dtypes=dtypes,
            skip_features=skip,
            locate=lambda rows_at: _locations(line_numbers[rows_at], "line"),
            empty_message="the file has a header but no data rows",
        )

    def _check_header(self, header: list[str]) -> None:
        seen: set[str] = set()
        duplicates: list[str] = []
        for position, name in enumerate(header, start=1):
            if not name:
                self.problems.add(f"column {position} has no name in the header row")
            elif name in seen and name not in duplicates:
                duplicates.append(name)
            seen.add(name)
        if duplicates:
            self.problems.add(
                f"the header names these columns more than once: {_names_preview(duplicates)}"
            )


def _sniff_delimiter(data: bytes) -> str:
    first_line = data[:65536].decode("utf-8", errors="ignore").lstrip("\ufeff").split("\n", 1)[0]
    if "," in first_line:
        return ","
    if "\t" in first_line:
        return "\t"
    if ";" in first_line:
        return ";"
    return ","


def _strip(tokens: Sequence[str]) -> np.ndarray:
    return np.strings.strip(np.asarray(tokens, dtype=np.str_))


def _parse_feature_tokens(
    tokens: Sequence[str], lines: np.ndarray, stats: _ColumnStats
) -> np.ndarray:
    """One column's tokens as float64 values (NaN where missing or not a number)."""
    try:  # the common case, all numbers: about ten times faster than the general path
        values = np.fromiter(map(float, tokens), dtype=np.float64, count=len(tokens))
    except ValueError:
        values = _parse_mixed_tokens(tokens, lines, stats)
    else:
        stats.missing += int(np.isnan(values).sum())
    finite = values[np.isfinite(values)]
    if not stats.fractional and finite.size and not np.all(finite == np.round(finite)):
        stats.fractional = True
    return values


def _parse_mixed_tokens(
    tokens: Sequence[str], lines: np.ndarray, stats: _ColumnStats
) -> np.ndarray:
    """The general path: missing markers, booleans and non-numeric values."""
    stripped = _strip(tokens)
    lower = np.strings.lower(stripped)
    missing = np.isin(lower, _MISSING_TOKENS)
    is_true = lower == "true"
    is_false = lower == "false"
    special = missing | is_true | is_false
    candidates = np.where(special, "0", stripped)
    try:
        values = candidates.astype(np.float64)
        bad = np.zeros(len(tokens), dtype=bool)
    except ValueError:
        values = np.empty(len(tokens), dtype=np.float64)
        bad = np.zeros(len(tokens), dtype=bool)
        for i, token in enumerate(candidates.tolist()):
            try:
                values[i] = float(token)
            except ValueError:
                bad[i] = True
    values[missing | bad] = np.nan
    values[is_true] = 1.0
    values[is_false] = 0.0
    stats.missing += int(missing.sum())
    if bad.any():
        if stats.first_non_numeric is None:
            first = int(np.flatnonzero(bad)[0])
            stats.first_non_numeric = (str(stripped[first]), int(lines[first]))
        stats.non_numeric += int(bad.sum())
    stats.booleans += int((is_true | is_false).sum())
    return values


# ----------------------------------------------------------------------------- NPZ helpers


def _npz_members(data: bytes, limits: IngestLimits) -> dict[str, zipfile.ZipInfo]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except zipfile.BadZipFile as e:
        if data.startswith(b"\x93NUMPY"):
            raise DatasetInvalidError(
                [
                    "the file is a single .npy array, not an NPZ archive; save it with "
                    "numpy.savez(path, x=features, <label>=labels)"
                ]
            ) from e
        raise DatasetInvalidError([f"the file is not a readable NPZ (ZIP) archive: {e}"]) from e
    expanded = sum(info.file_size for info in infos)
    if expanded > limits.max_expanded_bytes:
        raise DatasetInvalidError(
            [
                f"the NPZ arrays take {_human_bytes(expanded)} uncompressed, above the limit of "
                f"{_human_bytes(limits.max_expanded_bytes)}"
            ]
        )
    return {info.filename.removesuffix(".npy"): info for info in infos}


def _npz_strings(array: np.ndarray | None, name: str, problems: _Problems) -> list[str] | None:
    if array is None:
        return None
    if array.ndim != 1 or array.dtype.kind not in "US":
        problems.add(
            f"array {name!r} must be a 1-D array of strings, not {array.dtype}{array.shape}"
        )
        return None
    if array.dtype.kind == "S":
        try:
            return [value.decode() for value in array.tolist()]
        except UnicodeDecodeError:
            problems.add(f"array {name!r} is not UTF-8 text")
            return None
    return [str(value) for value in array.tolist()]


# ----------------------------------------------------------------------------- shared checks


class _Problems:
    """Problems in the order found; each kind listed up to :data:`_MAX_LISTED` times."""

    def __init__(self) -> None:
        self._items: list[str] = []
        self._overflow: dict[str, tuple[int, str]] = {}
        self._counts: dict[str, int] = {}

    def add(self, message: str, *, kind: str | None = None, what: str = "problems") -> None:
        if kind is not None:
            self._counts[kind] = self._counts.get(kind, 0) + 1
            if self._counts[kind] > _MAX_LISTED:
                extra, _ = self._overflow.get(kind, (0, what))
                self._overflow[kind] = (extra + 1, what)
                return
        self._items.append(message)

    @property
    def items(self) -> list[str]:
        return self._items + [f"... and {n} more {what}" for n, what in self._overflow.values()]

    def __bool__(self) -> bool:
        return bool(self._items)


def _assemble(
    *,
    x: np.ndarray | None,
    labels: np.ndarray | None,
    label: str,
    feature_names: list[str] | None,
    input_shape: list[int] | None,
    class_names: list[str] | None,
    task: Task | None,
    limits: IngestLimits,
    problems: _Problems,
    source_format: SourceFormat,
    source_sha256: str | None,
    feature_dtypes: list[str] | None = None,
    skip_features: set[int] | None = None,
    locate: Callable[[np.ndarray], str] | None = None,
    empty_message: str = "there are no data rows",
) -> ParsedDataset:
    """The checks every source shares; raises with every problem, or builds the result."""
    locate = locate or (lambda at: _locations(at, "row"))
    skip = skip_features or set()
    flat: np.ndarray | None = None
    rows: int | None = None
    if x is not None:
        rows = len(x)
        original = x.reshape(rows, math.prod(x.shape[1:]))
        if feature_dtypes is None:
            feature_dtypes = _value_dtypes(original)
        flat = original.astype(np.float32, copy=False)
        if feature_names is None:
            feature_names = _default_feature_names(list(x.shape[1:]))
        _check_features(flat, feature_names, skip, limits, problems)
    elif labels is not None:
        rows = len(labels)
    if rows == 0:
        problems.add(empty_message)
    elif rows is not None and rows < limits.min_rows:
        problems.add(
            f"the dataset has {rows} row{'s' * (rows > 1)}; at least {limits.min_rows} are "
            "needed to split it into train, validation and test"
        )
    y: np.ndarray | None = None
    if labels is not None and len(labels):
        task, y, class_names = _labels_to_targets(
            labels, label, task, class_names, limits, problems, locate
        )
    if task == "regression" and class_names is not None:
        class_names = None
    if problems or flat is None or y is None or task is None:
        raise DatasetInvalidError(problems.items)
    try:
        schema = DatasetSchema(
            task=task,
            label=label,
            feature_names=feature_names or [],
            feature_dtypes=feature_dtypes or [],
            input_shape=input_shape or [flat.shape[1]],
            class_names=class_names,
            rows=flat.shape[0],
        )
    except ValidationError as e:
        raise DatasetInvalidError([str(err["msg"]) for err in e.errors()]) from e
    parsed = ParsedDataset(
        x=flat,
        y=y,
        schema=schema,
        source_format=source_format,
        source_sha256=source_sha256 or "0" * 64,
    )
    if source_sha256 is None:
        object.__setattr__(parsed, "source_sha256", parsed.content_sha256)
    return parsed


def _check_features(
    x: np.ndarray,
    feature_names: list[str],
    skip: set[int],
    limits: IngestLimits,
    problems: _Problems,
) -> None:
    n_features = x.shape[1]
    if n_features == 0:
        problems.add("there are no feature columns besides the label")
    if n_features > limits.max_features:
        problems.add(f"there are {n_features} features, above the limit of {limits.max_features}")
    if len(feature_names) != n_features:
        problems.add(f"{len(feature_names)} feature names were given for {n_features} features")
    else:
        seen: set[str] = set()
        for name in feature_names:
            if not name.strip():
                problems.add("a feature name is empty", kind="name", what="bad feature names")
            elif len(name) > MAX_NAME_LENGTH:
                problems.add(
                    f"feature name {name[:40]!r}... is longer than {MAX_NAME_LENGTH} characters",
                    kind="name",
                    what="bad feature names",
                )
            elif name in seen:
                problems.add(
                    f"feature name {name!r} appears more than once",
                    kind="name",
                    what="bad feature names",
                )
            seen.add(name)
    if not len(x) or len(feature_names) != n_features:
        return
    nan_counts = np.isnan(x).sum(axis=0).tolist()
    inf_counts = np.isinf(x).sum(axis=0).tolist()
    over = np.asarray(nan_counts) > limits.max_nan_share * len(x)
    for j in np.flatnonzero(over | (np.asarray(inf_counts) > 0)).tolist():
        if j in skip:
            continue
        name = feature_names[j]
        if over[j]:
            share = nan_counts[j] / len(x)
            problems.add(
                f"feature {name!r} is {share:.1%} missing (NaN), above the limit of "
                f"{limits.max_nan_share:.1%}",
                kind="nan",
                what="features above the NaN limit",
            )
        if inf_counts[j]:
            problems.add(
                f"feature {name!r} has {inf_counts[j]} infinite value{'s' * (inf_counts[j] > 1)}",
                kind="inf",
                what="features with infinite values",
            )


def _value_dtypes(x: np.ndarray) -> list[str]:
    if x.dtype == np.bool_:
        return ["bool"] * x.shape[1]
    if x.dtype.kind in "iu":
        return ["int64"] * x.shape[1]
    values = x.astype(np.float64)
    finite = np.isfinite(values)
    whole = np.all(~finite | (values == np.round(np.where(finite, values, 0.0))), axis=0)
    return ["int64" if w else "float64" for w in whole]


def _labels_to_targets(
    labels: np.ndarray,
    label: str,
    task: Task | None,
    class_names: list[str] | None,
    limits: IngestLimits,
    problems: _Problems,
    locate: Callable[[np.ndarray], str],
) -> tuple[Task | None, np.ndarray | None, list[str] | None]:
    """The task, the targets and the class names; ``(task, None, ...)`` on problems."""
    text: np.ndarray | None = None
    numeric: np.ndarray | None = None
    if labels.dtype.kind in "US":
        if labels.dtype.kind == "S":
            text = _strip([v.decode(errors="replace") for v in labels.tolist()])
        else:
            text = np.strings.strip(labels.astype(np.str_))
        missing = np.isin(np.strings.lower(text), _MISSING_TOKENS)
        try:
            numeric = np.where(missing, "nan", text).astype(np.float64)
        except ValueError:
            numeric = None
    else:
        numeric = labels.astype(np.float64)
        missing = np.isnan(numeric)
    if missing.any():
        at = np.flatnonzero(missing)
        problems.add(f"the label {label!r} is missing in {len(at)} rows ({locate(at)})")
    present = ~missing
    y: np.ndarray | None = None

    if class_names is not None:
        _check_class_names(class_names, problems)
        if task == "regression":
            problems.add("class_names were given but the task is regression")
            return task, None, None
        task = "classification"
        if numeric is not None and text is None:
            values = numeric[present]
            whole = np.isfinite(values) & (values == np.round(np.nan_to_num(values)))
            inside = whole & (values >= 0) & (values < len(class_names))
            if not inside.all():
                at = np.flatnonzero(present)[~inside]
                problems.add(
                    f"the label {label!r} must index class_names (0 to {len(class_names) - 1}); "
                    f"{len(at)} rows do not ({locate(at)})"
                )
                return task, None, class_names
            y = np.zeros(len(labels), dtype=np.int64)
            y[present] = values.astype(np.int64)
        else:
            assert text is not None
            index = {name: i for i, name in enumerate(class_names)}
            unknown = sorted({v for v in text[present].tolist() if v not in index})
            if unknown:
                problems.add(
                    f"the label {label!r} has values that are not in class_names: "
                    f"{_names_preview(unknown)}"
                )
                return task, None, class_names
            y = np.zeros(len(labels), dtype=np.int64)
            y[present] = [index[v] for v in text[present].tolist()]
    elif numeric is None:
        assert text is not None
        if task == "regression":
            first = text[present][0] if present.any() else ""
            problems.add(
                f"regression needs a numeric label, but {label!r} has values such as {first!r}"
            )
            return task, None, None
        task = "classification"
        distinct_text, inverse = np.unique(text[present], return_inverse=True)
        class_names = [str(c) for c in distinct_text.tolist()]
        y = np.zeros(len(labels), dtype=np.int64)
        y[present] = inverse
    else:
        values = numeric[present]
        infinite = ~np.isfinite(values)
        if infinite.any():
            at = np.flatnonzero(present)[infinite]
            problems.add(f"the label {label!r} is infinite in {len(at)} rows ({locate(at)})")
            return task, None, None
        whole = bool(np.all(values == np.round(values)))
        distinct = np.unique(values)
        if task is None:
            inferred = whole and len(distinct) <= MAX_INFERRED_CLASSES
            task = "classification" if inferred else "regression"
        if task == "regression":
            y = np.zeros(len(labels), dtype=np.float32)
            y[present] = values
            return task, y, None
        class_names = [_number_name(v) for v in distinct.tolist()]
        y = np.zeros(len(labels), dtype=np.int64)
        y[present] = np.searchsorted(distinct, values)

    assert class_names is not None and y is not None
    if len(class_names) > limits.max_classes:
        problems.add(
            f"the label {label!r} has {len(class_names)} classes, above the limit of "
            f"{limits.max_classes}"
        )
        return task, None, class_names
    if len(class_names) < 2:
        only = f" ({class_names[0]!r})" if class_names else ""
        problems.add(
            f"the label {label!r} has only one class{only}; classification needs at least two"
        )
    counts = np.bincount(y[present], minlength=len(class_names))
    for small in np.flatnonzero(counts < limits.min_rows_per_class).tolist():
        count = int(counts[small])
        problems.add(
            f"class {class_names[small]!r} has {count} row{'s' * (count != 1)}; each class "
            f"needs at least {limits.min_rows_per_class}",
            kind="class_rows",
            what="classes with too few rows",
        )
    return task, y, class_names


def _check_class_names(class_names: list[str], problems: _Problems) -> None:
    if len(set(class_names)) != len(class_names):
        problems.add("class_names has duplicates")
    if any(not name.strip() for name in class_names):
        problems.add("class_names has an empty name")


def _check_label_name(label: str, problems: _Problems) -> None:
    if not label.strip():
        problems.add("the label name is empty")
    elif len(label) > MAX_LABEL_NAME_LENGTH:
        problems.add(f"the label name is longer than {MAX_LABEL_NAME_LENGTH} characters")


def _default_feature_names(shape: list[int]) -> list[str]:
    return [f"x[{','.join(map(str, index))}]" for index in np.ndindex(*shape)]


def _number_name(value: float) -> str:
    return str(int(value)) if value == round(value) else repr(float(value))


def _locations(numbers: np.ndarray, word: str) -> str:
    shown = ", ".join(str(int(n)) for n in numbers[:_MAX_LOCATIONS])
    more = len(numbers) - _MAX_LOCATIONS
    return f"{word}{'s' * (len(numbers) > 1)} {shown}" + (f" and {more} more" if more > 0 else "")


def _names_preview(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _human_bytes(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    return f"{n} bytes"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
