"""A local run's time series: one sample a second, appended to a file in the state directory.

Appended, so that a resumed run adds to what the stopped one sampled (each process's
samples share its `started`); read back for the chart of a run and, while a run is going,
by `harvest status` for what only the running process knows (a pause, a stalled call).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aws_lambda_powertools import Logger

logger = Logger(service="harvest", child=True)

SAMPLES_FILE = "samples.jsonl"
SAMPLE_SECONDS = 1.0
# A run whose last sample is older than this is not running (it samples every second).
LIVE_SECONDS = 5.0
# The last sample is found within this many bytes of the end of the file.
TAIL_BYTES = 16384


@dataclass(frozen=True)
class Sample:
    """One look at a local run: its queues, this process's vendor calls, what it waits on."""

    run_id: str
    at: float  # epoch seconds
    started: float  # when this process started the run (epoch seconds): one per resume
    visible: Mapping[str, int]  # messages per stage queue that a drain may receive now
    in_flight: Mapping[str, int]  # messages per stage queue hidden now (held or delayed)
    dead: Mapping[str, int]  # messages per stage DLQ
    calls: int  # vendor calls this process has made
    rate_limited: int  # 429s this process has drawn
    limit: float  # calls per second allowed
    paused_for: float = 0.0  # seconds left of the budget's pause
    pause_why: str = ""
    stalled: tuple[tuple[str, float], ...] = ()  # (call, seconds in flight)

    def queued(self, stage: str) -> int:
        return self.visible.get(stage, 0) + self.in_flight.get(stage, 0)

    def to_json(self) -> str:
        data: dict[str, Any] = {
            "run_id": self.run_id,
            "at": round(self.at, 3),
            "started": round(self.started, 3),
            "visible": dict(self.visible),
            "in_flight": dict(self.in_flight),
            "dead": dict(self.dead),
            "calls": self.calls,
            "rate_limited": self.rate_limited,
            "limit": self.limit,
        }
        if self.paused_for:
            data["paused_for"] = round(self.paused_for, 3)
            data["pause_why"] = self.pause_why
        if self.stalled:
            data["stalled"] = [[call, round(seconds, 1)] for call, seconds in self.stalled]
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Sample:
        data = json.loads(line)
        return cls(
            run_id=str(data["run_id"]),
            at=float(data["at"]),
            started=float(data["started"]),
            visible={str(k): int(v) for k, v in data["visible"].items()},
            in_flight={str(k): int(v) for k, v in data["in_flight"].items()},
            dead={str(k): int(v) for k, v in data["dead"].items()},
            calls=int(data["calls"]),
            rate_limited=int(data["rate_limited"]),
            limit=float(data["limit"]),
            paused_for=float(data.get("paused_for", 0.0)),
            pause_why=str(data.get("pause_why", "")),
            stalled=tuple((str(c), float(s)) for c, s in data.get("stalled", [])),
        )


class SampleLog:
    """Appends samples to one file, a line each, written through at once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # A process killed mid-write left half a line: start on a line of our own.
        torn = False
        try:
            with open(path, "rb") as f:
                if f.seek(0, os.SEEK_END):
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
        except FileNotFoundError:
            pass
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open
        if torn:
            self._file.write("\n")
        self._failed = False

    def append(self, sample: Sample) -> None:
        if self._failed:
            return
        try:
            self._file.write(sample.to_json() + "\n")
            self._file.flush()
        except OSError as exc:
            # The samples only draw the run: a full disk must not stop it.
            self._failed = True
            logger.warning("samples not written; the run goes on", extra={"error": str(exc)})

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass  # what could not be written was reported when it was not


def _parse(lines: list[str]) -> list[Sample]:
    samples = []
    for line in lines:
        try:
            samples.append(Sample.from_json(line))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a line cut short by a kill
    return samples


def read(path: Path, run_id: str | None = None) -> list[Sample]:
    """Every sample in the file (of `run_id` only, if given), oldest first."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    samples = _parse(text.splitlines())
    return [s for s in samples if run_id is None or s.run_id == run_id]


def tail(path: Path, n: int = 2) -> list[Sample]:
    """The last `n` samples in the file, oldest first."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    return _parse(text.splitlines())[-n:]
