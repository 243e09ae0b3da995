"""Agent releases: the versions of the agent itself that the fleet may be updated to.

- :mod:`server.agent_releases.wheel` -- the pure check of an agent wheel (no I/O beyond
  the bytes it is given).
- :mod:`server.agent_releases.models` -- the ``agent_releases`` table.
- :mod:`server.agent_releases.service` -- publish (check, store, register), list, show;
  and :func:`~server.agent_releases.service.build_wheel`, the wheel of a checkout.
- :mod:`server.agent_releases.errors` -- the package's exceptions.
"""

__all__: list[str] = []  # import from the modules above; the package re-exports nothing
