"""The run ledger: per run and stage, which entities were enqueued, done, gone or dead.

Entities are keyed (stage, entity key), so duplicate deliveries and redeliveries after a
crash count once: counts are exact under at-least-once delivery. A run is *settled* when
everything enqueued is done, gone or dead, and *complete* when it is settled with nothing
dead. `pipeline.local.ledger.SqliteLedger` serves local runs;
`pipeline.aws.ledger.DynamoLedger` keeps the same records in the state table in AWS.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class State(StrEnum):
    """Where an entity of a run stands: queued until a drain finishes it done, gone or dead."""

    QUEUED = "queued"
    DONE = "done"
    GONE = "gone"
    DEAD = "dead"


FINAL_STATES = (State.DONE, State.GONE, State.DEAD)
STAT_FIELDS = ("calls", "rate_limited", "retries")
# (entity key, final state, error) of one entity a drain has finished with.
Finished = tuple[str, State, str]
# (entity key, path) of one entity.
Entity = tuple[str, tuple[str, ...]]


def path_json(path: Sequence[str]) -> str:
    """An entity path as stored: JSON, ASCII-escaped (a bad id may hold a lone surrogate,
    which neither SQLite nor DynamoDB can store as text)."""
    return json.dumps(list(path), ensure_ascii=True)


def storable(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class StageCounts:
    enqueued: int = 0
    done: int = 0
    gone: int = 0
    dead: int = 0

    @property
    def pending(self) -> int:
        return self.enqueued - self.done - self.gone - self.dead


@dataclass(frozen=True)
class DeadEntity:
    stage: str
    path: tuple[str, ...]
    error: str


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    window_from: str
    window_to: str
    kicked_off: bool
    started_at: float
    completed_at: float | None
    stages: Mapping[str, StageCounts]
    stats: Mapping[str, int] = field(default_factory=dict)
    # What the last manifest written for this run said (see `signature`), "" if none.
    manifest_signature: str = ""

    @property
    def signature(self) -> str:
        """The counts a manifest reports: a new manifest is due when they change."""
        return json.dumps(
            {n: [c.enqueued, c.done, c.gone, c.dead] for n, c in sorted(self.stages.items())}
        )

    @property
    def settled(self) -> bool:
        """Kicked off, and everything enqueued is done, gone or dead."""
        return self.kicked_off and all(c.pending == 0 for c in self.stages.values())

    @property
    def dead(self) -> int:
        return sum(c.dead for c in self.stages.values())

    @property
    def complete(self) -> bool:
        return self.settled and self.dead == 0


class Ledger(Protocol):
    """Run records and per-entity states; every write is idempotent."""

    def start_run(self, run_id: str, window_from: str, window_to: str) -> None: ...

    def kicked_off(self, run_id: str) -> None: ...

    def enqueued(
        self,
        run_id: str,
        stage: str,
        entities: Sequence[Entity],
        parent: tuple[str, str] | None = None,
    ) -> None:
        """Record (key, path) entities as queued unless already known.

        `parent` (its stage and key) remembers them as that parent's children.
        """

    def enqueued_many(
        self, run_id: str, stage: str, listings: Sequence[tuple[tuple[str, str], Sequence[Entity]]]
    ) -> None:
        """`enqueued` for several parents' listings at once: (parent, entities) each."""

    def children(self, run_id: str, parent_stage: str, parent_key: str) -> set[str]:
        """Keys of the children recorded for a parent by `enqueued`."""

    def finish_pending(self, run_id: str, stage: str, entries: Sequence[Finished]) -> int:
        """`finish` only the entities still queued; return how many changed."""

    def pending(self, run_id: str, stage: str) -> list[Entity]:
        """The entities of a stage still queued."""

    def finish(self, run_id: str, stage: str, key: str, state: State, error: str = "") -> None:
        """Move an entity to done, gone or dead. dead never overwrites done or gone."""

    def finish_many(self, run_id: str, stage: str, entries: Sequence[Finished]) -> None:
        """`finish` for several entities of one stage at once (one write where the store allows)."""

    def record_error(self, run_id: str, stage: str, key: str, error: str) -> None:
        """Remember the last error of an entity that will be retried."""

    def finished(self, run_id: str, stage: str, keys: Sequence[str]) -> set[str]:
        """Those of `keys` that are done or gone (nothing left to do for them)."""

    def add_stats(self, run_id: str, **amounts: int) -> None: ...

    def status(self, run_id: str) -> RunStatus | None: ...

    def dead(self, run_id: str) -> list[DeadEntity]: ...

    def last_error(self, run_id: str, stage: str, key: str) -> str: ...

    def mark_completed(self, run_id: str) -> bool:
        """Record completion; True only for the call that recorded it first."""

    def mark_manifest(self, run_id: str, signature: str) -> None:
        """Remember the signature of the manifest just written."""

    def mark_quiet(self, run_id: str, at: float | None) -> float | None:
        """Note that no queue held a message at `at` (None: one did); return since when
        they have been empty without interruption, or None."""

    def runs(self) -> list[str]:
        """Known run ids, newest first."""

    def open_runs(self, since: float) -> list[str]:
        """Runs started after `since` (epoch seconds) that have neither completed nor
        settled incomplete with their manifest written (a replay touches those again)."""

    def open_run_starts(self, since: float) -> dict[str, float]:
        """`open_runs` with when each started (epoch seconds), oldest first: read from the
        run list alone, without a run's entities."""


def stage_counts(
    rows: Iterable[tuple[str, str, int]], stages: Iterable[str]
) -> dict[str, StageCounts]:
    """Counts per stage: every one of `stages` (the profile's, in order), and any other a
    row names."""
    tally: dict[str, dict[str, int]] = {s: {} for s in stages}
    for stage, state, n in rows:
        tally.setdefault(stage, {})[state] = tally.get(stage, {}).get(state, 0) + n
    return {
        stage: StageCounts(
            enqueued=sum(t.values()),
            done=t.get(State.DONE, 0),
            gone=t.get(State.GONE, 0),
            dead=t.get(State.DEAD, 0),
        )
        for stage, t in tally.items()
    }
