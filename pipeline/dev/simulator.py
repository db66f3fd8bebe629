"""A local HTTP server playing the vendor API (contract v1) for tests, `harvest local`, benches.

The tree is deterministic from the seed and sized exactly by the config:
``troops`` troops, each with exactly ``warriors_per_troop`` warriors, each with exactly
``data_groups_per_warrior`` data groups, and one point per data group at every multiple of
``point_interval`` seconds since the Unix epoch. Faults are deterministic from the seed and the
request (decoded path segments plus query), so a rerun sees the same faults in the same places.
An error-faulty request answers 5xx (no Retry-After) for its first ``max_failures_per_path``
attempts; a stalling or truncating one misbehaves on its first attempt only. 401s and 429s are
not attempts, so faults heal the same way however hard the client is throttled.

Out-of-band endpoints, without auth and outside the rate limit:
``GET /_sim/truth?from=&to=`` (the ground truth), ``GET /_sim/stats``, ``GET /_sim/gone`` and
``GET /_sim/expected-calls?from=&to=``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import functools
import hashlib
import json
import math
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, unquote

from pipeline.dev.verify import Comparison, compare

if TYPE_CHECKING:
    from pipeline.sinks import Sink
    from pipeline.window import Window

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_ERROR_STATUSES = (500, 502, 503, 504)
_ERROR_NAMES = {500: "internal", 502: "bad_gateway", 503: "unavailable", 504: "gateway_timeout"}
_METRICS = (
    ("cpu.utilization", "%"),
    ("memory.rss", "bytes"),
    ("requests.rate", "1/s"),
    ("latency.p99", "ms"),
    ("errors.rate", "1/s"),
    ("disk.io", "bytes/s"),
    ("gc.pause", "ms"),
    ("queue.depth", "1"),
)
# Pieces that break clients which do not encode an id as exactly one path segment.
_NASTY_RESERVED = ("?", "#", "%", "+", "%2F", "%25", "&", "=", ";", "?x=1", "#top", "%zz")
_NASTY_LETTERS = ("é", "Ω", "猫", "ß", "Ж", "ü", "ø")
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)
_LIST_PARAMS = frozenset({"limit", "cursor"})
_DATA_PARAMS = frozenset({"limit", "cursor", "from", "to"})


@dataclass(frozen=True)
class SimulatorConfig:
    """What the simulated vendor serves and how it misbehaves."""

    seed: int = 7
    troops: int = 5
    warriors_per_troop: int = 6  # exactly this many under every troop
    data_groups_per_warrior: int = 8  # exactly this many under every warrior
    point_interval: float = 3600.0  # seconds between points, aligned to the epoch
    page_size: int = 100  # max and default `limit`
    token: str = "sim-token"
    rate_calls: int = 100  # L
    rate_period: float = 1.0  # W
    latency: float = 0.0  # seconds added to every response
    # Seconds, at most, that a request's arrival stamp in the rate limit's sliding log lags
    # the moment the server takes it (uniform, from the seed): the network and a loaded
    # host's jitter, as a strict vendor sees it. 0 stamps every request on arrival, in order.
    arrival_jitter: float = 0.0
    error_rate: float = 0.0  # share of requests answering 5xx for max_failures_per_path attempts
    stall_rate: float = 0.0  # share of requests stalling stall_seconds on the first attempt
    stall_seconds: float = 5.0
    truncate_rate: float = 0.0  # share of requests whose first 200 body is cut short
    gone_rate: float = 0.0  # share of warriors and data groups listed but answering 404
    nasty_ids: bool = False  # ids with '/', '?', '#', '%', '+', spaces, '..', non-ASCII
    max_failures_per_path: int = 2  # attempts an error-faulty request fails before it heals


@dataclass
class SimulatorStats:
    """Counters of the /v1 requests the simulator answered; safe to share between threads."""

    requests: int = 0  # every /v1 request, 401s and 429s included
    by_status: dict[int, int] = field(default_factory=dict)
    rate_limited: int = 0  # 429 responses
    max_in_window: int = 0  # most accepted requests seen in one rolling window of the current W
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, status: int) -> None:
        with self._lock:
            self.requests += 1
            self.by_status[status] = self.by_status.get(status, 0) + 1
            if status == 429:
                self.rate_limited += 1

    def observe_window(self, in_window: int) -> None:
        with self._lock:
            self.max_in_window = max(self.max_in_window, in_window)

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.by_status = {}
            self.rate_limited = 0
            self.max_in_window = 0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "by_status": dict(self.by_status),
                "rate_limited": self.rate_limited,
                "max_in_window": self.max_in_window,
            }


@dataclass(frozen=True)
class _Troop:
    id: str
    item: str  # the item's JSON text, serialised once


@dataclass(frozen=True)
class _Warrior:
    id: str
    troop_id: str
    gone: bool
    item: str


@dataclass(frozen=True)
class _DataGroup:
    id: str
    warrior_id: str
    troop_id: str
    gone: bool  # 404 on its own or because its warrior is gone
    item: str


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds to wait before answering


class _BadRequestError(Exception):
    """A request the vendor answers with 400."""


def _digest(*parts: object) -> bytes:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()


def _unit(*parts: object) -> float:
    """A deterministic number in [0, 1) for the given parts."""
    return int.from_bytes(_digest(*parts), "big") / 2**64


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _error_body(error: str, message: str | None = None) -> bytes:
    body: dict[str, str] = {"error": error}
    if message is not None:
        body["message"] = message
    return _dumps(body).encode()


def _pages(items: int, page_size: int) -> int:
    """Calls needed to list `items` items: an empty list still takes one call."""
    return max(1, math.ceil(items / page_size))


def _micros(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - _EPOCH) // _MICROSECOND


@functools.lru_cache(maxsize=4096)
def _date_text(day: int) -> str:
    value = _EPOCH + timedelta(days=day)
    return f"{value.year:04d}-{value.month:02d}-{value.day:02d}"


def _format_ts(micros: int) -> str:
    """RFC 3339 UTC with a 'Z'; fractional seconds only when there are any."""
    seconds, fraction = divmod(micros, 1_000_000)
    day, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{_date_text(day)}T{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{clock}.{fraction:06d}Z" if fraction else f"{clock}Z"


def _parse_instant(name: str, text: str | None) -> int:
    """An RFC 3339 instant as microseconds since the epoch; 400 if it is not one."""
    if text is None:
        raise _BadRequestError(f"'{name}' is required")
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _BadRequestError(f"'{name}' is not an RFC 3339 instant: {text!r}")
    whole, fraction, offset = match.groups()
    fraction = (fraction or "0")[:6].ljust(6, "0")
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        value = datetime.fromisoformat(f"{whole}.{fraction}{offset}")
    except ValueError as exc:
        raise _BadRequestError(f"'{name}' is not an RFC 3339 instant: {text!r}") from exc
    return _micros(value)


def _nasty_id(kind: str, index: str, serial: int, tag: str) -> str:
    # The index sits before the first '/', which keeps ids unique; the rest rotates through
    # every reserved piece so a tree of any size exercises them all.
    first = _NASTY_RESERVED[serial % len(_NASTY_RESERVED)]
    second = _NASTY_RESERVED[(serial * 5 + 3) % len(_NASTY_RESERVED)]
    letter = _NASTY_LETTERS[serial % len(_NASTY_LETTERS)]
    lead = "../" if serial % 3 == 0 else ""
    return f"{lead}{kind} {index}/{first}{letter}..{tag}{second} +x"


class _Tree:
    """The vendor's entities, built once from the config."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.troops: list[_Troop] = []
        self.warriors_of: dict[str, list[_Warrior]] = {}
        self.data_groups_of: dict[str, list[_DataGroup]] = {}
        self.warriors: dict[str, _Warrior] = {}
        self.data_groups: dict[str, _DataGroup] = {}
        serial = 0

        def make_id(kind: str, index: str) -> str:
            nonlocal serial
            serial += 1
            tag = _digest(config.seed, kind, index).hex()[:6]
            if config.nasty_ids:
                return _nasty_id(kind, index, serial, tag)
            return f"{kind}-{index}-{tag}"

        for t in range(config.troops):
            troop_id = make_id("troop", f"{t}")
            self.troops.append(_Troop(troop_id, _dumps({"id": troop_id, "name": f"Troop {t}"})))
            warriors = self.warriors_of[troop_id] = []
            for w in range(config.warriors_per_troop):
                warrior_id = make_id("warrior", f"{t}-{w}")
                warrior_gone = _unit(config.seed, "gone", warrior_id) < config.gone_rate
                warrior = _Warrior(
                    warrior_id,
                    troop_id,
                    warrior_gone,
                    _dumps({"id": warrior_id, "troop_id": troop_id, "name": f"svc-{t}-{w}"}),
                )
                warriors.append(warrior)
                self.warriors[warrior_id] = warrior
                groups = self.data_groups_of[warrior_id] = []
                for d in range(config.data_groups_per_warrior):
                    group_id = make_id("dg", f"{t}-{w}-{d}")
                    metric, unit = _METRICS[d % len(_METRICS)]
                    item = {
                        "id": group_id,
                        "warrior_id": warrior_id,
                        "metric": metric,
                        "unit": unit,
                    }
                    group_gone = _unit(config.seed, "gone", group_id) < config.gone_rate
                    group = _DataGroup(
                        group_id, warrior_id, troop_id, warrior_gone or group_gone, _dumps(item)
                    )
                    groups.append(group)
                    self.data_groups[group_id] = group

    def reachable_groups(self) -> Iterator[_DataGroup]:
        """Data groups a harvest lists: those under warriors that are not gone."""
        for troop in self.troops:
            for warrior in self.warriors_of[troop.id]:
                if not warrior.gone:
                    yield from self.data_groups_of[warrior.id]


