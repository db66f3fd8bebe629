"""`python -m pipeline.dev.simulator`: the simulator in a child process (SimulatorProcess)."""

from pipeline.dev.simulator.server import child_main

child_main()
