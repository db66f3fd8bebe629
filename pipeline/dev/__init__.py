"""What people at a terminal use, never shipped to Lambda: the CLI, its display, the simulator."""
