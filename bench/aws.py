"""`python -m bench --aws [--quick] [--only NAME ...] [--repeat N]`: the handlers as in Lambda.

Every other figure of the bench comes from `harvest local`: one process, one `PacedBudget`.
Here each stage is a Lambda function and every invocation runs in a sandbox process, with
its own `pipeline.runtime` cache and so its own `DynamoBudget`; the budget and the ledger
are in DynamoDB. `make bench` stays the local bench (the README's numbers); `make bench
ARGS=--aws` runs this one: about as long as the local one (under 10 minutes on the 2-core
development machine), on moto's server, which the dev extra installs. `--quick` takes a
tenth of every scenario's data groups.

What plays what:

- **Lambda** (`Function`): a drain function per stage, with its reserved concurrency
  (default 2, Terraform's), and a kickoff function. An invocation goes to an idle warm
  sandbox of its function, else to a new one: a cold start, a fresh interpreter importing
  the handler (`bench/aws_sandbox.py`). A sandbox serves one invocation at a time and is
  reused, as Lambda reuses them. By default every drain starts cold at the kickoff (a
  harvest right after a deployment); `--warm` first gives each drain one idle tick,
  waited for and not counted, so that each has the warm sandbox a daily harvest finds.
  The handlers, `workers.kickoff.handler` and `workers.drain.handler`, get what Lambda
  gives them: the event (`{}` from the schedule), `HARVEST_*` in the environment (the
  stage in `HARVEST_STAGE`), and a context (`pipeline.local.scheduler.LocalContext`) whose
  remaining time counts down from the function's timeout. A sandbox still busy a second
  past its timeout is killed, as Lambda kills it.
- **EventBridge**: one tick per stage; time is compressed: `--tick` seconds (default 20)
  stand for the schedule's minute, and the drain timeout (120 s), its safety margin (30 s),
  the visibility timeout (timeout + 60 s) and the kickoff timeout (300 s) shrink with it,
  so invocations overlap as in AWS (each ends 1.5 ticks after it starts at the latest; a
  busy stage has one or two running). A tick that finds its function at its reserved
  concurrency is retried as Lambda retries any throttled asynchronous event (below). The
  first tick comes `--phase` ticks (default 0.5, the average: EventBridge's minute has
  nothing to do with the kickoff's) after the kickoff starts. Not compressed: the drain's
  20 s idle grace (fixed in the code), the 1 s long poll (Terraform's
  `receive_wait_seconds`), the 5 s retry delay, the vendor's timeouts. Why not shorter
  ticks: the safety margin must still cover a drain's last batch; when a batch of warriors
  still recorded each child with a DynamoDB write of its own (460 for 10 warriors of 46
  data groups: 4-9 s here; one BatchWriteItem now), drains were killed at their timeout
  with `--tick 10` (a 5 s margin).
- **Lambda's Invoke API** (`LambdaService`, asynchronous invocations only): the kickoff
  starts every drain and a drain out of time starts its successor (HARVEST_DRAIN_FUNCTIONS,
  reached through AWS_ENDPOINT_URL_LAMBDA). A throttled event (these, and the schedule's
  ticks) is retried after 1, 2, 4, ... s and dropped once older than the drains' event age
  (60 s). The event age is compressed with the tick and the retry delays are not (Lambda's
  backoff is not documented to the second): here an event gets fewer retries than in AWS.
  `--no-start-drains` leaves it out: only the schedule starts drains, as before.
- **DynamoDB**: moto servers of their own per run (`bench/aws_moto.py`: one request at a
  time, as DynamoDB's writes are atomic; queries of the ledger's shape read one partition),
  reached over HTTP by the botocore clients that `pipeline.aws.runtime.build` makes for backend
  "aws" (adaptive retries, its pool): the conditional writes are real. The budget's item
  has a server to itself: one moto process answers on one core, and at 100 calls/s the
  ledger's writes alone keep it busy; DynamoDB does not queue one item's requests behind
  another's. A botocore hook in every sandbox tops each request's round trip up to
  `--ddb-ms` (default 8 ms): moto's own time counts towards that latency, not on top of it.
- **SQS**: the embedded SQLite queues (`pipeline.queues.LocalQueueStore`, one file shared
  by all sandboxes: SQS's receive counts, visibility timeouts and redrive) behind a shim
  that adds `--sqs-ms` (default 15 ms) to every request, counts requests as `SqsQueue`
  makes them, and long-polls across processes. moto's SQS costs O(queue depth) per call
  (800 ms for one batch send at depth 2,000) and cannot carry these runs. Unlike SQS's,
  the embedded queues' depth is exact, not a count that lags by up to a minute.
- **S3**: not moto's (its CPU would be the machine's): a local directory (in /dev/shm
  where there is one) behind a shim adding `--s3-ms` (default 20 ms) per put, get and
  1,000 keys listed.
- **The vendor**: the simulator in its own process, as in the local bench; the output is
  compared with its ground truth (`pipeline.dev.verify.compare`).

Columns (the local bench's, then AWS's):

calls         vendor calls made (retries and 429s included), counted by the simulator
wall s        kickoff invoked (its cold start included) to the run's manifest written
ideal s       calls × W / L: the least time the vendor's limit allows
util          ideal / wall
util>out      the same from the first data group written to the end: the pace the budget
              keeps once the fan-out has fed the last stage
429s          rate-limited responses
q req/ent     queue requests (send, receive, delete, visibility, depth) per ledger entity
ddb req/call  DynamoDB requests of all invocations (budget, ledger, completion checks;
              retries included), counted by the moto server, per vendor call
ddb ms        mean DynamoDB round trip as the handlers saw it: --ddb-ms, or more when moto,
              on the same two cores as everything else, answered later
GB-s/1k       Lambda GB-seconds per 1,000 calls: Σ (cold start + duration) × memory / 1024
              over every invocation, the kickoff and idle ticks included (Lambda bills the
              init phase too); a killed invocation counts its whole timeout
cpu ms/call   CPU of all sandboxes, cold starts included, per call: the pipeline and its
              botocore clients, what the functions' CPU share (memory / 1769 MB of a vCPU)
              has to cover
rss MB        the largest peak resident memory of one sandbox (it must fit --memory)
inv (cold)    invocations of all functions, and how many of them started a sandbox
cpu own/host  the share of the machine's cores used by this bench's processes (sandboxes,
              moto, the simulator, the harness), and by everything on the machine: near
              1.00 the numbers measure the machine, not the design
exact         output equals the simulator's ground truth
1st out s     until the first data group was written

Under each line, the budget's slots: how many the invocations' DynamoBudgets claimed, used
for a call, gave back (`DynamoBudget.give_back`), and lost (none of those: claimed for
threads that came back too late or not at all, or left unused to make room for a late
call), in how many claims, and how many claims the
item's condition refused (each costs a request); how many calls left later than LATE after
their slot, the slots left unused to make room for them, and those whose window was booked
past already (`DynamoBudget.arrived`); how many calls were not sent because their thread
reached the write after the slot's last moment (`DynamoBudget.missed`: the call took another
slot). Then the simulator's niceness, and how often the CPU
share held a sandbox: CFS periods out of quota, and the time held. Then one line per 429
(the first 20 of each run, every run of a `--repeat`): when, and the window the vendor found
full: how many of its gaps between calls were under half the even spacing, the tightest
three with how long before the 429 each came, and the simulator's own garbage collections
over 2 ms that began in the W (plus 0.1 s) before it (requests arriving during one are
stamped together after it). Then the phases around the calls: when the vendor saw its first
and last request, the first output, and the manifest (the tail: from the last call to the
manifest, the last answers, records and the run's completion check).
`--timeline` adds DynamoDB requests per call by table (the budget's item, the ledger's
state table) and action, one line a second of calls and queue depths, and every invocation:
when Lambda got it, its cold start, its duration.

A failed invocation, a stall or an incomplete run is named after the line.

Limits: moto spends 2-3 ms of CPU per DynamoDB write (plus its HTTP server's), on one core,
and botocore 1.5-2 ms per request in the sandbox. At the ledger's 2.4 requests per call of
before (one write per child) its moto server saturated above about 100 calls/s; at
0.1-0.15 now it does not (`ddb ms` stays near `--ddb-ms`; when it rises far above, that
line measures moto, not the design). The sandboxes, moto and the simulator share the
machine's cores, which Lambda's sandboxes would not: `cpu own/host` near 1.00 means the
line measures the machine. The numbers move between runs by about a tenth. The killed
invocations' queue requests are lost. The token comes from the environment, not SSM.

- **Lambda's CPU** (`CpuShare`): Lambda gives a function memory / 1,769 of a vCPU. Once a
  sandbox has imported its handler (Lambda's init runs with burst CPU), the harness puts it
  in a cgroup of its own whose CFS quota is that share (100 ms periods, the kernel's
  default; Lambda does not document its own). Without a writable cgroup hierarchy, or with
  `--no-lambda-cpu`, the sandboxes take what the machine gives them, and the header says so.
  The share is of this machine's CPU, whose CPU seconds per call move by up to 2x between
  days and may not be Lambda's.
- **X-Ray**: the sandboxes get the environment Lambda gives a function with active tracing
  (`lambda_environment`: `LAMBDA_TASK_ROOT`, the function's name, memory and handler, the
  daemon's address) and each invocation a sampled trace header, so Powertools' Tracer and
  the X-Ray SDK do there what they do in Lambda; `TraceDaemon` stands for the X-Ray daemon
  and counts the segment documents sent to it. (Without `LAMBDA_TASK_ROOT` the SDK builds
  its centralized sampler at import, two botocore clients: about 0.3 s of every cold start
  that Lambda's sandboxes do not spend.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import VENDOR_NICE, nice_note, vendor_tree

# Terraform's defaults (terraform/variables.tf, main.tf), in real seconds.
SCHEDULE_SECONDS = 60.0  # the drains' rate(1 minute)
DRAIN_TIMEOUT = 120.0
SAFETY_MARGIN = 30.0
VISIBILITY_EXTRA = 60.0  # visibility timeout = drain timeout + 60
KICKOFF_TIMEOUT = 300.0
RELEASE_ATTEMPTS = 20  # a sandbox's cgroup, 50 ms apart
EVENT_MAX_AGE = 60.0  # maximum_event_age_in_seconds of the drains' asynchronous events
RECEIVE_WAIT = 1.0  # receive_wait_seconds
RETRY_DELAY = 5.0
MEMORY_MB = 1024  # the drains' (drain_memory)
KICKOFF_MEMORY_MB = 1024  # terraform/functions.tf
TABLE = "harvest-state"
REGION = "us-east-1"
WINDOW = ("2026-11-22T00:00:00Z", "2026-11-23T00:00:00Z")
POLL_SECONDS = 0.1  # how often the harness looks for the manifest
KILL_GRACE = 1.0  # Lambda's timeout, give or take: then the sandbox is killed
COLD_START_LIMIT = 30.0  # a sandbox that takes longer to import the handler has failed
ROOT = Path(__file__).resolve().parents[1]  # where `python -m bench.…` finds the bench
SANDBOX_MODULE = "bench.aws_sandbox"
MOTO_MODULE = "bench.aws_moto"


def lambda_environment(function: str, handler: str, memory_mb: int, daemon: str) -> dict[str, str]:
    """What Lambda puts in a function's environment, beside its own variables, that the
    libraries read: Powertools and the X-Ray SDK tell Lambda from `LAMBDA_TASK_ROOT`, and
    with active tracing the SDK sends to the daemon at `AWS_XRAY_DAEMON_ADDRESS`. (The
    trace header, `_X_AMZN_TRACE_ID`, is set per invocation: `bench/aws_sandbox.py`.)"""
    return {
        "AWS_LAMBDA_FUNCTION_NAME": function,
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(memory_mb),
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
        "LAMBDA_TASK_ROOT": str(ROOT),
        "_HANDLER": handler,
        "AWS_XRAY_DAEMON_ADDRESS": daemon,
        "AWS_XRAY_CONTEXT_MISSING": "LOG_ERROR",
    }


class TraceDaemon:
    """Stands for the X-Ray daemon: a UDP socket on loopback that takes what the SDK sends
    (one datagram per segment document, after a header line) and counts it."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self.documents = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                datagram = self._socket.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.documents += 1
            self.bytes += len(datagram)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def create_state_table(client: Any, name: str) -> None:
    """The state table as Terraform makes it: hash key `pk`, range key `sk`, on demand."""
    client.create_table(
        TableName=name,
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )


@dataclass(frozen=True)
class AwsScenario:
    name: str
    troops: int
    warriors: int
    data_groups: int
    rate_calls: int  # configured
    vendor_calls: int  # the simulator's real limit
    latency: float
    # HARVEST_CONCURRENCY, the most messages an invocation keeps in process; None: the
    # default (Terraform's drain_concurrency).
    concurrency: int | None = None
    reserved_concurrency: int = 2  # per drain function
    rate_period: float = 1.0

    def scaled(self, factor: float) -> AwsScenario:
        return replace(self, data_groups=max(1, round(self.data_groups * factor)))


# The local bench's scenarios (bench/__main__.py), the large ones at a tenth or a twentieth
# of their data groups and the baseline at an eighth of its calls, then the mixes
# the local bench cannot show: busy and sparse stages in one budget, and vendors slow
# enough that a drain's threads, not the budget, may set the pace.
SCENARIOS = [
    AwsScenario("1.5k@50/s 200ms", 4, 8, 46, 50, 50, 0.2),
    AwsScenario("2.5k@200/s 20ms", 20, 25, 5, 200, 200, 0.02),
    AwsScenario("vendor limit = half", 4, 8, 46, 100, 50, 0.02),
    AwsScenario(
        "baseline 1-at-a-time", 2, 8, 5, 50, 50, 0.2, concurrency=1, reserved_concurrency=1
    ),
    AwsScenario("1k@200/s 20ms", 10, 10, 10, 200, 200, 0.02),
    # Upstream stages with almost nothing to do while data groups are busy.
    AwsScenario("sparse up@100/s 20ms", 2, 2, 500, 100, 100, 0.02),
    # Many small listings upstream interleaved with the data groups.
    AwsScenario("wide up@100/s 20ms", 50, 4, 10, 100, 100, 0.02),
    AwsScenario("2k@200/s 200ms", 10, 10, 20, 200, 200, 0.2),
    AwsScenario("2k@100/s 400ms", 10, 10, 20, 100, 100, 0.4),
]

