"""The vendor simulator, serving whatever vendor `SimulatorConfig.profile` describes (hermes-v1
by default), split as a fake service in moto: the model (`model.py`: the tree, its routes and
what it answers), the faults and rate limit (`faults.py`), the HTTP server (`server.py`)."""

from pipeline.dev.simulator.model import SimulatorConfig, SimulatorStats
from pipeline.dev.simulator.server import Simulator, SimulatorProcess, serve

__all__ = ["Simulator", "SimulatorConfig", "SimulatorProcess", "SimulatorStats", "serve"]
