"""The vendor profile: the packaged and test profiles load; a bad one gives one clear line."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest

from pipeline import profile
from pipeline.errors import ConfigError
from pipeline.profile import AuthKind, PaginationKind, TimeFormat

ROOT = Path(__file__).resolve().parent.parent
FLEET = ROOT / "tests" / "profiles" / "fleet-4-levels.toml"
ORBIT = ROOT / "tests" / "profiles" / "orbit-offset-apikey.toml"


def hermes_data() -> dict[str, Any]:
    with (ROOT / "profiles" / "hermes-v1.toml").open("rb") as f:
        return tomllib.load(f)


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as raised:
        profile.parse(data, source="vendor.toml")
    message = str(raised.value)
    assert "\n" not in message  # one line
    return message


def test_default_profile_is_hermes_v1_with_the_contracts_three_stages() -> None:
    p = profile.load()
    assert p.name == "hermes-v1"
    assert p.stage_names == ("troops", "warriors", "data_groups")
    assert [s.child for s in p.stages] == ["warriors", "data_groups", None]
    assert p.root.path == "/v1/troops"
    assert [s.listing.path for s in p.stages] == [
        "/v1/troops/{troop_id}/warriors",
        "/v1/warriors/{warrior_id}/data-groups",
        "/v1/data-groups/{data_group_id}/data",
    ]
    assert p.keys == ("troop_id", "warrior_id", "data_group_id")
    assert p.auth.kind == AuthKind.BEARER
    assert p.root.pagination.kind == PaginationKind.CURSOR
    assert p.statuses.gone == {404} and p.statuses.auth == {401}


def test_profile_is_found_by_packaged_name_or_by_path() -> None:
    assert profile.load("hermes-v1") == profile.load(str(ROOT / "profiles" / "hermes-v1.toml"))


def test_four_level_profile_reads_its_levels_paging_auth_and_point_formats() -> None:
    p = profile.load(str(FLEET))
    assert p.stage_names == ("regions", "sites", "devices", "channels")
    assert p.stages[2].listing.path == "/api/regions/{region_id}/devices/{device_id}/channels"
    assert p.stages[2].ids(["r", "s", "d"]) == {"region_id": "r", "site_id": "s", "device_id": "d"}
    assert p.auth.kind == AuthKind.BASIC and p.auth.username == "harvester"
    assert p.root.pagination.kind == PaginationKind.LINK
    assert p.data.listing.pagination.kind == PaginationKind.PAGE_NUMBER
    assert p.data.listing.pagination.page_size == 40
    assert (p.data.window_format, p.data.ts_format) == (TimeFormat.UNIX, TimeFormat.UNIX_MS)
    assert p.levels[3].id_field == "name"


def test_offset_profile_reads_its_api_key_headers_and_status_codes() -> None:
    p = profile.load(str(ORBIT))
    assert p.stage_names == ("accounts", "monitors")
    assert p.auth.kind == AuthKind.HEADER and p.auth.header == "X-Api-Key"
    assert p.levels[1].numeric_ids
    assert p.data.listing.records == "data.points"
    assert p.rate_limit.limit == "RateLimit-Limit"
    assert p.statuses.gone == {404, 410} and p.statuses.auth == {401, 403}


def test_an_unknown_key_is_named_with_where_it_is() -> None:
    data = hermes_data()
    data["levels"][1]["recrods"] = "items"
    message = error_of(data)
    assert message.startswith("profile vendor.toml: levels[1].recrods: unknown key")


def test_a_listing_missing_its_parents_path_parameter_is_refused() -> None:
    data = hermes_data()
    data["levels"][1]["path"] = "/v1/warriors"
    message = error_of(data)
    assert "levels[1].path: missing path parameter {troop_id}" in message


def test_a_placeholder_naming_no_level_above_is_refused() -> None:
    data = hermes_data()
    data["data"]["path"] = "/v1/data-groups/{group_id}/data"
    assert "data.path: {group_id} is not the key of a level above" in error_of(data)


def test_a_level_without_an_id_field_is_refused() -> None:
    data = hermes_data()
    del data["levels"][2]["id"]
    assert "levels[2].id: missing (required)" in error_of(data)


def test_bad_values_name_their_key() -> None:
    cases: list[tuple[str, Any, str]] = [
        ("pagination.type", "pages", "pagination.type: 'pages' is not one of"),
        ("pagination.page_size", 0, "pagination.page_size: must be 1-100000"),
        ("auth.type", "oauth", "auth.type: 'oauth' is not one of"),
        ("status.gone", [404, "x"], "status.gone[1]: not an HTTP status code"),
        ("status.poison", [400, 404], "status.poison: 404 is also in status.gone"),
        ("levels", [], "levels: needs at least one level"),
    ]
    for dotted, value, expected in cases:
        data = copy.deepcopy(hermes_data())
        *path, last = dotted.split(".")
        table = data
        for part in path:
            table = table.setdefault(part, {})
        table[last] = value
        assert expected in error_of(data), dotted


def test_level_names_and_keys_are_unique_and_keys_are_not_record_fields() -> None:
    data = hermes_data()
    data["levels"][2]["name"] = "troops"
    assert "levels[2].name: 'troops' is also levels[0]" in error_of(data)
    data = hermes_data()
    data["levels"][0]["key"] = "run_id"
    assert "levels[0].key: 'run_id' is an output record or table field" in error_of(data)


def test_a_missing_file_names_the_packaged_profiles() -> None:
    with pytest.raises(ConfigError, match="no such file.*hermes-v1"):
        profile.load("/nowhere/vendor.toml")


def test_a_file_that_is_not_toml_says_so(tmp_path: Path) -> None:
    bad = tmp_path / "vendor.toml"
    bad.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        profile.load(str(bad))


def test_a_one_level_profile_is_a_single_stage_straight_to_data() -> None:
    p = profile.parse(
        {
            "name": "flat",
            "levels": [{"name": "sensors", "key": "sensor_id", "path": "/sensors", "id": "id"}],
            "data": {"path": "/sensors/{sensor_id}/points"},
        }
    )
    [only] = p.stages
    assert (only.name, only.child, only.depth) == ("sensors", None, 1)
    assert only.data is p.data and only.listing.path == "/sensors/{sensor_id}/points"


def test_a_placeholder_with_a_format_or_a_literal_brace_is_refused() -> None:
    data = hermes_data()
    data["levels"][1]["path"] = "/v1/troops/{troop_id!r}/warriors"
    assert "levels[1].path: {troop_id} takes no format or conversion" in error_of(data)
    data = hermes_data()
    data["levels"][1]["path"] = "/v1/troops/{troop_id}/{{x}}"
    assert "a literal brace is not allowed" in error_of(data)


def test_a_level_key_may_not_be_a_column_of_the_compacted_table() -> None:
    data = hermes_data()
    data["levels"][2]["key"] = "value"
    assert "levels[2].key: 'value' is an output record or table field" in error_of(data)


def test_fields_that_no_body_could_hold_apart_are_refused() -> None:
    data = hermes_data()
    data["levels"][0]["records"] = ""
    assert "levels[0].records: '' (the body is the list) leaves no place" in error_of(data)
    data = hermes_data()
    data["pagination"]["cursor_field"] = "items.next"
    assert "levels[0].records: 'items' and the cursor field 'items.next' overlap" in error_of(data)
    data = hermes_data()
    data["data"]["points"] = {"ts": "p", "value": "p.v"}
    assert "data.points: ts 'p' and value 'p.v' overlap" in error_of(data)


def test_settings_that_would_poison_every_message_are_refused() -> None:
    cases: list[tuple[str, Any, str]] = [
        ("levels.1.path", "/v1/troops/{troop_id}/warriors?kind=a", "holds a query or fragment"),
        ("levels.2.id", "", "levels[2].id: must name the field"),
        ("data.points", {"ts": ""}, "data.points.ts: must name a field"),
        ("data.window", {"from": "t", "to": "t"}, "data.window: from and to are both 't'"),
        ("auth", {"type": "header", "header": "X-Key", "prefix": "Key\n"}, "auth.prefix"),
        ("levels.2.key", "Troop_ID", "levels[2].key: 'Troop_ID' is also levels[0]"),
        ("levels.2.key", "DT", "is an output record or table field"),
        ("levels.1.name", "troops_dlq", "ends in _dlq"),
    ]
    for dotted, value, expected in cases:
        data = copy.deepcopy(hermes_data())
        *path, last = dotted.split(".")
        table: Any = data
        for part in path:
            table = table[int(part)] if part.isdigit() else table[part]
        table[int(last) if last.isdigit() else last] = value
        assert expected in error_of(data), dotted
