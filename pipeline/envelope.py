"""The queue message envelope: versioned JSON, validated on receipt."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from pipeline.errors import MessageError, PoisonError, quoted
from pipeline.profile import Level, Missing, Profile, select
from pipeline.profile import load as load_profile
from pipeline.window import Window

VERSION = 1
# Far above any real message (three ids of at most 128 characters) and far below SQS's
# 256 KiB: anything bigger is not ours.
MAX_BODY_BYTES = 16 * 1024
MAX_ID_CHARS = 128
# A bad id is stored (in the dead entity's path) cut to this many characters.
MAX_STORED_ID_CHARS = 1000


@dataclass(frozen=True)
class Envelope:
    """One entity to process: a troop, a warrior or a data group of one run."""

    run_id: str
    stage: str
    path: tuple[str, ...]
    window: Window

    @property
    def entity_id(self) -> str:
        return self.path[-1]

    @cached_property
    def key(self) -> str:
        """Deterministic key of this entity within its run: same entity, same key."""
        raw = json.dumps([self.stage, *self.path], ensure_ascii=False)
        # surrogatepass: the same bytes as UTF-8 for every valid id, and a key even for an
        # id that is not (recorded dead, see `checked_id`).
        return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def child(self, child_stage: str, child_id: str) -> Envelope:
        return Envelope(self.run_id, child_stage, (*self.path, child_id), self.window)

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": VERSION,
                "run_id": self.run_id,
                "stage": self.stage,
                "path": list(self.path),
                "from": self.window.from_text,
                "to": self.window.to_text,
            },
            # Escaped: SQS refuses some characters an id may hold (U+FFFE, lone surrogates).
            ensure_ascii=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, body: str, profile: Profile | None = None) -> Envelope:
        """Parse and validate a message body against the stages of `profile` (the default
        profile if None); MessageError says what is wrong with it."""
        if len(body.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
            raise MessageError(f"message body over {MAX_BODY_BYTES} bytes")
        try:
            data: Any = json.loads(body)
        except (ValueError, RecursionError) as exc:
            # RecursionError: nesting deeper than the parser's stack ("[" x 5000).
            raise MessageError(f"message body is not JSON: {type(exc).__name__}") from exc
        if not isinstance(data, dict):
            raise MessageError("message body is not a JSON object")
        if data.get("v") != VERSION:
            raise MessageError(f"unknown envelope version {data.get('v')!r}; expected {VERSION}")
        name = data.get("stage")
        depth = (profile or load_profile()).depth_of(name) if isinstance(name, str) else None
        if depth is None:
            raise MessageError(f"unknown stage {name!r}")
        run_id, path = data.get("run_id"), data.get("path")
        if not isinstance(run_id, str) or not run_id:
            raise MessageError("run_id must be a non-empty string")
        if not isinstance(path, list) or len(path) != depth:
            raise MessageError(f"path must be a list of {depth} ids for {name}")
        for item in path:
            try:
                checked_id(item)
            except MessageError as exc:
                raise MessageError(f"invalid id in path: {exc}") from None
        start, end = data.get("from"), data.get("to")
        if not isinstance(start, str) or not isinstance(end, str):
            raise MessageError("from and to must be RFC 3339 strings")
        try:
            window = Window.parse(start, end)
        except Exception as exc:  # ConfigError from a bad instant is bad input here
            raise MessageError(f"bad window: {exc}") from exc
        if window.run_id != run_id:
            raise MessageError(f"run_id {run_id!r} does not match its window {window.run_id!r}")
        assert isinstance(name, str)
        return cls(run_id, name, tuple(path), window)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# Lone surrogates: valid in JSON ("\ud800"), not in UTF-8, so no store or URL takes them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def checked_id(value: object) -> str:
    """`value` if it is a valid entity id (vendor-api.md: 1-128 characters of Unicode, no
    control characters), else MessageError saying why.

    The one check every id passes where it enters: a listing's items (kickoff and drains)
    and a message's path, so an id a parent accepts is one its child's envelope accepts.
    """
    if not isinstance(value, str):
        raise MessageError(f"id is not a string: {quoted(value)}")
    if not 1 <= len(value) <= MAX_ID_CHARS:
        raise MessageError(f"id of {len(value)} characters (1-{MAX_ID_CHARS}): {quoted(value)}")
    if _CONTROL.search(value) is not None:
        raise MessageError(f"id holds a control character: {quoted(value)}")
    if _SURROGATE.search(value) is not None:
        raise MessageError(f"id is not valid Unicode (a lone surrogate): {quoted(value)}")
    return value


@dataclass(frozen=True)
class Listed:
    """A listing's items, sorted by whether an envelope accepts their ids."""

    # Accepted, once each (a listing that repeats an id must not make the entity twice).
    children: list[Envelope]
    # (key, path to store, reason) of each whose id no envelope accepts: recorded dead.
    rejected: list[tuple[str, tuple[str, ...], str]]


def listed(
    items: Iterable[object],
    make: Callable[[str], Envelope],
    listing: str,
    level: Level | None = None,
) -> Listed:
    """The entities a listing names, `make` building each one's envelope from its id (the
    `level`'s id field; "id" if None).

    PoisonError (the whole listing is malformed) for an item without a string id (or an
    integer one, where the level takes numeric ids).
    """
    children: dict[str, Envelope] = {}
    rejected: dict[str, tuple[tuple[str, ...], str]] = {}
    id_field = level.id_field if level is not None else "id"
    numeric = level is not None and level.numeric_ids
    for item in items:
        try:
            raw = select(item, id_field)
        except Missing:
            raw = None
        if numeric and type(raw) is int:
            raw = str(raw)
        child_id = raw
        if not isinstance(child_id, str) or not child_id:
            field_name = "an id" if id_field == "id" else f"an id ({id_field})"
            raise PoisonError(
                f"{listing} listing returned an item without {field_name}: {quoted(item, 300)}"
            )
        child = make(child_id)
        try:
            checked_id(child_id)
        except MessageError as exc:
            rejected[child.key] = (
                (*child.path[:-1], child_id[:MAX_STORED_ID_CHARS]),
                f"{listing} listing returned an invalid {child.stage} id: {exc}",
            )
            continue
        children.setdefault(child.key, child)
    return Listed(list(children.values()), [(k, p, why) for k, (p, why) in rejected.items()])
