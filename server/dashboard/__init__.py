"""The operator dashboard, served by ``edgefleet server`` itself.

:func:`mount_dashboard` adds to an app:

- the pages -- ``/`` (the fleet), ``/fleet``, ``/rollouts``, ``/models``, ``/drift``,
  ``/alerts``, ``/retraining`` -- each the same HTML shell, whose ES modules read the
  JSON API under ``/api/v1`` with the operator's token and draw the page;
- the static files under ``/ui/`` (HTML, CSS, plain ES modules and the vendored
  Chart.js build): no build step, no Node.js, no CDN -- everything ships in the package;
- the read-only ``/api/v1/dashboard/...`` views of :mod:`server.dashboard.api`.

What always holds: no page or asset names another origin, and the pages say so to the
browser with a Content-Security-Policy that allows only this server; the pages carry no
data, so they need no token -- the API calls do, with the same roles as every other
client (:func:`server.auth.deps.operator_access`, also on the dashboard's own views).
Nothing is mounted over ``/api/v1``, ``/docs`` or the OpenAPI document.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Depends, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from server.auth.deps import operator_access
from server.dashboard.api import router

__all__ = ["ASSETS_PATH", "PAGES", "STATIC_DIR", "mount_dashboard"]

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PATH = "/ui"
PAGES = ("fleet", "rollouts", "models", "drift", "alerts", "retraining")

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
    # Chart.js sizes its canvases with inline styles.
    "style-src 'self' 'unsafe-inline'; font-src 'self'; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


def _page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html",
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard's pages, its static files and its API views on ``app``."""
    from server.app import API_PREFIX  # here, not at import: server.app imports this module

    if not (STATIC_DIR / "index.html").is_file():
        raise RuntimeError(f"the dashboard's files are missing from {STATIC_DIR}")
    # The same rule as every operator route: a bearer token, viewer for these reads.
    app.include_router(router, prefix=API_PREFIX, dependencies=[Depends(operator_access)])
    app.mount(ASSETS_PATH, StaticFiles(directory=STATIC_DIR), name="dashboard-assets")
    for path in ("/", *(f"/{name}" for name in PAGES)):
        app.add_api_route(
            path, _page, methods=["GET"], include_in_schema=False, response_class=FileResponse
        )
