"""The vendor client driven by a profile: paging kinds, auth kinds, record paths, header
names and status codes, against `responses` mocks."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses
from test_vendor import FakeBudget

from pipeline import profile
from pipeline.envelope import Envelope, listed
from pipeline.errors import AuthError, GoneError, PoisonError, RetryableError
from pipeline.profile import Profile
from pipeline.stats import CallStats
from pipeline.vendor_api.client import VendorClient
from pipeline.window import Window

BASE = "https://vendor.test"
TOKEN = "s3cret-key"
ROOT = Path(__file__).resolve().parent.parent
FLEET = profile.load(str(ROOT / "tests" / "profiles" / "fleet-4-levels.toml"))
ORBIT = profile.load(str(ROOT / "tests" / "profiles" / "orbit-offset-apikey.toml"))


def client_for(p: Profile, budget: FakeBudget | None = None) -> VendorClient:
    return VendorClient(
        BASE,
        TOKEN,
        budget or FakeBudget(),
        CallStats(),
        max_attempts=2,
        sleep=lambda s: None,
        profile=p,
    )


def small(kind: dict[str, Any], **auth: Any) -> Profile:
    """A one-level profile whose listings page as `kind` says."""
    return profile.parse(
        {
            "name": "small",
            "pagination": kind,
            "auth": auth or {"type": "bearer"},
            "levels": [{"name": "things", "key": "thing_id", "path": "/things", "id": "id"}],
            "data": {"path": "/things/{thing_id}/points"},
        }
    )


def query(call: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(call.request.url).query)


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock() as mock:
        yield mock


def test_offset_paging_asks_from_each_offset_until_a_short_page(
    rsps: responses.RequestsMock,
) -> None:
    # GIVEN 60 accounts in pages of 25 (offset + limit)
    accounts = [{"uuid": f"a{i}"} for i in range(60)]
    for offset in (0, 25, 50):
        rsps.get(
            f"{BASE}/v2/accounts",
            match=[responses.matchers.query_param_matcher({"limit": "25", "offset": str(offset)})],
            json={"results": accounts[offset : offset + 25]},
        )
    # WHEN the client lists them
    got = list(client_for(ORBIT).items(ORBIT.root))
    # THEN three calls, every account once, and none after the short page
    assert [item["uuid"] for item in got] == [a["uuid"] for a in accounts]
    assert len(rsps.calls) == 3


def test_offset_paging_makes_one_more_call_when_the_last_page_is_full(
    rsps: responses.RequestsMock,
) -> None:
    rsps.get(f"{BASE}/v2/accounts", json={"results": [{"uuid": f"a{i}"} for i in range(25)]})
    rsps.get(f"{BASE}/v2/accounts", json={"results": []})
    rsps.calls.reset()
    got = list(client_for(ORBIT).items(ORBIT.root))
    assert len(got) == 25
    assert [query(c)["offset"] for c in rsps.calls] == [["0"], ["25"]]


def test_api_key_header_and_nested_records_and_numeric_ids(rsps: responses.RequestsMock) -> None:
    # GIVEN monitors with integer ids, records under "results"
    rsps.get(
        f"{BASE}/v2/accounts/a%2F1/monitors",
        json={"results": [{"monitorId": 7}, {"monitorId": 8}]},
    )
    client = client_for(ORBIT)
    stage = ORBIT.stages[0]
    parent = Envelope(
        "r", "accounts", ("a/1",), Window.parse("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z")
    )
    # WHEN the accounts stage lists one account's monitors
    found = listed(
        client.items(stage.listing, stage.ids(parent.path)),
        lambda child_id: parent.child("monitors", child_id),
        "accounts",
        stage.child_level,
    )
    # THEN the key went in its header, the id as one segment, the ids as decimal text
    request = rsps.calls[0].request
    assert request.headers["X-Api-Key"] == TOKEN
    assert "Authorization" not in request.headers
    assert [c.path for c in found.children] == [("a/1", "7"), ("a/1", "8")]


def test_a_string_id_where_numeric_ones_are_allowed_still_counts_and_a_float_does_not() -> None:
    level = ORBIT.levels[1]
    make = lambda i: Envelope(  # noqa: E731
        "r", "monitors", ("a", i), Window.parse("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z")
    )
    assert [c.entity_id for c in listed([{"monitorId": "x"}], make, "m", level).children] == ["x"]
    with pytest.raises(PoisonError, match=r"without an id \(monitorId\)"):
        listed([{"monitorId": 7.5}], make, "m", level)


def test_profile_status_codes_mean_what_it_says(rsps: responses.RequestsMock) -> None:
    client = client_for(ORBIT)
    rsps.get(f"{BASE}/v2/accounts", status=410)
    with pytest.raises(GoneError, match="410 not found"):
        list(client.items(ORBIT.root))
    rsps.replace(responses.GET, f"{BASE}/v2/accounts", status=403)
    with pytest.raises(AuthError, match="403 unauthorized"):
        list(client.items(ORBIT.root))
    rsps.replace(responses.GET, f"{BASE}/v2/accounts", status=422, json={"message": "no"})
    with pytest.raises(PoisonError, match="422 bad request: no"):
        list(client.items(ORBIT.root))


def test_rate_limit_headers_are_read_under_the_profiles_names(
    rsps: responses.RequestsMock,
) -> None:
    budget = FakeBudget()
    rsps.get(
        f"{BASE}/v2/accounts",
        json={"results": []},
        headers={"RateLimit-Limit": "50", "RateLimit-Remaining": "49", "RateLimit-Reset": "1"},
    )
    list(client_for(ORBIT, budget).items(ORBIT.root))
    [(_, limit, remaining, reset)] = [e for e in budget.events if e[0] == "observe"]
    assert (limit, remaining) == (50, 49) and reset is not None and reset <= 1


def test_link_paging_follows_next_links_and_basic_auth_carries_username_and_token(
    rsps: responses.RequestsMock,
) -> None:
    rsps.get(
        f"{BASE}/api/regions",
        match=[responses.matchers.query_param_matcher({"per_page": "50"})],
        json={"data": [{"id": "r1"}]},
        headers={"Link": f'<{BASE}/api/regions?per_page=50&after=r1>; rel="next"'},
    )
    rsps.get(
        f"{BASE}/api/regions",
        match=[responses.matchers.query_param_matcher({"per_page": "50", "after": "r1"})],
        json={"data": [{"id": "r2"}]},
    )
    got = list(client_for(FLEET).items(FLEET.root))
    assert [r["id"] for r in got] == ["r1", "r2"]
    expected = "Basic " + base64.b64encode(f"harvester:{TOKEN}".encode()).decode()
    assert all(c.request.headers["Authorization"] == expected for c in rsps.calls)


def test_a_next_link_to_another_host_is_poison_and_not_followed(
    rsps: responses.RequestsMock,
) -> None:
    rsps.get(
        f"{BASE}/api/regions",
        json={"data": []},
        headers={"Link": '<https://elsewhere.test/api/regions?page=2>; rel="next"'},
    )
    with pytest.raises(PoisonError, match="not under the vendor's base URL"):
        list(client_for(FLEET).items(FLEET.root))
    assert len(rsps.calls) == 1


def test_a_next_link_seen_twice_is_poison(rsps: responses.RequestsMock) -> None:
    loop = f'<{BASE}/api/regions?page=2>; rel="next"'
    rsps.get(f"{BASE}/api/regions", json={"data": []}, headers={"Link": loop})
    with pytest.raises(PoisonError, match="twice in one listing"):
        list(client_for(FLEET).items(FLEET.root))
    assert len(rsps.calls) == 2


def test_page_numbers_count_from_the_first_page_until_a_short_one(
    rsps: responses.RequestsMock,
) -> None:
    p = small({"type": "page_number", "page_size": 2, "size_param": "per_page"})
    rsps.get(f"{BASE}/things", json={"items": [{"id": "a"}, {"id": "b"}]})
    rsps.get(f"{BASE}/things", json={"items": [{"id": "c"}]})
    got = list(client_for(p).items(p.root))
    assert [t["id"] for t in got] == ["a", "b", "c"]
    assert [query(c)["page"] for c in rsps.calls] == [["1"], ["2"]]
    assert [query(c)["per_page"] for c in rsps.calls] == [["2"], ["2"]]


def test_a_cursor_in_a_header_is_sent_back_until_it_is_absent(
    rsps: responses.RequestsMock,
) -> None:
    p = small({"type": "header_cursor", "cursor_header": "X-Next", "cursor_param": "after"})
    rsps.get(f"{BASE}/things", json={"items": [{"id": "a"}]}, headers={"X-Next": "c1"})
    rsps.get(f"{BASE}/things", json={"items": [{"id": "b"}]})
    got = list(client_for(p).items(p.root))
    assert [t["id"] for t in got] == ["a", "b"]
    assert "after" not in query(rsps.calls[0]) and query(rsps.calls[1])["after"] == ["c1"]


def test_no_paging_is_one_call_without_a_page_size_and_a_bare_array_body(
    rsps: responses.RequestsMock,
) -> None:
    p = profile.parse(
        {
            "name": "bare",
            "pagination": {"type": "none"},
            "levels": [
                {"name": "things", "key": "thing_id", "path": "/things", "id": "id", "records": ""}
            ],
            "data": {"path": "/things/{thing_id}/points"},
        }
    )
    rsps.get(f"{BASE}/things", json=[{"id": "a"}, {"id": "b"}])
    assert [t["id"] for t in client_for(p).items(p.root)] == ["a", "b"]
    assert query(rsps.calls[0]) == {}


def test_a_page_without_its_records_field_is_poison(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/v2/accounts", json={"data": []})
    with pytest.raises(PoisonError, match="page without results"):
        list(client_for(ORBIT).items(ORBIT.root))


def test_an_api_key_in_the_query_is_sent_but_never_shown(
    rsps: responses.RequestsMock, caplog: pytest.LogCaptureFixture
) -> None:
    # GIVEN a vendor taking its key in the query, which refuses the connection once
    p = small({"type": "cursor"}, type="query", param="api_key")
    rsps.get(
        f"{BASE}/things", body=requests.exceptions.ConnectionError(f"{BASE}/things?api_key={TOKEN}")
    )
    rsps.get(f"{BASE}/things", json={"items": [], "next_cursor": None})
    client = client_for(p)
    seen: list[str] = []
    real_start = client.in_flight.start
    client.in_flight.start = lambda url: (seen.append(url), real_start(url))[1]  # type: ignore[method-assign]
    # WHEN it lists
    assert list(client.items(p.root)) == []
    # THEN the key went in the query, and neither the calls shown nor the logs hold it
    assert query(rsps.calls[-1])["api_key"] == [TOKEN]
    assert seen and all(TOKEN not in url for url in seen)
    assert TOKEN not in caplog.text


def test_a_relative_next_link_is_followed_from_the_pages_own_url(
    rsps: responses.RequestsMock,
) -> None:
    rsps.get(
        f"{BASE}/api/regions",
        match=[responses.matchers.query_param_matcher({"per_page": "50"})],
        json={"data": [{"id": "r1"}]},
        headers={"Link": '</api/regions?per_page=50&after=r1>; rel="next"'},
    )
    rsps.get(
        f"{BASE}/api/regions",
        match=[responses.matchers.query_param_matcher({"per_page": "50", "after": "r1"})],
        json={"data": [{"id": "r2"}]},
    )
    assert [r["id"] for r in client_for(FLEET).items(FLEET.root)] == ["r1", "r2"]


def test_an_api_key_echoed_by_the_vendor_never_reaches_an_error_message(
    rsps: responses.RequestsMock,
) -> None:
    # GIVEN a vendor taking its key in the query that echoes it in a looping next link,
    # and one that echoes it in a 400's message
    p = small({"type": "link"}, type="query", param="api_key")
    loop = f'<{BASE}/things?page=2&api_key={TOKEN}>; rel="next"'
    rsps.get(f"{BASE}/things", json={"items": []}, headers={"Link": loop})
    with pytest.raises(PoisonError) as looped:
        list(client_for(p).items(p.root))
    rsps.replace(
        responses.GET,
        f"{BASE}/things",
        status=400,
        json={"message": f"bad request GET /things?api_key={TOKEN}"},
    )
    with pytest.raises(PoisonError) as refused:
        list(client_for(p).items(p.root))

    # THEN the errors say what happened, with the key masked
    assert "twice in one listing" in str(looped.value) and "400 bad request" in str(refused.value)
    assert TOKEN not in str(looped.value) and TOKEN not in str(refused.value)
    assert "api_key=***" in str(looped.value)


def test_a_next_link_with_a_blanked_key_gets_the_configured_one(
    rsps: responses.RequestsMock,
) -> None:
    p = small({"type": "link"}, type="query", param="api_key")
    rsps.get(
        f"{BASE}/things",
        match=[responses.matchers.query_param_matcher({"api_key": TOKEN, "limit": "100"})],
        json={"items": [{"id": "a"}]},
        headers={"Link": f'<{BASE}/things?after=a&api_key=>; rel="next"'},
    )
    rsps.get(
        f"{BASE}/things",
        match=[responses.matchers.query_param_matcher({"after": "a", "api_key": TOKEN})],
        json={"items": [{"id": "b"}]},
    )
    assert [t["id"] for t in client_for(p).items(p.root)] == ["a", "b"]


def test_an_empty_cursor_returned_twice_is_a_loop(rsps: responses.RequestsMock) -> None:
    rsps.get(f"{BASE}/things", json={"items": [], "next_cursor": ""})
    p = small({"type": "cursor"})
    with pytest.raises(PoisonError, match="twice in one listing"):
        list(client_for(p).items(p.root))
    assert len(rsps.calls) == 2


def test_a_gone_status_past_the_first_page_is_retried_not_taken_for_the_entity_gone(
    rsps: responses.RequestsMock,
) -> None:
    # GIVEN a full first page, then a 404 for the next one (a page past the end, or an
    # expired cursor)
    p = small({"type": "page_number", "page_size": 2, "size_param": "per_page"})
    rsps.get(f"{BASE}/things", json={"items": [{"id": "a"}, {"id": "b"}]})
    rsps.get(f"{BASE}/things", status=404)
    # THEN the listing is read again later (and dead-lettered with this reason if it stays
    # so), not recorded gone with the pages already read thrown away
    with pytest.raises(RetryableError, match="404 not found on page 2"):
        list(client_for(p).items(p.root))
