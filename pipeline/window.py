"""A run's time window, and the run id that follows from it (rerunning a window is the same run)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property, lru_cache

from pipeline.errors import ConfigError


def parse_instant(text: str) -> datetime:
    """An RFC 3339 instant as an aware UTC datetime; ConfigError if it is not one."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"not an RFC 3339 instant: {text!r}") from exc
    if value.tzinfo is None:
        raise ConfigError(f"RFC 3339 instant needs a UTC offset or 'Z': {text!r}")
    return value.astimezone(UTC)


def format_instant(value: datetime) -> str:
    """RFC 3339 in UTC with a 'Z', whole seconds: the form the vendor and run ids use."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def point_text(value: datetime) -> str:
    """A point's timestamp as the output writes it when the vendor sends a number (Unix
    seconds or milliseconds): RFC 3339 in UTC with a 'Z', and six fractional digits only
    when there is a fraction (as vendor-api.md's points are written)."""
    value = value.astimezone(UTC)
    clock = value.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{clock}.{value.microsecond:06d}Z" if value.microsecond else f"{clock}Z"


@dataclass(frozen=True)
class Window:
    """The half-open interval [start, end) whose data a run harvests."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start >= self.end:
            raise ConfigError(
                f"window start {format_instant(self.start)} is not before end "
                f"{format_instant(self.end)}"
            )

    @classmethod
    def parse(cls, start: str, end: str) -> Window:
        return _parse_window(start, end)

    @classmethod
    def previous_day(cls, now: datetime | None = None) -> Window:
        """Yesterday in UTC: the scheduled kickoff's default."""
        today = (
            (now or datetime.now(UTC))
            .astimezone(UTC)
            .replace(hour=0, minute=0, second=0, microsecond=0)
        )
        return cls(today - timedelta(days=1), today)

    @cached_property
    def run_id(self) -> str:
        return f"{self.start:%Y%m%dT%H%M%SZ}-{self.end:%Y%m%dT%H%M%SZ}"

    @cached_property
    def from_text(self) -> str:
        return format_instant(self.start)

    @cached_property
    def to_text(self) -> str:
        return format_instant(self.end)


# Every message of a run carries the same two instants: parse them once (a Window is immutable).
@lru_cache(maxsize=64)
def _parse_window(start: str, end: str) -> Window:
    return Window(parse_instant(start), parse_instant(end))
