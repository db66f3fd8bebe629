"""Thin Lambda entry points: read config, build objects, call `pipeline`."""
