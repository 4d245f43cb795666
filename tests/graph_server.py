"""A Microsoft-Graph-compatible drive server for tests and benchmarks.

It implements the parts of Graph that the OneDrive destination uses, following Microsoft's
documented rules (driveItem: createUploadSession; Upload or replace the contents of a
driveItem; Microsoft Graph throttling guidance) as strictly as they are written, so that a
client bug shows up here instead of against the real service:

* API calls (``/v1.0/...``) need ``Authorization: Bearer <token>`` (401 without).
* ``POST {drive}/root:/{path}:/createUploadSession`` → 200 ``{uploadUrl, expirationDateTime,
  nextExpectedRanges}``; ``@microsoft.graph.conflictBehavior`` ``fail`` (the default) answers
  409 when the name is taken, at creation and again at commit.
* The ``uploadUrl`` (``/upload/{session}``) must be called **without** Authorization ("If you
  include the Authorization header when issuing the PUT call, it may result in an HTTP 401").
* Fragment PUTs: ``Content-Length`` required and equal to the range length; ``Content-Range:
  bytes a-b/total`` with the same total on every request; each fragment a multiple of 320 KiB
  except the last, at most 60 MiB; fragments strictly in order: a range already received or
  out of order → 416. A request that breaks off is ignored entirely ("all bytes in that
  request are ignored").
* 202 + ``nextExpectedRanges`` until the last byte; then 201 (new) or 200 (replaced) with the
  driveItem (``id, name, size, webUrl, file.hashes.{sha256Hash (upper hex), quickXorHash}``).
  ``rename`` picks ``name 1.ext``, ``name 2.ext``, ...
* ``GET uploadUrl`` → status; ``DELETE uploadUrl`` → 204, then 404; an expired session → 404.
* Simple upload ``PUT {drive}/root:/{path}:/content``: at most 4 MiB (413 above); conflict
  behaviour from the query parameter, default ``replace``.
* ``GET {drive}/root:/{path}`` → the driveItem, ``...:/content`` → the bytes.

Bodies are streamed to temp files 64 KiB at a time: memory per request stays bounded however
large the fragment, so a 1 GiB benchmark can run through it.

Test API (all on :class:`GraphTestServer`): :meth:`~GraphTestServer.files`,
:meth:`~GraphTestServer.read_bytes`, :meth:`~GraphTestServer.put_file`,
:attr:`~GraphTestServer.open_sessions`, :attr:`~GraphTestServer.sessions_created`,
:attr:`~GraphTestServer.requests`, :meth:`~GraphTestServer.expire_sessions`,
:attr:`~GraphTestServer.session_lifetime`, :attr:`~GraphTestServer.fragment_delay`, and fault
injection with :meth:`~GraphTestServer.inject` / :meth:`~GraphTestServer.fail` /
:meth:`~GraphTestServer.drop` on an operation: ``create``, ``fragment``, ``status``,
``delete``, ``content`` (simple upload) or ``item`` (metadata GET).

Run standalone (benchmarks): ``python -m tests.graph_server --port 8089 --token T``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self
from urllib.parse import quote, unquote

from aiohttp import ClientError, web
from aiohttp.http_exceptions import HttpProcessingError

from processing.destinations.quickxor import QuickXorHash

__all__ = [
    "DEFAULT_TOKEN",
    "Fault",
    "GraphTestServer",
    "Operation",
    "RecordedRequest",
    "StoredFile",
]

DEFAULT_TOKEN = "test-token"
FRAGMENT_UNIT = 320 * 1024
MAX_FRAGMENT = 60 * 1024 * 1024
SIMPLE_UPLOAD_MAX = 4 * 1024 * 1024
READ_CHUNK = 64 * 1024

Operation = Literal["create", "fragment", "status", "delete", "content", "item"]
_CONFLICTS = ("fail", "replace", "rename")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_API = re.compile(
    r"/v1\.0(?P<drive>/me/drive|/drives/[^/]+|/(?:users|groups|sites)/[^/]+/drive)"
    r"/root:/(?P<path>.+?)(?::/(?P<action>createUploadSession|content))?:?"
)
#: What reading a request body raises when the client goes away mid-body.
_BODY_ERRORS = (OSError, asyncio.IncompleteReadError, ClientError, HttpProcessingError)
_FORBIDDEN = re.compile(r'["*:<>?/\\|\x00-\x1f]')


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message}}
    return web.json_response(body, status=status, headers=headers)


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    ``status``: answer with it at once (429/503 with ``retry_after`` seconds in Retry-After,
    500, ...). ``drop_after``: read that many body bytes, then cut the connection.
    ``drop_response``: handle the request fully, then cut the connection instead of answering
    (the client cannot know whether it worked). ``delay``: sleep first (then do the rest).
    """

    status: int | None = None
    retry_after: int | None = None
    drop_after: int | None = None
    drop_response: bool = False
    delay: float = 0.0


