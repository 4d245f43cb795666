"""processing.staging: what is (not) discarded, without touching anything it does not own."""

from __future__ import annotations

from typing import Any

from events.model import S3Storage
from processing.staging import delete_source, discard_staged

UPLOAD = "0123456789abcdef0123456789abcdef"


def no_client_expected(endpoint_url: str | None) -> Any:
    raise AssertionError("no S3 call expected")


async def test_s3_bytes_are_discarded_only_when_the_key_is_the_upload_s() -> None:
    other = S3Storage(bucket="b", key="in/report.pdf")
    assert not await discard_staged(other, UPLOAD, s3_client=no_client_expected)
    assert not await discard_staged(S3Storage(bucket="b", key=f"uploads/{UPLOAD}"), "")


async def test_nothing_happens_without_an_s3_client() -> None:
    storage = S3Storage(bucket="b", key=f"uploads/{UPLOAD}")
    assert not await discard_staged(storage, UPLOAD)
    assert not await delete_source(storage, '"etag"', s3_client=None)
