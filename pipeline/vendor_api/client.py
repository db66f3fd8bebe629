"""The vendor client: one Session carrying auth, timeouts, id encoding, retries and the budget.

Every attempt takes a slot from the rate budget, feeds the vendor's X-RateLimit headers
back to it and is counted in the call stats. The error table of the vendor contract maps
onto the exceptions of `pipeline.errors`: 400 and other 4xx are poison, 401 is auth, 404
is gone; 429, 500/502/503/504, stalls, broken connections and 200s whose body is not a
page are retried here (tenacity, exponential backoff with full jitter) and end as
`RetryableError` / `RateLimitedError` once the attempts run out.

Nothing the vendor sends keeps a message inside a call for long: a listing ends at
`max_pages` pages or at a cursor seen twice in it (poison); a Retry-After over
`max_retry_after` is not waited out here but handed to the queue (`retry_after` on the
error), and a 429 asking that long pauses the budget for all of it; a body over
`max_page_bytes` is not read on (poison); a 200 object without `items` or `next_cursor`
is poison, never taken for the last page.
"""

from __future__ import annotations

import base64
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qsl, quote, quote_plus, urljoin, urlsplit, urlunsplit

import requests
from aws_lambda_powertools import Logger
from requests.structures import CaseInsensitiveDict
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from pipeline.budget import Budget
from pipeline.errors import (
    AuthError,
    ConfigError,
    GoneError,
    HarvestError,
    PoisonError,
    RateLimitedError,
    RetryableError,
    quoted,
)
from pipeline.profile import (
    AuthKind,
    Listing,
    Missing,
    PaginationKind,
    Profile,
    select,
)
from pipeline.profile import load as load_profile
from pipeline.stats import CallStats
from pipeline.vendor_api.inflight import CallsInFlight
from pipeline.vendor_api.latency import Latency
from pipeline.vendor_api.transport import (
    TRANSIENT_EXCEPTIONS,
    SlotMissed,
    VendorAdapter,
    describe_transport_error,
    encode_query,
    header_int,
    header_seconds,
    read_body,
    send_by,
    sent_at,
    vendor_path,
)

logger = Logger(service="harvest", child=True)

# Slots one call may give up unsent, found late before its write (Budget.send_by), before it
# is sent late at the next one.
MAX_MISSED_SLOTS = 3

PAGE_LIMIT = "100"
# Retry-After of a 429 that lacks a usable one.
DEFAULT_RATE_LIMIT_WAIT = 1.0
# The bounds of one message's calls (Config: HARVEST_MAX_PAGES, _MAX_RETRY_AFTER,
# _MAX_PAGE_BYTES). A thousand pages of 100 is 100,000 items in one listing. A page of 100
# points is about 5 KB; 8 MiB (some 180,000 points) means a vendor ignoring `limit`, and
# parsed it takes about ten times that (a 23 MB page took ~220 MB).
DEFAULT_MAX_PAGES = 1000
DEFAULT_MAX_RETRY_AFTER = 60.0
DEFAULT_MAX_PAGE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class Page:
    """One page of a vendor listing: its records, and where the next page is (a cursor from
    the body or a header, or the URL of a Link header), if the kind of paging has one."""

    items: list[dict[str, Any]]
    next_cursor: str | None
    next_url: str | None = None
    # The URL the page came from (a relative next link is relative to it).
    url: str = ""


_TOKEN_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _checked_token(token: str) -> str:
    """The token without surrounding whitespace (a stored secret often ends in a newline);
    ConfigError, never quoting it, if it is empty or holds a control character: http.client
    would refuse the header with the token in its message. Non-ASCII too: a bearer token
    is ASCII, and http.client would fail every call encoding the header (UnicodeEncodeError).
    """
    token = token.strip()
    if not token or _TOKEN_CONTROL.search(token):
        raise ConfigError("the vendor token is empty or contains control characters")
    if not token.isascii():
        raise ConfigError(
            "the vendor token contains non-ASCII characters (a bearer token is ASCII)"
        )
    return token


