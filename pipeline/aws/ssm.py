"""The vendor token, read at run time from an SSM SecureString (Powertools parameters)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.utilities import parameters

from pipeline.errors import ConfigError


def token_from_parameter(name: str) -> str:
    """The token the SSM SecureString `name` holds; cached for five minutes."""
    if not name:
        raise ConfigError(
            "no vendor token: set HARVEST_VENDOR_TOKEN_PARAMETER (an SSM SecureString)"
        )
    value: Any = parameters.get_parameter(name, decrypt=True, max_age=300)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"SSM parameter {name} holds no token")
    return value


def forget_tokens() -> None:
    """Drop the cached token, so that the next read asks SSM again (it may have been fixed)."""
    parameters.clear_caches()  # type: ignore[no-untyped-call]
