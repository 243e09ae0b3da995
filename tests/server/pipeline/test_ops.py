"""Op requirements read from real artifacts, and what each runtime version lacks."""

from __future__ import annotations

import pytest

from server.pipeline.convert import ConversionError
from server.pipeline.ops import onnx_ops, tflite_ops, unsupported_ops
from server.pipeline.runtime_support import (
    UnknownRuntimeError,
    onnx_opset_table,
    tflite_op_table,
)
from shared.bundle import OpRequirement


def by_name(ops: list[OpRequirement]) -> dict[str, int]:
    assert len({op.name for op in ops}) == len(ops), "one requirement per op"
    return {op.name: op.version for op in ops}


def test_tflite_ops_name_builtins_from_the_schema(tflite_models: dict[str, bytes]) -> None:
    for quantization, model in tflite_models.items():
        ops = tflite_ops(model)
        assert [op.name for op in ops] == sorted(op.name for op in ops)
        names = by_name(ops)
        assert {"CONV_2D", "MAX_POOL_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(names), quantization
        assert all(version >= 1 for version in names.values())
    # Full-integer kernels are newer versions of the same builtins.
    assert by_name(tflite_ops(tflite_models["int8"]))["CONV_2D"] > 1
    assert by_name(tflite_ops(tflite_models["float32"]))["FULLY_CONNECTED"] == 1


def test_tensorflow_2_21_writes_fully_connected_12_for_dynamic_range(
    tflite_models: dict[str, bytes],
) -> None:
    assert by_name(tflite_ops(tflite_models["dynamic-int8"]))["FULLY_CONNECTED"] >= 12


def test_onnx_ops_carry_the_opset_of_their_domain(onnx_models: dict[str, bytes]) -> None:
    names = by_name(onnx_ops(onnx_models["float32"]))
    assert {"Conv", "MaxPool", "MatMul", "Softmax"} <= set(names)
    assert set(names.values()) == {17}
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(by_name(onnx_ops(onnx_models["int8"])))


def test_legacy_runtime_cannot_run_what_tf_2_21_writes_and_says_why(
    tflite_models: dict[str, bytes],
) -> None:
    ops = tflite_ops(tflite_models["dynamic-int8"])
    problems = unsupported_ops(ops, "tflite-runtime", "2.14.0")
    assert len(problems) == 1
    (problem,) = problems
    assert "FULLY_CONNECTED version 12" in problem
    assert "tflite-runtime 2.14.0" in problem and "up to version 10" in problem
    assert unsupported_ops(ops, "litert", "2.3.0") == []


@pytest.mark.parametrize("quantization", ["float32", "float16", "int8"])
def test_these_artifacts_fit_both_tflite_runtimes(
    quantization: str, tflite_models: dict[str, bytes]
) -> None:
    ops = tflite_ops(tflite_models[quantization])
    assert unsupported_ops(ops, "tflite-runtime", "2.14.0") == []
    assert unsupported_ops(ops, "litert", "2.3.1") == []  # patch releases share a table


def test_onnx_artifacts_fit_onnxruntime_1_20(onnx_models: dict[str, bytes]) -> None:
    for model in onnx_models.values():
        assert unsupported_ops(onnx_ops(model), "onnxruntime", "1.20.0") == []


def test_every_kind_of_unsupported_op_is_named() -> None:
    ops = [
        OpRequirement(name="BROADCAST_TO", version=1),  # 2.14 registers versions 2-3 only
        OpRequirement(name="STABLEHLO_ADD", version=1),  # no kernel in 2.14
        OpRequirement(name="custom:MyOp", version=1),
        OpRequirement(name="custom:TFLite_Detection_PostProcess", version=1),
        OpRequirement(name="ADD", version=5),
    ]
    problems = unsupported_ops(ops, "tflite-runtime", "2.14")
    assert problems == [
        "BROADCAST_TO version 1: tflite-runtime 2.14 supports BROADCAST_TO versions 2-3 only",
        "STABLEHLO_ADD version 1: tflite-runtime 2.14 has no STABLEHLO_ADD kernel",
        "custom op MyOp: not registered in tflite-runtime 2.14",
    ]
    onnx = [
        OpRequirement(name="Conv", version=22),
        OpRequirement(name="com.example.Thing", version=1),
        OpRequirement(name="com.microsoft.QLinearConv", version=1),
    ]
    assert unsupported_ops(onnx, "onnxruntime", "1.20.0") == [
        "Conv at ai.onnx opset 22: onnxruntime 1.20.0 implements ai.onnx only up to opset 21",
        "com.example.Thing: onnxruntime 1.20.0 implements no com.example domain",
    ]


def test_a_runtime_version_without_a_table_cannot_be_checked() -> None:
    op = [OpRequirement(name="ADD", version=1)]
    with pytest.raises(UnknownRuntimeError, match=r"tflite-runtime 2\.13\.0.*tflite-runtime 2\.14"):
        unsupported_ops(op, "tflite-runtime", "2.13.0")
    with pytest.raises(UnknownRuntimeError, match=r"onnxruntime 1\.12"):
        unsupported_ops(op, "onnxruntime", "1.12")
    with pytest.raises(UnknownRuntimeError, match=r"MAJOR\.MINOR"):
        unsupported_ops(op, "litert", "latest")


def test_a_newer_release_is_judged_by_the_newest_older_table() -> None:
    # Runtimes only add op versions and opsets: what 1.20 runs, 1.32 runs too.
    conv22 = [OpRequirement(name="Conv", version=22)]
    conv21 = [OpRequirement(name="Conv", version=21)]
    assert unsupported_ops(conv21, "onnxruntime", "1.32.0") == []
    assert unsupported_ops(conv22, "onnxruntime", "1.32.0") == [
        "Conv at ai.onnx opset 22: onnxruntime 1.32.0 implements ai.onnx only up to opset 21"
    ]
    table = onnx_opset_table("1.32.0")
    assert table.version == "1.32" and "lower bound for 1.32" in table.source
    assert tflite_op_table("litert", "2.9.1").builtin == tflite_op_table("litert", "2.3").builtin


def test_unreadable_models_are_conversion_errors() -> None:
    with pytest.raises(ConversionError, match="ONNX"):
        onnx_ops(b"\x08\x07garbage that is not a model proto \xff\xff")
    with pytest.raises(ConversionError, match="TFLite"):
        tflite_ops(b"\x00" * 3)
