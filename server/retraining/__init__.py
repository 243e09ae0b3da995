"""Continuous training: retraining policies per model, and the decisions they take.

- :mod:`server.retraining.policy` -- what a policy holds; when it may fire; which data a
  retraining trains on (pure).
- :mod:`server.retraining.models` -- the tables (policies, decisions).
- :mod:`server.retraining.service` -- policies and decisions in the database: firing,
  approval, training, promotion, the canary rollout.
- :mod:`server.retraining.engine` -- the step the alerts' evaluator runs every round.

Conditions and their evaluation are the alerts' (:mod:`server.alerts.rules`,
:mod:`server.alerts.evaluate`). Nothing is imported here, so the tables can be
registered without importing the rest.
"""

__all__: list[str] = []
