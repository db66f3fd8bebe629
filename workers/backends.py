"""The Runtime a handler's configuration asks for: built by its backend, once per configuration.

HARVEST_BACKEND is "aws" in Lambda and "local" when `harvest local` runs the handlers.
"""

from __future__ import annotations

import gc
import os
import threading

from aws_lambda_powertools import Logger

from pipeline import runtime as runtimes
from pipeline.aws import runtime as aws
from pipeline.config import Backend, Config
from pipeline.local import runtime as local
from pipeline.runtime import Runtime

logger = Logger(service="harvest", child=True)

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


def prepare(*, vendor_client: bool = True) -> Runtime | None:
    """In Lambda, build the function's Runtime (and with `vendor_client`, the vendor client)
    now, during its sandbox's init: the drain and kickoff modules call this at import, and
    their handler finds it cached.

    Built in the first invocation instead, the boto3 session and clients (botocore's service
    models) and the vendor client (its token read from SSM) take CPU at the function's
    memory share in every stage's first invocation, while the harvest waits on the listing
    stages. It is AWS's advice for SDK clients (create them outside the handler), and the
    init code has been seen to run faster than the handler below about 1.8 GB, though Lambda
    does not document the CPU its init gets; the AWS-mode bench assumes it gets more (its
    CPU share starts once the handler is imported).

    The kickoff leaves out the vendor client: reading its token is an AWS request, which
    the kickoff's patched botocore would trace, and X-Ray discards subsegments made during
    init with a warning in the log.

    Nothing outside Lambda (no AWS_LAMBDA_FUNCTION_NAME), or for the local backend. A build
    that fails is logged and left to the handler, which builds again and fails with the
    same error where the invocation reports it (a transient one may have passed by then).
    """
    if "AWS_LAMBDA_FUNCTION_NAME" not in os.environ:
        return None
    try:
        config = Config.from_env()
        if config.backend != Backend.AWS:
            return None
        rt = runtime(config)
        if vendor_client:
            rt.client  # noqa: B018 (built on first use: the token, the session)
    except Exception as exc:
        logger.warning(
            "could not build the runtime at init; the handler will try again",
            extra={"error": repr(exc)},
        )
        return None
    return rt
