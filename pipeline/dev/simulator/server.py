"""A local HTTP server playing the vendor API (contract v1) for tests, `harvest local`, benches.

The server answers what the model (`model.py`) holds, after the faults and the rate limit
(`faults.py`) have had their say.

Out-of-band endpoints, without auth and outside the rate limit:
``GET /_sim/truth?from=&to=`` (the ground truth), ``GET /_sim/stats``, ``GET /_sim/gone`` and
``GET /_sim/expected-calls?from=&to=``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import socket
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import parse_qsl, unquote

from pipeline.dev.simulator.faults import (
    ERROR_NAMES,
    ERROR_STATUSES,
    Faults,
    SlidingLog,
    rate_headers,
)
from pipeline.dev.simulator.model import (
    EPOCH,
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

if TYPE_CHECKING:
    from pipeline.sinks import Sink
    from pipeline.window import Window

_LIST_PARAMS = frozenset({"limit", "cursor"})
_DATA_PARAMS = frozenset({"limit", "cursor", "from", "to"})


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
        self.model = VendorModel(self.config)
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
        """From now on every request whose path names this entity answers 503."""
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
    ) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
        """Every data group a correct harvest of [start, end) yields, with its points by ts."""
        return self.model.ground_truth(start, end)

    def check(self, sink: Sink, run_id: str, window: Window) -> Comparison:
        """A run's output in `sink` against the ground truth of `window`."""
        return compare(sink, run_id, self.ground_truth(window.start, window.end))

    def gone(self) -> set[tuple[str, ...]]:
        """What a harvest finds gone (see VendorModel.gone)."""
        return self.model.gone()

    def expected_calls(self, start: datetime, end: datetime) -> int:
        """Calls (200 or 404) a perfect harvest of [start, end) makes with limit=page_size."""
        return self.model.expected_calls(start, end)

    # -- serving -----------------------------------------------------------------------------

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
            headers = rate_headers(*self._limiter.peek(token or ""))
            return _Response(401, error_body("unauthorized"), headers)
        accepted, limit, remaining, reset = self._limiter.acquire(token)
        headers = rate_headers(limit, remaining, reset)
        if not accepted:
            retry_after = ("Retry-After", str(max(1, math.ceil(reset))))
            return _Response(429, error_body("rate_limited"), (*headers, retry_after))

        route = self._route(segments)
        if route is None:
            return _Response(404, error_body("not_found"), headers)
        kind, entity_id = route
        if entity_id is not None and entity_id in self._faults.failing:
            return _Response(503, error_body(ERROR_NAMES[503]), headers)

        params: dict[str, str] | None = None
        problem = ""
        try:
            params = self._params(raw_query, _DATA_PARAMS if kind == "data" else _LIST_PARAMS)
        except BadRequestError as exc:
            problem = str(exc)
        fault_key = dumps([segments, sorted(params.items()) if params is not None else raw_query])
        fault, attempt = self._faults.roll(fault_key)
        delay = 0.0
        if fault == "error" and attempt <= self.config.max_failures_per_path:
            status = ERROR_STATUSES[int(draw(self.config.seed, "status", fault_key) * 4)]
            return _Response(status, error_body(ERROR_NAMES[status]), headers)
        if fault == "stall" and attempt == 1 and self.config.max_failures_per_path > 0:
            delay = self.config.stall_seconds

        if params is None:
            return _Response(400, error_body("bad_request", problem), headers, delay)
        try:
            status, body = self.model.answer(kind, entity_id, params, segments or [])
        except BadRequestError as exc:
            status, body = 400, error_body("bad_request", str(exc))
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
            raise BadRequestError("malformed query string") from exc
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
                truth = [
                    {"troop_id": t, "warrior_id": w, "data_group_id": d, "points": points}
                    for (t, w, d), points in self.ground_truth(start, end).items()
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


def child_main() -> None:
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
    def _model(self) -> VendorModel:
        """The same tree, built here only when asked about (it is not served here)."""
        return VendorModel(self.config)

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
        return compare(sink, run_id, self.ground_truth(window.start, window.end))

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
