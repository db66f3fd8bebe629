"""The Terraform stack is well-formed and keeps the pipeline's topology invariants.

Fast and offline: `terraform fmt`/`validate` against the provider mirror, `terraform
console` for the locals, python-hcl2 for the static shape of the resources, and one plan
of a four-level vendor profile (`terraform test` with the real provider and no AWS:
terraform_support.offline_plan) to show that every per-stage resource follows the
profile's levels. What only a deployment can show is checked against moto in
tests/integration/test_terraform_apply.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from terraform_support import (
    LOCK_FILE,
    PLAN_ACCOUNT,
    PLAN_BUCKET,
    PLAN_REGION,
    WILDCARD_RESOURCE_SIDS,
    copy_stack,
    offline_plan,
    plugin_dir,
    terraform_env,
    write_profile_json,
)
from terraform_support import unquote as _unquote

from pipeline import profile as vendor_profile
from pipeline.compact import columns_for
from pipeline.local.scheduler import DRAIN_HANDLER, KICKOFF_HANDLER, load_handler

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "terraform"
DEFAULT_PROFILE = vendor_profile.load()
FOUR_LEVELS = ROOT / "tests" / "profiles" / "fleet-4-levels.toml"

# -- tools ---------------------------------------------------------------------------------


def terraform(cwd: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["terraform", f"-chdir={cwd}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=terraform_env(),
        check=False,
        timeout=300,
    )


@pytest.fixture(scope="module")
def tools() -> Path:
    if shutil.which("terraform") is None:
        pytest.skip("terraform CLI not on PATH")
    plugins = plugin_dir()
    if plugins is None:
        pytest.skip(
            "hashicorp/aws provider mirror not found: set HARVEST_TF_PLUGIN_DIR "
            "(no registry.terraform.io under / within depth 4)"
        )
    return plugins


@pytest.fixture(scope="module")
def initialized(tools: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of terraform/ initialized offline from the provider mirror."""
    work = tmp_path_factory.mktemp("stack")
    copy_stack(STACK, work)
    result = terraform(work, "init", "-backend=false", f"-plugin-dir={tools}", "-no-color")
    assert result.returncode == 0, result.stdout + result.stderr
    yield work
    # init copies the ~700 MB provider binary; pytest keeps old temp directories.
    shutil.rmtree(work / ".terraform", ignore_errors=True)


@pytest.fixture(scope="module")
def profile_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default profile's profile.json, as `make package` writes it beside the zip."""
    return write_profile_json(DEFAULT_PROFILE.source, tmp_path_factory.mktemp("build") / "p.json")


@pytest.fixture(scope="module")
def dummy_vars(profile_json: Path) -> list[str]:
    """The variables without a default."""
    return [
        "-var",
        "vendor_url=https://vendor.example",
        "-var",
        f"profile_json_path={profile_json}",
    ]


@pytest.fixture(scope="module")
def locals_(initialized: Path, profile_json: Path) -> dict[str, Any]:
    """The stack's locals, evaluated with the example tfvars (which must validate)."""
    expression = (
        "jsonencode({stages = local.stages, stage_order = local.stage_order, "
        "drain_schedule = local.drain_schedule, visibility_timeout = local.visibility_timeout, "
        "drain_timeout = var.drain_timeout, sqs_max_receive_count = local.sqs_max_receive_count, "
        "max_receive_count = var.max_receive_count, "
        "vendor_token_parameter_name = local.vendor_token_parameter_name})"
    )
    example = STACK / "terraform.tfvars.example"
    # Its profile_json_path (../build/profile.json) is not beside the copy in a temp dir.
    result = terraform(
        initialized,
        "console",
        "-no-color",
        f"-var-file={example}",
        *("-var", f"profile_json_path={profile_json}"),
        stdin=expression + "\n",
    )
    # `console` reports invalid variables on stderr but exits 0.
    assert result.returncode == 0 and "Error" not in result.stderr, result.stderr
    parsed: dict[str, Any] = json.loads(json.loads(result.stdout.strip()))
    return parsed