# A harvest's size (vendor-api.md: 35,000-65,000 calls), where a run's first seconds (cold
# starts, the listing levels) weigh what they would in AWS; `--large`, about 7 minutes.
LARGE = [AwsScenario("35k@100/s 20ms", 20, 25, 70, 100, 100, 0.02)]

HEADER = (
    f"{'scenario':<22} {'calls':>6} {'wall s':>7} {'ideal s':>7} {'util':>5} {'util>out':>8} "
    f"{'429s':>5} {'q req/ent':>9} {'ddb req/call':>12} {'ddb ms':>6} {'GB-s/1k':>7} "
    f"{'cpu ms/call':>11} {'rss MB':>6} {'inv (cold)':>10} {'cpu own/host':>12} {'exact':>5} "
    f"{'1st out s':>9}"
)


@dataclass(frozen=True)
class Settings:
    """How the harness plays AWS (the CLI's AWS-mode options)."""

    tick: float = 20.0  # seconds that stand for the schedule's minute
    memory_mb: int = MEMORY_MB
    ddb_ms: float = 8.0
    sqs_ms: float = 15.0
    s3_ms: float = 20.0
    timeline: bool = False  # print calls per second and queue depths, one line a second
    # When the schedule's first tick comes after the kickoff starts, in ticks: EventBridge's
    # minute has no relation to the kickoff's, so on average half of one.
    phase: float = 0.5
    # The kickoff starts the drains and a drain out of time starts its successor
    # (HARVEST_DRAIN_FUNCTIONS); off: only the schedule starts them, as before.
    start_drains: bool = True
    # Each sandbox gets Lambda's CPU share for its memory once its handler is imported
    # (CpuShare), where the machine lets the harness make cgroups.
    lambda_cpu: bool = True
    # Every drain has one warm sandbox when the kickoff starts, as the schedule's ticks
    # (every minute, finding nothing to do) leave them before a daily harvest; off: every
    # drain starts cold, as a harvest right after a deployment or a long pause finds them.
    warm: bool = False

    @property
    def compression(self) -> float:
        return SCHEDULE_SECONDS / self.tick

    @property
    def drain_timeout(self) -> float:
        return DRAIN_TIMEOUT / self.compression

    @property
    def safety_margin(self) -> float:
        return SAFETY_MARGIN / self.compression

    @property
    def kickoff_timeout(self) -> float:
        return KICKOFF_TIMEOUT / self.compression


@dataclass
class Invocation:
    """One invocation as Lambda would report it, plus what its sandbox counted."""

    function: str
    cold: bool
    at: float = 0.0  # time.monotonic() when Lambda got it
    init: float = 0.0  # seconds of cold start before it (0 if warm)
    memory_mb: int = MEMORY_MB  # its function's
    duration: float = 0.0
    ddb: float = 0  # DynamoDB requests and their round trips, as the handler saw them
    ddb_seconds: float = 0.0
    queue: float = 0
    slots: dict[str, float] = field(default_factory=dict)  # the budget's, as the sandbox saw
    gc: dict[str, float] = field(default_factory=dict)  # its full garbage collections: n, ms
    rss_mb: float = 0.0
    error: str = ""


