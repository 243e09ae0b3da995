"""Desired-state computation and manifest versions, checked against the agent's own rules."""

from __future__ import annotations

import hashlib
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.keys import FleetKeys, issue_keyring
from server.rollouts.core import Assignment, DeviceOutcome, RolloutSpec, RolloutState
from server.rollouts.desired import (
    DEFAULT_MANIFEST_LIFETIME,
    DEFAULT_REFRESH_MARGIN,
    DesiredContent,
    IssuedManifest,
    IssueReason,
    ModelClaim,
    allowed_artifacts,
    artifact_authorizer,
    desired_content,
    issue_manifest,
    refresh_due,
    rollout_claims,
)
from server.rollouts.eligibility import ArtifactVariant, Pin
from server.rollouts.errors import DesiredStateError
from shared.messages import DesiredMessage, DesiredState
from shared.signing import SigningKey
from shared.trust import TrustState, accept_desired
from tests.server.rollouts.conftest import MODEL, NOW, PROFILE


def key(label: str) -> SigningKey:
    return SigningKey.from_seed(hashlib.sha256(label.encode()).digest())


ROOT = key("root")


def fleet_keys(*, version: int = 1, online: str = "online-1", days: int = 365) -> FleetKeys:
    signer = key(online)
    keyring, envelope = issue_keyring(
        ROOT, [signer.public], version=version, now=NOW, lifetime=timedelta(days=days)
    )
    return FleetKeys(
        root_public=ROOT.public, online=[signer], keyring=keyring, keyring_envelope=envelope
    )


