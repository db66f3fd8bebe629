"""The vendor client against `responses` mocks that follow ../shared/vendor-api.md."""

from __future__ import annotations

import json
import math
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from requests.adapters import HTTPAdapter
from responses.registries import OrderedRegistry

from pipeline.errors import (
    AuthError,
    ConfigError,
    GoneError,
    PoisonError,
    RateLimitedError,
    RetryableError,
)
from pipeline.stats import CallStats
from pipeline.vendor_api.client import MAX_MISSED_SLOTS, VendorClient
from pipeline.vendor_api.transport import VendorAdapter, encode_segment

BASE = "https://vendor.test"
TOKEN = "s3cret-token"
WARRIORS = "/v1/troops/{id}/warriors"
ANY_URL = re.compile(r"https://vendor\.test/.*")
LAST_PAGE = {"items": [{"id": "w1", "troop_id": "t1", "name": "one"}], "next_cursor": None}


class FakeBudget:
    """Records what the client asks of the budget; acquire never waits."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.sent_after: list[float | None] = []  # as each call's `arrived` said

    def acquire(self, max_pause: float = math.inf) -> float:
        self.events.append(("acquire",))
        return 0.0

    def paused_for(self) -> float:
        return 0.0

    def arrived(self, stamp: float, at: float, sent_after: float | None = None) -> None:
        self.sent_after.append(sent_after)

    def send_by(self) -> float | None:
        return None

    def missed(self, stamp: float) -> None:
        self.events.append(("missed", stamp))

    def pause(self, seconds: float) -> None:
        self.events.append(("pause", seconds))

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        self.events.append(("observe", limit, remaining, reset))

    def count(self, name: str) -> int:
        return sum(1 for event in self.events if event[0] == name)


@pytest.fixture
def budget() -> FakeBudget:
    return FakeBudget()


@pytest.fixture
def stats() -> CallStats:
    return CallStats()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(budget: FakeBudget, stats: CallStats, sleeps: list[float]) -> Iterator[VendorClient]:
    with VendorClient(BASE, TOKEN, budget, stats, max_attempts=4, sleep=sleeps.append) as c:
        yield c


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    # Registered responses are served in order, each once: the sequence is the test.
    with responses.RequestsMock(registry=OrderedRegistry) as mock:
        yield mock


def url(troop_id: str = "t1") -> str:
    return f"{BASE}/v1/troops/{troop_id}/warriors"


def query(call_index: int, rsps: responses.RequestsMock) -> dict[str, list[str]]:
    sent = rsps.calls[call_index].request.url
    assert isinstance(sent, str)
    return parse_qs(urlsplit(sent).query)


# -- success, pagination, the wire ---------------------------------------------------------


def test_items_follows_cursor_across_pages_keeping_params(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    # GIVEN three pages chained by cursors
    pages = {
        None: {"items": [{"id": "a"}, {"id": "b"}], "next_cursor": "c/1+="},
        "c/1+=": {"items": [{"id": "c"}], "next_cursor": "c2"},
        "c2": {"items": [{"id": "d"}], "next_cursor": None},
    }

    def serve(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        q = parse_qs(urlsplit(request.url or "").query)
        cursor = q["cursor"][0] if "cursor" in q else None
        return 200, {}, json.dumps(pages[cursor])

    rsps.add_callback(responses.GET, url(), callback=serve)
    rsps.add_callback(responses.GET, url(), callback=serve)
    rsps.add_callback(responses.GET, url(), callback=serve)
    params = {"from": "2024-01-01T00:00:00Z", "to": "2024-01-02T00:00:00Z"}

    # WHEN
    got = list(client.items(WARRIORS, "t1", params))

    # THEN every item arrives once, in order, and each request kept the params
    assert [item["id"] for item in got] == ["a", "b", "c", "d"]
    assert len(rsps.calls) == 3
    for i, cursor in enumerate([None, "c/1+=", "c2"]):
        q = query(i, rsps)
        assert q["from"] == [params["from"]]
        assert q["to"] == [params["to"]]
        assert q["limit"] == ["100"]
        assert q.get("cursor") == ([cursor] if cursor else None)


def test_items_of_empty_listing_is_empty(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(f"{BASE}/v1/troops", json={"items": [], "next_cursor": None})

    assert list(client.items("/v1/troops")) == []


def test_request_carries_bearer_token_and_accept_json(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(url(), json=LAST_PAGE)

    list(client.items(WARRIORS, "t1"))

    headers = rsps.calls[0].request.headers
    assert headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Accept"] == "application/json"


@pytest.mark.parametrize(
    ("entity_id", "segment"),
    [
        ("a/b", "a%2Fb"),
        ("..", "%2E%2E"),
        (".", "%2E"),
        ("a/../b", "a%2F..%2Fb"),
        ("?x#y", "%3Fx%23y"),
        ("50%+1", "50%25%2B1"),
        ("with space", "with%20space"),
        ("ünï", "%C3%BCn%C3%AF"),
        ("%2F", "%252F"),
        ("a~b-c_d.e", "a~b-c_d.e"),
    ],
)
def test_nasty_id_reaches_the_wire_as_one_encoded_segment(
    client: VendorClient, rsps: responses.RequestsMock, entity_id: str, segment: str
) -> None:
    rsps.get(ANY_URL, json=LAST_PAGE)

    list(client.items(WARRIORS, entity_id))

    assert rsps.calls[0].request.url == f"{BASE}/v1/troops/{segment}/warriors?limit=100"
    assert encode_segment(entity_id) == segment


def test_empty_id_is_poison_without_a_call(
    client: VendorClient, rsps: responses.RequestsMock, budget: FakeBudget
) -> None:
    with pytest.raises(PoisonError):
        list(client.items(WARRIORS, ""))

    assert len(rsps.calls) == 0
    assert budget.count("acquire") == 0


def test_rate_limit_headers_reach_budget_observe(
    client: VendorClient, rsps: responses.RequestsMock, budget: FakeBudget
) -> None:
    headers = {
        "X-RateLimit-Limit": "100",
        "X-RateLimit-Remaining": "7",
        "X-RateLimit-Reset": "0.25",
    }
    rsps.get(url(), json=LAST_PAGE, headers=headers)

    list(client.items(WARRIORS, "t1"))

    # Reset is counted from when the vendor saw the request: the round trip is taken off.
    assert budget.events[:1] == [("acquire",)]
    name, limit, remaining, reset = budget.events[1]
    assert (name, limit, remaining) == ("observe", 100, 7)
    assert 0.15 < reset <= 0.25


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-RateLimit-Limit": "lots", "X-RateLimit-Remaining": "", "X-RateLimit-Reset": "nan"}],
)
def test_missing_or_garbage_rate_limit_headers_observe_none(
    client: VendorClient, rsps: responses.RequestsMock, budget: FakeBudget, headers: dict[str, str]
) -> None:
    rsps.get(url(), json=LAST_PAGE, headers=headers)

    list(client.items(WARRIORS, "t1"))

    assert ("observe", None, None, None) in budget.events


# -- errors that are not retried -----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, {"error": "bad_request", "message": "bad cursor"}, PoisonError),
        (401, {"error": "unauthorized"}, AuthError),
        (404, {"error": "not_found"}, GoneError),
        (403, {"error": "forbidden"}, PoisonError),
        (422, {}, PoisonError),
    ],
)
def test_client_error_raises_at_once_without_retry(
    client: VendorClient,
    rsps: responses.RequestsMock,
    budget: FakeBudget,
    stats: CallStats,
    sleeps: list[float],
    status: int,
    body: dict[str, str],
    error: type[Exception],
) -> None:
    rsps.get(url("a%2Fb"), json=body, status=status)

    with pytest.raises(error) as raised:
        list(client.items(WARRIORS, "a/b"))

    assert str(raised.value).startswith("GET /v1/troops/a%2Fb/warriors: ")
    assert str(status) in str(raised.value)
    assert len(rsps.calls) == 1
    assert budget.count("acquire") == 1
    assert sleeps == []
    assert (stats.calls, stats.retries, stats.failures) == (1, 0, 1)


def test_poison_message_names_path_and_vendor_message(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(url(), json={"error": "bad_request", "message": "from is required"}, status=400)

    with pytest.raises(PoisonError, match=r"GET /v1/troops/t1/warriors: 400 .*from is required"):
        list(client.items(WARRIORS, "t1"))


def test_unexpected_status_raises_retryable_at_once(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    # A redirect is not followed (it would carry the token elsewhere) and is not in the table.
    rsps.get(url(), status=302, headers={"Location": "https://elsewhere.test/"})

    with pytest.raises(RetryableError, match="302"):
        list(client.items(WARRIORS, "t1"))

    assert len(rsps.calls) == 1


# -- 429 -----------------------------------------------------------------------------------


def test_429_pauses_budget_for_retry_after_then_succeeds(
    client: VendorClient,
    rsps: responses.RequestsMock,
    budget: FakeBudget,
    stats: CallStats,
    sleeps: list[float],
) -> None:
    # GIVEN a 429 with Retry-After: 2, then the page
    limited = rsps.get(
        url(), status=429, json={"error": "rate_limited"}, headers={"Retry-After": "2"}
    )
    ok = rsps.get(url(), json=LAST_PAGE)

    # WHEN
    got = list(client.items(WARRIORS, "t1"))

    # THEN the budget was paused before the second attempt took its slot
    assert got == LAST_PAGE["items"]
    assert (limited.call_count, ok.call_count) == (1, 1)
    assert [e[0] for e in budget.events] == ["acquire", "observe", "pause", "acquire", "observe"]
    assert ("pause", 2.0) in budget.events
    # and no backoff of our own on top of the budget's pause
    assert all(s == 0 for s in sleeps)
    assert (stats.calls, stats.retries, stats.rate_limited, stats.failures) == (2, 1, 1, 1)


@pytest.mark.parametrize("retry_after", [None, "soon"])
def test_429_without_usable_retry_after_pauses_one_second(
    client: VendorClient, rsps: responses.RequestsMock, budget: FakeBudget, retry_after: str | None
) -> None:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    rsps.get(url(), status=429, json={"error": "rate_limited"}, headers=headers)
    rsps.get(url(), json=LAST_PAGE)

    list(client.items(WARRIORS, "t1"))

    assert ("pause", 1.0) in budget.events


def test_429_exhausted_raises_rate_limited_error(
    client: VendorClient, rsps: responses.RequestsMock, stats: CallStats
) -> None:
    for _ in range(4):
        rsps.get(url(), status=429, json={"error": "rate_limited"}, headers={"Retry-After": "3"})

    with pytest.raises(RateLimitedError, match=r"GET /v1/troops/t1/warriors: 429.*4 attempts") as e:
        list(client.items(WARRIORS, "t1"))

    assert e.value.retry_after == 3.0
    assert len(rsps.calls) == 4
    assert (stats.calls, stats.retries, stats.rate_limited) == (4, 3, 4)


# -- 5xx -----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_then_success_retries_after_backoff(
    client: VendorClient,
    rsps: responses.RequestsMock,
    budget: FakeBudget,
    sleeps: list[float],
    status: int,
) -> None:
    failing = rsps.get(url(), status=status, json={"error": "unavailable"})
    ok = rsps.get(url(), json=LAST_PAGE)

    got = list(client.items(WARRIORS, "t1"))

    assert got == LAST_PAGE["items"]
    assert (failing.call_count, ok.call_count) == (1, 1)
    assert budget.count("acquire") == 2
    assert len(sleeps) == 1
    assert 0 <= sleeps[0] <= 0.5  # full jitter under backoff_base * 2**0


def test_5xx_exhausted_raises_retryable_after_max_attempts(
    client: VendorClient,
    rsps: responses.RequestsMock,
    budget: FakeBudget,
    stats: CallStats,
    sleeps: list[float],
) -> None:
    for _ in range(4):
        rsps.get(f"{BASE}/v1/warriors/w%2F1/data-groups", status=503)

    with pytest.raises(RetryableError) as raised:
        list(client.items("/v1/warriors/{id}/data-groups", "w/1"))

    assert str(raised.value) == "GET /v1/warriors/w%2F1/data-groups: 503 after 4 attempts"
    assert not isinstance(raised.value, RateLimitedError)
    assert TOKEN not in str(raised.value)
    assert len(rsps.calls) == 4
    assert budget.count("acquire") == 4
    # a backoff between attempts, none after the last; each within its exponential bound
    assert len(sleeps) == 3
    assert all(0 <= s <= bound for s, bound in zip(sleeps, [0.5, 1.0, 2.0], strict=True))
    assert (stats.calls, stats.retries, stats.failures) == (4, 3, 4)


def test_503_retry_after_is_a_minimum_wait(
    client: VendorClient, rsps: responses.RequestsMock, sleeps: list[float]
) -> None:
    rsps.get(url(), status=503, headers={"Retry-After": "7"})
    rsps.get(url(), json=LAST_PAGE)

    list(client.items(WARRIORS, "t1"))

    assert len(sleeps) == 1
    assert sleeps[0] >= 7.0


# -- stalls and broken bodies --------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        requests.exceptions.ReadTimeout("read timed out"),
        requests.exceptions.ConnectTimeout("connect timed out"),
        requests.exceptions.ConnectionError("connection reset"),
        requests.exceptions.ChunkedEncodingError("IncompleteRead(34 bytes read, 20 more expected)"),
    ],
)
def test_transport_failure_then_success_retries(
    client: VendorClient,
    rsps: responses.RequestsMock,
    budget: FakeBudget,
    stats: CallStats,
    sleeps: list[float],
    failure: Exception,
) -> None:
    broken = rsps.get(url(), body=failure)
    ok = rsps.get(url(), json=LAST_PAGE)

    got = list(client.items(WARRIORS, "t1"))

    assert got == LAST_PAGE["items"]
    assert (broken.call_count, ok.call_count) == (1, 1)
    assert budget.count("acquire") == 2
    assert len(sleeps) == 1
    assert (stats.calls, stats.retries, stats.failures) == (2, 1, 1)


def test_read_timeout_exhausted_names_the_stall(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    for _ in range(4):
        rsps.get(url(), body=requests.exceptions.ReadTimeout("read timed out"))

    with pytest.raises(RetryableError, match=r"GET /v1/troops/t1/warriors: read timeout after 4"):
        list(client.items(WARRIORS, "t1"))


@pytest.mark.parametrize(
    "body",
    [
        '{"items": [{"id": "w1"}, {"id": "w',  # cut short
        "<html>Bad gateway</html>",
        "[]",  # JSON, but not an object
        "null",
        '"ok"',
        '{"items": {"id": "w1"}, "next_cursor": null}',
        '{"items": [], "next_cursor": 7}',
    ],
)
def test_200_that_is_not_a_page_then_success_retries(
    client: VendorClient, rsps: responses.RequestsMock, stats: CallStats, body: str
) -> None:
    bad = rsps.get(url(), body=body, status=200, content_type="application/json")
    ok = rsps.get(url(), json=LAST_PAGE)

    got = list(client.items(WARRIORS, "t1"))

    assert got == LAST_PAGE["items"]
    assert (bad.call_count, ok.call_count) == (1, 1)
    assert (stats.calls, stats.retries, stats.failures) == (2, 1, 1)


# -- the token stays secret ----------------------------------------------------------------


def test_token_is_in_no_repr_or_error(client: VendorClient, rsps: responses.RequestsMock) -> None:
    rsps.get(url(), status=401, json={"error": "unauthorized"})

    with pytest.raises(AuthError) as raised:
        list(client.items(WARRIORS, "t1"))

    assert TOKEN not in repr(client)
    assert TOKEN not in str(vars(client))
    assert TOKEN not in str(raised.value)
    assert TOKEN not in repr(raised.value)


# -- pages and the transport adapter -------------------------------------------------------


def test_pages_yields_each_page_of_items_in_order(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(url(), json={"items": [{"id": "a"}, {"id": "b"}], "next_cursor": "c2"})
    rsps.get(url(), json={"items": [{"id": "c"}], "next_cursor": None})

    got = [[item["id"] for item in items] for items in client.pages(WARRIORS, "t1")]

    assert got == [["a", "b"], ["c"]]


def _prepared(target: str) -> requests.PreparedRequest:
    request = requests.PreparedRequest()
    request.prepare(method="GET", url=target)
    return request


def test_adapter_sends_the_target_after_the_origin_keeping_a_base_path() -> None:
    # GIVEN a vendor whose base URL has a path of its own
    adapter = VendorAdapter("https://vendor.test/api/", max_retries=0)
    request = _prepared("https://vendor.test/api/v1/troops/a%2Fb/warriors?limit=100")

    # THEN the request line carries the base path and the encoded id as they were built,
    # the same as HTTPAdapter's own answer
    assert adapter.request_url(request, {}) == "/api/v1/troops/a%2Fb/warriors?limit=100"
    assert adapter.request_url(request, {}) == HTTPAdapter().request_url(request, {})


def test_adapter_reuses_the_vendor_pool_and_leaves_other_urls_to_httpadapter() -> None:
    adapter = VendorAdapter("https://vendor.test", max_retries=0)
    first = adapter.get_connection_with_tls_context(_prepared(f"{BASE}/v1/troops"), True)

    # WHEN later calls ask for the vendor, another host, other TLS settings, or a proxy
    again = adapter.get_connection_with_tls_context(_prepared(f"{BASE}/v1/x?y=1"), True)
    other_host = adapter.get_connection_with_tls_context(_prepared("https://else.test/v1"), True)
    no_verify = adapter.get_connection_with_tls_context(_prepared(f"{BASE}/v1/troops"), False)
    plain = VendorAdapter("http://vendor.test", max_retries=0)
    proxied = plain.request_url(_prepared("http://vendor.test/v1/t"), {"http": "http://proxy:3128"})

    # THEN the vendor's pool is found once and reused; the rest is HTTPAdapter's answer
    assert again is first
    assert other_host is not first and other_host.host == "else.test"
    assert no_verify is not first
    assert proxied == "http://vendor.test/v1/t"  # a plain-HTTP proxy is sent the whole URL


def test_token_loses_a_trailing_newline_on_the_wire(
    budget: FakeBudget, stats: CallStats, rsps: responses.RequestsMock
) -> None:
    rsps.get(url(), json=LAST_PAGE)

    with VendorClient(BASE, f"  {TOKEN}\n", budget, stats) as client:
        list(client.items(WARRIORS, "t1"))

    assert rsps.calls[0].request.headers["Authorization"] == f"Bearer {TOKEN}"


@pytest.mark.parametrize("token", ["", " \n", "abc\r\nX-Injected: 1", "ab\x00c"])
def test_empty_or_control_character_token_is_refused_without_quoting_it(
    budget: FakeBudget, stats: CallStats, token: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        VendorClient(BASE, token, budget, stats)

    assert "control characters" in str(raised.value)
    assert token.strip() == "" or token.strip() not in str(raised.value)


# -- connections opened before the slot (VendorAdapter.connect_ahead) ----------------------
# The request then reaches the vendor about when the budget counted it, not a TCP (or TLS)
# handshake later.

CONNECT_AHEAD_PAGE = {"items": [{"id": "w1", "troop_id": "t1", "name": "one"}], "next_cursor": None}


class _PageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection serves every call

    def do_GET(self) -> None:
        if isinstance(self.server, CountingServer):
            self.server.requests += 1
        body = json.dumps(CONNECT_AHEAD_PAGE).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class CountingServer(ThreadingHTTPServer):
    """Counts the TCP connections it has accepted, and the requests it answered."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _PageHandler)
        self.connections = 0
        self.requests = 0  # GETs read and answered

    def get_request(self) -> tuple[socket.socket, Any]:
        request = super().get_request()
        self.connections += 1
        return request