# -- HCL, statically -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def hcl() -> dict[str, dict[str, dict[str, Any]]]:
    """{"resource"/"data": {type: {name: body}}} merged over every terraform/*.tf."""
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 not installed (pip install python-hcl2)")
    merged: dict[str, dict[str, dict[str, Any]]] = {"resource": {}, "data": {}}
    for path in sorted(STACK.glob("*.tf")):
        with path.open() as f:
            parsed = _unquote(hcl2.load(f))
        for kind in ("resource", "data"):
            for block in parsed.get(kind, []):
                for type_, named in block.items():
                    merged[kind].setdefault(type_, {}).update(named)
    return merged


def resources(hcl: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = hcl["resource"].get(type_, {})
    return found


def statements(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Static and dynamic statements of an aws_iam_policy_document body."""
    yield from document.get("statement", [])
    for dynamic in document.get("dynamic", []):
        yield from dynamic.get("statement", {}).get("content", [])


def role_policy_documents(hcl: dict[str, Any]) -> set[str]:
    """The policy documents that end up in a role's policy, through source documents too."""
    documents = hcl["data"]["aws_iam_policy_document"]
    pending = [
        m
        for body in resources(hcl, "aws_iam_role_policy").values()
        for m in re.findall(r"data\.aws_iam_policy_document\.(\w+)", body["policy"])
    ]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for source in documents[name].get("source_policy_documents", []):
            pending += re.findall(r"data\.aws_iam_policy_document\.(\w+)", source)
    return seen


# -- tests ---------------------------------------------------------------------------------


def test_terraform_is_formatted(tools: Path) -> None:
    result = terraform(ROOT, "fmt", "-check", "-recursive", "-diff", "terraform/")
    assert result.returncode == 0, f"run `terraform fmt -recursive terraform/`:\n{result.stdout}"


def test_committed_lock_file_is_the_one_init_keeps(initialized: Path) -> None:
    # init against the provider mirror would add what the committed lock lacks
    assert (initialized / LOCK_FILE).read_text() == (STACK / LOCK_FILE).read_text()
    assert 'version     = "5.100.0"' in (STACK / LOCK_FILE).read_text()


def test_terraform_configuration_is_valid(initialized: Path) -> None:
    result = terraform(initialized, "validate", "-json")
    report = json.loads(result.stdout)
    assert report["valid"], json.dumps(report["diagnostics"], indent=2)
    assert report["warning_count"] == 0, json.dumps(report["diagnostics"], indent=2)


def test_example_tfvars_pass_every_variable_validation(locals_: dict[str, Any]) -> None:
    assert locals_["vendor_token_parameter_name"] == "/harvest/vendor-token"


def test_bad_variable_values_are_rejected(initialized: Path, dummy_vars: list[str]) -> None:
    bad = {
        "name_prefix": "Harvest_Prod",
        "drain_timeout": "1000",
        "max_receive_count": "0",
        "state_retention_days": "14",  # no longer than a DLQ keeps a message
    }
    assignments = [arg for k, v in bad.items() for arg in ("-var", f"{k}={v}")]
    result = terraform(
        initialized, "console", "-no-color", *dummy_vars, *assignments, stdin="var.name_prefix\n"
    )
    for name in bad:
        assert f"var.{name} is" in result.stderr, name
    assert result.stderr.count("Invalid value for variable") == len(bad)


def test_vendor_url_must_be_https_unless_insecure_urls_are_allowed(
    initialized: Path, profile_json: Path
) -> None:
    plain = [
        "-var",
        "vendor_url=http://127.0.0.1:8000",
        "-var",
        f"profile_json_path={profile_json}",
    ]
    refused = terraform(initialized, "console", "-no-color", *plain, stdin="var.vendor_url\n")
    assert "Invalid value for variable" in refused.stderr
    assert "must start with https://" in refused.stderr

    allow = ["-var", "allow_insecure_vendor_url=true"]
    allowed = terraform(
        initialized, "console", "-no-color", *plain, *allow, stdin="var.vendor_url\n"
    )
    assert "Error" not in allowed.stderr, allowed.stderr
    assert allowed.stdout.strip() == '"http://127.0.0.1:8000"'


def test_stage_map_is_the_packaged_profiles_stages(locals_: dict[str, Any]) -> None:
    expected = {
        s.name: {"child": s.child, "depth": s.depth, "key": s.level.key}
        for s in DEFAULT_PROFILE.stages
    }
    assert locals_["stages"] == expected


def test_stage_order_is_the_profiles_order(locals_: dict[str, Any]) -> None:
    assert locals_["stage_order"] == list(DEFAULT_PROFILE.stage_names)


def test_a_profile_json_that_breaks_the_fan_out_is_rejected(
    initialized: Path, tmp_path: Path
) -> None:
    # GIVEN a hand-edited profile.json: stages out of order, a key that is a points column,
    # a file outside the zip's profiles/
    broken = {
        "name": "broken",
        "stages": [
            {"name": "sites", "child": None, "depth": 2, "key": "site_id"},
            {"name": "regions", "child": "sites", "depth": 1, "key": "ts"},
        ],
        "keys": ["site_id", "ts"],
        "file": "vendor.toml",
    }
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(broken))
    args = ["-var", "vendor_url=https://vendor.example", "-var", f"profile_json_path={path}"]

    # WHEN Terraform reads it
    result = terraform(initialized, "console", "-no-color", *args, stdin="local.stages\n")

    # THEN each of the three checks names what is wrong
    assert result.stderr.count("Invalid value for variable") == 3, result.stderr
    for words in ("listed in order", "other than run_id, ts", "profiles/<name>.toml"):
        assert words in " ".join(result.stderr.split()), words


def test_a_missing_profile_json_asks_for_make_package(initialized: Path, tmp_path: Path) -> None:
    args = ["-var", "vendor_url=https://vendor.example"]
    args += ["-var", f"profile_json_path={tmp_path / 'profile.json'}"]
    result = terraform(initialized, "console", "-no-color", *args, stdin="local.stages\n")
    assert "Invalid value for variable" in result.stderr
    assert "run `make package` first" in " ".join(result.stderr.split())


def test_visibility_timeout_exceeds_drain_timeout(locals_: dict[str, Any]) -> None:
    assert locals_["visibility_timeout"] == locals_["drain_timeout"] + 60


def test_sqs_redrive_sits_one_receive_above_drain_dead_lettering(locals_: dict[str, Any]) -> None:
    assert locals_["sqs_max_receive_count"] == locals_["max_receive_count"] + 1


def test_drains_are_scheduled_every_minute(locals_: dict[str, Any]) -> None:
    assert locals_["drain_schedule"] == "rate(1 minute)"


def test_every_stage_queue_redrives_to_its_own_dlq(hcl: dict[str, Any]) -> None:
    queues = resources(hcl, "aws_sqs_queue")
    stage, dlq = queues["stage"], queues["dlq"]
    redrive = resources(hcl, "aws_sqs_queue_redrive_policy")["stage"]
    assert stage["for_each"] == dlq["for_each"] == redrive["for_each"] == "${local.stages}"
    assert redrive["queue_url"] == "${aws_sqs_queue.stage[each.key].id}"
    assert "deadLetterTargetArn = aws_sqs_queue.dlq[each.key].arn" in redrive["redrive_policy"]
    assert "maxReceiveCount = local.sqs_max_receive_count" in redrive["redrive_policy"]
    assert stage["visibility_timeout_seconds"] == "${local.visibility_timeout}"
    assert dlq["message_retention_seconds"] == 14 * 24 * 3600
    assert stage["sqs_managed_sse_enabled"] is True and dlq["sqs_managed_sse_enabled"] is True


def test_stage_queues_keep_messages_as_long_as_their_dlqs(hcl: dict[str, Any]) -> None:
    # A long token outage leaves messages queued: they must not expire silently.
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 not installed (pip install python-hcl2)")
    with (STACK / "variables.tf").open() as f:
        variables = {k: v for b in _unquote(hcl2.load(f))["variable"] for k, v in b.items()}
    queues = resources(hcl, "aws_sqs_queue")
    assert queues["stage"]["message_retention_seconds"] == "${var.queue_retention_seconds}"
    assert variables["queue_retention_seconds"]["default"] == 14 * 24 * 3600
    assert queues["dlq"]["message_retention_seconds"] == 14 * 24 * 3600


def test_an_unsettled_run_alarms_on_the_metric_the_drains_publish(hcl: dict[str, Any]) -> None:
    alarm = resources(hcl, "aws_cloudwatch_metric_alarm")["run_not_settled"]
    assert alarm["metric_name"] == "OldestUnsettledRunAge"
    # The functions' Powertools namespace and service name, from the same locals.
    assert alarm["namespace"] == "${local.metrics_namespace}"
    assert alarm["dimensions"] == {"service": "${local.service_name}"}
    assert (alarm["statistic"], alarm["period"]) == ("Maximum", 300)
    assert alarm["threshold"] == "${var.run_settle_alarm_seconds}"
    assert alarm["treat_missing_data"] == "notBreaching"
    assert alarm["alarm_actions"] == ["${aws_sns_topic.alarms.arn}"]


def test_every_dlq_allows_redrive_only_from_its_stage_queue(hcl: dict[str, Any]) -> None:
    allow = resources(hcl, "aws_sqs_queue_redrive_allow_policy")["dlq"]
    # Off only where the emulator lacks the attribute (moto), never per stage.
    assert allow["for_each"] == "${var.enable_redrive_allow_policy ? local.stages : {}}"
    assert allow["queue_url"] == "${aws_sqs_queue.dlq[each.key].id}"
    assert 'redrivePermission = "byQueue"' in allow["redrive_allow_policy"]
    assert "sourceQueueArns = [aws_sqs_queue.stage[each.key].arn]" in allow["redrive_allow_policy"]


def test_every_drain_has_a_rule_a_target_and_a_permission(hcl: dict[str, Any]) -> None:
    drain = resources(hcl, "aws_lambda_function")["drain"]
    rule = resources(hcl, "aws_cloudwatch_event_rule")["drain"]
    target = resources(hcl, "aws_cloudwatch_event_target")["drain"]
    permission = resources(hcl, "aws_lambda_permission")["drain"]

    for block in (drain, rule, target, permission):
        assert block["for_each"] == "${local.stages}"
    assert rule["schedule_expression"] == "${local.drain_schedule}"
    assert target["rule"] == "${aws_cloudwatch_event_rule.drain[each.key].name}"
    assert target["arn"] == "${aws_lambda_function.drain[each.key].arn}"
    assert permission["principal"] == "events.amazonaws.com"
    assert permission["action"] == "lambda:InvokeFunction"
    assert permission["function_name"] == "${aws_lambda_function.drain[each.key].function_name}"
    assert permission["source_arn"] == "${aws_cloudwatch_event_rule.drain[each.key].arn}"


def test_kickoff_has_a_rule_a_target_and_a_permission(hcl: dict[str, Any]) -> None:
    rule = resources(hcl, "aws_cloudwatch_event_rule")["kickoff"]
    target = resources(hcl, "aws_cloudwatch_event_target")["kickoff"]
    permission = resources(hcl, "aws_lambda_permission")["kickoff"]
    assert rule["schedule_expression"] == "${var.kickoff_schedule}"
    assert target["arn"] == "${aws_lambda_function.kickoff.arn}"
    assert permission["principal"] == "events.amazonaws.com"
    assert permission["source_arn"] == "${aws_cloudwatch_event_rule.kickoff.arn}"


def test_functions_run_python312_traced_with_the_packaged_zip(hcl: dict[str, Any]) -> None:
    functions = resources(hcl, "aws_lambda_function")
    assert set(functions) == {"kickoff", "drain", "replay"}
    for name, body in functions.items():
        assert body["runtime"] == "python3.12", name
        assert body["tracing_config"][0]["mode"] == "Active", name
        assert body["filename"] == "${var.lambda_zip_path}", name
        assert body["source_code_hash"] == "${filebase64sha256(var.lambda_zip_path)}", name
        assert f"aws_cloudwatch_log_group.{name}" in str(body["depends_on"]), name


def test_local_runs_invoke_the_handlers_the_functions_deploy(hcl: dict[str, Any]) -> None:
    functions = resources(hcl, "aws_lambda_function")
    assert functions["kickoff"]["handler"] == KICKOFF_HANDLER
    assert functions["drain"]["handler"] == DRAIN_HANDLER
    for spec in (KICKOFF_HANDLER, DRAIN_HANDLER):
        assert callable(load_handler(spec)), spec


def test_role_policies_name_their_resources(hcl: dict[str, Any]) -> None:
    documents = hcl["data"]["aws_iam_policy_document"]
    role_documents = role_policy_documents(hcl)
    assert {"kickoff", "drain", "replay"} <= role_documents

    for name in sorted(role_documents):
        for statement in statements(documents[name]):
            sid = statement.get("sid", "?")
            actions = statement["actions"]
            assert all("*" not in a for a in actions), f"{name}/{sid}: wildcard action {actions}"
            assert "not_actions" not in statement and "not_resources" not in statement
            resources_ = statement["resources"]
            if sid in WILDCARD_RESOURCE_SIDS:
                continue
            listed = resources_ if isinstance(resources_, list) else [resources_]
            assert "*" not in listed, f"{name}/{sid}: '*' resource"
            assert all(r.strip() for r in listed), f"{name}/{sid}: empty resource"


def test_only_xray_statement_uses_a_wildcard_resource(hcl: dict[str, Any]) -> None:
    xray = list(statements(hcl["data"]["aws_iam_policy_document"]["xray"]))
    assert [s["sid"] for s in xray] == ["XRayWrite"]
    assert xray[0]["resources"] == ["*"]
    assert set(xray[0]["actions"]) == {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}


def test_state_table_has_the_ledger_keys_ttl_pitr_and_encryption(hcl: dict[str, Any]) -> None:
    table = resources(hcl, "aws_dynamodb_table")["state"]
    assert (table["hash_key"], table["range_key"]) == ("pk", "sk")
    assert table["billing_mode"] == "PAY_PER_REQUEST"
    assert {(a["name"], a["type"]) for a in table["attribute"]} == {("pk", "S"), ("sk", "S")}
    assert table["ttl"][0] == {"attribute_name": "expires_at", "enabled": True}
    assert table["point_in_time_recovery"][0]["enabled"] is True
    assert table["server_side_encryption"][0]["enabled"] is True


def test_every_variable_has_description_type_and_validation() -> None:
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 not installed (pip install python-hcl2)")
    with (STACK / "variables.tf").open() as f:
        variables = _unquote(hcl2.load(f))["variable"]
    for block in variables:
        for name, body in block.items():
            assert body.get("description"), name
            assert "type" in body, name
            if body["type"] == "bool":
                # A flag's only bad value is null.
                assert body.get("nullable") is False, f"flag {name} must be nullable = false"
            else:
                assert body.get("validation"), f"variable {name} has no validation"


def test_vendor_token_is_sensitive_and_never_output(hcl: dict[str, Any]) -> None:
    hcl2 = pytest.importorskip("hcl2", reason="python-hcl2 not installed (pip install python-hcl2)")
    with (STACK / "variables.tf").open() as f:
        variables = {k: v for b in _unquote(hcl2.load(f))["variable"] for k, v in b.items()}
    with (STACK / "outputs.tf").open() as f:
        outputs = {k: v for b in _unquote(hcl2.load(f))["output"] for k, v in b.items()}
    assert variables["vendor_token"]["sensitive"] is True
    for name, body in outputs.items():
        value = str(body["value"])
        assert not re.search(r"var\.vendor_token\b(?!_)", value), name
        assert "aws_ssm_parameter.vendor_token" not in value, name


# -- a plan of another vendor: four levels ---------------------------------------------------

PLAN_PREFIX = "fleet"
FOUR_LEVEL_PROFILE = vendor_profile.load(str(FOUR_LEVELS))
LEVELS = list(FOUR_LEVEL_PROFILE.stage_names)  # regions, sites, devices, channels

# Every resource made once per stage.
PER_STAGE = (
    "aws_sqs_queue.stage",
    "aws_sqs_queue.dlq",
    "aws_sqs_queue_redrive_policy.stage",
    "aws_sqs_queue_redrive_allow_policy.dlq",
    "aws_cloudwatch_log_group.drain",
    "aws_iam_role.drain",
    "aws_iam_role_policy.drain",
    "aws_lambda_function.drain",
    "aws_lambda_function_event_invoke_config.drain",
    "aws_cloudwatch_event_rule.drain",
    "aws_cloudwatch_event_target.drain",
    "aws_lambda_permission.drain",
    "aws_cloudwatch_metric_alarm.dlq_not_empty",
    "aws_cloudwatch_metric_alarm.oldest_message",
    "aws_cloudwatch_metric_alarm.drain_errors",
)


@pytest.fixture(scope="module")
def four_level_plan(initialized: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """{address: planned values} of the stack deploying the four-level test profile, and
    {"output.<name>": value} of its outputs."""
    build = tmp_path_factory.mktemp("fleet-build")
    (build / "lambda.zip").write_bytes(b"not read by a plan, only hashed")
    variables = {
        "name_prefix": PLAN_PREFIX,
        "vendor_url": "https://fleet.example",
        "lambda_zip_path": str(build / "lambda.zip"),
        "profile_json_path": str(write_profile_json(str(FOUR_LEVELS), build / "profile.json")),
    }
    plan = offline_plan(initialized, variables, LEVELS)
    planned = {r["address"]: r["change"]["after"] for r in plan["resource_changes"]}
    planned.update({f"output.{k}": v.get("after") for k, v in plan["output_changes"].items()})
    return planned


def instances(planned: dict[str, Any], resource: str) -> dict[str, Any]:
    """The for_each instances of `resource` in the plan, by key."""
    return {
        json.loads(address[len(resource) + 1 : -1]): after
        for address, after in planned.items()
        if address.startswith(f"{resource}[")
    }


def test_plan_makes_every_per_stage_resource_once_per_profile_level(
    four_level_plan: dict[str, Any],
) -> None:
    for resource in PER_STAGE:
        assert sorted(instances(four_level_plan, resource)) == sorted(LEVELS), resource
    assert "troops" not in json.dumps(four_level_plan)


def test_plan_names_queues_drains_and_schedules_after_the_levels(
    four_level_plan: dict[str, Any],
) -> None:
    queues = instances(four_level_plan, "aws_sqs_queue.stage")
    dlqs = instances(four_level_plan, "aws_sqs_queue.dlq")
    drains = instances(four_level_plan, "aws_lambda_function.drain")
    rules = instances(four_level_plan, "aws_cloudwatch_event_rule.drain")
    for level in LEVELS:
        assert queues[level]["name"] == f"{PLAN_PREFIX}-{level}"
        assert dlqs[level]["name"] == f"{PLAN_PREFIX}-{level}-dlq"
        assert drains[level]["function_name"] == f"{PLAN_PREFIX}-drain-{level}"
        assert rules[level]["name"] == f"{PLAN_PREFIX}-drain-{level}"
        assert rules[level]["schedule_expression"] == "rate(1 minute)"
    assert four_level_plan["output.profile"] == {
        "name": "fleet-4-levels",
        "file": "profiles/fleet-4-levels.toml",
        "stages": LEVELS,
    }


def test_every_function_runs_the_packaged_profile_and_knows_every_levels_queues(
    four_level_plan: dict[str, Any],
) -> None:
    functions = {
        "kickoff": four_level_plan["aws_lambda_function.kickoff"],
        "replay": four_level_plan["aws_lambda_function.replay"],
        **instances(four_level_plan, "aws_lambda_function.drain"),
    }
    queue_url = f"https://sqs.{PLAN_REGION}.amazonaws.com/{PLAN_ACCOUNT}/{PLAN_PREFIX}"
    for name, function in functions.items():
        [environment] = function["environment"]
        env = environment["variables"]
        # The path inside the zip, whose root is Lambda's working directory.
        assert env["HARVEST_PROFILE"] == "profiles/fleet-4-levels.toml", name
        assert env.get("HARVEST_STAGE") == (name if name in LEVELS else None)
        assert json.loads(env["HARVEST_QUEUES"]) == {
            level: {"url": f"{queue_url}-{level}", "dlq_url": f"{queue_url}-{level}-dlq"}
            for level in LEVELS
        }
        assert env["HARVEST_SINK"] == f"s3://{PLAN_BUCKET}/harvest"
        assert json.loads(env["HARVEST_DRAIN_FUNCTIONS"]) == {
            level: f"{PLAN_PREFIX}-drain-{level}" for level in LEVELS
        }


def _statements(planned: dict[str, Any], document: str) -> dict[str, list[str]]:
    """Sid -> resources of a policy document's own statements in the plan."""
    return {s["sid"]: s["resources"] for s in planned[document]["statement"]}


def test_the_kickoff_feeds_the_first_level_and_each_drain_the_next(
    four_level_plan: dict[str, Any],
) -> None:
    arn = f"arn:aws:sqs:{PLAN_REGION}:{PLAN_ACCOUNT}:{PLAN_PREFIX}"
    function = f"arn:aws:lambda:{PLAN_REGION}:{PLAN_ACCOUNT}:function:{PLAN_PREFIX}"
    kickoff = _statements(four_level_plan, "data.aws_iam_policy_document.kickoff")
    assert kickoff["EnqueueFirstStage"] == [f"{arn}-regions"]
    for level, child in zip(LEVELS, [*LEVELS[1:], None], strict=True):
        drain = _statements(four_level_plan, f'data.aws_iam_policy_document.drain["{level}"]')
        assert drain["ConsumeOwnQueue"] == [f"{arn}-{level}"]
        assert drain["DeadLetterOwnQueue"] == [f"{arn}-{level}-dlq"]
        assert drain.get("FeedChildQueue") == ([f"{arn}-{child}"] if child else None), level
        assert sorted(drain["WatchStageQueues"]) == sorted(f"{arn}-{s}" for s in LEVELS)
        # A drain may start its own successor, and no other function.
        assert drain["StartSuccessor"] == [f"{function}-drain-{level}"]
    # The kickoff may start every level's drain, and nothing else.
    assert sorted(kickoff["StartDrains"]) == sorted(f"{function}-drain-{s}" for s in LEVELS)


def test_glue_columns_are_the_ones_compaction_writes_for_the_profile(
    four_level_plan: dict[str, Any],
) -> None:
    [descriptor] = four_level_plan["aws_glue_catalog_table.points"]["storage_descriptor"]
    columns = [(c["name"], c["type"]) for c in descriptor["columns"]]
    # run_id, region_id, site_id, device_id, channel_id, ts, value
    assert columns == [(name, glue) for name, _, glue in columns_for(FOUR_LEVEL_PROFILE.keys)]


def test_dashboard_has_a_queue_row_and_a_vendor_calls_series_per_level(
    four_level_plan: dict[str, Any],
) -> None:
    body = json.loads(four_level_plan["aws_cloudwatch_dashboard.this[0]"]["dashboard_body"])
    titles = [w["properties"]["title"] for w in body["widgets"]]
    assert titles[: len(LEVELS)] == [f"Queue depth: {level}" for level in LEVELS]
    [calls] = [w for w in body["widgets"] if w["properties"]["title"] == "Vendor calls per minute"]
    stages = [m[5] for m in calls["properties"]["metrics"] if len(m) > 6 and m[4] == "stage"]
    assert sorted(stages) == sorted(LEVELS)
