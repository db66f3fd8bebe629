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


class BuiltWithClient(Built):
    """A fake build whose vendor client, as Runtime.client, is made on first use."""

    builds = 0

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        BuiltWithClient.builds += 1
        self.clients_made = 0
        self._client: object | None = None

    @property
    def client(self) -> object:
        if self._client is None:
            self.clients_made += 1
            self._client = object()
        return self._client


@pytest.fixture
def in_lambda(fresh: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """A Lambda sandbox's environment for an AWS-backend configuration, with fake builds."""
    aws = config(tmp_path, Backend.AWS)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "harvest-drain-warriors")
    for name, value in aws.to_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HARVEST_VENDOR_TOKEN", aws.token)
    monkeypatch.setattr(BuiltWithClient, "builds", 0)
    monkeypatch.setattr(pipeline.aws.runtime, "build", BuiltWithClient)
    return aws


def test_in_lambda_the_runtime_and_vendor_client_are_built_at_init_for_the_handler(
    in_lambda: Config,
) -> None:
    # WHEN a handler module prepares at import, then its handler asks for the runtime
    prepared = backends.prepare()
    handed = backends.runtime(Config.from_env())

    # THEN the handler gets the one built at init, its vendor client already made
    assert isinstance(prepared, BuiltWithClient)
    assert handed is prepared
    assert BuiltWithClient.builds == 1
    assert prepared.clients_made == 1


def test_the_kickoff_leaves_its_vendor_client_to_the_handler(in_lambda: Config) -> None:
    # The token read is an AWS request, which the kickoff's patched botocore would trace
    prepared = backends.prepare(vendor_client=False)

    assert isinstance(prepared, BuiltWithClient)
    assert prepared.clients_made == 0


def test_outside_lambda_nothing_is_built_at_import(
    in_lambda: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME")

    assert backends.prepare() is None
    assert BuiltWithClient.builds == 0


def test_the_local_backend_builds_nothing_at_import(
    in_lambda: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARVEST_BACKEND", "local")

    assert backends.prepare() is None
    assert BuiltWithClient.builds == 0


def test_a_build_that_fails_at_init_is_logged_and_fails_again_in_the_handler(
    in_lambda: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(config: Config) -> Any:
        raise RuntimeError("no such table")

    monkeypatch.setattr(pipeline.aws.runtime, "build", broken)

    # WHEN the build fails at import THEN the import goes on, with the error logged
    assert backends.prepare() is None
    assert "could not build the runtime at init" in caplog.text

    # AND the handler's own build fails with it, where the invocation reports it
    with pytest.raises(RuntimeError, match="no such table"):
        backends.runtime(Config.from_env())
