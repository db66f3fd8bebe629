"""The vendor profile: everything about the vendor's API, read from one TOML file.

A profile declares the base URL, the auth scheme, the tree of levels (any depth >= 1: each
level's listing path, record selector, id field and pagination), the leaf's data call (its
window parameters and point fields), the rate-limit headers and what each status code
means. Stages, kickoff, drains, output record keys, verify, the simulator and Terraform
all follow the one profile; `profiles/hermes-v1.toml` (the contract in vendor-api.md) is
the default. `docs/profiles.md` documents every key.

Validation is hand-written rather than pydantic: the profile ships in the Lambda zip and is
read at every cold start, and a bad file must give one line that names the key
(`levels[1].path: ...`), which is all the checking below does. Unknown keys are errors,
so a misspelt one never falls back to a default silently.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError

# The packaged profiles (the zip ships this directory beside `pipeline/`).
PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
DEFAULT_PROFILE = "hermes-v1"
# Stage names become queue, DLQ, function and metric names.
_NAME = re.compile(r"[a-z][a-z0-9_]{0,23}")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_TOKEN_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")
# Fields of every output record besides the level keys, and the compacted table's other
# columns and partition key (pipeline/compact.py): no level key may be one of them.
RECORD_FIELDS = frozenset({"run_id", "from", "to", "points", "ts", "value", "dt"})


class PaginationKind(StrEnum):
    """How a listing's next page is found."""

    CURSOR = "cursor"  # an opaque cursor in the body (`cursor_field`), sent back as a parameter
    HEADER_CURSOR = "header_cursor"  # the same, in a response header (`cursor_header`)
    OFFSET = "offset"  # `offset_param` = items so far; a short page is the last
    PAGE_NUMBER = "page_number"  # `page_param` = 1, 2, ...; a short page is the last
    LINK = "link"  # the URL in a `Link: <...>; rel="next"` header (RFC 8288)
    NONE = "none"  # one page


class AuthKind(StrEnum):
    BEARER = "bearer"  # Authorization: Bearer <token>
    HEADER = "header"  # <header>: <prefix><token> (an API key in a header)
    QUERY = "query"  # ?<param>=<token> (an API key in the query)
    BASIC = "basic"  # Authorization: Basic; the token is "user:password", or the password
    NONE = "none"


class TimeFormat(StrEnum):
    RFC3339 = "rfc3339"  # "2024-05-01T00:00:00Z"
    UNIX = "unix"  # seconds since the epoch (a number)
    UNIX_MS = "unix_ms"  # milliseconds since the epoch (a number)


@dataclass(frozen=True)
class Pagination:
    kind: PaginationKind = PaginationKind.CURSOR
    page_size: int = 100
    # The query parameter carrying the page size ("" sends none).
    size_param: str = "limit"
    cursor_param: str = "cursor"
    # Dotted path of the next cursor in the body: must be present; null is the end.
    cursor_field: str = "next_cursor"
    cursor_header: str = ""
    offset_param: str = "offset"
    page_param: str = "page"
    first_page: int = 1


@dataclass(frozen=True)
class Listing:
    """One paginated call: its path template, where its records are and how it pages."""

    path: str
    # Dotted path of the record list in the body; "" means the body is the list.
    records: str = "items"
    pagination: Pagination = field(default_factory=Pagination)
    # Extra query parameters sent on every page of this listing.
    params: tuple[tuple[str, str], ...] = ()

    @property
    def placeholders(self) -> tuple[str, ...]:
        return placeholders(self.path)


@dataclass(frozen=True)
class Level:
    """One level of entities: its stage name, the output key of its id, and how it is listed."""

    name: str
    key: str
    listing: Listing
    id_field: str = "id"
    # Whether integer ids are accepted (written as decimal text); strings always are.
    numeric_ids: bool = False


@dataclass(frozen=True)
class DataCall:
    """The leaf: the points of one entity of the last level in a window."""

    listing: Listing
    from_param: str = "from"
    to_param: str = "to"
    window_format: TimeFormat = TimeFormat.RFC3339
    ts_field: str = "ts"
    ts_format: TimeFormat = TimeFormat.RFC3339
    value_field: str = "value"


