"""The real terraform/ stack, applied to a moto server, deploys what the handlers expect.

The stack is copied to a temporary directory and pointed at moto by one generated
`moto_override.tf` (Terraform's override files merge into the provider block), so the
configuration under test is the one users apply, and the repository is never modified.
The only differences are a few variables: moto has no SQS redrive-allow policy
(`enable_redrive_allow_policy = false`), it evaluates S3 bucket policies without their
conditions, so the TLS-only deny would block every request
(`enable_tls_only_bucket_policy = false`), and the simulator serves plain HTTP
(`allow_insecure_vendor_url = true`).

moto stores Lambda functions but cannot run them, so the harvest at the end calls the
handlers in this process with exactly the environment Terraform gave each function, the
vendor played by the simulator, and AWS played by the same moto server, enforcing IAM:
each handler runs with an STS session of its own function's role (moto_iam.py says how).
Every AWS call is recorded, so a grant the code needs but lacks fails the harvest, and a
grant that no exercised path uses fails its own test.
"""

from __future__ import annotations

import gzip
import io
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
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_calls import CallRecorder
from iam_model import Grant, grants
from moto.core.config import default_user_config
from moto_iam import authorise_like_aws, enforced
from terraform_support import WILDCARD_RESOURCE_SIDS, copy_stack, plugin_dir, terraform_env

