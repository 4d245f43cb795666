"""The worker's state in NATS KV: checkpoints for destinations, the ledger of jobs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.js.kv import KeyValue

from events.bus import EventBus
from events.model import FileStorage, S3Storage
from processing.checkpoints_kv import KvCheckpointStore, kv_key, open_bucket
from processing.ledger import Busy, LeaseLost, Ledger


@pytest.fixture
async def kv(nats_url: str) -> AsyncIterator[KeyValue]:
    bus = EventBus(nats_url, name="test")
    assert await bus.start(wait=5)
    yield await open_bucket(bus.js)
    await bus.close()


def test_keys_are_valid_for_kv() -> None:
    assert kv_key("job", "ab" * 16) == "job." + "ab" * 16
    assert kv_key("job", "tr_12") == "job.tr_12"
    hashed = kv_key("ckpt", "../a b.c*")
    assert hashed.startswith("ckpt.h-") and len(hashed) == len("ckpt.h-") + 64


async def test_checkpoints_round_trip(kv: KeyValue) -> None:
    store = KvCheckpointStore(kv)
    assert await store.load("k") is None
    await store.save("k", {"upload_url": "http://x/upload/1", "bytes_done": 5})
    assert await store.load("k") == {"upload_url": "http://x/upload/1", "bytes_done": 5}
    await store.delete("k")
    await store.delete("k")  # idempotent
    assert await store.load("k") is None
    await store.save("k", {"again": True})  # a deleted key can be written again
    assert await store.load("k") == {"again": True}


async def test_claims_leases_and_outcomes(kv: KeyValue) -> None:
    now = [1000.0]
    ledger = Ledger(kv, clock=lambda: now[0])
    record = await ledger.claim("j", "w1", lease=30)
    assert (record.attempts, record.worker, record.lease_until) == (1, "w1", 1030.0)
    with pytest.raises(Busy) as busy:
        await ledger.claim("j", "w2", lease=30)
    assert busy.value.worker == "w1" and busy.value.remaining == 30
    now[0] = 1020.0
    await ledger.renew("j", "w1", 30)
    now[0] = 1049.0
    with pytest.raises(Busy):
        await ledger.claim("j", "w2", lease=30)
    now[0] = 1051.0  # w1 stopped renewing: w2 takes over, w1 learns it
    assert (await ledger.claim("j", "w2", lease=30)).attempts == 2
    with pytest.raises(LeaseLost) as lost:
        await ledger.renew("j", "w1", 30)
    assert lost.value.outcome is None
    await ledger.fail("j", "w1", {"code": "x"})  # not w1's any more: ignored
    await ledger.fail("j", "w2", {"code": "destination_unavailable"})
    record, _ = await ledger.get("j")
    assert record.worker is None and record.last_error == {"code": "destination_unavailable"}
    assert (await ledger.claim("j", "w3", lease=30)).attempts == 3
    first = await ledger.finish("j", "finished", {"id": "j:finished"})
    second = await ledger.finish("j", "aborted", {"id": "j:aborted"})
    assert first.outcome == second.outcome == {"type": "finished", "envelope": {"id": "j:finished"}}
    assert (await ledger.claim("j", "w4", lease=30)).outcome is not None  # no new attempt
    with pytest.raises(LeaseLost) as lost:
        await ledger.renew("j", "w3", 30)
    assert lost.value.outcome is not None


async def test_cleanup_deadlines(kv: KeyValue) -> None:
    ledger = Ledger(kv)
    assert await ledger.cleanups() == []
    await ledger.schedule_cleanup("a" * 32, FileStorage(path="/x/a.bin"), due=5.0)
    await ledger.schedule_cleanup("b" * 32, FileStorage(path="/x/b.bin"), due=9.0)
    await kv.put("cleanup.junk", b"not json")
    found = sorted((c.upload_id, c.due) for c in await ledger.cleanups())
    assert found == [("a" * 32, 5.0), ("b" * 32, 9.0)]
    await ledger.cleanup_done("a" * 32)
    await ledger.cleanup_done("a" * 32)
    assert [c.upload_id for c in await ledger.cleanups()] == ["b" * 32]


async def test_a_source_to_delete_keeps_its_version(kv: KeyValue) -> None:
    ledger = Ledger(kv)
    source = S3Storage(bucket="docs", key="in/report.pdf")
    scheduled = await ledger.schedule_cleanup("tr_1", source, due=1.0, source_etag='"abc"')
    assert await ledger.cleanups() == [scheduled]
    assert scheduled.storage == source and scheduled.source_etag == '"abc"'
