"""What each runtime version can load: TFLite builtin op versions and ONNX opsets.

Two kinds of evidence, both kept here:

- **tables** under ``data/``, each with its provenance, for runtime versions the server
  does not run itself -- above all ``tflite-runtime`` 2.14, the last release, which
  legacy devices are stuck on and which cannot load many ops that TensorFlow 2.21
  writes at newer versions; also ``litert`` 2.3 and ``onnxruntime`` 1.20;
- **the installed runtimes** (ai-edge-litert, onnxruntime): for them, loading the model
  (interpreter allocation, session creation) is the authoritative check --
  :func:`load_error`.

A table is chosen by runtime name and ``major.minor``: patch releases do not change
which op versions a runtime registers. A runtime version without a table raises
:class:`UnknownRuntimeError`, so a gate fails closed rather than passing unchecked.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from server.errors import ServerError

__all__ = [
    "DATA_DIR",
    "OnnxOpsetTable",
    "TfliteOpTable",
    "UnknownRuntimeError",
    "installed_version",
    "load_error",
    "onnx_opset_table",
    "tflite_op_table",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
_DISTRIBUTIONS = {"litert": "ai-edge-litert", "onnxruntime": "onnxruntime"}


class UnknownRuntimeError(ServerError):
    """No op-support table for this runtime version: its ops cannot be checked."""

    status_code = 422


@dataclass(frozen=True)
class TfliteOpTable:
    """Builtin op versions one TFLite runtime version registers: name -> (min, max)."""

    runtime: str
    version: str
    builtin: Mapping[str, tuple[int, int]]
    custom: frozenset[str]
    source: str


@dataclass(frozen=True)
class OnnxOpsetTable:
    """The highest opset per domain one onnxruntime version implements."""

    runtime: str
    version: str
    max_opset: Mapping[str, int]
    source: str


def _minor(version: str) -> str:
    parts = version.split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise UnknownRuntimeError(
            f"runtime version {version!r} is not of the form MAJOR.MINOR[.PATCH]"
        )
    return f"{int(parts[0])}.{int(parts[1])}"


@functools.cache
def _tables() -> tuple[dict[tuple[str, str], TfliteOpTable], dict[str, OnnxOpsetTable]]:
    tflite: dict[tuple[str, str], TfliteOpTable] = {}
    onnx: dict[str, OnnxOpsetTable] = {}
    for path in sorted(DATA_DIR.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        source = f"{path.name}: {data['provenance']['source']}"
        if data["format"] == "tflite":
            key = (data["runtime"], _minor(data["version"]))
            tflite[key] = TfliteOpTable(
                runtime=data["runtime"],
                version=key[1],
                builtin={name: (lo, hi) for name, (lo, hi) in data["builtin_ops"].items()},
                custom=frozenset(data["custom_ops"]),
                source=source,
            )
        else:
            for version, opsets in data["versions"].items():
                onnx[_minor(version)] = OnnxOpsetTable(
                    runtime=data["runtime"],
                    version=_minor(version),
                    max_opset=opsets,
                    source=source,
                )
    return tflite, onnx


def _key(minor: str) -> tuple[int, int]:
    major, _, rest = minor.partition(".")
    return int(major), int(rest)


def _at_or_below(known: list[str], version: str) -> str | None:
    """The newest known major.minor not above ``version``'s: runtimes only ever add op
    versions and opsets, so a newer release runs at least what that table lists."""
    wanted = _key(_minor(version))
    candidates = [v for v in known if _key(v) <= wanted]
    return max(candidates, key=_key) if candidates else None


def tflite_op_table(runtime: str, version: str) -> TfliteOpTable:
    """The table for ``litert`` or ``tflite-runtime`` at ``version`` (matched on major.minor).

    A release newer than every table of its runtime is judged by the newest older
    table (a lower bound of what it runs; the ``source`` says so).
    """
    tables, _ = _tables()
    minor = _minor(version)
    table = tables.get((runtime, minor))
    if table is None:
        below = _at_or_below([v for r, v in tables if r == runtime], version)
        if below is None:
            known = ", ".join(f"{r} {v}" for r, v in sorted(tables)) or "none"
            raise UnknownRuntimeError(
                f"no op-support table for {runtime} {version} (tables exist for: {known})"
            )
        older = tables[(runtime, below)]
        table = replace(
            older, version=minor, source=f"{older.source} (as a lower bound for {minor})"
        )
    return table


def onnx_opset_table(version: str) -> OnnxOpsetTable:
    """The opsets ``onnxruntime`` ``version`` implements (matched on major.minor; a newer
    release than every table is judged by the newest older one, a lower bound)."""
    _, tables = _tables()
    minor = _minor(version)
    table = tables.get(minor)
    if table is None:
        below = _at_or_below(list(tables), version)
        if below is None:
            known = ", ".join(sorted(tables)) or "none"
            raise UnknownRuntimeError(
                f"no opset table for onnxruntime {version} (tables exist for: {known})"
            )
        older = tables[below]
        table = replace(
            older, version=minor, source=f"{older.source} (as a lower bound for {minor})"
        )
    return table


def installed_version(runtime: Literal["litert", "onnxruntime"]) -> str | None:
    """The version of the runtime installed with the server, or None when it is absent."""
    try:
        return importlib.metadata.version(_DISTRIBUTIONS[runtime])
    except importlib.metadata.PackageNotFoundError:
        return None


def load_error(model: bytes, *, format: Literal["tflite", "onnx"]) -> str | None:
    """Why the installed runtime cannot load ``model``, or None when it loads.

    TFLite goes into ai-edge-litert (interpreter construction resolves every op code,
    allocation prepares every kernel); ONNX into an onnxruntime CPU session.
    """
    try:
        if format == "tflite":
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_content=model)
            interpreter.allocate_tensors()
        else:
            import onnxruntime

            onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    except (ValueError, RuntimeError) as e:
        # Both runtimes report an unloadable model as one of these; keep the first lines.
        return " ".join(str(e).split())[:500]
    except Exception as e:  # onnxruntime raises its own pybind exception types
        if type(e).__module__.startswith("onnxruntime"):
            return f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        raise
    return None
