"""Staged rollouts: which devices get a model version when, and the signed desired state.

- :mod:`server.rollouts.core` -- the rollout state machine (phases, rate limit,
  timeouts, retries, gates, pause/resume/abort); pure.
- :mod:`server.rollouts.gates` -- health-gate evaluation from device signals; pure.
- :mod:`server.rollouts.eligibility` -- which group members can take an artifact, and why not.
- :mod:`server.rollouts.desired` -- each device's desired deployments, manifest versions,
  signing, and :class:`~server.rollouts.desired.DesiredPublisher`, the MQTT adapter.
- :mod:`server.rollouts.errors` -- the package's exceptions.

Nothing here touches the database: callers pass plain data in and persist what comes back.
"""

__all__: list[str] = []  # import from the modules above; the package re-exports nothing