class _SlidingLog:
    """Per-token sliding-log rate limit: at most `calls` accepted requests in any `period`.

    With `jitter`, each request is stamped up to that much later than it is taken, so stamps
    no longer come in order: a request is accepted only if no rolling `period` around its
    stamp would then hold more than `calls` stamps, however the later ones fall.
    """

    def __init__(
        self, calls: int, period: float, stats: SimulatorStats, jitter: float = 0.0, seed: int = 0
    ) -> None:
        self._calls = calls
        self._period = period
        self._stats = stats
        self._jitter = jitter
        self._random = random.Random(seed)
        self._logs: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def configure(self, calls: int, period: float) -> None:
        with self._lock:
            self._calls = calls
            self._period = period

    def _trim(self, log: deque[float], now: float) -> None:
        horizon = now - self._period
        while log and log[0] <= horizon:
            log.popleft()

    def _reset_after(self, log: deque[float], now: float) -> float:
        """Seconds until one more request fits the window."""
        if len(log) < self._calls:
            return 0.0
        return log[len(log) - self._calls] + self._period - now

    def peek(self, token: str) -> tuple[int, int, float]:
        """(limit, remaining, reset) for a token, without taking a slot."""
        with self._lock:
            now = time.monotonic()
            log = self._logs.get(token, deque())
            self._trim(log, now)
            return self._calls, max(0, self._calls - len(log)), self._reset_after(log, now)

    def acquire(self, token: str) -> tuple[bool, int, int, float]:
        """(accepted, limit, remaining, reset); a rejected request leaves no trace in the log."""
        with self._lock:
            now = time.monotonic()
            log = self._logs.setdefault(token, deque())
            self._trim(log, now)
            if self._jitter > 0:
                accepted = self._admit(log, now + self._random.uniform(0.0, self._jitter))
            else:
                accepted = len(log) < self._calls
                if accepted:
                    log.append(now)
                    self._stats.observe_window(len(log))
            remaining = max(0, self._calls - len(log))
            return accepted, self._calls, remaining, self._reset_after(log, now)

    def _admit(self, log: deque[float], stamp: float) -> bool:
        """Log `stamp` unless some rolling window holding it would then hold over `calls`.

        The log is sorted; stamps after `stamp` are at most `jitter` later than now. Windows
        are half-open, (t - period, t], as `_trim` ages them out.
        """
        stamps = list(log)
        at = bisect.bisect_right(stamps, stamp)
        stamps.insert(at, stamp)
        busiest = 0
        for first in range(max(0, at - self._calls), at + 1):
            held = bisect.bisect_left(stamps, stamps[first] + self._period) - first
            busiest = max(busiest, held)
        if busiest > self._calls:
            return False
        log.clear()
        log.extend(stamps)
        self._stats.observe_window(busiest)
        return True


