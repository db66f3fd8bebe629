"""The Runtime on AWS: SQS queues, the DynamoDB ledger and budget, an S3 sink, the SSM token."""

from __future__ import annotations

import json
from collections.abc import Callable

from pipeline.aws.budget import DynamoBudget
from pipeline.aws.ledger import DynamoLedger
from pipeline.aws.queues import SqsQueue
from pipeline.aws.sinks import S3Sink
from pipeline.aws.ssm import forget_tokens, token_from_parameter
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.profile import load as load_profile
from pipeline.runtime import Runtime, vendor_client
from pipeline.stats import CallStats

# How long every stage queue must look empty before entities still queued in the ledger
# count as lost: SQS's approximate counts lag by up to a minute.
QUIET_GRACE = 180.0


def build(config: Config) -> Runtime:
    """The AWS Runtime of `config` (the functions' HARVEST_* environment)."""
    import boto3
    from botocore.config import Config as BotoConfig

    profile = load_profile(config.profile)
    stages = profile.stage_names
    if config.stage and config.stage not in stages:
        raise ConfigError(f"unknown stage {config.stage!r}; known: {', '.join(stages)}")
    missing = [
        name
        for name, value in (
            ("HARVEST_QUEUES", all(s in config.queues for s in stages)),
            ("HARVEST_SINK", config.sink.startswith("s3://")),
            ("HARVEST_STATE_TABLE", config.state_table),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"AWS backend needs {', '.join(missing)}")
    if config.drain_functions and set(config.drain_functions) != set(stages):
        raise ConfigError(
            f"HARVEST_DRAIN_FUNCTIONS names the stages {sorted(config.drain_functions)};"
            f" the profile's are {sorted(stages)}"
        )
    session = boto3.session.Session()
    # Throttles and 5xx of DynamoDB, SQS and S3 are retried where they happen: adaptive
    # mode backs off and slows this client's own request rate on throttling; 8 attempts
    # ride out about half a minute of trouble before a message is charged a receive (the
    # drain then retries the step a few times more, see Drain._store).
    boto_config = BotoConfig(
        max_pool_connections=max(10, config.concurrency * 2),
        retries={"mode": "adaptive", "max_attempts": 8},
    )
    sqs = session.client("sqs", config=boto_config)
    ddb = session.client("dynamodb", config=boto_config)
    s3 = session.client("s3", config=boto_config)
    stats = CallStats()
    budget = DynamoBudget(
        ddb,
        config.state_table,
        config.rate_calls,
        config.rate_period,
        retention_days=config.state_retention_days,
    )
    start_drain: Callable[[str, str], None] | None = None
    if config.drain_functions:
        # One attempt, short timeouts: a drain not started now starts on its schedule, and
        # the kickoff's listing waits for these.
        lam = session.client(
            "lambda",
            config=BotoConfig(
                connect_timeout=2, read_timeout=3, retries={"mode": "standard", "max_attempts": 1}
            ),
        )

        def invoke_drain(stage: str, started_by: str) -> None:
            lam.invoke(
                FunctionName=config.drain_functions[stage],
                InvocationType="Event",
                Payload=json.dumps({"started_by": started_by}).encode(),
            )

        start_drain = invoke_drain

    return Runtime(
        config=config,
        queues={s: SqsQueue(sqs, config.queues[s].url, s) for s in stages},
        dlqs={s: SqsQueue(sqs, config.queues[s].dlq_url, f"{s}-dlq") for s in stages},
        sink=S3Sink(s3, config.sink),
        ledger=DynamoLedger(ddb, config.state_table, config.state_retention_days, stages),
        budget=budget,
        make_client=lambda: vendor_client(
            config,
            config.token or token_from_parameter(config.token_parameter),
            budget,
            stats,
            profile,
        ),
        profile=profile,
        stats=stats,
        quiet_grace=QUIET_GRACE,
        forget_token=forget_tokens,
        start_drain=start_drain,
    )
