"""Operator access to the API: bearer tokens with roles, the audit log, rate limits, and the
settings that refuse development secrets in prod mode.

Everything runs through the real app (SQLite, and PostgreSQL when
``EDGEFLEET_TEST_DATABASE_URL`` is set) and the real ``edgefleet operators`` command; the
only fake is the clock, moved to expire tokens and to refill rate-limit buckets.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import text
from sqlmodel import Session, select
from typer.testing import CliRunner

from server.app import create_app
from server.auth.models import AuditEntry, OperatorToken, Role
from server.auth.ratelimit import RateLimiter
from server.auth.tokens import TOKEN_PREFIX, read_admin_token
from server.cli import app as edgefleet
from server.errors import ConfigurationError
from server.retraining.models import RetrainingDecisionRecord
from server.settings import DEV_BROKER_PASSWORD, DEV_SECRET, Settings
from tests.conftest import admin_token, operator_client
from tests.server.conftest import db_url, external_schema  # noqa: F401 (fixtures)
from tests.server.fleet.conftest import enroll_body
from tests.server.rollouts.harness import Clock, register_version

pytestmark = pytest.mark.database

runner = CliRunner()
MODEL = "digits"


class Api:
    """The app, a client without a token, and the tokens of one operator per role."""

    def __init__(self, app: Any, client: TestClient, clock: Clock) -> None:
        self.app = app
        self.client = client
        self.clock = clock
        self.admin = admin_token(app.state.settings)
        self.tokens: dict[str, str] = {"admin": self.admin}

    def as_(self, role_or_token: str) -> dict[str, str]:
        token = self.tokens.get(role_or_token, role_or_token)
        return {"Authorization": f"Bearer {token}"}

    def call(
        self, method: str, path: str, expect: int = 200, *, who: str = "admin", **kwargs: Any
    ) -> Any:
        response = self.client.request(method, f"/api/v1{path}", headers=self.as_(who), **kwargs)
        assert response.status_code == expect, f"{method} {path}: {response.text}"
        return None if response.status_code == 204 else response.json()

    def create(self, name: str, role: str, **body: Any) -> dict[str, Any]:
        created: dict[str, Any] = self.call(
            "POST", "/operators", 201, json={"name": name, "role": role, **body}
        )
        return created

    def audit(self, **params: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.call("GET", "/audit", params=params)
        return found


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[Api]:  # noqa: F811
    clock = Clock()
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        run_jobs=False,
        auth_failures_per_minute=5,
        enroll_per_minute_per_address=6,
        enroll_per_minute_per_token=4,
    )
    app = create_app(settings, clock=clock)
    with TestClient(app) as client:
        api = Api(app, client, clock)
        for role in ("viewer", "operator"):
            api.tokens[role] = api.create(f"a-{role}", role)["token"]
        yield api


# ----------------------------------------------------------------------------- roles

# (method, path, body, the least role that may): one of each kind of route.
ROUTES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("GET", "/datasets", None, "viewer"),
    ("GET", "/devices", None, "viewer"),
    ("GET", "/rollouts", None, "viewer"),
    ("GET", "/auth/me", None, "viewer"),
    ("POST", "/groups", {"name": "g-{role}"}, "operator"),
    ("POST", "/alert-rules", {"name": ""}, "operator"),  # allowed: 422, refused: 401/403
    ("GET", "/operators", None, "admin"),
    ("GET", "/audit", None, "admin"),
    ("GET", "/provisioning-tokens", None, "admin"),
    ("POST", "/provisioning-tokens", {}, "admin"),
    ("POST", "/operators", {"name": "made-by-{role}", "role": "viewer"}, "admin"),
]
RANK = {"viewer": 0, "operator": 1, "admin": 2}


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
def test_each_role_against_each_kind_of_route(api: Api, role: str) -> None:
    for method, path, body, needed in ROUTES:
        payload = None if body is None else json.loads(json.dumps(body).replace("{role}", role))
        response = api.client.request(method, f"/api/v1{path}", headers=api.as_(role), json=payload)
        if RANK[role] >= RANK[needed]:
            assert response.status_code in (200, 201, 422), (method, path, response.text)
        else:
            assert response.status_code == 403, (method, path, response.text)
            detail = response.json()["detail"]
            assert f"needs the {needed} role" in detail, detail
            assert f"'a-{role}' has the {role} role" in detail, detail


def test_me_names_the_token_and_its_role(api: Api) -> None:
    assert api.call("GET", "/auth/me") == {"name": "admin", "role": "admin"}
    assert api.call("GET", "/auth/me", who="viewer") == {"name": "a-viewer", "role": "viewer"}
    assert api.call("GET", "/auth/me", who="operator") == {
        "name": "a-operator",
        "role": "operator",
    }


def test_device_and_public_routes_need_no_operator_token(api: Api) -> None:
    assert api.client.get("/api/v1/health").status_code == 200
    assert api.client.get("/api/v1/keyring").status_code == 200
    assert api.client.get("/api/v1/openapi.json").status_code == 200
    token = api.call("POST", "/provisioning-tokens", 201, json={"auto_accept": True})["token"]
    enrolled = api.client.post("/api/v1/enroll", json=enroll_body(token, "dev-1"))
    assert enrolled.status_code == 201, enrolled.text
    password = enrolled.json()["credentials"]["password"]
    # Artifact delivery takes the device's credentials, never an operator token.
    artifact = f"/api/v1/devices/dev-1/artifacts/{'a' * 64}"
    assert api.client.get(artifact, headers=api.as_("admin")).status_code == 401
    # (its credentials are good: 403, as no signed desired state names that artifact)
    assert api.client.get(artifact, auth=("dev-1", password)).status_code == 403
    # ... and a device's password opens no operator route.
    assert api.client.get("/api/v1/devices", auth=("dev-1", password)).status_code == 401


# ----------------------------------------------------------------------------- 401s


def test_missing_malformed_and_unknown_tokens_are_401_with_a_challenge(api: Api) -> None:
    cases = {
        None: "missing bearer token",
        "Basic dXNlcjpwYXNz": "must be 'Bearer <token>'",
        "Bearer": "must be 'Bearer <token>'",
        f"Bearer {TOKEN_PREFIX}not-a-token": "invalid, expired or revoked token",
        "Bearer " + "x" * 5000: "invalid, expired or revoked token",
    }
    for header, message in cases.items():
        headers = {} if header is None else {"Authorization": header}
        response = api.client.get("/api/v1/devices", headers=headers)
        assert response.status_code == 401, header
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert message in response.json()["detail"], (header, response.json())


def test_a_revoked_token_fails_from_the_next_request_on(api: Api) -> None:
    token = api.create("leaving", "operator")["token"]
    assert api.call("GET", "/auth/me", who=token)["name"] == "leaving"
    revoked = api.call("POST", "/operators/leaving/revoke")
    assert revoked["state"] == "revoked" and revoked["revoked_at"] is not None
    response = api.client.get("/api/v1/auth/me", headers=api.as_(token))
    assert response.status_code == 401
    assert response.json()["detail"] == "invalid, expired or revoked token"
    assert api.client.post("/api/v1/operators/nobody/revoke", headers=api.as_("admin")).json()[
        "detail"
    ] == ("no operator token named 'nobody'")


def test_a_token_expires(api: Api) -> None:
    token = api.create("temp", "viewer", expires_days=1)["token"]
    assert api.call("GET", "/auth/me", who=token)["name"] == "temp"
    api.clock.advance(days=1, seconds=1)
    assert api.client.get("/api/v1/auth/me", headers=api.as_(token)).status_code == 401
    listed = {t["name"]: t for t in api.call("GET", "/operators")}
    assert listed["temp"]["state"] == "expired" and listed["a-viewer"]["state"] == "active"


def test_bad_operator_requests_name_the_problem(api: Api) -> None:
    for body, message in (
        ({"name": "admin", "role": "viewer"}, "not 'admin'"),
        ({"name": "has space", "role": "viewer"}, "must be 1-64 letters"),
        ({"name": "x", "role": "root"}, "role"),
        ({"name": "x", "role": "viewer", "expires_days": 0}, "expires_days"),
    ):
        response = api.client.post("/api/v1/operators", headers=api.as_("admin"), json=body)
        assert response.status_code == 422, body
        assert message in json.dumps(response.json()), (body, response.json())
    again = api.client.post(
        "/api/v1/operators", headers=api.as_("admin"), json={"name": "a-viewer", "role": "admin"}
    )
    assert again.status_code == 409 and "exists already" in again.json()["detail"]


# ----------------------------------------------------------------------------- storage


def test_tokens_are_stored_hashed_and_shown_once(api: Api) -> None:
    created = api.create("scripted", "operator")
    token = created["token"]
    assert token.startswith(TOKEN_PREFIX) and len(token) >= len(TOKEN_PREFIX) + 43
    assert "token" not in api.call("GET", "/operators/scripted")
    assert all("token" not in t for t in api.call("GET", "/operators"))
    with Session(api.app.state.engine) as session:
        row = session.exec(select(OperatorToken).where(OperatorToken.name == "scripted")).one()
        assert row.token_hash == hashlib.sha256(token.encode()).hexdigest()
        # The secret is in no column of any table.
        for table in ("operator_tokens", "audit_log"):
            for record in session.connection().execute(text(f"SELECT * FROM {table}")):  # noqa: S608
                assert all(token not in str(value) for value in record), table
    database = api.app.state.settings.resolved_database_url
    if database.startswith("sqlite:///"):
        raw = b"".join(p.read_bytes() for p in Path(database[10:]).parent.glob("*.db*"))
        assert token.encode() not in raw


def test_the_dev_admin_token_file_is_private_and_kept(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", run_jobs=False)
    with TestClient(create_app(settings)):
        pass
    path = settings.data_dir / "admin-token"
    first = read_admin_token(settings.data_dir)
    assert first is not None and first.startswith(TOKEN_PREFIX)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with operator_client(create_app(settings)) as client:  # a restart keeps it
        assert client.get("/api/v1/auth/me").json() == {"name": "admin", "role": "admin"}
    assert read_admin_token(settings.data_dir) == first


def test_an_admin_token_from_the_environment_replaces_the_dev_file(tmp_path: Path) -> None:
    chosen = TOKEN_PREFIX + "z" * 40
    settings = Settings(data_dir=tmp_path / "data", run_jobs=False, admin_token=chosen)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as client:
        me = client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {chosen}"})
        assert me.json() == {"name": "admin", "role": "admin"}
    assert not (settings.data_dir / "admin-token").exists()


# ----------------------------------------------------------------------------- the CLI


def test_operators_commands_work_on_the_database(api: Api, db_url: str) -> None:  # noqa: F811
    where = ["--db", db_url]
    created = runner.invoke(
        edgefleet, ["operators", "create", "ci-bot", "--role", "operator", *where]
    )
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()  # only the token on stdout
    assert token.startswith(TOKEN_PREFIX) and "\n" not in token
    assert api.call("GET", "/auth/me", who=token) == {"name": "ci-bot", "role": "operator"}

    listed = runner.invoke(edgefleet, ["operators", "list", "--json", *where])
    assert listed.exit_code == 0, listed.output
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["ci-bot"]["role"] == "operator" and rows["ci-bot"]["state"] == "active"
    assert token not in listed.stdout

    expiring = runner.invoke(
        edgefleet,
        [
            "operators",
            "create",
            "short",
            "--role",
            "viewer",
            "--expires-days",
            "2",
            "--json",
            *where,
        ],
    )
    assert expiring.exit_code == 0, expiring.output
    assert json.loads(expiring.stdout)["expires_at"] is not None

    revoked = runner.invoke(edgefleet, ["operators", "revoke", "ci-bot", *where])
    assert revoked.exit_code == 0 and "ci-bot: revoked" in revoked.stdout
    assert api.client.get("/api/v1/auth/me", headers=api.as_(token)).status_code == 401

    unknown = runner.invoke(edgefleet, ["operators", "revoke", "nobody", *where])
    assert unknown.exit_code == 1 and "no operator token named 'nobody'" in unknown.output
    bad_role = runner.invoke(edgefleet, ["operators", "create", "x", "--role", "root", *where])
    assert bad_role.exit_code == 2
    entries = api.audit(action="operator.")
    assert [(e["action"], e["target"]) for e in entries[:3]] == [
        ("operator.revoke", "operator:ci-bot"),
        ("operator.create", "operator:short"),
        ("operator.create", "operator:ci-bot"),
    ]
    assert all(e["actor"].startswith("local:") for e in entries[:3])


# ----------------------------------------------------------------------------- audit


def test_every_audited_action_writes_who_what_when_and_to_what(api: Api) -> None:
    start = api.clock()
    call = api.call
    token = call("POST", "/provisioning-tokens", 201, json={"name": "line", "max_uses": 5})
    for device_id in ("d1", "d2", "d3", "d4"):
        body = enroll_body(token["token"], device_id)
        assert api.client.post("/api/v1/enroll", json=body).status_code == 201
    call("POST", f"/provisioning-tokens/{token['id']}/revoke")
    call("POST", "/devices/d1/accept", who="operator")
    call("POST", "/devices/d2/accept", who="operator")
    call("POST", "/devices/d3/reject", who="operator")
    call("POST", "/devices/d2/revoke", who="operator")
    call("DELETE", "/devices/d3", 204, who="operator")
    with Session(api.app.state.engine) as session:
        register_version(session)
        decision = RetrainingDecisionRecord(
            policy_name="p",
            model_name=MODEL,
            model_version=1,
            group_name="line",
            window_end=start,
            status="pending_approval",
            created_at=start,
            updated_at=start,
        )
        session.add(decision)
        session.commit()
        decision_id = decision.id
    call("PUT", f"/models/{MODEL}/aliases/production", json={"version": "1"}, who="operator")
    call("POST", "/groups", 201, json={"name": "line"})
    call("POST", "/groups/line/members", json={"device_ids": ["d1"]})
    rollout = call(
        "POST",
        "/rollouts",
        201,
        json={"model": MODEL, "version": 1, "group": "line"},
        who="operator",
    )
    rid = rollout["id"]
    call("POST", f"/rollouts/{rid}/pause", json={"reason": "lunch"}, who="operator")
    call("POST", f"/rollouts/{rid}/resume", who="operator")
    call("POST", f"/rollouts/{rid}/abort", json={"reason": "bad"}, who="operator")
    call("PUT", f"/devices/d1/pins/{MODEL}", json={"version": 1, "note": "hold"}, who="operator")
    call("DELETE", f"/devices/d1/pins/{MODEL}", 204, who="operator")
    call("POST", f"/retraining/decisions/{decision_id}/reject", json={"note": "no"})
    refused = api.client.post("/api/v1/devices/d4/accept", headers=api.as_("viewer"))
    assert refused.status_code == 403  # a refused action leaves no record

    entries = list(reversed(api.audit(since=start.isoformat(), limit=1000)))
    got = [(e["actor"], e["action"], e["target"]) for e in entries]
    assert got == [
        ("admin", "provisioning_token.create", f"provisioning_token:{token['id']}"),
        ("admin", "provisioning_token.revoke", f"provisioning_token:{token['id']}"),
        ("a-operator", "device.accept", "device:d1"),
        ("a-operator", "device.accept", "device:d2"),
        ("a-operator", "device.reject", "device:d3"),
        ("a-operator", "device.revoke", "device:d2"),
        ("a-operator", "device.delete", "device:d3"),
        ("a-operator", "model.promote", f"model:{MODEL}"),
        ("a-operator", "rollout.create", f"rollout:{rid}"),
        ("a-operator", "rollout.pause", f"rollout:{rid}"),
        ("a-operator", "rollout.resume", f"rollout:{rid}"),
        ("a-operator", "rollout.abort", f"rollout:{rid}"),
        ("a-operator", "pin.set", "device:d1"),
        ("a-operator", "pin.clear", "device:d1"),
        ("admin", "retraining.reject", f"retraining_decision:{decision_id}"),
    ]
    details = {e["action"]: json.loads(e["detail"] or "{}") for e in entries}
    assert details["device.revoke"] == {"from": "accepted", "to": "revoked"}
    assert details["model.promote"]["alias"] == "production"
    assert details["rollout.pause"] == {"reason": "lunch"}
    assert details["pin.set"] == {"model": MODEL, "version": 1, "note": "hold"}
    assert "token" not in details["provisioning_token.create"]
    assert all(datetime.fromisoformat(e["at"]) >= start for e in entries)
    # filters, and the CLI
    assert {e["action"] for e in api.audit(action="rollout.")} == {
        "rollout.create",
        "rollout.pause",
        "rollout.resume",
        "rollout.abort",
    }
    assert [e["target"] for e in api.audit(actor="a-operator", action="pin.set")] == ["device:d1"]
    assert api.client.get("/api/v1/audit", headers=api.as_("operator")).status_code == 403


def test_the_audit_command_and_where_the_cli_finds_its_token(
    api: Api, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api.create("someone", "viewer")
    from tests.server.fleet.conftest import serve

    with serve(api.app) as url:
        # No token anywhere: refused, with a hint.
        monkeypatch.delenv("EDGEFLEET_TOKEN", raising=False)
        monkeypatch.setenv("EDGEFLEET_DATA_DIR", str(tmp_path / "elsewhere"))
        anonymous = runner.invoke(edgefleet, ["audit", "--server", url])
        assert anonymous.exit_code == 1 and "HTTP 401" in anonymous.output
        assert "EDGEFLEET_TOKEN" in anonymous.output
        # The dev server's admin-token file in EDGEFLEET_DATA_DIR ...
        monkeypatch.setenv("EDGEFLEET_DATA_DIR", str(api.app.state.settings.data_dir))
        shown = runner.invoke(
            edgefleet, ["audit", "--json", "--action", "operator.create", "--server", url]
        )
        assert shown.exit_code == 0, shown.output
        assert [e["target"] for e in json.loads(shown.stdout)][:1] == ["operator:someone"]
        table = runner.invoke(edgefleet, ["audit", "--server", url], env={"COLUMNS": "200"})
        assert table.exit_code == 0 and "operator.create" in table.stdout
        # ... and EDGEFLEET_TOKEN, which comes first.
        monkeypatch.setenv("EDGEFLEET_TOKEN", api.tokens["viewer"])
        refused = runner.invoke(edgefleet, ["audit", "--server", url])
        assert refused.exit_code == 1 and "needs the admin role" in refused.output


def test_audit_record_is_in_the_callers_transaction(api: Api) -> None:
    from server.auth import audit

    engine = api.app.state.engine
    with Session(engine) as session:
        audit.record(session, actor="local:keys", action="key.rotate", target="key:abc")
        session.rollback()  # the action failed: no record either
        audit.record(
            session, actor="x" * 100, action="key.rotate", target="key:def", detail={"n": 1}
        )
        session.commit()
    with Session(engine) as session:
        rows = session.exec(select(AuditEntry).where(AuditEntry.action == "key.rotate")).all()
    assert [(r.actor, r.target, r.detail) for r in rows] == [("x" * 64, "key:def", '{"n":1}')]


# ----------------------------------------------------------------------------- rate limits


def test_failed_token_attempts_from_one_address_get_429_then_recover(api: Api) -> None:
    bad = {"Authorization": f"Bearer {TOKEN_PREFIX}guess"}
    codes = [api.client.get("/api/v1/devices", headers=bad).status_code for _ in range(5)]
    assert codes == [401] * 5
    blocked = api.client.get("/api/v1/devices", headers=bad)
    assert blocked.status_code == 429
    assert int(blocked.headers["retry-after"]) >= 1
    assert "too many failed token attempts" in blocked.json()["detail"]
    # While blocked, even a good token from there waits (no oracle for a guesser) ...
    assert api.client.get("/api/v1/devices", headers=api.as_("admin")).status_code == 429
    # ... and a request with no token at all is still told to authenticate.
    assert api.client.get("/api/v1/devices").status_code == 401


def test_enrollment_is_limited_per_address_and_per_token(api: Api) -> None:
    first, second = (
        api.call("POST", "/provisioning-tokens", 201, json={"max_uses": 10})["token"]
        for _ in range(2)
    )
    responses = [
        api.client.post("/api/v1/enroll", json=enroll_body(first, f"t-{i}")) for i in range(5)
    ]
    assert [r.status_code for r in responses] == [201, 201, 201, 201, 429]  # per token: 4/min
    refused = responses[-1]
    assert "with this provisioning token" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    # Another token still enrolls, until the address has used its 6 a minute ...
    assert api.client.post("/api/v1/enroll", json=enroll_body(second, "u-0")).status_code == 201
    # ... and past that, every attempt from there is refused, bad bodies too.
    garbage = api.client.post("/api/v1/enroll", json={"token": "nope"})
    assert garbage.status_code == 429
    assert "from this address" in garbage.json()["detail"]
    assert int(garbage.headers["retry-after"]) >= 1


def test_the_token_bucket_refills_with_the_clock() -> None:
    now = [0.0]
    limiter = RateLimiter(3, period=60.0, clock=lambda: now[0], max_keys=2)
    assert [limiter.hit("a") for _ in range(3)] == [None, None, None]
    assert limiter.hit("a") == 20  # one attempt refills every 20 s
    now[0] = 19.5
    assert limiter.retry_after("a") == 1
    now[0] = 20.0
    assert limiter.retry_after("a") is None and limiter.hit("a") is None
    assert limiter.hit("a") == 20
    # bounded memory: full buckets go first, then the least recently used
    limiter.hit("b")
    limiter.hit("c")
    assert len(limiter._buckets) == 2 and "a" not in limiter._buckets
    with pytest.raises(ValueError, match="capacity"):
        RateLimiter(0)


# ----------------------------------------------------------------------------- settings


def test_prod_settings_refuse_development_and_weak_admin_tokens() -> None:
    prod: dict[str, Any] = {"mode": "prod", "secret_key": "k" * 40}
    for token, message in (
        (DEV_SECRET, "built-in development value"),
        (DEV_BROKER_PASSWORD, "built-in development value"),
        ("short-token", "at least 32 characters"),
        ("k" * 40, "must differ from EDGEFLEET_SECRET_KEY"),
    ):
        with pytest.raises(ValidationError, match=message):
            Settings(**prod, admin_token=token)
    assert Settings(**prod, admin_token=TOKEN_PREFIX + "a" * 43).admin_token is not None
    assert Settings(**prod).admin_token is None  # no bootstrap token: operators create makes one
    assert Settings(mode="dev", admin_token="short").admin_token is not None  # dev allows it
    with pytest.raises(ValidationError, match="EDGEFLEET_SECRET_KEY is the built-in"):
        Settings(mode="prod")


def test_prod_refuses_the_dev_token_file_as_its_admin_token(tmp_path: Path) -> None:
    dev = Settings(data_dir=tmp_path / "data", run_jobs=False)
    with TestClient(create_app(dev)):
        pass
    carried_over = read_admin_token(dev.data_dir)
    prod = Settings(
        mode="prod",
        secret_key="k" * 40,  # type: ignore[arg-type]
        data_dir=dev.data_dir,
        run_jobs=False,
        admin_token=carried_over,  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigurationError, match="development token"), TestClient(create_app(prod)):
        pass


def test_roles_are_ordered() -> None:
    assert Role.ADMIN.allows(Role.OPERATOR) and Role.OPERATOR.allows(Role.VIEWER)
    assert not Role.VIEWER.allows(Role.OPERATOR) and not Role.OPERATOR.allows(Role.ADMIN)
