from __future__ import annotations

import json

from server.models import TargetArtifact
from server.rollouts.core import DeviceOutcome, RolloutSpec, new_rollout, step
from server.rollouts.eligibility import (
    ArtifactVariant,
    DeviceFacts,
    ExclusionCode,
    Pin,
    exclusion_for,
    group_members,
    select_variant,
)
from shared.bundle import OpRequirement
from tests.server.rollouts.conftest import ACTIVATION_ONLY, MODEL, NOW, PROFILE

LEGACY = "legacy-armv7-tflite"
NEW_FC = (
    OpRequirement(name="FULLY_CONNECTED", version=12),
    OpRequirement(name="SOFTMAX", version=1),
)


def variant(target: str, runtime: str, **overrides: object) -> ArtifactVariant:
    fields: dict[str, object] = {
        "model_name": MODEL,
        "model_version": 4,
        "target": target,
        "runtime": runtime,
        "bundle_sha256": "cd" * 32,
        "bundle_length": 4096,
        "gate_passed": True,
        "ops": NEW_FC,
    }
    fields.update(overrides)
    return ArtifactVariant(**fields)  # type: ignore[arg-type]


VARIANTS = [variant(PROFILE, "litert"), variant(LEGACY, "tflite-runtime")]


def device(device_id: str = "cam-1", **overrides: object) -> DeviceFacts:
    fields: dict[str, object] = {
        "device_id": device_id,
        "profile": PROFILE,
        "runtime": "litert",
        "runtime_version": "2.3.1",
    }
    fields.update(overrides)
    return DeviceFacts(**fields)  # type: ignore[arg-type]


def why(facts: DeviceFacts, variants: list[ArtifactVariant] = VARIANTS, pins: list[Pin] = []):  # type: ignore[no-untyped-def]  # noqa: B006
    return exclusion_for(facts, model_name=MODEL, model_version=4, variants=variants, pins=pins)


def test_a_device_whose_runtime_runs_every_op_is_eligible() -> None:
    assert why(device()) is None


def test_a_legacy_runtime_that_lacks_an_op_version_is_excluded_with_the_op() -> None:
    legacy = device(profile=LEGACY, runtime="tflite-runtime", runtime_version="2.14.0")
    exclusion = why(legacy)
    assert exclusion is not None and exclusion.code == ExclusionCode.UNSUPPORTED_OPS
    assert exclusion.detail == (
        "tflite-runtime 2.14.0 cannot run digits v4: FULLY_CONNECTED version 12: "
        "tflite-runtime 2.14.0 supports FULLY_CONNECTED only up to version 10"
    )


def test_every_other_reason_is_named() -> None:
    cases = {
        ExclusionCode.NOT_ACCEPTED: (device(status="pending"), VARIANTS, []),
        ExclusionCode.PINNED: (device(), VARIANTS, [Pin("cam-1", MODEL, 3)]),
        ExclusionCode.NO_ARTIFACT: (device(profile="cloud-x86_64-onnx"), VARIANTS, []),
        ExclusionCode.RUNTIME_UNKNOWN: (device(runtime=None), VARIANTS, []),
        ExclusionCode.RUNTIME_MISMATCH: (device(runtime="onnxruntime"), VARIANTS, []),
    }
    for code, (facts, variants, pins) in cases.items():
        exclusion = why(facts, variants, pins)
        assert exclusion is not None and exclusion.code == code, code
    assert why(device(status="revoked")).detail == "the device is revoked"
    assert why(device(), pins=[Pin("cam-1", MODEL, 3)]).detail == "pinned to digits v3"
    assert why(device(), pins=[Pin("cam-2", MODEL, 3), Pin("cam-1", "other", 1)]) is None
    unknown = why(device(runtime_version="1.0.0"))  # older than every table: cannot tell
    assert unknown is not None and unknown.code == ExclusionCode.RUNTIME_UNKNOWN
    assert "cannot check the ops" in unknown.detail


def test_no_artifact_says_which_artifact_is_missing_or_unusable() -> None:
    failed_gate = [variant(PROFILE, "litert", gate_passed=False)]
    no_bundle = [variant(PROFILE, "litert", bundle_sha256=None)]
    other_version = [variant(PROFILE, "litert", model_version=3)]
    details = [why(device(), v).detail for v in (failed_gate, no_bundle, other_version)]
    assert details == [
        f"the {PROFILE} artifact of digits v4 did not pass its gates",
        f"the {PROFILE} artifact of digits v4 has no bundle",
        f"digits v4 has no artifact for profile {PROFILE}",
    ]
    assert select_variant(failed_gate, model_name=MODEL, model_version=4, profile=PROFILE) is None


def test_a_variant_reads_from_a_registry_row() -> None:
    row = TargetArtifact(
        model_version_id=7,
        target=PROFILE,
        format="tflite",
        quantization="int8",
        runtime="litert",
        bundle_sha256="ef" * 32,
        bundle_length=1234,
        ops_json=json.dumps([op.model_dump() for op in NEW_FC]),
        gate_passed=True,
    )
    read = ArtifactVariant.from_target_artifact(row, model_name=MODEL, model_version=4)
    assert read == variant(PROFILE, "litert", bundle_sha256="ef" * 32, bundle_length=1234)
    assert read.deliverable


def test_the_rollout_shows_why_a_member_was_left_out() -> None:
    devices = [
        device("cam-1"),
        device("old-1", profile=LEGACY, runtime="tflite-runtime", runtime_version="2.14.0"),
    ]
    members = group_members(
        devices,
        model_name=MODEL,
        model_version=4,
        variants=VARIANTS,
        latency_sla_ms={PROFILE: 50.0},
    )
    assert [m.latency_sla_ms for m in members] == [50.0, None]
    spec = RolloutSpec.build(
        rollout_id="r-ops", model_name=MODEL, model_version=4, group="g", gates=ACTIVATION_ONLY
    )
    result = step(spec, new_rollout(spec, now=NOW), members, {}, now=NOW)
    old = result.state.devices["old-1"]
    assert old.outcome is DeviceOutcome.EXCLUDED and old.reason == "unsupported_ops"
    assert old.detail is not None and "FULLY_CONNECTED version 12" in old.detail
    assert result.state.devices["cam-1"].targeted  # the only eligible device: 5 % is 1
    assert result.device_ids == ["cam-1"]
