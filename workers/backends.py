"""The Runtime a handler's configuration asks for: built by its backend, once per configuration.

HARVEST_BACKEND is "aws" in Lambda and "local" when `harvest local` runs the handlers.
"""

from __future__ import annotations

from pipeline import runtime as runtimes
from pipeline.aws import runtime as aws
from pipeline.config import Backend, Config
from pipeline.local import runtime as local
from pipeline.runtime import Runtime


def runtime(config: Config) -> Runtime:
    """The cached Runtime of `config`, built by the backend it names."""
    build = local.build if config.backend == Backend.LOCAL else aws.build
    return runtimes.runtime(config, build)
