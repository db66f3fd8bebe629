"""Finding the Terraform CLI's provider mirror and running it, for the Terraform tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from scripts import package

# The one IAM statement allowed a "*" resource: X-Ray's write actions have no
# resource-level permissions.
WILDCARD_RESOURCE_SIDS = {"XRayWrite"}
AWS_CREDENTIALS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


# Where offline_plan pretends to be.
PLAN_REGION = "us-east-1"
PLAN_ACCOUNT = "123456789012"
PLAN_BUCKET = "harvest-plan-output"

# The provider versions and checksums the stack is pinned to, committed beside it.
LOCK_FILE = ".terraform.lock.hcl"


def copy_stack(stack: Path, work: Path) -> None:
    """The stack's *.tf files and its lock file into `work`, so that init there keeps the
    committed provider pins (and fails if the provider mirror does not match them)."""
    for source in [*stack.glob("*.tf"), stack / LOCK_FILE]:
        shutil.copy(source, work / source.name)


def write_profile_json(name_or_path: str, out: Path) -> Path:
    """The profile.json scripts/package.py writes beside the zip, without building the zip."""
    return package.write_profile_json(package.choose_profile(name_or_path), out)


# `terraform test` with the real provider and no AWS at all: fake credentials, no account
# or credential lookup, the account id given by an override instead of STS, and the two
# services a provider could call at plan time pointed at a closed local port, so nothing
# leaves the machine. A plan of a new stack reads no resource.
OFFLINE_PROVIDER = f"""\
provider "aws" {{
  region                      = "{PLAN_REGION}"
  access_key                  = "test"
  secret_key                  = "test"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  max_retries                 = 1

  endpoints {{
    sts = "http://127.0.0.1:9"
    iam = "http://127.0.0.1:9"
  }}
}}

override_data {{
  target = data.aws_caller_identity.current
  values = {{ account_id = "{PLAN_ACCOUNT}" }}
}}
"""


def _known_at_plan(address: str, arn: str, **more: str) -> str:
    """An override giving `address` the ids AWS would, so that what names them (policies,
    HARVEST_QUEUES, HARVEST_SINK) is known in the plan rather than "known after apply"."""
    values = "\n".join(f"    {k} = {json.dumps(v)}" for k, v in {"arn": arn, **more}.items())
    return (
        f"override_resource {{\n  target          = {address}\n  override_during = plan\n"
        f"  values = {{\n{values}\n  }}\n}}\n"
    )


def offline_plan(work: Path, variables: dict[str, Any], stages: list[str]) -> dict[str, Any]:
    """The JSON plan (`terraform show -json`'s resource_changes and output_changes) of the
    stack initialized in `work` for `variables`, whose profile has `stages`: made by
    `terraform test -verbose` with the real provider, offline (OFFLINE_PROVIDER). The stage
    queues, DLQs and the output bucket get the ARNs and URLs AWS would give them."""
    prefix = variables.get("name_prefix", "harvest")
    sqs = f"arn:aws:sqs:{PLAN_REGION}:{PLAN_ACCOUNT}"
    queue_url = f"https://sqs.{PLAN_REGION}.amazonaws.com/{PLAN_ACCOUNT}"
    overrides = []
    for stage in stages:
        for kind, suffix in (("stage", ""), ("dlq", "-dlq")):
            name = f"{prefix}-{stage.replace('_', '-')}{suffix}"
            address = f'aws_sqs_queue.{kind}["{stage}"]'
            overrides.append(_known_at_plan(address, f"{sqs}:{name}", url=f"{queue_url}/{name}"))
    overrides.append(
        _known_at_plan("aws_s3_bucket.output", f"arn:aws:s3:::{PLAN_BUCKET}", id=PLAN_BUCKET)
    )
    # Removed afterwards: `terraform validate` in `work` would check them too.
    tests, var_file = work / "tests", work / "offline.tfvars.json"
    tests.mkdir()
    try:
        (tests / "offline.tftest.hcl").write_text(
            "\n".join([OFFLINE_PROVIDER, *overrides, 'run "plan" {\n  command = plan\n}\n'])
        )
        var_file.write_text(json.dumps(variables))
        result = subprocess.run(
            [
                "terraform",
                f"-chdir={work}",
                "test",
                "-json",
                "-verbose",
                "-no-color",
                f"-var-file={var_file.name}",
            ],
            capture_output=True,
            text=True,
            env=terraform_env(without_aws_credentials=True),
            check=False,
            timeout=300,
        )
    finally:
        shutil.rmtree(tests)
        var_file.unlink(missing_ok=True)
    messages = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    errors = [m["@message"] for m in messages if m.get("@level") == "error"]
    assert result.returncode == 0 and not errors, "\n".join(errors) or result.stderr
    [plan] = [m["test_plan"] for m in messages if m.get("type") == "test_plan"]
    return {k: plan[k] for k in ("resource_changes", "output_changes")}


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
        for name in AWS_CREDENTIALS:
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
