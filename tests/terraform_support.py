"""Finding the Terraform CLI's provider mirror and running it, for the Terraform tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

# The one IAM statement allowed a "*" resource: X-Ray's write actions have no
# resource-level permissions.
WILDCARD_RESOURCE_SIDS = {"XRayWrite"}
AWS_CREDENTIALS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


# The provider versions and checksums the stack is pinned to, committed beside it.
LOCK_FILE = ".terraform.lock.hcl"


def copy_stack(stack: Path, work: Path) -> None:
    """The stack's *.tf files and its lock file into `work`, so that init there keeps the
    committed provider pins (and fails if the provider mirror does not match them)."""
    for source in [*stack.glob("*.tf"), stack / LOCK_FILE]:
        shutil.copy(source, work / source.name)


def plugin_dir() -> Path | None:
    """The provider mirror: $HARVEST_TF_PLUGIN_DIR, else the parent of a registry.terraform.io."""
    configured = os.environ.get("HARVEST_TF_PLUGIN_DIR")
    if configured:
        return Path(configured) if Path(configured).is_dir() else None
    found = subprocess.run(
        ["find", "/", "-maxdepth", "4", "-type", "d", "-name", "registry.terraform.io"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return Path(found[0]).parent if found else None


def terraform_env(*, without_aws_credentials: bool = False) -> dict[str, str]:
    env = {**os.environ, "TF_IN_AUTOMATION": "1", "TF_INPUT": "0", "CHECKPOINT_DISABLE": "1"}
    # A CLI config path that does not exist only produces a warning on every command.
    if not Path(env.get("TF_CLI_CONFIG_FILE", "/")).is_file():
        env.pop("TF_CLI_CONFIG_FILE", None)
    if without_aws_credentials:
        # An override supplies fake credentials; real ones must not leak into the provider.
        for name in (
            "AWS_PROFILE",
            "AWS_SESSION_TOKEN",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ):
            env.pop(name, None)
    return env


def unquote(value: Any) -> Any:
    """python-hcl2 keeps string literals quoted and expressions as "${...}"; unquote literals."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if isinstance(value, list):
        return [unquote(v) for v in value]
    if isinstance(value, dict):
        return {unquote(k): unquote(v) for k, v in value.items() if not k.startswith("__")}
    return value
