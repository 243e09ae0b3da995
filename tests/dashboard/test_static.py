"""The dashboard's files as shipped: the vendored chart library is the one its README names,
with its licence; every file is package data; none of ours names another origin; and the
app serves the pages and assets without a token and without shadowing the API."""

from __future__ import annotations

import fnmatch
import hashlib
import re
import tomllib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.dashboard import PAGES, STATIC_DIR
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
VENDOR = STATIC_DIR / "vendor"


def test_the_vendored_chart_library_is_the_release_its_readme_names() -> None:
    notes = (VENDOR / "README.md").read_text()
    declared = re.search(r"`([0-9a-f]{64})`", notes)
    assert declared, "vendor/README.md names the sha256 of chart.umd.min.js"
    built = (VENDOR / "chart.umd.min.js").read_bytes()
    assert hashlib.sha256(built).hexdigest() == declared.group(1)
    version = re.search(r"\| (\d+\.\d+\.\d+) \|", notes)
    assert version and f"Chart.js v{version.group(1)}" in built[:200].decode()
    licence = (VENDOR / "chart.js.LICENSE.md").read_text()
    assert "MIT License" in licence and "Chart.js Contributors" in licence


def test_every_static_file_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["server"]
    package = STATIC_DIR.parents[1]  # server/
    files = [p for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert files
    missing = [
        str(p.relative_to(package))
        for p in files
        if not any(fnmatch.fnmatch(str(p.relative_to(package)), pat) for pat in patterns)
        # setuptools' globs do not cross "/", fnmatch's "*" does: check the depth too
        or not any(
            str(p.relative_to(package)).count("/") == pat.count("/")
            and fnmatch.fnmatch(str(p.relative_to(package)), pat)
            for pat in patterns
        )
    ]
    assert missing == []


@pytest.mark.parametrize(
    "path",
    sorted(p for p in STATIC_DIR.rglob("*") if p.is_file() and p.parent != VENDOR),
    ids=lambda p: str(p.relative_to(STATIC_DIR)),
)
def test_none_of_our_files_names_another_origin(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"https?://|//[a-z0-9-]+\.[a-z]{2,}/", text, re.IGNORECASE), path
    assert "@import" not in text and "cdn" not in text.lower()


def test_the_vendored_build_fetches_nothing() -> None:
    built = (VENDOR / "chart.umd.min.js").read_text()
    # its only URLs are its own banner and a comment naming a dependency's repository
    assert set(re.findall(r"https?://[^\s\"')]+", built)) <= {
        "https://www.chartjs.org",
        "https://github.com/kurkle/color#readme",
    }
    assert "fetch(" not in built and "XMLHttpRequest" not in built


def test_pages_and_assets_are_served_without_a_token(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, database_url=None, broker_url="embedded", run_jobs=False, mode="dev"
    )
    app = create_app(settings)
    with TestClient(app) as client:
        for path in ("/", *(f"/{p}" for p in PAGES)):
            page = client.get(path)
            assert page.status_code == 200, path
            assert page.headers["content-type"].startswith("text/html")
            assert "default-src 'self'" in page.headers["content-security-policy"]
            assert '<script type="module" src="/ui/app.js">' in page.text
        script = client.get("/ui/app.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert client.get("/ui/vendor/chart.umd.min.js").status_code == 200
        assert client.get("/ui/../app.py").status_code == 404
        # the API and its documents are still where they were, behind the token
        assert client.get("/docs").status_code == 200
        assert client.get("/api/v1/openapi.json").json()["paths"]
        assert client.get("/api/v1/dashboard/fleet").status_code == 401
        assert client.get("/api/v1/devices").status_code == 401
        assert client.get("/api/v1/health").status_code == 200
