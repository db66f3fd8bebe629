"""The real terraform/ stack, applied to a moto server, deploys what the handlers expect.

The stack is copied to a temporary directory and pointed at moto by one generated
`moto_override.tf` (Terraform's override files merge into the provider block), so the
configuration under test is the one users apply, and the repository is never modified.
The only differences are two variables: moto has no SQS redrive-allow policy
(`enable_redrive_allow_policy = false`), and it evaluates S3 bucket policies without their
conditions, so the TLS-only deny would block every request
(`enable_tls_only_bucket_policy = false`).

moto stores Lambda functions but cannot run them, so the harvest at the end calls the
handlers in this process with exactly the environment Terraform gave each function, the
vendor played by the simulator, and AWS played by the same moto server.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from terraform_support import WILDCARD_RESOURCE_SIDS, plugin_dir, terraform_env

import pipeline.config
from pipeline.config import Config
from pipeline.simulator import Simulator, SimulatorConfig
from pipeline.stages import STAGE_NAMES

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "terraform"
REGION = "us-east-1"
NAME_PREFIX = "hvit"
WINDOW = {"from": "2024-03-01T00:00:00Z", "to": "2024-03-02T00:00:00Z"}
START = datetime(2024, 3, 1, tzinfo=UTC)
END = datetime(2024, 3, 2, tzinfo=UTC)
SIMULATED = SimulatorConfig(troops=2, warriors_per_troop=2, data_groups_per_warrior=2)

# Everything the provider talks to, pointed at moto.
ENDPOINTS = "cloudwatch dynamodb events iam kms lambda logs s3 sns sqs ssm sts".split()
MAX_RECEIVE_COUNT = 3
DRAIN_TIMEOUT = 60


def terraform(cwd: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["terraform", f"-chdir={cwd}", *args],
        capture_output=True,
        text=True,
        env=terraform_env(without_aws_credentials=True),
        check=False,
        timeout=timeout,
    )
    assert result.returncode == 0, f"terraform {args[0]} failed:\n{result.stdout}\n{result.stderr}"
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def override(endpoint: str) -> str:
    """A provider override that sends every call to moto with fake credentials."""
    endpoints = "\n".join(f'    {name} = "{endpoint}"' for name in ENDPOINTS)
    return f"""provider "aws" {{
  region                      = "{REGION}"
  access_key                  = "test"
  secret_key                  = "test"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
  s3_use_path_style           = true

  endpoints {{
{endpoints}
  }}
}}
"""


# -- fixtures --------------------------------------------------------------------------------


@dataclass
class Deployment:
    endpoint: str
    workdir: Path
    variables: dict[str, Any]
    outputs: dict[str, Any]
    simulator: Simulator
    timings: dict[str, float] = field(default_factory=dict)

    def client(self, service: Any) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )

    @property
    def function_names(self) -> dict[str, str]:
        drains = {f"drain:{s}": n for s, n in self.outputs["drain_function_names"].items()}
        return {
            "kickoff": self.outputs["kickoff_function_name"],
            "replay": self.outputs["replay_function_name"],
            **drains,
        }

    def environment(self, function_name: str) -> dict[str, str]:
        config = self.client("lambda").get_function_configuration(FunctionName=function_name)
        variables: dict[str, str] = config["Environment"]["Variables"]
        return variables


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
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    return plugins


@pytest.fixture(scope="module")
def moto_endpoint(tools: Path) -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    # moto's werkzeug logs every request (hundreds of provider polls) at INFO.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def lambda_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real deployment zip, built by scripts/package.py."""
    out = tmp_path_factory.mktemp("package") / "lambda.zip"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "package.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def simulator() -> Iterator[Simulator]:
    with Simulator(SIMULATED) as sim:
        yield sim