import pipeline.config
from pipeline.config import Config
from pipeline.dev.simulator import Simulator, SimulatorConfig
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
ENDPOINTS = "athena cloudwatch dynamodb events glue iam kms lambda logs s3 sns sqs ssm sts".split()
# Small, so that an entity the vendor keeps failing is dead-lettered within one invocation.
MAX_RECEIVE_COUNT = 2
RETRY_DELAY = 1
DRAIN_TIMEOUT = 60
FOURTEEN_DAYS = 14 * 24 * 3600


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
  skip_requesting_account_id  = false
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
        with pytest.MonkeyPatch.context() as mp:
            # Enforcement stays off (moto's default) except around each handler call.
            authorise_like_aws(mp)
            # The kickoff and the drains start drains (an asynchronous Invoke): moto's
            # docker-less Lambda accepts and does not run them (the test runs the handlers).
            # Set before any function exists: it is another backend.
            mp.setitem(default_user_config["lambda"], "use_docker", False)
            yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def lambda_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real deployment zip for the default profile, built by scripts/package.py, with
    the profile.json Terraform reads beside it."""
    out = tmp_path_factory.mktemp("package") / "lambda.zip"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "package.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@pytest.fixture(scope="module")
def profile_json(lambda_zip: Path) -> dict[str, Any]:
    """What scripts/package.py wrote beside the zip: the stages Terraform deployed."""
    described: dict[str, Any] = json.loads((lambda_zip.parent / "profile.json").read_text())
    return described


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
    copy_stack(STACK, work)
    (work / "moto_override.tf").write_text(override(moto_endpoint))
    variables: dict[str, Any] = {
        "name_prefix": NAME_PREFIX,
        "tags": {"project": "harvest", "purpose": "integration-test"},
        "vendor_url": simulator.url,
        "vendor_token": SIMULATED.token,
        "rate_calls": SIMULATED.rate_calls,
        "rate_period": SIMULATED.rate_period,
        "max_receive_count": MAX_RECEIVE_COUNT,
        "retry_delay": RETRY_DELAY,
        "drain_timeout": DRAIN_TIMEOUT,
        "lambda_zip_path": str(lambda_zip),
        "profile_json_path": str(lambda_zip.parent / "profile.json"),
        "log_retention_days": 1,
        "alarm_email": "oncall@example.com",
        "output_force_destroy": True,
        "state_table_deletion_protection": False,
        # moto's SQS has no RedriveAllowPolicy attribute: the provider would wait forever.
        "enable_redrive_allow_policy": False,
        # moto evaluates bucket policies without their conditions, so the TLS-only deny
        # would deny every request.
        "enable_tls_only_bucket_policy": False,
        # The simulator serves plain HTTP on 127.0.0.1.
        "allow_insecure_vendor_url": True,
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
    local_only = {"HARVEST_VENDOR_TOKEN", "HARVEST_STATE_DIR"}
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


def test_stage_queues_keep_messages_as_long_as_their_dlqs(deployment: Deployment) -> None:
    # A long token outage leaves messages queued: they must not expire before anyone looks.
    sqs = deployment.client("sqs")
    for stage in STAGE_NAMES:
        for kind in ("queue_urls", "dlq_urls"):
            attributes = sqs.get_queue_attributes(
                QueueUrl=deployment.outputs[kind][stage], AttributeNames=["MessageRetentionPeriod"]
            )["Attributes"]
            assert int(attributes["MessageRetentionPeriod"]) == FOURTEEN_DAYS, (kind, stage)


def test_function_environments_follow_the_config_contract(
    deployment: Deployment, profile_json: dict[str, Any]
) -> None:
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
        assert env["HARVEST_PROFILE"] == profile_json["file"] == "profiles/hermes-v1.toml"
        assert env["HARVEST_VENDOR_URL"] == deployment.simulator.url
        assert json.loads(env["HARVEST_QUEUES"]) == expected_queues
        assert (
            json.loads(env["HARVEST_DRAIN_FUNCTIONS"]) == deployment.outputs["drain_function_names"]
        )
        assert env["HARVEST_SINK"] == f"s3://{deployment.outputs['bucket_name']}/harvest"
        assert env["HARVEST_SINK"] == deployment.outputs["sink"]
        assert env["HARVEST_STATE_TABLE"] == deployment.outputs["state_table_name"]
        assert env["HARVEST_MAX_RECEIVE_COUNT"] == str(MAX_RECEIVE_COUNT)
        assert env["HARVEST_RETRY_DELAY"] == str(RETRY_DELAY)
        assert env["HARVEST_ALLOW_HTTP"] == "true"
        assert env["HARVEST_MAX_PAGES"] == "1000"
        assert env["HARVEST_MAX_RETRY_AFTER"] == "60"
        assert env["HARVEST_MAX_PAGE_BYTES"] == str(8 * 1024 * 1024)
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


def test_a_run_not_settled_in_six_hours_alarms_the_topic(deployment: Deployment) -> None:
    [alarm] = deployment.client("cloudwatch").describe_alarms(
        AlarmNames=[f"{NAME_PREFIX}-run-not-settled"]
    )["MetricAlarms"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("Harvest", "OldestUnsettledRunAge")
    assert alarm["Dimensions"] == [{"Name": "service", "Value": "harvest"}]
    assert (alarm["Statistic"], alarm["Period"], alarm["EvaluationPeriods"]) == ("Maximum", 300, 1)
    assert alarm["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarm["Threshold"] == 6 * 3600
    assert alarm["TreatMissingData"] == "notBreaching"
    assert alarm["AlarmActions"] == [deployment.outputs["alarm_topic_arn"]]


def test_the_dashboard_sums_every_functions_vendor_calls_and_shows_the_run_age(
    deployment: Deployment,
) -> None:
    body = deployment.client("cloudwatch").get_dashboard(
        DashboardName=deployment.outputs["dashboard_name"]
    )["DashboardBody"]
    metrics = {
        w["properties"]["title"]: w["properties"]["metrics"] for w in json.loads(body)["widgets"]
    }
    # The drains' metrics carry their stage as a dimension, the kickoff's only the service.
    calls = metrics["Vendor calls per minute"]
    series = {tuple(m[:-1]) for m in calls if m[0] == "Harvest"}
    assert series == {
        ("Harvest", "VendorCalls", "service", "harvest"),
        *(("Harvest", "VendorCalls", "service", "harvest", "stage", s) for s in STAGE_NAMES),
    }
    [expression] = [m[0]["expression"] for m in calls if isinstance(m[0], dict)]
    assert expression.startswith("SUM(")
    assert all(m[-1]["id"] in expression for m in calls if m[0] == "Harvest")
    age = metrics["Oldest unsettled run (seconds since kickoff)"]
    assert [m[:-1] for m in age] == [["Harvest", "OldestUnsettledRunAge", "service", "harvest"]]


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
            assert config["MemorySize"] == 1024
            concurrency = lam.get_function_concurrency(FunctionName=name)
            assert concurrency["ReservedConcurrentExecutions"] == 2
        elif role == "kickoff":
            assert config["MemorySize"] == 1024  # it starts every stage: see functions.tf


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


def test_only_the_last_stage_drain_feeds_no_queue(
    deployment: Deployment, profile_json: dict[str, Any]
) -> None:
    iam = deployment.client("iam")
    arns = deployment.outputs["queue_arns"]
    children = {s["name"]: s["child"] for s in profile_json["stages"]}
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
        child = children[stage]
        expected = {deployment.outputs["dlq_arns"][stage]} | ({arns[child]} if child else set())
        assert sends == expected, stage


# -- a harvest through the deployed resources, each function with its own role -------------


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


@dataclass(frozen=True)
class Published:
    """One metric value a function printed in CloudWatch's embedded metric format."""

    function: str
    namespace: str
    name: str
    dimensions: tuple[tuple[str, str], ...]
    unit: str


