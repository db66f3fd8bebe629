"""`harvest local`: the kickoff and the real drain handlers on embedded queues, on one machine.

The scheduler plays EventBridge and Lambda: every `tick` seconds it invokes each stage's
drain handler in a thread, unless that stage already has `reserved_concurrency`
invocations running; each invocation gets a context whose remaining time counts down from
`invocation_timeout`, as in Lambda. The run ends when the ledger says it has settled
(everything enqueued is done, gone or dead) and every drain has returned.
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import resource
import signal
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aws_lambda_powertools.warnings import PowertoolsUserWarning

from pipeline.config import Backend, Config
from pipeline.errors import AuthError, ConfigError
from pipeline.ledger import RunStatus
from pipeline.local.chart import write_chart
from pipeline.local.runtime import LocalRuntime, build
from pipeline.local.samples import SAMPLE_SECONDS, SAMPLES_FILE, Sample, SampleLog
from pipeline.local.waits import Wait, local_waits, pause_wait, stalled_wait, tick_wait
from pipeline.profile import resolve as resolve_profile
from pipeline.queues import Depth
from pipeline.runtime import Runtime, reset_cache, runtime
from pipeline.sinks import Sink
from pipeline.window import Window

STATE_DIR = ".harvest"
LOG_FILE = "harvest.log"
# The profile file a local run used, for the commands that read its state afterwards.
PROFILE_FILE = "profile"
# Held (an OS file lock) by the one `harvest local` that owns a state directory.
LOCK_FILE = "lock"
# When this process last saw its vendor calls change (epoch seconds): a run that starts
# after a crash or a stop waits until that instant plus the rate period, so the vendor's
# window holds none of the previous process's calls (POLL_SECONDS of slack: the file is
# written every poll).
LAST_CALL_FILE = "last-call"
RATE_SECONDS = 3.0  # the live display's calls/s is averaged over this long
POLL_SECONDS = 0.5  # how often the scheduler looks at the ledger and the queues
# The functions a local run invokes, named as Terraform names their handlers (functions.tf),
# and loaded by those names as the Lambda runtime loads them.
KICKOFF_HANDLER = "workers.kickoff.handler"
DRAIN_HANDLER = "workers.drain.handler"

Handler = Callable[[dict[str, Any], Any], Any]


class OutputCheck(Protocol):
    """What a stand-in vendor says of a run's output."""

    @property
    def exact(self) -> bool: ...

    def describe(self) -> str: ...


class VendorStandIn(Protocol):
    """A vendor a local run starts for itself and checks its output against: the simulator
    (`pipeline.dev.simulator`)."""

    @property
    def token(self) -> str: ...

    def start(self) -> str:
        """Serve; return the base URL."""

    def stop(self) -> None: ...

    def check(self, sink: Sink, run_id: str, window: Window) -> OutputCheck:
        """The run's output in `sink` against what this vendor holds for `window`."""


@dataclass(frozen=True)
class LocalOptions:
    window: Window
    out: Path
    vendor_url: str | None = None
    # A plain http:// vendor_url is refused unless allowed; the built-in simulator (ours,
    # on loopback) is allowed without asking.
    allow_http: bool = False
    token: str | None = field(default=None, repr=False)
    rate_calls: int = 100
    rate_period: float = 1.0
    tick: float = 5.0
    invocation_timeout: float = 120.0
    reserved_concurrency: int = 2
    concurrency: int = 64
    max_receive_count: int = 5
    retry_delay: float = 1.0
    read_timeout: float = 10.0
    safety_margin: float = 15.0
    verbose: bool = False  # logs on standard error too, not only in the log file
    # The vendor profile (a file, or a packaged profile's name; "" the default).
    profile: str = ""
    # Started when there is no vendor_url, and the output checked against it: the simulator
    # (in a child process, SimulatorProcess, so that it does not share the GIL with the
    # pipeline it serves).
    simulator: VendorStandIn | None = None


@dataclass(frozen=True)
class StageProgress:
    queued: int
    in_flight: int
    done: int
    gone: int
    dead: int
    enqueued: int


