"""The simulator serves any vendor profile: its paths, auth, pagination, fields, time formats,
rate-limit headers and status codes, as the profile's client sends and reads them.

`ProfileClient` below is the client's side of the wire written from the profile alone (the
contract pipeline/vendor_api follows); `harvest` walks a whole tree with it.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from pipeline import profile as profiles
from pipeline.dev.simulator import Simulator, SimulatorConfig, SimulatorProcess
from pipeline.dev.verify import compare
from pipeline.errors import ConfigError
from pipeline.profile import Listing, PaginationKind, Profile, TimeFormat
from pipeline.sinks import write_records
from pipeline.vendor_api.transport import encode_segment
from pipeline.window import Window, format_instant, point_text

PROFILES = Path(__file__).parent / "profiles"
FLEET = profiles.load(str(PROFILES / "fleet-4-levels.toml"))
ORBIT = profiles.load(str(PROFILES / "orbit-offset-apikey.toml"))
HERMES = profiles.load()
TOKEN = "sim-token"
START = datetime(2024, 3, 1, tzinfo=UTC)
END = datetime(2024, 3, 2, tzinfo=UTC)
ROOMY = 10**6  # rate_calls that keep the limit out of the way


def parsed(name: str, **overrides: Any) -> Profile:
    """A small two-level profile built in code, with the given top-level tables replaced."""
    data: dict[str, Any] = {
        "name": name,
        "levels": [
            {"name": "shelves", "key": "shelf_id", "path": "/shelves", "id": "id"},
            {"name": "books", "key": "book_id", "path": "/shelves/{shelf_id}/books", "id": "id"},
        ],
        "data": {"path": "/books/{book_id}/pages"},
    }
    data.update(overrides)
    return profiles.parse(data)


# A header cursor, an API key in the query, bare JSON arrays, Unix windows and timestamps,
# the reset as an epoch second, and status codes unlike Hermes'.
HEADER_CURSOR = parsed(
    "header-cursor-query",
    auth={"type": "query", "param": "key"},
    pagination={
        "type": "header_cursor",
        "page_size": 3,
        "cursor_header": "X-Next-Page",
        "cursor_param": "next",
    },
    levels=[
        {"name": "shelves", "key": "shelf_id", "path": "/shelves", "id": "id", "records": ""},
        {
            "name": "books",
            "key": "book_id",
            "path": "/shelves/{shelf_id}/books",
            "id": "isbn",
            "records": "",
        },
    ],
    data={
        "path": "/books/{book_id}/pages",
        "records": "",
        "window": {"from": "after", "to": "before", "format": "unix_ms"},
        "points": {"ts": "at", "ts_format": "unix", "value": "n"},
    },
    rate_limit={
        "limit_header": "X-Quota",
        "remaining_header": "X-Quota-Left",
        "reset_header": "X-Quota-Reset",
        "reset_format": "epoch",
        "retry_after_header": "X-Retry-In",
    },
    status={
        "gone": [410],
        "auth": [403, 407],
        "poison": [422],
        "retry": [502, 503],
        "rate_limited": [420],
    },
)
# One page a listing, no auth, no size parameter; three levels.
UNPAGED = parsed(
    "unpaged-no-auth",
    auth={"type": "none"},
    pagination={"type": "none"},
    levels=[
        {"name": "zones", "key": "zone", "path": "/zones", "id": "code", "numeric_ids": True},
        {"name": "racks", "key": "rack", "path": "/zones/{zone}/racks", "id": "id"},
        {"name": "units", "key": "unit", "path": "/zones/{zone}/racks/{rack}/units", "id": "id"},
    ],
    data={"path": "/units/{unit}/samples"},
)
# A body cursor at a nested field beside nested records, ids and point fields at dotted
# paths, another cursor parameter, no size parameter, and extra parameters every page must
# carry.
NESTED_CURSOR = parsed(
    "nested-cursor",
    pagination={
        "type": "cursor",
        "page_size": 4,
        "size_param": "",
        "cursor_param": "after",
        "cursor_field": "meta.next",
    },
    levels=[
        {
            "name": "shelves",
            "key": "shelf_id",
            "path": "/shelves",
            "id": "id",
            "records": "result.shelves",
            "params": {"fields": "all"},
        },
        {
            "name": "books",
            "key": "book_id",
            "path": "/shelves/{shelf_id}/books",
            "id": "ref.id",
            "records": "result.books",
        },
    ],
    data={
        "path": "/books/{book_id}/pages",
        "records": "result.points",
        "params": {"v": "2"},
        "points": {"ts": "sample.time", "value": "sample.value"},
    },
)


# -- the client's side of the wire --------------------------------------------------------


def pluck(body: Any, dotted: str) -> Any:
    """The value at a dotted path of a JSON body ("": the body itself)."""
    for part in dotted.split(".") if dotted else ():
        body = body[part]
    return body


def window_params(profile: Profile, start: datetime, end: datetime) -> dict[str, str]:
    def text(value: datetime) -> str:
        if profile.data.window_format == TimeFormat.UNIX:
            return str(int(value.timestamp()))
        if profile.data.window_format == TimeFormat.UNIX_MS:
            return str(int(value.timestamp()) * 1000)
        return format_instant(value)

    return {profile.data.from_param: text(start), profile.data.to_param: text(end)}


def output_point(profile: Profile, point: Mapping[str, Any]) -> dict[str, Any]:
    """A vendor's point as the output writes it."""
    ts = pluck(point, profile.data.ts_field)
    if profile.data.ts_format == TimeFormat.UNIX:
        assert isinstance(ts, int | float) and not isinstance(ts, bool)
        ts = point_text(datetime.fromtimestamp(ts, UTC))
    elif profile.data.ts_format == TimeFormat.UNIX_MS:
        assert isinstance(ts, int) and not isinstance(ts, bool)
        ts = point_text(datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ts))
    else:
        assert isinstance(ts, str)
    return {"ts": ts, "value": pluck(point, profile.data.value_field)}


