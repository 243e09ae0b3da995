"""Provisioning tokens (admin: ``tokens_router``) and ``POST /enroll`` (device: ``router``).

Answers: a new token 201 with its secret (shown once); ``/enroll`` 201 with the
device's credentials (shown once). Refusals: 401 unknown token, 403 a token that is
revoked / expired / used up / for another profile, 409 a device id that is already
registered, 422 bad facts (every problem named), 429 too many enrollments from one
address or with one token (``Retry-After`` says when to try again; the limits are in
the settings and per process). See :mod:`server.fleet.enrollment`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Depends, Request, status
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlmodel import Session

from server.api.deps import KeysDep, NowDep, ProfilesDep, SessionDep, SettingsDep
from server.auth import audit
from server.auth.deps import AdminDep, client_address, rate_limited
from server.auth.ratelimit import RateLimiter
from server.brokerconf.hooks import BrokerConfigDep
from server.fleet import enrollment
from server.fleet.models import DeviceGroup, DeviceStatus, ProvisioningToken, RuntimeFacts
from shared.topics import check_device_id

__all__ = [
    "EnrollRequest",
    "EnrollResponse",
    "MqttCredentials",
    "TokenCreate",
    "TokenCreated",
    "TokenPublic",
    "router",
    "tokens_router",
]

router = APIRouter(tags=["enrollment"])
tokens_router = APIRouter(tags=["enrollment"])  # admin only: server.app includes it so

DeviceId = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(check_device_id)]
ProfileName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


# ----------------------------------------------------------------------------- models


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("", max_length=128, description="what the token is for")
    group: str | None = Field(None, description="static group the devices join")
    profile: ProfileName | None = Field(None, description="the only profile it may enroll")
    expires_in_seconds: int = Field(
        24 * 3600, ge=60, le=365 * 24 * 3600, description="lifetime from now"
    )
    max_uses: int = Field(1, ge=1, le=enrollment.MAX_TOKEN_USES, description="devices it enrolls")
    auto_accept: bool = Field(False, description="devices are accepted at once, not pending")


class TokenPublic(BaseModel):
    id: str
    name: str
    group: str | None
    profile: str | None
    expires_at: datetime
    max_uses: int
    uses: int
    auto_accept: bool
    revoked: bool
    state: Literal["active", "revoked", "expired", "used_up"]
    created_at: datetime


class TokenCreated(TokenPublic):
    token: str = Field(description="give this to the devices; it is not shown again")


class EnrollRequest(BaseModel):
    """What a device says about itself, and the token that lets it in."""

    model_config = ConfigDict(extra="ignore")  # a newer agent may send more facts

    token: str = Field(max_length=256, description="efp.<id>.<secret>")
    device_id: DeviceId
    profile: ProfileName
    arch: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$", examples=["aarch64"])
    runtime: RuntimeFacts
    runtimes: dict[str, str] = Field(
        default_factory=dict, max_length=16, description="every runtime it has: name -> version"
    )
    agent_version: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
    tags: dict[str, str] = Field(default_factory=dict, description="e.g. {'site': 'berlin'}")


class MqttCredentials(BaseModel):
    username: str
    password: str = Field(description="shown once; the server keeps only a hash")
    client_id: str
    broker_url: str | None = Field(description="where to connect, when the server knows it")


class EnrollResponse(BaseModel):
    device_id: str
    status: DeviceStatus
    profile: str
    group: str | None
    credentials: MqttCredentials
    server_url: str
    root_public_key: str = Field(description="base64 Ed25519 key of the fleet's root")
    root_keyid: str
    message: str


# ----------------------------------------------------------------------------- views


def _token_public(session: Session, token: ProvisioningToken, now: datetime) -> TokenPublic:
    group = None if token.group_id is None else session.get(DeviceGroup, token.group_id)
    return TokenPublic(
        id=token.id,
        name=token.name,
        group=None if group is None else group.name,
        profile=token.profile,
        expires_at=token.expires_at,
        max_uses=token.max_uses,
        uses=token.uses,
        auto_accept=token.auto_accept,
        revoked=token.revoked,
        state=enrollment.token_state(token, now=now),
        created_at=token.created_at,
    )


def _without_credentials(url: str) -> str:
    """The server's own broker URL minus any user:password in it (never handed to devices)."""
    parsed = urlsplit(url)
    if parsed.username is None and parsed.password is None:
        return url
    host = parsed.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parsed.port is not None:
        netloc += f":{parsed.port}"
    return urlunsplit(parsed._replace(netloc=netloc))


# ----------------------------------------------------------------------------- routes