@dataclass(frozen=True)
class Progress:
    """One look at a running harvest, for the live display."""

    elapsed: float
    stages: Mapping[str, StageProgress]
    calls: int
    calls_per_second: float
    limit_per_second: float
    rate_limited: int
    retries: int
    drains_running: int
    waits: tuple[Wait, ...] = ()  # what it waits for, when no call has been made for a while


@dataclass
class LocalResult:
    run_id: str
    status: RunStatus | None
    wall_seconds: float
    calls: int
    rate_limited: int
    retries: int
    limit_per_second: float
    out: Path
    manifest: Path
    comparison: OutputCheck | None = None
    auth_error: str = ""
    stalled: bool = False
    dlq_depth: int = 0
    queue_requests: int = 0
    cpu_seconds: float = 0.0  # this process's CPU from kickoff to settled (simulator excluded)
    peak_rss_mb: float = 0.0  # this process's peak RSS when the run settled, before the check
    peak_queued: int = 0  # most messages queued (all stages) at one look
    first_output_seconds: float = 0.0  # until the first data group was written
    interrupted: bool = False  # stopped by SIGINT/SIGTERM: what it held is back in its queues
    released_at_start: int = 0  # messages an earlier process left in flight, released
    waited_at_start: float = 0.0  # seconds the budget waited for the earlier calls' window
    chart: Path | None = None  # the picture of the run (pipeline.local.chart), beside the manifest
    compaction: str = ""  # what compaction (pipeline.compact) made of a complete run

    @property
    def utilization(self) -> float:
        """Share of the rate limit used over the whole run."""
        return (
            self.calls / (self.wall_seconds * self.limit_per_second) if self.wall_seconds else 0.0
        )

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        if self.auth_error:
            return 3
        if self.status is None or not self.status.complete or self.dlq_depth:
            return 1
        if self.comparison is not None and not self.comparison.exact:
            return 1
        return 0


