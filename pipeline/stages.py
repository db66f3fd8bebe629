"""The default profile's stages (Hermes v1: troops -> warriors -> data groups), by name.

For tests and examples only: the pipeline takes its stages from the profile it runs with
(`Profile.stages`), and no module under pipeline/ or workers/ imports this one
(tests/test_layout.py).
"""

from __future__ import annotations

from pipeline.profile import Profile, Stage, load

DEFAULT: Profile = load()
STAGES: tuple[Stage, ...] = DEFAULT.stages
STAGE_NAMES: tuple[str, ...] = DEFAULT.stage_names
# The kickoff's own listing: it fans every troop out to the first stage.
ROOT_PATH = DEFAULT.root.path
FIRST_STAGE = DEFAULT.first_stage


def stage(name: str) -> Stage:
    """The default profile's stage called `name`; KeyError names the known ones."""
    return DEFAULT.stage(name)


def upstream(name: str) -> tuple[str, ...]:
    """The stages that feed `name`, nearest last."""
    return DEFAULT.upstream(name)
