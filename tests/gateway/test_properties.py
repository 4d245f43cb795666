"""Property tests (Hypothesis) of the offset arithmetic and of the header parsers.

(a) A state machine drives a real gateway (a fresh app on a real socket per example) with POST
    (sized, deferred, with a body), PATCH at the right offset (Content-Length or chunked, random
    sizes, sometimes past the end, sometimes declaring a deferred length, sometimes checksummed),
    PATCH at a wrong offset, PATCH with a bad checksum, and a client that disconnects mid-body.
    A model says how many bytes each upload has accepted; after every step HEAD and GET must
    agree with it: `0 <= offset <= length`, offset == model, content == model's bytes.
(b) Pure properties of `gateway/tus/get.py:parse_range` (against a reference of RFC 9110's
    single byte range) and of the parsers in `gateway/tus/headers.py`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import random
import re
import shutil
import tempfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from gateway import errors
from gateway.app import create_app
from gateway.errors import TusError
from gateway.settings import load_settings
from gateway.store.base import decode_metadata
from gateway.tus.context import TUS as TUS_KEY
from gateway.tus.get import parse_range
from gateway.tus.headers import (
    CHECKSUM_ALGORITHMS,
    parse_checksum,
    parse_int_header,
    parse_metadata,
)

TUS = {"Tus-Resumable": "1.0.0"}
OCTET = {**TUS, "Content-Type": "application/offset+octet-stream"}
MAX_SIZE = 20_000  # Tus-Max-Size of the machine's gateway: deferred uploads can hit it too
MAX_CHUNK = 9_000  # > 2 x the 4 KiB read buffer: a body spans several reads
POLL = 0.001
POLL_ROUNDS = 10_000  # bounded waits: 10 s at most

MACHINE_SETTINGS = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def digest_header(algorithm: str, data: bytes) -> str:
    if algorithm == "crc32":
        raw = zlib.crc32(data).to_bytes(4, "big")
    else:
        raw = hashlib.new(algorithm, data).digest()
    return f"{algorithm} {base64.b64encode(raw).decode()}"


def body_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def chunked(body: bytes, piece: int) -> AsyncIterator[bytes]:
    for i in range(0, len(body), piece):
        yield body[i : i + piece]


@dataclass
class Model:
    """What an upload must look like: its length (None while deferred) and accepted bytes."""

    path: str
    length: int | None
    data: bytearray = field(default_factory=bytearray)

    @property
    def offset(self) -> int:
        return len(self.data)

    @property
    def room(self) -> int:
        return (self.length if self.length is not None else MAX_SIZE) - self.offset


class OffsetMachine(RuleBasedStateMachine):
    uploads = Bundle("uploads")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="tusgate-props-"))
        self.loop = asyncio.new_event_loop()
        config = load_settings(environ={}, overrides={"data_dir": str(self.tmp / "data")})
        config = config.replace(
            server_max_size=MAX_SIZE,
            server_buffer_size=4096,
            store_expiration=0.0,
            server_idle_timeout=30.0,
        )
        try:
            self.client: TestClient[Any, Any] = self.run(self._start(config))
        except BaseException:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.ctx = self.client.app[TUS_KEY]
        self.models: dict[str, Model] = {}
        self.touched: str | None = None  # the upload of the last step: its content is compared

    @staticmethod
    async def _start(config: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(TestServer(create_app(config), host="127.0.0.1"))
        await client.start_server()
        return client

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.client.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- rules ------------------------------------------------------------------------------

    @rule(
        target=uploads,
        size=st.one_of(st.none(), st.integers(0, MAX_SIZE + 100)),
        with_body=st.integers(0, MAX_CHUNK),
        seed=st.integers(0, 2**32 - 1),
    )
    def create(self, size: int | None, with_body: int, seed: int) -> Any:
        headers = dict(TUS)
        if size is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(size)
        # creation-with-upload, only with a body that fits (over-long ones: test_bad_input.py)
        n = min(with_body, size if size is not None else MAX_SIZE)
        body = body_bytes(seed, n) if n else b""
        if body:
            headers["Content-Type"] = "application/offset+octet-stream"

        async def go() -> tuple[int, dict[str, str]]:
            data = io.BytesIO(body) if body else None
            async with self.client.post("/files/", headers=headers, data=data) as resp:
                return resp.status, dict(resp.headers)

        status, resp_headers = self.run(go())
        if size is not None and size > MAX_SIZE:
            assert status == 413
            return multiple()
        assert status == 201
        if body:
            assert resp_headers["Upload-Offset"] == str(len(body))
        path = "/files/" + resp_headers["Location"].rsplit("/", 1)[1]
        self.models[path] = Model(path, size, bytearray(body))
        self.touched = path
        return path

    @rule(
        path=uploads,
        n=st.integers(0, MAX_CHUNK),
        use_chunked=st.booleans(),
        piece=st.integers(1, 5000),
        declare=st.one_of(st.none(), st.integers(-50, MAX_CHUNK + 50)),
        checksum=st.one_of(st.none(), st.sampled_from(CHECKSUM_ALGORITHMS)),
        seed=st.integers(0, 2**32 - 1),
    )
    def patch_at_offset(
        self,
        path: str,
        n: int,
        use_chunked: bool,
        piece: int,
        declare: int | None,
        checksum: str | None,
        seed: int,
    ) -> None:
        m = self.models[path]
        self.touched = path
        body = body_bytes(seed, n)
        headers = {**OCTET, "Upload-Offset": str(m.offset)}
        if checksum:
            headers["Upload-Checksum"] = digest_header(checksum, body)
        # creation-defer-length: any PATCH may fix the length, once
        declared_length = None
        if declare is not None and m.length is None:
            declared_length = max(0, m.offset + declare)
            headers["Upload-Length"] = str(declared_length)

        async def go() -> tuple[int, dict[str, str]]:
            data: Any = chunked(body, piece) if use_chunked else io.BytesIO(body)
            async with self.client.patch(path, headers=headers, data=data) as resp:
                return resp.status, dict(resp.headers)

        status, resp_headers = self.run(go())

        if declared_length is not None:
            if declared_length > MAX_SIZE:
                assert status == 413
                return
            if declared_length < m.offset:
                assert status == 400
                return
            m.length = declared_length  # fixed before the body is read, kept whatever follows
        if n > m.room:
            assert status == 413
            if use_chunked and not checksum:
                m.data += body[: m.room]  # "the fitting bytes are kept"
            return  # with Content-Length: refused before one byte; checksummed: all or nothing
        assert status == 204
        m.data += body
        assert resp_headers["Upload-Offset"] == str(m.offset)

    @rule(
        path=uploads,
        delta=st.integers(-MAX_SIZE, MAX_SIZE).filter(lambda d: d != 0),
        n=st.integers(0, 200),
    )
    def patch_at_wrong_offset(self, path: str, delta: int, n: int) -> None:
        m = self.models[path]
        self.touched = path
        wrong = m.offset + delta if m.offset + delta >= 0 else m.offset - delta

        async def go() -> int:
            headers = {**OCTET, "Upload-Offset": str(wrong)}
            async with self.client.patch(path, headers=headers, data=io.BytesIO(b"z" * n)) as resp:
                return resp.status

        # "If the offsets do not match, the Server MUST respond with 409 Conflict without
        # modifying the upload resource" -- checked by the invariant after this step.
        assert self.run(go()) == 409

    @rule(
        path=uploads,
        n=st.integers(1, MAX_CHUNK),
        algorithm=st.sampled_from(CHECKSUM_ALGORITHMS),
        use_chunked=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )
    def patch_with_bad_checksum(
        self, path: str, n: int, algorithm: str, use_chunked: bool, seed: int
    ) -> None:
        m = self.models[path]
        self.touched = path
        body = body_bytes(seed, n)
        wrong = bytes([body[0] ^ 0xFF]) + body[1:]

        async def go() -> int:
            headers = {
                **OCTET,
                "Upload-Offset": str(m.offset),
                "Upload-Checksum": digest_header(algorithm, wrong),
            }
            data: Any = chunked(body, 1000) if use_chunked else io.BytesIO(body)
            async with self.client.patch(path, headers=headers, data=data) as resp:
                return resp.status

        status = self.run(go())
        # 460 "chunk discarded"; 413 when it did not fit. Either way: nothing kept.
        assert status == (413 if n > m.room else 460)

    @rule(
        path=uploads,
        sent=st.integers(1, MAX_CHUNK),
        missing=st.integers(1, 5000),
        checksummed=st.booleans(),
        seed=st.integers(0, 2**32 - 1),
    )
    def disconnect_mid_patch(
        self, path: str, sent: int, missing: int, checksummed: bool, seed: int
    ) -> None:
        """The client announces `sent + missing` bytes, sends `sent`, and closes the connection.
        The bytes that arrived are kept -- unless the chunk was checksummed (all or nothing)."""
        m = self.models[path]
        self.touched = path
        if m.room < 2:
            return
        sent = min(sent, m.room - 1)
        declared = min(sent + missing, m.room)
        body = body_bytes(seed, declared)
        upload_id = path.rsplit("/", 1)[1]
        self.run(self._disconnect(path, upload_id, m.offset, body, sent, checksummed))
        if not checksummed:
            m.data += body[:sent]

    async def _disconnect(
        self, path: str, upload_id: str, offset: int, body: bytes, sent: int, checksummed: bool
    ) -> None:
        head = (
            f"PATCH {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
            f"Content-Length: {len(body)}\r\n"
        )
        if checksummed:
            head += f"Upload-Checksum: {digest_header('sha1', body)}\r\n"
        _, writer = await asyncio.open_connection("127.0.0.1", self.client.port)
        try:
            writer.write(head.encode() + b"\r\n" + body[:sent])
            await writer.drain()
            for _ in range(POLL_ROUNDS):  # until the server is inside the body read
                if self.ctx.locker.is_held(upload_id) and (
                    checksummed
                    or (await self.ctx.store.core.get_info(upload_id)).offset == offset + sent
                ):
                    break
                await asyncio.sleep(POLL)
            else:
                raise AssertionError("the server never got the bytes that were sent")
        finally:
            writer.close()  # mid-body: `len(body) - sent` bytes never come
            await writer.wait_closed()
        for _ in range(POLL_ROUNDS):  # until the request has ended and released the upload
            if not self.ctx.locker.is_held(upload_id):
                return
            await asyncio.sleep(POLL)
        raise AssertionError("the disconnected PATCH never released the upload")

    # -- what must always hold ----------------------------------------------------------------

    @invariant()
    def server_agrees_with_the_model(self) -> None:
        async def check() -> None:
            for path, m in self.models.items():
                async with self.client.head(path, headers=TUS) as resp:
                    assert resp.status == 200
                    offset = int(resp.headers["Upload-Offset"])
                    if m.length is None:
                        assert resp.headers["Upload-Defer-Length"] == "1"
                        assert "Upload-Length" not in resp.headers
                        limit = MAX_SIZE
                    else:
                        assert resp.headers["Upload-Length"] == str(m.length)
                        limit = m.length
                assert 0 <= offset <= limit
                assert offset == m.offset
            if self.touched is not None:  # the others' bytes did not change: HEAD says so
                async with self.client.get(self.touched) as resp:
                    assert resp.status == 200
                    assert await resp.read() == bytes(self.models[self.touched].data)

        self.run(check())


# A passing run takes a few seconds; the longer timeout is for Hypothesis shrinking a failure
# (thousands of short runs against real servers), so that a bug shows as a minimal example.
@pytest.mark.timeout(600)
def test_offset_arithmetic_state_machine() -> None:
    run_state_machine_as_test(OffsetMachine, settings=MACHINE_SETTINGS)


# -- (b) parse_range against a reference ----------------------------------------------------

WHOLE = "whole body"  # outcome: the Range is ignored, 200 with everything
UNSATISFIABLE = "416"


def reference_outcomes(first: int | None, last: int | None, size: int) -> set[Any]:
    """What RFC 9110 §14.1.2 allows for `Range: bytes=<first>-<last>` on `size` bytes."""
    ok: set[Any] = set()
    if len(str(first or 0)) > 19 or len(str(last or 0)) > 19:
        ok.add(WHOLE)  # numbers no file can reach: ignoring the Range is fine too
    if first is None and last is None:
        return {WHOLE}
    if first is not None:
        if last is not None and last < first:
            return ok | {WHOLE, UNSATISFIABLE}  # an invalid range-spec: ignore it or refuse it
        if first >= size:
            return ok | {UNSATISFIABLE}
        end = min(last + 1, size) if last is not None else size
        return ok | {(first, end)}
    assert last is not None
    if last == 0:
        return ok | {UNSATISFIABLE}
    if size == 0:
        # A 206 must name a non-empty range ("bytes 0--1/0" is not one): ignore or refuse.
        return ok | {WHOLE, UNSATISFIABLE}
    return ok | {(max(size - last, 0), size)}


def outcome_of(header: str, size: int) -> Any:
    try:
        result = parse_range(header, size)
    except TusError as exc:
        assert exc.spec is errors.RANGE_NOT_SATISFIABLE
        return UNSATISFIABLE
    if result is None:
        return WHOLE
    start, end = result
    assert 0 <= start < end <= size, f"{header!r} on {size} bytes gave [{start}, {end})"
    return result


positions = st.one_of(
    st.none(),
    st.integers(0, 300),
    st.integers(0, 2**64),
    st.integers(10**19, 10**30),
)


@settings(max_examples=500)
@given(first=positions, last=positions, size=st.one_of(st.integers(0, 300), st.integers(0, 2**40)))
def test_parse_range_matches_the_reference(first: int | None, last: int | None, size: int) -> None:
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    assert outcome_of(header, size) in reference_outcomes(first, last, size)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-" + "9" * 5000,  # more digits than int() converts by default (4300)
        "bytes=" + "9" * 5000 + "-",
        "bytes=-" + "9" * 5000,
    ],
    ids=["huge-last", "huge-first", "huge-suffix"],
)
def test_parse_range_with_thousands_of_digits_is_not_a_crash(header: str) -> None:
    """int() refuses strings over 4,300 digits (CVE-2020-10735 limit) with ValueError, which
    nothing maps to a 4xx: the GET would be a 500."""
    for size in (0, 1, 1000):
        outcome_of(header, size)


@settings(max_examples=300)
@given(header=st.text(max_size=40), size=st.integers(0, 1000))
def test_parse_range_on_any_text_ignores_refuses_or_slices(header: str, size: int) -> None:
    outcome_of(header, size)


# -- (b) header parsers -----------------------------------------------------------------------

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
keys = st.text(alphabet=TOKEN_CHARS, min_size=1, max_size=20)
values = st.one_of(st.none(), st.text(st.characters(codec="utf-8"), max_size=40))


def encode_metadata(pairs: dict[str, str | None]) -> str:
    return ",".join(
        key if value is None else f"{key} {base64.b64encode(value.encode()).decode()}"
        for key, value in pairs.items()
    )


@given(pairs=st.dictionaries(keys, values, min_size=1, max_size=8))
def test_metadata_round_trips_through_base64(pairs: dict[str, str | None]) -> None:
    header = encode_metadata(pairs)
    assert parse_metadata(header, 64 * 1024) == header  # echoed exactly as received
    # A key whose value is empty is a key without a value.
    assert decode_metadata(header) == {k: (v or None) for k, v in pairs.items()}


@given(pairs=st.dictionaries(keys, values, min_size=1, max_size=5), data=st.data())
def test_metadata_with_a_duplicate_key_is_rejected(
    pairs: dict[str, str | None], data: st.DataObject
) -> None:
    key = data.draw(st.sampled_from(sorted(pairs)))
    header = encode_metadata(pairs) + "," + encode_metadata({key: "again"})
    with pytest.raises(TusError) as exc:
        parse_metadata(header, 64 * 1024)
    assert exc.value.spec is errors.INVALID_METADATA


TOKEN = re.compile(f"[{re.escape(TOKEN_CHARS)}]+")


@given(
    # Leading whitespace is OWS (the header starts after it) and a comma separates pairs, so
    # the key as the server sees it is `key.lstrip()`: never blank, never a token here.
    key=st.text(min_size=1, max_size=10).filter(
        lambda k: k.strip() != "" and "," not in k and not TOKEN.fullmatch(k.lstrip())
    ),
    value=st.binary(min_size=1, max_size=10),
)
@example(key="0\n", value=b"abc")  # found by Hypothesis: a regex `$` matches before a final \n
def test_metadata_key_that_is_not_a_token_is_rejected(key: str, value: bytes) -> None:
    header = f"{key} {base64.b64encode(value).decode()}"
    with pytest.raises(TusError) as exc:
        parse_metadata(header, 64 * 1024)
    assert exc.value.spec is errors.INVALID_METADATA


@given(
    value=st.text(min_size=1, max_size=20).filter(
        lambda v: "," not in v and not any(c.isspace() for c in v)  # OWS and separators aside
    )
)
def test_metadata_value_that_is_not_base64_is_rejected(value: str) -> None:
    try:
        decoded = base64.b64decode(value, validate=True)
    except ValueError:
        decoded = None
    header = f"key {value}"
    if decoded is not None and base64.b64encode(decoded).decode() == value:
        assert parse_metadata(header, 1024) == header
        return
    with pytest.raises(TusError) as exc:
        parse_metadata(header, 1024)
    assert exc.value.spec is errors.INVALID_METADATA


@given(n=st.integers(0, 2**63 - 1))
def test_int_header_round_trips_up_to_2_63_minus_1(n: int) -> None:
    assert parse_int_header(str(n), errors.INVALID_OFFSET, "Upload-Offset") == n


@given(n=st.one_of(st.integers(2**63, 2**64), st.integers(2**63, 10**100)))
def test_int_header_beyond_2_63_minus_1_is_rejected(n: int) -> None:
    with pytest.raises(TusError) as exc:
        parse_int_header(str(n), errors.INVALID_LENGTH, "Upload-Length")
    assert exc.value.spec is errors.INVALID_LENGTH


@given(text=st.text(max_size=30))
def test_int_header_accepts_only_ascii_digits(text: str) -> None:
    """Signs, exponents, hex, other scripts' digits: all refused; whitespace around is OWS."""
    core = text.strip()
    try:
        n: int | None = parse_int_header(text, errors.INVALID_OFFSET, "Upload-Offset")
    except TusError as exc:
        assert exc.spec is errors.INVALID_OFFSET
        n = None
    if n is not None:
        assert core.isascii() and core.isdigit()
        assert n == int(core) <= 2**63 - 1
    elif core.isascii() and core.isdigit() and len(core) <= 19:
        assert int(core) > 2**63 - 1


