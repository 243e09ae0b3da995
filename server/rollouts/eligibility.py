"""Which devices can take a model version, and why the others cannot.

A device takes the variant (:class:`ArtifactVariant`) built for its profile, and only a
variant that passed its release gates and has a signed bundle. It is excluded from a
rollout -- and the rollout shows the :class:`~server.rollouts.core.Exclusion` -- when

=====================  =============================================================
code                   meaning
=====================  =============================================================
``not_accepted``       the device is pending, rejected or revoked
``pinned``             a pin holds the device on a version of this model (a pin wins)
``no_artifact``        no variant for its profile, or none that passed its gates or
                       has a bundle
``runtime_unknown``    it has not reported its runtime, or no op-support table covers
                       that runtime version (the check fails closed)
``runtime_mismatch``   its runtime is not the one the variant was built for
``unsupported_ops``    its runtime version cannot run ops the variant needs
=====================  =============================================================

A device's runtimes are the one it last reported (``runtime``, what serves its models)
and every one it declared at enrollment (``runtimes``): an agent with no model yet
reports its first runtime, which need not be the one its profile's artifact needs.

What always holds: the functions here are pure; the op check reads only the op-support
tables shipped with the server (:func:`server.pipeline.ops.unsupported_ops`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from server.models import TargetArtifact
from server.pipeline.ops import unsupported_ops
from server.pipeline.runtime_support import UnknownRuntimeError
from server.rollouts.core import Exclusion, RolloutMember
from shared.bundle import OpRequirement

__all__ = [
    "ACCEPTED",
    "ArtifactVariant",
    "DeviceFacts",
    "ExclusionCode",
    "Pin",
    "exclusion_for",
    "group_members",
    "select_variant",
]

ACCEPTED = "accepted"
"""The inventory status of a device that may receive desired states."""

_MAX_LISTED_OPS = 3


class ExclusionCode(StrEnum):
    NOT_ACCEPTED = "not_accepted"
    PINNED = "pinned"
    NO_ARTIFACT = "no_artifact"
    RUNTIME_UNKNOWN = "runtime_unknown"
    RUNTIME_MISMATCH = "runtime_mismatch"
    UNSUPPORTED_OPS = "unsupported_ops"


@dataclass(frozen=True, slots=True)
class DeviceFacts:
    """What the inventory knows about a device that matters to a rollout."""

    device_id: str
    profile: str
    status: str = ACCEPTED
    runtime: str | None = None
    runtime_version: str | None = None
    runtimes: tuple[tuple[str, str], ...] = ()
    """Every ``(runtime, version)`` the device declared at enrollment."""

    def runtime_for(self, name: str) -> tuple[str | None, str | None]:
        """The runtime to judge an artifact for ``name`` by: that one if the device has
        it (its reported version first), else the one it reported."""
        if self.runtime == name:
            return self.runtime, self.runtime_version
        declared = dict(self.runtimes)
        if name in declared:
            return name, declared[name]
        return self.runtime, self.runtime_version


@dataclass(frozen=True, slots=True)
class ArtifactVariant:
    """One model version built for one target profile (a ``target_artifacts`` row)."""

    model_name: str
    model_version: int
    target: str
    runtime: str
    bundle_sha256: str | None
    bundle_length: int | None
    gate_passed: bool
    ops: tuple[OpRequirement, ...] = ()

    @property
    def deliverable(self) -> bool:
        """Passed its gates and has a signed bundle a device can fetch."""
        return self.gate_passed and self.bundle_sha256 is not None and bool(self.bundle_length)

    @classmethod
    def from_target_artifact(
        cls, row: TargetArtifact, *, model_name: str, model_version: int
    ) -> ArtifactVariant:
        return cls(
            model_name=model_name,
            model_version=model_version,
            target=row.target,
            runtime=row.runtime,
            bundle_sha256=row.bundle_sha256,
            bundle_length=row.bundle_length,
            gate_passed=row.gate_passed,
            ops=tuple(OpRequirement.model_validate(op) for op in json.loads(row.ops_json or "[]")),
        )


@dataclass(frozen=True, slots=True)
class Pin:
    """An operator's decision that one device runs one version of a model, whatever rolls out."""

    device_id: str
    model_name: str
    model_version: int


