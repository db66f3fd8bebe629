"""Compare a run's output with an expected set of leaves (the simulator's ground truth)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pipeline.profile import load
from pipeline.sinks import Sink, read_run

# The ids of a leaf and its ancestors, one a level from the first (Hermes: troop, warrior,
# data group).
EntityPath = tuple[str, ...]


@dataclass
class Comparison:
    expected: int = 0
    found: int = 0
    missing: list[EntityPath] = field(default_factory=list)
    unexpected: list[EntityPath] = field(default_factory=list)
    different: list[EntityPath] = field(default_factory=list)
    duplicates: list[EntityPath] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not (self.missing or self.unexpected or self.different or self.duplicates)

    def describe(self) -> str:
        if self.exact:
            return f"output equals the ground truth: {self.found} records"
        return (
            f"output differs from the ground truth: {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.different)} with other points, "
            f"{len(self.duplicates)} duplicated (of {self.expected} expected)"
        )


def compare(
    sink: Sink,
    run_id: str,
    truth: Mapping[EntityPath, Sequence[Mapping[str, Any]]],
    keys: Sequence[str] | None = None,
) -> Comparison:
    """Every expected leaf present once with exactly its points, and nothing else.

    `keys` are the output record's id fields in level order, the profile's `keys` (default:
    the default profile's, troop_id, warrior_id, data_group_id); a record's path is its
    values of them.
    """
    if keys is None:
        keys = load().keys
    result = Comparison(expected=len(truth))
    seen: set[EntityPath] = set()
    for record in read_run(sink, run_id):
        # A missing key reads as None: the record is then unexpected.
        path = cast(EntityPath, tuple(record.get(key) for key in keys))
        result.found += 1
        if path in seen:
            result.duplicates.append(path)
            continue
        seen.add(path)
        if path not in truth:
            result.unexpected.append(path)
        elif [dict(p) for p in truth[path]] != record["points"] or record["run_id"] != run_id:
            result.different.append(path)
    result.missing = sorted(set(truth) - seen)
    return result