@pytest.fixture(scope="module")
def deployment(
    tools: Path,
    moto_endpoint: str,
    lambda_zip: Path,
    simulator: Simulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("stack")
    for source in STACK.glob("*.tf"):
        shutil.copy(source, work / source.name)
    (work / "moto_override.tf").write_text(override(moto_endpoint))
    variables: dict[str, Any] = {
        "name_prefix": NAME_PREFIX,
        "tags": {"project": "harvest", "purpose": "integration-test"},
        "vendor_url": simulator.url,
        "vendor_token": SIMULATED.token,
        "rate_calls": SIMULATED.rate_calls,
        "rate_period": SIMULATED.rate_period,
        "max_receive_count": MAX_RECEIVE_COUNT,
        "drain_timeout": DRAIN_TIMEOUT,
        "lambda_zip_path": str(lambda_zip),
        "log_retention_days": 1,
        "alarm_email": "oncall@example.com",
        "output_force_destroy": True,
        "state_table_deletion_protection": False,
        # moto's SQS has no RedriveAllowPolicy attribute: the provider would wait forever.
        "enable_redrive_allow_policy": False,
        # moto evaluates bucket policies without their conditions, so the TLS-only deny
        # would deny every request.
        "enable_tls_only_bucket_policy": False,
    }
    (work / "test.tfvars.json").write_text(json.dumps(variables))

    timings: dict[str, float] = {}
    terraform(work, "init", "-backend=false", f"-plugin-dir={tools}", "-no-color")
    started = time.monotonic()
    applied = False
    try:
        terraform(
            work,
            "apply",
            "-auto-approve",
            "-no-color",
            "-parallelism=20",
            "-var-file=test.tfvars.json",
        )
        applied = True
        timings["apply"] = time.monotonic() - started
        outputs = {
            k: v["value"] for k, v in json.loads(terraform(work, "output", "-json").stdout).items()
        }
        yield Deployment(moto_endpoint, work, variables, outputs, simulator, timings)
    finally:
        started = time.monotonic()
        terraform(
            work,
            "destroy",
            "-auto-approve",
            "-no-color",
            "-parallelism=20",
            # The state was written moments ago; re-reading ~70 resources only costs time.
            "-refresh=false",
            "-var-file=test.tfvars.json",
        )
        timings["destroy"] = time.monotonic() - started
        # init copies the ~700 MB provider binary; pytest keeps old temp directories.
        shutil.rmtree(work / ".terraform", ignore_errors=True)
        if applied:
            print(
                f"\nterraform against moto: apply {timings['apply']:.0f} s, "
                f"destroy {timings['destroy']:.0f} s"
            )


# -- the contract ----------------------------------------------------------------------------


def contract_variables() -> set[str]:
    """Every HARVEST_* name pipeline/config.py documents, less the local-only ones."""
    documented = set(re.findall(r"^(HARVEST_[A-Z_]+)", pipeline.config.__doc__ or "", re.M))
    local_only = {"HARVEST_VENDOR_TOKEN", "HARVEST_STATE_DIR", "HARVEST_DEEPER_FIRST"}
    return documented - local_only


POWERTOOLS = {
    "POWERTOOLS_SERVICE_NAME": "harvest",
    "POWERTOOLS_METRICS_NAMESPACE": "Harvest",
}


def test_outputs_name_a_queue_and_a_dlq_per_stage(deployment: Deployment) -> None:
    sqs = deployment.client("sqs")
    for key in ("queue_urls", "queue_arns", "dlq_urls", "dlq_arns"):
        assert set(deployment.outputs[key]) == set(STAGE_NAMES), key
    for stage in STAGE_NAMES:
        for url_key, arn_key in (("queue_urls", "queue_arns"), ("dlq_urls", "dlq_arns")):
            attributes = sqs.get_queue_attributes(
                QueueUrl=deployment.outputs[url_key][stage], AttributeNames=["QueueArn"]
            )["Attributes"]
            assert attributes["QueueArn"] == deployment.outputs[arn_key][stage]


def test_stage_queues_redrive_one_receive_after_the_drain_dead_letters(
    deployment: Deployment,
) -> None:
    sqs = deployment.client("sqs")
    for stage in STAGE_NAMES:
        attributes = sqs.get_queue_attributes(
            QueueUrl=deployment.outputs["queue_urls"][stage], AttributeNames=["All"]
        )["Attributes"]
        redrive = json.loads(attributes["RedrivePolicy"])
        assert redrive["deadLetterTargetArn"] == deployment.outputs["dlq_arns"][stage]
        assert int(redrive["maxReceiveCount"]) == MAX_RECEIVE_COUNT + 1
        assert int(attributes["VisibilityTimeout"]) == DRAIN_TIMEOUT + 60
        assert attributes["SqsManagedSseEnabled"] == "true"
        dlq = sqs.get_queue_attributes(
            QueueUrl=deployment.outputs["dlq_urls"][stage], AttributeNames=["All"]
        )["Attributes"]
        assert int(dlq["MessageRetentionPeriod"]) == 14 * 24 * 3600


def test_function_environments_follow_the_config_contract(deployment: Deployment) -> None:
    expected_queues = {
        stage: {
            "url": deployment.outputs["queue_urls"][stage],
            "dlq_url": deployment.outputs["dlq_urls"][stage],
        }
        for stage in STAGE_NAMES
    }
    contract = contract_variables()
    for role, name in deployment.function_names.items():
        env = deployment.environment(name)
        stage = role.removeprefix("drain:") if role.startswith("drain:") else None

        harvest = {k for k in env if k.startswith("HARVEST_")}
        assert harvest == (contract if stage else contract - {"HARVEST_STAGE"}), role
        assert set(env) - harvest == {*POWERTOOLS, "POWERTOOLS_LOG_LEVEL"}, role
        assert {k: env[k] for k in POWERTOOLS} == POWERTOOLS
        assert env.get("HARVEST_STAGE") == stage
        assert env["HARVEST_BACKEND"] == "aws"
        assert env["HARVEST_VENDOR_URL"] == deployment.simulator.url
        assert json.loads(env["HARVEST_QUEUES"]) == expected_queues
        assert env["HARVEST_SINK"] == f"s3://{deployment.outputs['bucket_name']}/harvest"
        assert env["HARVEST_SINK"] == deployment.outputs["sink"]
        assert env["HARVEST_STATE_TABLE"] == deployment.outputs["state_table_name"]
        assert env["HARVEST_MAX_RECEIVE_COUNT"] == str(MAX_RECEIVE_COUNT)
        assert float(env["HARVEST_VISIBILITY_TIMEOUT"]) == DRAIN_TIMEOUT + 60
        assert (
            env["HARVEST_VENDOR_TOKEN_PARAMETER"]
            == deployment.outputs["vendor_token_parameter_name"]
        )
        assert SIMULATED.token not in json.dumps(env), f"{role}: token in the environment"
        # The library reads it back without complaint.
        config = Config.from_env(env)
        assert config.stage == (stage or "")
        assert set(config.queues) == set(STAGE_NAMES)


def test_vendor_token_lives_only_in_a_secure_parameter(deployment: Deployment) -> None:
    parameter = deployment.client("ssm").get_parameter(
        Name=deployment.outputs["vendor_token_parameter_name"], WithDecryption=True
    )["Parameter"]
    assert parameter["Type"] == "SecureString"
    assert parameter["Value"] == SIMULATED.token
    assert SIMULATED.token not in json.dumps(deployment.outputs)


def test_functions_run_the_package_on_python312_traced(
    deployment: Deployment, lambda_zip: Path
) -> None:
    lam = deployment.client("lambda")
    handlers = {"kickoff": "workers.kickoff.handler", "replay": "workers.replay.handler"}
    for role, name in deployment.function_names.items():
        config = lam.get_function_configuration(FunctionName=name)
        assert config["Runtime"] == "python3.12"
        assert config["Handler"] == handlers.get(role, "workers.drain.handler")
        assert config["TracingConfig"]["Mode"] == "Active"
        assert config["CodeSize"] == lambda_zip.stat().st_size
        if role.startswith("drain:"):
            assert config["Timeout"] == DRAIN_TIMEOUT
            assert config["MemorySize"] == 256
            concurrency = lam.get_function_concurrency(FunctionName=name)
            assert concurrency["ReservedConcurrentExecutions"] == 2


def test_every_drain_is_invoked_every_minute_by_its_own_rule(deployment: Deployment) -> None:
    events, lam = deployment.client("events"), deployment.client("lambda")
    for stage, name in deployment.outputs["drain_function_names"].items():
        rule = events.describe_rule(Name=name)
        assert rule["ScheduleExpression"] == "rate(1 minute)", stage
        assert rule["State"] == "ENABLED"
        function_arn = lam.get_function_configuration(FunctionName=name)["FunctionArn"]
        targets = events.list_targets_by_rule(Rule=name)["Targets"]
        assert [t["Arn"] for t in targets] == [function_arn]
        assert json.loads(targets[0]["Input"]) == {}
        policy = json.loads(lam.get_policy(FunctionName=name)["Policy"])
        [statement] = policy["Statement"]
        assert statement["Principal"] == {"Service": "events.amazonaws.com"}
        assert statement["Condition"]["ArnLike"]["AWS:SourceArn"] == rule["Arn"]


def test_role_policies_name_specific_resources(deployment: Deployment) -> None:
    iam, lam = deployment.client("iam"), deployment.client("lambda")
    for role_name, function in deployment.function_names.items():
        role_arn = lam.get_function_configuration(FunctionName=function)["Role"]
        role = role_arn.rsplit("/", 1)[-1]
        for policy_name in iam.list_role_policies(RoleName=role)["PolicyNames"]:
            document = iam.get_role_policy(RoleName=role, PolicyName=policy_name)["PolicyDocument"]
            if isinstance(document, str):
                document = json.loads(document)
            for statement in document["Statement"]:
                actions = statement["Action"]
                actions = [actions] if isinstance(actions, str) else actions
                resources = statement["Resource"]
                resources = [resources] if isinstance(resources, str) else resources
                where = f"{role_name}/{statement.get('Sid')}"
                assert statement["Effect"] == "Allow", where
                assert all("*" not in a for a in actions), f"{where}: {actions}"
                if statement.get("Sid") not in WILDCARD_RESOURCE_SIDS:
                    assert "*" not in resources, where


def test_only_the_last_stage_drain_feeds_no_queue(deployment: Deployment) -> None:
    iam = deployment.client("iam")
    arns = deployment.outputs["queue_arns"]
    for stage, name in deployment.outputs["drain_function_names"].items():
        document = iam.get_role_policy(RoleName=name, PolicyName="harvest")["PolicyDocument"]
        if isinstance(document, str):
            document = json.loads(document)
        sends = {
            r
            for s in document["Statement"]
            if "sqs:SendMessage" in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
            for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])
        }
        child = {"troops": "warriors", "warriors": "data_groups"}.get(stage)
        expected = {deployment.outputs["dlq_arns"][stage]} | ({arns[child]} if child else set())
        assert sends == expected, stage


