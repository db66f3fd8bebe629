"""What the handlers' Tracer patches where tracing is on (in Lambda: LAMBDA_TASK_ROOT set)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def patched_by(module: str, tmp_path: Path) -> list[str]:
    """The modules the X-Ray SDK has patched once `module` is imported as in Lambda."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POWERTOOLS_", "AWS_", "_X_"))}
    env.update(
        {
            "LAMBDA_TASK_ROOT": str(tmp_path),
            "AWS_LAMBDA_FUNCTION_NAME": "harvest-test",
            "AWS_REGION": "us-east-1",
            "AWS_XRAY_DAEMON_ADDRESS": "127.0.0.1:9",
        }
    )
    code = (
        f"import json, {module}\n"
        "from aws_xray_sdk.core import patcher\n"
        f"assert not {module}.tracer.disabled\n"
        "print(json.dumps(sorted(patcher._PATCHED_MODULES)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    # The last line: the handler modules log to stdout, as in Lambda (here that their
    # runtime could not be built at init, with no HARVEST_* configuration).
    return list(json.loads(done.stdout.splitlines()[-1]))


def test_the_drain_traces_its_invocations_not_every_aws_request(tmp_path: Path) -> None:
    # GIVEN tracing on, as in Lambda; WHEN the drain's handler module is imported
    # THEN nothing is patched: no subsegment per DynamoDB, SQS or S3 request
    assert patched_by("workers.drain", tmp_path) == []


def test_the_kickoff_still_traces_its_few_aws_requests(tmp_path: Path) -> None:
    # The check above can fail: the kickoff's Tracer patches botocore as before
    assert "botocore" in patched_by("workers.kickoff", tmp_path)
