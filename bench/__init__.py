"""Throughput benchmarks: local harvests against the simulator (`make bench`; not run in CI)."""

from typing import Any, Protocol

# The simulator's niceness in every bench (`SimulatorProcess(nice=...)`): it plays a vendor on
# a machine of its own, and on the shared 2-core machine the scheduler otherwise leaves it
# waiting for a core long enough to stamp arrivals together. Traced in harvest-sized AWS-mode
# runs (docs/benchmarks.md, 2026-12-03): send to stamp p99.9 21.6 ms, 42 requests over 20 ms,
# at the default priority; 7.8 ms and 1 at nice -10. Needs root or CAP_SYS_NICE; without it,
# the bench says so under its lines.
VENDOR_NICE = -10


class Tree(Protocol):
    """What a bench scenario says of the vendor's tree and limit (both benches' scenarios)."""

    troops: int
    warriors: int
    data_groups: int
    vendor_calls: int
    rate_period: float
    latency: float


def vendor_tree(scenario: Tree) -> dict[str, Any]:
    """`SimulatorConfig` arguments for a scenario's tree, limit and latency."""
    return {
        "troops": scenario.troops,
        "warriors_per_troop": scenario.warriors,
        "data_groups_per_warrior": scenario.data_groups,
        "rate_calls": scenario.vendor_calls,
        "rate_period": scenario.rate_period,
        "latency": scenario.latency,
    }


def nice_note(nice: float | None) -> str:
    """What priority the simulator ran at, for under a bench line."""
    if nice is not None and nice <= VENDOR_NICE:
        return f"the simulator at nice {nice:.0f}"
    return (
        f"the simulator at nice {nice if nice is None else round(nice)} (could not raise it to"
        f" {VENDOR_NICE}: its arrival stamps carry this machine's scheduling delays)"
    )
