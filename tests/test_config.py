"""The configuration: TLS only unless allowed, the vendor client's bounds, the env contract."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN, WINDOW

import pipeline.config
from pipeline.config import Config
from pipeline.dev import cli
from pipeline.dev.simulator import Simulator
from pipeline.errors import ConfigError

HTTPS = "https://vendor.example"
HTTP = "http://vendor.example"
FLAGS = ["--from", WINDOW.from_text, "--to", WINDOW.to_text, "--tick", "0.2"]


# -- TLS only ------------------------------------------------------------------------------


def test_http_vendor_url_is_refused_saying_how_to_allow_it() -> None:
    with pytest.raises(ConfigError) as raised:
        Config(vendor_url=HTTP)

    said = str(raised.value)
    assert HTTP in said
    assert "HARVEST_ALLOW_HTTP" in said
    assert "--allow-http" in said


def test_http_vendor_url_is_accepted_with_allow_http() -> None:
    assert Config(vendor_url=HTTP, allow_http=True).vendor_url == HTTP


def test_https_vendor_url_needs_no_allowance() -> None:
    assert Config(vendor_url=HTTPS).allow_http is False


@pytest.mark.parametrize(
    ("value", "allowed"),
    [("true", True), ("1", True), ("yes", True), ("TRUE", True), ("Yes", True)]
    + [("false", False), ("0", False), ("no", False), ("", False)],
)
def test_harvest_allow_http_reads_true_1_or_yes(value: str, allowed: bool) -> None:
    env = {"HARVEST_VENDOR_URL": HTTPS, "HARVEST_ALLOW_HTTP": value}

    assert Config.from_env(env).allow_http is allowed


def test_http_vendor_url_from_env_is_refused_without_harvest_allow_http() -> None:
    with pytest.raises(ConfigError, match="HARVEST_ALLOW_HTTP"):
        Config.from_env({"HARVEST_VENDOR_URL": HTTP})

    assert Config.from_env({"HARVEST_VENDOR_URL": HTTP, "HARVEST_ALLOW_HTTP": "1"}).allow_http


# -- the vendor client's bounds ------------------------------------------------------------


def test_vendor_bounds_default_to_the_documented_values() -> None:
    config = Config.from_env({"HARVEST_VENDOR_URL": HTTPS})

    assert (config.max_pages, config.max_retry_after, config.max_page_bytes) == (
        1000,
        60.0,
        8 * 1024 * 1024,
    )
    assert config == Config(vendor_url=HTTPS)


@pytest.mark.parametrize(
    ("field", "variable"),
    [
        ("max_pages", "HARVEST_MAX_PAGES"),
        ("max_retry_after", "HARVEST_MAX_RETRY_AFTER"),
        ("max_page_bytes", "HARVEST_MAX_PAGE_BYTES"),
    ],
)
@pytest.mark.parametrize("value", [0, -5])
def test_vendor_bounds_must_be_positive(field: str, variable: str, value: int) -> None:
    with pytest.raises(ConfigError, match=f"{field}.*{variable}.*> 0"):
        Config(vendor_url=HTTPS, **{field: value})
    with pytest.raises(ConfigError, match=variable):
        Config.from_env({"HARVEST_VENDOR_URL": HTTPS, variable: str(value)})


@pytest.mark.parametrize("variable", ["HARVEST_MAX_RETRY_AFTER"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_max_retry_after_must_be_a_finite_number(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Config.from_env({"HARVEST_VENDOR_URL": HTTPS, variable: value})


@pytest.mark.parametrize("variable", ["HARVEST_MAX_PAGES", "HARVEST_MAX_PAGE_BYTES"])
def test_vendor_bound_that_is_not_a_whole_number_is_a_config_error(variable: str) -> None:
    with pytest.raises(ConfigError, match="HARVEST_"):
        Config.from_env({"HARVEST_VENDOR_URL": HTTPS, variable: "lots"})


# -- the env contract ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"vendor_url": HTTP, "allow_http": True},
        {"max_pages": 7, "max_retry_after": 12.5, "max_page_bytes": 1234},
        {"drain_functions": {"troops": "h-drain-troops", "warriors": "h-drain-warriors"}},
    ],
)
def test_to_env_and_from_env_round_trip(changes: dict[str, Any]) -> None:
    config = Config(vendor_url=HTTPS, stage="warriors").with_(**changes)

    assert Config.from_env(config.to_env()) == config


def test_module_docstring_documents_every_new_variable() -> None:
    documented = set(re.findall(r"^(HARVEST_[A-Z_]+)", pipeline.config.__doc__ or "", re.M))

    assert {
        "HARVEST_ALLOW_HTTP",
        "HARVEST_MAX_PAGES",
        "HARVEST_MAX_RETRY_AFTER",
        "HARVEST_MAX_PAGE_BYTES",
    } <= documented
    # and every name to_env writes is documented
    full = Config(vendor_url=HTTP, allow_http=True, stage="troops", drain_functions={"troops": "f"})
    assert set(full.to_env()) <= documented


@pytest.mark.parametrize(
    "value", ['["h-drain-troops"]', '{"troops": 3}', '{"troops": ""}', "troops=h-drain"]
)
def test_drain_functions_that_are_not_stage_to_name_are_a_config_error(value: str) -> None:
    with pytest.raises(ConfigError, match="HARVEST_DRAIN_FUNCTIONS must be a JSON object"):
        Config.from_env({"HARVEST_VENDOR_URL": HTTPS, "HARVEST_DRAIN_FUNCTIONS": value})


# -- harvest local -------------------------------------------------------------------------


def test_harvest_local_refuses_an_http_vendor_url_without_allow_http(
    tmp_path: Path,
    simulator: Callable[..., Simulator],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a vendor on plain http
    sim = simulator()

    # WHEN `harvest local` is pointed at it without --allow-http
    argv = ["local", "--vendor-url", sim.url, "--token", TOKEN, "--out", str(tmp_path), *FLAGS]
    code = cli.main(argv)

    # THEN it refuses before any call, saying how to allow it
    assert code == 2
    assert "--allow-http" in capsys.readouterr().err
    assert sim.stats.requests == 0


def test_harvest_local_harvests_an_http_vendor_url_with_allow_http(
    tmp_path: Path, simulator: Callable[..., Simulator]
) -> None:
    sim = simulator()
    argv = ["local", "--vendor-url", sim.url, "--token", TOKEN, "--out", str(tmp_path), *FLAGS]

    code = cli.main([*argv, "--allow-http"])

    assert code == 0
    assert sim.stats.requests == sim.expected_calls(WINDOW.start, WINDOW.end)
