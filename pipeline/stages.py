"""The three fan-out stages, declared once as data; the drain loop is generic over them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One level of the fan-out: which vendor listing it calls and where its children go."""

    name: str
    # Path template relative to the vendor base URL; `{id}` is the entity's own id,
    # percent-encoded as one path segment by the vendor client.
    path: str
    # The stage the listed items are fanned out to; None means the items are data points
    # written to the sink.
    child: str | None
    # Length of the entity path a message of this stage carries (troop, warrior, data group).
    depth: int


STAGES: tuple[Stage, ...] = (
    Stage(name="troops", path="/v1/troops/{id}/warriors", child="warriors", depth=1),
    Stage(name="warriors", path="/v1/warriors/{id}/data-groups", child="data_groups", depth=2),
    Stage(name="data_groups", path="/v1/data-groups/{id}/data", child=None, depth=3),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
# The kickoff's own listing: it fans every troop out to the first stage.
ROOT_PATH = "/v1/troops"
FIRST_STAGE = STAGES[0].name


def stage(name: str) -> Stage:
    """The stage called `name`; KeyError names the known ones."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"unknown stage {name!r}; known: {', '.join(STAGE_NAMES)}")


def upstream(name: str) -> tuple[str, ...]:
    """The stages that feed `name`, nearest last."""
    names = list(STAGE_NAMES)
    return tuple(names[: names.index(name)])
