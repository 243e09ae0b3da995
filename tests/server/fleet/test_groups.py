"""Groups on a real database: dynamic membership that follows enrollments, acceptance and
tag changes at once; static members; maintenance windows; and the inventory filters."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlmodel import Session

from server.errors import InvalidInputError
from server.fleet.groups import (
    get_group,
    group_device_ids,
    members,
    parse_maintenance_window,
)
from server.fleet.models import Device, DeviceGroup
from tests.server.fleet.conftest import OTHER_PROFILE, Fleet

pytestmark = pytest.mark.database


def member_ids(fleet: Fleet, name: str) -> list[str]:
    """What the rollout engine asks on each tick."""
    with Session(fleet.app.state.engine) as session:
        return group_device_ids(session, get_group(session, name=name))


def test_a_dynamic_group_follows_late_joiners_acceptance_and_tag_changes(fleet: Fleet) -> None:
    created = fleet.client.post(
        "/api/v1/groups",
        json={
            "name": "berlin-arm",
            "selector": f"profile={OTHER_PROFILE} and site=berlin",
            "maintenance_window": "22:00-02:00",
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["kind"] == "dynamic"
    assert created.json()["maintenance_window"] == "22:00-02:00"
    arm = {"profile": OTHER_PROFILE, "arch": "aarch64"}
    fleet.enrolled("arm-berlin", tags={"site": "berlin"}, **arm)
    fleet.enrolled("arm-paris", tags={"site": "paris"}, **arm)
    fleet.enrolled("x86-berlin", tags={"site": "berlin"})
    assert member_ids(fleet, "berlin-arm") == ["arm-berlin"]

    # A late joiner: pending is not a member, accepted is -- with no step in between.
    fleet.enrolled("arm-late", accept=False, tags={"site": "berlin"}, **arm)
    assert member_ids(fleet, "berlin-arm") == ["arm-berlin"]
    shown = fleet.client.get("/api/v1/groups/berlin-arm").json()
    assert shown["unaccepted_matches"] == ["arm-late"] and shown["member_count"] == 1
    assert fleet.client.post("/api/v1/devices/arm-late/accept").status_code == 200
    assert member_ids(fleet, "berlin-arm") == ["arm-berlin", "arm-late"]

    # Tag changes move devices in and out at once.
    moved = fleet.client.patch("/api/v1/devices/arm-paris/tags", json={"set": {"site": "berlin"}})
    assert moved.status_code == 200 and moved.json()["groups"] == ["berlin-arm"]
    left = fleet.client.patch("/api/v1/devices/arm-berlin/tags", json={"remove": ["site"]})
    assert left.status_code == 200 and left.json()["tags"] == {} and left.json()["groups"] == []
    assert member_ids(fleet, "berlin-arm") == ["arm-late", "arm-paris"]

    # Revoked devices leave; the selector can change.
    fleet.client.post("/api/v1/devices/arm-late/revoke")
    assert member_ids(fleet, "berlin-arm") == ["arm-paris"]
    changed = fleet.client.patch("/api/v1/groups/berlin-arm", json={"selector": "site=berlin"})
    assert changed.status_code == 200
    assert changed.json()["members"] == ["arm-paris", "x86-berlin"]
    assert changed.json()["maintenance_window"] == "22:00-02:00"  # untouched
    cleared = fleet.client.patch("/api/v1/groups/berlin-arm", json={"maintenance_window": None})
    assert cleared.json()["maintenance_window"] is None
    listed = fleet.client.get("/api/v1/groups").json()
    assert [(g["name"], g["member_count"]) for g in listed] == [("berlin-arm", 2)]


def test_static_groups_hold_explicit_members_all_or_none(fleet: Fleet) -> None:
    fleet.enrolled("a")
    fleet.enrolled("b")
    fleet.enrolled("p", accept=False)
    assert fleet.client.post("/api/v1/groups", json={"name": "canary"}).json()["kind"] == "static"
    added = fleet.client.post("/api/v1/groups/canary/members", json={"device_ids": ["a", "p"]})
    assert added.status_code == 200
    assert added.json()["members"] == ["a"] and added.json()["unaccepted_matches"] == ["p"]
    unknown = fleet.client.post("/api/v1/groups/canary/members", json={"device_ids": ["b", "zz"]})
    assert unknown.status_code == 404 and "zz" in unknown.json()["detail"]
    assert member_ids(fleet, "canary") == ["a"]  # b was not added either
    again = fleet.client.post("/api/v1/groups/canary/members", json={"device_ids": ["a", "b"]})
    assert again.json()["members"] == ["a", "b"]
    not_member = fleet.client.post(
        "/api/v1/groups/canary/members/remove", json={"device_ids": ["b", "zz"]}
    )
    assert not_member.status_code == 404 and member_ids(fleet, "canary") == ["a", "b"]
    removed = fleet.client.post("/api/v1/groups/canary/members/remove", json={"device_ids": ["a"]})
    assert removed.json()["members"] == ["b"]
    assert fleet.device("b")["groups"] == ["canary"]

    fleet.client.post("/api/v1/groups", json={"name": "dyn", "selector": "site=x"})
    refused = fleet.client.post("/api/v1/groups/dyn/members", json={"device_ids": ["a"]})
    assert refused.status_code == 409 and "dynamic" in refused.json()["detail"]
    no_selector = fleet.client.patch("/api/v1/groups/canary", json={"selector": "site=x"})
    assert no_selector.status_code == 409
    taken = fleet.client.post("/api/v1/groups", json={"name": "canary"})
    assert taken.status_code == 409
    bad = fleet.client.post("/api/v1/groups", json={"name": "x", "selector": "site=(berlin"})
    assert bad.status_code == 422 and "at position 5" in bad.json()["detail"]
    assert fleet.client.post("/api/v1/groups", json={"name": "bad name"}).status_code == 422
    assert fleet.client.delete("/api/v1/groups/canary").status_code == 204
    assert fleet.client.get("/api/v1/groups/canary").status_code == 404
    assert fleet.device("b")["groups"] == []


def test_members_is_a_pure_function_of_group_and_devices() -> None:
    def device(device_id: str, status: str, **tags: str) -> Device:
        d = Device(
            id=device_id,
            status=status,
            profile="p",
            arch="x86_64",
            runtime_name="litert",
            runtime_version="2.3.0",
            agent_version="0.1.0",
        )
        d.tags = tags
        return d

    fleet = [
        device("c", "accepted", site="berlin"),
        device("a", "accepted", site="berlin"),
        device("b", "pending", site="berlin"),
        device("d", "accepted", site="paris"),
    ]
    dynamic = DeviceGroup(name="g", kind="dynamic", selector="site=berlin")
    assert [d.id for d in members(dynamic, fleet)] == ["a", "c"]
    assert [d.id for d in members(dynamic, fleet, include_unaccepted=True)] == ["a", "b", "c"]
    static = DeviceGroup(name="s", kind="static")
    assert [d.id for d in members(static, fleet, static_member_ids={"d", "b"})] == ["d"]
    assert members(static, fleet) == []


def test_maintenance_windows() -> None:
    night = parse_maintenance_window("22:00-02:00")
    assert str(night) == "22:00-02:00"
    at = lambda h, m: datetime(2026, 11, 30, h, m, tzinfo=UTC)  # noqa: E731
    assert night.contains(at(23, 0)) and night.contains(at(1, 59)) and night.contains(at(22, 0))
    assert not night.contains(at(2, 0)) and not night.contains(at(12, 0))
    day = parse_maintenance_window("02:00-04:30")
    assert day.contains(at(4, 29)) and not day.contains(at(4, 30)) and not day.contains(at(1, 0))
    for bad, problem in [
        ("2-4", "HH:MM-HH:MM"),
        ("25:00-02:00", "hours are 00-23"),
        ("02:00-02:00", "would be empty"),
    ]:
        with pytest.raises(InvalidInputError, match=problem):
            parse_maintenance_window(bad)


def test_devices_list_filters_by_any_inventory_field(fleet: Fleet) -> None:
    fleet.enrolled("a1", tags={"site": "berlin", "line": "1"}, agent_version="0.2.0")
    fleet.enrolled("a2", tags={"site": "paris"}, profile=OTHER_PROFILE, arch="aarch64")
    fleet.enrolled("p1", accept=False, tags={"site": "berlin"})
    fleet.client.post("/api/v1/groups", json={"name": "berlin", "selector": "site=berlin"})

    def ids(**params: object) -> list[str]:
        response = fleet.client.get("/api/v1/devices", params=params)
        assert response.status_code == 200, response.text
        return [d["id"] for d in response.json()]

    assert ids() == ["a1", "a2", "p1"]
    assert ids(status="pending") == ["p1"]
    assert ids(profile=OTHER_PROFILE) == ["a2"]
    assert ids(arch="x86_64", status="accepted") == ["a1"]
    assert ids(runtime="litert", runtime_version="2.3.0") == ["a1", "a2", "p1"]
    assert ids(agent_version="0.2.0") == ["a1"]
    assert ids(tag="site=berlin") == ["a1", "p1"]
    assert ids(tag=["site=berlin", "line"]) == ["a1"]
    assert ids(group="berlin") == ["a1", "p1"]
    assert ids(online="false") == ["a1", "a2", "p1"] and ids(online="true") == []
    assert ids(selector="site in (paris) or line=1") == ["a1", "a2"]
    assert ids(model="digits") == []
    assert ids(limit=1, offset=1) == ["a2"]
    bad = fleet.client.get("/api/v1/devices", params={"selector": "site=berlin or"})
    assert bad.status_code == 422 and "at position 14" in bad.json()["detail"]
    assert fleet.client.get("/api/v1/devices", params={"tag": "profile=x"}).status_code == 422
    assert fleet.client.get("/api/v1/devices", params={"status": "gone"}).status_code == 422
    assert fleet.client.get("/api/v1/devices", params={"group": "nope"}).status_code == 404
    bad_tags = fleet.client.patch("/api/v1/devices/a1/tags", json={"set": {"status": "x"}})
    assert bad_tags.status_code == 422 and fleet.device("a1")["tags"]["site"] == "berlin"
    gone = fleet.client.patch("/api/v1/devices/a1/tags", json={"remove": ["nope"]})
    assert gone.status_code == 422 and "has no tag 'nope'" in gone.json()["detail"]