class ProfileClient:
    """Calls a vendor the way its profile says: auth, paths, pagination, record selectors."""

    def __init__(self, profile: Profile, base: str, token: str = TOKEN) -> None:
        self.profile = profile
        self.base = base
        self.token = token
        self.http = requests.Session()
        self.calls = 0
        self.pages: list[requests.Response] = []
        auth = profile.auth
        if auth.kind == "bearer":
            self.http.headers["Authorization"] = f"Bearer {token}"
        elif auth.kind == "header":
            self.http.headers[auth.header] = f"{auth.prefix}{token}"
        elif auth.kind == "basic":
            credential = f"{auth.username}:{token}" if auth.username else token
            basic = base64.b64encode(credential.encode()).decode()
            self.http.headers["Authorization"] = f"Basic {basic}"

    def get(self, url: str, params: Mapping[str, str]) -> requests.Response:
        query = dict(params)
        if self.profile.auth.kind == "query":
            query[self.profile.auth.param] = self.token
        self.calls += 1
        response = self.http.get(url, params=query, timeout=5)
        self.pages.append(response)
        return response

    def fetch(
        self, listing: Listing, ids: Mapping[str, str], extra: Mapping[str, str] | None = None
    ) -> list[Any] | None:
        """Every record of a listing, page by page; None if its entity answered gone."""
        p = listing.pagination
        url = self.base + listing.path.format(**{k: encode_segment(v) for k, v in ids.items()})
        query = {**dict(listing.params), **(extra or {})}
        if p.size_param and p.kind != PaginationKind.NONE:
            query[p.size_param] = str(p.page_size)
        records: list[Any] = []
        page_number, offset = p.first_page, 0
        while True:
            if p.kind == PaginationKind.OFFSET:
                query[p.offset_param] = str(offset)
            elif p.kind == PaginationKind.PAGE_NUMBER:
                query[p.page_param] = str(page_number)
            response = self.get(url, query)
            if response.status_code in self.profile.statuses.gone and not records:
                return None
            assert response.status_code == 200, (url, query, response.text)
            body = response.json()
            page = pluck(body, listing.records)
            assert isinstance(page, list)
            records.extend(page)
            if p.kind == PaginationKind.NONE:
                return records
            if p.kind in (PaginationKind.OFFSET, PaginationKind.PAGE_NUMBER):
                if len(page) < p.page_size:
                    return records
                offset, page_number = offset + len(page), page_number + 1
                continue
            if p.kind == PaginationKind.LINK:
                link = response.links.get("next")
                if link is None:
                    return records
                url, query = link["url"], {}
                continue
            cursor = (
                pluck(body, p.cursor_field)
                if p.kind == PaginationKind.CURSOR
                else response.headers.get(p.cursor_header)
            )
            if not cursor:
                return records
            query[p.cursor_param] = cursor


Paths = dict[tuple[str, ...], list[dict[str, Any]]]


def harvest(
    client: ProfileClient, start: datetime = START, end: datetime = END
) -> tuple[Paths, set[tuple[str, ...]], list[tuple[str, ...]]]:
    """Walk the whole tree: (points by leaf path, gone paths, every entity path listed)."""
    profile = client.profile
    levels, keys = profile.levels, profile.keys
    results: Paths = {}
    gone: set[tuple[str, ...]] = set()
    listed: list[tuple[str, ...]] = []

    def visit(depth: int, path: tuple[str, ...]) -> None:
        items = client.fetch(levels[depth].listing, dict(zip(keys, path, strict=False)))
        if items is None:
            gone.add(path)
            return
        for item in items:
            raw = pluck(item, levels[depth].id_field)
            assert isinstance(raw, int if levels[depth].numeric_ids else str), raw
            child = (*path, str(raw))
            listed.append(child)
            if depth + 1 < len(levels):
                visit(depth + 1, child)
                continue
            ids = dict(zip(keys, child, strict=True))
            points = client.fetch(profile.data.listing, ids, window_params(profile, start, end))
            if points is None:
                gone.add(child)
            else:
                results[child] = [output_point(profile, p) for p in points]

    visit(0, ())
    return results, gone, listed


# The `simulator` fixture (conftest.py): a started Simulator of a config, stopped after.
Serve = Callable[..., Simulator]


def NAME(profile: Profile) -> str:  # noqa: N802 - a pytest ids function
    return profile.name