class RecordingBudget(FakeBudget):
    """Notes, at each acquire, how many connections the vendor has by then: it waits up to
    a second for the server to accept one the kernel has already completed (the server's
    accept loop runs on its own), and none can be in progress unless the client opened it
    before asking for its slot."""

    def __init__(self, server: CountingServer | None) -> None:
        super().__init__()
        self.server = server
        self.seen: list[int] = []

    def acquire(self, max_pause: float = math.inf) -> float:
        deadline = time.monotonic() + 1.0
        while self.server and not self.server.connections and time.monotonic() < deadline:
            time.sleep(0.005)
        self.seen.append(self.server.connections if self.server else 0)
        return super().acquire(max_pause)


@pytest.fixture
def server() -> Iterator[CountingServer]:
    server = CountingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_the_connection_is_open_before_the_call_waits_for_its_slot(
    server: CountingServer,
) -> None:
    budget = RecordingBudget(server)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with VendorClient(base, "token", budget, CallStats()) as client:
        # WHEN a new client makes three calls
        for _ in range(3):
            assert list(client.items(WARRIORS, "t1")) == CONNECT_AHEAD_PAGE["items"]

    # THEN the first call's connection was accepted before its slot was asked for, and the
    # later calls kept it (no handshake before or after their slots)
    assert budget.seen == [1, 1, 1]
    assert server.connections == 1


