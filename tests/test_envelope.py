"""The queue message envelope: what round-trips, and what is rejected with which reason."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from pipeline.envelope import MAX_BODY_BYTES, MAX_ID_CHARS, Envelope, checked_id
from pipeline.errors import MessageError
from pipeline.window import Window

WINDOW = Window.parse("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z")
RUN = WINDOW.run_id
NASTY_IDS = [
    "a/b",
    "..",
    "../..",
    "q?x=1&y=2",
    "#frag",
    "100%",
    "%2F",
    "a+b",
    " lead and trail ",
    "漢字",
    "🚀",
    "עברית",
    "e\u0301",
    "zero\u200bwidth",
    "line\u2028sep",
    '"quoted" \\ back',
    "\u00a0nbsp",  # just past the C1 control range
    "x" * MAX_ID_CHARS,
    "🚀" * MAX_ID_CHARS,
]


def body(**overrides: Any) -> str:
    """A valid warriors-stage message body, with fields replaced or (as None) removed."""
    data: dict[str, Any] = {
        "v": 1,
        "run_id": RUN,
        "stage": "warriors",
        "path": ["troop-1", "warrior-1"],
        "from": WINDOW.from_text,
        "to": WINDOW.to_text,
    }
    data.update(overrides)
    return json.dumps({k: v for k, v in data.items() if v is not None}, ensure_ascii=False)


# -- round trip ----------------------------------------------------------------------------


def test_envelope_round_trips_through_json() -> None:
    envelope = Envelope(RUN, "data_groups", ("t", "w", "dg"), WINDOW)

    assert Envelope.from_json(envelope.to_json()) == envelope


@pytest.mark.parametrize("entity_id", NASTY_IDS)
def test_envelope_round_trips_when_ids_are_nasty(entity_id: str) -> None:
    envelope = Envelope(RUN, "data_groups", (entity_id, entity_id[::-1], entity_id), WINDOW)

    again = Envelope.from_json(envelope.to_json())

    assert again == envelope
    assert again.key == envelope.key


def test_child_extends_the_path_and_keeps_run_and_window() -> None:
    troop = Envelope(RUN, "troops", ("t/1",), WINDOW)

    warrior = troop.child("warriors", "w?1")

    assert warrior == Envelope(RUN, "warriors", ("t/1", "w?1"), WINDOW)
    assert warrior.entity_id == "w?1"
    assert Envelope.from_json(warrior.to_json()) == warrior


def test_to_json_escapes_non_ascii_so_sqs_accepts_every_id() -> None:
    # U+FFFE is a legal id character that SQS refuses in a message body unescaped.
    envelope = Envelope(RUN, "troops", ("漢字\ufffe",), WINDOW)

    text = envelope.to_json()

    assert text.isascii()
    assert Envelope.from_json(text) == envelope


def test_from_json_accepts_the_largest_real_message() -> None:
    # Three ids of the longest length, each character four UTF-8 bytes: still well under the cap.
    longest = "🚀" * MAX_ID_CHARS
    envelope = Envelope(RUN, "data_groups", (longest, longest, longest), WINDOW)

    assert len(envelope.to_json().encode()) < MAX_BODY_BYTES
    assert Envelope.from_json(envelope.to_json()) == envelope


# -- key -----------------------------------------------------------------------------------


def test_key_is_the_same_when_the_entity_is_the_same() -> None:
    a = Envelope(RUN, "warriors", ("t", "w"), WINDOW)
    b = Envelope.from_json(a.to_json())

    assert a.key == b.key
    assert len(a.key) == 32
    assert all(c in "0123456789abcdef" for c in a.key)


def test_key_differs_when_stage_differs() -> None:
    assert (
        Envelope(RUN, "troops", ("x",), WINDOW).key != Envelope(RUN, "warriors", ("x",), WINDOW).key
    )


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a", "b/c"), ("a/b", "c")),
        (("a", "b"), ("b", "a")),
        (("a", 'b","c'), ("a", "b")),
        (("t", "w"), ("t", "w ")),
        (("t", "e\u0301"), ("t", "\u00e9")),  # different code points, though they look alike
    ],
)
def test_key_differs_when_paths_differ(left: tuple[str, ...], right: tuple[str, ...]) -> None:
    assert (
        Envelope(RUN, "warriors", left, WINDOW).key != Envelope(RUN, "warriors", right, WINDOW).key
    )


def test_keys_are_distinct_over_many_entities() -> None:
    envelopes = [
        Envelope(RUN, "data_groups", (t, w, d), WINDOW)
        for t in NASTY_IDS[:6]
        for w in NASTY_IDS[:6]
        for d in NASTY_IDS[:6]
    ]

    assert len({e.key for e in envelopes}) == len(envelopes)


# -- rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json at all", "not JSON"),
        ("", "not JSON"),
        ('{"v": 1,', "not JSON"),
        ("[1, 2, 3]", "not a JSON object"),
        ('"a string"', "not a JSON object"),
        ("null", "not a JSON object"),
        (body(v=2), "unknown envelope version 2"),
        (body(v="1"), "unknown envelope version '1'"),
        (body(v=None), "unknown envelope version None"),
        (body(stage="generals"), "unknown stage 'generals'"),
        (body(stage=None), "unknown stage None"),
        (body(run_id=""), "run_id must be a non-empty string"),
        (body(run_id=7), "run_id must be a non-empty string"),
        (body(path=["only-troop"]), "path must be a list of 2 ids for warriors"),
        (body(path=["t", "w", "extra"]), "path must be a list of 2 ids for warriors"),
        (body(path="t/w"), "path must be a list of 2 ids for warriors"),
        (body(path=["t", 42]), "invalid id in path: id is not a string: 42"),
        (body(path=["t", None]), "invalid id in path: id is not a string: None"),
        (body(path=["t", ""]), "invalid id in path: id of 0 characters (1-128): ''"),
        (body(path=["t", "x" * (MAX_ID_CHARS + 1)]), "invalid id in path"),
        (body(to=None), "from and to must be RFC 3339 strings"),
        (body(**{"from": 1704067200}), "from and to must be RFC 3339 strings"),
        (body(**{"from": "yesterday"}), "bad window: not an RFC 3339 instant"),
        (body(**{"from": "2024-01-01T00:00:00"}), "bad window: RFC 3339 instant needs a UTC"),
        (body(**{"from": WINDOW.to_text, "to": WINDOW.from_text}), "bad window: window start"),
        (body(to=WINDOW.from_text), "bad window: window start"),
        (body(run_id="20240101T000000Z-20240103T000000Z"), "does not match its window"),
    ],
)
def test_from_json_rejects_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(MessageError, match=re.escape(reason)):
        Envelope.from_json(raw)


@pytest.mark.parametrize("control", ["\x00", "\t", "\n", "\x1b", "\x7f", "\x85", "\x9f"])
def test_from_json_rejects_ids_when_they_hold_control_characters(control: str) -> None:
    with pytest.raises(MessageError, match="invalid id in path"):
        Envelope.from_json(body(path=["t", f"war{control}rior"]))


def test_from_json_rejects_ids_when_they_are_not_valid_unicode() -> None:
    # A lone surrogate is valid JSON ("\\ud800") but no UTF-8 store or URL takes it.
    raw = body(path=["t", "war\ud800rior"])

    with pytest.raises(MessageError, match="lone surrogate"):
        Envelope.from_json(raw)


def test_from_json_rejects_body_when_nested_deeper_than_the_parser_goes() -> None:
    # Under the size limit, but json.loads raises RecursionError, not ValueError.
    with pytest.raises(MessageError, match="not JSON"):
        Envelope.from_json("[" * 5000)


def test_checked_id_accepts_what_the_vendor_contract_allows() -> None:
    for good in ("a", "x" * MAX_ID_CHARS, "troop/1?#%+ ..", "wárrior 漢字 🚀"):
        assert checked_id(good) == good


def test_from_json_rejects_body_when_oversize() -> None:
    # Valid JSON, padded past the cap: rejected for its size before it is parsed.
    raw = body(padding="x" * MAX_BODY_BYTES)

    with pytest.raises(MessageError, match=f"over {MAX_BODY_BYTES} bytes"):
        Envelope.from_json(raw)


def test_from_json_counts_bytes_not_characters_when_sizing() -> None:
    # Fewer characters than the cap, but more UTF-8 bytes.
    raw = body(padding="🚀" * (MAX_BODY_BYTES // 4))

    assert len(raw) < MAX_BODY_BYTES
    with pytest.raises(MessageError, match="bytes"):
        Envelope.from_json(raw)


def test_from_json_rejects_a_message_of_the_wrong_run_even_when_ids_are_valid() -> None:
    other = Window.parse("2024-01-02T00:00:00Z", "2024-01-03T00:00:00Z")
    raw = Envelope(RUN, "troops", ("t",), other).to_json()

    with pytest.raises(MessageError, match="does not match its window"):
        Envelope.from_json(raw)