# -- a harvest through the deployed resources ------------------------------------------------


@dataclass
class FakeLambdaContext:
    """What Powertools and the handlers read from a Lambda context."""

    function_name: str
    timeout: float
    memory_limit_in_mb: int = 256
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.monotonic)

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:{REGION}:123456789012:function:{self.function_name}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.timeout - (time.monotonic() - self.started)) * 1000))


@pytest.fixture
def lambda_process(deployment: Deployment) -> Iterator[None]:
    """This process, made to look like a Lambda sandbox whose AWS is the moto server."""
    from pipeline import runtime

    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("HARVEST_", "POWERTOOLS_", "AWS_")):
                mp.delenv(name)
        mp.setenv("AWS_ENDPOINT_URL", deployment.endpoint)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_REGION", REGION)
        mp.setenv("AWS_ACCESS_KEY_ID", "test")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "test")
        runtime.reset_cache()
        try:
            yield
        finally:
            runtime.reset_cache()


def invoke(deployment: Deployment, function: str, handler: Any, event: dict[str, Any]) -> Any:
    """Call `handler` as Lambda would run `function`: with exactly its deployed environment."""
    env = deployment.environment(function)
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("HARVEST_", "POWERTOOLS_")):
                mp.delenv(name)
        for name, value in env.items():
            mp.setenv(name, value)
        timeout = deployment.client("lambda").get_function_configuration(FunctionName=function)[
            "Timeout"
        ]
        return handler(event, FakeLambdaContext(function, timeout))