def emf_metrics(function: str, printed: str) -> list[Published]:
    """The metrics in the EMF lines of what `function` printed (Powertools Metrics)."""
    found = []
    for line in printed.splitlines():
        if not line.startswith("{") or '"_aws"' not in line:
            continue
        blob = json.loads(line)
        for directive in blob["_aws"]["CloudWatchMetrics"]:
            for names in directive["Dimensions"]:
                dimensions = tuple(sorted((n, str(blob[n])) for n in names))
                for metric in directive["Metrics"]:
                    found.append(
                        Published(
                            function,
                            directive["Namespace"],
                            metric["Name"],
                            dimensions,
                            metric.get("Unit", ""),
                        )
                    )
    return found


@dataclass
class LambdaProcess:
    """This process, made to look like each function's Lambda sandbox in turn."""

    deployment: Deployment
    sessions: dict[str, dict[str, str]]  # function name -> its role's STS credentials
    recorder: CallRecorder
    metrics: list[Published] = field(default_factory=list)

    def session(self, function: str) -> boto3.session.Session:
        """A boto3 session with `function`'s role credentials."""
        credentials = self.sessions[function]
        return boto3.session.Session(
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"],
            region_name=REGION,
        )

    def invoke(self, function: str, handler: Any, event: dict[str, Any]) -> Any:
        """Call `handler` as Lambda would run `function`: its environment, its role, IAM enforced.

        Like a fresh sandbox, it builds its clients anew (the Runtime and Powertools' SSM
        provider are cached per process) and reads the token again. A call that moto
        denies fails the test here, also where the drain would only log it and retry.
        """
        from aws_lambda_powertools.utilities import parameters

        from pipeline import runtime

        env = self.deployment.environment(function)
        timeout = self.deployment.client("lambda").get_function_configuration(
            FunctionName=function
        )["Timeout"]
        session = self.sessions[function]
        denied_before = len(self.recorder.denials)
        with pytest.MonkeyPatch.context() as mp:
            for name in list(os.environ):
                if name.startswith(("HARVEST_", "POWERTOOLS_")):
                    mp.delenv(name)
            for name, value in env.items():
                mp.setenv(name, value)
            mp.setenv("AWS_ACCESS_KEY_ID", session["AccessKeyId"])
            mp.setenv("AWS_SECRET_ACCESS_KEY", session["SecretAccessKey"])
            mp.setenv("AWS_SESSION_TOKEN", session["SessionToken"])
            runtime.reset_cache()
            parameters.clear_caches()  # type: ignore[no-untyped-call]
            printed = io.StringIO()
            try:
                with (
                    self.recorder.running(function),
                    enforced(self.deployment.endpoint),
                    redirect_stdout(printed),
                ):
                    result = handler(event, FakeLambdaContext(function, timeout))
            finally:
                runtime.reset_cache()
                parameters.clear_caches()  # type: ignore[no-untyped-call]
                sys.stdout.write(printed.getvalue())
                self.metrics += emf_metrics(function, printed.getvalue())
        denied = self.recorder.denials[denied_before:]
        assert not denied, "IAM denied:\n" + "\n".join(map(str, denied))
        return result


