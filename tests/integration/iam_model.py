"""How AWS authorises an API call: the IAM action and resources of an operation, and grants.

An API operation is mostly authorised as the IAM action of the same name, but not always:
a batch call is authorised as its single-message action and S3's ListObjectsV2 as
s3:ListBucket (the Service Authorization Reference lists no action of their names). The
resource is the ARN of what the call names: the queue of a QueueUrl, the table of a
TableName (every table of a batch), the object or bucket, the parameter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

# Operations authorised as an action of another name; everything else is service:Operation.
IAM_ACTIONS = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
    "s3:ListObjectsV2": "s3:ListBucket",
    "s3:HeadObject": "s3:GetObject",
    "s3:HeadBucket": "s3:ListBucket",
    "lambda:Invoke": "lambda:InvokeFunction",
}


def iam_action(service: str, operation: str) -> str:
    """The IAM action that authorises `operation` of `service` (its signing name)."""
    name = f"{service}:{operation}"
    return IAM_ACTIONS.get(name, name)


def resource_arns(service: str, params: Mapping[str, Any], region: str, account: str) -> list[str]:
    """The ARNs an operation with these parameters is authorised against ("*" if none)."""
    if service == "sqs" and "QueueUrl" in params:
        return [f"arn:aws:sqs:{region}:{account}:{str(params['QueueUrl']).rsplit('/', 1)[-1]}"]
    if service == "dynamodb":
        tables = [params["TableName"]] if "TableName" in params else []
        tables += list(params.get("RequestItems") or {})
        for item in params.get("TransactItems") or []:
            tables += [op["TableName"] for op in item.values() if "TableName" in op]
        arns = (
            t if t.startswith("arn:") else f"arn:aws:dynamodb:{region}:{account}:table/{t}"
            for t in tables
        )
        return list(dict.fromkeys(arns)) or ["*"]
    if service == "s3" and "Bucket" in params:
        key = f"/{params['Key']}" if "Key" in params else ""
        return [f"arn:aws:s3:::{params['Bucket']}{key}"]
    if service == "ssm":
        names = [params["Name"]] if "Name" in params else list(params.get("Names") or [])
        return [
            f"arn:aws:ssm:{region}:{account}:parameter/{str(n).lstrip('/')}" for n in names
        ] or ["*"]
    if service == "lambda" and "FunctionName" in params:
        name = str(params["FunctionName"])
        arn = f"arn:aws:lambda:{region}:{account}:function:{name}"
        return [name if name.startswith("arn:") else arn]
    if service == "kms" and "KeyId" in params:
        key = str(params["KeyId"])
        return [key if key.startswith("arn:") else f"arn:aws:kms:{region}:{account}:key/{key}"]
    return ["*"]


@dataclass(frozen=True)
class Grant:
    """One action on one resource pattern, as an Allow statement of a policy names it."""

    sid: str
    action: str
    resource: str

    def covers(self, action: str, arn: str) -> bool:
        return (
            self.action.lower() == action.lower()
            and _glob(self.resource).fullmatch(arn) is not None
        )


def grants(document: str | Mapping[str, Any]) -> Iterator[Grant]:
    """Every (action, resource) an identity policy allows, one Grant each."""
    policy = json.loads(document) if isinstance(document, str) else document
    statements = policy["Statement"]
    for statement in [statements] if isinstance(statements, dict) else statements:
        if statement["Effect"] != "Allow":
            continue
        actions, resources = statement["Action"], statement["Resource"]
        for action in [actions] if isinstance(actions, str) else actions:
            for resource in [resources] if isinstance(resources, str) else resources:
                yield Grant(statement.get("Sid", ""), action, resource)


def _glob(pattern: str) -> re.Pattern[str]:
    """An IAM resource pattern: `*` matches any run of characters, `?` any one."""
    return re.compile(".*".join(".".join(map(re.escape, p.split("?"))) for p in pattern.split("*")))