@dataclass(frozen=True)
class Auth:
    kind: AuthKind = AuthKind.BEARER
    header: str = "Authorization"
    prefix: str = ""
    param: str = "api_key"
    username: str = ""


@dataclass(frozen=True)
class RateLimitHeaders:
    limit: str = "X-RateLimit-Limit"
    remaining: str = "X-RateLimit-Remaining"
    # Seconds until one more request is allowed ("seconds"), or the epoch second it is
    # ("epoch"); "" when the vendor sends none.
    reset: str = "X-RateLimit-Reset"
    reset_format: str = "seconds"
    retry_after: str = "Retry-After"


@dataclass(frozen=True)
class Statuses:
    """What each status code means; any other 4xx is poison, any other 5xx retried."""

    gone: frozenset[int] = frozenset({404})
    poison: frozenset[int] = frozenset({400})
    auth: frozenset[int] = frozenset({401})
    retry: frozenset[int] = frozenset({500, 502, 503, 504})
    rate_limited: frozenset[int] = frozenset({429})


@dataclass(frozen=True)
class Stage:
    """One stage of the fan-out: the messages carrying entities of one level, the listing
    each one calls, and where its results go."""

    name: str
    # The call a message of this stage makes: the next level's listing, or the data call.
    listing: Listing
    # The stage the listed items are fanned out to; None: the items are data points.
    child: str | None
    # Length of the entity path a message of this stage carries.
    depth: int
    # The level keys of the path's ids, in order (the placeholders of `listing.path` and
    # the output record's id fields).
    keys: tuple[str, ...]
    level: Level
    # The level the listed items belong to (None for the data call), or the data call.
    child_level: Level | None = None
    data: DataCall | None = None

    def ids(self, path: Sequence[str]) -> dict[str, str]:
        """The placeholders of this stage's listing, from an entity path."""
        return dict(zip(self.keys, path, strict=True))