def queued(deployment: Deployment) -> dict[str, int]:
    """Messages waiting or in flight, per queue (stage queues and DLQs)."""
    sqs = deployment.client("sqs")
    counts = {}
    for kind in ("queue_urls", "dlq_urls"):
        for stage, url in deployment.outputs[kind].items():
            a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
            counts[f"{kind[:-5]}:{stage}"] = sum(
                int(a[k])
                for k in (
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                )
            )
    return counts


def harvested(deployment: Deployment, prefix: str) -> dict[tuple[str, str, str], list[Any]]:
    """(troop, warrior, data group) -> points, from the jsonl.gz objects under `prefix`."""
    s3 = deployment.client("s3")
    bucket = deployment.outputs["bucket_name"]
    found: dict[tuple[str, str, str], list[Any]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith(".jsonl.gz"):
                continue
            blob = s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            for line in gzip.decompress(blob).decode().splitlines():
                record = json.loads(line)
                path = (record["troop_id"], record["warrior_id"], record["data_group_id"])
                assert path not in found, f"{path} written twice"
                found[path] = record["points"]
    return found


def test_a_harvest_through_the_deployed_stack_matches_the_ground_truth(
    deployment: Deployment, lambda_process: None
) -> None:
    from workers import drain, kickoff

    # GIVEN the stack deployed to moto and the vendor simulator holding the token Terraform
    # stored in SSM
    # WHEN the kickoff runs for one day and the drains run until every queue is empty
    report = invoke(
        deployment, deployment.outputs["kickoff_function_name"], kickoff.handler, WINDOW
    )
    deadline = time.monotonic() + 120
    while True:
        for stage in STAGE_NAMES:
            function = deployment.outputs["drain_function_names"][stage]
            invoke(deployment, function, drain.handler, {})
        remaining = queued(deployment)
        if not any(remaining.values()):
            break
        assert time.monotonic() < deadline, f"queues did not drain: {remaining}"

    # THEN the sink holds exactly the simulator's ground truth, and a manifest says complete
    run_id = report["run_id"]
    sink_prefix = deployment.outputs["sink"].split("/", 3)[3]
    truth = deployment.simulator.ground_truth(START, END)
    assert len(truth) == 8
    assert harvested(deployment, f"{sink_prefix}/runs/{run_id}/data/") == {
        path: [dict(p) for p in points] for path, points in truth.items()
    }
    manifest = deployment.client("s3").get_object(
        Bucket=deployment.outputs["bucket_name"],
        Key=f"{sink_prefix}/runs/{run_id}/manifest.json",
    )
    assert json.loads(manifest["Body"].read())["status"] == "complete"