class _SlowPageHandler(_PageHandler):
    def do_GET(self) -> None:
        time.sleep(SLOW_ANSWER)
        super().do_GET()


SLOW_ANSWER = 0.2


def test_the_budget_hears_when_the_request_left_not_when_the_answer_came() -> None:
    # GIVEN a vendor that takes 200 ms to answer
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowPageHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    budget = FakeBudget()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with VendorClient(base, "token", budget, CallStats()) as client:
            # WHEN a client calls it twice
            for _ in range(2):
                list(client.items(WARRIORS, "t1"))
    finally:
        server.shutdown()
        server.server_close()

    # THEN each call told the budget how long after its slot the request was written: soon,
    # not the 200 ms the answer took (which a late send could not be told apart from)
    assert len(budget.sent_after) == 2
    assert all(s is not None and 0 <= s < SLOW_ANSWER / 2 for s in budget.sent_after)


def test_the_budget_hears_nothing_of_the_send_when_no_connection_sent_it(
    client: VendorClient, budget: FakeBudget, rsps: responses.RequestsMock
) -> None:
    # GIVEN a mocked vendor (no connection is made)
    rsps.add(responses.GET, url(), json={"items": [], "next_cursor": None})

    # WHEN a call is made, THEN the budget is told the call arrived, with no send time
    assert list(client.items(WARRIORS, "t1")) == []
    assert budget.sent_after == [None]


