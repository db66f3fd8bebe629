"""The simulated vendor's data: a deterministic tree of any profile's levels, its points, pages.

The tree is deterministic from the seed and sized exactly by the config: ``sizes[0]`` entities
of the profile's first level, exactly ``sizes[i]`` children under every entity of level
``i - 1``, and one point per entity of the last level (a leaf) at every multiple of
``point_interval`` seconds since the Unix epoch. With the default profile (hermes-v1, the
contract in vendor-api.md) that is ``troops`` troops, each with ``warriors_per_troop``
warriors, each with ``data_groups_per_warrior`` data groups. `VendorModel` routes a request
to the listing its path names, answers it page by page as the profile pages, and says what a
correct harvest of a window yields.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import hashlib
import json
import math
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlencode

from pipeline.errors import ConfigError
from pipeline.profile import (
    Level,
    Listing,
    PaginationKind,
    Profile,
    TimeFormat,
    placeholders,
)
from pipeline.profile import load as load_profile

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
ERROR_STATUSES = (500, 502, 503, 504)
ERROR_NAMES = {500: "internal", 502: "bad_gateway", 503: "unavailable", 504: "gateway_timeout"}
# The word an id starts with, by level key: the key without "_id", but Hermes' data groups
# have always been "dg-...".
_ID_KINDS = {"data_group_id": "dg"}


@dataclass(frozen=True)
class SimulatorConfig:
    """What the simulated vendor serves and how it misbehaves."""

    seed: int = 7
    troops: int = 5
    warriors_per_troop: int = 6  # exactly this many under every troop
    data_groups_per_warrior: int = 8  # exactly this many under every warrior
    point_interval: float = 3600.0  # seconds between points, aligned to the epoch
    # The most items a page holds, and its size when a request names none; 0: each
    # listing's own `page_size` in the profile (100 on every Hermes listing).
    page_size: int = 0
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
    # Share of the entities of every level below the first that are listed but answer gone.
    gone_rate: float = 0.0
    nasty_ids: bool = False  # ids with '/', '?', '#', '%', '+', spaces, '..', non-ASCII
    max_failures_per_path: int = 2  # attempts an error-faulty request fails before it heals
    # The vendor: its levels, paths, auth, pagination, fields, headers and status codes.
    profile: Profile = field(default_factory=load_profile)
    # Entities of the first level, then children under every entity of each level below;
    # one number a level. Empty: see `sizes`.
    fanout: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        depth = len(self.profile.levels)
        if self.fanout and len(self.fanout) != depth:
            raise ValueError(
                f"fanout {self.fanout} has {len(self.fanout)} numbers; profile "
                f"{self.profile.name!r} has {depth} levels"
            )
        if any(n < 0 for n in self.sizes):
            raise ValueError(f"fanout {self.sizes} has a negative number")

    @property
    def sizes(self) -> tuple[int, ...]:
        """`fanout`, or when empty: `troops` entities of the first level, `warriors_per_troop`
        under every entity of each middle level and `data_groups_per_warrior` under every
        entity of the level above the last; a one-level profile has `troops` entities."""
        if self.fanout:
            return self.fanout
        depth = len(self.profile.levels)
        if depth == 1:
            return (self.troops,)
        return (self.troops, *[self.warriors_per_troop] * (depth - 2), self.data_groups_per_warrior)

    def to_json(self) -> str:
        """The config as one line of JSON, its profile by file (`SimulatorProcess`)."""
        if not self.profile.source:
            raise ValueError(
                f"profile {self.profile.name!r} was built in code: a simulator in another"
                " process needs a profile read from a file"
            )
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["profile"] = self.profile.source
        data["fanout"] = list(self.fanout)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> SimulatorConfig:
        data = json.loads(text)
        data["profile"] = load_profile(data.get("profile", ""))
        data["fanout"] = tuple(data.get("fanout", ()))
        return cls(**data)


# How many refusals by the rate limit SimulatorStats keeps the window of.
REFUSALS_KEPT = 20
PAUSE_KEPT_SECONDS = 0.002


@dataclass
class SimulatorStats:
    """Counters of the vendor requests the simulator answered; safe to share between threads."""

    requests: int = 0  # every vendor request, refused (auth) and rate-limited ones included
    by_status: dict[int, int] = field(default_factory=dict)
    rate_limited: int = 0  # rate-limited responses (429 for Hermes)
    max_in_window: int = 0  # most accepted requests seen in one rolling window of the current W
    # The first REFUSALS_KEPT refusals by the rate limit: when (the simulator's monotonic
    # clock), and the stamps of the accepted requests that filled the window, in order.
    refusals: list[dict[str, Any]] = field(default_factory=list)
    # Garbage collections in the simulator's process that held every thread for at least
    # PAUSE_KEPT_SECONDS: (start on the monotonic clock, seconds), all of them.
    pauses: list[tuple[float, float]] = field(default_factory=list)
    # When the first and the last vendor request came (the monotonic clock), 0.0 before any.
    first_at: float = 0.0
    last_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, status: int, rate_limited: bool | None = None) -> None:
        """Count one response; `rate_limited` None means "if the status is 429"."""
        now = time.monotonic()
        with self._lock:
            self.requests += 1
            self.first_at = self.first_at or now
            self.last_at = now
            self.by_status[status] = self.by_status.get(status, 0) + 1
            if status == 429 if rate_limited is None else rate_limited:
                self.rate_limited += 1

    def refused(self, at: float, stamps: list[float]) -> None:
        """A request the rate limit refused at `at`; `stamps`, the window that was full."""
        with self._lock:
            if len(self.refusals) < REFUSALS_KEPT:
                self.refusals.append({"at": at, "stamps": stamps})

    def paused(self, at: float, seconds: float) -> None:
        """A long garbage collection: called from gc's callback on whatever thread allocated,
        maybe one holding `_lock`, so no lock here (list.append is atomic)."""
        self.pauses.append((at, seconds))

    def observe_window(self, in_window: int) -> None:
        with self._lock:
            self.max_in_window = max(self.max_in_window, in_window)

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.by_status = {}
            self.rate_limited = 0
            self.max_in_window = 0
            self.refusals = []
            self.pauses = []
            self.first_at = self.last_at = 0.0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "requests": self.requests,
                "by_status": dict(self.by_status),
                "rate_limited": self.rate_limited,
                "max_in_window": self.max_in_window,
                "refusals": list(self.refusals),
                "pauses": self.pauses[:],  # one C-level copy: an append meanwhile is safe
                "first_at": self.first_at,
                "last_at": self.last_at,
            }


@dataclass(frozen=True, slots=True)
class _Entity:
    id: str  # as text: its path segment (decoded) and its id in the output
    value: str | int  # as listed (an int when the level's ids are numeric)
    path: tuple[str, ...]  # ids from the first level down to this entity's own
    gone: bool  # answers gone, on its own or because an ancestor is gone
    item: str  # the listed record's JSON text, serialised once


@dataclass(frozen=True)
class Route:
    """What a vendor path names: listing `depth` (level `depth`'s listing, or the data call
    when `depth` is the number of levels) and the ids of its placeholders, decoded."""

    depth: int
    ids: Mapping[str, str]


@dataclass(frozen=True)
class Page:
    """A model's answer: status, body and the headers it carries (a next cursor or link)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Codes:
    """The status the simulator answers each way, from the profile's `[status]` table: the
    least code of each class, and the 5xx faults drawn from its retried ones."""

    gone: int = 404  # an unknown path, or an entity that is gone
    auth: int = 401  # a missing or wrong token
    rate_limited: int = 429
    poison: int = 400  # bad parameters or cursor
    errors: tuple[int, ...] = ERROR_STATUSES  # an error fault draws one of these
    failing: int = 503  # an entity failing for good (`fail_permanently`)

    @classmethod
    def of(cls, profile: Profile) -> Codes:
        s = profile.statuses
        errors = tuple(sorted(s.retry)) or ERROR_STATUSES
        classified = s.gone | s.auth | s.rate_limited | s.poison
        return cls(
            gone=min(s.gone, default=404),
            auth=min(s.auth, default=401),
            rate_limited=min(s.rate_limited, default=429),
            poison=min(s.poison, default=400),
            errors=errors,
            failing=503 if 503 in s.retry or 503 not in classified else errors[0],
        )


