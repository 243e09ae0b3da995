"""One condition over one scope, now: which subjects it fires for, with their evidence.

:func:`evaluate_condition` is shared by alert rules and retraining policies. For a
windowed condition the subjects are the model's versions that the scope reported on in
the windows looked at -- a version no longer served there has no subject, which is
how its alerts resolve. An offline condition has one subject: the scope.

What always holds: nothing is written; each finding carries the judgement of every
window looked at (newest first) and, for drift, the devices and features that
drifted in any firing window -- so a stored alert or decision shows *why*.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session

from server.alerts.conditions import (
    MAX_EVIDENCE_ITEMS,
    Verdict,
    Window,
    WindowedVerdict,
    WindowJudgement,
    evaluate_windows,
    judge_accuracy,
    judge_drift,
    judge_error_rate,
    judge_latency,
    judge_offline,
    recent_windows,
)
from server.alerts.rules import (
    AccuracyCondition,
    AnyCondition,
    DriftCondition,
    ErrorRateCondition,
    LatencyCondition,
    OfflineCondition,
    WindowedCondition,
)
from server.alerts.signals import (
    AccuracySource,
    devices_seen,
    drift_reference,
    scope_device_ids,
    versions_with_data,
    window_latency,
    window_scores,
    window_sla,
)
from server.artifacts import ArtifactStore
from server.keys import FleetKeys

__all__ = ["EvaluationContext", "Finding", "evaluate_condition", "scope_name", "subject_of"]


@dataclass(frozen=True)
class EvaluationContext:
    """What evaluations read besides the database."""

    store: ArtifactStore
    keys: FleetKeys | Callable[[], FleetKeys]
    """The fleet's keys, or how to read the current ones (a server follows its keys
    folder: a rotation must not leave the evaluator verifying with the old keyring)."""
    latency_sla_ms: Mapping[str, float] = field(default_factory=dict)
    """Profile name -> its p95 latency SLA (``firmware_images/<profile>/profile.toml``)."""
    accuracy_source: AccuracySource | None = None

    def current_keys(self) -> FleetKeys:
        return self.keys if isinstance(self.keys, FleetKeys) else self.keys()


@dataclass(frozen=True)
class Finding:
    """A condition's verdict for one subject."""

    subject: str
    model_version: int | None
    verdict: Verdict
    value: float | None
    threshold: float | None
    summary: str
    evidence: dict[str, Any]
    window_end: datetime | None
    """End of the newest window judged (None: no windows, an offline condition)."""


def scope_name(group: str | None) -> str:
    return "the fleet" if group is None else f"group {group}"


def subject_of(model_name: str | None, version: int | None, group: str | None) -> str:
    """``digits v3 in group canary``, ``digits v3 in the fleet``, ``group canary``."""
    if model_name is None:
        return scope_name(group)
    return f"{model_name} v{version} in {scope_name(group)}"


def _lookback(now: datetime, condition: WindowedCondition) -> Window:
    newest = recent_windows(
        now, window_hours=condition.window_hours, count=1, include_current=True
    )[0]
    return Window(newest.end - condition.lookback - timedelta(hours=1), newest.end)


def _drift_evidence(result: WindowedVerdict) -> dict[str, Any]:
    devices: dict[str, dict[str, Any]] = {}
    features: Counter[str] = Counter()
    for judgement in result.judgements:
        if judgement.verdict is not Verdict.FIRING:
            continue
        for row in judgement.evidence.get("devices", []):
            seen = devices.get(row["device_id"])
            if seen is None or (row["value"] or 0) > (seen["value"] or 0):
                devices[row["device_id"]] = row
        for row in judgement.evidence.get("features", []):
            features[row["feature"]] += row["devices"]
    ranked = sorted(devices.values(), key=lambda r: (-(r["value"] or 0), r["device_id"]))
    return {
        "devices": ranked[:MAX_EVIDENCE_ITEMS],
        "features": [name for name, _ in features.most_common(MAX_EVIDENCE_ITEMS)],
    }


