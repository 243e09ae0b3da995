"""Captured samples over HTTP: what devices sent, and turning it into a dataset version.

``GET /samples`` summarises a model's captured rows over a scope and range: batches,
rows, devices, and how many rows have a feedback label, await one, or can never get
one (captured without a prediction id). ``POST /samples/dataset-versions`` adds the
labelled rows, with the model's training data, as a new version of the model's dataset
(201; 200 when the dataset already had exactly this content), with lineage naming the
devices and the range. Rows without a label are left out and counted; with no
labelled row at all the answer is 422 saying what is missing. An unknown model,
version, group or base dataset answers 404.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from pydantic import BaseModel, Field

from server.api.deps import ArtifactsDep, NowDep, SessionDep
from server.samples import service
from server.samples.service import SamplesSummary, SamplesVersion

__all__ = ["SamplesToDataset", "router"]

router = APIRouter(prefix="/samples", tags=["samples"])


class SamplesToDataset(BaseModel):
    """Which captured samples become a dataset version."""

    model: str = Field(min_length=1, max_length=128)
    version: str | None = Field(
        None, max_length=64, description="samples of this model version only; default: all"
    )
    group: str | None = Field(None, max_length=64, description="a group's accepted members now")
    devices: list[str] | None = Field(None, max_length=10_000, description="instead of a group")
    since: str = Field("7d", max_length=64, description="window ends from (30m, 24h, 7d, ISO)")
    until: str | None = Field(None, max_length=64, description="window ends until; default now")
    base: str | None = Field(
        None,
        max_length=200,
        description="NAME@VERSION whose rows the new version extends; default: the dataset "
        "version the model (its newest version sampled) was trained on",
    )
    split_seed: int = Field(0, ge=-(2**63), lt=2**63)


def _devices(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [part for value in values for part in value.split(",") if part.strip()]


@router.get("", response_model=SamplesSummary, summary="Captured samples of a model, by scope")
def get_samples(
    session: SessionDep,
    now: NowDep,
    model: Annotated[str, Query(min_length=1, max_length=128)],
    version: Annotated[str | None, Query(max_length=64)] = None,
    group: Annotated[str | None, Query(max_length=64)] = None,
    devices: Annotated[list[str] | None, Query()] = None,
    since: Annotated[str, Query(max_length=64)] = "7d",
    until: Annotated[str | None, Query(max_length=64)] = None,
) -> SamplesSummary:
    return service.samples_summary(
        session,
        model=model,
        version=version,
        group=group,
        devices=_devices(devices),
        since=since,
        until=until,
        now=now,
    )


@router.post(
    "/dataset-versions",
    response_model=SamplesVersion,
    status_code=status.HTTP_201_CREATED,
    summary="Add the labelled samples to the model's dataset as a new version, with lineage",
)
def add_dataset_version(
    body: SamplesToDataset,
    session: SessionDep,
    store: ArtifactsDep,
    now: NowDep,
    response: Response,
) -> SamplesVersion:
    result = service.add_samples_version(
        session,
        store=store,
        model=body.model,
        version=body.version,
        group=body.group,
        devices=_devices(body.devices),
        since=body.since,
        until=body.until,
        base=body.base,
        split_seed=body.split_seed,
        now=now,
    )
    if not result.created:
        response.status_code = status.HTTP_200_OK
    return result
