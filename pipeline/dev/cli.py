"""The `harvest` command: local runs, the simulator, run status, DLQ inspection and replay."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.compact import DEFAULT_ROWS_PER_FILE
from pipeline.config import Backend, Config
from pipeline.errors import ConfigError, HarvestError
from pipeline.profile import AuthKind
from pipeline.profile import load as load_profile
from pipeline.window import Window

if TYPE_CHECKING:
    from pipeline.local.waits import Wait
    from pipeline.runtime import Runtime

DEFAULT_OUT = "harvest-out"
# The default simulated tree: 10 troops × 10 warriors × 10 data groups = 1,111 calls.
DEFAULT_TREE = {"troops": 10, "warriors": 10, "data_groups": 10}


def _window(args: argparse.Namespace) -> Window:
    if bool(args.start) != bool(args.end):
        raise ConfigError("give both --from and --to, or neither (the previous UTC day)")
    return Window.parse(args.start, args.end) if args.start else Window.previous_day()


def _local_config(out: str) -> Config:
    """Config for commands that read a local run's state (no vendor needed)."""
    root = Path(out)
    if not (root / ".harvest").is_dir():
        raise ConfigError(
            f"no local harvest state in {root}: run `harvest local --out {root}` first"
        )
    return Config(
        vendor_url="https://localhost",  # a placeholder: these commands never call the vendor
        backend=Backend.LOCAL,
        sink=str(root),
        state_dir=str(root / ".harvest"),
        profile=_recorded_profile(root),
    )


def _fanout(text: str | None) -> tuple[int, ...]:
    """`--sim-fanout 2,3,4` as (2, 3, 4); () if not given."""
    if not text:
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(
            f"fanout must be whole numbers separated by commas, not {text!r}"
        ) from None


def _recorded_profile(root: Path) -> str:
    """The profile the local runs in `root` use, as `harvest local` recorded it; else
    HARVEST_PROFILE, else "" (the default)."""
    from pipeline.local.scheduler import recorded_profile

    recorded = recorded_profile(root.resolve() / ".harvest")
    return recorded or os.environ.get("HARVEST_PROFILE", "")


def _state_config(args: argparse.Namespace) -> Config:
    if args.aws:
        config = Config.from_env()
        if config.backend != Backend.AWS:
            raise ConfigError(
                "--aws needs HARVEST_BACKEND=aws (or unset) and the HARVEST_* outputs"
            )
        return config
    return _local_config(args.out)


def _build(args: argparse.Namespace, config: Config) -> Runtime:
    """The deployed pipeline's objects with --aws, else the local run's."""
    from pipeline.aws import runtime as aws
    from pipeline.local import runtime as local

    return aws.build(config) if args.aws else local.build(config)