class LocalContext:
    """Enough of a Lambda context for the handlers and Powertools."""

    def __init__(self, name: str, timeout: float, stop: threading.Event | None = None) -> None:
        self.function_name = f"harvest-local-{name}"
        self.function_version = "$LATEST"
        self.invoked_function_arn = (
            f"arn:aws:lambda:local:000000000000:function:{self.function_name}"
        )
        self.memory_limit_in_mb = 256
        self.aws_request_id = str(uuid.uuid4())
        self.log_group_name = f"/local/{self.function_name}"
        self.log_stream_name = "local"
        self._deadline = time.monotonic() + timeout
        # Set when the run is asked to stop: the invocation's time is up at once, so the
        # drain takes no more batches and gives back what it has not started.
        self._stop = stop

    def get_remaining_time_in_millis(self) -> int:
        if self._stop is not None and self._stop.is_set():
            return 0
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def run_local(
    options: LocalOptions, on_progress: Callable[[Progress], None] | None = None
) -> LocalResult:
    """Harvest `options.window` into `options.out`; resume the same run if it was started."""
    # Loaded here: the handlers build their Powertools objects at import.
    drain_handler = load_handler(DRAIN_HANDLER)
    kickoff_handler = load_handler(KICKOFF_HANDLER)

    # Before anything starts: a state directory serves one profile.
    check_profile(options.out.resolve() / STATE_DIR, options.profile)
    simulator = None
    url, token = options.vendor_url, options.token
    if url is None:
        if options.simulator is None:
            raise ConfigError("a local run needs a vendor URL, or a simulator to start")
        simulator = options.simulator
        url = simulator.start()
        token = token or simulator.token
    out = options.out.resolve()
    config = Config(
        vendor_url=url,
        allow_http=options.allow_http or simulator is not None,
        token=token or "",
        backend=Backend.LOCAL,
        rate_calls=options.rate_calls,
        rate_period=options.rate_period,
        sink=str(out),
        state_dir=str(out / STATE_DIR),
        max_receive_count=options.max_receive_count,
        concurrency=options.concurrency,
        safety_margin=options.safety_margin,
        visibility_timeout=options.invocation_timeout + 60,
        retry_delay=options.retry_delay,
        read_timeout=options.read_timeout,
        profile=options.profile,
    )
    lock = own(out / STATE_DIR)
    # `harvest status`, `dlq` and `replay` read the run's stages from the profile it used.
    claim_profile(out / STATE_DIR, options.profile)
    _redirect_logs(out / STATE_DIR / LOG_FILE, verbose=options.verbose)
    # The local "Lambdas" run concurrently in one process and so share the handlers'
    # Metrics object, which warns when two set the stage dimension (metrics are off here).
    warnings.filterwarnings("ignore", category=PowertoolsUserWarning)
    saved_env = _install_env(config, token or "")
    reset_cache()
    rt = runtime(config, build)
    run_id = options.window.run_id
    # This process owns the state: what an earlier one left in flight goes back now, and
    # the budget waits out the window of the earlier one's last calls.
    released = rt.store.release_in_flight() if rt.store is not None else 0
    waited = _wait_for_earlier_calls(rt, out / STATE_DIR / LAST_CALL_FILE, options.rate_period)
    started = time.monotonic()
    cpu_started = time.process_time()
    auth_error = ""
    stalled = False
    samples = SampleLog(out / STATE_DIR / SAMPLES_FILE)
    scheduler = _Scheduler(rt, options, drain_handler, samples)
    scheduler.resumed_until = time.monotonic() + waited
    restore_signals = _stop_on_signals(scheduler)
    try:
        status = rt.ledger.status(run_id)
        try:
            if status is None or not status.kicked_off:
                kickoff_handler(
                    {"from": options.window.from_text, "to": options.window.to_text},
                    LocalContext("kickoff", options.invocation_timeout),
                )
        except AuthError as exc:
            auth_error = str(exc)
        else:
            auth_error, stalled = scheduler.run(run_id, started, on_progress)
        scheduler.sample(run_id)  # the last point of the chart: how the run ended
        cpu_seconds = time.process_time() - cpu_started
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        wall_seconds = (scheduler.settled_at or time.monotonic()) - started
        # The drains' queue requests: what the scheduler asked for its display is not one.
        queue_requests = (rt.store.requests if rt.store else 0) - scheduler.polls
        status = rt.ledger.status(run_id)
        comparison = None
        if simulator is not None and status is not None and status.settled:
            comparison = simulator.check(rt.sink, run_id, options.window)
        compaction = ""
        if status is not None and status.complete and not scheduler.stopping.is_set():
            compaction = _compact(rt, run_id)
        stats = rt.stats.snapshot()
        chart = write_chart(samples.path, out, run_id)
        return LocalResult(
            run_id=run_id,
            status=status,
            wall_seconds=wall_seconds,
            cpu_seconds=cpu_seconds,
            peak_rss_mb=peak_rss_mb,
            peak_queued=scheduler.peak_queued,
            first_output_seconds=scheduler.first_output,
            calls=int(stats["calls"]),
            rate_limited=int(stats["rate_limited"]),
            retries=int(stats["retries"]),
            limit_per_second=options.rate_calls / options.rate_period,
            out=out,
            manifest=out / "runs" / run_id / "manifest.json",
            comparison=comparison,
            auth_error=auth_error,
            stalled=stalled,
            dlq_depth=sum(rt.dlqs[s].depth().total for s in rt.profile.stage_names),
            queue_requests=queue_requests,
            interrupted=scheduler.stopping.is_set(),
            released_at_start=released,
            waited_at_start=waited,
            chart=chart,
            compaction=compaction,
        )
    finally:
        samples.close()
        restore_signals()
        scheduler.note_last_call()
        reset_cache()
        _restore_env(saved_env)
        if simulator is not None:
            simulator.stop()
        lock.close()


def _compact(rt: Runtime, run_id: str) -> str:
    """Compact a complete run to Parquet unless done already; a line for the summary."""
    from pipeline.compact import CompactionError, compact_run, pending_runs

    try:
        if not pending_runs(rt.sink, [run_id]):
            return "compacted already (`harvest compact --run RUN` compacts again)"
        done = compact_run(rt.sink, run_id, keys=rt.profile.keys)
    except ImportError:
        return "not compacted: pyarrow is missing (pip install 'harvest[analytics]')"
    except CompactionError as exc:
        return f"not compacted: {exc}"
    return f"{done.rows} points in {len(done.files)} Parquet files under {rt.sink.location}/points/"


