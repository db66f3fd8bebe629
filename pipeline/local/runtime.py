"""The Runtime on one machine: queues and ledger in one SQLite file, an in-process budget,
a directory sink."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.local.budget import PacedBudget
from pipeline.local.ledger import SqliteLedger
from pipeline.local.queues import LocalQueueStore
from pipeline.local.sinks import DirectorySink
from pipeline.profile import AuthKind
from pipeline.profile import load as load_profile
from pipeline.queues import Queue
from pipeline.runtime import Runtime, vendor_client
from pipeline.stats import CallStats

STATE_DB = "state.sqlite"


@dataclass
class LocalRuntime(Runtime):
    """A local Runtime, with the queue store its scheduler releases and hurries."""

    store: LocalQueueStore = field(kw_only=True)

    def close(self) -> None:
        super().close()
        self.store.close()


def build(config: Config) -> LocalRuntime:
    """The local Runtime of `config`: its state in HARVEST_STATE_DIR, output in HARVEST_SINK."""
    if not config.state_dir or not config.sink:
        raise ConfigError("a local run needs HARVEST_STATE_DIR and HARVEST_SINK (directories)")
    profile = load_profile(config.profile)
    if config.stage and config.stage not in profile.stage_names:
        known = ", ".join(profile.stage_names)
        raise ConfigError(f"unknown stage {config.stage!r}; known: {known}")
    store = LocalQueueStore(Path(config.state_dir) / STATE_DB)
    queues: dict[str, Queue] = {}
    dlqs: dict[str, Queue] = {}
    for name in profile.stage_names:
        dlq = store.queue(f"{name}-dlq")
        dlqs[name] = dlq
        # SQS's redrive sits one receive above the drain's own dead-lettering, so that it
        # only catches messages whose drain crashed (as Terraform configures it).
        queues[name] = store.queue(
            name,
            visibility_timeout=config.visibility_timeout,
            dlq=dlq,
            max_receive_count=config.max_receive_count + 1,
        )
    stats = CallStats()
    budget = PacedBudget(config.rate_calls, config.rate_period)
    return LocalRuntime(
        config=config,
        queues=queues,
        dlqs=dlqs,
        sink=DirectorySink(config.sink),
        ledger=SqliteLedger(Path(config.state_dir) / STATE_DB, profile.stage_names),
        budget=budget,
        make_client=lambda: vendor_client(
            config,
            config.token if profile.auth.kind == AuthKind.NONE else _local_token(config),
            budget,
            stats,
            profile,
        ),
        profile=profile,
        stats=stats,
        # The embedded queues' counts are exact, and one process drives a local run
        # (kickoff first): no grace.
        quiet_grace=0.0,
        store=store,
    )


def _local_token(config: Config) -> str:
    if not config.token:
        raise ConfigError("no vendor token: pass --token or set HARVEST_VENDOR_TOKEN")
    return config.token