def test_a_connection_refused_spends_no_slot_and_is_retried_as_a_transport_failure() -> None:
    # GIVEN a port nobody listens on
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    budget = RecordingBudget(None)
    stats = CallStats()
    base = f"http://127.0.0.1:{port}"
    with VendorClient(base, "token", budget, stats, max_attempts=2, sleep=lambda _: None) as client:
        # WHEN a call is made, THEN it fails as a transport failure after its attempts...
        with pytest.raises(RetryableError, match="after 2 attempts"):
            list(client.items(WARRIORS, "t1"))

    # ...and no attempt took a budget slot: nothing reached the vendor
    assert budget.seen == []
    assert stats.retries == 1


class LateOnceBudget(FakeBudget):
    """Hands out slots counted 1, 2, ...; the first one's last moment has passed by the
    time its request would be written (a thread held after its slot), the others' not."""

    def __init__(self) -> None:
        super().__init__()
        self.handed = 0

    def acquire(self, max_pause: float = math.inf) -> float:
        super().acquire(max_pause)
        self.handed += 1
        return float(self.handed)

    def send_by(self) -> float | None:
        return time.perf_counter() + (-1.0 if self.handed == 1 else 60.0)


def test_a_call_found_late_before_its_request_is_written_sends_nothing_and_takes_another_slot(
    server: CountingServer,
) -> None:
    # GIVEN a budget whose first slot is already past its last moment when the request
    # would be written
    budget = LateOnceBudget()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    served_before = server.connections
    with VendorClient(base, "token", budget, CallStats()) as client:
        # WHEN a call is made
        items = list(client.items(WARRIORS, "t1"))

    # THEN the first slot was given up unsent and the call made on a second one: the
    # vendor answered once, on a connection opened again before the second slot
    assert items == CONNECT_AHEAD_PAGE["items"]
    assert budget.count("acquire") == 2
    assert [e for e in budget.events if e[0] == "missed"] == [("missed", 1.0)]
    assert len(budget.sent_after) == 1
    assert server.requests == 1
    assert server.connections - served_before == 2


class AlwaysLateBudget(LateOnceBudget):
    """Every slot's last moment has passed by the time its request would be written."""

    def send_by(self) -> float | None:
        return time.perf_counter() - 1.0


def test_a_call_late_at_every_slot_is_sent_after_giving_up_max_missed_slots(
    server: CountingServer,
) -> None:
    # GIVEN a budget whose every slot is past its last moment at the write (a sandbox held
    # at every call)
    budget = AlwaysLateBudget()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with VendorClient(base, "token", budget, CallStats()) as client:
        # WHEN a call is made
        items = list(client.items(WARRIORS, "t1"))

    # THEN it gave up MAX_MISSED_SLOTS slots unsent, then went at the next one anyway
    assert items == CONNECT_AHEAD_PAGE["items"]
    assert budget.count("missed") == MAX_MISSED_SLOTS
    assert budget.count("acquire") == MAX_MISSED_SLOTS + 1
    assert server.requests == 1