class _AttemptFailed(Exception):
    """One attempt failed in a way worth another; internal to the retry loop."""

    def __init__(self, cause: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(cause)
        self.cause = cause
        self.status = status
        self.retry_after = retry_after


class VendorClient:
    """Client of the vendor API; thread-safe, meant to be shared by every drain thread."""

    def __init__(
        self,
        base_url: str,
        token: str,
        budget: Budget,
        stats: CallStats,
        *,
        connect_timeout: float = 3.05,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 20.0,
        pool_size: int = 32,
        max_pages: int = DEFAULT_MAX_PAGES,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        profile: Profile | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        for name, bound in (
            ("max_pages", max_pages),
            ("max_retry_after", max_retry_after),
            ("max_page_bytes", max_page_bytes),
        ):
            if not bound > 0:
                raise ValueError(f"{name} must be > 0, got {bound}")
        self.base_url = base_url.rstrip("/")
        self.profile = profile if profile is not None else load_profile()
        self._budget = budget
        self._stats = stats
        self._connect_timeout = connect_timeout
        # The read timeout adapts to the vendor's recent latency, `read_timeout` at most.
        self.latency = Latency(read_timeout)
        # Calls out now and since when: the live view and `harvest status` name a stalled one.
        self.in_flight = CallsInFlight(prefix=self.base_url)
        self._max_attempts = max_attempts
        self._max_pages = max_pages
        self._max_retry_after = max_retry_after
        self._max_page_bytes = max_page_bytes
        # The end (time.monotonic) of the last long pause logged, so each is logged once.
        self._announced_until = -math.inf
        self._announce_lock = threading.Lock()
        self._owns_session = session is None
        self._session = session if session is not None else requests.Session()
        # No .netrc or proxy lookups from the environment on every request: the URL, the
        # token and the TLS settings here are all the transport there is.
        self._session.trust_env = False
        self._min_rtt = math.inf
        self._waits = threading.local()  # seconds this thread has waited for the budget
        if self._owns_session:
            # One pool per host, big enough that every drain thread keeps its connection;
            # retries are ours (below), not urllib3's.
            adapter = VendorAdapter(
                self.base_url, pool_connections=4, pool_maxsize=pool_size, max_retries=0
            )
            self._session.mount("https://", adapter)
            self._session.mount("http://", adapter)
        # The token lives only in the Session's headers (or, for an API key in the query,
        # in `_auth_query`, kept out of every message, log and display): never in a repr.
        self._auth_query: tuple[str, str] | None = None
        auth = self.profile.auth
        if auth.kind == AuthKind.BEARER:
            self._session.headers["Authorization"] = f"Bearer {_checked_token(token)}"
        elif auth.kind == AuthKind.HEADER:
            self._session.headers[auth.header] = f"{auth.prefix}{_checked_token(token)}"
        elif auth.kind == AuthKind.BASIC:
            secret = _checked_token(token)
            pair = f"{auth.username}:{secret}" if auth.username else secret
            self._session.headers["Authorization"] = "Basic " + base64.b64encode(
                pair.encode("ascii")
            ).decode("ascii")
        elif auth.kind == AuthKind.QUERY:
            self._auth_query = (auth.param, _checked_token(token))
        self._session.headers["Accept"] = "application/json"
        # Requests go straight to the transport adapter (see `_send`).
        self._adapter = self._session.get_adapter(self.base_url)
        # Ours opens connections before the budget slot (a caller's session may have another).
        self._connect_ahead = (
            self._adapter.connect_ahead if isinstance(self._adapter, VendorAdapter) else None
        )
        self._verify: bool | str = True if self._session.verify is None else self._session.verify
        self._backoff = wait_random_exponential(multiplier=backoff_base, max=backoff_max)
        # Retrying keeps its per-call state in thread-locals, so one instance serves all threads.
        self._retrying = Retrying(
            stop=stop_after_attempt(max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(_AttemptFailed),
            before=self._count_retry,
            before_sleep=self._log_retry,
            sleep=sleep,
        )

    def __repr__(self) -> str:
        return f"VendorClient(base_url={self.base_url!r})"

    def __enter__(self) -> VendorClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _shown(self, url: str) -> str:
        """`url` as it may be displayed: without an API key carried in the query."""
        return url if self._auth_query is None else _without_param(url, self._auth_query[0])

    def close(self) -> None:
        """Close the Session's connections, if this client created the Session."""
        if self._owns_session:
            self._session.close()

    def budget_waited(self) -> float:
        """Seconds the calling thread has spent waiting for budget slots, all told."""
        return float(getattr(self._waits, "total", 0.0))

    def winding_down(self, yes: bool) -> None:
        """Tell the budget whether this process still takes new work (Budget.winding_down)."""
        self._budget.winding_down(yes)

    def budget_held(self) -> int:
        """Budget slots claimed for this process and not used yet (Budget.held)."""
        return self._budget.held()

    def give_back_budget(self, keep: int) -> int:
        """Hand the budget slots held beyond `keep` back to every process (Budget.give_back)."""
        return self._budget.give_back(keep)

    def paused_for(self) -> float:
        """Seconds the vendor asked every call to wait, still to go (0 if none).

        While this is over `max_retry_after`, every call raises RateLimitedError at once
        without reaching the vendor: a drain should not receive meanwhile.
        """
        return self._budget.paused_for()

    @property
    def max_retry_after(self) -> float:
        """The longest wait (a Retry-After, a paused budget) a call sits out itself."""
        return self._max_retry_after

    def items(
        self,
        listing: Listing | str,
        ids: Mapping[str, str] | str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Every record of a paginated listing, following its pages to the last."""
        for items in self.pages(listing, ids, params):
            yield from items

    def pages(
        self,
        listing: Listing | str,
        ids: Mapping[str, str] | str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """`_pages`, with the API key masked in any error it raises."""
        try:
            yield from self._pages(listing, ids, params)
        except HarvestError as exc:
            self._scrubbed(exc)
            raise

    def _pages(
        self,
        listing: Listing | str,
        ids: Mapping[str, str] | str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """The records of a paginated listing page by page (as `items`, one list per page).

        `listing` is the profile's (a bare path template pages as the default profile
        does); `ids` fill its placeholders, each one percent-encoded path segment (a
        single id fills the template's one placeholder).

        PoisonError once the listing has more than `max_pages` pages (no call is made for
        the one over), when a cursor or a next link comes back that this listing has
        already followed, or a Link header points away from the vendor's base URL.
        """
        listing = _as_listing(listing)
        path = vendor_path(listing.path, ids)
        paging = listing.pagination
        kind = paging.kind
        query = self._first_query(listing, params)
        seen: set[str] = set()
        pages = 0
        offset, number = 0, paging.first_page
        next_url: str | None = None
        while True:
            if kind == PaginationKind.OFFSET:
                query[paging.offset_param] = str(offset)
            elif kind == PaginationKind.PAGE_NUMBER:
                query[paging.page_param] = str(number)
            try:
                page = self._page(listing, path, query, next_url)
            except GoneError as exc:
                if pages == 0:
                    raise
                # The listing was found: a gone status on a later page is an expired cursor
                # or a page past the end, not the entity gone; read the listing again (a
                # vendor that always answers so ends in the DLQ with this reason).
                raise RetryableError(
                    f"{exc} on page {pages + 1} of a listing whose first page was found"
                ) from exc
            pages += 1
            yield page.items
            if kind in (PaginationKind.CURSOR, PaginationKind.HEADER_CURSOR):
                if page.next_cursor is None:
                    return
                token = page.next_cursor
                query[paging.cursor_param] = token
            elif kind == PaginationKind.OFFSET or kind == PaginationKind.PAGE_NUMBER:
                if len(page.items) < paging.page_size:
                    return
                offset += len(page.items)
                number += 1
                token = ""
            elif kind == PaginationKind.LINK:
                if page.next_url is None:
                    return
                # A relative link (RFC 8288 allows one) is relative to the page's own URL.
                token = next_url = urljoin(page.url or self.base_url + path, page.next_url)
                if not next_url.startswith(self.base_url + "/"):
                    raise PoisonError(
                        f"GET {path}: the next page's link {quoted(next_url, 120)} is not"
                        " under the vendor's base URL (the token is not sent elsewhere)"
                    )
            else:
                return
            if kind not in (PaginationKind.OFFSET, PaginationKind.PAGE_NUMBER) and token in seen:
                what = "link" if kind == PaginationKind.LINK else "cursor"
                raise PoisonError(
                    f"GET {path}: the vendor returned {what} {quoted(token, 120)} twice in"
                    f" one listing (page {pages}): following it would loop"
                )
            if pages >= self._max_pages:
                raise PoisonError(
                    f"GET {path}: the listing has more than {self._max_pages} pages (max_pages)"
                )
            seen.add(token)

    def _scrubbed(self, exc: Exception) -> None:
        """Mask the API key (in the query, for `query` auth) in `exc`'s message: a vendor
        may echo it in a next link or an error body."""
        if self._auth_query is not None:
            secret = self._auth_query[1]
            forms = {secret, quote(secret, safe=""), quote_plus(secret)}
            masked = []
            for arg in exc.args:
                if isinstance(arg, str):
                    for form in forms:
                        arg = arg.replace(form, "***")
                masked.append(arg)
            exc.args = tuple(masked)

    def get_page(
        self,
        listing: Listing | str,
        ids: Mapping[str, str] | str | None = None,
        params: Mapping[str, str] | None = None,
        *,
        cursor: str | None = None,
    ) -> Page:
        """One page of a listing (the first, or the one `cursor` points at), with retries."""
        listing = _as_listing(listing)
        query = self._first_query(listing, params)
        if cursor is not None:
            query[listing.pagination.cursor_param] = cursor
        try:
            return self._page(listing, vendor_path(listing.path, ids), query, None)
        except HarvestError as exc:
            self._scrubbed(exc)
            raise

    def _first_query(self, listing: Listing, params: Mapping[str, str] | None) -> dict[str, str]:
        paging = listing.pagination
        query: dict[str, str] = {}
        if paging.kind != PaginationKind.NONE and paging.size_param:
            query[paging.size_param] = str(paging.page_size)
        query.update(listing.params)
        query.update(params or {})
        return query

    def _page(
        self, listing: Listing, path: str, query: Mapping[str, str], next_url: str | None
    ) -> Page:
        """One page, from `path` and `query`, or from the vendor's next link, with retries."""
        pairs = tuple(query.items())
        try:
            if next_url is not None:
                url = next_url
                if self._auth_query is not None:
                    # The key as configured, whatever the link carries for it (a vendor may
                    # echo it, blank it or mask it).
                    url = _without_param(url, self._auth_query[0], self._auth_query)
            else:
                if self._auth_query is not None:
                    pairs += (self._auth_query,)
                url = (
                    f"{self.base_url}{path}?{encode_query(pairs)}"
                    if pairs
                    else self.base_url + path
                )
        except UnicodeEncodeError as exc:
            # JSON can carry a lone surrogate ("\ud800") in a cursor; no URL can.
            raise PoisonError(
                f"GET {path}: a cursor or parameter is not valid Unicode: {quoted(query, 120)}"
            ) from exc
        try:
            page: Page = self._retrying(self._attempt, url, path, listing)
        except RetryError as exc:
            raise self._give_up(path, exc) from exc.last_attempt.exception()
        return page

    # -- one attempt -----------------------------------------------------------------------

    def _attempt(self, url: str, path: str, listing: Listing) -> Page:
        try:
            response, started, oversize = self._send(url)
        except TRANSIENT_EXCEPTIONS as exc:
            # With the key in the query, the transport's message holds the URL: not chained.
            raise _AttemptFailed(describe_transport_error(exc)) from (
                None if self._auth_query is not None else exc
            )
        except RateLimitedError as exc:
            # The budget is paused for longer than this call may wait (by a 429 here, in
            # another thread or, shared, in another invocation): the message waits instead.
            self._announce_pause(exc.retry_after)
            raise RateLimitedError(f"GET {path}: {exc}", exc.retry_after) from None
        elapsed = time.perf_counter() - started
        self._stats.add(calls=1, latency_total=elapsed)
        # The vendor counted the request when it arrived, about when it was sent: its Reset
        # runs from then, not from now, a round trip later.
        headers = self.profile.rate_limit
        reset = header_seconds(response, headers.reset) if headers.reset else None
        if reset is not None and headers.reset_format == "epoch":
            reset = max(0.0, reset - time.time())
        self._budget.observe(
            header_int(response, headers.limit) if headers.limit else None,
            header_int(response, headers.remaining) if headers.remaining else None,
            None if reset is None else reset - elapsed,
        )
        status = response.status_code
        statuses = self.profile.statuses
        if status == 200:
            if oversize is None:
                try:
                    page = _parse_page(response, path, listing)
                except PoisonError:
                    self._stats.add(failures=1)
                    raise
                if page is not None:
                    return page
            self._stats.add(failures=1)
            if oversize is not None:
                raise PoisonError(f"GET {path}: 200 {oversize}")
            raise _AttemptFailed("200 with a body that is not a page", status)
        self._stats.add(failures=1)
        if status in statuses.rate_limited:
            retry_after = header_seconds(response, headers.retry_after)
            if retry_after is None:
                retry_after = DEFAULT_RATE_LIMIT_WAIT
            self._stats.add(rate_limited=1)
            # The wait happens in budget.acquire, for every thread sharing the budget: all of
            # it, however long (every call would draw a 429 meanwhile), but a call waits at
            # most max_retry_after there; a longer wait is the queue's.
            self._budget.pause(retry_after)
            if retry_after > self._max_retry_after:
                self._announce_pause(retry_after)
                raise RateLimitedError(
                    f"GET {path}: {status} rate limited with Retry-After {retry_after:g} s,"
                    f" over max_retry_after ({self._max_retry_after:g} s)",
                    retry_after,
                )
            raise _AttemptFailed(f"{status} rate limited", status, retry_after)
        if status in statuses.retry:
            # A Retry-After (vendor-api.md: a 503 may carry one) is waited out, whichever
            # retried status carries it.
            retry_after = header_seconds(response, headers.retry_after)
            if retry_after is not None and retry_after > self._max_retry_after:
                raise RetryableError(
                    f"GET {path}: {status} with Retry-After {retry_after:g} s,"
                    f" over max_retry_after ({self._max_retry_after:g} s)",
                    retry_after,
                )
            raise _AttemptFailed(str(status), status, retry_after)
        if status in statuses.poison:
            raise PoisonError(f"GET {path}: {status} bad request{_vendor_message(response)}")
        if status in statuses.auth:
            raise AuthError(f"GET {path}: {status} unauthorized (check the vendor token)")
        if status in statuses.gone:
            raise GoneError(f"GET {path}: {status} not found")
        if 400 <= status < 500:
            raise PoisonError(f"GET {path}: unexpected {status}{_vendor_message(response)}")
        raise RetryableError(f"GET {path}: unexpected {status}")

    def _send(self, url: str) -> tuple[requests.Response, float, str | None]:
        """Prepare, have a connection ready, take a budget slot, send, read the body: the
        slot is taken as late as possible, so the vendor sees the request at the time the
        budget counted it.

        Returns the response, when it was sent, and why its body was not read whole (it is
        over max_page_bytes) or None. RateLimitedError, sending nothing, if the budget is
        paused for more than max_retry_after.
        """
        # Prepared by hand: Session.prepare_request re-normalises the URL (urllib3's
        # parse_url resolves "." and ".." segments, requote_uri decodes %2E back to ".")
        # and merges cookies, auth, hooks and environment settings this client never uses.
        # The URL built here is exact and goes on the wire as it is.
        request = requests.PreparedRequest()
        request.method = "GET"
        request.url = url
        # Every header is a str: requests' defaults and the two set in __init__.
        request.headers = CaseInsensitiveDict(cast(Mapping[str, str], self._session.headers))
        missed = 0
        while True:
            # A connection opened after the slot would put its handshake between the slot and
            # the vendor's clock: open it first (VendorAdapter.connect_ahead; again after a
            # missed slot, whose connection urllib3 closed).
            if self._connect_ahead is not None:
                self._connect_ahead(
                    request, verify=self._verify, cert=None, connect_timeout=self._connect_timeout
                )
            asked = time.perf_counter()
            try:
                stamp = self._budget.acquire(self._max_retry_after)
            finally:
                started = time.perf_counter()
                self._waits.total = self.budget_waited() + (started - asked)
            self.in_flight.start(self._shown(url))
            sent_at()  # forget a request that failed after it was written
            # A thread held after its slot (its sandbox out of CPU share) sends nothing once
            # the slot's last moment has passed: the call asks for another slot instead. A
            # call that missed MAX_MISSED_SLOTS goes at its next one whenever it gets there
            # (the budget makes room for it), so a starved sandbox still makes progress.
            send_by(self._budget.send_by() if missed < MAX_MISSED_SLOTS else None)
            try:
                # Straight to the adapter, not through Session.send: no redirects, cookies,
                # hooks or proxies to resolve, and a fifth less CPU per call (bench/README).
                response = self._adapter.send(
                    request,
                    stream=False,
                    timeout=(self._connect_timeout, self.latency.read_timeout),
                    verify=self._verify,
                    cert=None,
                    proxies={},
                )
                # Read the body now, as Session.send would: the connection goes back to the
                # pool, and a body cut short fails here, as a transport error.
                oversize = read_body(response, self._max_page_bytes)
            except SlotMissed:
                missed += 1
                self._budget.missed(stamp)
                continue
            except TRANSIENT_EXCEPTIONS as exc:
                self._stats.add(calls=1, failures=1, latency_total=time.perf_counter() - started)
                if isinstance(exc, requests.exceptions.ReadTimeout):
                    self.latency.timed_out()
                raise
            finally:
                send_by(None)
                self.in_flight.end()
            break
        # The vendor counted the call no later than the fastest round trip seen before the
        # response came back, and it left when its request was written: tell the budget,
        # so that a late send is counted late.
        sent = sent_at()
        rtt = time.perf_counter() - started
        self.latency.observe(rtt)
        self._min_rtt = min(self._min_rtt, rtt)
        self._budget.arrived(
            stamp, stamp + rtt - self._min_rtt, None if sent is None else max(0.0, sent - started)
        )
        return response, started, oversize

    def _announce_pause(self, seconds: float) -> None:
        """Log a long pause once, not once per thread or call that meets it."""
        until = time.monotonic() + seconds
        with self._announce_lock:
            # A pause ending within max_retry_after of one already logged is that one.
            if until <= self._announced_until + self._max_retry_after:
                return
            self._announced_until = until
        wall = datetime.fromtimestamp(time.time() + seconds, UTC).isoformat(timespec="seconds")
        logger.warning(
            f"vendor asked to wait {seconds:.0f} s; pausing every call until {wall}",
            retry_after=seconds,
            paused_until=wall,
        )

    # -- retry policy ----------------------------------------------------------------------

    def _wait(self, retry_state: RetryCallState) -> float:
        failure = _failure_of(retry_state)
        if failure is not None and failure.status in self.profile.statuses.rate_limited:
            return 0.0  # budget.pause already holds the next acquire back
        backoff: float = self._backoff(retry_state)
        if failure is not None and failure.retry_after is not None:
            return max(backoff, failure.retry_after)
        return backoff

    def _count_retry(self, retry_state: RetryCallState) -> None:
        if retry_state.attempt_number > 1:
            self._stats.add(retries=1)

    def _log_retry(self, retry_state: RetryCallState) -> None:
        failure = _failure_of(retry_state)
        next_action = retry_state.next_action
        logger.info(
            "vendor call failed, retrying",
            path=retry_state.args[1] if len(retry_state.args) > 1 else None,
            cause=failure.cause if failure is not None else None,
            attempt=retry_state.attempt_number,
            wait_seconds=next_action.sleep if next_action is not None else None,
        )

    def _give_up(self, path: str, error: RetryError) -> RetryableError:
        failure = error.last_attempt.exception()
        cause = failure.cause if isinstance(failure, _AttemptFailed) else repr(failure)
        message = f"GET {path}: {cause} after {self._max_attempts} attempts"
        if (
            isinstance(failure, _AttemptFailed)
            and failure.status in self.profile.statuses.rate_limited
        ):
            retry_after = failure.retry_after or DEFAULT_RATE_LIMIT_WAIT
            return RateLimitedError(message, retry_after)
        return RetryableError(message)


def _failure_of(retry_state: RetryCallState) -> _AttemptFailed | None:
    outcome = retry_state.outcome
    if outcome is None or not outcome.failed:
        return None
    failure = outcome.exception()
    return failure if isinstance(failure, _AttemptFailed) else None


def _parse_page(response: requests.Response, path: str, listing: Listing) -> Page | None:
    """The page in a 200's body, or None if the body is not one (cut short, not JSON).

    PoisonError if the body is a JSON object without the records (or, paged by a cursor in
    the body, without the cursor field): taking it for the last page would silently cut
    the listing short.
    """
    try:
        body = response.json()
    except (ValueError, RecursionError):  # RecursionError: nested too deep ("[" * 5000)
        return None
    paging = listing.pagination
    if listing.records and not isinstance(body, dict):
        return None
    try:
        items = select(body, listing.records)
        cursor = select(body, paging.cursor_field) if paging.kind == PaginationKind.CURSOR else None
    except Missing as missing:
        if not isinstance(body, dict):
            return None
        keys = quoted(sorted(map(str, body)), 120)
        raise PoisonError(f"GET {path}: page without {missing.args[0]} (keys: {keys})") from None
    if not isinstance(items, list) or not all(map(isinstance, items, repeat(dict))):
        return None
    if cursor is not None and not isinstance(cursor, str):
        return None
    next_url = None
    if paging.kind == PaginationKind.HEADER_CURSOR:
        cursor = response.headers.get(paging.cursor_header) or None
    elif paging.kind == PaginationKind.LINK:
        next_url = response.links.get("next", {}).get("url") or None
    return Page(items=items, next_cursor=cursor, next_url=next_url, url=response.url or "")


def _without_param(url: str, name: str, then: tuple[str, str] | None = None) -> str:
    """`url` without the query parameter `name` (and with the pair `then` added last)."""
    parts = urlsplit(url)
    kept = tuple((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != name)
    return urlunsplit(parts._replace(query=encode_query((*kept, *([then] if then else [])))))


def _as_listing(listing: Listing | str) -> Listing:
    """A profile's listing, or a bare path template paged as the default profile pages."""
    return Listing(path=listing) if isinstance(listing, str) else listing


def _vendor_message(response: requests.Response) -> str:
    """The vendor's `message` from an error body, as a suffix; empty if there is none."""
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    if not message:
        return ""
    # A lone surrogate ("\ud800" in the JSON) would make the error message unencodable
    # wherever it is written next (logs, SQS attributes, the ledger): escape it.
    text = str(message)[:200].encode("utf-8", "backslashreplace").decode("utf-8")
    return f": {text}"
