"""S3ByteSource against moto's S3 server on 127.0.0.1 (real sockets, real boto3)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ResponseStreamingError

from processing.sources import ByteSource, SourceError, read_range
from processing.sources_s3 import S3ByteSource, S3SourceClient, make_s3_client

MiB = 1024 * 1024


@pytest.fixture
def s3(moto_s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A client from make_s3_client (the standard credential chain, fed by the environment)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = make_s3_client(moto_s3_endpoint, "us-east-1")
    yield client
    client.close()  # type: ignore[attr-defined]


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"src-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


async def read_all(source: ByteSource, start: int, end: int) -> list[bytes]:
    return [chunk async for chunk in source.open_range(start, end)]


async def test_twenty_mib_read_back_by_ranges(s3: Any, bucket: str) -> None:
    data = os.urandom(20 * MiB + 12345)
    s3.put_object(Bucket=bucket, Key="big/file.bin", Body=data, ContentType="application/x-test")

    source = await S3ByteSource.open(s3, bucket, "big/file.bin", chunk_size=256 * 1024)

    assert isinstance(source, ByteSource)
    assert source.size == len(data)
    assert source.content_type == "application/x-test"
    assert source.etag.strip('"') == hashlib.md5(data).hexdigest()
    # Ranges of an odd size, as a destination's fragments would be; chunks stay bounded.
    digest = hashlib.sha256()
    fragment = 3 * MiB + 7
    for offset in range(0, source.size, fragment):
        end = min(offset + fragment, source.size)
        chunks = await read_all(source, offset, end)
        assert max(len(c) for c in chunks) <= 256 * 1024
        assert all(chunks)
        digest.update(b"".join(chunks))
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    # A retried fragment is read again, the same.
    assert await read_range(source, 5 * MiB, 6 * MiB) == data[5 * MiB : 6 * MiB]
    assert await read_all(source, 10, 10) == []


async def test_missing_key_is_source_not_found(s3: Any, bucket: str) -> None:
    with pytest.raises(SourceError) as caught:
        await S3ByteSource.open(s3, bucket, "no/such/key")
    assert caught.value.code == "source_not_found"
    assert caught.value.retryable is False

    with pytest.raises(SourceError) as caught:
        await S3ByteSource.open(s3, f"{bucket}-missing", "key")
    assert caught.value.code == "source_not_found"


async def test_object_replaced_between_open_and_read_is_source_changed(
    s3: Any, bucket: str
) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"a" * 1000)
    source = await S3ByteSource.open(s3, bucket, "k")
    assert await read_range(source, 0, 10) == b"a" * 10

    s3.put_object(Bucket=bucket, Key="k", Body=b"b" * 1000)  # same size, new ETag

    with pytest.raises(SourceError) as caught:
        await read_range(source, 0, 1000)
    assert caught.value.code == "source_changed"
    assert caught.value.retryable is False


async def test_object_deleted_after_open_is_source_not_found(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 10)
    source = await S3ByteSource.open(s3, bucket, "k")
    s3.delete_object(Bucket=bucket, Key="k")
    with pytest.raises(SourceError) as caught:
        await read_range(source, 0, 10)
    assert caught.value.code == "source_not_found"


async def test_empty_object(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    source = await S3ByteSource.open(s3, bucket, "empty")
    assert source.size == 0
    assert await read_all(source, 0, 0) == []


async def test_range_outside_the_object_is_a_value_error(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"x" * 10)
    source = await S3ByteSource.open(s3, bucket, "k")
    with pytest.raises(ValueError):
        await read_all(source, 5, 11)


async def test_delete_removes_the_delivered_object_only(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="done", Body=b"delivered")
    source = await S3ByteSource.open(s3, bucket, "done")
    assert await source.delete() is True
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert await source.delete() is False  # already gone: nothing to do

    s3.put_object(Bucket=bucket, Key="busy", Body=b"old")
    source = await S3ByteSource.open(s3, bucket, "busy")
    s3.put_object(Bucket=bucket, Key="busy", Body=b"new version")
    assert await source.delete() is False  # not the object that was delivered
    assert s3.get_object(Bucket=bucket, Key="busy")["Body"].read() == b"new version"


class _BreakingBody:
    """A StreamingBody that breaks after `after` chunks, the way a reset connection does."""

    def __init__(self, body: Any, after: int) -> None:
        self._body = body
        self._after = after

    def iter_chunks(self, chunk_size: int) -> Iterator[bytes]:
        for index, chunk in enumerate(self._body.iter_chunks(chunk_size)):
            if index == self._after:
                raise ResponseStreamingError(error="connection reset by peer")
            yield chunk

    def close(self) -> None:
        self._body.close()


class _FlakyClient:
    """The real client, except that the first GetObject stream breaks mid-way (injected
    through the narrow client protocol, no monkeypatching)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.ranges: list[str] = []

    def head_object(self, **kwargs: Any) -> Mapping[str, Any]:
        return self._client.head_object(**kwargs)  # type: ignore[no-any-return]

    def delete_object(self, **kwargs: Any) -> Mapping[str, Any]:
        return self._client.delete_object(**kwargs)  # type: ignore[no-any-return]

    def get_object(self, **kwargs: Any) -> Mapping[str, Any]:
        self.ranges.append(kwargs["Range"])
        response = dict(self._client.get_object(**kwargs))
        if len(self.ranges) == 1:
            response["Body"] = _BreakingBody(response["Body"], after=2)
        return response


async def test_a_broken_stream_resumes_from_the_next_byte(s3: Any, bucket: str) -> None:
    data = os.urandom(3 * MiB)
    s3.put_object(Bucket=bucket, Key="k", Body=data)
    client = _FlakyClient(s3)
    flaky: S3SourceClient = client
    source = await S3ByteSource.open(flaky, bucket, "k", chunk_size=256 * 1024)

    got = await read_range(source, 100, len(data))

    assert got == data[100:]
    assert client.ranges == [
        f"bytes=100-{len(data) - 1}",
        f"bytes={100 + 512 * 1024}-{len(data) - 1}",
    ]


async def test_source_error_has_a_default_code() -> None:
    error = SourceError("disk gone", retryable=True)
    assert (error.code, error.retryable, error.message) == ("source_failed", True, "disk gone")
    assert "source_failed" in repr(error)
