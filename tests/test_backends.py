"""workers.backends: the Runtime a handler's configuration asks for, and the garbage collector
around a Lambda sandbox's first one."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pipeline.aws.runtime
import pipeline.local.runtime
from pipeline.config import Backend, Config
from pipeline.runtime import reset_cache
from tests.conftest import local_config
from workers import backends


class Built:
    """What a fake build returns: it notes whether the collector ran while it was built."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.collector_on = gc.isenabled()

    def close(self) -> None:
        pass


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """A process that has built no Runtime yet, with fake builds; the gc.freeze calls made."""
    froze: list[str] = []
    monkeypatch.setattr(backends, "_frozen", threading.Event())
    monkeypatch.setattr(gc, "freeze", lambda: froze.append("freeze"))
    monkeypatch.setattr(pipeline.aws.runtime, "build", Built)
    monkeypatch.setattr(pipeline.local.runtime, "build", Built)
    reset_cache()
    try:
        yield froze
    finally:
        reset_cache()
        gc.enable()


def config(tmp_path: Path, backend: Backend, **changes: Any) -> Config:
    return local_config(tmp_path, "http://127.0.0.1:9").with_(backend=backend, **changes)


def test_the_first_aws_runtime_is_built_without_collections_then_frozen_once(
    fresh: list[str], tmp_path: Path
) -> None:
    # WHEN a Lambda sandbox builds its Runtime, then builds another (another configuration)
    first = backends.runtime(config(tmp_path, Backend.AWS))
    second = backends.runtime(config(tmp_path, Backend.AWS, rate_calls=7))

    # THEN the first was built with the collector off, and what was alive then was frozen;
    # the collector runs again, and the second build neither stops it nor freezes again
    assert isinstance(first, Built) and not first.collector_on
    assert isinstance(second, Built) and second.collector_on
    assert fresh == ["freeze"]
    assert gc.isenabled()


def test_a_failed_first_build_leaves_the_collector_running_and_the_next_one_freezes(
    fresh: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(config: Config) -> Any:
        raise RuntimeError("no table")

    monkeypatch.setattr(pipeline.aws.runtime, "build", broken)

    with pytest.raises(RuntimeError, match="no table"):
        backends.runtime(config(tmp_path, Backend.AWS))

    assert gc.isenabled()
    assert fresh == []

    monkeypatch.setattr(pipeline.aws.runtime, "build", Built)
    built = backends.runtime(config(tmp_path, Backend.AWS))

    assert isinstance(built, Built) and not built.collector_on
    assert fresh == ["freeze"]


def test_the_local_backend_leaves_the_collector_alone(fresh: list[str], tmp_path: Path) -> None:
    built = backends.runtime(config(tmp_path, Backend.LOCAL))

    assert isinstance(built, Built) and built.collector_on
    assert fresh == []
    assert gc.isenabled()


def test_a_collector_turned_off_before_the_first_build_stays_off(
    fresh: list[str], tmp_path: Path
) -> None:
    gc.disable()

    backends.runtime(config(tmp_path, Backend.AWS))

    assert not gc.isenabled()
    assert fresh == ["freeze"]