def assert_harvest_exact(sim: Simulator, client: ProfileClient) -> Paths:
    """A whole harvest finds the ground truth, the gone entities, each entity once, and makes
    exactly the expected calls."""
    results, gone, listed = harvest(client)
    assert results == sim.ground_truth(START, END)
    assert gone == sim.gone()
    assert len(listed) == len(set(listed))
    assert client.calls == sim.expected_calls(START, END)
    gone_codes = sim.config.profile.statuses.gone
    answered = sum(
        n for code, n in sim.stats.by_status.items() if code == 200 or code in gone_codes
    )
    assert answered == client.calls
    return results


# -- whole harvests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "profile", [FLEET, ORBIT, HEADER_CURSOR, UNPAGED, NESTED_CURSOR, HERMES], ids=NAME
)
def test_harvest_finds_the_ground_truth_when_walked_as_the_profile_says(
    simulator: Serve, profile: Profile
) -> None:
    # GIVEN a vendor of this profile with awkward ids, gone entities and pages to walk
    config = SimulatorConfig(
        profile=profile,
        fanout=(3, 2, 2, 2)[: len(profile.levels)],
        nasty_ids=True,
        gone_rate=0.2,
        point_interval=1800.0,
        rate_calls=ROOMY,
    )
    sim = simulator(config)

    # WHEN a client walks the whole tree the way the profile says
    results = assert_harvest_exact(sim, ProfileClient(profile, sim.url))

    # THEN every leaf came with its day of points
    assert results and all(len(points) == 48 for points in results.values())


def with_page_size(profile: Profile, size: int) -> Profile:
    """The profile with every listing asking for pages of `size`."""

    def listing(old: Listing) -> Listing:
        return replace(old, pagination=replace(old.pagination, page_size=size))

    return replace(
        profile,
        levels=tuple(replace(lv, listing=listing(lv.listing)) for lv in profile.levels),
        data=replace(profile.data, listing=listing(profile.data.listing)),
    )


@pytest.mark.parametrize("profile", [FLEET, ORBIT, HEADER_CURSOR, NESTED_CURSOR], ids=NAME)
def test_harvest_finds_the_ground_truth_when_lists_fill_many_pages(
    simulator: Serve, profile: Profile
) -> None:
    # GIVEN pages of 2 and lists that fill their last page exactly (4 children, 48 points)
    sim = simulator(
        SimulatorConfig(
            profile=profile,
            fanout=(4, 4, 2, 3)[: len(profile.levels)],
            page_size=2,
            point_interval=1800.0,
            gone_rate=0.1,
            rate_calls=ROOMY,
        )
    )

    # WHEN a client asking for pages of 2 walks the tree, THEN it finds it all, exactly
    assert_harvest_exact(sim, ProfileClient(with_page_size(profile, 2), sim.url))


# -- routes ---------------------------------------------------------------------------------


def test_path_with_a_grandparent_answers_gone_when_the_ids_are_of_another_branch(
    simulator: Serve,
) -> None:
    # GIVEN the fleet's channels, listed under a region and a device of that region
    sim = simulator(SimulatorConfig(profile=FLEET, fanout=(2, 1, 1, 1), rate_calls=ROOMY))
    client = ProfileClient(FLEET, sim.url)
    (region, _, device, _), (other_region, *_) = sorted(sim.ground_truth(START, END))
    url = f"{sim.url}/api/regions/{{}}/devices/{encode_segment(device)}/channels"

    # WHEN the device is asked for under its own region, then under the other one
    own = client.get(url.format(encode_segment(region)), {"per_page": "50"})
    other = client.get(url.format(encode_segment(other_region)), {"per_page": "50"})

    # THEN only its own region finds it
    assert own.status_code == 200 and len(own.json()["data"]) == 1
    assert other.status_code == 404
    assert other.json() == {"error": "not_found"}


@pytest.mark.parametrize(
    ("profile", "path", "status"),
    [
        (ORBIT, "/v1/troops", 404),
        (ORBIT, "/v2/accounts/", 404),
        (ORBIT, "/v2/monitors/12/series/extra", 404),
        (HEADER_CURSOR, "/shelves/nope/books", 410),
        (HEADER_CURSOR, "/shelf", 410),
    ],
)
def test_unknown_paths_answer_the_profiles_least_gone_code_with_its_rate_headers(
    simulator: Serve, profile: Profile, path: str, status: int
) -> None:
    sim = simulator(SimulatorConfig(profile=profile, rate_calls=ROOMY))

    response = ProfileClient(profile, sim.url).get(sim.url + path, {})

    assert response.status_code == status
    assert response.json() == {"error": "not_found"}
    names = profile.rate_limit
    assert {names.limit, names.remaining, names.reset} <= set(response.headers)
    assert "X-RateLimit-Limit" not in response.headers


