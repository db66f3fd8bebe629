"""moto's IAM enforcement, switched on around a call and made to authorise as AWS does.

What moto 5 does (moto/core/authorization.py, moto/iam/access_control.py):

- It authorises a request only once it has served INITIAL_NO_AUTH_ACTION_COUNT requests
  (default: infinity, so never). A running server changes that number, and restarts its
  count, on `POST /moto-api/reset-auth` (the body is the new number; the answer holds the
  old one): "0" enforces from the next request on, "inf" stops enforcing. Terraform
  therefore applies and destroys with enforcement off, and the test's own checks run with
  it off too: enforcing, moto knows only IAM users' access keys and STS sessions, so the
  fake "test" key is refused (InvalidClientTokenId).
- A request signed with an STS session is evaluated against the inline and attached
  policies of the session's role (AssumedRoleAccessKey); its signature is checked.
- sts:AssumeRole is checked against the role's trust policy only while enforcing, and
  only `"AWS"` principals are understood: a trust policy that admits only
  `{"Service": "lambda.amazonaws.com"}` makes moto fail with a 500 (TypeError in
  `_check_principal`). The test plays the Lambda service, which is what the trust policy
  admits, by assuming every role before it switches enforcement on; the stack's trust
  policies stay as they are.
- Every service that dispatches through moto's BaseResponse is authorised (SQS,
  DynamoDB, SSM, KMS, STS, IAM, ...), S3 through its own path. The action is
  `service:Operation`, the operation's own name; the resource is the queue ARN for SQS,
  bucket/object ARNs for S3, and "*" for DynamoDB, SSM and KMS. Conditions are ignored
  except StringEquals on keys the request carries.

Two of those differ from AWS in ways that matter here: a policy naming the state table or
the token parameter never matches "*", so every DynamoDB and SSM call would be denied,
and SendMessageBatch, DeleteMessageBatch and ChangeMessageVisibilityBatch are authorised
as actions that do not exist (AWS authorises them as SendMessage, DeleteMessage and
ChangeMessageVisibility). `authorise_like_aws` fixes both in this process's moto (the
ThreadedMotoServer runs in it): the action of a request becomes its IAM action and a "*"
resource becomes the ARNs the request names (iam_model.py), each of which the policies
must allow. Conditions stay unevaluated: the S3 ListBucket prefix condition is not tested.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote

import pytest
import requests
from iam_model import iam_action, resource_arns
from moto.iam import access_control


class AwsLikeIAMRequest(access_control.IAMRequest):
    """moto's IAMRequest, with the IAM action of the operation and the resources it names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._service_name, _, operation = self._action.partition(":")
        self._action = iam_action(self._service_name, operation)

    def check_action_permitted(self, resource: str) -> None:
        if resource != "*":  # moto found the resource itself (SQS, STS, IAM)
            super().check_action_permitted(resource)
            return
        params: Any
        if self._service_name == "lambda":
            # Lambda names the function in the path: /2015-03-31/functions/NAME/invocations
            _, _, rest = self._path.partition("/functions/")
            params = {"FunctionName": unquote(rest.split("/", 1)[0])} if rest else {}
        else:
            # DynamoDB, SSM and KMS speak JSON: the request body holds the names.
            try:
                params = json.loads(self._body) if isinstance(self._body, str | bytes) else {}
            except ValueError:
                params = {}
        if not isinstance(params, dict):
            params = {}
        for arn in resource_arns(self._service_name, params, self._region, self.account_id):
            super().check_action_permitted(arn)


def authorise_like_aws(mp: pytest.MonkeyPatch) -> None:
    """Make this process's moto authorise requests with their IAM actions and resources."""
    # moto imports IAMRequest from this module on every request it authorises.
    mp.setattr(access_control, "IAMRequest", AwsLikeIAMRequest)


def _reset_auth(endpoint: str, initial_no_auth_action_count: str) -> None:
    response = requests.post(
        f"{endpoint}/moto-api/reset-auth", data=initial_no_auth_action_count, timeout=10
    )
    response.raise_for_status()


@contextmanager
def enforced(endpoint: str) -> Iterator[None]:
    """moto at `endpoint` enforces IAM on every request inside the block, and no longer after."""
    _reset_auth(endpoint, "0")
    try:
        yield
    finally:
        _reset_auth(endpoint, "inf")
