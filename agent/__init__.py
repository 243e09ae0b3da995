"""The edgefleet edge agent.

It runs on each device: it pulls signed model versions over MQTT, serves
inference with no network, and reports telemetry and drift. It stays light: it
needs only the ``agent`` extra and never imports the server, TensorFlow, Keras,
FastAPI, SQLModel or SQLAlchemy (checked by import-linter and a test).
"""

from agent.errors import AgentError

__all__ = ["AgentError", "__version__"]

__version__ = "0.1.0"
