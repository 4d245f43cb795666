"""HTTP plumbing for the OneDrive destination: clients, URLs, retries, response parsing.

Two clients, on purpose:

* the **Graph client** (API calls: createUploadSession, simple upload, item lookups) is an
  ``httpx.AsyncClient`` loaded with msgraph-core's default middleware (redirects that scrub the
  Authorization header across hosts, retry of 429/503/504 honouring ``Retry-After``) and a
  :class:`~.graph_auth.BearerAuth`;
* the **upload client** (PUT/GET/DELETE on the ``uploadUrl``) is a plain ``httpx.AsyncClient``
  without auth: "If you include the Authorization header when issuing the PUT call, it may
  result in an HTTP 401 Unauthorized response." The uploadUrl is itself the credential.

msgraph-core's transport runs its middleware only for requests that carry the kiota request
options extension; :func:`graph_extensions` must be passed on every Graph call, or the calls
silently bypass the retry/redirect handlers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx
from kiota_http.middleware.options import RetryHandlerOption
from msgraph_core import GraphClientFactory

from .errors import (
    DeliveryCanceled,
    DeliveryError,
    DestinationRejected,
    DestinationUnavailable,
    Unauthorized,
)

__all__ = [
    "RetryBudget",
    "create_graph_client",
    "create_upload_client",
    "drive_path",
    "graph_error_text",
    "graph_extensions",
    "item_url",
    "next_expected_offset",
    "parse_expiration",
    "parse_retry_after",
    "pause",
    "rejected",
    "response_json",
]


def graph_extensions() -> dict[str, Any]:
    """Request extensions that route a call through msgraph-core's middleware pipeline
    (a fresh dict per request: the middleware pops and rewrites entries)."""
    return {"kiota_request_options": {}}


logger = logging.getLogger(__name__)

_DRIVE_OWNERS = ("users", "groups", "sites")
#: RFC 3986 sub-delims and "@" may stay literal in a path segment; drive ids use "!" and
#: site ids use ",", and Graph's own examples show them (and UPNs' "@") unencoded.
_SEGMENT_SAFE = "!$&'()*+,;=@"
_FRACTION = re.compile(r"(\.\d{6})\d+")


def drive_path(selector: str) -> str:
    """Graph path of a drive: ``me`` → ``/me/drive``, ``users/{id}`` → ``/users/{id}/drive``
    (also ``groups/``, ``sites/``), ``drives/{id}`` or a bare drive id → ``/drives/{id}``."""
    selector = selector.strip().strip("/")
    if selector == "me":
        return "/me/drive"
    kind, slash, ident = selector.partition("/")
    if not slash and kind not in ("drives", *_DRIVE_OWNERS):
        kind, ident = "drives", selector
    if not ident or "/" in ident:
        raise ValueError(
            f"drive selector {selector!r} must be me, drives/ID, users/ID, groups/ID or sites/ID"
        )
    if kind == "drives":
        return f"/drives/{quote(ident, safe=_SEGMENT_SAFE)}"
    if kind in _DRIVE_OWNERS:
        return f"/{kind}/{quote(ident, safe=_SEGMENT_SAFE)}/drive"
    raise ValueError(
        f"drive selector {selector!r} must be me, drives/ID, users/ID, groups/ID or sites/ID"
    )


def item_url(base_url: str, drive: str, components: Sequence[str], action: str = "") -> str:
    """``{base}{drive}/root:/{path}`` plus ``:/{action}`` (path components percent-encoded)."""
    path = "/".join(quote(component, safe="") for component in components)
    url = f"{base_url.rstrip('/')}{drive}/root:/{path}"
    return f"{url}:/{action}" if action else url


class _ClosingGraphTransport(httpx.AsyncBaseTransport):
    """msgraph-core's AsyncGraphTransport does not close the transport it wraps, so closing
    the client would leak its connection pool (ResourceWarning: unclosed transport)."""

    def __init__(self, graph_transport: httpx.AsyncBaseTransport, inner: httpx.AsyncBaseTransport):
        self._graph_transport = graph_transport
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._graph_transport.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def create_graph_client(
    auth: httpx.Auth,
    *,
    timeout: httpx.Timeout,
    middleware_retries: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An httpx client with msgraph-core's default middleware and the bearer auth.

    ``GraphClientFactory`` is given our own client, so the base URL stays ours (any
    Graph-compatible endpoint) instead of the national-cloud host it would pick.
    """
    inner = transport or httpx.AsyncHTTPTransport()
    client = httpx.AsyncClient(auth=auth, timeout=timeout, follow_redirects=False, transport=inner)
    options = {
        RetryHandlerOption.get_key(): RetryHandlerOption(delay=0, max_retries=middleware_retries)
    }
    graph_client: httpx.AsyncClient = GraphClientFactory.create_with_default_middleware(
        client=client, options=options
    )
    graph_client._transport = _ClosingGraphTransport(graph_client._transport, inner)
    return graph_client