class BadRequestError(Exception):
    """A request the vendor answers as poison (400 for Hermes)."""


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


def _micros(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // _MICROSECOND


@functools.lru_cache(maxsize=4096)
def _date_text(day: int) -> str:
    value = EPOCH + timedelta(days=day)
    return f"{value.year:04d}-{value.month:02d}-{value.day:02d}"


def _format_ts(micros: int) -> str:
    """RFC 3339 UTC with a 'Z'; fractional seconds only when there are any (the form of
    `pipeline.window.point_text`)."""
    seconds, fraction = divmod(micros, 1_000_000)
    day, seconds = divmod(seconds, 86_400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{_date_text(day)}T{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{clock}.{fraction:06d}Z" if fraction else f"{clock}Z"


def parse_instant(name: str, text: str | None) -> int:
    """An RFC 3339 instant as microseconds since the epoch; BadRequestError if it is not one."""
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


def _whole(name: str, text: str | None, what: str) -> int:
    """A non-negative decimal integer parameter; BadRequestError if it is not one."""
    if text is None:
        raise BadRequestError(f"'{name}' is required")
    if not text.isascii() or not text.isdigit():
        raise BadRequestError(f"'{name}' is not {what}: {text!r}")
    return int(text)


def _nasty_id(kind: str, index: str, serial: int, tag: str) -> str:
    # The index sits before the first '/', which keeps ids unique; the rest rotates through
    # every reserved piece so a tree of any size exercises them all.
    first = _NASTY_RESERVED[serial % len(_NASTY_RESERVED)]
    second = _NASTY_RESERVED[(serial * 5 + 3) % len(_NASTY_RESERVED)]
    letter = _NASTY_LETTERS[serial % len(_NASTY_LETTERS)]
    lead = "../" if serial % 3 == 0 else ""
    return f"{lead}{kind} {index}/{first}{letter}..{tag}{second} +x"


def _put(record: dict[str, Any], dotted: str, value: object) -> None:
    """Set `value` at a dotted path of `record`, making the objects on the way."""
    *parents, name = dotted.split(".")
    for part in parents:
        record = record.setdefault(part, {})
    record[name] = value


def _id_kind(level: Level) -> str:
    return _ID_KINDS.get(level.key, level.key.removesuffix("_id"))


class _Tree:
    """The vendor's entities, built once from the config, in depth-first order."""

    def __init__(self, config: SimulatorConfig) -> None:
        levels = config.profile.levels
        sizes = config.sizes
        last = len(levels) - 1
        # The entities under each entity's path, () for the first level's.
        self.children: dict[tuple[str, ...], list[_Entity]] = {}
        # Each level's entities by id (ids are unique in the whole tree).
        self.by_id: list[dict[str, _Entity]] = [{} for _ in levels]
        serial = 0

        def make_id(level: Level, index: str) -> str | int:
            nonlocal serial
            serial += 1
            kind = _id_kind(level)
            tag = _digest(config.seed, kind, index).hex()[:6]
            if level.numeric_ids:
                return serial * 1000 + int(tag, 16) % 1000
            if config.nasty_ids:
                return _nasty_id(kind, index, serial, tag)
            return f"{kind}-{index}-{tag}"

        def grow(depth: int, parent: _Entity | None, prefix: str) -> None:
            level = levels[depth]
            listed = self.children[parent.path if parent is not None else ()] = []
            for k in range(sizes[depth]):
                index = f"{prefix}{k}"
                value = make_id(level, index)
                text = str(value)
                gone = parent is not None and (
                    parent.gone or draw(config.seed, "gone", text) < config.gone_rate
                )
                fields: dict[str, Any] = {}
                _put(fields, level.id_field, value)
                if parent is not None:
                    fields.setdefault(levels[depth - 1].key, parent.value)
                if depth == last:
                    metric, unit = _METRICS[k % len(_METRICS)]
                    fields.setdefault("metric", metric)
                    fields.setdefault("unit", unit)
                elif parent is None:
                    fields.setdefault("name", f"{_id_kind(level).title()} {index}")
                else:
                    fields.setdefault("name", f"svc-{index}")
                path = (*parent.path, text) if parent is not None else (text,)
                entity = _Entity(text, value, path, gone, dumps(fields))
                listed.append(entity)
                self.by_id[depth][text] = entity
                if depth < last:
                    grow(depth + 1, entity, f"{index}-")

        grow(0, None, "")

    def listed(self, path: tuple[str, ...] = ()) -> Iterator[_Entity]:
        """Every entity a harvest lists, depth first: all but those under a gone entity."""
        for entity in self.children.get(path, ()):
            yield entity
            if not entity.gone:
                yield from self.listed(entity.path)


def _pattern(path: str) -> tuple[tuple[str | None, str | None], ...]:
    """A path template as (literal, None) and (None, placeholder) segments."""
    out: list[tuple[str | None, str | None]] = []
    for segment in path.split("/")[1:]:
        names = placeholders(segment)
        if not names:
            out.append((segment, None))
        elif segment == f"{{{names[0]}}}":
            out.append((None, names[0]))
        else:
            raise ConfigError(
                f"path {path!r}: the simulator serves a placeholder only as a whole segment,"
                f" not {segment!r}"
            )
    return tuple(out)


def _check_servable(profile: Profile) -> None:
    """ConfigError for what a profile allows but no body can hold."""
    ts, value = profile.data.ts_field.split("."), profile.data.value_field.split(".")
    if ts[: len(value)] == value or value[: len(ts)] == ts:
        raise ConfigError(
            f"profile {profile.name}: points ts {profile.data.ts_field!r} and value"
            f" {profile.data.value_field!r} are the same place in a point"
        )
    for listing in (*(level.listing for level in profile.levels), profile.data.listing):
        p = listing.pagination
        if p.kind != PaginationKind.CURSOR:
            continue
        if not listing.records:
            raise ConfigError(
                f"profile {profile.name}: {listing.path}: records = '' (the body is a list)"
                f" leaves no place for cursor_field {p.cursor_field!r}"
            )
        records, cursor = listing.records.split("."), p.cursor_field.split(".")
        if records[: len(cursor)] == cursor or cursor[: len(records)] == records:
            raise ConfigError(
                f"profile {profile.name}: {listing.path}: cursor_field {p.cursor_field!r}"
                f" and records {listing.records!r} are the same place in the body"
            )


def _body(records: str, array: str, *fields: tuple[str, str]) -> bytes:
    """A page's body: the records' JSON `array` at the dotted path `records` ("": the body is
    the array), and each (dotted path, JSON text) of `fields` beside it."""
    if not records:
        return array.encode()
    tree: dict[str, Any] = {}
    for path, raw in ((records, array), *fields):
        _put(tree, path, raw)
    return _emit(tree).encode()


def _emit(node: dict[str, Any] | str) -> str:
    if isinstance(node, str):
        return node
    return "{" + ",".join(f"{dumps(name)}:{_emit(value)}" for name, value in node.items()) + "}"


class VendorModel:
    """The vendor's entities and what it answers for them, built once from the config."""

    def __init__(self, config: SimulatorConfig) -> None:
        profile = config.profile
        _check_servable(profile)
        self.config = config
        self.profile = profile
        self.codes = Codes.of(profile)
        self.tree = _Tree(config)
        self._cursor_key = _digest(config.seed, "cursor-key")
        # The listings by depth: each level's, then the data call.
        self.listings: tuple[Listing, ...] = (
            *(level.listing for level in profile.levels),
            profile.data.listing,
        )
        self._patterns = tuple(_pattern(listing.path) for listing in self.listings)
        self.allowed = tuple(self._allowed(depth) for depth in range(len(self.listings)))
        # Point fields as JSON keys when neither is a dotted path (Hermes': "ts", "value").
        data = profile.data
        self._flat_keys = (
            None
            if "." in data.ts_field + data.value_field
            else (dumps(data.ts_field), dumps(data.value_field))
        )

    # -- what a correct harvest yields -------------------------------------------------------

    def ground_truth(
        self, start: datetime, end: datetime
    ) -> dict[tuple[str, ...], list[dict[str, Any]]]:
        """Every leaf a correct harvest of [start, end) yields, by its path of ids (one a
        level), with its points by ts as the output holds them."""
        first, count = self._point_range(_micros(start), _micros(end))
        depth = len(self.profile.levels)
        truth: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for entity in self.tree.listed():
            if len(entity.path) == depth and not entity.gone:
                truth[entity.path] = [
                    {"ts": self._output_ts(micros), "value": value}
                    for micros, value in self._points(entity.id, first, first + count)
                ]
        return truth

    def gone(self) -> set[tuple[str, ...]]:
        """What a harvest finds gone: the path of every listed entity that answers gone.

        Entities under a gone one answer gone too, but a harvest never lists them, so they
        are not here. (Hermes: (troop, warrior) and (troop, warrior, data group) paths.)
        """
        return {entity.path for entity in self.tree.listed() if entity.gone}

    def expected_calls(self, start: datetime, end: datetime) -> int:
        """Calls (200 or gone) a perfect harvest of [start, end) makes, asking for pages of
        `page_size` (each listing's own when the config's is 0)."""
        _, points = self._point_range(_micros(start), _micros(end))
        depth = len(self.profile.levels)
        calls = self._pages(self.listings[0], len(self.tree.children.get((), ())))
        for entity in self.tree.listed():
            below = len(entity.path)  # the listing this entity's message calls
            if entity.gone:
                calls += 1
            elif below < depth:
                calls += self._pages(self.listings[below], len(self.tree.children[entity.path]))
            else:
                calls += self._pages(self.listings[below], points)
        return calls

    def page_size(self, listing: Listing) -> int:
        """The most items a page of `listing` holds, and its size when a request names none."""
        return self.config.page_size or listing.pagination.page_size

    def _pages(self, listing: Listing, items: int) -> int:
        """Calls needed to list `items` items: an empty list still takes one call, and where
        a short page is the last, a full one needs another after it."""
        kind = listing.pagination.kind
        if kind == PaginationKind.NONE:
            return 1
        size = self.page_size(listing)
        if kind in (PaginationKind.OFFSET, PaginationKind.PAGE_NUMBER):
            return items // size + 1
        return max(1, math.ceil(items / size))

    # -- points --------------------------------------------------------------------------------

    @property
    def _interval_us(self) -> int:
        return max(1, round(self.config.point_interval * 1_000_000))

    def _point_range(self, start_us: int, end_us: int) -> tuple[int, int]:
        """(first point index, number of points) with start <= ts < end."""
        interval = self._interval_us
        first = -(-start_us // interval)
        after = -(-end_us // interval)
        return first, max(0, after - first)

    def _points(self, leaf_id: str, first: int, stop: int) -> list[tuple[int, float]]:
        """(µs since the epoch, value) of points first..stop-1; a value depends on seed, leaf
        id and ts only."""
        interval = self._interval_us
        prefix = f"{self.config.seed}\x1fvalue\x1f{leaf_id}\x1f".encode()
        points = []
        for index in range(first, stop):
            micros = index * interval
            digest = hashlib.blake2b(prefix + b"%d" % micros, digest_size=8).digest()
            value = round(int.from_bytes(digest, "big") / 2**64 * 1000.0, 3)
            points.append((micros, value))
        return points

    def _point_json(self, micros: int, value: float) -> str:
        """One point as the vendor sends it: its ts in the profile's ts_format."""
        ts_format = self.profile.data.ts_format
        if ts_format == TimeFormat.RFC3339:
            ts = f'"{_format_ts(micros)}"'
        elif ts_format == TimeFormat.UNIX:
            seconds, fraction = divmod(micros, 1_000_000)
            ts = repr(micros / 1_000_000) if fraction else str(seconds)
        else:
            ts = str(micros // 1000)
        if self._flat_keys is not None:
            ts_key, value_key = self._flat_keys
            return f"{{{ts_key}:{ts},{value_key}:{value!r}}}"
        point: dict[str, Any] = {}
        _put(point, self.profile.data.ts_field, ts)
        _put(point, self.profile.data.value_field, repr(value))
        return _emit(point)

    def _output_ts(self, micros: int) -> str:
        """A point's ts as the output holds it: the vendor's RFC 3339 text as sent, or the
        number's instant as `pipeline.window.point_text` writes it (the same form)."""
        if self.profile.data.ts_format == TimeFormat.UNIX_MS:
            micros = micros // 1000 * 1000
        return _format_ts(micros)

    def _instant(self, name: str, text: str | None) -> int:
        """A window parameter in the profile's window format, as µs since the epoch."""
        window_format = self.profile.data.window_format
        if window_format == TimeFormat.RFC3339:
            return parse_instant(name, text)
        if window_format == TimeFormat.UNIX:
            return _whole(name, text, "a Unix time in whole seconds") * 1_000_000
        return _whole(name, text, "a Unix time in whole milliseconds") * 1000

    # -- requests ------------------------------------------------------------------------------

    def route(self, segments: list[str] | None) -> Route | None:
        """The listing a path's decoded segments name, or None when no listing has that shape;
        where two would match, the one with more literal segments."""
        if not segments:
            return None
        best: Route | None = None
        best_literals = -1
        for depth, pattern in enumerate(self._patterns):
            if len(pattern) != len(segments):
                continue
            ids: dict[str, str] = {}
            literals = 0
            for (literal, key), segment in zip(pattern, segments, strict=True):
                if key is None:
                    if segment != literal:
                        break
                    literals += 1
                elif not segment or ids.setdefault(key, segment) != segment:
                    break
            else:
                if literals > best_literals:
                    best, best_literals = Route(depth, ids), literals
        return best

    def _allowed(self, depth: int) -> frozenset[str]:
        """The query parameters listing `depth` takes."""
        listing = self.listings[depth]
        p = listing.pagination
        names = {name for name, _ in listing.params}
        if p.kind != PaginationKind.NONE:
            if p.size_param:
                names.add(p.size_param)
            names.add(
                {
                    PaginationKind.OFFSET: p.offset_param,
                    PaginationKind.PAGE_NUMBER: p.page_param,
                }.get(p.kind, p.cursor_param)
            )
        if depth == len(self.profile.levels):
            names |= {self.profile.data.from_param, self.profile.data.to_param}
        return frozenset(names)

    def _owner(self, route: Route) -> tuple[str, ...] | None:
        """The path of the entity whose listing (or data) `route` asks for, () for the first
        level's listing; None if there is no such entity, it is gone, or the path names
        another entity as its ancestor."""
        if route.depth == 0:
            return ()
        above = self.profile.levels[: route.depth]
        entity = self.tree.by_id[route.depth - 1].get(route.ids[above[-1].key])
        if entity is None or entity.gone:
            return None
        for ancestor, level in zip(entity.path, above[:-1], strict=False):
            given = route.ids.get(level.key)
            if given is not None and given != ancestor:
                return None
        return entity.path

    def answer(
        self, route: Route, params: dict[str, str], segments: list[str], url: str = ""
    ) -> Page:
        """The answer to a GET of `route` with the query `params` (without the auth
        parameter); `url`, the request's absolute URL without its query, starts a next link.
        BadRequestError for bad parameters."""
        owner = self._owner(route)
        if owner is None:
            return Page(self.codes.gone, error_body("not_found"))
        listing = self.listings[route.depth]
        for name, value in listing.params:
            given = params.get(name)
            if given is None:
                raise BadRequestError(f"'{name}' is required")
            if given != value:
                raise BadRequestError(f"'{name}' must be {value!r}, not {given!r}")
        if route.depth < len(self.profile.levels):
            items = [entity.item for entity in self.tree.children.get(owner, ())]
            offset, size = self._page(listing, params, segments, len(items))
            records = items[offset : offset + size]
            return self._page_answer(
                listing, records, params, segments, size, offset, len(items), url
            )

        data = self.profile.data
        start_us = self._instant(data.from_param, params.get(data.from_param))
        end_us = self._instant(data.to_param, params.get(data.to_param))
        if start_us > end_us:
            raise BadRequestError(f"'{data.from_param}' is after '{data.to_param}'")
        first, count = self._point_range(start_us, end_us)
        offset, size = self._page(listing, params, segments, count)
        points = [
            self._point_json(micros, value)
            for micros, value in self._points(
                owner[-1], first + offset, first + min(count, offset + size)
            )
        ]
        return self._page_answer(listing, points, params, segments, size, offset, count, url)

    def _page(
        self, listing: Listing, params: dict[str, str], segments: list[str], total: int
    ) -> tuple[int, int]:
        """(offset, size) of the requested page; BadRequestError for a bad size, cursor,
        offset or page number."""
        p = listing.pagination
        if p.kind == PaginationKind.NONE:
            return 0, max(total, 1)
        most = self.page_size(listing)
        size = most
        text = params.get(p.size_param) if p.size_param else None
        if text is not None:
            if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= most:
                raise BadRequestError(f"'{p.size_param}' must be an integer from 1 to {most}")
            size = int(text)
        if p.kind == PaginationKind.OFFSET:
            return _whole(p.offset_param, params.get(p.offset_param), "a whole number"), size
        if p.kind == PaginationKind.PAGE_NUMBER:
            what = f"a page number from {p.first_page}"
            page = _whole(p.page_param, params.get(p.page_param), what)
            if page < p.first_page:
                raise BadRequestError(f"'{p.page_param}' is not {what}: {page}")
            return (page - p.first_page) * size, size
        cursor = params.get(p.cursor_param)
        if cursor is None:
            return 0, size
        offset = self._decode_cursor(cursor, p.cursor_param, params, segments)
        if offset is None or not 0 < offset < total:
            raise BadRequestError("invalid cursor for this path and query")
        return offset, size

    def _page_answer(
        self,
        listing: Listing,
        records: list[str],
        params: dict[str, str],
        segments: list[str],
        size: int,
        offset: int,
        total: int,
        url: str,
    ) -> Page:
        """A 200 page of `records` (JSON texts), with the way to the next page if any."""
        p = listing.pagination
        after = offset + size
        array = f"[{','.join(records)}]"
        if p.kind == PaginationKind.CURSOR:
            cursor = (
                dumps(self._encode_cursor(params, p.cursor_param, segments, after))
                if after < total
                else "null"
            )
            return Page(200, _body(listing.records, array, (p.cursor_field, cursor)))
        headers: tuple[tuple[str, str], ...] = ()
        if after < total and p.kind == PaginationKind.HEADER_CURSOR:
            cursor = self._encode_cursor(params, p.cursor_param, segments, after)
            headers = ((p.cursor_header, cursor),)
        elif after < total and p.kind == PaginationKind.LINK:
            # The next request's query is this one's with the page size named; the cursor
            # is bound to it.
            query = {name: value for name, value in params.items() if name != p.cursor_param}
            if p.size_param:
                query[p.size_param] = str(size)
            cursor = self._encode_cursor(query, p.cursor_param, segments, after)
            pairs = [*query.items(), (p.cursor_param, cursor)]
            target = f"{url}?{urlencode(pairs, safe='', quote_via=quote)}"
            headers = (("Link", f'<{target}>; rel="next"'),)
        return Page(200, _body(listing.records, array), headers)

    # -- cursors: an offset signed with the path and the rest of the query --------------------

    def _binding(
        self, params: dict[str, str], cursor_param: str, segments: list[str], offset: int
    ) -> str:
        query = sorted((name, value) for name, value in params.items() if name != cursor_param)
        material = dumps([segments, query, offset])
        return hashlib.blake2b(material.encode(), digest_size=12, key=self._cursor_key).hexdigest()

    def _encode_cursor(
        self, params: dict[str, str], cursor_param: str, segments: list[str], offset: int
    ) -> str:
        raw = f"{offset}.{self._binding(params, cursor_param, segments, offset)}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def _decode_cursor(
        self, cursor: str, cursor_param: str, params: dict[str, str], segments: list[str]
    ) -> int | None:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        offset_text, _, signature = raw.partition(".")
        if not offset_text.isascii() or not offset_text.isdigit():
            return None
        offset = int(offset_text)
        if signature != self._binding(params, cursor_param, segments, offset):
            return None
        return offset
