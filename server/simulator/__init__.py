"""The fleet simulator: lightweight devices that speak the real protocol over a real broker.

Used by the rollout and ingestion benchmarks, the load and fault tests and the
dashboard tests, where hundreds of real agent processes would measure the machine
rather than the server.
"""

from server.simulator.device import Behaviour, Outgoing, SimulatedDevice
from server.simulator.fleet import FleetSimulator, SimulatorStats

__all__ = ["Behaviour", "FleetSimulator", "Outgoing", "SimulatedDevice", "SimulatorStats"]
