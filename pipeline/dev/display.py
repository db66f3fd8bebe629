"""What the CLI shows people: the live harvest table, run status bars, waits, DLQ listings,
summaries."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from rich.console import Console, Group
from rich.markup import escape
from rich.progress_bar import ProgressBar
from rich.table import Table

from pipeline.ledger import RunStatus
from pipeline.local.scheduler import LocalResult, Progress
from pipeline.local.waits import Wait
from pipeline.replay import DeadLetter


def progress_table(p: Progress) -> Table:
    table = Table(
        title=f"harvest — {p.elapsed:6.1f} s, {p.drains_running} drains running",
        title_justify="left",
    )
    for column in ("stage", "queued", "in flight", "done", "gone", "dead", "progress"):
        table.add_column(column, justify="left" if column in ("stage", "progress") else "right")
    for name, s in p.stages.items():
        finished = s.done + s.gone
        table.add_row(
            name,
            str(s.queued),
            str(s.in_flight),
            str(s.done),
            str(s.gone),
            str(s.dead),
            ProgressBar(total=max(1, s.enqueued), completed=finished, width=30),
        )
    share = p.calls_per_second / p.limit_per_second if p.limit_per_second else 0.0
    table.caption = (
        f"{p.calls} calls, {p.calls_per_second:6.1f}/s of {p.limit_per_second:g}/s "
        f"({share:4.0%} of the limit), {p.rate_limited} × 429, {p.retries} retries"
        + "".join(f"\nwaiting: {escape(w.text)}" for w in p.waits)
    )
    table.caption_justify = "left"
    return table


def status_view(status: RunStatus) -> Group:
    state = (
        "complete" if status.complete else "settled, incomplete" if status.settled else "running"
    )
    table = Table(title=f"run {status.run_id} ({status.window_from} → {status.window_to}): {state}")
    for column in ("stage", "enqueued", "done", "gone", "dead", "pending", "progress"):
        table.add_column(column)
    for name, c in status.stages.items():
        table.add_row(
            name,
            str(c.enqueued),
            str(c.done),
            str(c.gone),
            str(c.dead),
            str(c.pending),
            ProgressBar(total=max(1, c.enqueued), completed=c.done + c.gone, width=30),
        )
    stats = status.stats
    table.caption = (
        f"{stats.get('calls', 0)} calls, {stats.get('rate_limited', 0)} × 429, "
        f"{stats.get('retries', 0)} retries; kicked off: {'yes' if status.kicked_off else 'no'}"
    )
    return Group(table)


def waits_lines(waits: Sequence[Wait]) -> str:
    """What a run waits for, a line each (plain text: print it without markup)."""
    return "\n".join(f"  waiting: {w.text}" for w in waits)


def dlq_view(stage: str, letters: Sequence[DeadLetter]) -> Table:
    table = Table(title=f"{len(letters)} dead letters in the {stage} DLQ, grouped by reason")
    table.add_column("count", justify="right")
    table.add_column("reason")
    table.add_column("example entity")
    groups = Counter(letter.reason for letter in letters)
    for reason, count in groups.most_common():
        example = next(letter for letter in letters if letter.reason == reason)
        table.add_row(str(count), reason, " / ".join(example.path) or "(unparseable body)")
    return table


def print_summary(console: Console, r: LocalResult) -> None:
    status = r.status
    lines = [
        f"run {r.run_id}: "
        + ("complete" if status and status.complete and not r.dlq_depth else "INCOMPLETE"),
        f"  calls {r.calls}, 429s {r.rate_limited}, retries {r.retries}",
        f"  wall time {r.wall_seconds:.1f} s; {r.calls / max(r.wall_seconds, 1e-9):.1f} calls/s "
        f"of a {r.limit_per_second:g}/s limit ({r.utilization:.0%} of the limit used)",
    ]
    if status:
        for name, c in status.stages.items():
            lines.append(
                f"  {name:<12} enqueued {c.enqueued}, done {c.done}, gone {c.gone}, dead {c.dead}"
            )
    lines.append(f"  output: {r.out / 'runs' / r.run_id / 'data'}")
    if r.manifest.exists():
        lines.append(f"  manifest: {r.manifest}")
    if r.chart is not None:
        lines.append(f"  chart: {r.chart}")
    if r.comparison is not None:
        lines.append(f"  check: {r.comparison.describe()}")
    if r.compaction:
        lines.append(f"  parquet: {r.compaction}")
    if r.dlq_depth:
        lines.append(
            f"  {r.dlq_depth} messages dead-lettered: see `harvest dlq STAGE --out {r.out}`,"
            f" then `harvest replay STAGE --out {r.out}` once the cause is fixed"
        )
    if r.stalled:
        lines.append("  stopped: nothing left to run but the ledger is not settled")
    if r.auth_error:
        lines.append(f"  STOPPED: {r.auth_error} (check the token)")
    console.print("\n".join(lines))