def sha(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def variant(version: int, target: str = PROFILE, model: str = MODEL) -> ArtifactVariant:
    return ArtifactVariant(
        model_name=model,
        model_version=version,
        target=target,
        runtime="litert",
        bundle_sha256=sha(f"{model}-{version}-{target}"),
        bundle_length=1000 + version,
        gate_passed=True,
    )


VARIANTS = [variant(v, t) for v in (1, 2, 3) for t in (PROFILE, "edge-x86_64-litert")]
VARIANTS += [variant(1, model="anomaly")]


def claim(
    version: int | None, minutes: int, rollout: str = "r-1", model: str = MODEL
) -> ModelClaim:
    return ModelClaim("cam-1", model, version, rollout, NOW + timedelta(minutes=minutes))


# ----------------------------------------------------------------------------- claims


def test_a_rollout_claims_its_version_for_moved_devices_and_the_old_one_for_the_rest() -> None:
    spec = RolloutSpec.build(rollout_id="r-9", model_name=MODEL, model_version=3, group="g")
    at = NOW + timedelta(minutes=1)
    later = NOW + timedelta(minutes=9)

    def assignment(device_id: str, **fields: object) -> Assignment:
        base: dict[str, object] = {"device_id": device_id, "profile": PROFILE}
        return Assignment.model_validate({**base, **fields})

    state = RolloutState(
        status_changed_at=NOW,
        created_at=NOW,
        devices={
            "updating": assignment("updating", targeted_at=at, previous_version=2),
            "done": assignment("done", targeted_at=at, outcome=DeviceOutcome.ACTIVATED),
            "failed": assignment(
                "failed", targeted_at=at, previous_version=2, outcome="failed", outcome_at=later
            ),
            "back": assignment(
                "back", targeted_at=at, outcome=DeviceOutcome.ROLLED_BACK, outcome_at=later
            ),
            "left-out": assignment("left-out", outcome=DeviceOutcome.EXCLUDED),
        },
    )
    claims = rollout_claims(spec, state)
    assert {d: (c.model_version, c.claimed_at) for d, c in claims.items()} == {
        "updating": (3, at),
        "done": (3, at),
        "failed": (2, later),
        "back": (None, later),
    }
    assert {c.rollout_id for c in claims.values()} == {"r-9"}


# ----------------------------------------------------------------------------- content


def test_the_latest_claim_wins_and_picks_the_variant_for_the_profile() -> None:
    content = desired_content(
        "cam-1",
        PROFILE,
        claims=[claim(2, 5, "r-1"), claim(3, 9, "r-2"), claim(1, 1, "r-0", model="anomaly")],
        variants=VARIANTS,
        artifact_url=lambda sha256: f"/api/v1/devices/artifacts/{sha256}",
    )
    assert content.rollout_id == "r-2"
    assert [(d.model_name, d.model_version, d.target) for d in content.deployments] == [
        ("anomaly", 1, PROFILE),
        (MODEL, 3, PROFILE),
    ]
    digits = content.deployments[1].artifact
    assert digits.sha256 == sha(f"{MODEL}-3-{PROFILE}") and digits.length == 1003
    assert digits.url == f"/api/v1/devices/artifacts/{digits.sha256}"
    other = desired_content("cam-1", "edge-x86_64-litert", claims=[claim(3, 9)], variants=VARIANTS)
    assert other.deployments[0].artifact.sha256 == sha(f"{MODEL}-3-edge-x86_64-litert")


def test_a_pin_wins_over_every_claim() -> None:
    content = desired_content(
        "cam-1",
        PROFILE,
        claims=[claim(3, 9)],
        pins=[Pin("cam-1", MODEL, 1), Pin("cam-2", MODEL, 2)],
        variants=VARIANTS,
    )
    assert [d.model_version for d in content.deployments] == [1]
    assert content.rollout_id is None  # no rollout decided anything here


def test_a_claim_for_no_version_removes_the_model_and_other_devices_do_not_count() -> None:
    content = desired_content(
        "cam-1",
        PROFILE,
        claims=[claim(2, 1), claim(None, 5, "r-abort"), ModelClaim("cam-2", MODEL, 3, "x", NOW)],
        variants=VARIANTS,
    )
    assert content.deployments == () and content.rollout_id == "r-abort"


def test_a_version_without_a_deliverable_variant_is_refused() -> None:
    with pytest.raises(DesiredStateError, match="no artifact for profile legacy"):
        desired_content("cam-1", "legacy-armv7-tflite", claims=[claim(2, 1)], variants=VARIANTS)


def test_the_digest_follows_the_content_only() -> None:
    one = desired_content("cam-1", PROFILE, claims=[claim(2, 1)], variants=VARIANTS)
    same = desired_content("cam-1", PROFILE, claims=[claim(2, 7)], variants=VARIANTS)
    other_rollout = desired_content(
        "cam-1", PROFILE, claims=[claim(2, 1, "r-7")], variants=VARIANTS
    )
    other_version = desired_content("cam-1", PROFILE, claims=[claim(3, 1)], variants=VARIANTS)
    assert one.digest() == same.digest()
    assert len({one.digest(), other_rollout.digest(), other_version.digest()}) == 3


# ----------------------------------------------------------------------------- manifests


def content_of(version: int | None) -> DesiredContent:
    claims = [] if version is None else [claim(version, 0)]
    return desired_content("cam-1", PROFILE, claims=claims, variants=VARIANTS)


operations = st.lists(
    st.tuples(
        st.sampled_from(["same", "change", "retry", "rotate", "lost_record"]),
        st.integers(0, 4 * 24 * 60),  # minutes that pass first
        st.sampled_from([None, 1, 2, 3]),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=100)
@given(operations)
def test_manifest_versions_only_go_up_and_every_one_is_accepted_by_the_device(
    ops: list[tuple[str, int, int | None]],
) -> None:
    keys = fleet_keys()
    device = TrustState.from_root_keys([ROOT.public])
    last: IssuedManifest | None = None
    issued: dict[int, bytes] = {}
    now = NOW
    version: int | None = 1
    for operation, minutes, new_version in ops:
        now += timedelta(minutes=minutes)
        if operation == "change":
            version = new_version
        if operation == "rotate":
            keys = fleet_keys(version=keys.keyring.version + 1, online=f"k{keys.keyring.version}")
        record = None if operation == "lost_record" else last
        issue = issue_manifest(
            content_of(version),
            keys=keys,
            last=record,
            now=now,
            retry=operation == "retry",
            reported_version=device.manifest_version,
        )
        manifest = issue.manifest
        if issue.is_new:
            assert last is None or manifest.manifest_version > last.manifest_version
            assert manifest.manifest_version > device.manifest_version
            assert manifest.manifest_version not in issued
        else:
            assert operation in ("same", "change") and manifest is last
        # One version, one payload -- whatever happened since.
        assert issued.setdefault(manifest.manifest_version, manifest.payload) == manifest.payload
        assert manifest.expires_at - now >= DEFAULT_REFRESH_MARGIN
        assert manifest.artifacts == content_of(version).artifacts
        acceptance = accept_desired(
            device, DesiredMessage.from_bytes(manifest.payload), device_id="cam-1", now=now
        )
        assert acceptance.is_new == issue.is_new
        device, last = acceptance.state, manifest


def test_nothing_new_is_issued_while_nothing_changes_then_the_expiry_is_renewed() -> None:
    keys = fleet_keys()
    first = issue_manifest(content_of(2), keys=keys, last=None, now=NOW)
    assert first.reason is IssueReason.FIRST and first.manifest.manifest_version == 1
    assert first.manifest.expires_at == NOW + DEFAULT_MANIFEST_LIFETIME
    quiet = NOW + DEFAULT_MANIFEST_LIFETIME - DEFAULT_REFRESH_MARGIN - timedelta(seconds=1)
    assert issue_manifest(content_of(2), keys=keys, last=first.manifest, now=quiet).reason is None
    assert refresh_due(first.manifest, keyring=keys.keyring, now=quiet) is None
    assert (
        refresh_due(first.manifest, keyring=keys.keyring, now=quiet + timedelta(seconds=2))
        is IssueReason.EXPIRING
    )
    renew = issue_manifest(
        content_of(2), keys=keys, last=first.manifest, now=quiet + timedelta(seconds=2)
    )
    assert renew.reason is IssueReason.EXPIRING and renew.manifest.manifest_version == 2
    rotated = fleet_keys(version=2, online="online-2")
    assert (
        issue_manifest(content_of(2), keys=rotated, last=renew.manifest, now=quiet).reason
        is IssueReason.KEYRING_CHANGED
    )
    ahead = issue_manifest(
        content_of(2), keys=keys, last=renew.manifest, now=quiet, reported_version=40
    )
    assert ahead.reason is IssueReason.DEVICE_AHEAD and ahead.manifest.manifest_version == 41


def test_a_manifest_never_outlives_its_keyring() -> None:
    keys = fleet_keys(days=3)
    issue = issue_manifest(content_of(2), keys=keys, last=None, now=NOW)
    assert issue.manifest.expires_at == keys.keyring.expires_at
    # Re-signing cannot push the expiry further: no churn of versions until a new keyring.
    later = NOW + timedelta(days=2)
    assert issue_manifest(content_of(2), keys=keys, last=issue.manifest, now=later).reason is None
    with pytest.raises(DesiredStateError, match="keyring v1 expired"):
        issue_manifest(content_of(2), keys=keys, last=None, now=NOW + timedelta(days=3))
    with pytest.raises(ValueError, match="refresh margin"):
        issue_manifest(
            content_of(2), keys=keys, last=None, now=NOW, refresh_margin=DEFAULT_MANIFEST_LIFETIME
        )


def test_the_signed_state_is_what_the_content_says() -> None:
    keys = fleet_keys()
    manifest = issue_manifest(content_of(3), keys=keys, last=None, now=NOW).manifest
    message = DesiredMessage.from_bytes(manifest.payload)
    assert message.keyring == keys.keyring_envelope
    state = DesiredState.from_bytes(message.manifest.payload_bytes())
    assert state.device_id == "cam-1" and state.rollout_id == "r-1"
    assert list(state.deployments) == list(content_of(3).deployments)
    assert [s.keyid for s in message.manifest.signatures] == [keys.online[0].keyid]


def test_only_artifacts_of_the_latest_signed_manifest_are_served() -> None:
    keys = fleet_keys()
    old = issue_manifest(content_of(2), keys=keys, last=None, now=NOW).manifest
    new = issue_manifest(content_of(3), keys=keys, last=old, now=NOW).manifest
    latest = {"cam-1": new}
    authorize = artifact_authorizer(latest.get)
    assert authorize("cam-1", sha(f"{MODEL}-3-{PROFILE}"))
    assert not authorize("cam-1", sha(f"{MODEL}-2-{PROFILE}"))  # superseded
    assert not authorize("cam-2", sha(f"{MODEL}-3-{PROFILE}"))  # another device's
    state = DesiredState.from_bytes(DesiredMessage.from_bytes(new.payload).manifest.payload_bytes())
    assert allowed_artifacts(state) == allowed_artifacts(new) == {sha(f"{MODEL}-3-{PROFILE}")}
    assert allowed_artifacts(None) == frozenset()
