"""Staged rollouts: which devices get a model version -- or an agent release -- when, and
the signed desired state.

The pure core (no I/O, no clock):

- :mod:`server.rollouts.core` -- the rollout state machine (phases, rate limit,
  timeouts, retries, gates, pause/resume/abort).
- :mod:`server.rollouts.gates` -- health-gate evaluation from device signals.
- :mod:`server.rollouts.eligibility` -- which group members can take an artifact, and why not.
- :mod:`server.rollouts.desired` -- each device's desired deployments, manifest versions,
  signing; and :class:`~server.rollouts.desired.DesiredPublisher`, the MQTT adapter.

The adapters around it:

- :mod:`server.rollouts.models` -- the tables (rollouts, issued manifests, pins, device
  events, state receipts).
- :mod:`server.rollouts.service` -- keyword-only functions on a session: create, list,
  command, pin; what the rollouts read and record; who may fetch which artifact.
- :mod:`server.rollouts.engine` -- the thread that steps every active rollout and
  publishes what changed.
- :mod:`server.rollouts.errors` -- the package's exceptions.
"""

__all__: list[str] = []  # import from the modules above; the package re-exports nothing