class _Scheduler:
    """EventBridge and Lambda, played by threads."""

    def __init__(
        self, rt: LocalRuntime, options: LocalOptions, handler: Handler, samples: SampleLog
    ) -> None:
        self.rt = rt
        self.samples = samples
        self.started_at = time.time()  # the samples of this process share it
        self.sampled_at = 0.0
        self.resumed_until = 0.0  # the budget waits out an earlier run's last calls till then
        self.next_tick = 0.0
        self.options = options
        self.handler = handler
        stages = self.rt.profile.stage_names
        self.running: dict[str, list[threading.Thread]] = {s: [] for s in stages}
        self.auth_error = ""
        self.stop = threading.Event()
        self.polls = 0  # depth requests made for progress, not by the drains
        self.settled_at = 0.0
        self.peak_queued = 0
        self.first_output = 0.0
        # Set by SIGINT/SIGTERM: no more invocations; running ones give their messages back.
        self.stopping = threading.Event()
        self._last_call_path = Path(rt.config.state_dir) / LAST_CALL_FILE
        self._calls_seen = rt.stats.snapshot()["calls"]

    def request_stop(self) -> None:
        self.stopping.set()
        self.stop.set()
        if self.rt.store is not None:
            self.rt.store.hurry()  # end the drains' long polls now

    def note_last_call(self) -> None:
        """Write the time when the vendor call count has changed since the last look (see
        LAST_CALL_FILE): at most POLL_SECONDS after the calls it stands for."""
        calls = self.rt.stats.snapshot()["calls"]
        if calls != self._calls_seen:
            self._last_call_path.write_text(f"{time.time():.3f}\n")
            self._calls_seen = calls

    def _invoke(self, stage: str) -> None:
        try:
            context = LocalContext(stage, self.options.invocation_timeout, self.stopping)
            self.handler({"stage": stage}, context)
        except AuthError as exc:
            self.auth_error = self.auth_error or str(exc)
            self.stop.set()
        except Exception:  # the handler logged it; the next tick invokes the stage again
            logging.getLogger("harvest").exception("drain invocation failed")

    def _tick(self) -> None:
        for stage in self.rt.profile.stage_names:
            alive = [t for t in self.running[stage] if t.is_alive()]
            if len(alive) < self.options.reserved_concurrency:
                thread = threading.Thread(target=self._invoke, args=(stage,), daemon=True)
                thread.start()
                alive.append(thread)
            self.running[stage] = alive

    def _dlq_depth(self, stage: str) -> int:
        self.polls += 1
        return self.rt.dlqs[stage].depth().total

    def _pause_why(self) -> str:
        if time.monotonic() < self.resumed_until:
            return "the rate window of an earlier run's last calls"
        return "the vendor asked to wait (Retry-After or X-RateLimit-Reset)"

    def sample(self, run_id: str, depths: Mapping[str, Depth] | None = None) -> None:
        """Append one sample of the run to the state directory's time series."""
        if depths is None:
            depths = {s: self.rt.queues[s].depth() for s in self.rt.profile.stage_names}
            self.polls += len(depths)
        stats = self.rt.stats.snapshot()
        paused_for = self.rt.budget.paused_for()
        self.samples.append(
            Sample(
                run_id=run_id,
                at=time.time(),
                started=self.started_at,
                visible={s: d.visible for s, d in depths.items()},
                in_flight={s: d.in_flight for s, d in depths.items()},
                dead={s: self._dlq_depth(s) for s in self.rt.profile.stage_names},
                calls=int(stats["calls"]),
                rate_limited=int(stats["rate_limited"]),
                limit=self.options.rate_calls / self.options.rate_period,
                paused_for=paused_for,
                pause_why=self._pause_why() if paused_for else "",
                stalled=tuple(self.rt.client.in_flight.longer_than()),
            )
        )

    def waits(self, depths: Mapping[str, Depth]) -> tuple[Wait, ...]:
        """What the run waits for (the live view asks when no call was made for a while)."""
        now = time.time()
        found = [
            pause_wait(self.rt.budget.paused_for(), self._pause_why(), now),
            stalled_wait(self.rt.client.in_flight.longer_than()),
            tick_wait(
                sum(d.visible for d in depths.values()),
                self.drains_running(),
                self.next_tick - time.monotonic(),
            ),
        ]
        waits = [w for w in found if w is not None]
        if self.rt.store is not None:
            waits += local_waits(
                self.rt.store,
                self.rt.ledger,
                {s: d.total for s, d in depths.items()},
                {s: self._dlq_depth(s) for s in self.rt.profile.stage_names},
                now=now,
                running=True,
                where=f"--out {self.rt.config.sink}",
                profile=self.rt.profile,
            )
        return tuple(waits)

    def drains_running(self) -> int:
        return sum(t.is_alive() for threads in self.running.values() for t in threads)

    def run(
        self, run_id: str, started: float, on_progress: Callable[[Progress], None] | None
    ) -> tuple[str, bool]:
        self.next_tick = time.monotonic()
        recent: deque[tuple[float, float]] = deque()
        empty_since = 0.0  # when every stage queue was found empty while the run is unsettled
        while True:
            now = time.monotonic()
            self.note_last_call()
            status = self.rt.ledger.status(run_id)
            depths = {s: self.rt.queues[s].depth() for s in self.rt.profile.stage_names}
            self.polls += len(depths)
            busy = any(d.total for d in depths.values())
            settled = status is not None and status.settled
            self.peak_queued = max(self.peak_queued, sum(d.total for d in depths.values()))
            leaf = self.rt.profile.stage_names[-1]
            if not self.first_output and status and status.stages[leaf].done:
                self.first_output = now - started
            # A settled run needs no more invocations unless redeliveries are still queued.
            if now >= self.next_tick and not self.stop.is_set() and (busy or not settled):
                self._tick()
                self.next_tick = now + self.options.tick
            if now - self.sampled_at >= SAMPLE_SECONDS:
                self.sampled_at = now
                self.sample(run_id, depths)
            if on_progress is not None:
                # Calls per second over the last few seconds, not the last quarter second.
                recent.append((now, self.rt.stats.snapshot()["calls"]))
                while len(recent) > 2 and now - recent[0][0] > RATE_SECONDS:
                    recent.popleft()
                rate = (recent[-1][1] - recent[0][1]) / max(1e-6, recent[-1][0] - recent[0][0])
                # No call over the last few seconds (one at least): say what the run waits for.
                idle = recent[-1][1] == recent[0][1] and now - recent[0][0] >= 1.0
                waits = self.waits(depths) if idle and not settled else ()
                on_progress(self._progress(status, depths, started, rate, waits))
            if settled and not busy:
                # Done: the drains only wait out their long polls now; cut those short.
                self.settled_at = self.settled_at or time.monotonic()
                if self.rt.store is not None:
                    self.rt.store.hurry()
            if (settled or self.stop.is_set()) and not busy and not self.drains_running():
                return self.auth_error, False
            if self.stop.is_set() and not self.drains_running():
                return self.auth_error, False
            # Every queue empty for two ticks, yet not settled: while work remains, some
            # queue holds it (children are sent before their parent is deleted), so what is
            # missing is in a DLQ with no ledger record (the queue itself redrove it from a
            # drain that kept crashing). Stop and report rather than wait forever.
            empty_since = 0.0 if busy or settled else (empty_since or now)
            if empty_since and now - empty_since > 2 * self.options.tick:
                return self.auth_error, True
            time.sleep(POLL_SECONDS)

    def _progress(
        self,
        status: RunStatus | None,
        depths: Mapping[str, Depth],
        started: float,
        rate: float,
        waits: tuple[Wait, ...] = (),
    ) -> Progress:
        stats = self.rt.stats.snapshot()
        stages = {}
        for s in self.rt.profile.stage_names:
            counts = status.stages[s] if status else None
            stages[s] = StageProgress(
                queued=depths[s].visible,
                in_flight=depths[s].in_flight,
                done=counts.done if counts else 0,
                gone=counts.gone if counts else 0,
                dead=self._dlq_depth(s),
                enqueued=counts.enqueued if counts else 0,
            )
        return Progress(
            elapsed=time.monotonic() - started,
            stages=stages,
            calls=int(stats["calls"]),
            calls_per_second=rate,
            limit_per_second=self.options.rate_calls / self.options.rate_period,
            rate_limited=int(stats["rate_limited"]),
            retries=int(stats["retries"]),
            drains_running=self.drains_running(),
            waits=waits,
        )