@pytest.fixture(scope="module")
def lambda_process(deployment: Deployment) -> Iterator[LambdaProcess]:
    """The sandbox of every deployed function: its role's session, and a call recorder.

    The sessions are taken before IAM is enforced: moto checks a trust policy only while
    enforcing, and understands no Service principal (moto_iam.py). Here the test is the
    Lambda service, the one principal the trust policies admit.
    """
    from pipeline import runtime

    sts, lam = deployment.client("sts"), deployment.client("lambda")
    sessions = {
        name: sts.assume_role(
            RoleArn=lam.get_function_configuration(FunctionName=name)["Role"],
            RoleSessionName=name,
        )["Credentials"]
        for name in deployment.function_names.values()
    }
    account = deployment.outputs["queue_arns"][STAGE_NAMES[0]].split(":")[4]
    recorder = CallRecorder(region=REGION, account=account)
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith(("HARVEST_", "POWERTOOLS_", "AWS_")):
                mp.delenv(name)
        mp.setenv("AWS_ENDPOINT_URL", deployment.endpoint)
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_REGION", REGION)
        recorder.install(mp)
        runtime.reset_cache()
        try:
            yield LambdaProcess(deployment, sessions, recorder)
        finally:
            runtime.reset_cache()


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


def manifest_of(deployment: Deployment, run_id: str) -> dict[str, Any]:
    sink_prefix = deployment.outputs["sink"].split("/", 3)[3]
    body = deployment.client("s3").get_object(
        Bucket=deployment.outputs["bucket_name"], Key=f"{sink_prefix}/runs/{run_id}/manifest.json"
    )["Body"]
    manifest: dict[str, Any] = json.loads(body.read())
    return manifest


@dataclass
class Harvest:
    """What the harvest through the deployed stack saw, for the tests to judge."""

    run_id: str
    failing: dict[str, str]  # stage -> the entity the vendor failed until healed
    settled_manifest: dict[str, Any]  # after the first drains: the failing ones dead
    dry_runs: dict[str, dict[str, Any]]
    replays: dict[str, dict[str, Any]]
    final_manifest: dict[str, Any]
    output: dict[tuple[str, str, str], list[Any]]


# EventBridge starts every drain every minute, in no particular order. The troops drain
# also runs between the warriors and data_groups drains here: with only data_groups work
# left, it looks at every stage queue's depth before it may call a run's entities lost.
DRAIN_ORDER = ("troops", "warriors", "troops", "data_groups")


def drain_until_empty(lp: LambdaProcess, *, dlqs_too: bool, seconds: float = 150) -> dict[str, int]:
    """Run the drains in DRAIN_ORDER until the stage queues (and DLQs) are empty."""
    from workers import drain

    deadline = time.monotonic() + seconds
    while True:
        for stage in DRAIN_ORDER:
            function = lp.deployment.outputs["drain_function_names"][stage]
            lp.invoke(function, drain.handler, {})
        remaining = queued(lp.deployment)
        if not any(n for q, n in remaining.items() if dlqs_too or q.startswith("queue:")):
            return remaining
        assert time.monotonic() < deadline, f"queues did not drain: {remaining}"


