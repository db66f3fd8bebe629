"""The vendor simulator follows the contract in shared/vendor-api.md, over real HTTP."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote

import pytest
import requests

from pipeline.dev.simulator import Simulator, SimulatorConfig, SimulatorProcess

START = datetime(2024, 3, 1, tzinfo=UTC)
END = datetime(2024, 3, 2, tzinfo=UTC)
WINDOW = {"from": "2024-03-01T00:00:00Z", "to": "2024-03-02T00:00:00Z"}
# Rate limit out of the way unless a test is about it.
ROOMY = SimulatorConfig(troops=3, warriors_per_troop=2, data_groups_per_warrior=2, rate_calls=10**6)


def seg(entity_id: str) -> str:
    return quote(entity_id, safe="")


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        http.headers["Authorization"] = "Bearer sim-token"
        yield http


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(ROOMY) as simulator:
        yield simulator


def fetch_all(
    http: requests.Session, url: str, **params: Any
) -> tuple[list[dict[str, Any]] | None, int]:
    """Every item of a paginated list (None if the entity is gone), and the calls it took."""
    items: list[dict[str, Any]] = []
    query = dict(params)
    calls = 0
    while True:
        response = http.get(url, params=query, timeout=5)
        calls += 1
        if response.status_code == 404 and calls == 1:
            return None, calls
        assert response.status_code == 200, response.text
        page = response.json()
        items.extend(page["items"])
        if page["next_cursor"] is None:
            return items, calls
        query = {**params, "cursor": page["next_cursor"]}


def walk(http: requests.Session, url: str, **params: Any) -> tuple[list[dict[str, Any]], int]:
    """Every item of a paginated list that must exist, and the calls it took."""
    items, calls = fetch_all(http, url, **params)
    assert items is not None, url
    return items, calls


def harvest(
    http: requests.Session, base: str, limit: int
) -> tuple[dict[tuple[str, str, str], list[dict[str, Any]]], set[tuple[str, ...]], int]:
    """A plain sequential harvest: (results, gone paths, calls made)."""
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    gone: set[tuple[str, ...]] = set()
    troops, calls = walk(http, f"{base}/v1/troops", limit=limit)
    for troop in troops:
        warriors, n = walk(http, f"{base}/v1/troops/{seg(troop['id'])}/warriors", limit=limit)
        calls += n
        for warrior in warriors:
            url = f"{base}/v1/warriors/{seg(warrior['id'])}/data-groups"
            groups, n = fetch_all(http, url, limit=limit)
            calls += n
            if groups is None:
                gone.add((troop["id"], warrior["id"]))
                continue
            for group in groups:
                key = (troop["id"], warrior["id"], group["id"])
                url = f"{base}/v1/data-groups/{seg(group['id'])}/data"
                points, n = fetch_all(http, url, **WINDOW, limit=limit)
                calls += n
                if points is None:
                    gone.add(key)
                else:
                    results[key] = points
    return results, gone, calls


def test_auth_rejected_when_token_missing_or_wrong(sim: Simulator) -> None:
    # GIVEN no token, then a wrong one
    missing = requests.get(f"{sim.url}/v1/troops", timeout=5)
    wrong = requests.get(
        f"{sim.url}/v1/troops", headers={"Authorization": "Bearer nope"}, timeout=5
    )

    # THEN both are 401 and neither took a slot of the rate limit
    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json() == {"error": "unauthorized"}
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["X-RateLimit-Remaining"] == str(ROOMY.rate_calls)
    assert sim.stats.max_in_window == 0


def test_pagination_walks_all_items_when_limit_is_small(
    sim: Simulator, session: requests.Session
) -> None:
    whole, _ = walk(session, f"{sim.url}/v1/troops")
    paged, calls = walk(session, f"{sim.url}/v1/troops", limit=1)

    assert len(whole) == ROOMY.troops
    assert paged == whole
    assert calls == ROOMY.troops


def test_pagination_rejects_cursor_when_garbled_or_from_another_query(
    sim: Simulator, session: requests.Session
) -> None:
    first = session.get(f"{sim.url}/v1/troops", params={"limit": 1}, timeout=5).json()
    cursor = first["next_cursor"]
    troop_id = first["items"][0]["id"]

    attempts = [
        (f"{sim.url}/v1/troops", {"limit": 1, "cursor": "not-a-cursor"}),
        (f"{sim.url}/v1/troops", {"limit": 1, "cursor": cursor + "x"}),
        (f"{sim.url}/v1/troops", {"limit": 2, "cursor": cursor}),  # another query
        (f"{sim.url}/v1/troops/{seg(troop_id)}/warriors", {"limit": 1, "cursor": cursor}),
    ]
    for url, params in attempts:
        response = session.get(url, params=params, timeout=5)
        assert response.status_code == 400, (url, params)
        assert response.json()["error"] == "bad_request"
        assert response.json()["message"]
    assert session.get(f"{sim.url}/v1/troops", params={"limit": 1, "cursor": cursor}).ok


@pytest.mark.parametrize("limit", ["0", "101", "abc", "-1", "1.5"])
def test_pagination_rejects_limit_when_out_of_range(
    sim: Simulator, session: requests.Session, limit: str
) -> None:
    response = session.get(f"{sim.url}/v1/troops", params={"limit": limit}, timeout=5)

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


def test_nasty_ids_round_trip_when_percent_encoded(session: requests.Session) -> None:
    config = replace(ROOMY, nasty_ids=True)
    with Simulator(config) as sim:
        results, gone, _ = harvest(session, sim.url, limit=100)

        ids = [part for key in results for part in key]
        assert results == sim.ground_truth(START, END)
        assert not gone
    assert (
        len(results) == config.troops * config.warriors_per_troop * config.data_groups_per_warrior
    )
    assert all(1 <= len(i) <= 128 and i.isprintable() for i in ids)
    assert all("/" in i and " " in i and ".." in i and not i.isascii() for i in ids)
    assert all(any(piece in i for i in ids) for piece in ("?", "#", "%", "+", "%2F", "%25"))


def test_nasty_ids_miss_when_sent_unencoded(session: requests.Session) -> None:
    with Simulator(replace(ROOMY, nasty_ids=True)) as sim:
        troops, _ = walk(session, f"{sim.url}/v1/troops")

        for troop in troops:
            response = session.get(f"{sim.url}/v1/troops/{troop['id']}/warriors", timeout=5)
            assert response.status_code in (400, 404), troop["id"]


def test_data_returns_points_in_window_when_from_and_to_given(
    sim: Simulator, session: requests.Session
) -> None:
    truth = sim.ground_truth(START, END)
    group_id = next(iter(truth))[2]
    url = f"{sim.url}/v1/data-groups/{seg(group_id)}/data"

    # GIVEN a window that starts mid-interval and ends exactly on a point
    window = {"from": "2024-03-01T00:30:00Z", "to": "2024-03-01T05:00:00+00:00"}
    points, _ = walk(session, url, **window)

    # THEN only 01:00..04:00 come back: from <= ts < to
    assert [p["ts"] for p in points] == [f"2024-03-01T0{h}:00:00Z" for h in range(1, 5)]
    assert all(isinstance(p["value"], float) for p in points)
    assert points == truth[next(iter(truth))][1:5]


@pytest.mark.parametrize(
    "window",
    [
        {"to": "2024-03-02T00:00:00Z"},
        {"from": "2024-03-01T00:00:00Z"},
        {"from": "yesterday", "to": "2024-03-02T00:00:00Z"},
        {"from": "2024-03-01T00:00:00", "to": "2024-03-02T00:00:00Z"},  # no offset
        {"from": "2024-03-02T00:00:00Z", "to": "2024-03-01T00:00:00Z"},  # reversed
    ],
)
def test_data_rejects_request_when_window_missing_or_malformed(
    sim: Simulator, session: requests.Session, window: dict[str, str]
) -> None:
    group_id = next(iter(sim.ground_truth(START, END)))[2]

    response = session.get(
        f"{sim.url}/v1/data-groups/{seg(group_id)}/data", params=window, timeout=5
    )

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


def test_unknown_paths_answer_404_with_rate_headers(
    sim: Simulator, session: requests.Session
) -> None:
    for path in ("/v1/nope", "/v1/troops/unknown/warriors", "/v1/troops/", "/v2/troops"):
        response = session.get(f"{sim.url}{path}", timeout=5)
        assert response.status_code == 404, path
        assert response.json() == {"error": "not_found"}
        assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(
            response.headers
        )


def test_rate_limit_answers_429_with_retry_after_when_exceeded(session: requests.Session) -> None:
    with Simulator(replace(ROOMY, rate_calls=3, rate_period=60.0)) as sim:
        accepted = [session.get(f"{sim.url}/v1/troops", timeout=5) for _ in range(3)]
        rejected = session.get(f"{sim.url}/v1/troops", timeout=5)

        assert [r.headers["X-RateLimit-Remaining"] for r in accepted] == ["2", "1", "0"]
        assert accepted[0].headers["X-RateLimit-Reset"] == "0"
        assert accepted[0].headers["X-RateLimit-Limit"] == "3"
        assert rejected.status_code == 429
        assert rejected.json() == {"error": "rate_limited"}
        assert int(rejected.headers["Retry-After"]) >= 1
        assert rejected.headers["X-RateLimit-Remaining"] == "0"
        assert 0 < float(rejected.headers["X-RateLimit-Reset"]) <= 60
        assert sim.stats.rate_limited == 1
        assert sim.stats.max_in_window == 3


def test_rate_limit_ignores_rejected_requests_when_counting(session: requests.Session) -> None:
    # GIVEN a full window of 2 calls per 0.3 s
    with Simulator(replace(ROOMY, rate_calls=2, rate_period=0.3)) as sim:
        for _ in range(2):
            assert session.get(f"{sim.url}/v1/troops", timeout=5).ok

        # WHEN the client keeps knocking; if rejections counted, the window would never clear
        deadline = time.monotonic() + 5
        statuses: list[int] = []
        while time.monotonic() < deadline:
            statuses.append(session.get(f"{sim.url}/v1/troops", timeout=5).status_code)
            if statuses[-1] == 200:
                break
            time.sleep(0.01)

        # THEN a slot opens once the first accepted calls leave the window
        assert statuses[-1] == 200
        assert 429 in statuses
        assert sim.stats.max_in_window <= 2


def paced_statuses(
    session: requests.Session, monkeypatch: pytest.MonkeyPatch, config: SimulatorConfig
) -> tuple[list[int], int]:
    """Statuses of 60 calls sent just slower than L per W, on a clock the test drives (the
    rate limit's only), and the most calls the vendor then counted in one window."""
    now = [1000.0]
    monkeypatch.setattr(
        "pipeline.dev.simulator.faults.time", SimpleNamespace(monotonic=lambda: now[0])
    )
    spacing = config.rate_period / config.rate_calls * 1.001
    with Simulator(config) as sim:
        statuses = []
        for k in range(60):
            now[0] = 1000.0 + k * spacing
            statuses.append(session.get(f"{sim.url}/v1/troops", timeout=5).status_code)
        return statuses, sim.stats.max_in_window


def test_rate_limit_accepts_calls_paced_at_the_limit_when_arrivals_do_not_jitter(
    session: requests.Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    statuses, busiest = paced_statuses(session, monkeypatch, replace(ROOMY, rate_calls=10))

    assert set(statuses) == {200}
    assert busiest == 10


def test_rate_limit_rejects_calls_paced_at_the_limit_when_arrivals_jitter(
    session: requests.Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a vendor whose arrival stamps lag by up to 20 ms
    config = replace(ROOMY, rate_calls=10, arrival_jitter=0.02)

    # WHEN a client sends calls just slower than 10 per second
    statuses, busiest = paced_statuses(session, monkeypatch, config)

    # THEN some arrive crowded into a window and draw 429s, and no window holds 11
    assert 429 in statuses
    assert statuses.count(200) > 40
    assert busiest == 10


def test_faults_heal_when_max_failures_per_path_reached(session: requests.Session) -> None:
    with Simulator(replace(ROOMY, error_rate=1.0, max_failures_per_path=2)) as sim:
        statuses = [session.get(f"{sim.url}/v1/troops", timeout=5).status_code for _ in range(3)]
        other = session.get(f"{sim.url}/v1/troops", params={"limit": 1}, timeout=5).status_code

    assert all(s in (500, 502, 503, 504) for s in statuses[:2])
    assert statuses[2] == 200
    assert other in (500, 502, 503, 504)  # another query is another path with its own faults


def test_truncated_body_heals_when_retried(session: requests.Session) -> None:
    with Simulator(replace(ROOMY, truncate_rate=1.0)) as sim:
        first = session.get(f"{sim.url}/v1/troops", timeout=5)
        second = session.get(f"{sim.url}/v1/troops", timeout=5)

    assert first.status_code == 200
    assert int(first.headers["Content-Length"]) == len(first.content)
    with pytest.raises(json.JSONDecodeError):
        json.loads(first.content)
    assert second.json()["items"]
    assert second.content.startswith(first.content)


def test_stall_heals_when_client_times_out_and_retries(session: requests.Session) -> None:
    with Simulator(replace(ROOMY, stall_rate=1.0, stall_seconds=2.0)) as sim:
        with pytest.raises(requests.Timeout):
            session.get(f"{sim.url}/v1/troops", timeout=0.2)
        began = time.monotonic()
        retried = session.get(f"{sim.url}/v1/troops", timeout=5)

    assert retried.status_code == 200
    assert time.monotonic() - began < 1.0


def test_fail_permanently_answers_503_until_healed(
    sim: Simulator, session: requests.Session
) -> None:
    troop_id = walk(session, f"{sim.url}/v1/troops")[0][0]["id"]
    url = f"{sim.url}/v1/troops/{seg(troop_id)}/warriors"

    sim.fail_permanently(troop_id)
    failing = [session.get(url, timeout=5).status_code for _ in range(4)]
    sim.heal()

    assert failing == [503] * 4
    assert session.get(url, timeout=5).status_code == 200


def test_gone_entities_answer_404_and_are_left_out_of_ground_truth(
    session: requests.Session,
) -> None:
    config = replace(ROOMY, troops=4, warriors_per_troop=4, data_groups_per_warrior=4)
    with Simulator(replace(config, gone_rate=0.25)) as sim:
        gone = sim.gone()
        truth = sim.ground_truth(START, END)
        assert {len(path) for path in gone} == {2, 3}  # some warriors, some data groups

        for path in gone:
            url = (
                f"{sim.url}/v1/warriors/{seg(path[1])}/data-groups"
                if len(path) == 2
                else f"{sim.url}/v1/data-groups/{seg(path[2])}/data"
            )
            response = session.get(url, params=WINDOW if len(path) == 3 else None, timeout=5)
            assert response.status_code == 404
            assert response.json() == {"error": "not_found"}

    gone_warriors = {path[1] for path in gone if len(path) == 2}
    assert not any(key in gone or key[1] in gone_warriors for key in truth)
    all_groups = config.troops * config.warriors_per_troop * config.data_groups_per_warrior
    under_gone = len(gone_warriors) * config.data_groups_per_warrior
    assert len(truth) == all_groups - under_gone - sum(len(p) == 3 for p in gone)


def test_ground_truth_is_deterministic_when_seed_is_the_same() -> None:
    config = replace(ROOMY, gone_rate=0.2, nasty_ids=True)

    one = Simulator(config).ground_truth(START, END)
    two = Simulator(config).ground_truth(START, END)
    other = Simulator(replace(config, seed=8)).ground_truth(START, END)

    assert one == two
    assert Simulator(config).gone() == Simulator(config).gone()
    assert set(one) != set(other)


def test_truth_endpoint_serves_ground_truth_without_auth(sim: Simulator) -> None:
    response = requests.get(f"{sim.url}/_sim/truth", params=WINDOW, timeout=5)
    stats = requests.get(f"{sim.url}/_sim/stats", timeout=5).json()

    served = {
        (row["troop_id"], row["warrior_id"], row["data_group_id"]): row["points"]
        for row in response.json()
    }
    assert served == sim.ground_truth(START, END)
    assert stats["requests"] == 0  # out-of-band calls are not vendor traffic


def test_expected_calls_match_a_sequential_harvest_when_paginated_with_gone(
    session: requests.Session,
) -> None:
    # GIVEN small pages so every level paginates, and some gone entities
    config = replace(
        ROOMY,
        troops=3,
        warriors_per_troop=3,
        data_groups_per_warrior=3,
        point_interval=3600.0,
        page_size=5,
        gone_rate=0.2,
    )
    with Simulator(config) as sim:
        # WHEN a plain harvest walks the tree
        results, gone, calls = harvest(session, sim.url, limit=config.page_size)

        # THEN it made exactly the calls the simulator predicts and found exactly the truth
        assert calls == sim.expected_calls(START, END)
        assert sim.stats.by_status.get(200, 0) + sim.stats.by_status.get(404, 0) == calls
        assert results == sim.ground_truth(START, END)
        assert gone == sim.gone()
        assert gone


def _task_nices(pid: int) -> list[int]:
    """The niceness of every thread of process `pid` (field 19 of /proc/PID/task/TID/stat);
    a thread that ends while they are read is left out."""
    nices = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # The command name (field 2) is in parentheses and may hold spaces: split after it.
        nices.append(int(stat.rpartition(")")[2].split()[16]))
    return nices


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_a_simulator_process_runs_every_thread_at_the_niceness_asked_for() -> None:
    # GIVEN a niceness above this process's (raising it needs no privilege)
    wanted = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    simulator = SimulatorProcess(SimulatorConfig(troops=1, rate_calls=10**6), nice=wanted)

    # WHEN it starts and serves a request on a connection kept open (its main thread, its
    # server's and the connection's handler all exist then)
    with simulator, requests.Session() as session:
        session.get(f"{simulator.url}/_sim/stats", timeout=10).raise_for_status()
        process = simulator._process
        assert process is not None
        nices = _task_nices(process.pid)

    # THEN it says what it got, and every thread of the child runs at it
    assert simulator.nice == wanted
    assert len(nices) >= 3
    assert set(nices) == {wanted}
