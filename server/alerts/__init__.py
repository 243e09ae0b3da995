"""Alerts: rules over the fleet's drift, SLA, feedback and presence; alerts that open,
de-duplicate and resolve by themselves; webhooks.

- :mod:`server.alerts.rules` -- the conditions rules are written in (pure, pydantic).
- :mod:`server.alerts.conditions` -- judging a condition in a window (pure).
- :mod:`server.alerts.signals` -- reading the figures of a window from the database.
- :mod:`server.alerts.evaluate` -- one condition over one scope, now: its findings.
- :mod:`server.alerts.models` -- the tables (rules, alerts, webhook deliveries).
- :mod:`server.alerts.service` -- rules and alerts in the database.
- :mod:`server.alerts.webhook` -- webhook deliveries, retried with backoff.
- :mod:`server.alerts.evaluator` -- the periodic evaluator the server runs.

Nothing is imported here, so the tables can be registered without importing the rest.
"""

__all__: list[str] = []