@pytest.fixture(scope="module")
def harvest(deployment: Deployment, lambda_process: LambdaProcess) -> Harvest:
    """One day harvested by the deployed functions, one entity per stage failing until replayed.

    Every function's code path runs: the kickoff, every drain (fanning out, writing,
    retrying, dead-lettering, settling a run), the replay's dry run and the replay.
    """
    from workers import kickoff, replay

    lp, sim = lambda_process, deployment.simulator
    outputs = deployment.outputs
    # GIVEN the vendor failing one troop, one warrior of another troop and one data group
    # of yet another warrior, until it heals
    paths = sorted(sim.ground_truth(START, END))
    troops = sorted({p[0] for p in paths})
    warriors = sorted({p[1] for p in paths if p[0] == troops[0]})
    groups = sorted(p[2] for p in paths if p[:2] == (troops[0], warriors[0]))
    failing = {"troops": troops[1], "warriors": warriors[1], "data_groups": groups[1]}
    for entity in failing.values():
        sim.fail_permanently(entity)

    # WHEN the kickoff runs for one day and the drains run until the stage queues are empty
    report = lp.invoke(outputs["kickoff_function_name"], kickoff.handler, WINDOW)
    remaining = drain_until_empty(lp, dlqs_too=False)
    assert {k: v for k, v in remaining.items() if k.startswith("dlq:")} == {
        f"dlq:{stage}": 1 for stage in STAGE_NAMES
    }
    settled = manifest_of(deployment, report["run_id"])

    # AND the operator counts each DLQ, the vendor heals, and the operator replays them
    replay_function = outputs["replay_function_name"]
    dry_runs = {
        stage: lp.invoke(replay_function, replay.handler, {"stage": stage, "dry_run": True})
        for stage in STAGE_NAMES
    }
    sim.heal()
    replays = {
        stage: lp.invoke(replay_function, replay.handler, {"stage": stage, "max": 100})
        for stage in STAGE_NAMES
    }
    # AND the drains run until every queue, DLQs included, is empty
    drain_until_empty(lp, dlqs_too=True)

    sink_prefix = outputs["sink"].split("/", 3)[3]
    return Harvest(
        run_id=report["run_id"],
        failing=failing,
        settled_manifest=settled,
        dry_runs=dry_runs,
        replays=replays,
        final_manifest=manifest_of(deployment, report["run_id"]),
        output=harvested(deployment, f"{sink_prefix}/runs/{report['run_id']}/data/"),
    )


def test_a_harvest_through_the_deployed_stack_matches_the_ground_truth(
    deployment: Deployment, harvest: Harvest
) -> None:
    # THEN the sink holds exactly the simulator's ground truth, and a manifest says complete
    truth = deployment.simulator.ground_truth(START, END)
    assert len(truth) == 8
    assert harvest.output == {path: [dict(p) for p in points] for path, points in truth.items()}
    assert harvest.final_manifest["status"] == "complete"


def test_entities_the_vendor_keeps_failing_are_dead_lettered_counted_and_replayed(
    harvest: Harvest,
) -> None:
    # THEN the run first settled incomplete, naming the three entities the vendor failed
    assert harvest.settled_manifest["status"] == "incomplete"
    dead = {d["stage"]: d["path"][-1] for d in harvest.settled_manifest["dead"]}
    assert dead == harvest.failing
    # AND each dry run counted its one dead letter, with the vendor's 503 as the reason,
    # and moved nothing; each replay moved it back
    for stage in STAGE_NAMES:
        dry_run, replayed = harvest.dry_runs[stage], harvest.replays[stage]
        assert (dry_run["seen"], dry_run["moved"]) == (1, 0), stage
        [reason] = dry_run["reasons"]
        assert "503" in reason, (stage, reason)
        assert (replayed["seen"], replayed["moved"]) == (1, 1), stage


def test_the_unsettled_run_alarm_watches_a_metric_every_drain_publishes(
    deployment: Deployment, lambda_process: LambdaProcess, harvest: Harvest
) -> None:
    [alarm] = deployment.client("cloudwatch").describe_alarms(
        AlarmNames=[f"{NAME_PREFIX}-run-not-settled"]
    )["MetricAlarms"]
    dimensions = tuple(sorted((d["Name"], d["Value"]) for d in alarm["Dimensions"]))
    for stage, function in deployment.outputs["drain_function_names"].items():
        published = {
            m.unit
            for m in lambda_process.metrics
            if (m.function, m.namespace, m.name, m.dimensions)
            == (function, alarm["Namespace"], alarm["MetricName"], dimensions)
        }
        assert published == {"Seconds"}, f"{stage}: {alarm['MetricName']} {published}"