def _finding(
    subject: str, version: int | None, result: WindowedVerdict, extra: dict[str, Any]
) -> Finding:
    deciding = result.deciding
    return Finding(
        subject=subject,
        model_version=version,
        verdict=result.verdict,
        value=None if deciding is None else deciding.value,
        threshold=None if deciding is None else deciding.threshold,
        summary="" if deciding is None else deciding.summary,
        evidence={"windows": [j.as_json() for j in result.judgements], **extra},
        window_end=None if not result.judgements else result.judgements[0].window.end,
    )


def _judge(
    session: Session,
    condition: WindowedCondition,
    *,
    model_name: str,
    version: int,
    group: str | None,
    device_ids: list[str] | None,
    context: EvaluationContext,
) -> Callable[[Window], WindowJudgement] | str:
    """How to judge one window of this version, or why it cannot be judged at all."""
    if isinstance(condition, DriftCondition):
        reference = drift_reference(
            session,
            store=context.store,
            keys=context.current_keys(),
            model_name=model_name,
            version=version,
        )
        if reference is None:
            return f"{model_name} v{version} carries no drift reference"
        in_scope = None if device_ids is None else len(device_ids)

        def drift(window: Window) -> WindowJudgement:
            scores = window_scores(
                session,
                reference=reference,
                model_name=model_name,
                model_version=version,
                device_ids=device_ids,
                window=window,
                metric=condition.metric,
            )
            return judge_drift(scores, condition, window, in_scope=in_scope)

        return drift
    if isinstance(condition, LatencyCondition):
        return lambda window: judge_latency(
            window_latency(
                session,
                model_name=model_name,
                model_version=version,
                device_ids=device_ids,
                window=window,
                sla_by_profile=context.latency_sla_ms,
            ),
            condition,
            window,
        )
    if isinstance(condition, ErrorRateCondition):

        def errors(window: Window) -> WindowJudgement:
            sums = window_sla(
                session,
                model_name=model_name,
                model_version=version,
                device_ids=device_ids,
                window=window,
            )
            return judge_error_rate(sums.inferences, sums.errors, condition, window)

        return errors
    if isinstance(condition, AccuracyCondition):
        source = context.accuracy_source
        if source is None:
            return "no source of labelled feedback is configured on this server"

        def accuracy(window: Window) -> WindowJudgement:
            correct, total = source(
                session,
                model_name=model_name,
                model_version=version,
                device_ids=device_ids,
                since=window.start,
                until=window.end,
            )
            return judge_accuracy(correct, total, condition, window)

        return accuracy
    raise TypeError(f"not a windowed condition: {condition!r}")


def evaluate_condition(
    session: Session,
    *,
    condition: AnyCondition,
    model_name: str | None,
    group: str | None,
    now: datetime,
    context: EvaluationContext,
) -> list[Finding]:
    """The condition's findings for every subject in the scope, now (see the module doc).

    Raises :class:`~server.errors.NotFoundError` for a group that no longer exists.
    """
    device_ids = scope_device_ids(session, group)
    if isinstance(condition, OfflineCondition):
        verdict, value, summary, evidence = judge_offline(
            devices_seen(session, device_ids), condition, now
        )
        threshold = float(condition.min_devices)
        return [
            Finding(scope_name(group), None, verdict, value, threshold, summary, evidence, None)
        ]
    if model_name is None:
        raise ValueError(f"a {condition.kind} condition needs a model")
    findings = []
    versions = versions_with_data(
        session, model_name=model_name, device_ids=device_ids, window=_lookback(now, condition)
    )
    for version in versions:
        subject = subject_of(model_name, version, group)
        judge = _judge(
            session,
            condition,
            model_name=model_name,
            version=version,
            group=group,
            device_ids=device_ids,
            context=context,
        )
        if isinstance(judge, str):
            findings.append(
                Finding(subject, version, Verdict.INSUFFICIENT, None, None, judge, {}, None)
            )
            continue
        result = evaluate_windows(now, condition, judge)
        extra = _drift_evidence(result) if isinstance(condition, DriftCondition) else {}
        findings.append(_finding(subject, version, result, extra))
    return findings