def test_numeric_ids_are_listed_as_integers_and_found_by_their_decimal_text(
    simulator: Serve,
) -> None:
    sim = simulator(SimulatorConfig(profile=ORBIT, fanout=(1, 3), rate_calls=ROOMY))
    client = ProfileClient(ORBIT, sim.url)
    [account] = client.fetch(ORBIT.levels[0].listing, {}) or []

    monitors = client.fetch(ORBIT.levels[1].listing, {"account_id": account["uuid"]}) or []
    ids = [m["monitorId"] for m in monitors]
    window = window_params(ORBIT, START, END)
    points = client.fetch(ORBIT.data.listing, {"monitor_id": str(ids[0])}, window)

    assert len(ids) == 3 and all(type(i) is int for i in ids)
    assert all(m["account_id"] == account["uuid"] for m in monitors)
    assert points is not None and len(points) == 24
    assert {path[1] for path in sim.ground_truth(START, END)} == {str(i) for i in ids}
    leading_zero = client.get(
        f"{sim.url}/v2/monitors/0{ids[0]}/series", {**window, "limit": "25", "offset": "0"}
    )
    assert leading_zero.status_code == 404


# -- auth -----------------------------------------------------------------------------------


def basic(credential: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credential.encode()).decode()}


BASIC_NO_USER = parsed("basic-no-user", auth={"type": "basic"})
HEADER_PREFIX = parsed(
    "header-prefix", auth={"type": "header", "header": "X-Token", "prefix": "Token "}
)


@pytest.mark.parametrize(
    ("profile", "token", "accepted", "refused", "status"),
    [
        (
            FLEET,
            TOKEN,
            [basic(f"harvester:{TOKEN}")],
            [
                basic("harvester:nope"),
                basic(f"other:{TOKEN}"),
                basic(TOKEN),
                {"Authorization": f"Bearer {TOKEN}"},
                {"Authorization": "Basic !!"},
                {},
            ],
            401,
        ),
        (
            ORBIT,
            TOKEN,
            [{"X-Api-Key": TOKEN}, {"x-api-key": TOKEN}],
            [{"X-Api-Key": "nope"}, {"X-Api-Key": ""}, {"Authorization": f"Bearer {TOKEN}"}, {}],
            401,
        ),
        (
            BASIC_NO_USER,
            "user:pass",
            [basic("user:pass")],
            [basic("user:other"), basic(":user:pass"), {}],
            401,
        ),
        (
            HEADER_PREFIX,
            TOKEN,
            [{"X-Token": f"Token {TOKEN}"}],
            [{"X-Token": TOKEN}, {"X-Token": "Token "}, {"X-Token": f"Bearer {TOKEN}"}],
            401,
        ),
        (HERMES, TOKEN, [{"Authorization": f"bearer {TOKEN}"}], [{"Authorization": TOKEN}], 401),
    ],
    ids=["fleet-basic", "orbit-header", "basic-no-user", "header-prefix", "hermes-bearer"],
)
def test_auth_accepts_the_profiles_scheme_and_refuses_others_without_taking_a_slot(
    simulator: Serve,
    profile: Profile,
    token: str,
    accepted: list[dict[str, str]],
    refused: list[dict[str, str]],
    status: int,
) -> None:
    sim = simulator(SimulatorConfig(profile=profile, token=token, rate_calls=100))
    url = sim.url + profile.levels[0].listing.path
    p = profile.levels[0].listing.pagination
    query = {"offset": {p.offset_param: "0"}, "page_number": {p.page_param: "1"}}.get(p.kind, {})

    for headers in refused:
        response = requests.get(url, params=query, headers=headers, timeout=5)
        assert response.status_code == status, headers
        assert response.json() == {"error": "unauthorized"}
        assert response.headers[profile.rate_limit.remaining] == "100"
    for headers in accepted:
        response = requests.get(url, params=query, headers=headers, timeout=5)
        assert response.status_code == 200, headers
    assert sim.stats.by_status == {status: len(refused), 200: len(accepted)}


def test_query_auth_accepts_the_token_parameter_and_answers_the_least_auth_code_otherwise(
    simulator: Serve,
) -> None:
    sim = simulator(SimulatorConfig(profile=HEADER_CURSOR, rate_calls=ROOMY))
    url = f"{sim.url}/shelves"

    good = requests.get(url, params={"key": TOKEN}, timeout=5)
    cases: list[tuple[Any, dict[str, str]]] = [
        ({"key": "nope"}, {}),
        ({}, {"Authorization": f"Bearer {TOKEN}"}),
        ([("key", TOKEN), ("key", TOKEN)], {}),  # given twice
        ({"api_key": TOKEN}, {}),
    ]
    refused = [
        requests.get(url, params=params, headers=headers, timeout=5) for params, headers in cases
    ]

    assert good.status_code == 200
    assert [r.status_code for r in refused] == [403] * 4  # min(403, 407)
    # The token is not a listing parameter: the next page's cursor is bound without it.
    cursor = good.headers["X-Next-Page"]
    again = requests.get(url, params={"key": TOKEN, "next": cursor}, timeout=5)
    assert again.status_code == 200


def test_no_auth_profile_serves_requests_without_credentials(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=UNPAGED, rate_calls=3, rate_period=60.0))

    statuses = [requests.get(f"{sim.url}/zones", timeout=5).status_code for _ in range(4)]

    assert statuses == [200, 200, 200, 429]  # one rate limit for every caller


# -- pagination -----------------------------------------------------------------------------