def test_iam_is_enforced_on_the_function_sessions(
    deployment: Deployment, lambda_process: LambdaProcess
) -> None:
    """The sessions the harvest runs with are really held to their own role's policy."""
    outputs, lp = deployment.outputs, lambda_process
    table, bucket = outputs["state_table_name"], outputs["bucket_name"]
    drains = outputs["drain_function_names"]

    def attempt(function: str, service: Any, call: Any) -> str:
        client = lp.session(function).client(service, endpoint_url=deployment.endpoint)
        with enforced(deployment.endpoint):
            try:
                call(client)
            except client.exceptions.ClientError as exc:
                return str(exc.response["Error"].get("Code") or exc)
        return "allowed"

    def read_state(c: Any) -> None:
        c.get_item(TableName=table, Key={"pk": {"S": "runs"}, "sk": {"S": "none"}})

    # The state table, named by its ARN in the policy, is readable by a drain ...
    assert attempt(drains["troops"], "dynamodb", read_state) == "allowed"
    # ... and by nobody without a grant
    assert attempt(outputs["replay_function_name"], "dynamodb", read_state) != "allowed"
    # A queue the role names for another action only: the kickoff feeds troops, not warriors
    send = {"MessageBody": "{}"}
    assert (
        attempt(
            outputs["kickoff_function_name"],
            "sqs",
            lambda c: c.send_message(QueueUrl=outputs["queue_urls"]["warriors"], **send),
        )
        != "allowed"
    )
    # A drain may start its own successor, not another stage's drain
    start = {"InvocationType": "Event", "Payload": b"{}"}
    assert (
        attempt(
            drains["troops"],
            "lambda",
            lambda c: c.invoke(FunctionName=drains["warriors"], **start),
        )
        != "allowed"
    )
    assert (
        attempt(
            drains["troops"], "lambda", lambda c: c.invoke(FunctionName=drains["troops"], **start)
        )
        == "allowed"
    )
    # Writing outside the sink prefix is refused even to the drain that writes the data
    assert (
        attempt(
            drains["data_groups"],
            "s3",
            lambda c: c.put_object(Bucket=bucket, Key="elsewhere/x", Body=b"x"),
        )
        != "allowed"
    )


# The Lambda runtime itself writes the function's logs and traces, not the handler code.
RUNTIME_SERVICES = ("logs:", "xray:")

_MANIFEST_ELSEWHERE = (
    "a run settles in the drain that finishes its last entity, which then writes the "
    "manifest after listing the run's files; in this harvest that is always the data_groups "
    "drain. A troops or warriors drain does it when a troop or warrior finishes last "
    "(found gone, dead-lettered last, a troop without warriors)."
)
_EMPTY_WINDOW = (
    "the kickoff writes the manifest itself only for a window whose troop listing is "
    "empty (the run settles at once); the simulator always lists troops."
)

_SUCCESSOR = (
    "a drain starts its successor only when it runs out of time with messages still "
    "waiting; this harvest's drains always finish their queue (tests/test_start_drains.py "
    "covers the successor)."
)

# (function, statement Sid) -> why a grant the harvest cannot exercise stays.
UNEXERCISED: dict[tuple[str, str], str] = {
    **{(f"drain:{stage}", "StartSuccessor"): _SUCCESSOR for stage in STAGE_NAMES},
    ("kickoff", "WriteSink"): _EMPTY_WINDOW,
    ("kickoff", "ListSink"): _EMPTY_WINDOW,
    ("drain:troops", "WriteSink"): _MANIFEST_ELSEWHERE,
    ("drain:troops", "ListSink"): _MANIFEST_ELSEWHERE,
    ("drain:warriors", "WriteSink"): _MANIFEST_ELSEWHERE,
    ("drain:warriors", "ListSink"): _MANIFEST_ELSEWHERE,
}


_STATUS_WHEN_QUIET = (
    "a run's status (its meta item first) is read only by a drain that finds every stage "
    "queue empty while the run is open (settle_runs); in this harvest the troops and "
    "warriors drains always find data groups still queued, and the run closes in the "
    "data_groups drain."
)

_STATUS_WHEN_NOTHING_SENT = (
    "the kickoff reads a run's status (its meta item first) only when it sent no troop: an "
    "empty listing, every troop rejected, or every troop finished by an earlier kickoff of "
    "the window (tests/test_kickoff.py); this harvest sends its troops."
)

# (function, statement Sid, action) -> why one action of a grant the harvest uses otherwise
# stays unexercised.
UNEXERCISED_ACTIONS: dict[tuple[str, str, str], str] = {
    ("drain:troops", "StateTable", "dynamodb:GetItem"): _STATUS_WHEN_QUIET,
    ("drain:warriors", "StateTable", "dynamodb:GetItem"): _STATUS_WHEN_QUIET,
    ("kickoff", "StateTable", "dynamodb:GetItem"): _STATUS_WHEN_NOTHING_SENT,
}


