"""Which operators (at which versions) a converted model needs, and which a runtime lacks.

- TFLite: one :class:`~shared.bundle.OpRequirement` per operator code in the flatbuffer.
  A builtin is named from the schema's ``BuiltinOperator`` enum, its code being
  ``max(builtin_code, deprecated_builtin_code)`` (codes above 127 live only in the
  newer field); a custom op is named ``custom:<its custom code>``.
- ONNX: one per ``op_type`` used by a node (subgraphs included), at the opset the model
  imports for that op's domain; ops outside the default domain are named
  ``<domain>.<op_type>`` (ONNX op types contain no dots, so the split is unambiguous).

What always holds: :func:`unsupported_ops` names every op the runtime version cannot
run, the version the model needs and the version the runtime supports; an empty list
means every op is supported. It reads only the tables of
:mod:`server.pipeline.runtime_support`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import Any

from server.pipeline.convert import ConversionError
from server.pipeline.runtime_support import onnx_opset_table, tflite_op_table
from shared.bundle import OpRequirement

__all__ = ["CUSTOM_PREFIX", "onnx_ops", "tflite_ops", "unsupported_ops"]

CUSTOM_PREFIX = "custom:"
_DEFAULT_ONNX_DOMAINS = ("", "ai.onnx")


@functools.cache
def _builtin_names() -> dict[int, str]:
    # The schema module that ships with ai-edge-litert: the same generated code as
    # TensorFlow's, without importing TensorFlow.
    from ai_edge_litert import schema_py_generated as schema

    return {
        code: name
        for name, code in vars(schema.BuiltinOperator).items()
        if not name.startswith("_") and isinstance(code, int)
    }


def tflite_ops(model_bytes: bytes) -> list[OpRequirement]:
    """The operator codes of a ``.tflite`` flatbuffer, sorted by name."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    except Exception as e:  # a damaged flatbuffer fails anywhere inside the generated code
        raise ConversionError(f"not a readable TFLite flatbuffer: {e}") from e
    names = _builtin_names()
    custom_code = schema.BuiltinOperator.CUSTOM
    found: set[tuple[str, int]] = set()
    for op_code in model.operatorCodes or []:
        code = max(op_code.builtinCode, op_code.deprecatedBuiltinCode)
        if code == custom_code:
            raw = op_code.customCode
            label = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
            name = f"{CUSTOM_PREFIX}{label}"
        else:
            name = names.get(code, f"BUILTIN_{code}")
        found.add((name, max(1, op_code.version)))
    return [OpRequirement(name=name, version=version) for name, version in sorted(found)]


def _nodes(graph: Any) -> Iterator[Any]:
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _nodes(subgraph)


def onnx_ops(model_bytes: bytes) -> list[OpRequirement]:
    """The op types an ONNX model's nodes use, each at its domain's opset, sorted by name."""
    import onnx

    try:
        model = onnx.load_from_string(model_bytes)
    except Exception as e:  # protobuf's DecodeError and onnx's own errors
        raise ConversionError(f"not a readable ONNX model: {e}") from e
    opsets = {
        ("" if entry.domain == "ai.onnx" else entry.domain): entry.version
        for entry in model.opset_import
    }
    found: set[tuple[str, int]] = set()
    for node in _nodes(model.graph):
        domain = "" if node.domain in _DEFAULT_ONNX_DOMAINS else node.domain
        if domain not in opsets:
            raise ConversionError(f"ONNX node {node.op_type} uses domain {domain!r}, not imported")
        name = node.op_type if not domain else f"{domain}.{node.op_type}"
        found.add((name, opsets[domain]))
    return [OpRequirement(name=name, version=version) for name, version in sorted(found)]


def _unsupported_tflite(ops: Iterable[OpRequirement], runtime: str, version: str) -> list[str]:
    table = tflite_op_table(runtime, version)
    where = f"{runtime} {version}"
    problems = []
    for op in ops:
        if op.name.startswith(CUSTOM_PREFIX):
            custom = op.name.removeprefix(CUSTOM_PREFIX)
            if custom not in table.custom:
                problems.append(f"custom op {custom}: not registered in {where}")
            continue
        supported = table.builtin.get(op.name)
        if supported is None:
            problems.append(f"{op.name} version {op.version}: {where} has no {op.name} kernel")
            continue
        low, high = supported
        if op.version > high:
            problems.append(
                f"{op.name} version {op.version}: {where} supports {op.name} only up to "
                f"version {high}"
            )
        elif op.version < low:
            problems.append(
                f"{op.name} version {op.version}: {where} supports {op.name} versions "
                f"{low}-{high} only"
            )
    return problems


def _unsupported_onnx(ops: Iterable[OpRequirement], version: str) -> list[str]:
    table = onnx_opset_table(version)
    where = f"onnxruntime {version}"
    problems = []
    for op in ops:
        domain, _, op_type = op.name.rpartition(".")
        label = domain or "ai.onnx"
        highest = table.max_opset.get(label)
        if highest is None:
            problems.append(f"{op.name}: {where} implements no {label} domain")
        elif op.version > highest:
            problems.append(
                f"{op_type} at {label} opset {op.version}: {where} implements {label} "
                f"only up to opset {highest}"
            )
    return problems


def unsupported_ops(ops: Iterable[OpRequirement], runtime: str, runtime_version: str) -> list[str]:
    """Every op in ``ops`` that ``runtime`` ``runtime_version`` cannot run, one line each.

    Raises :class:`~server.pipeline.runtime_support.UnknownRuntimeError` when no table
    covers that runtime version.
    """
    if runtime in ("litert", "tflite-runtime"):
        return _unsupported_tflite(ops, runtime, runtime_version)
    if runtime == "onnxruntime":
        return _unsupported_onnx(ops, runtime_version)
    raise ValueError(f"unknown runtime {runtime!r}")
