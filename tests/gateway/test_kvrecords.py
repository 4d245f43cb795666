"""Upload records in NATS KV (a real nats-server): revision checks, and answers lost on the way.

A lost answer is injected by wrapping the real bucket: the operation reaches NATS and is
applied, then the caller sees a timeout -- what a node failing over mid-request looks like.
"""

from __future__ import annotations

import os
from typing import Any

import nats.errors
import pytest

from gateway.store.base import StoreUnavailable, UploadNotFound
from gateway.store.kvrecords import KvRecords, RecordChanged


class LossyBucket:
    """The real bucket; the first `lose` calls of `op` are applied but answer with a timeout,
    or (`applied=False`) time out without reaching NATS."""

    def __init__(self, real: Any, op: str, lose: int = 1, *, applied: bool = True) -> None:
        self.real, self.op, self.lose, self.applied = real, op, lose, applied

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.real, name)
        if name != self.op:
            return method

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.lose > 0:
                self.lose -= 1
                if self.applied:
                    await method(*args, **kwargs)
                raise nats.errors.TimeoutError
            return await method(*args, **kwargs)

        return call


def new_id() -> str:
    return os.urandom(16).hex()


async def lossy(records: KvRecords, op: str, **kw: Any) -> LossyBucket:
    bucket = LossyBucket(await records._bucket(), op, **kw)
    records._kv = bucket  # type: ignore[assignment]
    return bucket


async def test_updates_are_revision_checked(upload_records: KvRecords) -> None:
    uid = new_id()
    first = await upload_records.create(uid, {"n": 1})
    with pytest.raises(RecordChanged):
        await upload_records.create(uid, {"n": 1})  # exists
    second = await upload_records.update(uid, {"n": 2}, first)
    with pytest.raises(RecordChanged):
        await upload_records.update(uid, {"n": 3}, first)  # a stale revision changes nothing
    assert await upload_records.get(uid) == ({"n": 2}, second)
    with pytest.raises(RecordChanged):
        await upload_records.delete(uid, first)
    await upload_records.delete(uid, second)
    with pytest.raises(UploadNotFound):
        await upload_records.get(uid)
    assert uid in await upload_records.ids()  # listed until read: callers skip 404s


async def test_an_update_whose_answer_was_lost_is_not_a_conflict(
    upload_records: KvRecords,
) -> None:
    uid = new_id()
    revision = await upload_records.create(uid, {"n": 1})
    await lossy(upload_records, "update")
    # Applied, answer lost, retried: the retry is refused (the revision moved) but the record
    # holds exactly what we wrote, so it is our own write.
    new = await upload_records.update(uid, {"n": 2}, revision)
    assert await upload_records.get(uid) == ({"n": 2}, new)


async def test_a_lost_update_that_never_landed_is_retried(upload_records: KvRecords) -> None:
    uid = new_id()
    revision = await upload_records.create(uid, {"n": 1})
    await lossy(upload_records, "update", lose=2, applied=False)
    new = await upload_records.update(uid, {"n": 2}, revision)
    assert await upload_records.get(uid) == ({"n": 2}, new)


async def test_a_lost_create_and_a_lost_delete(upload_records: KvRecords) -> None:
    uid = new_id()
    await lossy(upload_records, "create")
    revision = await upload_records.create(uid, {"n": 1})
    assert await upload_records.get(uid) == ({"n": 1}, revision)
    await lossy(upload_records, "delete")
    await upload_records.delete(uid, revision)
    with pytest.raises(UploadNotFound):
        await upload_records.get(uid)


async def test_someone_elses_change_is_still_a_conflict_after_a_retry(
    upload_records: KvRecords,
) -> None:
    uid = new_id()
    revision = await upload_records.create(uid, {"n": 1})
    real = await upload_records._bucket()
    bucket = await lossy(upload_records, "update", applied=False)

    async def theirs_first(*args: Any, **kwargs: Any) -> Any:
        bucket.op = ""  # from now on: the real update
        await real.update(f"upload.{uid}", b'{"n": "theirs"}', last=revision)
        raise nats.errors.TimeoutError

    bucket.real = type("B", (), {"update": staticmethod(theirs_first), "get": real.get})()
    with pytest.raises(RecordChanged):
        await upload_records.update(uid, {"n": 2}, revision)
    assert (await upload_records.get(uid))[0] == {"n": "theirs"}


async def test_nats_that_cannot_answer_is_store_unavailable(upload_records: KvRecords) -> None:
    uid = new_id()
    await upload_records.create(uid, {"n": 1})
    upload_records._retry_window = 0.3
    await lossy(upload_records, "get", lose=1000, applied=False)
    with pytest.raises(StoreUnavailable):
        await upload_records.get(uid)