def role_grants(deployment: Deployment, function: str) -> list[Grant]:
    """Every (action, resource) the inline policies of `function`'s role allow, read from IAM."""
    iam, lam = deployment.client("iam"), deployment.client("lambda")
    role = lam.get_function_configuration(FunctionName=function)["Role"].rsplit("/", 1)[-1]
    return [
        grant
        for name in iam.list_role_policies(RoleName=role)["PolicyNames"]
        for grant in grants(iam.get_role_policy(RoleName=role, PolicyName=name)["PolicyDocument"])
    ]


def test_every_call_a_function_makes_is_granted_and_every_grant_is_used(
    deployment: Deployment, lambda_process: LambdaProcess, harvest: Harvest
) -> None:
    problems: list[str] = []
    for key, function in deployment.function_names.items():
        granted = role_grants(deployment, function)
        used = lambda_process.recorder.calls[function]
        assert used, f"{key} made no AWS call"
        for call in sorted(used, key=lambda c: (c.action, c.resource)):
            if not any(g.covers(call.action, call.resource) for g in granted):
                problems.append(f"{key}: {call.operation} ({call.action}) on {call.resource}")
        for grant in granted:
            if grant.action.startswith(RUNTIME_SERVICES) or (key, grant.sid) in UNEXERCISED:
                continue
            if (key, grant.sid, grant.action) in UNEXERCISED_ACTIONS:
                continue
            if not any(grant.covers(c.action, c.resource) for c in used):
                problems.append(f"{key}: {grant.sid} grants {grant.action} on {grant.resource}")
    assert not problems, "not granted, or granted but unused:\n" + "\n".join(problems)


def test_grants_the_harvest_cannot_exercise_are_still_granted(deployment: Deployment) -> None:
    """An exception above that no longer matches a grant is stale: remove it."""
    for (key, sid), reason in UNEXERCISED.items():
        function = deployment.function_names[key]
        assert any(g.sid == sid for g in role_grants(deployment, function)), (key, sid, reason)
    for (key, sid, action), reason in UNEXERCISED_ACTIONS.items():
        function = deployment.function_names[key]
        assert any(
            g.sid == sid and g.action == action for g in role_grants(deployment, function)
        ), (key, sid, action, reason)


def _widget_series(widget: dict[str, Any]) -> set[tuple[str, str, tuple[tuple[str, str], ...]]]:
    """(namespace, metric, dimensions) of every metric row of a dashboard widget."""
    series = set()
    for row in widget.get("properties", {}).get("metrics", []):
        fields = [f for f in row if not isinstance(f, dict)]
        if len(fields) >= 2:
            namespace, name, *pairs = fields
            dimensions = tuple(sorted(zip(pairs[::2], pairs[1::2], strict=True)))
            series.add((namespace, name, dimensions))
    return series


def test_every_harvest_metric_the_dashboard_and_alarms_read_is_one_the_handlers_publish(
    deployment: Deployment, lambda_process: LambdaProcess, harvest: Harvest
) -> None:
    # GIVEN what the handlers printed in EMF during the harvest (CloudWatch treats another
    # set of dimensions as another metric, so a widget asking for {service} alone shows
    # nothing of a series published with {service, stage})
    published = {(m.namespace, m.name, m.dimensions) for m in lambda_process.metrics}
    cloudwatch = deployment.client("cloudwatch")

    # WHEN every Harvest metric the dashboard's widgets and the alarms read is listed
    body = json.loads(
        cloudwatch.get_dashboard(DashboardName=deployment.outputs["dashboard_name"])[
            "DashboardBody"
        ]
    )
    read = {s for w in body["widgets"] for s in _widget_series(w) if s[0] == "Harvest"}
    for alarm in cloudwatch.describe_alarms()["MetricAlarms"]:
        if alarm.get("Namespace") == "Harvest":
            dims = tuple(sorted((d["Name"], d["Value"]) for d in alarm["Dimensions"]))
            read.add((alarm["Namespace"], alarm["MetricName"], dims))

    # THEN each is a series some handler published, with exactly those dimensions
    assert read, "the dashboard and alarms read no Harvest metric"
    assert read <= published, sorted(read - published)
