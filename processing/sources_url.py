"""A URL as a :class:`~processing.sources.ByteSource` (transfer source ``{"url": ...}``).

Fetched with aiohttp through an SSRF-guarded connector (:mod:`processing.ssrf`), following the
checks of CKAN's archiver:

* **Open** (:meth:`UrlByteSource.open`): one streamed ``GET``; redirects are followed by hand
  (at most ``max_redirects``), each hop's URL checked before it is requested and each address
  checked when connecting. A GET rather than a HEAD: many servers (presigned S3 URLs among
  them) answer HEAD differently or not at all. The status decides first: 4xx →
  ``source_http_<status>``, never retried; 5xx, 408, 429 and network errors → retried.
* **Size limit** (``max_size``): a declared ``Content-Length`` over it is refused *before
  any of the body is read* (``too_large``); a body without one (chunked) is counted while it
  streams and stopped the moment it passes the limit (``too_large``).
* **Content type** is recorded from the response (``content_type``), the name from
  ``Content-Disposition`` or the last path segment (``filename``), ``sha256`` while reading.

A destination may read a range twice (a retried Graph fragment), so the bytes must be
readable again. Which way is chosen automatically, when the source is opened:

* **range mode** -- the server advertised ``Accept-Ranges: bytes``, a ``Content-Length``, a
  strong validator (an ``ETag`` not marked ``W/``, else ``Last-Modified``) and no
  ``Content-Encoding``. The probe's body is not downloaded; every :meth:`open_range` is a
  ``GET`` with ``Range: bytes=a-b`` and ``If-Range: <validator>`` to the final (redirected)
  URL. If the resource changed, ``If-Range`` makes the server send the new whole body with
  200 and a different validator → ``source_changed`` (never retryable). A server that
  advertised ranges but answers 200 with the *same* validator ignores ``Range``: the bytes
  before the range are read and dropped. A stream that breaks mid-range is resumed from the
  next byte (``retries`` times in a row without progress). Nothing touches the disk;
  ``sha256`` is known once the whole resource was read in order (as destinations do).
* **spool mode** -- otherwise (or ``mode="spool"``): the body is streamed once into a temp
  file in ``spool_dir`` (memory bounded by ``chunk_size``; disk by ``max_size``), hashed on
  the way, and ranges are read from that file. ``sha256`` is known after :meth:`open`. The
  file is deleted by :meth:`aclose`.

Errors are :class:`~processing.sources.SourceError` with ``code``:

=========================  =====  =========================================================
``too_large``              no     over ``max_size`` (declared, or while streaming)
``address_not_allowed``    no     the host is or resolves to a refused address (any hop)
``scheme_not_allowed``     no     not http/https (any hop)
``invalid_url``            no     no host, malformed Location, odd numeric host
``too_many_redirects``     no     more than ``max_redirects`` hops
``source_http_<status>``   4xx:   no (408, 429: yes); 5xx: yes, after ``retries``
``source_changed``         no     the validator or size changed between reads
``source_tls_error``       no     certificate or TLS failure
``source_unavailable``     yes    connection errors, timeouts, truncated bodies
``spool_failed``           yes    the temp file could not be written (disk full)
=========================  =====  =========================================================

Messages name the URL without its query string and user info (presigned URLs carry secrets).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import tempfile
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO, Literal, Self

import aiohttp
from yarl import URL

from processing.sources import FileSource, SourceError, check_range, open_range
from processing.ssrf import (
    AddressPolicy,
    UrlNotAllowed,
    address_error,
    check_url,
    guarded_connector,
)

__all__ = [
    "DEFAULT_MAX_REDIRECTS",
    "DEFAULT_URL_CHUNK_SIZE",
    "DEFAULT_USER_AGENT",
    "UrlByteSource",
    "UrlSourceSettings",
    "make_url_session",
]

log = logging.getLogger("tusgate.processing.sources")

#: Bytes per read from the network and per write to the spool file (256 KiB).
DEFAULT_URL_CHUNK_SIZE = 256 * 1024
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_USER_AGENT = "tusgate (server-side transfer)"

_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True, kw_only=True)
class UrlSourceSettings:
    """How URL sources are fetched. Times in seconds, sizes in bytes."""

    #: Largest resource fetched; 0 = no limit (the worker should pass one).
    max_size: int = 0
    #: Where spool files go; None = the system temp dir. Needs room for ``max_size`` per
    #: concurrent transfer.
    spool_dir: Path | None = None
    #: Which addresses may be connected to (SSRF); the default refuses private ones.
    policy: AddressPolicy = field(default_factory=AddressPolicy)
    #: ``auto``: ranges when the server supports them, else spool; ``spool``: always spool.
    mode: Literal["auto", "spool"] = "auto"
    #: Retries after a network error, 5xx, 408 or 429 (so ``retries + 1`` attempts).
    retries: int = 3
    #: First retry delay; doubled per retry, at most ``backoff_max`` (Retry-After honoured
    #: up to that too).
    backoff_initial: float = 0.5
    backoff_max: float = 10.0
    #: Seconds to connect (per address), and without a byte while reading.
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    chunk_size: int = DEFAULT_URL_CHUNK_SIZE
    user_agent: str = DEFAULT_USER_AGENT

    def __post_init__(self) -> None:
        for name in ("max_size", "retries", "max_redirects"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("backoff_initial", "backoff_max"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("connect_timeout", "read_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if self.mode not in ("auto", "spool"):
            raise ValueError(f"mode must be 'auto' or 'spool', not {self.mode!r}")

    def backoff(self, failure: int, retry_after: float | None = None) -> float:
        """Seconds before the retry that follows failure number `failure` (0-based)."""
        delay = min(self.backoff_max, self.backoff_initial * 2.0**failure)
        delay *= random.uniform(0.75, 1.0)  # spread workers that failed together
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.backoff_max)


def make_url_session(settings: UrlSourceSettings) -> aiohttp.ClientSession:
    """A session for URL sources: SSRF-guarded connector, no proxies from the environment,
    bytes as sent (no decompression). Call inside a running event loop; close it."""
    return aiohttp.ClientSession(
        connector=guarded_connector(settings.policy),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout, sock_read=settings.read_timeout
        ),
        auto_decompress=False,
        trust_env=False,
        headers={"User-Agent": settings.user_agent, "Accept-Encoding": "identity"},
    )


def _display(url: URL) -> str:
    """`url` without user info, query and fragment (presigned URLs carry secrets there)."""
    try:
        return str(url.with_user(None).with_query(None).with_fragment(None))
    except ValueError:
        return "<url>"


class _Retryable(SourceError):
    """A failure worth another attempt, with the server's Retry-After if it gave one."""

    def __init__(self, message: str, *, code: str, retry_after: float | None = None) -> None:
        super().__init__(message, retryable=True, code=code)
        self.retry_after = retry_after


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None