def cmd_local(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from pipeline.dev.display import print_summary, progress_table, waits_lines
    from pipeline.dev.simulator import SimulatorConfig, SimulatorProcess
    from pipeline.local.scheduler import LocalOptions, Progress, run_local

    token = args.token or os.environ.get("HARVEST_VENDOR_TOKEN")
    # The profile given, else the one --out's runs use, else HARVEST_PROFILE, else hermes-v1.
    profile_name = args.profile or _recorded_profile(Path(args.out))
    profile = load_profile(profile_name)
    if args.vendor_url and not token and profile.auth.kind != AuthKind.NONE:
        raise ConfigError("--vendor-url needs a token: --token or HARVEST_VENDOR_TOKEN")
    options = LocalOptions(
        window=_window(args),
        out=Path(args.out),
        vendor_url=args.vendor_url,
        allow_http=args.allow_http,
        token=token,
        rate_calls=args.rate_calls,
        rate_period=args.rate_period,
        tick=args.tick,
        concurrency=args.concurrency,
        verbose=args.verbose,
        profile=profile_name,
        simulator=SimulatorProcess(
            SimulatorConfig(
                profile=profile,
                fanout=_fanout(args.sim_fanout),
                troops=args.sim_troops,
                warriors_per_troop=args.sim_warriors,
                data_groups_per_warrior=args.sim_data_groups,
                rate_calls=args.rate_calls,
                rate_period=args.rate_period,
                latency=args.sim_latency,
                error_rate=args.sim_error_rate,
                gone_rate=args.sim_gone_rate,
                nasty_ids=not args.sim_plain_ids,
            )
        ),
    )
    console = Console(stderr=True, soft_wrap=True)
    source = args.vendor_url or "the built-in simulator"
    console.print(f"harvesting {source} for {options.window.from_text} → {options.window.to_text}")
    if console.is_terminal:
        with Live(console=console, refresh_per_second=4) as live:

            def show(p: Progress) -> None:
                live.update(progress_table(p))

            result = run_local(options, show)
    else:
        last = [0.0]

        def show_plain(p: Progress) -> None:
            if p.elapsed - last[0] >= 5:
                last[0] = p.elapsed
                done = sum(s.done + s.gone for s in p.stages.values())
                queued = sum(s.queued + s.in_flight for s in p.stages.values())
                console.print(
                    f"{p.elapsed:6.1f} s: {done} done, {queued} queued, {p.calls} calls"
                    f" ({p.calls_per_second:.0f}/s of {p.limit_per_second:g}/s)"
                )
                if p.waits:
                    console.print(waits_lines(p.waits), markup=False, highlight=False)

        result = run_local(options, show_plain)
    if result.released_at_start or result.waited_at_start:
        console.print(
            f"resumed: {result.released_at_start} messages an earlier run held were released"
            f" at once; waited {result.waited_at_start:.1f} s for its last calls' window"
        )
    if result.interrupted:
        console.print(
            "harvest: stopped; calls in flight finished and were recorded, the rest went back"
            " to their queues; rerun the same command to resume"
        )
        return result.exit_code
    print_summary(Console(soft_wrap=True), result)
    return result.exit_code


def cmd_simulate(args: argparse.Namespace) -> int:
    from pipeline.dev.simulator import SimulatorConfig, serve

    config = SimulatorConfig(
        profile=load_profile(args.profile or os.environ.get("HARVEST_PROFILE", "")),
        seed=args.seed,
        fanout=_fanout(args.fanout),
        troops=args.troops,
        warriors_per_troop=args.warriors,
        data_groups_per_warrior=args.data_groups,
        token=os.environ.get("HARVEST_SIMULATOR_TOKEN", SimulatorConfig.token),
        rate_calls=args.rate_calls,
        rate_period=args.rate_period,
        latency=args.latency,
        error_rate=args.error_rate,
        stall_rate=args.stall_rate,
        truncate_rate=args.truncate_rate,
        gone_rate=args.gone_rate,
        nasty_ids=args.nasty_ids,
    )
    print(
        f"simulated vendor on http://{args.host}:{args.port} "
        f"(token from HARVEST_SIMULATOR_TOKEN or '{SimulatorConfig.token}'); "
        "ground truth at /_sim/truth?from=..&to=..; Ctrl-C stops",
        file=sys.stderr,
    )
    serve(config, host=args.host, port=args.port)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.dev.display import status_view, waits_lines

    if args.chart and args.aws:
        raise ConfigError("--chart draws a local run's samples: give --out, not --aws")
    rt = _build(args, _state_config(args))
    runs = rt.ledger.runs()
    run_id = args.run or (runs[0] if runs else None)
    status = rt.ledger.status(run_id) if run_id else None
    if status is None:
        raise ConfigError(f"no run {args.run!r}" if args.run else "no runs recorded yet")
    console = Console()
    console.print(status_view(status))
    for dead in rt.ledger.dead(status.run_id):
        console.print(f"  dead: {dead.stage} {' / '.join(dead.path)}: {dead.error}")
    waits = _waits(args, rt)
    if waits:
        console.print(waits_lines(waits), markup=False, highlight=False)
    if args.chart:
        from pipeline.local.chart import write_chart
        from pipeline.local.samples import SAMPLES_FILE
        from pipeline.local.scheduler import STATE_DIR

        out = Path(args.out)
        chart = write_chart(out / STATE_DIR / SAMPLES_FILE, out, status.run_id)
        if chart is None:
            raise ConfigError(f"no samples of run {status.run_id} in {out} to draw")
        console.print(f"chart: {chart}", markup=False, highlight=False)
    return 0 if status.complete else 1


def _waits(args: argparse.Namespace, rt: Runtime) -> list[Wait]:
    """What the run waits for: all the state shows locally; what SQS says with --aws."""
    import time

    from pipeline.local import waits

    if args.aws:
        return waits.sqs_waits(rt.queues, rt.dlqs, "--aws")
    from pipeline.local.runtime import LocalRuntime
    from pipeline.local.samples import SAMPLES_FILE, tail
    from pipeline.local.scheduler import STATE_DIR, owner_alive

    assert isinstance(rt, LocalRuntime)  # built without --aws
    state = Path(args.out) / STATE_DIR
    now = time.time()
    live = waits.live_run(tail(state / SAMPLES_FILE), now, owner_alive(state))
    if live.running:
        print(f"a `harvest local` is running on {args.out}: {live.calls_per_second:.0f} calls/s")
    if live.moving:
        return []
    return list(live.waits) + waits.local_waits(
        rt.store,
        rt.ledger,
        {s: q.depth().total for s, q in rt.queues.items()},
        {s: q.depth().total for s, q in rt.dlqs.items()},
        now=now,
        running=live.running,
        where=f"--out {args.out}",
        profile=rt.profile,
    )


def cmd_dlq(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pipeline.dev.display import dlq_view
    from pipeline.envelope import Envelope
    from pipeline.errors import MessageError
    from pipeline.replay import inspect

    rt = _build(args, _state_config(args))
    _known_stage(rt, args.stage)

    def last_error(body: str) -> str:
        try:
            e = Envelope.from_json(body, rt.profile)
        except MessageError:
            return ""
        return rt.ledger.last_error(e.run_id, e.stage, e.key)

    letters = inspect(rt.dlqs[args.stage], limit=args.limit, last_error=last_error)
    Console().print(dlq_view(args.stage, letters))
    return 0


def _known_stage(rt: Runtime, stage: str) -> None:
    if stage not in rt.profile.stage_names:
        known = ", ".join(rt.profile.stage_names)
        raise ConfigError(f"unknown stage {stage!r} (profile {rt.profile.name}: {known})")


def cmd_replay(args: argparse.Namespace) -> int:
    rt = _build(args, _state_config(args))
    _known_stage(rt, args.stage)
    report = rt.run_replay(args.stage, max_messages=args.max, dry_run=args.dry_run, rate=args.rate)
    verb = "would move" if args.dry_run else "moved"
    count = report.seen if args.dry_run else report.moved
    print(f"{verb} {count} messages from the {args.stage} DLQ to its queue")
    for reason, n in report.reasons.most_common():
        print(f"  {n:6d}  {reason}")
    if not args.dry_run and args.aws is False and count:
        print(f"run `harvest local --out {args.out}` with the same window to process them")
    return 0


# -- compacted output (pipeline/compact.py, pipeline/dev/query.py) --------------------------

ANALYTICS = "needs pyarrow and duckdb: pip install 'harvest[analytics]'"


def cmd_compact(args: argparse.Namespace) -> int:
    """Compact complete runs to Parquet: --run RUN (again, if done), else every one pending."""
    from pipeline.compact import compact_run, pending_runs

    rt = _build(args, _state_config(args))
    try:
        run_ids = [args.run] if args.run else pending_runs(rt.sink, rt.ledger.runs())
        if not run_ids:
            print("nothing to compact: every complete run has been compacted")
        for run_id in run_ids:
            try:
                done = compact_run(
                    rt.sink, run_id, rows_per_file=args.rows_per_file, keys=rt.profile.keys
                )
            except ImportError:
                raise ConfigError(f"harvest compact {ANALYTICS}") from None
            print(
                f"{run_id}: {done.rows} points from {done.raw_objects} raw objects in"
                f" {len(done.files)} Parquet files under {rt.sink.location}/points/"
            )
    finally:
        rt.close()
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    try:
        from pipeline.dev.query import query
    except ImportError:
        raise ConfigError(f"harvest query {ANALYTICS}") from None
    try:
        result = query(Path(args.out), args.sql)
    except ImportError:
        raise ConfigError(f"harvest query {ANALYTICS}") from None
    print(result.text())
    return 0


STEPS = {"day": timedelta(days=1), "hour": timedelta(hours=1)}


def windows(start: str, end: str, by: str) -> list[Window]:
    """[start, end) cut into windows of one `by` each (the last one may be shorter);
    `by` "whole" is the one window."""
    whole = Window.parse(start, end)
    if by == "whole":
        return [whole]
    step, cuts, at = STEPS[by], [], whole.start
    while at < whole.end:
        cuts.append(Window(at, min(at + step, whole.end)))
        at += step
    return cuts


def cmd_kickoff(args: argparse.Namespace) -> int:
    """Start one run per window (a backfill); a window already kicked off is left alone."""
    planned = windows(args.start, args.end, args.by)
    if args.aws:
        config = _state_config(args)
    else:
        token = os.environ.get("HARVEST_VENDOR_TOKEN", "")
        if not args.vendor_url or not token:
            raise ConfigError("a local kickoff needs --vendor-url and HARVEST_VENDOR_TOKEN")
        root = Path(args.out)
        config = Config(
            vendor_url=args.vendor_url,
            allow_http=args.allow_http,
            token=token,
            backend=Backend.LOCAL,
            sink=str(root),
            state_dir=str(root / ".harvest"),
            profile=args.profile or _recorded_profile(root),
        )
    lock = None
    if not args.aws:
        from pipeline.local.scheduler import claim_profile, own

        lock = own(Path(args.out) / ".harvest")  # no `harvest local` may run meanwhile
        claim_profile(Path(args.out).resolve() / ".harvest", config.profile)
    rt = _build(args, config)
    started = skipped = 0
    try:
        for window in planned:
            status = rt.ledger.status(window.run_id)
            if status is not None and status.kicked_off:
                print(f"{window.run_id}: already started, left alone")
                skipped += 1
            elif args.dry_run:
                print(f"{window.run_id}: would start")
            else:
                report = rt.run_kickoff(window)
                print(f"{window.run_id}: started, {report.troops} troops queued")
                started += 1
    finally:
        rt.close()
        if lock is not None:
            lock.close()
    verb = "would start" if args.dry_run else "started"
    count = len(planned) - skipped if args.dry_run else started
    print(f"{verb} {count} of {len(planned)} windows; {skipped} already started")
    if not args.aws and started:
        print(f"run `harvest local --out {args.out} --from T1 --to T2` for each window to drain it")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="harvest", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    local = sub.add_parser("local", help="harvest on this machine: embedded queues, local sink")
    local.add_argument("--vendor-url", help="a real vendor base URL (default: built-in simulator)")
    local.add_argument(
        "--profile",
        help="the vendor profile: a TOML file or a packaged profile's name (HARVEST_PROFILE;"
        " default hermes-v1); the built-in simulator serves it too (docs/profiles.md)",
    )
    local.add_argument(
        "--verbose",
        action="store_true",
        help="show the handlers' logs here too (always in the log file)",
    )
    local.add_argument(
        "--allow-http",
        action="store_true",
        help="allow a plain http:// --vendor-url: the token crosses the network unencrypted"
        " (the built-in simulator, on loopback, needs no flag)",
    )
    local.add_argument(
        "--token",
        help="vendor token (visible in `ps`: prefer the HARVEST_VENDOR_TOKEN variable)",
    )
    local.add_argument("--out", default=DEFAULT_OUT, help=f"output directory ({DEFAULT_OUT})")
    local.add_argument("--from", dest="start", help="window start, RFC 3339 (default: yesterday)")
    local.add_argument("--to", dest="end", help="window end, RFC 3339, exclusive")
    local.add_argument("--rate-calls", type=int, default=100, help="calls per period (100)")
    local.add_argument("--rate-period", type=float, default=1.0, help="period in seconds (1)")
    local.add_argument(
        "--tick", type=float, default=5.0, help="seconds between drain invocations (5; AWS: 60)"
    )
    local.add_argument(
        "--concurrency",
        type=int,
        default=64,
        help="most messages in process per drain invocation (rate x latency decides)",
    )
    local.add_argument("--sim-troops", type=int, default=DEFAULT_TREE["troops"])
    local.add_argument("--sim-warriors", type=int, default=DEFAULT_TREE["warriors"])
    local.add_argument("--sim-data-groups", type=int, default=DEFAULT_TREE["data_groups"])
    local.add_argument(
        "--sim-fanout",
        help="entities per level of the simulated tree, e.g. 2,3,4,5 for a 4-level profile"
        " (default: --sim-troops, --sim-warriors, --sim-data-groups)",
    )
    local.add_argument("--sim-latency", type=float, default=0.02, help="simulated latency (s)")
    local.add_argument("--sim-error-rate", type=float, default=0.01, help="share of 5xx faults")
    local.add_argument("--sim-gone-rate", type=float, default=0.01, help="share of gone entities")
    local.add_argument("--sim-plain-ids", action="store_true", help="no reserved chars in ids")
    local.set_defaults(func=cmd_local)

    sim = sub.add_parser("simulate", help="serve the vendor simulator over HTTP")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8000)
    sim.add_argument("--seed", type=int, default=7)
    sim.add_argument("--troops", type=int, default=DEFAULT_TREE["troops"])
    sim.add_argument("--warriors", type=int, default=DEFAULT_TREE["warriors"])
    sim.add_argument("--data-groups", type=int, default=DEFAULT_TREE["data_groups"])
    sim.add_argument("--rate-calls", type=int, default=100)
    sim.add_argument("--rate-period", type=float, default=1.0)
    sim.add_argument("--latency", type=float, default=0.0)
    sim.add_argument("--error-rate", type=float, default=0.0)
    sim.add_argument("--stall-rate", type=float, default=0.0)
    sim.add_argument("--truncate-rate", type=float, default=0.0)
    sim.add_argument("--gone-rate", type=float, default=0.0)
    sim.add_argument("--nasty-ids", action="store_true")
    sim.add_argument("--fanout", help="entities per level, e.g. 2,3,4,5 (a profile's depth)")
    sim.add_argument("--profile", help="serve this vendor profile (HARVEST_PROFILE; hermes-v1)")
    sim.set_defaults(func=cmd_simulate)

    def state_args(cmd: argparse.ArgumentParser) -> None:
        where = cmd.add_mutually_exclusive_group()
        where.add_argument("--out", default=DEFAULT_OUT, help="a local run's output directory")
        where.add_argument(
            "--aws", action="store_true", help="the deployed pipeline (HARVEST_* environment)"
        )

    kick = sub.add_parser(
        "kickoff", help="start one run per window from --from to --to (a backfill)"
    )
    kick.add_argument("--from", dest="start", required=True, help="RFC 3339 start")
    kick.add_argument("--to", dest="end", required=True, help="RFC 3339 end")
    kick.add_argument("--by", choices=("day", "hour", "whole"), default="day", help="window length")
    kick.add_argument("--dry-run", action="store_true", help="list the windows, start nothing")
    kick.add_argument("--vendor-url", help="the vendor (local state only)")
    kick.add_argument("--allow-http", action="store_true", help="allow a plain http:// vendor")
    kick.add_argument(
        "--profile", help="the vendor profile (default: the one --out's runs used, or hermes-v1)"
    )
    state_args(kick)
    kick.set_defaults(func=cmd_kickoff)

    status = sub.add_parser("status", help="per-stage progress of a run, and what it waits for")
    status.add_argument("run", nargs="?", help="run id (default: the latest)")
    status.add_argument(
        "--chart",
        action="store_true",
        help="write the run's chart (HTML, beside its manifest) from a local run's samples",
    )
    state_args(status)
    status.set_defaults(func=cmd_status)

    dlq = sub.add_parser("dlq", help="list a stage's dead letters grouped by reason")
    dlq.add_argument("stage", help="the stage (the profile's level name, e.g. troops)")
    dlq.add_argument("--limit", type=int, default=1000)
    state_args(dlq)
    dlq.set_defaults(func=cmd_dlq)

    replay = sub.add_parser("replay", help="move a stage's DLQ back to its queue")
    replay.add_argument("stage", help="the stage (the profile's level name, e.g. troops)")
    replay.add_argument("--max", type=int, help="move at most N messages")
    replay.add_argument("--dry-run", action="store_true", help="count and group, move nothing")
    replay.add_argument("--rate", type=float, help="at most R messages per second")
    state_args(replay)
    replay.set_defaults(func=cmd_replay)

    compact = sub.add_parser(
        "compact", help="write complete runs' points as Parquet (points/dt=YYYY-MM-DD/)"
    )
    compact.add_argument("--run", help="this run, even if compacted before (default: pending)")
    compact.add_argument(
        "--rows-per-file",
        type=int,
        default=DEFAULT_ROWS_PER_FILE,
        help=f"most rows per Parquet file ({DEFAULT_ROWS_PER_FILE:,}; keep it once compacted)",
    )
    state_args(compact)
    compact.set_defaults(func=cmd_compact)

    query = sub.add_parser("query", help="SQL (DuckDB) over --out's Parquet as the view `points`")
    query.add_argument("sql", help='e.g. "SELECT count(*) FROM points"')
    query.add_argument("--out", default=DEFAULT_OUT, help="a local run's output directory")
    query.set_defaults(func=cmd_query)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except HarvestError as exc:
        print(f"harvest: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harvest: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