def _process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc; 0 where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> dict[int, float]:
    """CPU seconds of each live child of this process (moto, the simulator, sandboxes)."""
    me = str(os.getpid())
    found = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else []:
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[1] == me:
                found[int(entry.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf(
                    "SC_CLK_TCK"
                )
    return found


def _host_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat; (0, 0) where absent."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
    except OSError:
        return 0, 0
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


# Lambda gives a function CPU in proportion to its memory: 1,769 MB get one vCPU.
VCPU_MB = 1769
CFS_PERIOD_US = 100_000
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "harvest-bench-"


def _own_cgroup() -> Path | None:
    """Where this process's CPU is controlled: its cgroup under the v1 cpu controller, or
    under the v2 hierarchy if that has the cpu controller; None if neither."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(","):
            return CGROUP_ROOT / "cpu" / path.lstrip("/")
    for line in lines:
        if line.startswith("0::"):
            v2 = CGROUP_ROOT / line[3:].lstrip("/")
            try:
                if "cpu" in (v2 / "cgroup.controllers").read_text().split():
                    return v2
            except OSError:
                return None
    return None


class CpuShare:
    """A function's CPU as Lambda sizes it, for its sandbox processes: each in a cgroup of
    its own, under the harness's, whose CFS quota is memory / 1,769 of a CPU (cgroup v1's
    cpu controller, or v2's cpu.max). It applies once the handler is imported: Lambda runs a
    function's init with burst CPU (up to 10 s), its invocations within the share. Needs a
    writable cgroup hierarchy (root here)."""

    def __init__(self, memory_mb: int) -> None:
        self.share = memory_mb / VCPU_MB

    @staticmethod
    def available() -> bool:
        """Whether sandboxes can be confined here; empty groups a killed harness left
        behind are removed on the way."""
        parent = _own_cgroup()
        if parent is None:
            return False
        for stale in parent.glob(f"{CGROUP_PREFIX}*"):
            harness = stale.name.removeprefix(CGROUP_PREFIX).split("-")[0]
            if harness.isdigit() and Path(f"/proc/{harness}").exists():
                continue  # a harness still running (this one, or another bench)
            try:
                stale.rmdir()  # fails, and stays, while a process is in it
            except OSError:
                pass
        try:
            probe = CpuShare(VCPU_MB)._group(parent, "probe")
        except OSError:
            return False
        CpuShare.release(probe)
        return True

    def _group(self, parent: Path, name: str) -> Path:
        """A cgroup with this share's quota (removed again if it cannot be set)."""
        group = parent / f"{CGROUP_PREFIX}{os.getpid()}-{name}"
        group.mkdir(exist_ok=True)
        quota = max(1000, round(self.share * CFS_PERIOD_US))
        try:
            if (group / "cpu.max").exists():  # v2
                (group / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(str(quota))
        except OSError:
            self.release(group)
            raise
        return group

    def confine(self, pid: int) -> Path:
        """Put process `pid` (and the threads it will start) under the share."""
        parent = _own_cgroup()
        if parent is None:
            raise OSError("no cgroup with the cpu controller for this process")
        group = self._group(parent, str(pid))
        try:
            (group / "cgroup.procs").write_text(str(pid))
        except OSError:
            self.release(group)
            raise
        return group

    @staticmethod
    def throttling(group: Path) -> tuple[int, int, float]:
        """The group's CFS periods so far, how many of them ran out of quota (its processes
        held until the next), and the seconds held in all (v1 or v2 cpu.stat)."""
        try:
            stat = dict(
                line.split() for line in (group / "cpu.stat").read_text().splitlines() if line
            )
        except (OSError, ValueError):
            return 0, 0, 0.0
        held = int(stat.get("throttled_usec", 0)) / 1e6 or int(stat.get("throttled_time", 0)) / 1e9
        return int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0)), held

    @staticmethod
    def release(group: Path) -> None:
        """Remove a sandbox's cgroup once its process has exited (a group still holding a
        process stays). The kernel may take a moment to let go of a process just reaped
        (seen: groups left busy after a run), so a busy group is tried again for a second."""
        for attempt in range(RELEASE_ATTEMPTS):
            try:
                group.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if attempt + 1 == RELEASE_ATTEMPTS:
                    print(f"# could not remove {group}: {exc}", file=sys.stderr)
                else:
                    time.sleep(0.05)


class Sandbox:
    """A sandbox process: started (the cold start) on creation, one invocation at a time."""

    def __init__(
        self, handler: str, env: dict[str, str], log: Path, cpu: CpuShare | None = None
    ) -> None:
        started = time.monotonic()
        with open(log, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", SANDBOX_MODULE, handler],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                cwd=ROOT,
                text=True,
            )
        self.final_cpu = 0.0  # once it is killed
        self.cgroup: Path | None = None
        self.throttling = (0, 0, 0.0)  # CpuShare.throttling, once closed
        if self._answer(COLD_START_LIMIT) is None:
            self.kill()
            raise RuntimeError(f"a sandbox of {handler} did not start: see {log}")
        self.init = time.monotonic() - started
        if cpu is not None:
            try:
                self.cgroup = cpu.confine(self.process.pid)
            except OSError:
                self.kill()
                raise

    def _answer(self, timeout: float) -> dict[str, Any] | None:
        out = self.process.stdout
        assert out is not None
        readable, _, _ = select.select([out], [], [], max(0.0, timeout))
        line = out.readline() if readable else ""
        answer: dict[str, Any] | None = json.loads(line) if line else None
        return answer

    def invoke(self, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The sandbox's answer, or None if it timed out or died (it is killed then)."""
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
        except BrokenPipeError:
            answer = None
        else:
            answer = self._answer(timeout + KILL_GRACE)
        if answer is None:
            self.kill()
        return answer

    def cpu(self) -> float:
        return self.final_cpu or _process_cpu(self.process.pid)

    def kill(self) -> None:
        self.final_cpu = self.cpu()
        self.process.kill()
        self.close()

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.cgroup is not None:
            self.throttling = CpuShare.throttling(self.cgroup)
            CpuShare.release(self.cgroup)


class Function:
    """A Lambda function: its handler, reserved concurrency, timeout and warm sandboxes."""

    def __init__(
        self,
        name: str,
        handler: str,
        env: dict[str, str],
        *,
        reserved: int,
        timeout: float,
        logs: Path,
        record: Callable[[Invocation], None],
        memory_mb: int = MEMORY_MB,
        cpu: CpuShare | None = None,
    ) -> None:
        self.name = name
        self.memory_mb = memory_mb  # what its GB-s are billed at
        self.cpu_share = cpu
        self.handler = handler
        self.env = env
        self.reserved = reserved
        self.timeout = timeout
        self.logs = logs
        self.record = record
        self.running = 0
        self.throttled = 0  # attempts refused: the function was at its reserved concurrency
        self.sandboxes: list[Sandbox] = []  # every one started, killed ones included
        self._idle: list[Sandbox] = []
        self._lock = threading.Lock()

    def invoke_async(self, event: dict[str, Any]) -> bool:
        """Start an invocation in the background, as an EventBridge target; False if throttled."""
        with self._lock:
            if self.running >= self.reserved:
                self.throttled += 1
                return False
            self.running += 1
        threading.Thread(target=self._run, args=(event,), daemon=True).start()
        return True

    def invoke(self, event: dict[str, Any]) -> Invocation:
        """One invocation, waited for."""
        with self._lock:
            self.running += 1
        return self._run(event)

    def _run(self, event: dict[str, Any]) -> Invocation:
        try:
            with self._lock:
                # The most recently used first, as Lambda tends to.
                sandbox = self._idle.pop() if self._idle else None
                number = len(self.sandboxes) + 1
            invocation = Invocation(
                self.name, cold=sandbox is None, at=time.monotonic(), memory_mb=self.memory_mb
            )
            if sandbox is None:
                sandbox = Sandbox(
                    self.handler,
                    self.env,
                    self.logs / f"{self.name}-{number}.log",
                    self.cpu_share,
                )
                with self._lock:
                    self.sandboxes.append(sandbox)
                invocation.init = sandbox.init
            request = {"function": self.name, "event": event, "timeout": self.timeout}
            answer = sandbox.invoke(request, self.timeout)
            if answer is None:
                invocation.duration = self.timeout  # billed to the timeout
                invocation.error = "timed out: sandbox killed"
            else:
                invocation.duration = float(answer["duration"])
                invocation.ddb = answer["ddb"]
                invocation.ddb_seconds = answer["ddb_seconds"]
                invocation.queue = answer["queue"]
                invocation.slots = {
                    k.removeprefix("slots "): v for k, v in answer.items() if k.startswith("slots ")
                }
                invocation.gc = {
                    k.removeprefix("gc "): v for k, v in answer.items() if k.startswith("gc ")
                }
                invocation.rss_mb = float(answer["rss_mb"])
                invocation.error = str(answer["error"])
                with self._lock:
                    self._idle.append(sandbox)
            self.record(invocation)
            return invocation
        finally:
            with self._lock:
                self.running -= 1

    def cpu(self) -> float:
        """CPU seconds of every sandbox so far, cold starts included."""
        with self._lock:
            return sum(s.cpu() for s in self.sandboxes)

    def close(self) -> None:
        with self._lock:
            sandboxes, self._idle = list(self.sandboxes), []
        for sandbox in sandboxes:
            sandbox.close()


class LambdaService:
    """Lambda's Invoke API for asynchronous invocations (InvocationType Event), on loopback.

    The sandboxes' botocore reaches it through AWS_ENDPOINT_URL_LAMBDA: the kickoff starts
    the drains and a drain its successor as in AWS. An event is accepted (202) and its
    invocation started at once if the function has room under its reserved concurrency;
    otherwise it is retried as Lambda retries throttled events, after 1, 2, 4, ... s (not
    compressed), and dropped once older than the event age Terraform allows (60 s,
    compressed).
    """

    def __init__(self, functions: dict[str, Function], max_age: float) -> None:
        import http.server

        self.functions = functions
        self.max_age = max_age
        self.dropped = 0
        # (retry due, accepted at, this delay, function, event) of throttled events
        self._pending: list[tuple[float, float, float, Function, dict[str, Any]]] = []
        self._lock = threading.Lock()
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            disable_nagle_algorithm = True
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = self.path.split("/")  # /2015-03-31/functions/NAME/invocations
                function = service.functions.get(parts[3] if len(parts) > 4 else "")
                if function is None or self.headers.get("X-Amz-Invocation-Type") != "Event":
                    self._answer(404, b'{"Type":"User","message":"not served here"}')
                    return
                self._answer(202, b"")
                service.accept(function, json.loads(body or b"{}"))

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def accept(self, function: Function, event: dict[str, Any]) -> None:
        if not function.invoke_async(event):
            now = time.monotonic()
            with self._lock:
                self._pending.append((now + 1.0, now, 1.0, function, event))

    def retry(self) -> None:
        """Start the throttled events whose retry is due, or drop them when too old."""
        now = time.monotonic()
        with self._lock:
            due = [p for p in self._pending if p[0] <= now]
            self._pending = [p for p in self._pending if p[0] > now]
        for _, since, delay, function, event in due:
            if now - since > self.max_age:
                with self._lock:
                    self.dropped += 1
            elif not function.invoke_async(event):
                with self._lock:
                    self._pending.append((now + 2 * delay, since, 2 * delay, function, event))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class MotoServer:
    """A fresh moto server (`bench/aws_moto.py`) for one run."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", MOTO_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        self.requests: dict[str, int] = {}  # answered, by action: known once stopped
        if not self.url.startswith("http://"):
            self.stop()
            raise RuntimeError(f"the moto server did not start (said {self.url!r})")

    def stop(self) -> None:
        stdin, stdout = self.process.stdin, self.process.stdout
        if stdin is None or stdout is None or stdin.closed:
            return
        stdin.close()
        last = stdout.read().strip()
        self.requests = json.loads(last) if last.startswith("{") else {}
        stdout.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _HarnessClient:
    """The harness's own DynamoDB client; it counts its requests, which are not the pipeline's."""

    def __init__(self, url: str) -> None:
        import boto3

        self.requests = 0
        self.client = boto3.session.Session().client(
            "dynamodb",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="bench",  # moto takes any
            aws_secret_access_key="bench",
        )
        self.actions: Counter[str] = Counter()
        self.client.meta.events.register("before-call.dynamodb", self._count)

    def _count(self, model: Any, **_: Any) -> None:
        self.requests += 1
        self.actions[model.name] += 1

    def create_state_table(self) -> None:
        create_state_table(self.client, TABLE)


@dataclass
class _Record:
    invocations: list[Invocation] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, invocation: Invocation) -> None:
        with self.lock:
            self.invocations.append(invocation)


def warm_up(drains: list[Function]) -> list[Invocation]:
    """One scheduled tick of every drain, all at once, waited for: with every queue empty,
    each cold-starts a sandbox, finds nothing and returns, leaving the sandbox warm."""
    with ThreadPoolExecutor(len(drains), thread_name_prefix="warm-up") as pool:
        done = list(pool.map(lambda f: f.invoke({}), drains))
    failed = [f"{i.function}: {i.error}" for i in done if i.error]
    if failed:
        raise RuntimeError(f"warming the drains failed: {'; '.join(failed)}")
    return done


def run_one(scenario: AwsScenario, settings: Settings, scratch: str | None) -> dict[str, Any]:
    """One harvest of `scenario` with every invocation in a sandbox process; its numbers."""
    from bench.aws_sandbox import SETTINGS_ENV
    from bench.aws_sandbox import Settings as SandboxSettings
    from pipeline.aws.ledger import DynamoLedger
    from pipeline.config import Backend, Config, QueueUrls
    from pipeline.dev.simulator import SimulatorConfig, SimulatorProcess
    from pipeline.dev.verify import compare
    from pipeline.local.queues import LocalQueueStore
    from pipeline.local.sinks import DirectorySink
    from pipeline.sinks import manifest_key
    from pipeline.stages import STAGE_NAMES
    from pipeline.window import Window

    window = Window.parse(*WINDOW)
    run_id = window.run_id
    simulator_config = SimulatorConfig(**vendor_tree(scenario))
    record = _Record()
    with ExitStack() as stack:
        work = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="harvest-aws-", dir=scratch))
        )
        moto = MotoServer()  # the ledger's
        stack.callback(moto.stop)
        moto_budget = MotoServer()  # the budget's item (see bench/aws_sandbox.py)
        stack.callback(moto_budget.stop)
        simulator = stack.enter_context(SimulatorProcess(simulator_config, nice=VENDOR_NICE))
        daemon = TraceDaemon()
        stack.callback(daemon.stop)
        harness = _HarnessClient(moto.url)
        harness.create_state_table()
        harness_budget = _HarnessClient(moto_budget.url)
        harness_budget.create_state_table()
        sink_dir, logs = work / "out", work / "logs"
        logs.mkdir()
        store = LocalQueueStore(work / "queues.sqlite")
        stack.callback(store.close)
        config = Config(
            vendor_url=simulator.url,
            allow_http=True,  # the simulator, on loopback
            backend=Backend.AWS,
            rate_calls=scenario.rate_calls,
            rate_period=scenario.rate_period,
            # Checked by the AWS build, never called: the sandboxes swap the queues.
            queues={
                s: QueueUrls(f"{moto.url}/000000000000/{s}", f"{moto.url}/000000000000/{s}-dlq")
                for s in STAGE_NAMES
            },
            sink="s3://harvest-bench/out",  # swapped for sink_dir likewise
            state_table=TABLE,
            safety_margin=settings.safety_margin,
            visibility_timeout=settings.drain_timeout + VISIBILITY_EXTRA / settings.compression,
            retry_delay=RETRY_DELAY,
            wait_seconds=RECEIVE_WAIT,
        )
        if scenario.concurrency is not None:
            config = config.with_(concurrency=scenario.concurrency)
        if settings.start_drains:
            config = config.with_(drain_functions={s: f"drain-{s}" for s in STAGE_NAMES})
        sandbox_settings = SandboxSettings(
            queue_db=str(work / "queues.sqlite"),
            sink_dir=str(sink_dir),
            ddb_latency=settings.ddb_ms / 1000,
            sqs_latency=settings.sqs_ms / 1000,
            s3_latency=settings.s3_ms / 1000,
            memory_mb=settings.memory_mb,
            budget_endpoint=moto_budget.url,
        )
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("HARVEST_", "AWS_", "POWERTOOLS_"))
        }
        env.update(config.to_env())
        env.update(
            {
                "HARVEST_VENDOR_TOKEN": simulator_config.token,
                "AWS_ENDPOINT_URL": moto.url,  # every AWS client: nothing can reach real AWS
                "AWS_DEFAULT_REGION": REGION,
                "AWS_REGION": REGION,
                "AWS_ACCESS_KEY_ID": "bench",  # moto takes any
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_EC2_METADATA_DISABLED": "true",
                "POWERTOOLS_SERVICE_NAME": "harvest",
                "POWERTOOLS_METRICS_NAMESPACE": "Harvest",
                SETTINGS_ENV: json.dumps(asdict(sandbox_settings)),
            }
        )
        limited = settings.lambda_cpu and CpuShare.available()
        kickoff = Function(
            "kickoff",
            "workers.kickoff.handler",
            {
                **env,
                **lambda_environment(
                    "kickoff", "workers.kickoff.handler", KICKOFF_MEMORY_MB, daemon.address
                ),
            },
            reserved=1,
            timeout=settings.kickoff_timeout,
            logs=logs,
            record=record.add,
            memory_mb=KICKOFF_MEMORY_MB,
            cpu=CpuShare(KICKOFF_MEMORY_MB) if limited else None,
        )
        drains = {
            s: Function(
                f"drain-{s}",
                "workers.drain.handler",
                {
                    **env,
                    **lambda_environment(
                        f"drain-{s}", "workers.drain.handler", settings.memory_mb, daemon.address
                    ),
                    "HARVEST_STAGE": s,
                },
                reserved=scenario.reserved_concurrency,
                timeout=settings.drain_timeout,
                logs=logs,
                record=record.add,
                memory_mb=settings.memory_mb,
                cpu=CpuShare(settings.memory_mb) if limited else None,
            )
            for s in STAGE_NAMES
        }
        functions = [kickoff, *drains.values()]
        for function in functions:
            stack.callback(function.close)
        lambda_service = LambdaService(
            {f.name: f for f in drains.values()}, EVENT_MAX_AGE / settings.compression
        )
        stack.callback(lambda_service.close)
        for function in functions:
            function.env["AWS_ENDPOINT_URL_LAMBDA"] = lambda_service.url

        manifest = sink_dir / manifest_key(run_id)
        data_dir = manifest.parent / "data"
        expected = simulator.expected_calls(window.start, window.end)
        stalled_after = max(120.0, 20 * expected * scenario.rate_period / scenario.vendor_calls)
        warmed = warm_up(list(drains.values())) if settings.warm else []
        # The ticks that warmed them are no part of the harvest (the cost model counts idle
        # ticks apart): neither its invocations nor their CPU nor their DynamoDB requests
        # (but the by-action split under --timeline, read from moto's own counts at the
        # end, still holds their few: a run-list Query per drain).
        record.invocations.clear()
        warm_cpu = sum(f.cpu() for f in functions)
        host_started, cpu_started = _host_ticks(), _children_cpu()
        self_started = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic()
        kicked = kickoff.invoke({"from": window.from_text, "to": window.to_text})
        if kicked.error:
            raise RuntimeError(f"kickoff failed: {kicked.error}")
        next_tick = max(time.monotonic(), started + settings.phase * settings.tick)
        settled_at, first_output, stalled = 0.0, 0.0, False
        calls_before_output = 0
        timeline: list[dict[str, Any]] = []
        next_sample = started
        while True:
            now = time.monotonic()
            if settings.timeline and now >= next_sample:
                timeline.append(_sample(now - started, simulator, store, drains))
                next_sample += 1.0
            settled = manifest.exists()
            if settled and not settled_at:
                settled_at = now
            if not first_output and data_dir.is_dir() and any(os.scandir(data_dir)):
                first_output = now - started
                calls_before_output = int(simulator.stats()["requests"])
            # A settled run needs no more invocations unless redeliveries are still queued.
            busy = not settled or any(store.queue(s).depth().total for s in STAGE_NAMES)
            lambda_service.retry()
            if now >= next_tick:
                if busy:
                    # EventBridge's invocations are asynchronous events like the others:
                    # retried while throttled, until they are too old.
                    for function in drains.values():
                        lambda_service.accept(function, {})
                next_tick += settings.tick
            if not busy and not any(f.running for f in drains.values()):
                break
            if now - started > stalled_after:
                stalled = True
                break
            time.sleep(POLL_SECONDS)
        host_ended, cpu_ended = _host_ticks(), _children_cpu()
        traced = (daemon.documents, daemon.bytes)
        self_ended = resource.getrusage(resource.RUSAGE_SELF)
        wall = (settled_at or time.monotonic()) - started
        sandbox_cpu = sum(f.cpu() for f in functions) - warm_cpu
        vendor = simulator.stats()
        status = DynamoLedger(harness.client, TABLE).status(run_id)
        comparison = None
        if status is not None and status.settled:
            comparison = compare(
                DirectorySink(sink_dir), run_id, simulator.ground_truth(window.start, window.end)
            )
        dead_letters = sum(store.queue(f"{s}-dlq").depth().total for s in STAGE_NAMES)
        killed_cpu = sum(s.final_cpu for f in functions for s in f.sandboxes)
    ddb_requests = (
        sum(moto.requests.values())
        + sum(moto_budget.requests.values())
        - harness.requests
        - harness_budget.requests
        - sum(i.ddb for i in warmed)
    )

    invocations = record.invocations
    calls = float(vendor["requests"])
    entities = sum(c.enqueued for c in status.stages.values()) if status else 0
    ideal = calls * scenario.rate_period / scenario.vendor_calls
    # From the first data group written on: the pace once the fan-out has fed the last stage.
    ideal_after = (calls - calls_before_output) * scenario.rate_period / scenario.vendor_calls
    wall_after = wall - first_output
    gb_seconds = sum((i.init + i.duration) * i.memory_mb / 1024 for i in invocations)
    own_cpu = (
        sum(cpu - cpu_started.get(pid, 0.0) for pid, cpu in cpu_ended.items())
        + killed_cpu
        + (self_ended.ru_utime + self_ended.ru_stime)
        - (self_started.ru_utime + self_started.ru_stime)
    )
    host_busy, host_total = (b - a for a, b in zip(host_started, host_ended, strict=True))
    cores = os.cpu_count() or 1
    ddb_seen = sum(i.ddb for i in invocations)
    return {
        "calls": calls,
        "wall": wall,
        "ideal": ideal,
        "util": ideal / wall if wall else 0.0,
        "util_after_output": ideal_after / wall_after if first_output and wall_after > 0 else 0.0,
        "rate_limited": float(vendor["rate_limited"]),
        # Each 429's window as the vendor counted it: seconds into the run, the ages of the
        # calls it held, and the simulator's garbage collections over 2 ms that began in the
        # W (plus 0.1 s) before it (seconds before the 429, seconds).
        "refusals": [
            (
                r["at"] - started,
                [r["at"] - stamp for stamp in r["stamps"]],
                [
                    (r["at"] - at, seconds)
                    for at, seconds in vendor["pauses"]
                    if 0 <= r["at"] - at <= scenario.rate_period + 0.1
                ],
            )
            for r in vendor["refusals"]
        ],
        # The sandboxes' CFS periods, those that ran out of quota, and the seconds held.
        "throttling": [
            sum(s.throttling[i] for f in functions for s in f.sandboxes) for i in range(3)
        ],
        "queue_per_entity": sum(i.queue for i in invocations) / max(1, entities),
        "ddb_per_call": ddb_requests / max(1.0, calls),
        "ddb_ms": 1000 * sum(i.ddb_seconds for i in invocations) / max(1, ddb_seen),
        "gbs_per_1k": 1000 * gb_seconds / max(1.0, calls),
        "cpu_ms_per_call": 1000 * sandbox_cpu / max(1.0, calls),
        "rss_mb": max((i.rss_mb for i in invocations), default=0.0),
        "invocations": len(invocations),
        "cold": sum(i.cold for i in invocations),
        "own_cpu": own_cpu / max(1e-9, (time.monotonic() - started) * cores),
        "host_cpu": host_busy / host_total if host_total else 0.0,
        "exact": bool(comparison and comparison.exact),
        "complete": bool(status and status.complete and not dead_letters),
        "first_output": first_output,
        # The vendor's first and last request, seconds into the run (0.0 if none came).
        "first_call": vendor["first_at"] - started if vendor["first_at"] else 0.0,
        "last_call": vendor["last_at"] - started if vendor["last_at"] else 0.0,
        "stalled": stalled,
        "throttled": sum(f.throttled for f in drains.values()),  # attempts, retries included
        "dropped": lambda_service.dropped,  # events too old when a retry came
        "failed": sum(bool(i.error) for i in invocations),
        "errors": sorted({f"{i.function}: {i.error[:160]}" for i in invocations if i.error}),
        "timeline": timeline,
        # Budget slots claimed, used for a call, given back, and lost (none of those).
        "slots": sum((Counter(i.slots) for i in invocations), Counter()),
        # Full garbage collections during invocations: every thread of one waits them out.
        "gc": {k: sum(i.gc.get(k, 0.0) for i in invocations) for k in ("full", "ms")},
        "vendor_nice": simulator.nice,
        # X-Ray segment documents the sandboxes sent to the daemon, per call, and their size.
        "trace_per_call": traced[0] / max(1.0, calls),
        "trace_kb": traced[1] / 1024,
        "invocation_log": [
            (round(i.at - started, 2), i.function, round(i.init, 2), round(i.duration, 2))
            for i in sorted(invocations, key=lambda i: i.at)
        ],
        # What the pipeline asked DynamoDB for, by table and action (the harness's own
        # requests aside): the budget's item, and the ledger's state table.
        "ddb_actions": {
            f"{table} {action}": n
            for table, counts in (
                ("budget", Counter(moto_budget.requests) - harness_budget.actions),
                ("ledger", Counter(moto.requests) - harness.actions),
            )
            for action, n in sorted(counts.items())
        },
    }


def _sample(t: float, simulator: Any, store: Any, drains: dict[str, Function]) -> dict[str, Any]:
    """One point of `--timeline`: vendor calls so far, each stage's depth and invocations."""
    stages = {}
    for name, function in drains.items():
        depth = store.queue(name).depth()
        stages[name] = (depth.visible, depth.in_flight, function.running)
    return {"t": round(t, 2), "calls": int(simulator.stats()["requests"]), "stages": stages}


def print_timeline(timeline: list[dict[str, Any]]) -> None:
    """Calls per second and, per stage, visible/in flight/running invocations, one line a second."""
    previous = 0
    for point in timeline:
        stages = "  ".join(
            f"{name[:4]} {v:>4}/{f:<4} {r}" for name, (v, f, r) in point["stages"].items()
        )
        print(f"  {point['t']:6.1f}s {point['calls'] - previous:>4}/s  {stages}")
        previous = point["calls"]


def slots_line(slots: Counter[str]) -> str:
    """The budget's slots: every one claimed is used for a call, given back or lost."""
    lost = slots["claimed"] - slots["used"] - slots["given back"]
    return (
        f"  budget slots: {slots['claimed']:.0f} claimed, {slots['used']:.0f} used,"
        f" {slots['given back']:.0f} given back, {lost:.0f} lost;"
        f" {slots['claims']:.0f} claims, {slots['refused']:.0f} refused; {slots['late']:.0f} calls"
        f" sent later than LATE, {slots['made room']:.0f} slots left unused for them,"
        f" {slots['no room']:.0f} too late to; {slots['not sent']:.0f} not sent (late before"
        " the write)"
    )


def cpu_note(settings: Settings) -> str:
    """What CPU the sandboxes get, for the header."""
    if not settings.lambda_cpu:
        return "not limited (--no-lambda-cpu)"
    if not CpuShare.available():
        return "not limited (no writable cgroup here)"
    return (
        f"{settings.memory_mb / VCPU_MB:.3f} vCPU for a drain, {KICKOFF_MEMORY_MB / VCPU_MB:.3f}"
        " for the kickoff (Lambda's share for their memory)"
    )


def trace_note(per_call: float, kb: float) -> str:
    """What active tracing sent the X-Ray daemon."""
    return f"; X-Ray: {per_call:.2f} segment documents per call, {kb:.0f} KB"


def phases_line(r: dict[str, Any]) -> str:
    """Where the wall time went around the calls: before the first vendor call (the kickoff's
    start), between it and the first output (the listing stages), and after the last call
    until the manifest (the run's settling)."""
    return (
        f"  phases: first vendor call at {r['first_call']:.2f} s, first output at"
        f" {r['first_output']:.2f} s, last vendor call at {r['last_call']:.2f} s, settled at"
        f" {r['wall']:.2f} s (the tail {r['wall'] - r['last_call']:.2f} s)"
    )


def gc_note(collections: dict[str, float]) -> str:
    """The full garbage collections in invocations: a thread waiting for its slot meanwhile
    misses it."""
    return (
        f"; {collections['full']:.0f} full garbage collections in invocations,"
        f" {collections['ms']:.0f} ms"
    )


def line(name: str, r: dict[str, Any]) -> str:
    inv = f"{r['invocations']:.0f} ({r['cold']:.0f})"
    cpu = f"{r['own_cpu']:.2f}/{r['host_cpu']:.2f}"
    return (
        f"{name:<22} {r['calls']:>6.0f} {r['wall']:>7.1f} {r['ideal']:>7.1f} {r['util']:>5.2f} "
        f"{r['util_after_output']:>8.2f} {r['rate_limited']:>5.0f} {r['queue_per_entity']:>9.3f} "
        f"{r['ddb_per_call']:>12.2f} {r['ddb_ms']:>6.1f} {r['gbs_per_1k']:>7.1f} "
        f"{r['cpu_ms_per_call']:>11.2f} {r['rss_mb']:>6.0f} {inv:>10} {cpu:>12} "
        f"{'yes' if r['exact'] else 'NO':>5} {r['first_output']:>9.1f}"
    )


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One line from repeated runs: medians, but the most 429s any run drew (a median would
    hide one run's); exact and complete only if every run was."""
    result: dict[str, Any] = {
        key: statistics.median(float(r[key]) for r in runs)
        for key, value in runs[0].items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    result["rate_limited"] = max(float(r["rate_limited"]) for r in runs)
    for key in ("exact", "complete"):
        result[key] = all(r[key] for r in runs)
    result["stalled"] = any(r["stalled"] for r in runs)
    result["errors"] = sorted({e for r in runs for e in r["errors"]})
    result["timeline"] = runs[0]["timeline"]
    result["invocation_log"] = runs[0]["invocation_log"]
    result["ddb_actions"] = runs[0]["ddb_actions"]
    result["slots"] = runs[0]["slots"]
    result["gc"] = runs[0]["gc"]
    result["refusals"] = [refusal for r in runs for refusal in r["refusals"]]
    result["throttling"] = runs[0]["throttling"]
    return result


def refusal_line(
    at: float,
    ages: list[float],
    period: float,
    calls: int,
    pauses: list[tuple[float, float]],
) -> str:
    """One 429 as the vendor saw it: the window that was full, where its calls crowded, and
    the simulator's long garbage collections meanwhile (`pauses`: seconds before the 429,
    seconds).

    Evenly spaced at the budget's interval, `calls` stamps span more than `period`; a window
    that held them all had somewhere a run of calls closer together than that.
    """
    stamps = sorted(-a for a in ages)  # seconds before the refusal, oldest first
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    even = period / calls
    tight = sorted(range(len(gaps)), key=lambda i: gaps[i])[:3]
    where = ", ".join(f"{1000 * gaps[i]:.1f} ms at {-1000 * stamps[i]:.0f} ms" for i in tight)
    collected = [f"{1000 * seconds:.0f} ms at {1000 * before:.0f} ms" for before, seconds in pauses]
    return (
        f"  429 at {at:.2f} s: {len(stamps)} calls in the window, the first {-1000 * stamps[0]:.0f}"
        f" ms before it; {sum(g < even / 2 for g in gaps)} gaps under half of {1000 * even:.1f}"
        f" ms; tightest: {where}; the simulator's garbage collections over 2 ms before it:"
        f" {', '.join(collected) or 'none'}"
    )


def throttling_note(throttling: list[float]) -> str:
    """How often the sandboxes' CPU share held them (CFS periods out of quota)."""
    periods, throttled, held = throttling
    if not periods:
        return ""
    return (
        f"; CPU share: sandboxes held in {throttled:.0f} of {periods:.0f} CFS periods,"
        f" {held:.1f} s in all"
    )


def notes(r: dict[str, Any]) -> str:
    """What the line's numbers do not say: failed invocations, a stall, a run left incomplete."""
    said = []
    if r["failed"]:
        said.append(f"{r['failed']:.0f} failed invocations ({'; '.join(r['errors'])})")
    if r["stalled"]:
        said.append("STALLED")
    elif not r["complete"]:
        said.append("incomplete")
    return "  " + ", ".join(said) if said else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("AWS mode (--aws)")
    group.add_argument("--aws", action="store_true", help="run the AWS-mode bench (bench/aws.py)")
    defaults = Settings()
    group.add_argument(
        "--tick",
        type=float,
        default=defaults.tick,
        help="seconds that stand for the drains' one-minute schedule; the timeouts shrink"
        f" with it (default {defaults.tick:g})",
    )
    group.add_argument(
        "--memory", type=int, default=defaults.memory_mb, help="function memory, MB (1024)"
    )
    group.add_argument(
        "--no-lambda-cpu",
        dest="lambda_cpu",
        action="store_false",
        help="leave the sandboxes' CPU unlimited (default: memory / 1,769 of a CPU once a"
        " sandbox's handler is imported, as Lambda gives it)",
    )
    group.add_argument(
        "--ddb-ms", type=float, default=defaults.ddb_ms, help="least DynamoDB round trip (8)"
    )
    group.add_argument(
        "--sqs-ms", type=float, default=defaults.sqs_ms, help="added per queue request (15)"
    )
    group.add_argument(
        "--s3-ms", type=float, default=defaults.s3_ms, help="added per sink request (20)"
    )
    group.add_argument(
        "--large",
        action="store_true",
        help="instead of the scenarios, one of a harvest's size (35,000 calls at 100/s)",
    )
    group.add_argument(
        "--phase",
        type=float,
        default=defaults.phase,
        help="when the schedule's first tick comes after the kickoff starts, in ticks"
        f" (default {defaults.phase:g}: the average)",
    )
    group.add_argument(
        "--no-start-drains",
        dest="start_drains",
        action="store_false",
        help="only the schedule starts drains (no HARVEST_DRAIN_FUNCTIONS): the kickoff does"
        " not start them, a drain out of time starts no successor",
    )
    group.add_argument(
        "--warm",
        action="store_true",
        help="every drain has one warm sandbox when the kickoff starts (the schedule's idle"
        " ticks leave them so before a daily harvest); default: all start cold",
    )
    group.add_argument(
        "--timeline",
        action="store_true",
        help="after each line, calls per second and each stage's queue, one line a second",
    )


def main(args: argparse.Namespace, scratch: str | None) -> int:
    settings = Settings(
        tick=args.tick,
        memory_mb=args.memory,
        ddb_ms=args.ddb_ms,
        sqs_ms=args.sqs_ms,
        s3_ms=args.s3_ms,
        timeline=args.timeline,
        phase=args.phase,
        start_drains=args.start_drains,
        lambda_cpu=args.lambda_cpu,
        warm=args.warm,
    )
    print(
        f"# AWS mode, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, python {sys.version.split()[0]}:"
        f" tick {settings.tick:g} s for 60 s, drain timeout {settings.drain_timeout:g} s,"
        f" margin {settings.safety_margin:g} s, {settings.memory_mb} MB;"
        f" DynamoDB >= {settings.ddb_ms:g} ms, SQS +{settings.sqs_ms:g} ms,"
        f" S3 +{settings.s3_ms:g} ms; first tick {settings.phase:g} tick after the kickoff,"
        f" drains started by the kickoff and by each other:"
        f" {'yes' if settings.start_drains else 'no'};"
        f" drains {'warm (one sandbox each)' if settings.warm else 'cold'} at the kickoff;"
        " CPU per sandbox after its init: " + cpu_note(settings)
    )
    print(HEADER, flush=True)
    failed = False
    for scenario in LARGE if args.large else SCENARIOS:
        if args.only and not any(scenario.name.startswith(o) for o in args.only):
            continue
        if args.quick:
            scenario = scenario.scaled(0.1)
        try:
            result = combine([run_one(scenario, settings, scratch) for _ in range(args.repeat)])
        except Exception as exc:  # report it, go on with the next scenario
            print(f"{scenario.name:<22} FAILED: {type(exc).__name__}: {exc}", flush=True)
            failed = True
            continue
        print(line(scenario.name, result) + notes(result), flush=True)
        note = (
            gc_note(result["gc"])
            + trace_note(result["trace_per_call"], result["trace_kb"])
            + "; "
            + nice_note(result["vendor_nice"])
            + throttling_note(result["throttling"])
        )
        print(slots_line(result["slots"]) + note, flush=True)
        print(phases_line(result), flush=True)
        for at, ages, pauses in result["refusals"]:
            print(
                refusal_line(at, ages, scenario.rate_period, scenario.vendor_calls, pauses),
                flush=True,
            )
        if settings.timeline and args.repeat == 1:
            calls = max(1.0, result["calls"])
            print(
                "  DynamoDB requests per call, by table and action: "
                + ", ".join(f"{a} {n / calls:.3f}" for a, n in result["ddb_actions"].items())
            )
            print_timeline(result["timeline"])
            for at, function, init, duration in result["invocation_log"]:
                print(f"  invoked {at:6.2f}s {function:<16} cold {init:4.2f}s ran {duration:5.2f}s")
        failed |= not result["exact"] or result["stalled"]
    return 1 if failed else 0
