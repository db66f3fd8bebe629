"""The vendor client's bounds inside one message: no listing, wait or body without an end.

A vendor quirk must end the message (poison, or retryable with the vendor's own wait),
never keep a thread calling, sleeping or reading for as long as the vendor likes. The
budget is a real PacedBudget on a fake clock: every wait advances the clock, so "it did
not wait" is "the clock did not move".
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from fake_clock import FakeClock
from responses.registries import OrderedRegistry

from pipeline.errors import ConfigError, PoisonError, RateLimitedError, RetryableError
from pipeline.local.budget import PacedBudget
from pipeline.stats import CallStats
from pipeline.vendor_api import client as vendor
from pipeline.vendor_api.client import VendorClient
from pipeline.vendor_api.transport import encode_segment

BASE = "https://vendor.test"
TOKEN = "s3cret-token"
WARRIORS = "/v1/troops/{id}/warriors"
URL = f"{BASE}/v1/troops/t1/warriors"
LAST_PAGE = {"items": [{"id": "w1", "troop_id": "t1", "name": "one"}], "next_cursor": None}
MiB = 1024 * 1024


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_000.0)


@pytest.fixture
def budget(clock: FakeClock) -> PacedBudget:
    return PacedBudget(1_000, 1.0, clock=clock, sleep=clock.sleep)


@pytest.fixture
def stats() -> CallStats:
    return CallStats()


def make_client(
    budget: PacedBudget, stats: CallStats, clock: FakeClock, **options: Any
) -> VendorClient:
    return VendorClient(BASE, TOKEN, budget, stats, max_attempts=4, sleep=clock.sleep, **options)


@pytest.fixture
def client(budget: PacedBudget, stats: CallStats, clock: FakeClock) -> Iterator[VendorClient]:
    # The defaults: these tests are about what happens without any tuning.
    with make_client(budget, stats, clock) as c:
        yield c


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    # Served in order, each once. Responses registered after the point where the client
    # must stop are meant to stay unused: their call_count proves it stopped.
    with responses.RequestsMock(
        registry=OrderedRegistry, assert_all_requests_are_fired=False
    ) as mock:
        yield mock


def page(ids: list[str], next_cursor: str | None) -> dict[str, Any]:
    return {"items": [{"id": i} for i in ids], "next_cursor": next_cursor}


def sent_cursor(call: Any) -> str | None:
    q = parse_qs(urlsplit(call.request.url).query)
    return q["cursor"][0] if "cursor" in q else None


class CountingBody(io.RawIOBase):
    """A body of `size` bytes made as it is read; `read_bytes` says how much was read."""

    def __init__(self, size: int, fill: bytes = b" ") -> None:
        self.size = size
        self.fill = fill
        self.read_bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.read_bytes)
        buffer[:n] = self.fill * n
        self.read_bytes += n
        return n


def streamed(body: CountingBody) -> io.BufferedReader:
    return io.BufferedReader(body)


# -- 1a. a cursor that repeats -------------------------------------------------------------


def test_cursor_returned_twice_in_one_listing_is_poison_without_another_call(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    # GIVEN a vendor that sends the listing round in a circle: c1 → c2 → c1 → ...
    first = rsps.get(URL, json=page(["a"], "c1"))
    second = rsps.get(URL, json=page(["b"], "c2"))
    third = rsps.get(URL, json=page(["a"], "c1"))
    more = [rsps.get(URL, json=page(["b"], "c2")) for _ in range(5)]

    # WHEN the listing is read
    with pytest.raises(PoisonError) as raised:
        list(client.items(WARRIORS, "t1"))

    # THEN it stops where the cursor came back, naming it
    assert "'c1'" in str(raised.value)
    assert "twice" in str(raised.value)
    assert str(raised.value).startswith("GET /v1/troops/t1/warriors: ")
    assert (first.call_count, second.call_count, third.call_count) == (1, 1, 1)
    assert all(m.call_count == 0 for m in more)
    assert [sent_cursor(c) for c in rsps.calls] == [None, "c1", "c2"]


def test_cursor_pointing_at_its_own_page_is_poison_after_two_calls(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    # The field case: the same next_cursor on every page, 301 calls in 3 s.
    for _ in range(10):
        rsps.get(URL, json=page(["a"], "stuck"))

    with pytest.raises(PoisonError, match="'stuck'"):
        list(client.items(WARRIORS, "t1"))

    assert len(rsps.calls) == 2


def test_same_cursor_in_two_listings_is_fine(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    # Cursors are per listing: two listings may well use the same opaque string.
    for _ in range(2):
        rsps.get(URL, json=page(["a"], "c1"))
        rsps.get(URL, json=page(["b"], None))

    assert len(list(client.items(WARRIORS, "t1"))) == 2
    assert len(list(client.items(WARRIORS, "t1"))) == 2


# -- 1b. a page budget per listing ---------------------------------------------------------


def endless(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
    """A listing that never ends: every page points at a new one."""
    q = parse_qs(urlsplit(request.url or "").query)
    n = int(q["cursor"][0]) if "cursor" in q else 0
    if n > 2_000:
        raise AssertionError("the client is still following the listing")
    return 200, {}, json.dumps(page([f"i{n}"], str(n + 1)))


def test_listing_longer_than_max_pages_is_poison_naming_the_limit(
    budget: PacedBudget, stats: CallStats, clock: FakeClock
) -> None:
    with responses.RequestsMock() as rsps, make_client(budget, stats, clock, max_pages=5) as c:
        rsps.add_callback(responses.GET, URL, callback=endless)

        with pytest.raises(PoisonError, match=r"more than 5 pages") as raised:
            list(c.items(WARRIORS, "t1"))

        # the limit's pages were read, and no call was spent on the one over it
        assert len(rsps.calls) == 5
    assert "max_pages" in str(raised.value)


def test_listing_of_exactly_max_pages_is_read_whole(
    budget: PacedBudget, stats: CallStats, clock: FakeClock, rsps: responses.RequestsMock
) -> None:
    rsps.get(URL, json=page(["a"], "c1"))
    rsps.get(URL, json=page(["b"], "c2"))
    rsps.get(URL, json=page(["c"], None))

    with make_client(budget, stats, clock, max_pages=3) as c:
        got = [item["id"] for item in c.items(WARRIORS, "t1")]

    assert got == ["a", "b", "c"]


def test_listing_stops_at_a_thousand_pages_by_default(client: VendorClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.GET, URL, callback=endless)

        with pytest.raises(PoisonError, match=r"more than 1000 pages"):
            for _ in client.pages(WARRIORS, "t1"):
                pass

        assert len(rsps.calls) == 1_000


@pytest.mark.parametrize("option", ["max_pages", "max_retry_after", "max_page_bytes"])
@pytest.mark.parametrize("value", [0, -1])
def test_bounds_must_be_positive(
    budget: PacedBudget, stats: CallStats, option: str, value: int
) -> None:
    with pytest.raises(ValueError, match=option):
        VendorClient(BASE, TOKEN, budget, stats, **{option: value})


# -- 1c. Retry-After beyond max_retry_after ------------------------------------------------


def test_503_with_retry_after_over_the_cap_is_retryable_at_once_with_the_vendors_wait(
    client: VendorClient, rsps: responses.RequestsMock, clock: FakeClock, stats: CallStats
) -> None:
    # GIVEN a 503 whose Retry-After is a day (it slept 86,400 s in the field)
    unavailable = rsps.get(URL, status=503, headers={"Retry-After": "86400"})
    ok = rsps.get(URL, json=LAST_PAGE)

    # WHEN
    with pytest.raises(RetryableError) as raised:
        list(client.items(WARRIORS, "t1"))

    # THEN the message goes back with the vendor's wait, and nothing waited here
    assert not isinstance(raised.value, RateLimitedError)
    assert raised.value.retry_after == 86_400.0
    assert "Retry-After 86400" in str(raised.value)
    assert (unavailable.call_count, ok.call_count) == (1, 0)
    assert clock() - 1_000.0 < 1.0
    assert (stats.calls, stats.retries) == (1, 0)


def test_503_with_retry_after_up_to_the_cap_is_honoured_inside_the_call(
    client: VendorClient, rsps: responses.RequestsMock, clock: FakeClock
) -> None:
    rsps.get(URL, status=503, headers={"Retry-After": "60"})
    rsps.get(URL, json=LAST_PAGE)

    got = list(client.items(WARRIORS, "t1"))

    assert got == LAST_PAGE["items"]
    assert clock() - 1_000.0 >= 60.0


def test_429_with_retry_after_over_the_cap_pauses_the_budget_and_raises_at_once(
    client: VendorClient,
    rsps: responses.RequestsMock,
    budget: PacedBudget,
    clock: FakeClock,
    stats: CallStats,
) -> None:
    # GIVEN a 429 asking for an hour
    limited = rsps.get(
        URL, status=429, json={"error": "rate_limited"}, headers={"Retry-After": "3600"}
    )
    ok = rsps.get(URL, json=LAST_PAGE)

    # WHEN
    with pytest.raises(RateLimitedError) as raised:
        list(client.items(WARRIORS, "t1"))

    # THEN the message goes back for the hour, no thread waits it out here, and the whole
    # budget (every thread, every invocation sharing it) holds back for the full hour
    assert raised.value.retry_after == 3_600.0
    assert (limited.call_count, ok.call_count) == (1, 0)
    assert clock() - 1_000.0 < 1.0
    assert budget.paused_for() == pytest.approx(3_600.0, abs=1.0)
    assert client.paused_for() == budget.paused_for()
    assert (stats.calls, stats.rate_limited, stats.retries) == (1, 1, 0)


def test_429_with_retry_after_up_to_the_cap_is_waited_out_in_the_budget(
    client: VendorClient, rsps: responses.RequestsMock, clock: FakeClock
) -> None:
    rsps.get(URL, status=429, json={"error": "rate_limited"}, headers={"Retry-After": "30"})
    rsps.get(URL, json=LAST_PAGE)

    got = list(client.items(WARRIORS, "t1"))

    assert got == LAST_PAGE["items"]
    assert clock() - 1_000.0 >= 30.0


def test_budget_paused_beyond_the_cap_raises_before_calling_or_sleeping(
    client: VendorClient, rsps: responses.RequestsMock, budget: PacedBudget, clock: FakeClock
) -> None:
    # GIVEN another thread's 429 paused the shared budget for ten minutes
    budget.pause(600.0)
    clock.advance(100.0)
    ok = rsps.get(URL, json=LAST_PAGE)

    # WHEN this thread starts a call
    with pytest.raises(RateLimitedError) as raised:
        list(client.items(WARRIORS, "t1"))

    # THEN it gives the message back for what is left of the pause, calling nobody
    assert raised.value.retry_after == pytest.approx(500.0)
    assert str(raised.value).startswith("GET /v1/troops/t1/warriors: ")
    assert ok.call_count == 0
    assert clock.sleeps == []


def test_budget_paused_within_the_cap_is_waited_out(
    client: VendorClient, rsps: responses.RequestsMock, budget: PacedBudget, clock: FakeClock
) -> None:
    budget.pause(45.0)
    rsps.get(URL, json=LAST_PAGE)

    assert list(client.items(WARRIORS, "t1")) == LAST_PAGE["items"]
    assert clock() - 1_000.0 >= 45.0


def test_max_retry_after_is_configurable(
    budget: PacedBudget, stats: CallStats, clock: FakeClock, rsps: responses.RequestsMock
) -> None:
    rsps.get(URL, status=503, headers={"Retry-After": "10"})

    with make_client(budget, stats, clock, max_retry_after=5) as c:
        assert c.max_retry_after == 5
        with pytest.raises(RetryableError) as raised:
            list(c.items(WARRIORS, "t1"))

    assert raised.value.retry_after == 10.0
    assert len(rsps.calls) == 1


def test_long_pause_is_logged_once_per_pause(
    client: VendorClient,
    rsps: responses.RequestsMock,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(vendor.logger, "warning", lambda msg, *a, **kw: warnings.append(msg))
    limited = {"status": 429, "json": {"error": "rate_limited"}}

    # GIVEN a 429 asking for an hour, then calls while that pause lasts (they meet it in
    # the budget), then, once it is over, a 429 asking for two hours
    rsps.get(URL, headers={"Retry-After": "3600"}, **limited)
    for _ in range(3):
        with pytest.raises(RateLimitedError):
            list(client.items(WARRIORS, "t1"))
        clock.advance(60.0)
    clock.advance(3_600.0)
    rsps.get(URL, headers={"Retry-After": "7200"}, **limited)
    with pytest.raises(RateLimitedError):
        list(client.items(WARRIORS, "t1"))

    # THEN one warning per pause, saying how long and until when
    assert len(rsps.calls) == 2
    assert len(warnings) == 2
    assert warnings[0].startswith("vendor asked to wait 3600 s; pausing every call until ")
    assert warnings[1].startswith("vendor asked to wait 7200 s; ")


def test_paused_for_is_zero_without_a_pause(client: VendorClient) -> None:
    assert client.paused_for() == 0.0


# -- 2. silent truncation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "missing"),
    [
        ({"items": [{"id": "w1"}]}, "next_cursor"),
        ({"items": []}, "next_cursor"),
        ({"next_cursor": None}, "items"),
        ({"next_cursor": "c2"}, "items"),
        ({}, "items"),
        ({"data": [{"id": "w1"}], "cursor": None}, "items"),
    ],
)
def test_page_without_items_or_next_cursor_is_poison_not_the_last_page(
    client: VendorClient,
    rsps: responses.RequestsMock,
    stats: CallStats,
    body: dict[str, Any],
    missing: str,
) -> None:
    bad = rsps.get(URL, json=body)
    ok = rsps.get(URL, json=LAST_PAGE)

    with pytest.raises(PoisonError, match=f"page without {missing}"):
        list(client.items(WARRIORS, "t1"))

    assert (bad.call_count, ok.call_count) == (1, 0)
    assert (stats.calls, stats.failures) == (1, 1)


def test_missing_next_cursor_after_the_first_page_is_poison(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(URL, json=page(["a"], "c1"))
    rsps.get(URL, json={"items": [{"id": "b"}]})

    with pytest.raises(PoisonError, match="page without next_cursor"):
        list(client.items(WARRIORS, "t1"))


def test_null_next_cursor_is_the_last_page(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(URL, json={"items": [{"id": "a"}], "next_cursor": None})

    assert list(client.items(WARRIORS, "t1")) == [{"id": "a"}]


# -- 3. page size cap ----------------------------------------------------------------------


def test_content_length_over_max_page_bytes_is_poison_without_reading_the_body(
    client: VendorClient, rsps: responses.RequestsMock, stats: CallStats
) -> None:
    # GIVEN a 23 MB page (500k points killed a 256 MB Lambda)
    body = CountingBody(23_000_000)
    rsps.get(URL, body=streamed(body), headers={"Content-Length": "23000000"})  # type: ignore[arg-type]

    # WHEN
    with pytest.raises(PoisonError) as raised:
        list(client.items(WARRIORS, "t1"))

    # THEN the size and the limit are named, and not a byte of the body was read
    assert "23,000,000 bytes" in str(raised.value)
    assert "8,388,608" in str(raised.value)
    assert body.read_bytes == 0
    assert (stats.calls, stats.retries) == (1, 0)


def test_body_without_content_length_stops_being_read_once_over_max_page_bytes(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    # GIVEN a chunked page of 64 MiB (no Content-Length)
    body = CountingBody(64 * MiB)
    rsps.get(URL, body=streamed(body))  # type: ignore[arg-type]

    # WHEN
    with pytest.raises(PoisonError, match=r"more than 8,388,608 bytes"):
        list(client.items(WARRIORS, "t1"))

    # THEN reading stopped a little past the cap
    assert 8 * MiB < body.read_bytes <= 9 * MiB
    assert len(rsps.calls) == 1


@pytest.mark.parametrize("content_length", [True, False])
def test_page_of_exactly_max_page_bytes_is_read(
    budget: PacedBudget,
    stats: CallStats,
    clock: FakeClock,
    rsps: responses.RequestsMock,
    content_length: bool,
) -> None:
    raw = json.dumps(LAST_PAGE).encode()
    headers = {"Content-Length": str(len(raw))} if content_length else {}
    rsps.get(URL, body=raw, headers=headers)
    rsps.get(URL, body=raw, headers=headers)

    with make_client(budget, stats, clock, max_page_bytes=len(raw)) as c:
        assert list(c.items(WARRIORS, "t1")) == LAST_PAGE["items"]
    with make_client(budget, stats, clock, max_page_bytes=len(raw) - 1) as c:
        with pytest.raises(PoisonError, match=f"{len(raw)} bytes"):
            list(c.items(WARRIORS, "t1"))


def test_oversized_5xx_body_is_a_5xx_not_poison(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    # A proxy's huge error page: the status decides, the body is not kept.
    body = CountingBody(20 * MiB)
    rsps.get(URL, status=503, body=streamed(body), headers={"Content-Length": str(20 * MiB)})  # type: ignore[arg-type]
    rsps.get(URL, json=LAST_PAGE)

    assert list(client.items(WARRIORS, "t1")) == LAST_PAGE["items"]
    assert body.read_bytes == 0


# -- 4. bodies that break the parser, ids and cursors that break the encoder ---------------


@pytest.mark.parametrize(
    "body",
    [
        "[" * 5_000,
        '{"items": ' + "[" * 5_000,
        '{"items": [{"id": ' + "[" * 100_000 + "]" * 100_000 + "}], " + '"next_cursor": null}',
    ],
)
def test_200_body_nested_too_deep_is_retried_like_any_non_page(
    client: VendorClient, rsps: responses.RequestsMock, body: str
) -> None:
    deep = rsps.get(URL, body=body, content_type="application/json")
    ok = rsps.get(URL, json=LAST_PAGE)

    got = list(client.items(WARRIORS, "t1"))

    assert got == LAST_PAGE["items"]
    assert (deep.call_count, ok.call_count) == (1, 1)


def test_400_body_nested_too_deep_is_still_poison(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    rsps.get(URL, status=400, body="[" * 5_000, content_type="application/json")

    with pytest.raises(PoisonError, match="400 bad request"):
        list(client.items(WARRIORS, "t1"))


def test_id_with_a_lone_surrogate_is_poison_without_a_call(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    with pytest.raises(PoisonError, match="not valid Unicode"):
        list(client.items(WARRIORS, "t\ud800"))
    with pytest.raises(PoisonError):
        encode_segment("\udfff")

    assert len(rsps.calls) == 0


def test_cursor_with_a_lone_surrogate_is_poison(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    # JSON can carry a lone surrogate ("\ud800"); it cannot go into a URL.
    rsps.get(URL, body='{"items": [{"id": "a"}], "next_cursor": "c\\ud800"}')
    more = rsps.get(URL, json=LAST_PAGE)

    with pytest.raises(PoisonError, match="cursor"):
        list(client.items(WARRIORS, "t1"))

    assert more.call_count == 0


def test_vendor_message_with_a_lone_surrogate_gives_an_error_that_can_be_written(
    client: VendorClient, rsps: responses.RequestsMock
) -> None:
    # The message goes on to logs, SQS attributes and the ledger, all UTF-8.
    rsps.get(URL, status=400, body='{"error": "bad_request", "message": "bad id \\ud800"}')

    with pytest.raises(PoisonError) as raised:
        list(client.items(WARRIORS, "t1"))

    assert "bad id \\ud800" in str(raised.value)
    str(raised.value).encode("utf-8")


@pytest.mark.parametrize("token", ["t€ken", "tök", "t\ud800k"])
def test_non_ascii_token_is_refused_without_quoting_it(
    budget: PacedBudget, stats: CallStats, token: str
) -> None:
    # http.client would raise UnicodeEncodeError on every call (latin-1 header values).
    with pytest.raises(ConfigError) as raised:
        VendorClient(BASE, token, budget, stats)

    assert "ASCII" in str(raised.value)
    assert token not in str(raised.value)