def _rate_headers(limit: int, remaining: int, reset: float) -> tuple[tuple[str, str], ...]:
    reset_text = "0" if reset <= 0 else f"{max(reset, 0.001):.3f}"
    return (
        ("X-RateLimit-Limit", str(limit)),
        ("X-RateLimit-Remaining", str(remaining)),
        ("X-RateLimit-Reset", reset_text),
    )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        self.simulator = simulator
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        # Nagle holds a small write until the previous one is acknowledged, and the client
        # delays its ACKs: without TCP_NODELAY a keep-alive client waits ~40 ms per request.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Hang up on keep-alive clients so nothing is served after stop()."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out or hang up mid-answer are normal here; anything else is a bug.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 64 * 1024  # headers and body leave in one write, flushed per request

    def do_GET(self) -> None:
        simulator = cast(_Server, self.server).simulator
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > 0:
            self.rfile.read(length)
        response = simulator._respond(self.path, self.headers.get("Authorization"))
        if response.delay > 0:
            simulator._pause(response.delay)
        self.send_response(response.status)
        for name, value in response.headers:
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Simulator:
    """The vendor API served over real HTTP on 127.0.0.1, from a deterministic tree."""

    def __init__(
        self, config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or SimulatorConfig()
        self.stats = SimulatorStats()
        self._host = host
        self._port = port
        self._tree = _Tree(self.config)
        self._limiter = _SlidingLog(
            self.config.rate_calls,
            self.config.rate_period,
            self.stats,
            self.config.arrival_jitter,
            self.config.seed,
        )
        self._cursor_key = _digest(self.config.seed, "cursor-key")
        self._attempts: dict[str, int] = {}
        self._attempts_lock = threading.Lock()
        self._failing: frozenset[str] = frozenset()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Serve in a daemon thread; returns the base URL, e.g. "http://127.0.0.1:PORT"."""
        if self._server is not None and self._url is not None:
            return self._url
        self._stopping.clear()
        server = _Server((self._host, self._port), self)
        host, port = server.server_address[:2]
        self._server = server
        self._url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"simulator:{port}",
        )
        self._thread.start()
        return self._url

    def stop(self) -> None:
        """Stop serving and hang up on open connections; stalled answers are abandoned."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL, without a trailing slash; only after start()."""
        if self._url is None:
            raise RuntimeError("the simulator has not been started")
        return self._url

    @property
    def token(self) -> str:
        return self.config.token

    # -- controls --------------------------------------------------------------------------

    def fail_permanently(self, entity_id: str) -> None:
        """From now on every request whose path names this entity answers 503."""
        self._failing = self._failing | {entity_id}

    def heal(self) -> None:
        """Lift every fail_permanently fault."""
        self._failing = frozenset()

    def set_rate_limit(self, calls: int, period: float) -> None:
        """Change L and W; max_in_window restarts, since it is measured against W."""
        self._limiter.configure(calls, period)
        with self.stats._lock:
            self.stats.max_in_window = 0

    # -- what a correct harvest produces -----------------------------------------------------

    def ground_truth(
        self, start: datetime, end: datetime
    ) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
        """Every data group a correct harvest of [start, end) yields, with its points by ts."""
        first, count = self._point_range(_micros(start), _micros(end))
        truth: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for group in self._tree.reachable_groups():
            if group.gone:
                continue
            truth[(group.troop_id, group.warrior_id, group.id)] = [
                {"ts": ts, "value": value}
                for ts, value in self._points(group.id, first, first + count)
            ]
        return truth

    def check(self, sink: Sink, run_id: str, window: Window) -> Comparison:
        """A run's output in `sink` against the ground truth of `window`."""
        return compare(sink, run_id, self.ground_truth(window.start, window.end))

    def gone(self) -> set[tuple[str, ...]]:
        """What a harvest finds gone: (troop, warrior) and (troop, warrior, data group) paths.

        Data groups under a gone warrior answer 404 too, but a harvest never lists them, so they
        are not here.
        """
        found: set[tuple[str, ...]] = set()
        for troop in self._tree.troops:
            for warrior in self._tree.warriors_of[troop.id]:
                if warrior.gone:
                    found.add((troop.id, warrior.id))
                    continue
                for group in self._tree.data_groups_of[warrior.id]:
                    if group.gone:
                        found.add((troop.id, warrior.id, group.id))
        return found

    def expected_calls(self, start: datetime, end: datetime) -> int:
        """Calls (200 or 404) a perfect harvest of [start, end) makes with limit=page_size."""
        size = self.config.page_size
        _, points = self._point_range(_micros(start), _micros(end))
        calls = _pages(len(self._tree.troops), size)
        for troop in self._tree.troops:
            warriors = self._tree.warriors_of[troop.id]
            calls += _pages(len(warriors), size)
            for warrior in warriors:
                calls += (
                    1 if warrior.gone else _pages(len(self._tree.data_groups_of[warrior.id]), size)
                )
        for group in self._tree.reachable_groups():
            calls += 1 if group.gone else _pages(points, size)
        return calls

    # -- serving -----------------------------------------------------------------------------

    @property
    def _interval_us(self) -> int:
        return max(1, round(self.config.point_interval * 1_000_000))

    def _point_range(self, start_us: int, end_us: int) -> tuple[int, int]:
        """(first point index, number of points) with start <= ts < end."""
        interval = self._interval_us
        first = -(-start_us // interval)
        after = -(-end_us // interval)
        return first, max(0, after - first)

    def _points(self, group_id: str, first: int, stop: int) -> list[tuple[str, float]]:
        """(ts, value) of points first..stop-1; a value depends on seed, group id and ts only."""
        interval = self._interval_us
        prefix = f"{self.config.seed}\x1fvalue\x1f{group_id}\x1f".encode()
        points = []
        for index in range(first, stop):
            micros = index * interval
            digest = hashlib.blake2b(prefix + b"%d" % micros, digest_size=8).digest()
            value = round(int.from_bytes(digest, "big") / 2**64 * 1000.0, 3)
            points.append((_format_ts(micros), value))
        return points

    def _pause(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _respond(self, target: str, authorization: str | None) -> _Response:
        raw_path, _, raw_query = target.partition("?")
        try:
            segments: list[str] | None = [
                unquote(part, errors="strict") for part in raw_path.split("/")[1:]
            ]
        except UnicodeDecodeError:
            segments = None
        if segments and segments[0] == "_sim":
            return self._respond_sim(segments, raw_query)
        response = self._respond_vendor(segments, raw_query, authorization)
        self.stats.record(response.status)
        if self.config.latency > 0:
            response = _Response(
                response.status,
                response.body,
                response.headers,
                response.delay + self.config.latency,
            )
        return response

    def _respond_vendor(
        self, segments: list[str] | None, raw_query: str, authorization: str | None
    ) -> _Response:
        token = self._token(authorization)
        if token != self.config.token:
            headers = _rate_headers(*self._limiter.peek(token or ""))
            return _Response(401, _error_body("unauthorized"), headers)
        accepted, limit, remaining, reset = self._limiter.acquire(token)
        headers = _rate_headers(limit, remaining, reset)
        if not accepted:
            retry_after = ("Retry-After", str(max(1, math.ceil(reset))))
            return _Response(429, _error_body("rate_limited"), (*headers, retry_after))

        route = self._route(segments)
        if route is None:
            return _Response(404, _error_body("not_found"), headers)
        kind, entity_id = route
        if entity_id is not None and entity_id in self._failing:
            return _Response(503, _error_body(_ERROR_NAMES[503]), headers)

        params: dict[str, str] | None = None
        problem = ""
        try:
            params = self._params(raw_query, _DATA_PARAMS if kind == "data" else _LIST_PARAMS)
        except _BadRequestError as exc:
            problem = str(exc)
        fault_key = _dumps([segments, sorted(params.items()) if params is not None else raw_query])
        fault, attempt = self._fault(fault_key)
        delay = 0.0
        if fault == "error" and attempt <= self.config.max_failures_per_path:
            status = _ERROR_STATUSES[int(_unit(self.config.seed, "status", fault_key) * 4)]
            return _Response(status, _error_body(_ERROR_NAMES[status]), headers)
        if fault == "stall" and attempt == 1 and self.config.max_failures_per_path > 0:
            delay = self.config.stall_seconds

        if params is None:
            return _Response(400, _error_body("bad_request", problem), headers, delay)
        try:
            status, body = self._answer(kind, entity_id, params, segments or [])
        except _BadRequestError as exc:
            status, body = 400, _error_body("bad_request", str(exc))
        if (
            status == 200
            and fault == "truncate"
            and attempt == 1
            and self.config.max_failures_per_path > 0
        ):
            body = body[: max(1, len(body) // 2)]
        return _Response(status, body, headers, delay)

    @staticmethod
    def _token(authorization: str | None) -> str | None:
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return token

    @staticmethod
    def _route(segments: list[str] | None) -> tuple[str, str | None] | None:
        """(endpoint, entity id) for a vendor path, or None when no endpoint has that shape."""
        if segments is None or not segments or segments[0] != "v1":
            return None
        if segments[1:] == ["troops"]:
            return "troops", None
        if len(segments) != 4 or not segments[2]:
            return None
        shape = (segments[1], segments[3])
        if shape == ("troops", "warriors"):
            return "warriors", segments[2]
        if shape == ("warriors", "data-groups"):
            return "data-groups", segments[2]
        if shape == ("data-groups", "data"):
            return "data", segments[2]
        return None

    @staticmethod
    def _params(raw_query: str, allowed: frozenset[str]) -> dict[str, str]:
        try:
            pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError) as exc:
            raise _BadRequestError("malformed query string") from exc
        params: dict[str, str] = {}
        for name, value in pairs:
            if name not in allowed:
                raise _BadRequestError(f"unknown parameter {name!r}")
            if name in params:
                raise _BadRequestError(f"parameter {name!r} given twice")
            params[name] = value
        return params

    def _fault(self, key: str) -> tuple[str | None, int]:
        """The fault injected on this request, if any, and which attempt at it this is."""
        config = self.config
        roll = _unit(config.seed, "fault", key)
        fault: str | None = None
        for name, rate in (
            ("error", config.error_rate),
            ("stall", config.stall_rate),
            ("truncate", config.truncate_rate),
        ):
            if roll < rate:
                fault = name
                break
            roll -= rate
        if fault is None:
            return None, 0
        with self._attempts_lock:
            attempt = self._attempts.get(key, 0) + 1
            self._attempts[key] = attempt
        return fault, attempt

    def _answer(
        self, kind: str, entity_id: str | None, params: dict[str, str], segments: list[str]
    ) -> tuple[int, bytes]:
        tree = self._tree
        items: list[str] | None = None
        if kind == "troops":
            items = [troop.item for troop in tree.troops]
        elif kind == "warriors":
            warriors = tree.warriors_of.get(entity_id or "")
            items = None if warriors is None else [warrior.item for warrior in warriors]
        elif kind == "data-groups":
            warrior = tree.warriors.get(entity_id or "")
            if warrior is not None and not warrior.gone:
                items = [group.item for group in tree.data_groups_of[warrior.id]]
        if kind != "data":
            if items is None:
                return 404, _error_body("not_found")
            limit, offset = self._page(params, segments, len(items))
            return 200, self._page_body(
                items[offset : offset + limit], params, segments, offset + limit, len(items)
            )

        group = tree.data_groups.get(entity_id or "")
        if group is None or group.gone:
            return 404, _error_body("not_found")
        start_us = _parse_instant("from", params.get("from"))
        end_us = _parse_instant("to", params.get("to"))
        if start_us > end_us:
            raise _BadRequestError("'from' is after 'to'")
        first, count = self._point_range(start_us, end_us)
        limit, offset = self._page(params, segments, count)
        points = [
            f'{{"ts":"{ts}","value":{value!r}}}'
            for ts, value in self._points(
                group.id, first + offset, first + min(count, offset + limit)
            )
        ]
        return 200, self._page_body(points, params, segments, offset + limit, count)

    def _page(self, params: dict[str, str], segments: list[str], total: int) -> tuple[int, int]:
        """(limit, offset) of the requested page; 400 for a bad limit or cursor."""
        text = params.get("limit")
        if text is None:
            limit = self.config.page_size
        elif (
            not text.isascii() or not text.isdigit() or not 1 <= int(text) <= self.config.page_size
        ):
            raise _BadRequestError(f"'limit' must be an integer from 1 to {self.config.page_size}")
        else:
            limit = int(text)
        cursor = params.get("cursor")
        if cursor is None:
            return limit, 0
        offset = self._decode_cursor(cursor, params, segments)
        if offset is None or not 0 < offset < total:
            raise _BadRequestError("invalid cursor for this path and query")
        return limit, offset

    def _binding(self, params: dict[str, str], segments: list[str], offset: int) -> str:
        query = sorted((name, value) for name, value in params.items() if name != "cursor")
        material = _dumps([segments, query, offset])
        return hashlib.blake2b(material.encode(), digest_size=12, key=self._cursor_key).hexdigest()

    def _encode_cursor(self, params: dict[str, str], segments: list[str], offset: int) -> str:
        raw = f"{offset}.{self._binding(params, segments, offset)}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def _decode_cursor(
        self, cursor: str, params: dict[str, str], segments: list[str]
    ) -> int | None:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        offset_text, _, signature = raw.partition(".")
        if not offset_text.isascii() or not offset_text.isdigit():
            return None
        offset = int(offset_text)
        if signature != self._binding(params, segments, offset):
            return None
        return offset

    def _page_body(
        self, items: list[str], params: dict[str, str], segments: list[str], after: int, total: int
    ) -> bytes:
        next_cursor = (
            _dumps(self._encode_cursor(params, segments, after)) if after < total else "null"
        )
        return f'{{"items":[{",".join(items)}],"next_cursor":{next_cursor}}}'.encode()

    def _respond_sim(self, segments: list[str], raw_query: str) -> _Response:
        """The out-of-band endpoints: no auth, no rate limit, not counted in stats."""
        try:
            params = dict(parse_qsl(raw_query, keep_blank_values=True))
            if segments[1:] == ["stats"]:
                return _Response(200, _dumps(self.stats.snapshot()).encode())
            if segments[1:] == ["gone"]:
                return _Response(200, _dumps(sorted(list(path) for path in self.gone())).encode())
            if segments[1:] in (["truth"], ["expected-calls"]):
                start = _EPOCH + timedelta(microseconds=_parse_instant("from", params.get("from")))
                end = _EPOCH + timedelta(microseconds=_parse_instant("to", params.get("to")))
                if segments[1:] == ["expected-calls"]:
                    return _Response(
                        200, _dumps({"calls": self.expected_calls(start, end)}).encode()
                    )
                truth = [
                    {"troop_id": t, "warrior_id": w, "data_group_id": d, "points": points}
                    for (t, w, d), points in self.ground_truth(start, end).items()
                ]
                return _Response(200, _dumps(truth).encode())
        except _BadRequestError as exc:
            return _Response(400, _error_body("bad_request", str(exc)))
        return _Response(404, _error_body("not_found"))


def serve(config: SimulatorConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the simulator until KeyboardInterrupt, then shut it down and return."""
    simulator = Simulator(config, host=host, port=port)
    simulator.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        simulator.stop()


def _child_main() -> None:
    """`python -m pipeline.dev.simulator`: read a SimulatorConfig as JSON on stdin, print the URL,
    serve until stdin closes."""
    config = SimulatorConfig(**json.loads(sys.stdin.readline()))
    simulator = Simulator(config)
    print(simulator.start(), flush=True)
    try:
        sys.stdin.read()  # returns when the parent closes the pipe or goes away
    finally:
        simulator.stop()


class SimulatorProcess:
    """The simulator in a child process: its own interpreter, so it does not compete for the
    pipeline's GIL (in one process a 200 calls/s harvest is CPU-bound on 2 cores).

    The tree is deterministic, so `ground_truth` and friends are computed here from the config.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self._process: subprocess.Popen[str] | None = None
        self._url: str | None = None

    @functools.cached_property
    def _model(self) -> Simulator:
        """The same tree, built here only when asked about (it is not served here)."""
        return Simulator(self.config)

    @property
    def token(self) -> str:
        return self.config.token

    def start(self) -> str:
        # The config (token included) goes over stdin, never argv.
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.dev.simulator"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(dataclasses.asdict(self.config)) + "\n")
        process.stdin.flush()
        url = process.stdout.readline().strip()
        if not url.startswith("http://"):
            process.kill()
            raise RuntimeError(f"the simulator process did not start (said {url!r})")
        self._process, self._url = process, url
        return url

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the simulator has not been started")
        return self._url

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()

    def stats(self) -> dict[str, Any]:
        """The child's SimulatorStats snapshot, over HTTP."""
        with urllib.request.urlopen(f"{self.url}/_sim/stats", timeout=10) as response:
            data: dict[str, Any] = json.loads(response.read())
            return data

    def ground_truth(
        self, start: datetime, end: datetime
    ) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
        return self._model.ground_truth(start, end)

    def expected_calls(self, start: datetime, end: datetime) -> int:
        return self._model.expected_calls(start, end)

    def check(self, sink: Sink, run_id: str, window: Window) -> Comparison:
        return self._model.check(sink, run_id, window)

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    _child_main()
