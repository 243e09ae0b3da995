"""The real server for the fault tests: in-process (:class:`RolloutServer`, its whole
lifespan on a real broker) or as an ``edgefleet server`` process a test may SIGKILL."""

from __future__ import annotations

from tests.server.rollouts.harness import RolloutServer


def authorize(server: RolloutServer) -> RolloutServer:
    """Send the dev-mode admin token with every API call, when the server made one (operator
    routes take a bearer token; a server from before operator tokens made none)."""
    token_file = server.settings.data_dir / "admin-token"
    assert server.client is not None
    if token_file.is_file():
        server.client.headers["Authorization"] = f"Bearer {token_file.read_text().strip()}"
    return server