@dataclass(frozen=True)
class StoredFile:
    """A committed file as the test sees it."""

    drive: str
    path: str
    id: str
    size: int
    sha256: str  # lowercase hex (Graph's sha256Hash is the same, upper case)
    quickxor: str
    blob: Path
    created: datetime
    modified: datetime
    content_type: str = "application/octet-stream"

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    operation: str
    authorization: bool


@dataclass
class _Session:
    id: str
    drive: str
    components: list[str]
    conflict: str
    expires: datetime
    blob: Path
    declared_size: int | None
    total: int | None = None
    received: int = 0
    sha256: Any = field(default_factory=hashlib.sha256)
    quickxor: QuickXorHash = field(default_factory=QuickXorHash)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Dropped(Exception):
    """The connection was cut on purpose (fault injection)."""


class GraphTestServer:
    """Graph-compatible drive server on 127.0.0.1 (``async with GraphTestServer() as s``)."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        host: str = "127.0.0.1",
        port: int = 0,
        storage_dir: str | os.PathLike[str] | None = None,
        session_lifetime: timedelta = timedelta(hours=1),
    ) -> None:
        self.token = token
        self.host = host
        self.port = port
        self.session_lifetime = session_lifetime
        #: Seconds every fragment PUT waits before answering (slow network, for cancel tests).
        self.fragment_delay = 0.0
        self.sessions_created = 0
        self.requests: list[RecordedRequest] = []
        self._storage_arg = storage_dir
        self._storage: Path | None = None
        self._owns_storage = False
        self._files: dict[tuple[str, str], StoredFile] = {}
        self._sessions: dict[str, _Session] = {}
        self._faults: list[tuple[str, int | None, Fault]] = []
        self._counts: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def origin(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The Graph base URL to configure in the client (``.../v1.0``)."""
        return f"{self.origin}/v1.0"

    async def start(self) -> None:
        if self._storage_arg is None:
            self._storage = Path(tempfile.mkdtemp(prefix="graph-test-"))
            self._owns_storage = True
        else:
            self._storage = Path(self._storage_arg)
            self._storage.mkdir(parents=True, exist_ok=True)
        app = web.Application()
        app.router.add_route("*", "/v1.0/{tail:.*}", self._api)
        app.router.add_route("*", "/upload/{session}", self._upload)
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._owns_storage and self._storage is not None:
            shutil.rmtree(self._storage, ignore_errors=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- test API --------------------------------------------------------------------------

    def files(self, drive: str = "me") -> dict[str, StoredFile]:
        """Committed files of a drive (``me``, ``drives/ID``, ``users/ID``...) by path."""
        key = _drive_key(drive)
        return {f.path: f for (d, _), f in sorted(self._files.items()) if d == key}

    def read_bytes(self, path: str, drive: str = "me") -> bytes:
        stored = self._lookup(_drive_key(drive), path.split("/"))
        if stored is None:
            raise KeyError(path)
        return stored.blob.read_bytes()

    def put_file(self, path: str, data: bytes, drive: str = "me") -> StoredFile:
        """Seed an existing file (e.g. for conflict tests)."""
        assert self._storage is not None, "server not started"
        blob = self._storage / f"seed-{secrets.token_hex(8)}"
        blob.write_bytes(data)
        stored, _ = self._commit(
            _drive_key(drive),
            path.split("/"),
            "replace",
            blob,
            hashlib.sha256(data),
            QuickXorHash(data),
        )
        return stored

    @property
    def open_sessions(self) -> int:
        """Upload sessions created and neither completed, deleted nor expired."""
        return sum(1 for s in self._sessions.values() if s.expires > _now())

    def expire_sessions(self) -> None:
        """Make every open session expire now (its uploadUrl answers 404 from here on)."""
        for session in self._sessions.values():
            session.expires = _now() - timedelta(seconds=1)

    def inject(self, operation: Operation, fault: Fault, *, nth: int | None = None) -> None:
        """Apply ``fault`` to the next request of ``operation``, or to its ``nth`` (1-based,
        counted from server start). Each fault fires once."""
        self._faults.append((operation, nth, fault))

    def fail(
        self,
        operation: Operation,
        status: int,
        *,
        retry_after: int | None = None,
        nth: int | None = None,
        times: int = 1,
    ) -> None:
        for _ in range(times):
            self.inject(operation, Fault(status=status, retry_after=retry_after), nth=nth)

    def drop(
        self,
        operation: Operation = "fragment",
        *,
        after_bytes: int = 0,
        nth: int | None = None,
        response: bool = False,
    ) -> None:
        """Cut the connection after ``after_bytes`` of the body, or (``response=True``) after
        handling the request, instead of answering."""
        fault = Fault(drop_response=True) if response else Fault(drop_after=after_bytes)
        self.inject(operation, fault, nth=nth)

    def count(self, operation: Operation) -> int:
        """Requests of ``operation`` seen so far."""
        return self._counts[operation]

    @property
    def pending_faults(self) -> int:
        return len(self._faults)

    # -- request plumbing ------------------------------------------------------------------

    def _take_fault(self, operation: str) -> Fault | None:
        self._counts[operation] += 1
        number = self._counts[operation]
        for index, (op, nth, fault) in enumerate(self._faults):
            if op == operation and (nth is None or nth == number):
                del self._faults[index]
                return fault
        return None

    async def _faulty(
        self,
        request: web.Request,
        operation: str,
        handler: Callable[[], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Run ``handler`` under the next fault queued for ``operation`` (if any)."""
        fault = self._take_fault(operation)
        try:
            response = await self._apply_fault(request, fault) or await handler()
            if fault is not None and fault.drop_response:
                self._cut(request)
        except _Dropped:
            return web.Response(status=500)  # never sent: the transport is gone
        if request.body_exists and not request.content.is_eof():
            # Refused before the body was read: read and discard it (64 KiB at a time) so the
            # client gets the answer after sending, as from a real server, and the connection
            # stays usable.
            with contextlib.suppress(*_BODY_ERRORS):
                while await request.content.read(READ_CHUNK):
                    pass
        return response

    async def _apply_fault(self, request: web.Request, fault: Fault | None) -> web.Response | None:
        if fault is None:
            return None
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.status is not None:
            headers = (
                {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else None
            )
            codes = {429: "activityLimitReached", 503: "serviceNotAvailable"}
            return _error(
                fault.status, codes.get(fault.status, "generalException"), "injected fault", headers
            )
        if fault.drop_after is not None:
            await self._read_some(request, fault.drop_after)
            self._cut(request)
        return None

    @staticmethod
    async def _read_some(request: web.Request, limit: int) -> None:
        seen = 0
        while seen < limit:
            chunk = await request.content.read(min(READ_CHUNK, limit - seen))
            if not chunk:
                break
            seen += len(chunk)

    @staticmethod
    def _cut(request: web.Request) -> None:
        if request.transport is not None:
            request.transport.abort()
        raise _Dropped

    def _record(self, request: web.Request, operation: str) -> None:
        self.requests.append(
            RecordedRequest(
                request.method, request.path, operation, "Authorization" in request.headers
            )
        )

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    # -- API: /v1.0/... --------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        match = _API.fullmatch(request.rel_url.raw_path)
        action = match.group("action") if match else None
        operation = {"createUploadSession": "create", "content": "content"}.get(
            action or "", "item"
        )
        self._record(request, operation)
        if not self._authorized(request):
            return _error(401, "InvalidAuthenticationToken", "Access token is empty or invalid.")
        if match is None:
            return _error(400, "invalidRequest", "Unsupported path.")
        drive = unquote(match.group("drive"))
        components = [unquote(part) for part in match.group("path").split("/")]
        problem = _name_problem(components)
        if problem:
            return _error(400, "invalidRequest", problem)
        if action == "createUploadSession" and request.method == "POST":
            return await self._faulty(
                request, operation, lambda: self._create_session(request, drive, components)
            )
        if action == "content" and request.method == "PUT":
            return await self._faulty(
                request, operation, lambda: self._simple_upload(request, drive, components)
            )
        if action == "content" and request.method == "GET":
            return await self._download(drive, components)
        if action is None and request.method == "GET":
            return await self._faulty(request, operation, lambda: self._get_item(drive, components))
        return _error(405, "invalidRequest", f"{request.method} not supported here.")

    async def _create_session(
        self, request: web.Request, drive: str, components: list[str]
    ) -> web.Response:
        try:
            raw = await request.read()
            body = json.loads(raw) if raw else {}
        except ValueError:
            return _error(400, "invalidRequest", "Request body is not valid JSON.")
        item = body.get("item", {}) if isinstance(body, dict) else None
        if not isinstance(item, dict):
            return _error(400, "invalidRequest", "item must be an object.")
        conflict = item.get(
            "@microsoft.graph.conflictBehavior",
            request.query.get("@microsoft.graph.conflictBehavior", "fail"),
        )
        if conflict not in _CONFLICTS:
            return _error(400, "invalidRequest", "Invalid conflictBehavior.")
        # "The {item-path} must contain the name of the item that's specified in the request body."
        if "name" in item and item["name"] != components[-1]:
            return _error(400, "invalidRequest", "item name does not match the path.")
        declared = item.get("fileSize")
        if declared is not None and (not isinstance(declared, int) or declared < 0):
            return _error(400, "invalidRequest", "fileSize must be a non-negative integer.")
        if conflict == "fail" and self._lookup(drive, components) is not None:
            return _error(409, "nameAlreadyExists", "The specified item name already exists.")
        assert self._storage is not None
        session_id = secrets.token_urlsafe(18)
        blob = self._storage / f"session-{session_id}"
        blob.touch()
        session = _Session(
            id=session_id,
            drive=drive,
            components=components,
            conflict=conflict,
            expires=_now() + self.session_lifetime,
            blob=blob,
            declared_size=declared,
        )
        self._sessions[session_id] = session
        self.sessions_created += 1
        return web.json_response(
            {
                "@odata.context": f"{self.base_url}/$metadata#microsoft.graph.uploadSession",
                "uploadUrl": f"{self.origin}/upload/{session_id}",
                "expirationDateTime": _iso(session.expires),
                "nextExpectedRanges": ["0-"],
            }
        )

    async def _simple_upload(
        self, request: web.Request, drive: str, components: list[str]
    ) -> web.Response:
        # PUT content has no conflict body; the default for this call is to replace.
        conflict = request.query.get("@microsoft.graph.conflictBehavior", "replace")
        if conflict not in _CONFLICTS:
            return _error(400, "invalidRequest", "Invalid conflictBehavior.")
        # "This method only supports files up to 4MB in size."
        if request.content_length is not None and request.content_length > SIMPLE_UPLOAD_MAX:
            return _error(413, "requestTooLarge", "Simple upload is limited to 4 MiB.")
        assert self._storage is not None
        blob = self._storage / f"simple-{secrets.token_hex(8)}"
        sha256, quickxor = hashlib.sha256(), QuickXorHash()
        size = 0
        try:
            with blob.open("wb") as handle:
                async for chunk in request.content.iter_chunked(READ_CHUNK):
                    size += len(chunk)
                    if size > SIMPLE_UPLOAD_MAX:
                        raise _TooLarge
                    handle.write(chunk)
                    sha256.update(chunk)
                    quickxor.update(chunk)
        except _TooLarge:
            blob.unlink()
            return _error(413, "requestTooLarge", "Simple upload is limited to 4 MiB.")
        except _BODY_ERRORS:
            blob.unlink(missing_ok=True)
            return web.Response(status=400)
        if conflict == "fail" and self._lookup(drive, components) is not None:
            blob.unlink()
            return _error(409, "nameAlreadyExists", "The specified item name already exists.")
        content_type = request.headers.get("Content-Type", "application/octet-stream")
        stored, created = self._commit(
            drive, components, conflict, blob, sha256, quickxor, content_type
        )
        return web.json_response(self._drive_item(stored), status=201 if created else 200)

    async def _get_item(self, drive: str, components: list[str]) -> web.Response:
        stored = self._lookup(drive, components)
        if stored is None:
            return _error(404, "itemNotFound", "The resource could not be found.")
        return web.json_response(self._drive_item(stored))

    async def _download(self, drive: str, components: list[str]) -> web.StreamResponse:
        stored = self._lookup(drive, components)
        if stored is None:
            return _error(404, "itemNotFound", "The resource could not be found.")
        return web.FileResponse(stored.blob, headers={"Content-Type": stored.content_type})

    # -- uploadUrl: /upload/{session} ------------------------------------------------------

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        operation = {"PUT": "fragment", "GET": "status", "DELETE": "delete"}.get(
            request.method, "other"
        )
        self._record(request, operation)
        # "Only send the Authorization header and bearer token when issuing the POST during the
        # first step. Don't include it when you issue the PUT call."
        if "Authorization" in request.headers:
            return _error(401, "unauthenticated", "Do not send Authorization to the uploadUrl.")
        return await self._faulty(request, operation, lambda: self._upload_call(request))

    async def _upload_call(self, request: web.Request) -> web.StreamResponse:
        session = self._live_session(request.match_info["session"])
        if session is None:
            return _error(404, "itemNotFound", "The upload session does not exist or has expired.")
        if request.method == "GET":
            return web.json_response(self._session_status(session))
        if request.method == "DELETE":
            self._drop_session(session)
            return web.Response(status=204)
        if request.method == "PUT":
            async with session.lock:
                return await self._put_fragment(request, session)
        return _error(405, "invalidRequest", f"{request.method} not supported on an upload URL.")

    def _live_session(self, session_id: str) -> _Session | None:
        session = self._sessions.get(session_id)
        if session is not None and session.expires <= _now():
            # "Temporary files and their accompanying upload session are automatically cleaned
            # up after the expirationDateTime has passed."
            self._drop_session(session)
            return None
        return session

    def _drop_session(self, session: _Session) -> None:
        self._sessions.pop(session.id, None)
        session.blob.unlink(missing_ok=True)

    def _session_status(self, session: _Session) -> dict[str, Any]:
        return {
            "expirationDateTime": _iso(session.expires),
            "nextExpectedRanges": [f"{session.received}-"],
        }

    async def _put_fragment(self, request: web.Request, session: _Session) -> web.Response:
        if request.content_length is None:
            return _error(411, "invalidRequest", "Content-Length is required.")
        match = _CONTENT_RANGE.fullmatch(request.headers.get("Content-Range", ""))
        if match is None:
            return _error(400, "invalidRange", "Content-Range must be 'bytes first-last/total'.")
        first, last, total = (int(value) for value in match.groups())
        length = last - first + 1
        if first > last or last >= total:
            return _error(400, "invalidRange", "Content-Range is not a valid range of the file.")
        # "The Content-Length header specifies the size of the current request."
        if request.content_length != length:
            return _error(400, "invalidRange", "Content-Length does not match Content-Range.")
        # "the maximum bytes in any given request is less than 60 MiB"
        if length > MAX_FRAGMENT:
            return _error(413, "requestTooLarge", "A fragment must not exceed 60 MiB.")
        # "If a byte range declares a different file size, the request will fail."
        expected_total = session.total if session.total is not None else session.declared_size
        if expected_total is not None and total != expected_total:
            return _error(400, "invalidRange", "The total size differs from earlier requests.")
        # "the size of each byte range MUST be a multiple of 320 KiB (327,680 bytes)"
        if last != total - 1 and length % FRAGMENT_UNIT:
            return _error(400, "invalidRange", "Fragment size must be a multiple of 320 KiB.")
        # "The fragments of the file must be uploaded sequentially in order."
        if first != session.received:
            return _error(
                416,
                "invalidRange",
                "The uploaded fragment overlaps or skips data.",
            )
        session.total = total
        sha256, quickxor = session.sha256.copy(), session.quickxor.copy()
        received = 0
        # Faults with drop_after already cut the connection in _apply_fault.
        try:
            with session.blob.open("r+b") as handle:
                handle.seek(first)
                async for chunk in request.content.iter_chunked(READ_CHUNK):
                    handle.write(chunk)
                    sha256.update(chunk)
                    quickxor.update(chunk)
                    received += len(chunk)
        except _BODY_ERRORS:
            # "all bytes in that request are ignored"
            return web.Response(status=400)
        if received != length:
            return _error(400, "invalidRange", "The body is shorter than Content-Length.")
        if self.fragment_delay:
            await asyncio.sleep(self.fragment_delay)
        session.sha256, session.quickxor = sha256, quickxor
        session.received = last + 1
        if session.received < total:
            return web.json_response(self._session_status(session), status=202)
        return self._complete(session)

    def _complete(self, session: _Session) -> web.Response:
        if (
            session.conflict == "fail"
            and self._lookup(session.drive, session.components) is not None
        ):
            # "If a conflict occurs after the file is uploaded ... an error is returned when the
            # last byte range is uploaded." The session is kept until it expires.
            session.received = 0
            session.sha256, session.quickxor = hashlib.sha256(), QuickXorHash()
            return _error(
                409,
                "nameAlreadyExists",
                "Another file exists with the same name as the uploaded session.",
            )
        with session.blob.open("r+b") as handle:
            handle.truncate(session.total)
        self._sessions.pop(session.id, None)
        stored, created = self._commit(
            session.drive,
            session.components,
            session.conflict,
            session.blob,
            session.sha256,
            session.quickxor,
        )
        return web.json_response(self._drive_item(stored), status=201 if created else 200)

    # -- the drive -------------------------------------------------------------------------

    def _lookup(self, drive: str, components: list[str]) -> StoredFile | None:
        return self._files.get((drive, "/".join(components).casefold()))

    def _commit(
        self,
        drive: str,
        components: list[str],
        conflict: str,
        blob: Path,
        sha256: Any,
        quickxor: QuickXorHash,
        content_type: str = "application/octet-stream",
    ) -> tuple[StoredFile, bool]:
        """Place a finished blob; returns (file, created). Names compare case-insensitively."""
        assert self._storage is not None
        existing = self._lookup(drive, components)
        now = _now()
        if existing is not None and conflict == "rename":
            components = self._free_name(drive, components)
            existing = None
        item_id = existing.id if existing else secrets.token_hex(8).upper()
        final_blob = self._storage / f"item-{item_id}"
        os.replace(blob, final_blob)
        stored = StoredFile(
            drive=drive,
            path="/".join(components),
            id=item_id,
            size=final_blob.stat().st_size,
            sha256=sha256.hexdigest(),
            quickxor=quickxor.b64digest(),
            blob=final_blob,
            created=existing.created if existing else now,
            modified=now,
            content_type=content_type,
        )
        if existing is not None:
            del self._files[(drive, existing.path.casefold())]
        self._files[(drive, stored.path.casefold())] = stored
        return stored, existing is None

    def _free_name(self, drive: str, components: list[str]) -> list[str]:
        stem, dot, ext = components[-1].rpartition(".")
        if not dot or not stem:
            stem, ext = components[-1], ""
        for number in range(1, 10_000):
            name = f"{stem} {number}" + (f".{ext}" if ext else "")
            candidate = [*components[:-1], name]
            if self._lookup(drive, candidate) is None:
                return candidate
        raise RuntimeError("no free name")

    def _drive_item(self, stored: StoredFile) -> dict[str, Any]:
        parent = "/".join(stored.path.split("/")[:-1])
        return {
            "@odata.context": f"{self.base_url}/$metadata#items/$entity",
            "id": stored.id,
            "name": stored.name,
            "size": stored.size,
            "eTag": f'"{{{stored.id}}},1"',
            "cTag": f'"c:{{{stored.id}}},1"',
            "createdDateTime": _iso(stored.created),
            "lastModifiedDateTime": _iso(stored.modified),
            "webUrl": f"{self.origin}/drive{stored.drive}/{quote(stored.path)}",
            "parentReference": {
                "driveType": "business",
                "path": f"{stored.drive}/root:/{parent}".rstrip("/:"),
            },
            "file": {
                "mimeType": stored.content_type,
                "hashes": {"sha256Hash": stored.sha256.upper(), "quickXorHash": stored.quickxor},
            },
        }


class _TooLarge(Exception):
    pass


def _drive_key(selector: str) -> str:
    selector = selector.strip("/")
    if selector in ("me", "me/drive"):
        return "/me/drive"
    kind, _, ident = selector.partition("/")
    if kind in ("users", "groups", "sites"):
        return f"/{kind}/{ident.removesuffix('/drive')}/drive"
    if kind == "drives":
        return f"/drives/{ident}"
    return f"/drives/{selector}"


def _name_problem(components: list[str]) -> str | None:
    """Graph refuses names OneDrive cannot store (see processing.destinations.paths)."""
    for name in components:
        if not name or name in (".", ".."):
            return "Empty or relative path component."
        if _FORBIDDEN.search(name):
            return f"The name {name!r} contains characters that are not allowed."
        if name != name.strip(" ") or name.endswith("."):
            return f"The name {name!r} begins or ends with a space or ends with a period."
    return None


async def _serve(port: int, token: str) -> None:  # pragma: no cover - manual/bench use
    async with GraphTestServer(port=port, token=token) as server:
        print(f"graph test server listening on {server.base_url} (token {token!r})", flush=True)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()


def main() -> None:  # pragma: no cover - manual/bench use
    parser = argparse.ArgumentParser(description="Graph-compatible drive server for tests.")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.token))


if __name__ == "__main__":  # pragma: no cover
    main()
