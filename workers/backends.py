"""The Runtime a handler's configuration asks for: built by its backend, once per configuration.

HARVEST_BACKEND is "aws" in Lambda and "local" when `harvest local` runs the handlers.
"""

from __future__ import annotations

import gc
import threading

from pipeline import runtime as runtimes
from pipeline.aws import runtime as aws
from pipeline.config import Backend, Config
from pipeline.local import runtime as local
from pipeline.runtime import Runtime

_frozen = threading.Event()


def runtime(config: Config) -> Runtime:
    """The cached Runtime of `config`, built by the backend it names.

    In Lambda, the objects alive once the first Runtime is built (the modules, botocore's
    service models, the clients: about 148,000) are frozen out of the garbage collector's
    reach: they live as long as the sandbox does. Each full collection went through all of
    them, stopping every thread of a drain for 0.1-0.3 s on the development machine (more on
    a Lambda's share of a core), about every 20 s, while the budget slots it held went by
    unused; frozen, one takes about 1 ms. The build itself runs without collections (the
    one it set off took 0.08-0.24 s of each sandbox's first invocation), so its garbage is
    frozen with the rest: 98-101 MB RSS in the AWS-mode bench's sandboxes, against 90-95.
    """
    if config.backend == Backend.LOCAL:
        return runtimes.runtime(config, local.build)
    if _frozen.is_set():
        return runtimes.runtime(config, aws.build)
    collecting = gc.isenabled()
    gc.disable()
    try:
        rt = runtimes.runtime(config, aws.build)
    finally:
        if collecting:
            gc.enable()
    gc.freeze()
    _frozen.set()
    return rt