def test_link_pagination_names_the_next_page_on_the_simulators_origin_until_the_last(
    simulator: Serve,
) -> None:
    # GIVEN 5 regions, asked for 2 a page, the first request naming no page size
    sim = simulator(SimulatorConfig(profile=FLEET, fanout=(5, 1, 1, 1), rate_calls=ROOMY))
    client = ProfileClient(FLEET, sim.url)
    first = client.get(f"{sim.url}/api/regions", {})
    assert first.status_code == 200 and len(first.json()["data"]) == 5
    assert "Link" not in first.headers  # one page of the default 50

    # WHEN the client follows the links from a page of 2
    response = client.get(f"{sim.url}/api/regions", {"per_page": "2"})
    links = []
    while "next" in response.links:
        links.append(response.links["next"]["url"])
        response = client.get(links[-1], {})

    # THEN each link is on the simulator's origin, keeps the page size, and the last page
    # (1 region) has none
    assert len(links) == 2
    assert all(link.startswith(f"{sim.url}/api/regions?per_page=2&cursor=") for link in links)
    assert response.status_code == 200 and len(response.json()["data"]) == 1
    # AND a link's cursor is refused with another page size
    tampered = client.get(links[0].replace("per_page=2", "per_page=3"), {})
    assert tampered.status_code == 400
    assert tampered.json()["error"] == "bad_request"


def test_link_carries_the_page_size_when_the_first_request_named_none(simulator: Serve) -> None:
    sim = simulator(
        SimulatorConfig(profile=FLEET, fanout=(3, 1, 1, 1), page_size=2, rate_calls=ROOMY)
    )
    client = ProfileClient(FLEET, sim.url)

    first = client.get(f"{sim.url}/api/regions", {})
    second = client.get(first.links["next"]["url"], {})

    assert "per_page=2" in first.links["next"]["url"]
    assert len(first.json()["data"]) == 2 and len(second.json()["data"]) == 1
    assert "next" not in second.links


def test_offset_pagination_ends_on_a_short_page_and_needs_the_offset(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=ORBIT, fanout=(4, 1), rate_calls=ROOMY))
    client = ProfileClient(ORBIT, sim.url)
    url = f"{sim.url}/v2/accounts"

    pages = [client.get(url, {"limit": "2", "offset": str(o)}).json()["results"] for o in (0, 2, 4)]
    shifted = client.get(url, {"limit": "2", "offset": "1"}).json()["results"]
    problems = [
        client.get(url, {"limit": "2"}),
        client.get(url, {"limit": "2", "offset": "-1"}),
        client.get(url, {"limit": "26", "offset": "0"}),
        client.get(url, {"limit": "2", "offset": "0", "cursor": "x"}),
    ]

    assert [len(p) for p in pages] == [2, 2, 0]
    assert shifted == pages[0][1:] + pages[1][:1]
    assert [r.status_code for r in problems] == [400] * 4  # min(400, 422)
    assert all(r.json()["error"] == "bad_request" and r.json()["message"] for r in problems)


def test_page_number_pagination_counts_from_first_page_and_ends_on_a_short_page(
    simulator: Serve,
) -> None:
    # GIVEN a channel's 24 hourly readings, 10 a page
    sim = simulator(SimulatorConfig(profile=FLEET, fanout=(1, 1, 1, 1), rate_calls=ROOMY))
    client = ProfileClient(FLEET, sim.url)
    [path] = sim.ground_truth(START, END)
    url = f"{sim.url}/api/channels/{encode_segment(path[3])}/readings"
    window = window_params(FLEET, START, END)

    pages = [
        client.get(url, {**window, "per_page": "10", "page": str(n)}).json()["readings"]
        for n in (1, 2, 3, 4)
    ]
    problems = [
        client.get(url, {**window, "per_page": "10", "page": "0"}),
        client.get(url, {**window, "per_page": "10"}),
        client.get(url, {**window, "per_page": "10", "page": "x"}),
    ]

    assert [len(p) for p in pages] == [10, 10, 4, 0]
    assert [output_point(FLEET, p) for page in pages for p in page] == sim.ground_truth(START, END)[
        path
    ]
    assert [r.status_code for r in problems] == [400] * 3


def test_header_cursor_is_absent_on_the_last_page_and_bound_to_its_path(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=HEADER_CURSOR, fanout=(4, 2), rate_calls=ROOMY))
    client = ProfileClient(HEADER_CURSOR, sim.url)

    first = client.get(f"{sim.url}/shelves", {"limit": "3"})
    cursor = first.headers["X-Next-Page"]
    last = client.get(f"{sim.url}/shelves", {"limit": "3", "next": cursor})
    shelf = first.json()[0]["id"]
    elsewhere = client.get(f"{sim.url}/shelves/{encode_segment(shelf)}/books", {"next": cursor})

    assert isinstance(first.json(), list) and len(first.json()) == 3
    assert last.status_code == 200 and len(last.json()) == 1
    assert "X-Next-Page" not in last.headers
    assert elsewhere.status_code == 422  # the profile's least poison code
    assert elsewhere.json()["error"] == "bad_request"


