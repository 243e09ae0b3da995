"""The edgefleet edge agent.

It runs on each device: it pulls signed model versions over MQTT, serves
inference with no network, and reports telemetry and drift. It stays light: it
needs only the ``agent`` extra and never imports the server, TensorFlow, Keras,
FastAPI, SQLModel or SQLAlchemy (checked by import-linter and a test).

``__version__`` is the version of the code that runs: the ``edgefleet-*.dist-info``
installed beside this package (a wheel's own, in ``site-packages`` or in a self-update
folder ``<data_dir>/agent/versions/<v>/``), else what the environment has installed
(an editable checkout). So an agent started from another version's folder reports
that version, whatever the base install is.
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import AgentError

__all__ = ["AgentError", "__version__"]


def _version() -> str:
    beside = Path(__file__).resolve().parent.parent
    for info in sorted(beside.glob("edgefleet-*.dist-info")):
        try:
            for line in (info / "METADATA").read_text(encoding="utf-8").splitlines():
                if line.startswith("Version:"):
                    return line.partition(":")[2].strip()
                if not line:
                    break  # the headers end here
        except OSError:
            continue
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0.0.0+unknown"


__version__ = _version()
