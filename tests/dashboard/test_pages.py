"""The dashboard in a real browser, against a real server with a simulated fleet.

Each page draws its data (charts with points, tables with rows) and is screenshotted;
filters live in the URL and a shared URL reproduces the view; a rollout is paused by
clicking its button; a viewer sees no action buttons and the server refuses its actions
anyway; nothing is fetched from another origin.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from server.commands.client import ApiError
from tests.dashboard.conftest import (
    CHROMIUM,
    CHROMIUM_MISSING,
    DRIFTED,
    PROFILE,
    Browser,
    Fleet,
    open_page,
    screenshot,
    wait_for,
)

if not CHROMIUM.exists():
    pytest.skip(CHROMIUM_MISSING, allow_module_level=True)

from playwright.sync_api import expect  # after the skip: it is only for the browser

pytestmark = [pytest.mark.slow, pytest.mark.broker]


@pytest.fixture(scope="module")
def admin_context(browser: Browser) -> Any:
    return browser.context()


def points(page: Any, chart: str) -> int:
    """Data points a chart drew (0 when it has none or is not there)."""
    found = page.locator(f'canvas[data-chart="{chart}"]')
    if found.count() == 0:
        return 0
    return int(found.first.get_attribute("data-points") or 0)


def rows(page: Any, table_id: str) -> int:
    return int(page.locator(f"#{table_id} tbody tr").count())


def query(page: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


# ----------------------------------------------------------------------------- pages


def test_the_fleet_page_shows_presence_versions_and_devices(
    fleet: Fleet, browser: Browser, admin_context: Any
) -> None:
    page = open_page(browser, admin_context, fleet, "/fleet", token=fleet.admin_token)
    assert urlsplit(page.url).fragment == "", "the token stays in the address bar"
    assert page.evaluate("localStorage.getItem('edgefleet.token')") == fleet.admin_token
    assert points(page, "fleet-groups") >= 3  # online in line-a, line-b; offline in spares
    assert points(page, "fleet-profiles") >= 1
    assert points(page, "fleet-versions") >= 2  # a version in line-a and in line-b
    assert rows(page, "devices-table") == 11
    spare = page.locator('#devices-table tr[data-device="spares-00"]')
    assert "offline" in spare.inner_text() and "never" in spare.inner_text()
    assert "admin" in page.locator("#identity").inner_text()
    screenshot(page, "fleet")
    page.close()


def test_the_rollouts_page_shows_phases_gates_and_failures(
    fleet: Fleet, browser: Browser, admin_context: Any
) -> None:
    page = open_page(browser, admin_context, fleet, "/rollouts?status=all", token=fleet.admin_token)
    assert rows(page, "rollouts-table") == 3
    # the newest is the canary of v2, waiting for approval after its first phase
    assert fleet.rollout_id in page.locator("#rollout-detail h2").first.inner_text()
    assert points(page, "rollout-phases") >= 1
    assert rows(page, "gates-table") >= 1
    assert page.locator('#rollout-actions button[data-action="pause"]').count() == 1
    # line-b's rollout had a device fail its self-test: the failure and its reason show
    line_b = page.locator('#rollouts-table tr:has-text("line-b")')
    line_b.click()
    expect(page).to_have_url(re.compile(f"rollout={line_b.get_attribute('data-rollout')}"))
    page.wait_for_selector("#failures-table")
    failure = page.locator("#failures-table tbody tr").first.inner_text()
    assert "line-b-04" in failure and "self_test_failed" in failure
    screenshot(page, "rollouts-failure")
    page.goto(f"{fleet.url}/rollouts?status=all&rollout={fleet.rollout_id}")
    page.wait_for_selector('body[data-loaded-page="rollouts"]')
    page.wait_for_selector('canvas[data-chart="rollout-gates"]')
    assert points(page, "rollout-gates") >= 1
    screenshot(page, "rollouts")
    page.close()


def test_the_models_page_shows_versions_lineage_and_artifacts(
    fleet: Fleet, browser: Browser, admin_context: Any
) -> None:
    page = open_page(browser, admin_context, fleet, "/models", token=fleet.admin_token)
    assert rows(page, "versions-table") == len(fleet.versions)
    assert rows(page, "artifacts-table") >= 1
    assert points(page, "model-targets") >= 2  # size and latency of at least one target
    assert points(page, "model-metrics") >= 1
    lineage = page.locator("#model-lineage").inner_text()
    assert "dataset" in lineage and f"v{fleet.versions[-1]}" in lineage
    assert "production" in page.locator("#versions-table").inner_text()
    artifacts = page.locator("#artifacts-table").inner_text()
    assert "KiB" in artifacts and "passed" in artifacts and "accuracy" in artifacts
    screenshot(page, "models")
    page.close()


def test_the_drift_page_shows_the_heatmap_histogram_and_drifted_devices(
    fleet: Fleet, browser: Browser, admin_context: Any
) -> None:
    page = open_page(
        browser,
        admin_context,
        fleet,
        f"/drift?model={fleet.model}&since=6h",
        token=fleet.admin_token,
    )
    assert points(page, "heatmap") >= 2  # line-a and line-b have cells
    heat_label = page.locator("#drift-heatmap canvas").get_attribute("aria-label")
    assert heat_label and "group" in heat_label
    assert points(page, "drift-histogram") >= 2
    assert points(page, "drift-features") >= 1
    assert points(page, "drift-classes") >= 2
    drifted = page.locator("#drift-devices-table").inner_text()
    assert "line-b-00" in drifted and "act" in drifted
    title = page.locator("#chart-drift-histogram").locator("xpath=..").inner_text()
    assert any(f in title for f in ("f20", "f28", "f36", "f44")), title
    screenshot(page, "drift")
    page.close()


def test_the_alerts_page_shows_the_open_alert_and_its_evidence(
    fleet: Fleet, browser: Browser, admin_context: Any
) -> None:
    page = open_page(browser, admin_context, fleet, "/alerts", token=fleet.admin_token)
    assert rows(page, "alerts-table") >= 1
    assert "line-b-drift" in page.locator("#alerts-table").inner_text()
    assert points(page, "alerts-timeline") >= 1
    assert points(page, "alerts-rules") >= 1
    page.wait_for_selector("#alert-evidence-windows")
    assert rows(page, "alert-evidence-windows") >= 1
    assert "firing" in page.locator("#alert-evidence-windows").inner_text()
    assert rows(page, "alert-evidence-devices") >= 1
    screenshot(page, "alerts")
    page.close()


def test_the_retraining_page_shows_decisions_with_their_evidence(
    fleet: Fleet, browser: Browser, admin_context: Any
) -> None:
    page = open_page(browser, admin_context, fleet, "/retraining", token=fleet.admin_token)
    assert rows(page, "decisions-table") >= 1
    assert "retrain-on-drift" in page.locator("#decisions-table").inner_text()
    page.wait_for_selector("#decision-evidence-windows")
    assert rows(page, "decision-evidence-windows") >= 1
    assert points(page, "decision-evidence") >= 1
    assert rows(page, "decision-evidence-devices") >= 1
    assert rows(page, "decision-history-table") >= 1
    screenshot(page, "retraining")
    page.close()


# ----------------------------------------------------------------------------- the URL


def test_filters_change_the_url_and_the_view_and_a_shared_url_reproduces_it(
    fleet: Fleet, browser: Browser, admin_context: Any
) -> None:
    page = open_page(
        browser, admin_context, fleet, f"/drift?model={fleet.model}", token=fleet.admin_token
    )
    assert "whole fleet" in page.locator("#drift-summary").inner_text()
    page.select_option("#filter-group", "line-b")
    expect(page).to_have_url(re.compile("group=line-b"))
    expect(page.locator("#drift-summary")).to_contain_text("group line-b")
    page.select_option("#filter-since", "1h")
    expect(page).to_have_url(re.compile("since=1h"))
    # a calm feature: no refresh before this choice would show it by default
    page.select_option("#filter-feature", "f21")
    expect(page.locator("#chart-drift-histogram").locator("xpath=..")).to_contain_text(
        "Reference vs live: f21"
    )
    assert query(page) == {
        "model": [fleet.model],
        "group": ["line-b"],
        "since": ["1h"],
        "feature": ["f21"],
    }
    shared = page.url
    labels = page.locator("#drift-heatmap canvas").evaluate("c => c.dataset.points")
    page.close()

    again = open_page(
        browser, admin_context, fleet, shared.removeprefix(fleet.url), token=fleet.admin_token
    )
    assert again.locator("#filter-group").input_value() == "line-b"
    assert again.locator("#filter-since").input_value() == "1h"
    assert again.locator("#filter-feature").input_value() == "f21"
    assert "group line-b" in again.locator("#drift-summary").inner_text()
    histogram = again.locator("#chart-drift-histogram").locator("xpath=..").inner_text()
    assert "Reference vs live: f21" in histogram
    assert again.locator("#drift-heatmap canvas").evaluate("c => c.dataset.points") == labels
    screenshot(again, "drift-line-b")
    again.close()

    fleet_page = open_page(browser, admin_context, fleet, "/fleet", token=fleet.admin_token)
    fleet_page.select_option("#filter-group", "line-a")
    expect(fleet_page).to_have_url(re.compile("group=line-a"))
    wait_for(lambda: rows(fleet_page, "devices-table") == 5, 10, "line-a's five devices listed")
    assert "line-b" not in fleet_page.locator("#devices-table").inner_text()
    fleet_page.go_back()
    wait_for(lambda: rows(fleet_page, "devices-table") == 11, 10, "back: every device listed")
    fleet_page.close()


def test_a_page_refreshes_by_itself_and_keeps_the_selection(
    fleet: Fleet, browser: Browser, admin_context: Any
) -> None:
    page = open_page(browser, admin_context, fleet, "/fleet?group=line-b", token=fleet.admin_token)
    before = int(page.evaluate("document.body.dataset.refreshes"))
    wait_for(
        lambda: int(page.evaluate("document.body.dataset.refreshes")) > before,
        15,
        "a refresh by itself",
    )
    assert query(page) == {"group": ["line-b"]}
    assert page.locator("#filter-group").input_value() == "line-b"
    assert rows(page, "devices-table") == 5
    page.close()


# ----------------------------------------------------------------------------- acting


def test_an_operator_pauses_a_rollout_from_its_button(
    fleet: Fleet, browser: Browser, admin_context: Any
) -> None:
    assert fleet.get(f"/rollouts/{fleet.rollout_id}")["status"] == "waiting_approval"
    page = open_page(
        browser,
        admin_context,
        fleet,
        f"/rollouts?status=all&rollout={fleet.rollout_id}",
        token=fleet.admin_token,
    )
    page.fill("#rollout-reason", "checking the canary by hand")
    page.click('#rollout-actions button[data-action="pause"]')
    page.wait_for_selector('#rollout-actions button[data-action="resume"]')
    shown = fleet.get(f"/rollouts/{fleet.rollout_id}")
    assert shown["status"] == "paused"
    assert shown["status_reason"] == "checking the canary by hand"
    assert page.locator('#rollout-actions button[data-action="pause"]').count() == 0
    assert "paused" in page.locator("#rollout-detail").inner_text()
    screenshot(page, "rollouts-paused")
    page.close()


# ----------------------------------------------------------------------------- roles


def test_a_viewer_sees_every_page_but_no_action_button(fleet: Fleet, browser: Browser) -> None:
    context = browser.context()
    page = open_page(
        browser,
        context,
        fleet,
        f"/rollouts?status=all&rollout={fleet.rollout_id}",
        token=fleet.viewer_token,
    )
    assert "viewer" in page.locator("#identity").inner_text()
    assert rows(page, "rollouts-table") == 3
    assert page.locator("button[data-action]").count() == 0
    assert page.locator("#rollout-reason").count() == 0
    page.goto(f"{fleet.url}/retraining")
    page.wait_for_selector('body[data-loaded-page="retraining"]')
    assert rows(page, "decisions-table") >= 1
    assert page.locator("button[data-action]").count() == 0
    # the server enforces it regardless of what the page shows
    refused = httpx.post(
        f"{fleet.url}/api/v1/rollouts/{fleet.rollout_id}/resume",
        headers={"Authorization": f"Bearer {fleet.viewer_token}"},
        json={},
    )
    assert refused.status_code == 403
    assert "operator" in refused.json()["detail"]
    screenshot(page, "retraining-viewer")
    page.close()


def test_without_a_valid_token_the_sign_in_screen_shows_and_signs_in(
    fleet: Fleet, browser: Browser
) -> None:
    context = browser.context()
    page = browser.watch(context.new_page())
    page.goto(f"{fleet.url}/models")
    page.wait_for_selector('body[data-loaded-page="login"]')
    assert page.locator("#main table").count() == 0
    screenshot(page, "login")
    page.fill("#login-token", "ef_op_not-a-real-token")
    page.click("#login-form button")
    expect(page.locator("#login-error")).to_contain_text("refused")
    page.fill("#login-token", fleet.viewer_token)
    page.click("#login-form button")
    page.wait_for_selector('body[data-loaded-page="models"]')
    assert rows(page, "versions-table") == len(fleet.versions)
    screenshot(page, "login-then-models")
    page.click("#logout")
    page.wait_for_selector('body[data-loaded-page="login"]')
    assert page.evaluate("localStorage.getItem('edgefleet.token')") is None
    # a refused wrong token is a console error of the browser's own making (401): not ours
    browser.errors[:] = [e for e in browser.errors if "401" not in e]
    page.close()


# ----------------------------------------------------------------------------- origins


def test_no_page_asked_for_another_origin_and_none_failed(fleet: Fleet, browser: Browser) -> None:
    assert browser.requests, "the tests before this one opened pages"
    foreign = [u for u in browser.requests if not u.startswith(fleet.url)]
    assert foreign == []
    assert browser.errors == []


def test_the_pages_tell_the_browser_to_load_nothing_from_elsewhere(fleet: Fleet) -> None:
    for path in ("/", "/fleet", "/rollouts", "/models", "/drift", "/alerts", "/retraining"):
        answer = httpx.get(f"{fleet.url}{path}")
        assert answer.status_code == 200, path
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy
        assert not re.search(r"(src|href)=\"(https?:)?//", answer.text), path


def test_the_dashboard_shadows_neither_the_api_nor_its_docs(fleet: Fleet) -> None:
    assert httpx.get(f"{fleet.url}/docs").status_code == 200
    schema = httpx.get(f"{fleet.url}/api/v1/openapi.json").json()
    assert "/api/v1/dashboard/fleet" in schema["paths"]
    assert httpx.get(f"{fleet.url}/api/v1/health").json()
    unsigned = httpx.get(f"{fleet.url}/api/v1/dashboard/fleet")
    assert unsigned.status_code == 401
    assert unsigned.headers["www-authenticate"].lower().startswith("bearer")
    assert httpx.get(f"{fleet.url}/api/v1/no-such-thing").status_code == 404


# ----------------------------------------------------------------------------- its API views


def test_the_fleet_view_counts_devices_per_group_and_profile(fleet: Fleet) -> None:
    overview = fleet.get("/dashboard/fleet")
    cells = {(c["group"], c["profile"]): c for c in overview["by_group_profile"]}
    assert (
        cells[("line-a", PROFILE)] | {"online": 5, "offline": 0, "devices": 5}
        == cells[("line-a", PROFILE)]
    )
    assert cells[("spares", PROFILE)]["offline"] == 1
    assert (overview["devices"], overview["online"], overview["offline"]) == (11, 10, 1)
    versions = {(v["group"], v["version"]): v["devices"] for v in overview["versions"]}
    assert versions == {("line-a", 1): 4, ("line-a", 2): 1, ("line-b", 1): 4}
    only_b = fleet.get("/dashboard/fleet", group="line-b")
    assert sorted(d["id"] for d in only_b["device_rows"]) == fleet.devices["line-b"]
    with pytest.raises(ApiError) as unknown:
        fleet.get("/dashboard/fleet", group="no-such-group")
    assert unknown.value.status_code == 404


def test_the_heatmap_puts_the_drifted_group_and_features_first(fleet: Fleet) -> None:
    heat = fleet.get("/dashboard/drift/heatmap", model=fleet.model, version="1", since="2h", top=6)
    assert heat["bucket"] == "hour" and heat["groups"] == ["line-a", "line-b", "spares"]
    assert set(heat["features"][:4]) == set(DRIFTED)
    latest = {(r["group"], r["feature"]): r["values"][-1] for r in heat["rows"]}
    for feature in DRIFTED:
        assert latest[("line-b", feature)] >= 0.25
        assert latest[("line-a", feature)] < 0.1
        assert latest[("spares", feature)] is None
    one = fleet.get(
        "/dashboard/drift/heatmap", model=fleet.model, version="1", group="line-a", feature="f3"
    )
    assert [(r["group"], r["feature"]) for r in one["rows"]] == [("line-a", "f3")]
    with pytest.raises(ApiError) as bad:
        fleet.get("/dashboard/drift/heatmap", model=fleet.model, feature="pixel-99")
    assert bad.value.status_code == 422 and "pixel-99" in str(bad.value)


def test_the_histogram_sets_live_counts_beside_the_reference(fleet: Fleet) -> None:
    # a range that has ended (the hour in progress is left out), so no report lands in it
    # between the requests below
    until = datetime.now(UTC).replace(minute=0, second=0, microsecond=0).isoformat()

    def histogram(**params: str) -> dict[str, Any]:
        found: dict[str, Any] = fleet.get(
            "/dashboard/drift/histogram",
            model=fleet.model,
            version="1",
            since="3h",
            until=until,
            **params,
        )
        return found

    drifted = histogram(group="line-b", feature="f20")
    assert drifted["n"] > 0 and drifted["level"] == "act" and drifted["psi"] >= 0.25
    assert len(drifted["labels"]) == len(drifted["reference"]) == len(drifted["live"])
    assert abs(sum(drifted["live_share"]) - 1) < 1e-9
    calm = histogram(group="line-a", feature="f20")
    assert calm["level"] == "ok"
    # counts merge exactly: the fleet's are line-a's plus line-b's, bin by bin
    whole = histogram(feature="f20")
    assert whole["live"] == [a + b for a, b in zip(calm["live"], drifted["live"], strict=True)]
    assert histogram(group="spares", feature="f20")["n"] == 0
    with pytest.raises(ApiError) as bad:
        histogram(feature="nope")
    assert bad.value.status_code == 422 and "nope" in str(bad.value)