@dataclass(frozen=True)
class Profile:
    name: str
    levels: tuple[Level, ...]
    data: DataCall
    base_url: str = ""
    auth: Auth = field(default_factory=Auth)
    rate_limit: RateLimitHeaders = field(default_factory=RateLimitHeaders)
    statuses: Statuses = field(default_factory=Statuses)
    # Where it was read from ("" if built in code).
    source: str = ""

    @cached_property
    def stages(self) -> tuple[Stage, ...]:
        return _stages(self)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)

    @property
    def first_stage(self) -> str:
        return self.levels[0].name

    @property
    def root(self) -> Listing:
        """The kickoff's listing: the first level's entities."""
        return self.levels[0].listing

    @property
    def keys(self) -> tuple[str, ...]:
        """The output record's id fields, in level order."""
        return tuple(level.key for level in self.levels)

    def stage(self, name: str) -> Stage:
        """The stage called `name`; KeyError names the known ones."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(self.stage_names)}")

    def upstream(self, name: str) -> tuple[str, ...]:
        """The stages that feed `name`, nearest last."""
        names = list(self.stage_names)
        return tuple(names[: names.index(name)])

    def depth_of(self, name: str) -> int | None:
        for i, level in enumerate(self.levels):
            if level.name == name:
                return i + 1
        return None

    def describe(self) -> dict[str, Any]:
        """What Terraform and the docs need: the stages in order, each with its child, and
        the output keys (`scripts/package.py` writes it beside the zip)."""
        return {
            "name": self.name,
            "stages": [
                {"name": s.name, "child": s.child, "depth": s.depth, "key": s.level.key}
                for s in self.stages
            ],
            "keys": list(self.keys),
        }


def _stages(profile: Profile) -> tuple[Stage, ...]:
    out = []
    for i, level in enumerate(profile.levels):
        child = profile.levels[i + 1] if i + 1 < len(profile.levels) else None
        out.append(
            Stage(
                name=level.name,
                listing=child.listing if child is not None else profile.data.listing,
                child=child.name if child is not None else None,
                depth=i + 1,
                keys=tuple(lv.key for lv in profile.levels[: i + 1]),
                level=level,
                child_level=child,
                data=None if child is not None else profile.data,
            )
        )
    return tuple(out)


class Missing(KeyError):
    """A dotted path names a field the body does not have."""


def select(body: Any, dotted: str) -> Any:
    """The value at `dotted` ("a.b.c") in nested JSON objects; "" is the body itself.

    Missing (a KeyError) names the first field that is absent; a step into something that
    is not an object is absent too.
    """
    if not dotted:
        return body
    value = body
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise Missing(part)
        value = value[part]
    return value


def placeholders(path: str) -> tuple[str, ...]:
    """The `{name}` placeholders of a path template, in order."""
    return tuple(name for _, name, _, _ in string.Formatter().parse(path) if name is not None)


# -- loading ---------------------------------------------------------------------------------


def resolve(name_or_path: str = "") -> Path:
    """The file of a profile given by path, or by name among the packaged profiles; a
    relative path is looked for from the working directory, then from the package root."""
    text = name_or_path or DEFAULT_PROFILE
    candidates = [Path(text)]
    if not Path(text).is_absolute():
        candidates.append(PROFILES_DIR.parent / text)
    if "/" not in text and not text.endswith(".toml"):
        candidates.append(PROFILES_DIR / f"{text}.toml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.toml")))
    raise ConfigError(
        f"profile {text!r}: no such file (packaged profiles: {known}; a deployed function's"
        " HARVEST_PROFILE names its place in the zip: on your machine, set HARVEST_PROFILE"
        " to the profile's own file)"
    )


def load(name_or_path: str = "") -> Profile:
    """The profile in a TOML file (see `resolve`); ConfigError in one line naming the key."""
    path = resolve(name_or_path)
    stat = path.stat()
    return _load(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def from_env(env: Mapping[str, str] | None = None) -> Profile:
    """The profile HARVEST_PROFILE names (the default if unset)."""
    env = os.environ if env is None else env
    return load(env.get("HARVEST_PROFILE", ""))


@lru_cache(maxsize=16)
def _load(path: str, mtime_ns: int, size: int) -> Profile:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"profile {path}: not valid TOML: {exc}") from None
    return parse(data, source=path)


def parse(data: Mapping[str, Any], *, source: str = "") -> Profile:
    """A Profile from the parsed TOML; ConfigError `profile <source>: <key>: <why>`."""
    try:
        return _Reader(data, "").profile(source)
    except _Invalid as exc:
        where = f"profile {source}" if source else "profile"
        raise ConfigError(
            f"{where}: {exc.key}: {exc.why}" if exc.key else f"{where}: {exc.why}"
        ) from None


class _Invalid(Exception):
    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


class _Reader:
    """Reads one table of the file, remembering which keys it used: the rest are unknown."""

    def __init__(self, data: object, prefix: str) -> None:
        if not isinstance(data, Mapping):
            raise _Invalid(prefix, f"must be a table, not {type(data).__name__}")
        self.data, self.prefix, self.used = data, prefix, set[str]()

    def at(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        self.used.add(key)
        if key not in self.data:
            if default is None:
                raise _Invalid(self.at(key), "missing (required)")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise _Invalid(self.at(key), f"must be {_kind_name(kinds)}, not a boolean")
        if not isinstance(value, kinds):
            raise _Invalid(self.at(key), f"must be {_kind_name(kinds)}, not {value!r}")
        return value

    def text(
        self, key: str, default: str | None = None, pattern: re.Pattern[str] | None = None
    ) -> str:
        value: str = self.get(key, str, default)
        if pattern is not None and pattern.fullmatch(value) is None:
            raise _Invalid(self.at(key), f"{value!r} does not match {pattern.pattern}")
        return value

    def choice(self, key: str, enum: type[StrEnum], default: StrEnum) -> Any:
        value = self.text(key, str(default))
        try:
            return enum(value)
        except ValueError:
            known = ", ".join(e.value for e in enum)
            raise _Invalid(self.at(key), f"{value!r} is not one of: {known}") from None

    def whole(self, key: str, default: int, low: int, high: int) -> int:
        value: int = self.get(key, int, default)
        if not low <= value <= high:
            raise _Invalid(self.at(key), f"must be {low}-{high}, not {value}")
        return value

    def table(self, key: str) -> _Reader:
        self.used.add(key)
        return _Reader(self.data.get(key, {}), self.at(key))

    def codes(self, key: str, default: frozenset[int]) -> frozenset[int]:
        values = self.get(key, list, sorted(default))
        for i, code in enumerate(values):
            if isinstance(code, bool) or not isinstance(code, int) or not 100 <= code <= 599:
                raise _Invalid(f"{self.at(key)}[{i}]", f"not an HTTP status code: {code!r}")
        return frozenset(values)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise _Invalid(self.at(unknown[0]), f"unknown key (known here: {known})")

    # -- the file's tables ----------------------------------------------------------------

    def profile(self, source: str) -> Profile:
        name = self.text("name")
        base_url = self.text("base_url", "")
        if base_url and not base_url.startswith(("http://", "https://")):
            raise _Invalid("base_url", f"must be http(s)://..., not {base_url!r}")
        defaults = self.table("pagination")
        default_pagination = defaults.pagination(Pagination())
        defaults.done()
        raw_levels = self.get("levels", list)
        if not raw_levels:
            raise _Invalid("levels", "needs at least one level ([[levels]])")
        levels = []
        for i, raw in enumerate(raw_levels):
            reader = _Reader(raw, f"levels[{i}]")
            levels.append(reader.level(default_pagination))
            reader.done()
        data_reader = self.table("data")
        data = data_reader.data_call(default_pagination)
        data_reader.done()
        auth_reader = self.table("auth")
        auth = auth_reader.auth()
        auth_reader.done()
        rate_reader = self.table("rate_limit")
        rate = rate_reader.rate_limit()
        rate_reader.done()
        status_reader = self.table("status")
        statuses = status_reader.statuses()
        status_reader.done()
        self.done()
        _check_tree(levels, data)
        return Profile(
            name=name,
            levels=tuple(levels),
            data=data,
            base_url=base_url,
            auth=auth,
            rate_limit=rate,
            statuses=statuses,
            source=source,
        )

    def pagination(self, base: Pagination) -> Pagination:
        kind = self.choice("type", PaginationKind, base.kind)
        p = Pagination(
            kind=kind,
            page_size=self.whole("page_size", base.page_size, 1, 100_000),
            size_param=self.text("size_param", base.size_param),
            cursor_param=self.text("cursor_param", base.cursor_param),
            cursor_field=self.text("cursor_field", base.cursor_field),
            cursor_header=self.text("cursor_header", base.cursor_header),
            offset_param=self.text("offset_param", base.offset_param),
            page_param=self.text("page_param", base.page_param),
            first_page=self.whole("first_page", base.first_page, 0, 1),
        )
        if kind == PaginationKind.HEADER_CURSOR and not p.cursor_header:
            raise _Invalid(self.at("cursor_header"), "required by type = 'header_cursor'")
        if kind == PaginationKind.CURSOR and not p.cursor_field:
            raise _Invalid(self.at("cursor_field"), "required by type = 'cursor'")
        if p.cursor_header and _HEADER.fullmatch(p.cursor_header) is None:
            raise _Invalid(self.at("cursor_header"), f"not a header name: {p.cursor_header!r}")
        if kind in (PaginationKind.OFFSET, PaginationKind.PAGE_NUMBER) and not p.size_param:
            # A short page is how these end: the vendor must be told the page size.
            raise _Invalid(self.at("size_param"), f"required by type = {kind.value!r}")
        return p

    def listing(self, default_pagination: Pagination) -> Listing:
        path = self.text("path")
        if not path.startswith("/"):
            raise _Invalid(self.at("path"), f"must start with '/', not {path!r}")
        if "?" in path or "#" in path:
            raise _Invalid(
                self.at("path"), f"{path!r} holds a query or fragment: put parameters in params"
            )
        try:
            parts = list(string.Formatter().parse(path))
        except ValueError as exc:
            raise _Invalid(self.at("path"), f"bad template {path!r}: {exc}") from None
        for literal, name, spec, conversion in parts:
            if "{" in literal or "}" in literal:
                raise _Invalid(self.at("path"), f"{path!r}: a literal brace is not allowed")
            if name is not None and (spec or conversion):
                raise _Invalid(self.at("path"), f"{{{name}}} takes no format or conversion")
        names = placeholders(path)
        for name in names:
            if _KEY.fullmatch(name) is None:
                raise _Invalid(self.at("path"), f"placeholder {{{name}}} is not a level key")
        records = self.text("records", "items")
        pagination = default_pagination
        if "pagination" in self.data:
            reader = self.table("pagination")
            pagination = reader.pagination(default_pagination)
            reader.done()
        params = self.get("params", dict, {})
        for k, v in params.items():
            if not isinstance(v, str):
                raise _Invalid(self.at(f"params.{k}"), f"must be a string, not {v!r}")
        if pagination.kind == PaginationKind.CURSOR:
            if not records:
                raise _Invalid(
                    self.at("records"),
                    "'' (the body is the list) leaves no place for the cursor in the body:"
                    " page by header_cursor, link, offset or page_number",
                )
            if _overlap(records, pagination.cursor_field):
                raise _Invalid(
                    self.at("records"),
                    f"{records!r} and the cursor field {pagination.cursor_field!r} overlap",
                )
        return Listing(
            path=path, records=records, pagination=pagination, params=tuple(params.items())
        )

    def level(self, default_pagination: Pagination) -> Level:
        name = self.text("name", pattern=_NAME)
        if "id" not in self.data:
            raise _Invalid(self.at("id"), "missing (required): the field holding each record's id")
        if not self.data.get("id"):
            raise _Invalid(self.at("id"), "must name the field holding each record's id")
        if name.endswith("_dlq"):
            # Its queue would be named as the DLQ of a stage called like its prefix.
            raise _Invalid(self.at("name"), f"{name!r} ends in _dlq, which DLQ names use")
        return Level(
            name=name,
            key=self.text("key", pattern=_KEY),
            listing=self.listing(default_pagination),
            id_field=self.text("id"),
            numeric_ids=self.get("numeric_ids", bool, False),
        )

    def data_call(self, default_pagination: Pagination) -> DataCall:
        listing = self.listing(default_pagination)
        window = self.table("window")
        points = self.table("points")
        call = DataCall(
            listing=listing,
            from_param=window.text("from", "from"),
            to_param=window.text("to", "to"),
            window_format=window.choice("format", TimeFormat, TimeFormat.RFC3339),
            ts_field=points.text("ts", "ts"),
            ts_format=points.choice("ts_format", TimeFormat, TimeFormat.RFC3339),
            value_field=points.text("value", "value"),
        )
        window.done()
        points.done()
        for key, value in (("points.ts", call.ts_field), ("points.value", call.value_field)):
            if not value:
                raise _Invalid(f"data.{key}", "must name a field of each point")
        if call.from_param == call.to_param:
            raise _Invalid("data.window", f"from and to are both {call.from_param!r}")
        if _overlap(call.ts_field, call.value_field):
            raise _Invalid(
                "data.points", f"ts {call.ts_field!r} and value {call.value_field!r} overlap"
            )
        return call

    def auth(self) -> Auth:
        kind = self.choice("type", AuthKind, AuthKind.BEARER)
        auth = Auth(
            kind=kind,
            header=self.text("header", "Authorization"),
            prefix=self.text("prefix", ""),
            param=self.text("param", "api_key"),
            username=self.text("username", ""),
        )
        if _HEADER.fullmatch(auth.header) is None:
            raise _Invalid(self.at("header"), f"not a header name: {auth.header!r}")
        if kind == AuthKind.HEADER and "header" not in self.data:
            raise _Invalid(self.at("header"), "required by type = 'header'")
        if not auth.prefix.isascii() or _TOKEN_UNSAFE.search(auth.prefix):
            raise _Invalid(self.at("prefix"), "must be printable ASCII (it goes in a header)")
        if kind == AuthKind.QUERY and not self.data.get("param"):
            raise _Invalid(self.at("param"), "required by type = 'query'")
        if not auth.username.isascii() or ":" in auth.username:
            raise _Invalid(self.at("username"), "must be ASCII without ':' (HTTP basic auth)")
        return auth

    def rate_limit(self) -> RateLimitHeaders:
        base = RateLimitHeaders()
        headers = RateLimitHeaders(
            limit=self.text("limit_header", base.limit),
            remaining=self.text("remaining_header", base.remaining),
            reset=self.text("reset_header", base.reset),
            reset_format=self.text("reset_format", base.reset_format),
            retry_after=self.text("retry_after_header", base.retry_after),
        )
        if headers.reset_format not in ("seconds", "epoch"):
            raise _Invalid(
                self.at("reset_format"),
                f"{headers.reset_format!r} is not one of: seconds, epoch",
            )
        for key, value in (
            ("limit_header", headers.limit),
            ("remaining_header", headers.remaining),
            ("reset_header", headers.reset),
            ("retry_after_header", headers.retry_after),
        ):
            if value and _HEADER.fullmatch(value) is None:
                raise _Invalid(self.at(key), f"not a header name: {value!r}")
        return headers

    def statuses(self) -> Statuses:
        base = Statuses()
        s = Statuses(
            gone=self.codes("gone", base.gone),
            poison=self.codes("poison", base.poison),
            auth=self.codes("auth", base.auth),
            retry=self.codes("retry", base.retry),
            rate_limited=self.codes("rate_limited", base.rate_limited),
        )
        seen: dict[int, str] = {}
        for key in ("gone", "poison", "auth", "retry", "rate_limited"):
            for code in getattr(s, key):
                if code in seen:
                    raise _Invalid(self.at(key), f"{code} is also in status.{seen[code]}")
                seen[code] = key
        if 200 in seen:
            raise _Invalid(self.at(seen[200]), "200 is the answer, not an error")
        return s


def _overlap(a: str, b: str) -> bool:
    """Whether two dotted paths name the same field, or one lies inside the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _check_tree(levels: Sequence[Level], data: DataCall) -> None:
    """Names and keys unique; each listing's placeholders are keys of the levels above it,
    and it expands its parent's."""
    names: dict[str, int] = {}
    keys: dict[str, int] = {}
    for i, level in enumerate(levels):
        if level.name in names:
            raise _Invalid(
                f"levels[{i}].name", f"{level.name!r} is also levels[{names[level.name]}]"
            )
        if level.key.lower() in keys:
            raise _Invalid(
                f"levels[{i}].key", f"{level.key!r} is also levels[{keys[level.key.lower()]}]"
            )
        if level.key.lower() in RECORD_FIELDS:
            raise _Invalid(
                f"levels[{i}].key", f"{level.key!r} is an output record or table field already"
            )
        # Case-blind: Glue and Athena column names are.
        names[level.name], keys[level.key.lower()] = i, i
    for i, listing in [
        *((i, lv.listing) for i, lv in enumerate(levels)),
        (len(levels), data.listing),
    ]:
        where = f"levels[{i}].path" if i < len(levels) else "data.path"
        above = [lv.key for lv in levels[:i]]
        for name in listing.placeholders:
            if name not in above:
                known = ", ".join(above) or "none: the first level is listed without ids"
                raise _Invalid(
                    where, f"{{{name}}} is not the key of a level above (known: {known})"
                )
        if i > 0 and levels[i - 1].key not in listing.placeholders:
            raise _Invalid(
                where,
                f"missing path parameter {{{levels[i - 1].key}}}: each listing expands"
                " its parent's id",
            )


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "a whole number",
        bool: "true or false",
        list: "a list",
        dict: "a table",
        float: "a number",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)