def recorded_profile(state_dir: Path) -> str:
    """The profile file the runs in `state_dir` use ("" if none is recorded yet)."""
    path = state_dir / PROFILE_FILE
    return path.read_text().strip() if path.is_file() else ""


def check_profile(state_dir: Path, profile: str) -> str:
    """The profile file `profile` names, if the runs in `state_dir` use it or none is
    recorded; ConfigError if they use another: their queued messages and pending entities
    are of its stages, which another profile's drains would never see (and would sweep as
    lost)."""
    chosen = str(resolve_profile(profile).resolve())
    recorded = recorded_profile(state_dir)
    if recorded and recorded != chosen:
        raise ConfigError(
            f"{state_dir.parent} holds runs of the profile {recorded}, not {chosen}: give"
            " that one (--profile or HARVEST_PROFILE), or another --out"
        )
    return chosen


def claim_profile(state_dir: Path, profile: str) -> None:
    """Record the profile of the runs in `state_dir` (`check_profile` first): `harvest
    status`, `dlq`, `replay` and `kickoff` with `--out` read their stages from it."""
    chosen = check_profile(state_dir, profile)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / PROFILE_FILE).write_text(chosen + "\n")


def load_handler(spec: str) -> Handler:
    """The handler named as Lambda names it, `module.function`, imported as Lambda imports it."""
    module, _, name = spec.rpartition(".")
    handler: Handler = getattr(importlib.import_module(module), name)
    return handler


