"""Shared fixtures: a started simulator, a local Config builder, a settler.

Reuse these rather than building the same objects by hand:

- ``simulator(**overrides)`` starts a :class:`Simulator` (a small tree, rate limit out of
  the way) and stops it after the test.
- ``local_config(tmp_path, url, token, **overrides)`` builds a local-backend ``Config``
  whose sink is ``tmp_path/out`` and whose state sits in ``tmp_path/out/.harvest``: the
  layout ``harvest status/dlq/replay --out tmp_path/out`` reads. Also a fixture of the same
  name that returns this builder.
- ``local_runtime(config)`` builds the Runtime of a config and closes it after the test.
- A Lambda context for calling handlers: ``pipeline.local.scheduler.LocalContext(name, timeout)``.
- ``settle(rt, run_id)`` drives the three drains (concurrently, as EventBridge would) until
  the run has settled and every queue is empty; it returns the final RunStatus.

`make test` runs the suite on two pytest-xdist workers: the Terraform apply module on one
(about 200 s, most of it waiting), every other test in order on the other
(`pytest_xdist_make_scheduler` below).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Backend, Config
from pipeline.dev.simulator import Simulator, SimulatorConfig
from pipeline.drain import monotonic_deadline
from pipeline.ledger import RunStatus
from pipeline.local.runtime import build
from pipeline.runtime import Runtime
from pipeline.stages import STAGE_NAMES
from pipeline.window import Window

# The module that applies and destroys the whole stack: a worker of its own under xdist.
DEPLOY_MODULE = "tests/integration/test_terraform_apply.py"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadgroup`: two work units, each run in order on a worker of its own. One is
    the Terraform apply module, which mostly waits (the AWS provider polling moto for what
    it created); the other is every other test. That one stays on one worker because many
    of its tests measure pace and 429s: run beside each other, they would measure the
    machine. (pytest-xdist's own loadgroup reads `xdist_group` marks through a node id
    attribute pytest 9 no longer uses.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class DeployBeside(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "deploy" if nodeid.startswith(DEPLOY_MODULE) else "rest"

    return DeployBeside(config, log)


WINDOW = Window.parse("2024-03-01T00:00:00Z", "2024-03-02T00:00:00Z")
TOKEN = SimulatorConfig.token
# A small tree with the vendor's rate limit out of the way unless a test is about it.
SMALL_TREE = SimulatorConfig(
    troops=2, warriors_per_troop=2, data_groups_per_warrior=3, rate_calls=10**6
)


def local_config(tmp_path: Path, url: str, token: str = TOKEN, **overrides: Any) -> Config:
    """A local-backend Config tuned for tests: fast polls, short timeouts, a roomy budget."""
    out = tmp_path / "out"
    settings: dict[str, Any] = {
        "vendor_url": url,
        "allow_http": True,  # the simulator serves plain http on loopback
        "token": token,
        "backend": Backend.LOCAL,
        "sink": str(out),
        "state_dir": str(out / ".harvest"),
        "rate_calls": 1000,
        "rate_period": 1.0,
        "concurrency": 4,
        "max_receive_count": 5,
        "retry_delay": 0.1,
        "read_timeout": 2.0,
        "visibility_timeout": 30.0,
        "safety_margin": 0.5,
        "wait_seconds": 0.1,
    }
    settings.update(overrides)
    return Config(**settings)


@pytest.fixture(name="local_config")
def local_config_fixture() -> Callable[..., Config]:
    return local_config


@pytest.fixture
def simulator() -> Iterator[Callable[..., Simulator]]:
    """Factory: `simulator(troops=3, error_rate=0.1, ...)` → a started Simulator."""
    started: list[Simulator] = []

    def make(config: SimulatorConfig | None = None, **overrides: Any) -> Simulator:
        sim = Simulator(replace(config or SMALL_TREE, **overrides))
        sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.stop()


@pytest.fixture
def local_runtime() -> Iterator[Callable[[Config], Runtime]]:
    """Factory: the Runtime of a config, closed after the test."""
    built: list[Runtime] = []

    def make(config: Config) -> Runtime:
        rt = build(config)
        built.append(rt)
        return rt

    yield make
    for rt in built:
        rt.close()


def queued(rt: Runtime) -> dict[str, int]:
    """Messages (visible or in flight) in each stage's queue."""
    return {s: rt.queues[s].depth().total for s in STAGE_NAMES}


def settle(
    rt: Runtime,
    run_id: str,
    *,
    rounds: int = 20,
    seconds: float = 5.0,
    until: Callable[[RunStatus], bool] = lambda s: s.settled,
) -> RunStatus:
    """Invoke every stage's drain at once, round after round, until `until(status)` holds
    and no queue holds a message; fail after `rounds` rounds of at most `seconds` each."""
    last: RunStatus | None = None
    with ThreadPoolExecutor(len(STAGE_NAMES), thread_name_prefix="settle") as pool:
        for _ in range(rounds):
            futures = [
                pool.submit(rt.run_drain, s, monotonic_deadline(seconds)) for s in STAGE_NAMES
            ]
            for f in futures:
                f.result()
            last = rt.ledger.status(run_id)
            if last is not None and until(last) and not any(queued(rt).values()):
                return last
    raise AssertionError(f"run {run_id} did not settle in {rounds} rounds: {last}; {queued(rt)}")


@pytest.fixture(name="settle")
def settle_fixture() -> Callable[..., RunStatus]:
    return settle


def expected_counts(sim: Simulator) -> dict[str, tuple[int, int]]:
    """(entities, of which gone) per stage that a correct harvest of `sim` records."""
    c = sim.config
    gone = sim.gone()
    gone_warriors = sum(1 for p in gone if len(p) == 2)
    gone_groups = sum(1 for p in gone if len(p) == 3)
    warriors = c.troops * c.warriors_per_troop
    return {
        "troops": (c.troops, 0),
        "warriors": (warriors, gone_warriors),
        "data_groups": ((warriors - gone_warriors) * c.data_groups_per_warrior, gone_groups),
    }


def assert_counts_exact(status: RunStatus, sim: Simulator) -> None:
    """Every stage's ledger counts equal what the simulator's tree implies, nothing dead."""
    for name, (entities, gone) in expected_counts(sim).items():
        counts = status.stages[name]
        assert (counts.enqueued, counts.done + counts.gone, counts.gone, counts.dead) == (
            entities,
            entities,
            gone,
            0,
        ), name
