"""The vendor simulator, split as a fake service in moto: the model (`model.py`: the tree and
what it answers), the faults and rate limit (`faults.py`), the HTTP server (`server.py`)."""

from pipeline.dev.simulator.model import SimulatorConfig, SimulatorStats
from pipeline.dev.simulator.server import Simulator, SimulatorProcess, serve

__all__ = ["Simulator", "SimulatorConfig", "SimulatorProcess", "SimulatorStats", "serve"]
