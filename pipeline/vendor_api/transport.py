"""How a request reaches the vendor and its answer comes back.

The request target is built exactly (each id one percent-encoded path segment, every query
name and value encoded whole) and goes on the wire as it is; `VendorAdapter` sends it on the
one connection pool of the vendor's host; a body is read up to a cap. Which transport
failures are worth another attempt is decided here; what to do about them is the client's.
"""

from __future__ import annotations

import math
import ssl
import threading
import time
from collections.abc import Mapping
from functools import lru_cache
from string import Formatter
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict

from pipeline.errors import PoisonError

# requests' own HTTPAdapter.send, as imported (a test double may replace it later).
_HTTP_ADAPTER_SEND = HTTPAdapter.send

# Bodies are read in chunks of this size, so that one over the cap stops being read soon.
BODY_CHUNK_BYTES = 64 * 1024
# Transport failures worth another attempt: refused or reset connections, connect and
# read timeouts (a stalled vendor), bodies cut short (chunked or Content-Length errors).
TRANSIENT_EXCEPTIONS: tuple[type[Exception], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


# When this thread last began writing a request on a vendor connection (perf_counter), and
# the latest it may begin writing its next one (`send_by`).
_SENT = threading.local()


class SlotMissed(Exception):
    """The request was about to be written after its budget slot's last moment (`send_by`):
    nothing was sent. Not a transport error: urllib3 and requests let it through as it is,
    and the connection it would have used is closed."""


def send_by(deadline: float | None) -> None:
    """This thread's next request on a vendor connection starts being written by
    `deadline` (time.perf_counter) or not at all (SlotMissed); None: whenever."""
    _SENT.deadline = deadline


class _TimedRequest:
    """For urllib3's connections: note when a request is written, so that the
    client can tell the budget how late after its slot the call left (`sent_at`); refuse to
    write one past its deadline (`send_by`).

    Both happen at the socket write (`send`), not around `request`: urllib3 and http.client
    build the request line and headers in Python first, and a thread held meanwhile (a
    sandbox out of its CPU share) is late by the time it writes, not when it began.
    Measured in the AWS-mode bench (2026-12-03, 200 calls/s): checked as `request` began,
    6-38 calls a run were stopped and 39-132 still left late; at the write, none was counted
    late (docs/benchmarks.md says what that count cannot see).
    """

    _send_by: float | None = None

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._send_by = getattr(_SENT, "deadline", None)
        _SENT.deadline = None
        try:
            super().request(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._send_by = None

    def send(self, data: Any) -> None:
        deadline, self._send_by = self._send_by, None
        now = time.perf_counter()
        if deadline is not None and now > deadline:
            raise SlotMissed(f"{1000 * (now - deadline):.1f} ms past the slot's last moment")
        # Timed as the write begins: a request this small leaves in one write, and a thread
        # held after it (the sandbox's CPU share spent) would be timed late for nothing.
        _SENT.at = now
        super().send(data)  # type: ignore[misc]


class TimedHTTPConnection(_TimedRequest, urllib3.connection.HTTPConnection):
    pass


class TimedHTTPSConnection(_TimedRequest, urllib3.connection.HTTPSConnection):
    pass


_TIMED: dict[type[Any], type[Any]] = {
    urllib3.connection.HTTPConnection: TimedHTTPConnection,
    urllib3.connection.HTTPSConnection: TimedHTTPSConnection,
}


def sent_at() -> float | None:
    """When this thread's last request on a vendor connection began its write, in one
    piece (time.perf_counter), once: None if none was since the last ask (a test double
    answered, or the request failed before it was written)."""
    at: float | None = getattr(_SENT, "at", None)
    _SENT.at = None
    return at


def encode_segment(entity_id: str) -> str:
    """`entity_id` percent-encoded as exactly one path segment (RFC 3986, unreserved literal).

    "." and ".." are encoded as "%2E" / "%2E%2E": left literal they are dot-segments,
    which any URL normaliser (urllib3's among them) resolves against the parent path.
    PoisonError if the id is empty or not encodable (a lone surrogate).
    """
    if not entity_id:
        raise PoisonError("entity id is empty")
    try:
        segment = quote(entity_id, safe="")
    except UnicodeEncodeError as exc:
        raise PoisonError(f"entity id is not valid Unicode: {entity_id!r}") from exc
    if segment in (".", ".."):
        segment = segment.replace(".", "%2E")
    return segment


def vendor_path(path_template: str, ids: Mapping[str, str] | str | None = None) -> str:
    """The request path: each `{name}` of `path_template` replaced by the encoded id of
    that name (one id alone fills the template's one placeholder)."""
    names = [name for _, name, _, _ in Formatter().parse(path_template) if name is not None]
    if isinstance(ids, str):
        if len(names) != 1:
            raise ValueError(f"path {path_template!r} and entity id {ids!r} do not fit")
        ids = {names[0]: ids}
    ids = ids or {}
    if set(names) - set(ids):
        raise ValueError(f"path {path_template!r} and ids {sorted(ids)} do not fit")
    if not names:
        return path_template
    path = path_template
    for name in dict.fromkeys(names):
        path = path.replace("{" + name + "}", encode_segment(ids[name]))
    return path


class VendorAdapter(HTTPAdapter):
    """requests' HTTPAdapter that finds the vendor's connection pool once, not per request.

    HTTPAdapter parses every request's URL into a pool key and looks the pool up again, then
    parses it once more for the request line, and fills a cookie jar nobody reads: together
    about a fifth of the adapter's instructions per call, for one host that never changes.
    Only documented subclassing hooks change (`get_connection_with_tls_context`,
    `request_url`, `build_response`); `send`, which the `responses` test mocks replace, is
    HTTPAdapter's own.
    """

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._prefix = base_url.rstrip("/") + "/"
        parts = urlsplit(self._prefix)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._pool: tuple[Any, Any] | None = None  # ((verify, cert), pool)

    def _ours(self, request: requests.PreparedRequest, proxies: Mapping[str, str] | None) -> bool:
        return not proxies and (request.url or "").startswith(self._prefix)

    def request_url(
        self, request: requests.PreparedRequest, proxies: Mapping[str, str] | None
    ) -> str:
        # The URL after the origin, as HTTPAdapter sends it when there is no proxy, without
        # parsing it again.
        if self._ours(request, proxies):
            target = (request.url or "")[len(self._origin) :]
            if not target.startswith("//"):
                return target
        return super().request_url(request, proxies)

    def get_connection_with_tls_context(
        self,
        request: requests.PreparedRequest,
        verify: bool | str | None,
        proxies: Mapping[str, str] | None = None,
        cert: Any = None,
    ) -> Any:
        cacheable = self._ours(request, proxies)
        cached = self._pool  # read once: close() may clear it meanwhile
        if cacheable and cached is not None and cached[0] == (verify, cert):
            return cached[1]
        pool = super().get_connection_with_tls_context(request, verify, proxies, cert)
        if cacheable:
            # Its connections (made as they are needed) note when each request left.
            if isinstance(pool, urllib3.HTTPConnectionPool):
                pool.ConnectionCls = _TIMED.get(pool.ConnectionCls, pool.ConnectionCls)
            self._pool = ((verify, cert), pool)
        return pool

    def connect_ahead(
        self,
        request: requests.PreparedRequest,
        *,
        verify: bool | str | None,
        cert: Any,
        connect_timeout: float,
    ) -> None:
        """Leave a connected idle connection to the vendor in the pool for `request`,
        opening it now if the one the pool would hand out is new or was dropped.

        Called before the call waits for its budget slot: the request sent when the slot
        comes then arrives about when the slot says. Sent on a new connection, it would
        arrive a DNS lookup and a TCP (and TLS: one to three round trips) handshake later,
        bunched with calls sent after it on open connections, and a vendor counting a strict
        rolling window would count them together: a new Lambda sandbox's first calls, all
        on new connections, beside another sandbox's. (On the simulator's loopback a
        connection opens in well under a millisecond and no effect was measurable; see
        docs/benchmarks.md, 2026-12-03.) Connection errors propagate as requests'
        ConnectionError, ConnectTimeout or SSLError: nothing reached the vendor, so no slot
        was spent. About 20,000 instructions a call (0.8%, bench.hotpath).

        Nothing happens when `send` is not requests' own (a test double such as `responses`
        answers without connections) or the request is not for the vendor's base URL.
        """
        if type(self).send is not _HTTP_ADAPTER_SEND or not self._ours(request, None):
            return
        pool = self.get_connection_with_tls_context(request, verify, None, cert)
        conn = pool._get_conn()  # a dropped connection comes back closed (no socket)
        try:
            if conn.sock is None:
                conn.timeout = connect_timeout
                conn.connect()
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            conn.close()
            # As HTTPAdapter.send maps them.
            if isinstance(exc, urllib3.exceptions.ConnectTimeoutError | TimeoutError):
                raise requests.exceptions.ConnectTimeout(exc, request=request) from exc
            if isinstance(exc, ssl.SSLError | urllib3.exceptions.SSLError):
                raise requests.exceptions.SSLError(exc, request=request) from exc
            raise requests.exceptions.ConnectionError(exc, request=request) from exc
        finally:
            pool._put_conn(conn)

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        # HTTPAdapter's build_response without the cookie jar: the vendor contract has no
        # cookies and nothing here would send them back, so parsing Set-Cookie is wasted.
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.encoding = requests.utils.get_encoding_from_headers(response.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url or ""
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        self._pool = None
        super().close()


def read_body(response: requests.Response, limit: int) -> str | None:
    """Read the body into `response.content`, or stop at `limit` bytes and say why.

    A Content-Length over the limit is refused before a byte is read; otherwise the body
    is read in chunks (decoded, so a compressed body is measured as it will be held) and
    reading stops once it is over. A body not read whole is dropped (`content` is empty)
    with its connection.
    """
    declared = header_int(response, "Content-Length")
    if declared is not None and declared > limit:
        reason = f"page of {declared:,} bytes (Content-Length) over max_page_bytes ({limit:,})"
    else:
        chunks = []
        size = 0
        for chunk in response.iter_content(BODY_CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                break
            chunks.append(chunk)
        else:
            # What `Response.content` caches the body in, so that it and `json()` find it.
            response._content = b"".join(chunks)
            return None
        reason = (
            f"page of more than {limit:,} bytes over max_page_bytes ({limit:,}):"
            f" stopped reading after {size:,} bytes"
        )
    response.close()
    response._content = b""
    return reason


@lru_cache(maxsize=256)
def encode_query(pairs: tuple[tuple[str, str], ...]) -> str:
    """The query string: every name and value encoded whole (a run repeats the same ones)."""
    return urlencode(pairs, quote_via=quote, safe="")


def describe_transport_error(exc: Exception) -> str:
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "read timeout"
    if isinstance(
        exc, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)
    ):
        return "truncated body"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection error"
    return type(exc).__name__


def header_int(response: requests.Response, name: str) -> int | None:
    value = response.headers.get(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def header_seconds(response: requests.Response, name: str) -> float | None:
    """A header of non-negative decimal seconds; None if missing or garbage."""
    value = response.headers.get(name)
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