def _install_env(config: Config, token: str) -> dict[str, str | None]:
    """Give the handlers their HARVEST_* environment, as Lambda would; return what it replaced."""
    env = {
        **config.to_env(),
        "HARVEST_VENDOR_TOKEN": token,
        "POWERTOOLS_METRICS_DISABLED": "true",
        "POWERTOOLS_TRACE_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return saved


def _restore_env(saved: Mapping[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _redirect_logs(path: Path, verbose: bool = False) -> None:
    """Send the handlers' JSON logs to a file, so they do not scroll over the progress
    display; with `verbose`, to standard error as well."""
    path.parent.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("harvest")
    formatter = next((h.formatter for h in log.handlers if h.formatter), None)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if verbose:
        handlers.append(logging.StreamHandler())
    for handler in handlers:
        handler.setFormatter(formatter)
        log.addHandler(handler)


class StateLockedError(ConfigError):
    """Another `harvest local` owns the state directory."""


def own(state_dir: Path) -> Any:
    """Take the state directory's lock (held until the returned file is closed).

    StateLockedError, changing nothing, when another process holds it. The OS drops the
    lock when its holder dies, however it dies: a killed run never blocks the next.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    handle = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise StateLockedError(
            f"another `harvest local` ({holder}) is using {state_dir.parent}: wait for it"
            " to finish or stop it (Ctrl-C), then run this again"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}\n")
    handle.flush()
    return handle


def owner_alive(state_dir: Path) -> bool:
    """Whether the process that last took the state directory's lock is still alive."""
    try:
        pid = int((state_dir / LOCK_FILE).read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _wait_for_earlier_calls(rt: Runtime, path: Path, period: float) -> float:
    """Pause the budget until the window of an earlier process's last calls has passed."""
    try:
        last = float(path.read_text().strip())
    except (OSError, ValueError):
        return 0.0
    wait = last + POLL_SECONDS + period - time.time()
    if wait <= 0:
        return 0.0
    rt.budget.hold(min(wait, POLL_SECONDS + period))
    return wait


def _stop_on_signals(scheduler: _Scheduler) -> Callable[[], None]:
    """SIGINT/SIGTERM stop the run gracefully; a second one forces (KeyboardInterrupt).

    Returns what puts the previous handlers back. Only the main thread may set handlers;
    elsewhere (a test driving run_local from a thread) nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum: int, frame: Any) -> None:
        if scheduler.stopping.is_set():
            raise KeyboardInterrupt
        scheduler.request_stop()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