def test_unpaged_listing_answers_every_record_at_once_and_refuses_page_parameters(
    simulator: Serve,
) -> None:
    sim = simulator(SimulatorConfig(profile=UNPAGED, fanout=(150, 1, 1), rate_calls=ROOMY))

    whole = requests.get(f"{sim.url}/zones", timeout=5)
    sized = requests.get(f"{sim.url}/zones", params={"limit": "10"}, timeout=5)

    assert len(whole.json()["items"]) == 150
    assert set(whole.json()) == {"items"}
    assert sized.status_code == 400
    assert sized.json()["message"] == "unknown parameter 'limit'"


def test_body_cursor_sits_at_its_dotted_path_beside_nested_records(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=NESTED_CURSOR, fanout=(5, 1), rate_calls=ROOMY))
    client = ProfileClient(NESTED_CURSOR, sim.url)

    first = client.get(f"{sim.url}/shelves", {"fields": "all"}).json()
    last = client.get(f"{sim.url}/shelves", {"fields": "all", "after": first["meta"]["next"]})

    assert list(first) == ["result", "meta"] and len(first["result"]["shelves"]) == 4
    assert last.json() == {
        "result": {"shelves": last.json()["result"]["shelves"]},
        "meta": {"next": None},
    }
    assert len(last.json()["result"]["shelves"]) == 1


def test_listing_params_are_required_with_the_profiles_values(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=NESTED_CURSOR, rate_calls=ROOMY))
    client = ProfileClient(NESTED_CURSOR, sim.url)

    missing = client.get(f"{sim.url}/shelves", {})
    wrong = client.get(f"{sim.url}/shelves", {"fields": "some"})
    right = client.get(f"{sim.url}/shelves", {"fields": "all"})

    assert (missing.status_code, wrong.status_code, right.status_code) == (400, 400, 200)
    assert missing.json()["message"] == "'fields' is required"
    assert wrong.json()["message"] == "'fields' must be 'all', not 'some'"


# -- the data call --------------------------------------------------------------------------


def test_unix_window_returns_points_from_inclusive_to_exclusive(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=FLEET, fanout=(1, 1, 1, 1), rate_calls=ROOMY))
    client = ProfileClient(FLEET, sim.url)
    [path] = sim.ground_truth(START, END)
    url = f"{sim.url}/api/channels/{encode_segment(path[3])}/readings"
    at = int(START.timestamp())

    first = {"per_page": "40", "page": "1"}

    # GIVEN a window from 00:30 to exactly 05:00
    page = client.get(url, {"start": str(at + 1800), "end": str(at + 5 * 3600), **first})
    rfc = client.get(url, {"start": "2024-03-01T00:00:00Z", "end": str(at), **first})
    reversed_ = client.get(url, {"start": str(at + 60), "end": str(at), **first})

    # THEN 01:00..04:00 come back, as Unix milliseconds
    times = [p["time"] for p in page.json()["readings"]]
    assert times == [(at + h * 3600) * 1000 for h in range(1, 5)]
    assert rfc.status_code == 400 and "'start' is not a Unix time" in rfc.json()["message"]
    assert reversed_.status_code == 400 and reversed_.json()["message"] == "'start' is after 'end'"


def test_unix_timestamps_are_numbers_and_the_truth_holds_their_point_text(simulator: Serve) -> None:
    # GIVEN points every 1.5 s, sent as Unix seconds (whole ones as integers)
    sim = simulator(
        SimulatorConfig(profile=HEADER_CURSOR, fanout=(1, 1), point_interval=1.5, rate_calls=ROOMY)
    )
    client = ProfileClient(HEADER_CURSOR, sim.url)
    [path] = sim.ground_truth(START, END)
    end = START + timedelta(seconds=6)

    points = client.fetch(
        HEADER_CURSOR.data.listing, {"book_id": path[1]}, window_params(HEADER_CURSOR, START, end)
    )

    assert points is not None
    at = START.timestamp()
    assert [p["at"] for p in points] == [int(at), at + 1.5, int(at + 3), at + 4.5]
    assert [type(p["at"]) for p in points] == [int, float, int, float]
    truth = sim.ground_truth(START, end)[path]
    assert [output_point(HEADER_CURSOR, p) for p in points] == truth
    assert [p["ts"] for p in truth] == [
        point_text(START + timedelta(seconds=1.5 * k)) for k in range(4)
    ]
    assert truth[1]["ts"] == "2024-03-01T00:00:01.500000Z"


def test_rfc3339_points_keep_the_profiles_field_names(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=ORBIT, fanout=(1, 1), rate_calls=ROOMY))
    client = ProfileClient(ORBIT, sim.url)
    [path] = sim.ground_truth(START, END)
    url = f"{sim.url}/v2/monitors/{path[1]}/series"

    body = client.get(
        url,
        {
            "since": "2024-03-01T00:00:00Z",
            "until": "2024-03-01T02:00:00Z",
            "limit": "25",
            "offset": "0",
        },
    ).json()
    hermes_names = client.get(
        url, {**window_params(HERMES, START, END), "limit": "25", "offset": "0"}
    )

    assert body == {
        "data": {
            "points": [
                {"timestamp": "2024-03-01T00:00:00Z", "v": body["data"]["points"][0]["v"]},
                {"timestamp": "2024-03-01T01:00:00Z", "v": body["data"]["points"][1]["v"]},
            ]
        }
    }
    assert hermes_names.status_code == 400
    assert hermes_names.json()["message"] == "unknown parameter 'from'"