@pytest.mark.parametrize(
    "text", ["-1", "+1", "1e3", "0x10", "1.0", "1_000", "١٢", "１２", "", "  ", "1 2", "12abc"]
)
def test_int_header_refusals(text: str) -> None:
    with pytest.raises(TusError):
        parse_int_header(text, errors.INVALID_OFFSET, "Upload-Offset")


@given(
    algorithm=st.sampled_from(CHECKSUM_ALGORITHMS),
    data=st.binary(max_size=100),
    upper=st.booleans(),
)
def test_checksum_header_round_trips(algorithm: str, data: bytes, upper: bool) -> None:
    name, encoded = digest_header(algorithm, data).split(" ")
    header = f"{name.upper() if upper else name} {encoded}"
    assert parse_checksum(header) == (algorithm, base64.b64decode(encoded))


@given(algorithm=st.sampled_from(CHECKSUM_ALGORITHMS), length=st.integers(0, 80))
def test_checksum_digest_of_the_wrong_size_is_rejected(algorithm: str, length: int) -> None:
    sizes = {"sha1": 20, "md5": 16, "sha256": 32, "sha512": 64, "crc32": 4}
    header = f"{algorithm} {base64.b64encode(bytes(length)).decode()}"
    if length == sizes[algorithm]:
        assert parse_checksum(header) == (algorithm, bytes(length))
        return
    with pytest.raises(TusError) as exc:
        parse_checksum(header)
    assert exc.value.spec is errors.INVALID_CHECKSUM


@given(algorithm=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12))
def test_unknown_checksum_algorithm_is_rejected(algorithm: str) -> None:
    if algorithm in CHECKSUM_ALGORITHMS:
        return
    with pytest.raises(TusError) as exc:
        parse_checksum(f"{algorithm} AAAA")
    assert exc.value.spec is errors.UNSUPPORTED_CHECKSUM