def _strong_etag(response: aiohttp.ClientResponse) -> str | None:
    etag = response.headers.get("ETag")
    if etag is None or etag.startswith("W/"):
        return None
    return etag


def _write(handle: BinaryIO, digest: hashlib._Hash, data: bytearray) -> None:
    handle.write(data)
    digest.update(data)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


class UrlByteSource:
    """One URL's bytes, pinned to what was seen when it was opened. Use :meth:`open`, and
    :meth:`aclose` it (or ``async with``): it may own a session and a spool file."""

    def __init__(
        self,
        url: str,
        settings: UrlSourceSettings,
        session: aiohttp.ClientSession,
        *,
        own_session: bool,
    ) -> None:
        self.url = url
        self.settings = settings
        self._session = session
        self._own_session = own_session
        #: The URL after redirects: ranges are requested from here.
        self.final_url = URL(url)
        self.content_type: str | None = None
        self.etag: str | None = None
        self.last_modified: str | None = None
        self.filename: str | None = None
        self.mode: Literal["range", "spool"] = "spool"
        self._size = 0
        self._validator: str | None = None
        self._spool_path: Path | None = None
        self._spooled: FileSource | None = None
        self._digest = hashlib.sha256()
        self._hashed_upto = 0
        self._sha256: str | None = None
        self._closed = False

    # --- opening -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        url: str,
        settings: UrlSourceSettings,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> UrlByteSource:
        """Fetch the headers (and, in spool mode, the body) of `url`; raises SourceError.

        `session`: one shared session from :func:`make_url_session` (the caller closes it);
        by default the source makes its own and closes it in :meth:`aclose`. A session made
        any other way has no connect-time SSRF check.
        """
        own = session is None
        source = cls(url, settings, session or make_url_session(settings), own_session=own)
        try:
            try:
                parsed = URL(url)
            except (TypeError, ValueError) as exc:
                raise UrlNotAllowed(f"not a URL: {exc}") from exc
            check_url(parsed, settings.policy)
            await source._open_with_retries()
        except BaseException:
            await source.aclose()
            raise
        return source

    async def _open_with_retries(self) -> None:
        failures = 0
        while True:
            try:
                await self._probe()
                return
            except _Retryable as exc:
                if failures >= self.settings.retries:
                    raise
                delay = self.settings.backoff(failures, exc.retry_after)
                failures += 1
                log.info(
                    "%s: retry %d/%d in %.2fs after: %s",
                    _display(URL(self.url)),
                    failures,
                    self.settings.retries,
                    delay,
                    exc.message,
                )
                await asyncio.sleep(delay)

    async def _probe(self) -> None:
        response = await self._send(URL(self.url), {})
        try:
            self._expect(response, 200)
            self.final_url = response.url
            declared = response.content_length
            limit = self.settings.max_size
            if limit and declared is not None and declared > limit:
                # CKAN archiver: refuse before downloading. Closing drops the connection, so
                # the body is never read.
                raise SourceError(
                    f"{_display(self.final_url)} is {declared} bytes, over the limit of {limit}",
                    retryable=False,
                    code="too_large",
                )
            self.content_type = response.headers.get("Content-Type")
            self.etag = response.headers.get("ETag")
            self.last_modified = response.headers.get("Last-Modified")
            self.filename = self._filename(response)
            validator = self._range_validator(response)
            if validator is not None and declared:
                self.mode = "range"
                self._validator = validator
                self._size = declared
                return
            await self._spool(response)
        finally:
            response.close()

    def _range_validator(self, response: aiohttp.ClientResponse) -> str | None:
        """The If-Range validator when ranges can be used, else None (→ spool)."""
        if self.settings.mode == "spool":
            return None
        ranges = {v.strip().lower() for v in response.headers.get("Accept-Ranges", "").split(",")}
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if "bytes" not in ranges or encoding not in ("", "identity"):
            return None
        return _strong_etag(response) or response.headers.get("Last-Modified")

    def _filename(self, response: aiohttp.ClientResponse) -> str | None:
        disposition = response.content_disposition
        name = disposition.filename if disposition is not None else None
        if not name:
            name = response.url.name
        name = PurePosixPath(name.replace("\\", "/")).name if name else ""
        return name or None

    async def _spool(self, response: aiohttp.ClientResponse) -> None:
        """Stream the body into a fresh temp file, counting and hashing it."""
        if self._spool_path is not None:  # a retry: start over
            await asyncio.to_thread(_remove, self._spool_path)
            self._spool_path = None
        limit = self.settings.max_size
        spool_dir = self.settings.spool_dir
        if spool_dir is not None:
            await asyncio.to_thread(spool_dir.mkdir, parents=True, exist_ok=True)
        try:
            fd, name = await asyncio.to_thread(
                tempfile.mkstemp, prefix="tusgate-url-", suffix=".part", dir=spool_dir
            )
        except OSError as exc:
            raise _Retryable(f"cannot create a spool file: {exc}", code="spool_failed") from exc
        self._spool_path = Path(name)
        digest = hashlib.sha256()
        count = 0
        buffer = bytearray()
        where = _display(self.final_url)
        try:
            with os.fdopen(fd, "wb") as handle:
                async for chunk in response.content.iter_chunked(self.settings.chunk_size):
                    count += len(chunk)
                    if limit and count > limit:
                        raise SourceError(
                            f"{where} sent more than the limit of {limit} bytes",
                            retryable=False,
                            code="too_large",
                        )
                    buffer += chunk
                    if len(buffer) >= self.settings.chunk_size:
                        data, buffer = buffer, bytearray()
                        await asyncio.to_thread(_write, handle, digest, data)
                if buffer:
                    await asyncio.to_thread(_write, handle, digest, buffer)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _Retryable(
                f"{where}: download broke after {count} bytes: {exc!r}", code="source_unavailable"
            ) from exc
        except OSError as exc:
            raise _Retryable(f"cannot write the spool file: {exc}", code="spool_failed") from exc
        self._size = count
        self._sha256 = digest.hexdigest()
        self._spooled = await asyncio.to_thread(
            FileSource, self._spool_path, chunk_size=self.settings.chunk_size
        )

    # --- requests ------------------------------------------------------------------------

    async def _send(self, url: URL, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """GET `url`, following redirects by hand: every hop is checked (scheme, literal
        address) before it is requested, and its addresses when connecting."""
        current = url
        for _hop in range(self.settings.max_redirects + 1):
            check_url(current, self.settings.policy)
            try:
                response = await self._session.get(current, headers=headers, allow_redirects=False)
            except aiohttp.InvalidURL as exc:
                raise UrlNotAllowed(f"cannot fetch {_display(current)}: {exc}") from exc
            except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch) as exc:
                raise SourceError(
                    f"{_display(current)}: TLS failed: {exc}",
                    retryable=False,
                    code="source_tls_error",
                ) from exc
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                blocked = address_error(exc)
                if blocked is not None:
                    raise blocked from exc
                raise _Retryable(
                    f"{_display(current)}: {exc!r}", code="source_unavailable"
                ) from exc
            if response.status not in _REDIRECTS:
                return response
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise SourceError(
                    f"{_display(current)}: {response.status} redirect without a Location",
                    retryable=False,
                    code=f"source_http_{response.status}",
                )
            try:
                current = current.join(URL(location))
            except (TypeError, ValueError) as exc:
                raise UrlNotAllowed(f"{_display(current)}: bad redirect: {exc}") from exc
        raise SourceError(
            f"{_display(url)}: more than {self.settings.max_redirects} redirects",
            retryable=False,
            code="too_many_redirects",
        )

    def _expect(self, response: aiohttp.ClientResponse, *statuses: int) -> None:
        status = response.status
        if status in statuses:
            return
        message = f"{_display(response.url)} answered {status} {response.reason or ''}".rstrip()
        code = f"source_http_{status}"
        if status >= 500 or status in (408, 429):
            raise _Retryable(message, code=code, retry_after=_retry_after(response))
        raise SourceError(message, retryable=False, code=code)

    # --- the ByteSource ------------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def sha256(self) -> str | None:
        """Hex SHA-256 of the whole resource, once every byte has been read (spool mode:
        after :meth:`open`; range mode: after reading from 0 to the end in order)."""
        if self._sha256 is None and self._hashed_upto == self._size:
            self._sha256 = self._digest.hexdigest()
        return self._sha256

    def __repr__(self) -> str:
        return f"UrlByteSource({_display(URL(self.url))!r}, size={self._size}, mode={self.mode})"

    async def open_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        check_range(start, end, self._size)
        if start == end:
            return
        if self._closed:
            raise SourceError("the source was closed", retryable=False, code="source_failed")
        if self._spooled is not None:
            async with open_range(self._spooled, start, end) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        position = start
        failures = 0
        while position < end:
            progressed = False
            try:
                async with aclosing(self._get_range(position, end)) as chunks:
                    async for chunk in chunks:
                        self._hash(position, chunk)
                        position += len(chunk)
                        progressed = True
                        yield chunk
                if not progressed:
                    raise _Retryable(
                        f"{_display(self.final_url)}: no bytes for range {position}-{end - 1}",
                        code="source_unavailable",
                    )
            except _Retryable as exc:
                failures = 0 if progressed else failures + 1
                if failures > self.settings.retries:
                    raise
                delay = self.settings.backoff(max(failures - 1, 0), exc.retry_after)
                log.info("%s: resuming at byte %d after: %s", self.final_url.host, position, exc)
                await asyncio.sleep(delay)

    def _hash(self, position: int, chunk: bytes) -> None:
        """Extend the running SHA-256 with the part of `chunk` past what is hashed already."""
        upto = self._hashed_upto
        if position <= upto < position + len(chunk):
            self._digest.update(memoryview(chunk)[upto - position :])
            self._hashed_upto = position + len(chunk)

    async def _get_range(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """One ``Range`` + ``If-Range`` GET from `start`; yields at most ``end - start``
        bytes (fewer when the server sends a shorter range: the caller asks for the rest)."""
        assert self._validator is not None
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Range": self._validator}
        where = _display(self.final_url)
        response = await self._send(self.final_url, headers)
        try:
            if response.status == 416:
                raise SourceError(
                    f"{where} changed: range {start}-{end - 1} is past its end",
                    retryable=False,
                    code="source_changed",
                )
            self._expect(response, 200, 206)
            skip, want = self._check_range_response(response, start, end)
            async for chunk in response.content.iter_chunked(self.settings.chunk_size):
                if skip:
                    dropped = min(skip, len(chunk))
                    chunk, skip = chunk[dropped:], skip - dropped
                if len(chunk) > want:
                    chunk = chunk[:want]
                if chunk:
                    want -= len(chunk)
                    yield chunk
                if want == 0:
                    return
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise _Retryable(f"{where}: read broke: {exc!r}", code="source_unavailable") from exc
        finally:
            response.close()

    def _check_range_response(
        self, response: aiohttp.ClientResponse, start: int, end: int
    ) -> tuple[int, int]:
        """``(bytes to skip, bytes to yield)`` of a 200/206 answer to a range request."""
        where = _display(self.final_url)
        changed = SourceError(
            f"{where} changed while it was read", retryable=False, code="source_changed"
        )
        if response.status == 200:
            # If-Range: a changed resource comes back whole, with its new validator.
            etag = _strong_etag(response)
            same = (
                (etag == self._validator)
                if etag is not None
                else (response.headers.get("Last-Modified") == self._validator)
            )
            if not same or response.content_length != self._size:
                raise changed
            log.info("%s ignores Range although it advertised it: skipping %d bytes", where, start)
            return start, end - start
        content_range = response.headers.get("Content-Range", "")
        unit, _, spec = content_range.partition(" ")
        span, _, total = spec.partition("/")
        first, _, last = span.partition("-")
        if unit.strip().lower() != "bytes" or not (first.isdigit() and last.isdigit()):
            raise SourceError(
                f"{where}: unusable Content-Range {content_range!r}",
                retryable=False,
                code="source_failed",
            )
        if total.strip() != "*" and total.strip() != str(self._size):
            raise changed
        if int(first) != start or int(last) < int(first) or int(last) >= end:
            raise SourceError(
                f"{where}: asked for bytes {start}-{end - 1}, got {span}",
                retryable=False,
                code="source_failed",
            )
        return 0, int(last) - int(first) + 1

    # --- lifetime ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the own session and delete the spool file. Idempotent."""
        self._closed = True
        self._spooled = None
        path, self._spool_path = self._spool_path, None
        if path is not None:
            await asyncio.to_thread(_remove, path)
        if self._own_session:
            self._own_session = False
            await self._session.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
