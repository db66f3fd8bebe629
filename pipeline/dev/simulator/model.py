"""The simulated vendor's data (contract v1): a deterministic tree, its points and pages.

The tree is deterministic from the seed and sized exactly by the config:
``troops`` troops, each with exactly ``warriors_per_troop`` warriors, each with exactly
``data_groups_per_warrior`` data groups, and one point per data group at every multiple of
``point_interval`` seconds since the Unix epoch. `VendorModel` answers the four listings, page
by page with signed cursors, and says what a correct harvest of a window yields.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
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


class BadRequestError(Exception):
    """A request the vendor answers with 400."""


def _digest(*parts: object) -> bytes:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()


def draw(*parts: object) -> float:
    """A deterministic number in [0, 1) for the given parts."""
    return int.from_bytes(_digest(*parts), "big") / 2**64


def dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def error_body(error: str, message: str | None = None) -> bytes:
    body: dict[str, str] = {"error": error}
    if message is not None:
        body["message"] = message
    return dumps(body).encode()


def _pages(items: int, page_size: int) -> int:
    """Calls needed to list `items` items: an empty list still takes one call."""
    return max(1, math.ceil(items / page_size))


def _micros(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // _MICROSECOND


@functools.lru_cache(maxsize=4096)
def _date_text(day: int) -> str:
    value = EPOCH + timedelta(days=day)
    return f"{value.year:04d}-{value.month:02d}-{value.day:02d}"


def _format_ts(micros: int) -> str:
    """RFC 3339 UTC with a 'Z'; fractional seconds only when there are any."""
    seconds, fraction = divmod(micros, 1_000_000)
    day, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{_date_text(day)}T{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{clock}.{fraction:06d}Z" if fraction else f"{clock}Z"


def parse_instant(name: str, text: str | None) -> int:
    """An RFC 3339 instant as microseconds since the epoch; 400 if it is not one."""
    if text is None:
        raise BadRequestError(f"'{name}' is required")
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise BadRequestError(f"'{name}' is not an RFC 3339 instant: {text!r}")
    whole, fraction, offset = match.groups()
    fraction = (fraction or "0")[:6].ljust(6, "0")
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        value = datetime.fromisoformat(f"{whole}.{fraction}{offset}")
    except ValueError as exc:
        raise BadRequestError(f"'{name}' is not an RFC 3339 instant: {text!r}") from exc
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
            self.troops.append(_Troop(troop_id, dumps({"id": troop_id, "name": f"Troop {t}"})))
            warriors = self.warriors_of[troop_id] = []
            for w in range(config.warriors_per_troop):
                warrior_id = make_id("warrior", f"{t}-{w}")
                warrior_gone = draw(config.seed, "gone", warrior_id) < config.gone_rate
                warrior = _Warrior(
                    warrior_id,
                    troop_id,
                    warrior_gone,
                    dumps({"id": warrior_id, "troop_id": troop_id, "name": f"svc-{t}-{w}"}),
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
                    group_gone = draw(config.seed, "gone", group_id) < config.gone_rate
                    group = _DataGroup(
                        group_id, warrior_id, troop_id, warrior_gone or group_gone, dumps(item)
                    )
                    groups.append(group)
                    self.data_groups[group_id] = group

    def reachable_groups(self) -> Iterator[_DataGroup]:
        """Data groups a harvest lists: those under warriors that are not gone."""
        for troop in self.troops:
            for warrior in self.warriors_of[troop.id]:
                if not warrior.gone:
                    yield from self.data_groups_of[warrior.id]


class VendorModel:
    """The vendor's entities and what it answers for them, built once from the config."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.tree = _Tree(config)
        self._cursor_key = _digest(config.seed, "cursor-key")

    def ground_truth(
        self, start: datetime, end: datetime
    ) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
        """Every data group a correct harvest of [start, end) yields, with its points by ts."""
        first, count = self._point_range(_micros(start), _micros(end))
        truth: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for group in self.tree.reachable_groups():
            if group.gone:
                continue
            truth[(group.troop_id, group.warrior_id, group.id)] = [
                {"ts": ts, "value": value}
                for ts, value in self._points(group.id, first, first + count)
            ]
        return truth

    def gone(self) -> set[tuple[str, ...]]:
        """What a harvest finds gone: (troop, warrior) and (troop, warrior, data group) paths.

        Data groups under a gone warrior answer 404 too, but a harvest never lists them, so they
        are not here.
        """
        found: set[tuple[str, ...]] = set()
        for troop in self.tree.troops:
            for warrior in self.tree.warriors_of[troop.id]:
                if warrior.gone:
                    found.add((troop.id, warrior.id))
                    continue
                for group in self.tree.data_groups_of[warrior.id]:
                    if group.gone:
                        found.add((troop.id, warrior.id, group.id))
        return found

    def expected_calls(self, start: datetime, end: datetime) -> int:
        """Calls (200 or 404) a perfect harvest of [start, end) makes with limit=page_size."""
        size = self.config.page_size
        _, points = self._point_range(_micros(start), _micros(end))
        calls = _pages(len(self.tree.troops), size)
        for troop in self.tree.troops:
            warriors = self.tree.warriors_of[troop.id]
            calls += _pages(len(warriors), size)
            for warrior in warriors:
                calls += (
                    1 if warrior.gone else _pages(len(self.tree.data_groups_of[warrior.id]), size)
                )
        for group in self.tree.reachable_groups():
            calls += 1 if group.gone else _pages(points, size)
        return calls

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

    def answer(
        self, kind: str, entity_id: str | None, params: dict[str, str], segments: list[str]
    ) -> tuple[int, bytes]:
        tree = self.tree
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
                return 404, error_body("not_found")
            limit, offset = self._page(params, segments, len(items))
            return 200, self._page_body(
                items[offset : offset + limit], params, segments, offset + limit, len(items)
            )

        group = tree.data_groups.get(entity_id or "")
        if group is None or group.gone:
            return 404, error_body("not_found")
        start_us = parse_instant("from", params.get("from"))
        end_us = parse_instant("to", params.get("to"))
        if start_us > end_us:
            raise BadRequestError("'from' is after 'to'")
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
            raise BadRequestError(f"'limit' must be an integer from 1 to {self.config.page_size}")
        else:
            limit = int(text)
        cursor = params.get("cursor")
        if cursor is None:
            return limit, 0
        offset = self._decode_cursor(cursor, params, segments)
        if offset is None or not 0 < offset < total:
            raise BadRequestError("invalid cursor for this path and query")
        return limit, offset

    def _binding(self, params: dict[str, str], segments: list[str], offset: int) -> str:
        query = sorted((name, value) for name, value in params.items() if name != "cursor")
        material = dumps([segments, query, offset])
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
            dumps(self._encode_cursor(params, segments, after)) if after < total else "null"
        )
        return f'{{"items":[{",".join(items)}],"next_cursor":{next_cursor}}}'.encode()