# -- rate limit and status codes ------------------------------------------------------------


def test_rate_limit_uses_the_profiles_header_names_and_codes(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=ORBIT, rate_calls=2, rate_period=60.0))
    client = ProfileClient(ORBIT, sim.url)
    query = {"limit": "25", "offset": "0"}

    accepted = [client.get(f"{sim.url}/v2/accounts", query) for _ in range(2)]
    rejected = client.get(f"{sim.url}/v2/accounts", query)

    assert [r.headers["RateLimit-Remaining"] for r in accepted] == ["1", "0"]
    assert accepted[0].headers["RateLimit-Limit"] == "2"
    assert accepted[0].headers["RateLimit-Reset"] == "0"
    assert rejected.status_code == 429
    assert int(rejected.headers["Retry-After"]) >= 1
    assert 0 < float(rejected.headers["RateLimit-Reset"]) <= 60
    assert not any(name.startswith("X-RateLimit") for name in rejected.headers)
    assert sim.stats.rate_limited == 1


def test_rate_limit_sends_the_reset_as_an_epoch_second_and_its_own_code(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=HEADER_CURSOR, rate_calls=2, rate_period=60.0))
    client = ProfileClient(HEADER_CURSOR, sim.url)

    before = time.time()
    accepted = [client.get(f"{sim.url}/shelves", {}) for _ in range(2)]
    rejected = client.get(f"{sim.url}/shelves", {})
    after = time.time()

    # THEN a free slot is now, and a full window frees one a minute after its first call
    assert [r.status_code for r in accepted] == [200, 200]
    assert int(before) <= int(accepted[0].headers["X-Quota-Reset"]) <= after
    assert before + 59 <= int(accepted[1].headers["X-Quota-Reset"]) <= after + 61
    assert rejected.status_code == 420
    assert rejected.json() == {"error": "rate_limited"}
    assert before + 59 <= int(rejected.headers["X-Quota-Reset"]) <= after + 61
    assert int(rejected.headers["X-Retry-In"]) >= 1 and "Retry-After" not in rejected.headers
    assert (sim.stats.rate_limited, sim.stats.by_status) == (1, {200: 2, 420: 1})


def test_error_faults_answer_the_profiles_retried_codes_and_heal(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=HEADER_CURSOR, error_rate=1.0, rate_calls=ROOMY))
    client = ProfileClient(HEADER_CURSOR, sim.url)

    statuses = [client.get(f"{sim.url}/shelves", {}).status_code for _ in range(3)]

    assert set(statuses[:2]) <= {502, 503} and statuses[2] == 200


def test_truncated_body_heals_for_a_nested_record_path(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=ORBIT, truncate_rate=1.0, rate_calls=ROOMY))
    client = ProfileClient(ORBIT, sim.url)
    query = {"limit": "25", "offset": "0"}

    first = client.get(f"{sim.url}/v2/accounts", query)
    second = client.get(f"{sim.url}/v2/accounts", query)

    assert first.status_code == 200 and second.content.startswith(first.content)
    assert len(first.content) < len(second.content) and second.json()["results"]


def test_fail_permanently_fails_every_path_naming_the_entity_as_any_ancestor(
    simulator: Serve,
) -> None:
    sim = simulator(SimulatorConfig(profile=FLEET, fanout=(1, 1, 1, 1), rate_calls=ROOMY))
    client = ProfileClient(FLEET, sim.url)
    [(region, _, device, _)] = sim.ground_truth(START, END)
    url = (
        f"{sim.url}/api/regions/{encode_segment(region)}/devices/{encode_segment(device)}/channels"
    )

    sim.fail_permanently(region)
    failing = client.get(url, {}).status_code
    sim.heal()

    assert failing == 503
    assert client.get(url, {}).status_code == 200


def test_gone_entities_are_found_at_every_level_below_the_first(simulator: Serve) -> None:
    # GIVEN four levels with a third of everything below the regions gone
    sim = simulator(
        SimulatorConfig(profile=FLEET, fanout=(3, 3, 3, 3), gone_rate=0.3, rate_calls=ROOMY)
    )

    gone = sim.gone()
    truth = sim.ground_truth(START, END)

    # THEN sites, devices and channels are gone, never regions, and nothing under them is
    # in the truth
    assert {len(path) for path in gone} == {2, 3, 4}
    assert not any(path[: len(g)] == g for path in truth for g in gone)
    assert len(truth) + sum(3 ** (4 - len(g)) for g in gone) == 3**4


def test_gone_entities_answer_the_profiles_least_gone_code(simulator: Serve) -> None:
    sim = simulator(
        SimulatorConfig(profile=HEADER_CURSOR, fanout=(2, 6), gone_rate=0.5, rate_calls=ROOMY)
    )
    client = ProfileClient(HEADER_CURSOR, sim.url)
    [path, *_] = sorted(sim.gone())

    response = client.get(
        f"{sim.url}/books/{encode_segment(path[1])}/pages", window_params(HEADER_CURSOR, START, END)
    )

    assert response.status_code == 410
    assert response.json() == {"error": "not_found"}


# -- config, ground truth and the child process ---------------------------------------------


