"""How the operator commands reach the server: one small HTTP client, and output helpers.

The server URL comes from ``--server`` or ``EDGEFLEET_SERVER`` (default
``http://127.0.0.1:8750``), the operator token from ``EDGEFLEET_TOKEN``, else from the
development admin token a dev-mode server wrote to ``$EDGEFLEET_DATA_DIR/admin-token``
(default ``edgefleet-data/admin-token``), when that file exists. An HTTP error
becomes a one-line message naming what the server said; ``--json`` commands print
only JSON on stdout.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from server.auth.tokens import read_admin_token

__all__ = [
    "DEFAULT_SERVER",
    "ApiClient",
    "ApiError",
    "JsonOption",
    "ServerOption",
    "api",
    "default_token",
    "emit_json",
    "fail",
    "timestamp",
]

DEFAULT_SERVER = "http://127.0.0.1:8750"
err = Console(stderr=True)

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server", help="Server URL. [env: EDGEFLEET_SERVER; default: " + DEFAULT_SERVER + "]"
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON only, on stdout.")]


class ApiError(Exception):
    """The server refused a request or could not be reached."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


def default_token(data_dir: Path | None = None) -> str | None:
    """``EDGEFLEET_TOKEN``, else the dev admin token in ``data_dir`` (default:
    ``$EDGEFLEET_DATA_DIR`` or ``edgefleet-data``) if a dev-mode server wrote one."""
    token = os.environ.get("EDGEFLEET_TOKEN", "").strip()
    if token:
        return token
    if data_dir is None:
        data_dir = Path(os.environ.get("EDGEFLEET_DATA_DIR") or "edgefleet-data")
    return read_admin_token(data_dir)


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.has_token = bool(token)
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url + "/api/v1", headers=headers, timeout=timeout
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ApiError(f"cannot reach the server at {self.base_url}: {e}") from e
        if response.status_code >= 400:
            message = _detail(response)
            if response.status_code == 401 and not self.has_token:
                message += " (set EDGEFLEET_TOKEN to an operator token)"
            raise ApiError(message, response.status_code)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def close(self) -> None:
        self._http.close()


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(detail, list):  # FastAPI validation errors
        parts = []
        for item in detail:
            where = ".".join(str(p) for p in item.get("loc", []) if p != "body")
            parts.append(f"{where}: {item.get('msg')}" if where else str(item.get("msg")))
        detail = "; ".join(parts)
    return f"HTTP {response.status_code}: {detail}"


@contextmanager
def api(server: str | None) -> Iterator[ApiClient]:
    """A client for the command's duration; any :class:`ApiError` exits with its message."""
    client = ApiClient(
        server or os.environ.get("EDGEFLEET_SERVER") or DEFAULT_SERVER, token=default_token()
    )
    try:
        yield client
    except ApiError as e:
        fail(str(e), code=1)
    finally:
        client.close()


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


def timestamp(value: str | None) -> str:
    """An ISO time from the API as a table shows it (``2026-11-29 12:00:00``; ``-`` if none)."""
    return "-" if value is None else value[:19].replace("T", " ")
