"""Records the AWS calls this process makes, as IAM actions on resources, and which were denied.

Every boto3 Session builds its own botocore session (`botocore.session.get_session()`),
and the pipeline builds a new Session per Runtime (Powertools' SSM provider too), so the
recorder wraps that factory: each new botocore session gets a `before-parameter-build`
hook that records the call under the function currently running, and an `after-call`
hook that keeps the calls answered 403.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import botocore.session
import pytest
from iam_model import iam_action, resource_arns

_CONTEXT_KEY = "harvest_test_call"


@dataclass(frozen=True)
class Call:
    """One AWS API call as IAM authorises it: an action on one resource."""

    operation: str
    action: str
    resource: str


@dataclass(frozen=True)
class Denial:
    function: str
    calls: tuple[Call, ...]
    message: str

    def __str__(self) -> str:
        what = ", ".join(f"{c.action} on {c.resource}" for c in self.calls)
        return f"{self.function}: {what}: {self.message}"


@dataclass
class CallRecorder:
    """The calls each function made while it was `current`."""

    region: str
    account: str
    current: str = ""
    calls: dict[str, set[Call]] = field(default_factory=lambda: defaultdict(set))
    denials: list[Denial] = field(default_factory=list)

    @contextmanager
    def running(self, function: str) -> Iterator[None]:
        self.current = function
        try:
            yield
        finally:
            self.current = ""

    def install(self, mp: pytest.MonkeyPatch) -> None:
        """Record every call made through botocore sessions created from now on."""
        make_session: Callable[..., botocore.session.Session] = botocore.session.get_session

        def get_session(*args: Any, **kwargs: Any) -> botocore.session.Session:
            session = make_session(*args, **kwargs)
            session.register("before-parameter-build", self._before)
            session.register("after-call", self._after)
            return session

        mp.setattr(botocore.session, "get_session", get_session)

    def _before(self, **event: Any) -> None:
        """before-parameter-build: `params` as the caller passed them, the operation `model`."""
        if not self.current:
            return
        model = event["model"]
        service = model.service_model.signing_name
        action = iam_action(service, model.name)
        calls = tuple(
            Call(model.name, action, arn)
            for arn in resource_arns(service, event["params"], self.region, self.account)
        )
        self.calls[self.current].update(calls)
        event["context"][_CONTEXT_KEY] = (self.current, calls)

    def _after(self, **event: Any) -> None:
        """after-call: the `http_response`; the call's `context` holds what _before recorded."""
        response, context = event["http_response"], event["context"]
        if response.status_code != 403 or _CONTEXT_KEY not in context:
            return
        function, calls = context[_CONTEXT_KEY]
        text = response.text if isinstance(response.text, str) else ""
        found = re.search(r"<Message>(.*?)</Message>", text) or re.search(
            r'"message"\s*:\s*"(.*?)"', text, re.I
        )
        self.denials.append(Denial(function, calls, found.group(1) if found else text[:300]))