def test_sizes_default_per_depth_and_fanout_must_match_the_levels() -> None:
    one = parsed(
        "one",
        levels=[{"name": "things", "key": "thing", "path": "/things", "id": "id"}],
        data={"path": "/things/{thing}/points"},
    )
    config = SimulatorConfig(troops=2, warriors_per_troop=3, data_groups_per_warrior=4)

    assert config.sizes == (2, 3, 4)
    assert replace(config, profile=ORBIT).sizes == (2, 4)
    assert replace(config, profile=FLEET).sizes == (2, 3, 3, 4)
    assert replace(config, profile=one).sizes == (2,)
    assert replace(config, profile=FLEET, fanout=(1, 2, 3, 4)).sizes == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="4 levels"):
        replace(config, profile=FLEET, fanout=(1, 2, 3))


def test_profiles_the_simulator_cannot_serve_are_refused_at_start() -> None:
    # A profile no body could answer is refused when it is read (tests/test_profile.py);
    # one the client can follow but the simulator does not serve, when it starts.
    partial = parsed("partial", data={"path": "/books/id-{book_id}/pages"})
    with pytest.raises(ConfigError, match="whole segment"):
        Simulator(SimulatorConfig(profile=partial))


def test_profiles_no_body_could_answer_are_refused_when_read() -> None:
    points = {"ts": "at", "value": "at.value"}
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {
                "levels": [
                    {"name": "things", "key": "thing", "path": "/things", "id": "id", "records": ""}
                ],
                "data": {"path": "/things/{thing}/points"},
            },
            "leaves no place for the cursor",
        ),
        ({"pagination": {"cursor_field": "items.next"}}, "overlap"),
        ({"data": {"path": "/books/{book_id}/pages", "points": points}}, "overlap"),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigError, match=message):
            parsed("refused", **changes)


def test_truth_endpoint_rows_are_keyed_by_the_profiles_level_keys(simulator: Serve) -> None:
    sim = simulator(SimulatorConfig(profile=FLEET, fanout=(2, 1, 1, 2), rate_calls=ROOMY))

    rows = requests.get(
        f"{sim.url}/_sim/truth", params=window_params(HERMES, START, END), timeout=5
    ).json()

    assert all(
        list(row) == ["region_id", "site_id", "device_id", "channel_id", "points"] for row in rows
    )
    assert {tuple(row[k] for k in FLEET.keys): row["points"] for row in rows} == sim.ground_truth(
        START, END
    )


class MemorySink:
    location = "memory"

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, key: str, blob: bytes, content_type: str) -> str:
        self.blobs[key] = blob
        return key

    def get(self, key: str) -> bytes | None:
        return self.blobs.get(key)

    def keys(self, prefix: str) -> Iterator[str]:
        return iter(sorted(k for k in self.blobs if k.startswith(prefix)))


def test_check_compares_output_keyed_by_the_profiles_level_keys() -> None:
    sim = Simulator(SimulatorConfig(profile=ORBIT, fanout=(1, 3)))
    window = Window(START, END)
    truth = sim.ground_truth(START, END)
    sink = MemorySink()
    for n, (path, points) in enumerate(truth.items()):
        record: dict[str, Any] = {
            "run_id": window.run_id,
            **dict(zip(ORBIT.keys, path, strict=True)),
            "from": "",
            "to": "",
            "points": points,
        }
        write_records(sink, window.run_id, str(n), [record])

    assert sim.check(sink, window.run_id, window).exact

    # WHEN the first record is written again with an integer id instead of its decimal text
    (account, monitor), points = next(iter(truth.items()))
    record = {
        "run_id": window.run_id,
        "account_id": account,
        "monitor_id": int(monitor),
        "points": points,
    }
    write_records(sink, window.run_id, "0", [record])
    comparison = sim.check(sink, window.run_id, window)

    # THEN it is unexpected and the right one missing
    assert comparison.missing == [(account, monitor)]
    assert comparison.unexpected == [(account, int(monitor))]  # type: ignore[comparison-overlap]
    assert compare(sink, window.run_id, truth, keys=ORBIT.keys) == comparison
    assert "records" in compare(MemorySink(), "r", {}).describe()


def test_config_travels_as_json_with_its_profile_by_file() -> None:
    config = SimulatorConfig(profile=FLEET, fanout=(1, 2, 3, 4), seed=3, nasty_ids=True)

    again = SimulatorConfig.from_json(config.to_json())

    assert again == config
    assert json.loads(config.to_json())["profile"] == FLEET.source
    with pytest.raises(ValueError, match="built in code"):
        SimulatorConfig(profile=UNPAGED).to_json()


def test_simulator_process_serves_the_profile_it_was_given() -> None:
    config = SimulatorConfig(profile=FLEET, fanout=(2, 1, 1, 2), rate_calls=ROOMY, nasty_ids=True)
    with SimulatorProcess(config) as process:
        client = ProfileClient(FLEET, process.url)
        results, gone, _ = harvest(client)

        assert results == process.ground_truth(START, END)
        assert not gone and len(results) == 4
        assert client.calls == process.expected_calls(START, END)
        assert process.stats()["by_status"] == {"200": client.calls}
