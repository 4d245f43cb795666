"""An S3 object as a :class:`~processing.sources.ByteSource` (transfer source ``{"s3": ...}``).

``await S3ByteSource.open(client, bucket, key)`` asks ``HeadObject`` once for the size, content
type and ETag. Every :meth:`S3ByteSource.open_range` is then one ranged ``GetObject``
(``Range: bytes=a-b``) *pinned to that ETag* with ``If-Match``: if the object is replaced
between the HEAD and any read, S3 answers 412 and the read fails with ``source_changed``
(never retryable: the bytes already delivered belong to the old object). The body is streamed
in bounded chunks (``iter_chunks``), one chunk per worker-thread hop, so the event loop never
blocks on the network and memory never holds more than one chunk per reader.

A stream that breaks mid-range (reset, read timeout) is resumed with a new ranged GET from the
first byte not yet yielded, up to ``read_retries`` times in a row without progress (the
``If-Match`` pin keeps the resumed bytes those of the same object). Failures of the requests
themselves are retried by botocore (``make_s3_client``: standard retry mode).

Errors (:class:`~processing.sources.SourceError` ``code``, ``retryable``):

==========================  =====  ========================================================
``source_not_found``        no     no such key or bucket (HEAD/GET 404)
``source_forbidden``        no     403 (also a missing key without ``s3:ListBucket``)
``source_changed``          no     412 on ``If-Match``, or a different ETag/size on a read
``source_http_<status>``    no     any other 4xx
``source_unavailable``      yes    5xx, throttling, connection errors, timeouts, credentials
==========================  =====  ========================================================

Permissions needed: ``s3:GetObject`` (HEAD and GET), ``s3:ListBucket`` for a clean 404 on
missing keys, ``s3:DeleteObject`` for ``delete_source``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import aclosing
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from processing.sources import DEFAULT_CHUNK_SIZE, SourceError, check_range

__all__ = [
    "DEFAULT_READ_RETRIES",
    "S3ByteSource",
    "S3SourceClient",
    "delete_object",
    "make_s3_client",
]

log = logging.getLogger("tusgate.processing.sources")

#: Stream breaks tolerated in a row (without a byte of progress) within one range read.
DEFAULT_READ_RETRIES = 3

_NOT_FOUND = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
_CHANGED = frozenset({"412", "PreconditionFailed", "416", "InvalidRange"})
_FORBIDDEN = frozenset({"403", "AccessDenied", "Forbidden"})


class S3SourceClient(Protocol):
    """The S3 calls a source makes (a boto3 S3 client fits; tests may pass another)."""

    def head_object(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]: ...

    def delete_object(self, **kwargs: Any) -> Mapping[str, Any]: ...


def make_s3_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    *,
    max_attempts: int = 3,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_pool_connections: int = 10,
) -> S3SourceClient:
    """A boto3 S3 client for sources (SPEC §7: ``TUSGATE_S3_ENDPOINT_URL``, ``TUSGATE_S3_REGION``).

    Credentials come from the standard AWS chain of a fresh boto3 session (environment,
    shared files, SSO, container and instance roles). An empty `endpoint_url` means AWS.
    `read_timeout` is seconds without a byte on a stream; `max_attempts` counts botocore's
    retries of each request (standard mode: 5xx, throttling, connection errors).
    """
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region or None,
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    # A session per client: boto3 sessions are not thread-safe, clients are.
    session = boto3.session.Session()
    client: S3SourceClient = session.client("s3", endpoint_url=endpoint_url or None, config=config)
    return client


def _error_code(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def _translate(exc: Exception, what: str) -> SourceError:
    """A botocore failure of `what` (``"s3://bucket/key"``) as a SourceError."""
    if isinstance(exc, ClientError):
        code, status = _error_code(exc)
        if code in _NOT_FOUND or status == 404:
            return SourceError(f"{what} does not exist", retryable=False, code="source_not_found")
        if code in _CHANGED or status in (412, 416):
            return SourceError(
                f"{what} changed while it was read", retryable=False, code="source_changed"
            )
        if code in _FORBIDDEN or status == 403:
            return SourceError(
                f"{what}: access denied (or no such key without s3:ListBucket)",
                retryable=False,
                code="source_forbidden",
            )
        if 400 <= status < 500 and code not in ("SlowDown", "RequestTimeout", "Throttling"):
            return SourceError(
                f"{what}: S3 answered {status} {code}",
                retryable=False,
                code=f"source_http_{status}",
            )
        return SourceError(
            f"{what}: S3 answered {status} {code}", retryable=True, code="source_unavailable"
        )
    if isinstance(exc, NoCredentialsError):
        # Also what an instance-metadata hiccup looks like: worth another attempt later.
        return SourceError(
            f"{what}: no AWS credentials found", retryable=True, code="source_unavailable"
        )
    return SourceError(f"{what}: {exc}", retryable=True, code="source_unavailable")


def _next_chunk(chunks: Iterator[bytes]) -> bytes:
    return next(chunks, b"")


class S3ByteSource:
    """One S3 object, pinned to the ETag seen by :meth:`open`. Create with :meth:`open`."""

    def __init__(
        self,
        client: S3SourceClient,
        bucket: str,
        key: str,
        *,
        size: int,
        etag: str,
        content_type: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        read_retries: int = DEFAULT_READ_RETRIES,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        if read_retries < 0:
            raise ValueError("read_retries must be >= 0")
        self.client = client
        self.bucket = bucket
        self.key = key
        self.etag = etag
        self.content_type = content_type
        self.chunk_size = chunk_size
        self.read_retries = read_retries
        self._size = size

    @classmethod
    async def open(
        cls,
        client: S3SourceClient,
        bucket: str,
        key: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        read_retries: int = DEFAULT_READ_RETRIES,
    ) -> S3ByteSource:
        """HEAD the object; raises SourceError (``source_not_found`` when it does not exist)."""
        what = f"s3://{bucket}/{key}"
        try:
            head = await asyncio.to_thread(client.head_object, Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, what) from exc
        etag = head.get("ETag")
        if not isinstance(etag, str) or not etag:
            # Without an ETag nothing pins the reads to this version of the object.
            raise SourceError(f"{what}: S3 gave no ETag", retryable=False, code="source_failed")
        content_type = head.get("ContentType")
        return cls(
            client,
            bucket,
            key,
            size=int(head.get("ContentLength", 0)),
            etag=etag,
            content_type=content_type if isinstance(content_type, str) else None,
            chunk_size=chunk_size,
            read_retries=read_retries,
        )

    @property
    def size(self) -> int:
        return self._size

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def __repr__(self) -> str:
        return f"S3ByteSource({self.uri!r}, size={self._size}, etag={self.etag!r})"

    async def open_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        check_range(start, end, self._size)
        position = start
        failures = 0
        while position < end:
            progressed = False
            try:
                async with aclosing(self._get(position, end)) as chunks:
                    async for chunk in chunks:
                        position += len(chunk)
                        progressed = True
                        yield chunk
                if position < end:
                    raise SourceError(
                        f"{self.uri}: stream ended at byte {position}, expected {end}",
                        retryable=True,
                        code="source_unavailable",
                    )
            except SourceError as exc:
                if not exc.retryable:
                    raise
                failures = 0 if progressed else failures + 1
                if failures > self.read_retries:
                    raise
                log.info("%s: resuming the read at byte %d after: %s", self.uri, position, exc)

    async def _get(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        """One ranged, ETag-pinned GET of ``[start, end)``, streamed; never more than asked."""
        try:
            response = await asyncio.to_thread(
                self.client.get_object,
                Bucket=self.bucket,
                Key=self.key,
                Range=f"bytes={start}-{end - 1}",
                IfMatch=self.etag,
            )
        except (ClientError, BotoCoreError) as exc:
            raise _translate(exc, self.uri) from exc
        body = response["Body"]
        try:
            self._check_response(response, start, end)
            chunks = body.iter_chunks(self.chunk_size)
            remaining = end - start
            while remaining > 0:
                try:
                    chunk = await asyncio.to_thread(_next_chunk, chunks)
                except (BotoCoreError, OSError) as exc:
                    raise _translate(exc, self.uri) from exc
                if not chunk:
                    return
                if len(chunk) > remaining:
                    chunk = chunk[:remaining]
                remaining -= len(chunk)
                yield chunk
        finally:
            body.close()

    def _check_response(self, response: Mapping[str, Any], start: int, end: int) -> None:
        """Belt and braces for S3-compatible stores that ignore ``If-Match`` or ``Range``."""
        etag = response.get("ETag")
        if isinstance(etag, str) and etag.strip('"') != self.etag.strip('"'):
            raise SourceError(
                f"{self.uri} changed while it was read (ETag {etag})",
                retryable=False,
                code="source_changed",
            )
        content_range = response.get("ContentRange")
        if isinstance(content_range, str) and "/" in content_range:
            total = content_range.rsplit("/", 1)[1]
            if total.isdigit() and int(total) != self._size:
                raise SourceError(
                    f"{self.uri} changed while it was read (size {total})",
                    retryable=False,
                    code="source_changed",
                )
        elif start != 0 or end != self._size:
            raise SourceError(
                f"{self.uri}: the store ignored the Range header",
                retryable=False,
                code="source_failed",
            )

    async def delete(self) -> bool:
        """Delete the object after a delivery (``delete_source: true``): see
        :func:`delete_object`."""
        return await delete_object(self.client, self.bucket, self.key, etag=self.etag)


async def delete_object(client: S3SourceClient, bucket: str, key: str, *, etag: str) -> bool:
    """Delete the object if it is still the version with `etag` (the one delivered).

    Returns False, deleting nothing, when the object is already gone or no longer that version
    (its ETag changed: someone uploaded a new one). Raises SourceError when S3 refuses or
    fails. The ETag check and the delete are two requests: an object replaced in between is
    still deleted (S3 offers no portable conditional delete).
    """
    what = f"s3://{bucket}/{key}"
    try:
        head = await asyncio.to_thread(client.head_object, Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        error = _translate(exc, what)
        if error.code == "source_not_found":
            return False
        raise error from exc
    if str(head.get("ETag", "")).strip('"') != etag.strip('"'):
        log.warning("not deleting %s: it changed since it was read", what)
        return False
    try:
        await asyncio.to_thread(client.delete_object, Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        raise _translate(exc, what) from exc
    return True