@tokens_router.post(
    "/provisioning-tokens",
    response_model=TokenCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Create a provisioning token (its secret is shown once)",
)
def create_token(
    body: TokenCreate, session: SessionDep, now: NowDep, profiles: ProfilesDep, admin: AdminDep
) -> TokenCreated:
    issued = enrollment.create_token(
        session,
        now=now,
        expires_in=timedelta(seconds=body.expires_in_seconds),
        name=body.name,
        group=body.group,
        profile=body.profile,
        max_uses=body.max_uses,
        auto_accept=body.auto_accept,
        known_profiles=set(profiles),
    )
    audit.record(
        session,
        actor=admin.name,
        action="provisioning_token.create",
        target=f"provisioning_token:{issued.record.id}",
        detail=body.model_dump(),
        at=now,
    )
    session.commit()
    public = _token_public(session, issued.record, now)
    return TokenCreated(**public.model_dump(), token=issued.token)


@tokens_router.get(
    "/provisioning-tokens",
    response_model=list[TokenPublic],
    summary="List provisioning tokens (never their secrets)",
)
def list_tokens(session: SessionDep, now: NowDep) -> list[TokenPublic]:
    return [_token_public(session, t, now) for t in enrollment.list_tokens(session)]


@tokens_router.get(
    "/provisioning-tokens/{token_id}", response_model=TokenPublic, summary="One token"
)
def show_token(token_id: str, session: SessionDep, now: NowDep) -> TokenPublic:
    return _token_public(session, enrollment.get_token(session, token_id=token_id), now)


@tokens_router.post(
    "/provisioning-tokens/{token_id}/revoke",
    response_model=TokenPublic,
    summary="Revoke a token; devices it enrolled keep their credentials",
)
def revoke_token(token_id: str, session: SessionDep, now: NowDep, admin: AdminDep) -> TokenPublic:
    token = enrollment.revoke_token(session, token_id=token_id)
    audit.record(
        session,
        actor=admin.name,
        action="provisioning_token.revoke",
        target=f"provisioning_token:{token_id}",
        at=now,
    )
    session.commit()
    return _token_public(session, token, now)


def _limit_by_address(request: Request) -> None:
    limiter: RateLimiter = request.app.state.enroll_by_address
    wait = limiter.hit(client_address(request))
    if wait is not None:
        raise rate_limited(wait, "enrollments from this address")


def _token_key(token: str) -> str:
    """The token's id (``efp.<id>.<secret>``): the secret is never kept, even in memory."""
    parts = token.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "efp" else "(malformed)"


@router.post(
    "/enroll",
    response_model=EnrollResponse,
    status_code=status.HTTP_201_CREATED,
    summary="A device registers with a provisioning token and gets its credentials (once)",
    responses={
        401: {"description": "unknown provisioning token"},
        403: {"description": "token revoked, expired, used up, or for another profile"},
        409: {"description": "this device id is already registered"},
        422: {"description": "invalid facts (each problem named)"},
        429: {"description": "too many enrollments from this address or with this token"},
    },
    dependencies=[Depends(_limit_by_address)],
)
def enroll(
    body: EnrollRequest,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    keys: KeysDep,
    now: NowDep,
    profiles: ProfilesDep,
    broker_config: BrokerConfigDep,
) -> EnrollResponse:
    by_token: RateLimiter = request.app.state.enroll_by_token
    wait = by_token.hit(_token_key(body.token))
    if wait is not None:
        raise rate_limited(wait, "enrollments with this provisioning token")
    result = enrollment.enroll(
        session,
        token=body.token,
        facts=enrollment.DeviceFacts(
            device_id=body.device_id,
            profile=body.profile,
            arch=body.arch,
            runtime_name=body.runtime.name,
            runtime_version=body.runtime.version,
            agent_version=body.agent_version,
            runtimes=body.runtimes,
            tags=body.tags,
        ),
        now=now,
        profiles=profiles,
    )
    session.commit()
    device = result.device
    if broker_config is not None and device.status == DeviceStatus.ACCEPTED:
        broker_config.credentials_changed()  # a pending device gets no broker login yet
    broker_url = settings.device_broker_url or (
        None if settings.broker_url == "embedded" else _without_credentials(settings.broker_url)
    )
    accepted = device.status == DeviceStatus.ACCEPTED
    return EnrollResponse(
        device_id=device.id,
        status=DeviceStatus(device.status),
        profile=device.profile,
        group=result.group,
        credentials=MqttCredentials(
            username=result.username,
            password=result.password,
            client_id=device.id,
            broker_url=broker_url,
        ),
        server_url=str(request.base_url).rstrip("/"),
        root_public_key=keys.root_public.to_base64(),
        root_keyid=keys.root_public.keyid,
        message=(
            f"device {device.id} is enrolled and accepted"
            if accepted
            else f"device {device.id} is enrolled and pending until an operator accepts it"
        ),
    )
