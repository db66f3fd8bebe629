"""A local HTTP server playing the vendor API for tests, `harvest local`, benches: the vendor
its profile describes (by default hermes-v1, contract v1 in vendor-api.md).

The server checks the profile's auth, answers what the model (`model.py`) holds, after the
faults and the rate limit (`faults.py`) have had their say, with the profile's status codes
and rate-limit headers.

Out-of-band endpoints, without auth and outside the rate limit:
``GET /_sim/truth?from=&to=`` (the ground truth), ``GET /_sim/stats``, ``GET /_sim/gone`` and
``GET /_sim/expected-calls?from=&to=``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import gc
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, unquote

from pipeline.dev.simulator.faults import ERROR_NAMES, Faults, SlidingLog, rate_headers
from pipeline.dev.simulator.model import (
    EPOCH,
    PAUSE_KEPT_SECONDS,
    BadRequestError,
    SimulatorConfig,
    SimulatorStats,
    VendorModel,
    draw,
    dumps,
    error_body,
    parse_instant,
)
from pipeline.dev.verify import Comparison, compare
from pipeline.profile import AuthKind

if TYPE_CHECKING:
    from pipeline.sinks import Sink
    from pipeline.window import Window


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds to wait before answering


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
        headers = {name.lower(): value for name, value in self.headers.items()}
        response = simulator._respond(self.path, headers)
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
    """The profile's vendor API served over real HTTP on 127.0.0.1, from a deterministic tree."""

    def __init__(
        self, config: SimulatorConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or SimulatorConfig()
        self.stats = SimulatorStats()
        self._host = host
        self._port = port
        self.model = VendorModel(self.config)
        self.codes = self.model.codes
        self._faults = Faults(self.config)
        self._limiter = SlidingLog(
            self.config.rate_calls,
            self.config.rate_period,
            self.stats,
            self.config.arrival_jitter,
            self.config.seed,
        )
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
        """From now on every request whose path names this entity answers 503 (`codes.failing`)."""
        self._faults.fail_permanently(entity_id)

    def heal(self) -> None:
        """Lift every fail_permanently fault."""
        self._faults.heal()

    def set_rate_limit(self, calls: int, period: float) -> None:
        """Change L and W; max_in_window restarts, since it is measured against W."""
        self._limiter.configure(calls, period)
        with self.stats._lock:
            self.stats.max_in_window = 0

    # -- what a correct harvest produces -----------------------------------------------------

    def ground_truth(
        self, start: datetime, end: datetime
    ) -> dict[tuple[str, ...], list[dict[str, Any]]]:
        """Every leaf (Hermes: data group) a correct harvest of [start, end) yields, by its
        path of ids (one a level), with its points by ts."""
        return self.model.ground_truth(start, end)

    def check(self, sink: Sink, run_id: str, window: Window) -> Comparison:
        """A run's output in `sink` against the ground truth of `window`."""
        truth = self.ground_truth(window.start, window.end)
        return compare(sink, run_id, truth, keys=self.config.profile.keys)

    def gone(self) -> set[tuple[str, ...]]:
        """What a harvest finds gone (see VendorModel.gone)."""
        return self.model.gone()

    def expected_calls(self, start: datetime, end: datetime) -> int:
        """Calls (200 or gone) a perfect harvest of [start, end) makes, asking for pages of
        the simulator's page size (see VendorModel.expected_calls)."""
        return self.model.expected_calls(start, end)

    # -- serving -----------------------------------------------------------------------------

    def _pause(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    def _respond(self, target: str, headers: Mapping[str, str] | None = None) -> _Response:
        """The answer to a GET of `target` (path and query) with `headers` (names in lower
        case)."""
        headers = headers or {}
        raw_path, _, raw_query = target.partition("?")
        try:
            segments: list[str] | None = [
                unquote(part, errors="strict") for part in raw_path.split("/")[1:]
            ]
        except UnicodeDecodeError:
            segments = None
        if segments and segments[0] == "_sim":
            return self._respond_sim(segments, raw_query)
        response = self._respond_vendor(segments, raw_path, raw_query, headers)
        self.stats.record(response.status, response.status == self.codes.rate_limited)
        if self.config.latency > 0:
            response = _Response(
                response.status,
                response.body,
                response.headers,
                response.delay + self.config.latency,
            )
        return response

    def _respond_vendor(
        self,
        segments: list[str] | None,
        raw_path: str,
        raw_query: str,
        headers: Mapping[str, str],
    ) -> _Response:
        codes = self.codes
        profile = self.config.profile
        pairs, token = self._split_query(raw_query)
        credential = self._credential(headers, token)
        if credential is None or credential != self._expected_credential:
            rate = self._rate_headers(*self._limiter.peek(credential or ""))
            return _Response(codes.auth, error_body("unauthorized"), rate)
        accepted, limit, remaining, reset = self._limiter.acquire(credential)
        rate = self._rate_headers(limit, remaining, reset)
        if not accepted:
            retry_after = profile.rate_limit.retry_after
            extra = ((retry_after, str(max(1, math.ceil(reset)))),) if retry_after else ()
            return _Response(codes.rate_limited, error_body("rate_limited"), (*rate, *extra))

        route = self.model.route(segments)
        if route is None:
            return _Response(codes.gone, error_body("not_found"), rate)
        if any(entity_id in self._faults.failing for entity_id in route.ids.values()):
            return _Response(
                codes.failing, error_body(ERROR_NAMES.get(codes.failing, "error")), rate
            )

        params: dict[str, str] | None = None
        problem = ""
        try:
            params = self._params(pairs, self.model.allowed[route.depth])
        except BadRequestError as exc:
            problem = str(exc)
        fault_key = dumps([segments, sorted(params.items()) if params is not None else raw_query])
        fault, attempt = self._faults.roll(fault_key)
        delay = 0.0
        if fault == "error" and attempt <= self.config.max_failures_per_path:
            errors = codes.errors
            status = errors[int(draw(self.config.seed, "status", fault_key) * len(errors))]
            return _Response(status, error_body(ERROR_NAMES.get(status, "error")), rate)
        if fault == "stall" and attempt == 1 and self.config.max_failures_per_path > 0:
            delay = self.config.stall_seconds

        if params is None:
            return _Response(codes.poison, error_body("bad_request", problem), rate, delay)
        origin = f"http://{headers['host']}" if headers.get("host") else self._url or ""
        try:
            page = self.model.answer(route, params, segments or [], origin + raw_path)
            status, body, rate = page.status, page.body, (*rate, *page.headers)
        except BadRequestError as exc:
            status, body = codes.poison, error_body("bad_request", str(exc))
        if (
            status == 200
            and fault == "truncate"
            and attempt == 1
            and self.config.max_failures_per_path > 0
        ):
            body = body[: max(1, len(body) // 2)]
        return _Response(status, body, rate, delay)

    def _rate_headers(
        self, limit: int, remaining: int, reset: float
    ) -> tuple[tuple[str, str], ...]:
        return rate_headers(limit, remaining, reset, self.config.profile.rate_limit, time.time())

    @functools.cached_property
    def _expected_credential(self) -> str:
        """What `_credential` reads from a request carrying the right token."""
        auth = self.config.profile.auth
        if auth.kind == AuthKind.NONE:
            return ""
        if auth.kind == AuthKind.BASIC and auth.username:
            return f"{auth.username}:{self.config.token}"
        return self.config.token

    def _split_query(self, raw_query: str) -> tuple[list[tuple[str, str]] | None, str | None]:
        """The query's (name, value) pairs without the auth parameter (None if the query is
        malformed), and the token that parameter carried (None unless given once)."""
        try:
            pairs = parse_qsl(raw_query, keep_blank_values=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            return None, None
        auth = self.config.profile.auth
        if auth.kind != AuthKind.QUERY:
            return pairs, None
        tokens = [value for name, value in pairs if name == auth.param]
        rest = [(name, value) for name, value in pairs if name != auth.param]
        return rest, tokens[0] if len(tokens) == 1 else None

    def _credential(self, headers: Mapping[str, str], query_token: str | None) -> str | None:
        """The credential a request carries in the profile's auth scheme, None if none."""
        auth = self.config.profile.auth
        if auth.kind == AuthKind.NONE:
            return ""
        if auth.kind == AuthKind.QUERY:
            return query_token
        if auth.kind == AuthKind.HEADER:
            value = headers.get(auth.header.lower())
            if value is None or not value.startswith(auth.prefix):
                return None
            return value[len(auth.prefix) :] or None
        scheme, _, token = (headers.get("authorization") or "").partition(" ")
        if auth.kind == AuthKind.BEARER:
            return token if scheme.lower() == "bearer" and token else None
        if scheme.lower() != "basic" or not token:
            return None
        try:
            return base64.b64decode(token, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None

    @staticmethod
    def _params(pairs: list[tuple[str, str]] | None, allowed: frozenset[str]) -> dict[str, str]:
        if pairs is None:
            raise BadRequestError("malformed query string")
        params: dict[str, str] = {}
        for name, value in pairs:
            if name not in allowed:
                raise BadRequestError(f"unknown parameter {name!r}")
            if name in params:
                raise BadRequestError(f"parameter {name!r} given twice")
            params[name] = value
        return params

    def _respond_sim(self, segments: list[str], raw_query: str) -> _Response:
        """The out-of-band endpoints: no auth, no rate limit, not counted in stats."""
        try:
            params = dict(parse_qsl(raw_query, keep_blank_values=True))
            if segments[1:] == ["stats"]:
                return _Response(200, dumps(self.stats.snapshot()).encode())
            if segments[1:] == ["gone"]:
                return _Response(200, dumps(sorted(list(path) for path in self.gone())).encode())
            if segments[1:] in (["truth"], ["expected-calls"]):
                start = EPOCH + timedelta(microseconds=parse_instant("from", params.get("from")))
                end = EPOCH + timedelta(microseconds=parse_instant("to", params.get("to")))
                if segments[1:] == ["expected-calls"]:
                    return _Response(
                        200, dumps({"calls": self.expected_calls(start, end)}).encode()
                    )
                keys = self.config.profile.keys
                truth = [
                    {**dict(zip(keys, path, strict=True)), "points": points}
                    for path, points in self.ground_truth(start, end).items()
                ]
                return _Response(200, dumps(truth).encode())
        except BadRequestError as exc:
            return _Response(400, error_body("bad_request", str(exc)))
        return _Response(404, error_body("not_found"))


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


def _time_collections(stats: SimulatorStats) -> None:
    """Record this process's long garbage collections in `stats`: every thread waits them
    out, and requests that arrive meanwhile are stamped together afterwards."""
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            started[0] = now
        elif now - started[0] >= PAUSE_KEPT_SECONDS:
            stats.paused(started[0], now - started[0])

    gc.callbacks.append(timed)


def child_main() -> None:
    """`python -m pipeline.dev.simulator`: read a SimulatorConfig as JSON on stdin (its profile
    by file, `SimulatorConfig.to_json`), print the URL, serve until stdin closes."""
    config = SimulatorConfig.from_json(sys.stdin.readline())
    simulator = Simulator(config)
    _time_collections(simulator.stats)
    print(simulator.start(), flush=True)
    try:
        sys.stdin.read()  # returns when the parent closes the pipe or goes away
    finally:
        simulator.stop()


class SimulatorProcess:
    """The simulator in a child process: its own interpreter, so it does not compete for the
    pipeline's GIL (in one process a 200 calls/s harvest is CPU-bound on 2 cores).

    The tree is deterministic, so `ground_truth` and friends are computed here from the config.

    `nice`: a niceness for the child (the benches pass a negative one). On a shared machine a
    busy scheduler leaves the simulator waiting for a core now and then, and the requests
    that arrived meanwhile are stamped together when it runs: its rate limit then counts
    arrivals the vendor, on a machine of its own, would not have seen bunched. Where the
    priority cannot be raised (no CAP_SYS_NICE), the child runs at the parent's; `.nice`
    says which it got.
    """

    def __init__(self, config: SimulatorConfig | None = None, *, nice: int = 0) -> None:
        self.config = config or SimulatorConfig()
        self.wanted_nice = nice
        self.nice: int | None = None  # what the child got, once started
        self._process: subprocess.Popen[str] | None = None
        self._url: str | None = None

    @functools.cached_property
    def _model(self) -> VendorModel:
        """The same tree, built here only when asked about (it is not served here)."""
        return VendorModel(self.config)

    @property
    def token(self) -> str:
        return self.config.token

    def start(self) -> str:
        # The config (token included) goes over stdin, never argv.
        line = self.config.to_json() + "\n"
        process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.dev.simulator"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        # Before the config goes over: the child starts its threads only once it has read
        # it, and threads take their niceness from the thread that makes them.
        if self.wanted_nice:
            try:
                os.setpriority(os.PRIO_PROCESS, process.pid, self.wanted_nice)
            except OSError:
                pass
        self.nice = os.getpriority(os.PRIO_PROCESS, process.pid)
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(line)
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
    ) -> dict[tuple[str, ...], list[dict[str, Any]]]:
        return self._model.ground_truth(start, end)

    def expected_calls(self, start: datetime, end: datetime) -> int:
        return self._model.expected_calls(start, end)

    def check(self, sink: Sink, run_id: str, window: Window) -> Comparison:
        truth = self.ground_truth(window.start, window.end)
        return compare(sink, run_id, truth, keys=self.config.profile.keys)

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
