"""One frozen configuration object, built once from the environment (Lambda) or CLI flags.

Environment contract (Terraform sets these on every function):

HARVEST_BACKEND            "aws" (default) or "local"
HARVEST_VENDOR_URL         vendor base URL: https:// (http:// only with HARVEST_ALLOW_HTTP)
HARVEST_ALLOW_HTTP         "true"/"1"/"yes": allow a plain http:// vendor URL (token in clear)
HARVEST_VENDOR_TOKEN       the token itself (local runs only; never set in Lambda)
HARVEST_VENDOR_TOKEN_PARAMETER  SSM SecureString name holding the token (AWS)
HARVEST_RATE_CALLS         calls allowed per period (default 100)
HARVEST_RATE_PERIOD        the period in seconds (default 1)
HARVEST_QUEUES             JSON {stage: {"url": ..., "dlq_url": ...}} (AWS)
HARVEST_STAGE              the stage a drain function serves
HARVEST_DRAIN_FUNCTIONS    JSON {stage: drain function name} (AWS): the kickoff starts every
                           drain at once, and a drain that runs out of time with work left
                           starts its successor, instead of both waiting for the schedule
HARVEST_PROFILE            the vendor profile: a TOML file, or the name of a packaged one
                           (default hermes-v1; see docs/profiles.md)
HARVEST_SINK               s3://bucket/prefix or a local directory
HARVEST_STATE_TABLE        DynamoDB table of the run ledger and the rate budget (AWS)
HARVEST_STATE_RETENTION_DAYS  days a ledger or budget item of the state table lives after its
                           last write (its expires_at, the table's TTL; default 35) (AWS)
HARVEST_STATE_DIR          directory of the local queues, ledger and budget (local)
HARVEST_MAX_RECEIVE_COUNT  receives before a message is dead-lettered (default 5)
HARVEST_CONCURRENCY        most messages in process per drain invocation (default 64); how many
                           are used follows rate × vendor latency (Little's law)
HARVEST_SAFETY_MARGIN      seconds of an invocation kept free at the end (default 30)
HARVEST_VISIBILITY_TIMEOUT seconds a received message stays hidden (default 180)
HARVEST_READ_TIMEOUT       seconds a vendor response may stall before a retry (default 10)
HARVEST_RETRY_DELAY        first retry delay of a failed message, doubling (default 5)
HARVEST_WAIT_SECONDS       long-poll wait of an empty receive (default 5), while the drain has
                           no work of its own running (then it looks without waiting)
HARVEST_MAX_PAGES          pages one listing may have before it is poison (default 1000)
HARVEST_MAX_RETRY_AFTER    longest vendor Retry-After waited out inside a call; a longer
                           one returns the message to its queue for that long (default 60)
HARVEST_MAX_PAGE_BYTES     largest page body read; a larger one is poison (default 8388608)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from pipeline.errors import ConfigError
from pipeline.profile import load as load_profile

ENV_PREFIX = "HARVEST_"
# Longer than a DLQ keeps a message (14 days): a replayed message must still find its run.
STATE_RETENTION_DAYS = 35
TRUE_WORDS = ("true", "1", "yes")


class Backend(StrEnum):
    """Where the queues, the ledger, the budget and the output live."""

    AWS = "aws"  # SQS, DynamoDB, S3 (pipeline/aws/)
    LOCAL = "local"  # one SQLite file, in process, a directory (pipeline/local/)


@dataclass(frozen=True)
class QueueUrls:
    url: str
    dlq_url: str


@dataclass(frozen=True)
class Config:
    """Everything a kickoff, drain or replay needs to build its objects."""

    vendor_url: str
    token: str = field(default="", repr=False)
    token_parameter: str = ""
    backend: Backend = Backend.AWS
    rate_calls: int = 100
    rate_period: float = 1.0
    stage: str = ""
    profile: str = ""
    queues: Mapping[str, QueueUrls] = field(default_factory=dict)
    drain_functions: Mapping[str, str] = field(default_factory=dict)
    sink: str = ""
    state_table: str = ""
    state_retention_days: int = STATE_RETENTION_DAYS
    state_dir: str = ""
    max_receive_count: int = 5
    concurrency: int = 64
    safety_margin: float = 30.0
    visibility_timeout: float = 180.0
    connect_timeout: float = 3.05
    read_timeout: float = 10.0
    retry_delay: float = 5.0
    wait_seconds: float = 5.0
    allow_http: bool = False
    max_pages: int = 1000
    max_retry_after: float = 60.0
    max_page_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.backend not in tuple(Backend):
            raise ConfigError(f"backend must be 'aws' or 'local', not {self.backend!r}")
        if not self.vendor_url.startswith(("http://", "https://")):
            raise ConfigError(f"vendor URL must be http(s)://..., not {self.vendor_url!r}")
        if self.vendor_url.startswith("http://") and not self.allow_http:
            raise ConfigError(
                f"vendor URL {self.vendor_url!r} is plain http: the token and the data would"
                " cross the network unencrypted. Use https://, or allow plain http with"
                " HARVEST_ALLOW_HTTP=true (allow_http) or `harvest local --allow-http`"
            )
        for name, value in (
            ("max_pages", self.max_pages),
            ("max_retry_after", self.max_retry_after),
            ("max_page_bytes", self.max_page_bytes),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(
                    f"{name} (HARVEST_{name.upper()}) must be a number > 0, not {value!r}"
                )
        if self.rate_calls < 1 or self.rate_period <= 0:
            raise ConfigError("rate limit needs calls >= 1 and a period > 0 seconds")
        if self.max_receive_count < 1 or self.concurrency < 1:
            raise ConfigError("max receive count and concurrency must be >= 1")
        if self.state_retention_days < 1:
            raise ConfigError("state retention (HARVEST_STATE_RETENTION_DAYS) must be >= 1 day")

    def with_(self, **changes: Any) -> Config:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Config:
        """Build from HARVEST_* variables (see the module docstring)."""
        env = os.environ if env is None else env

        def get(name: str, default: str = "") -> str:
            return env.get(ENV_PREFIX + name, default)

        def whole(name: str, default: int) -> int:
            try:
                return int(get(name, str(default)))
            except ValueError:
                raise ConfigError(
                    f"{ENV_PREFIX}{name} must be a whole number, not {get(name)!r}"
                ) from None

        try:
            raw_queues = json.loads(get("QUEUES", "{}"))
            queues = {k: QueueUrls(v["url"], v["dlq_url"]) for k, v in raw_queues.items()}
            return cls(
                vendor_url=get("VENDOR_URL") or profile_base_url(get("PROFILE")),
                token=get("VENDOR_TOKEN"),
                token_parameter=get("VENDOR_TOKEN_PARAMETER"),
                backend=_backend(get("BACKEND", "aws")),
                rate_calls=int(get("RATE_CALLS", "100")),
                rate_period=float(get("RATE_PERIOD", "1")),
                stage=get("STAGE"),
                profile=get("PROFILE"),
                queues=queues,
                drain_functions=_names(get("DRAIN_FUNCTIONS", "{}")),
                sink=get("SINK"),
                state_table=get("STATE_TABLE"),
                state_retention_days=whole("STATE_RETENTION_DAYS", cls.state_retention_days),
                state_dir=get("STATE_DIR"),
                max_receive_count=int(get("MAX_RECEIVE_COUNT", "5")),
                concurrency=int(get("CONCURRENCY", "64")),
                safety_margin=float(get("SAFETY_MARGIN", "30")),
                visibility_timeout=float(get("VISIBILITY_TIMEOUT", "180")),
                read_timeout=float(get("READ_TIMEOUT", "10")),
                retry_delay=float(get("RETRY_DELAY", "5")),
                wait_seconds=float(get("WAIT_SECONDS", "5")),
                allow_http=get("ALLOW_HTTP", "false").lower() in TRUE_WORDS,
                max_pages=whole("MAX_PAGES", cls.max_pages),
                max_retry_after=float(get("MAX_RETRY_AFTER", str(cls.max_retry_after))),
                max_page_bytes=whole("MAX_PAGE_BYTES", cls.max_page_bytes),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"bad HARVEST_* environment: {exc}") from exc

    def to_env(self) -> dict[str, str]:
        """The environment that `from_env` reads back into this config (token excluded)."""
        return {
            ENV_PREFIX + k: v
            for k, v in {
                "VENDOR_URL": self.vendor_url,
                "VENDOR_TOKEN_PARAMETER": self.token_parameter,
                "BACKEND": self.backend,
                "RATE_CALLS": str(self.rate_calls),
                "RATE_PERIOD": str(self.rate_period),
                "STAGE": self.stage,
                "PROFILE": self.profile,
                "QUEUES": json.dumps(
                    {k: {"url": q.url, "dlq_url": q.dlq_url} for k, q in self.queues.items()}
                ),
                "DRAIN_FUNCTIONS": json.dumps(dict(self.drain_functions))
                if self.drain_functions
                else "",
                "SINK": self.sink,
                "STATE_TABLE": self.state_table,
                "STATE_RETENTION_DAYS": str(self.state_retention_days),
                "STATE_DIR": self.state_dir,
                "MAX_RECEIVE_COUNT": str(self.max_receive_count),
                "CONCURRENCY": str(self.concurrency),
                "SAFETY_MARGIN": str(self.safety_margin),
                "VISIBILITY_TIMEOUT": str(self.visibility_timeout),
                "READ_TIMEOUT": str(self.read_timeout),
                "RETRY_DELAY": str(self.retry_delay),
                "WAIT_SECONDS": str(self.wait_seconds),
                "ALLOW_HTTP": "true" if self.allow_http else "",
                "MAX_PAGES": str(self.max_pages),
                "MAX_RETRY_AFTER": str(self.max_retry_after),
                "MAX_PAGE_BYTES": str(self.max_page_bytes),
            }.items()
            if v
        }


def profile_base_url(name_or_path: str) -> str:
    """The base URL a profile gives, for when HARVEST_VENDOR_URL is not set ("" if none)."""
    return load_profile(name_or_path).base_url


def _names(text: str) -> dict[str, str]:
    """HARVEST_DRAIN_FUNCTIONS: a JSON object of stage to function name."""
    try:
        raw = json.loads(text)
    except ValueError:
        raw = None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in raw.items()
    ):
        raise ConfigError(
            "HARVEST_DRAIN_FUNCTIONS must be a JSON object of stage to function name,"
            f' such as {{"troops": "harvest-drain-troops"}}; got {text[:200]!r}'
        )
    return dict(raw)


def _backend(name: str) -> Backend:
    try:
        return Backend(name)
    except ValueError:
        raise ConfigError(f"backend must be 'aws' or 'local', not {name!r}") from None