def create_upload_client(
    *, timeout: httpx.Timeout, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """A plain client for the uploadUrl: no auth, no redirects (a redirect would be a bug)."""
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


def parse_expiration(value: object) -> datetime | None:
    """``expirationDateTime`` (ISO 8601, Graph may send 7 fractional digits) as aware UTC."""
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.fromisoformat(_FRACTION.sub(r"\1", value.replace("Z", "+00:00")))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def next_expected_offset(body: Mapping[str, Any]) -> int | None:
    """The lowest start in ``nextExpectedRanges`` (``["26-"]``, ``["12345-55232", ...]``).

    "nextExpectedRanges doesn't always list all of the missing ranges", so the lowest start is
    the only safe place to continue from. None when the list is missing, empty or malformed.
    """
    ranges = body.get("nextExpectedRanges")
    if not isinstance(ranges, list) or not ranges:
        return None
    starts: list[int] = []
    for item in ranges:
        if not isinstance(item, str):
            return None
        start, _, _ = item.partition("-")
        if not start.isdigit():
            return None
        starts.append(int(start))
    return min(starts)


def response_json(response: httpx.Response) -> dict[str, Any]:
    """The JSON object of a response, or a retryable error when the body is not one."""
    try:
        body = response.json()
    except ValueError as exc:
        raise DestinationUnavailable(
            f"Graph answered {response.status_code} without a JSON body"
        ) from exc
    if not isinstance(body, dict):
        raise DestinationUnavailable(
            f"Graph answered {response.status_code} with a non-object body"
        )
    return body


def graph_error_text(response: httpx.Response) -> str:
    """``code: message`` from Graph's error body (``{"error": {"code", "message"}}``)."""
    try:
        error = response.json().get("error", {})
        text = f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
    except (ValueError, AttributeError):
        text = ""
    return text or response.reason_phrase or "no details"


def rejected(response: httpx.Response, what: str) -> DeliveryError:
    """The non-retryable error for a 4xx we do not handle specially."""
    detail = f"{what}: HTTP {response.status_code} ({graph_error_text(response)})"
    if response.status_code in (401, 403):
        return Unauthorized(detail)
    if response.status_code == 507:
        return DestinationUnavailable(detail, code="storage_full")
    return DestinationRejected(detail)


async def pause(delay: float, cancel: asyncio.Event | None) -> None:
    """Sleep ``delay`` seconds, or raise DeliveryCanceled as soon as ``cancel`` is set."""
    if cancel is None:
        await asyncio.sleep(delay)
        return
    if cancel.is_set():
        raise DeliveryCanceled("delivery canceled")
    try:
        await asyncio.wait_for(cancel.wait(), timeout=delay)
    except TimeoutError:
        return
    raise DeliveryCanceled("delivery canceled")


class RetryBudget:
    """Bounded retries with capped exponential backoff and full jitter.

    "Use an exponential back off strategy if any 5xx server errors are returned when resuming or
    retrying upload requests"; a ``Retry-After`` from 429/503 is honoured as given, up to
    ``max_retry_after`` (beyond that we hand the wait to the worker's redelivery instead of
    holding a connection slot). :meth:`reset` after progress: the budget is per fragment.
    """

    def __init__(
        self,
        *,
        max_attempts: int,
        backoff_initial: float,
        backoff_max: float,
        max_retry_after: float,
        cancel: asyncio.Event | None,
    ) -> None:
        self.max_attempts = max_attempts
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.cancel = cancel
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise DeliveryCanceled("delivery canceled")

    async def wait(self, reason: str, *, retry_after: float | None = None) -> None:
        """Count a failed attempt and sleep before the next; raise once the budget is spent."""
        self.failures += 1
        if self.failures >= self.max_attempts:
            raise DestinationUnavailable(f"{reason}; gave up after {self.failures} attempts")
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                raise DestinationUnavailable(
                    f"{reason}; Retry-After {retry_after:.0f}s is too long"
                )
            delay = retry_after
        else:
            cap = min(self.backoff_max, self.backoff_initial * 2 ** (self.failures - 1))
            delay = random.uniform(cap / 2, cap)
        if delay:
            logger.info(
                "%s; retrying in %.2fs (attempt %d of %d)",
                reason,
                delay,
                self.failures + 1,
                self.max_attempts,
            )
        await pause(delay, self.cancel)
