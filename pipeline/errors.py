"""The error hierarchy: one base class, one subclass per way the drain must react."""

from __future__ import annotations


def quoted(value: object, limit: int = 200) -> str:
    """`value` as an error message quotes untrusted input: ASCII (no control characters or
    lone surrogates reach a log, a queue attribute or the ledger), cut to `limit`."""
    text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


class HarvestError(Exception):
    """Base class of every error this package raises on purpose."""


class VendorError(HarvestError):
    """A vendor call failed; the subclass says what the drain does about it."""


class GoneError(VendorError):
    """404: the entity no longer exists. The message is done, recorded as gone."""


class PoisonError(VendorError):
    """400, or a request that can never succeed. The message goes to its DLQ at once."""


class AuthError(VendorError):
    """401: the token is wrong. The drain stops and alerts; messages stay queued."""


class RetryableError(VendorError):
    """5xx, stall, truncated body, or 429 after retries: the message returns via the queue.

    `retry_after`, when set, is the vendor's own wait (a long Retry-After): the message stays
    hidden at least that long instead of the drain's backoff.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimitedError(RetryableError):
    """429 from the vendor (or a budget paused by one), carrying its Retry-After in seconds."""

    retry_after: float

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, retry_after)


class MessageError(HarvestError):
    """A queue message is malformed, oversize, or of an unknown stage or version."""


class ConfigError(HarvestError):
    """The configuration is incomplete or inconsistent."""