def select_variant(
    variants: Iterable[ArtifactVariant], *, model_name: str, model_version: int, profile: str
) -> ArtifactVariant | None:
    """The deliverable variant of that model version for ``profile``, if there is one."""
    for variant in variants:
        if (
            variant.model_name == model_name
            and variant.model_version == model_version
            and variant.target == profile
            and variant.deliverable
        ):
            return variant
    return None


def _no_artifact(variants: Sequence[ArtifactVariant], model: str, profile: str) -> Exclusion:
    mine = [v for v in variants if v.target == profile]
    if not mine:
        detail = f"{model} has no artifact for profile {profile}"
    elif not any(v.gate_passed for v in mine):
        detail = f"the {profile} artifact of {model} did not pass its gates"
    else:
        detail = f"the {profile} artifact of {model} has no bundle"
    return Exclusion(ExclusionCode.NO_ARTIFACT, detail)


def exclusion_for(
    device: DeviceFacts,
    *,
    model_name: str,
    model_version: int,
    variants: Iterable[ArtifactVariant],
    pins: Iterable[Pin] = (),
) -> Exclusion | None:
    """Why ``device`` cannot take ``model_name`` v``model_version``; None when it can."""
    model = f"{model_name} v{model_version}"
    if device.status != ACCEPTED:
        return Exclusion(ExclusionCode.NOT_ACCEPTED, f"the device is {device.status}")
    for pin in pins:
        if pin.device_id == device.device_id and pin.model_name == model_name:
            return Exclusion(
                ExclusionCode.PINNED, f"pinned to {pin.model_name} v{pin.model_version}"
            )
    candidates = [
        v for v in variants if v.model_name == model_name and v.model_version == model_version
    ]
    variant = select_variant(
        candidates, model_name=model_name, model_version=model_version, profile=device.profile
    )
    if variant is None:
        return _no_artifact(candidates, model, device.profile)
    name, version = device.runtime_for(variant.runtime)
    if not name or not version:
        return Exclusion(ExclusionCode.RUNTIME_UNKNOWN, "the device has not reported its runtime")
    runtime = f"{name} {version}"
    if name != variant.runtime:
        return Exclusion(
            ExclusionCode.RUNTIME_MISMATCH,
            f"the {device.profile} artifact of {model} is built for {variant.runtime}; "
            f"the device runs {runtime}",
        )
    try:
        problems = unsupported_ops(variant.ops, name, version)
    except (UnknownRuntimeError, ValueError) as e:
        return Exclusion(ExclusionCode.RUNTIME_UNKNOWN, f"cannot check the ops {model} needs: {e}")
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED_OPS])
        more = len(problems) - _MAX_LISTED_OPS
        return Exclusion(
            ExclusionCode.UNSUPPORTED_OPS,
            f"{runtime} cannot run {model}: {listed}" + (f" (and {more} more)" if more > 0 else ""),
        )
    return None


def group_members(
    devices: Iterable[DeviceFacts],
    *,
    model_name: str,
    model_version: int,
    variants: Iterable[ArtifactVariant],
    pins: Iterable[Pin] = (),
    latency_sla_ms: Mapping[str, float] | None = None,
) -> list[RolloutMember]:
    """The rollout's view of a group: each device with its profile's SLA and exclusion."""
    variant_list = list(variants)
    pin_list = list(pins)
    slas = latency_sla_ms or {}
    return [
        RolloutMember(
            device_id=device.device_id,
            profile=device.profile,
            latency_sla_ms=slas.get(device.profile),
            exclusion=exclusion_for(
                device,
                model_name=model_name,
                model_version=model_version,
                variants=variant_list,
                pins=pin_list,
            ),
        )
        for device in devices
    ]
