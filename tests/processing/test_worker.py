"""The worker against a real nats-server: ack decisions, attempts, heartbeats, leases, cleanup.

Events are published straight onto the stream (no gateway); destinations are the real local
folder, wrapped where a test needs failures or slowness.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import ConsumerInfo

from events.bus import STREAM_NAME, EventBus
from events.model import (
    ProcessingAborted,
    ProcessingFinished,
    ProcessingProgress,
    ProcessingStarted,
    ProcessingStepFinished,
    S3Source,
    S3Storage,
    TransferCanceled,
    TransferRequested,
    UploadBytesReceived,
    UploadSource,
    utcnow,
    validate,
)
from gateway.settings import Settings
from gateway.store.base import UploadGone, UploadInfo
from gateway.store.filestore import FileStore
from processing.checkpoints_kv import open_bucket
from processing.config import build_pipeline, worker_config
from processing.destinations import (
    DeliveryError,
    DeliveryResult,
    DeliveryTarget,
    DestinationRejected,
    DestinationUnavailable,
    LocalFolderDestination,
)
from processing.errors import ProcessingError
from processing.ledger import Cleanup, Ledger
from processing.pipeline import Pipeline
from processing.worker import CONSUMER
from tests.processing.worker_support import (
    EventLog,
    bytes_received,
    event_log,
    running_worker,
    stage_upload,
    test_settings,
    wait_until,
)


class WrappedLocal(LocalFolderDestination):
    """The local destination with scripted failures, a delay, and a delivery count."""

    def __init__(
        self,
        root: Path,
        failures: list[DeliveryError] | None = None,
        delay: float = 0.0,
        gate: asyncio.Event | None = None,
    ) -> None:
        super().__init__(root, fsync=False)
        self.failures = list(failures or [])
        self.always: DeliveryError | None = None
        self.delay = delay
        self.gate = gate
        self.calls = 0

    async def deliver(self, source: Any, target: DeliveryTarget, **kwargs: Any) -> DeliveryResult:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.always is not None:
            raise self.always
        if self.failures:
            raise self.failures.pop(0)
        return await super().deliver(source, target, **kwargs)


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[EventBus]:
    bus = EventBus(nats_url, name="test")
    assert await bus.start(wait=5)
    assert await bus.wait_stream(5)
    yield bus
    await bus.close()


@pytest.fixture
async def log(bus: EventBus) -> EventLog:
    return await event_log(bus)


@pytest.fixture
def settings(tmp_path: Path, nats_url: str) -> Settings:
    return test_settings(tmp_path / "data", nats_url)


def pipeline_with(settings: Settings, destination: LocalFolderDestination) -> Pipeline:
    pipeline = build_pipeline(settings)
    pipeline.destination = destination
    return pipeline


async def publish_upload(
    bus: EventBus, settings: Settings, data: bytes, upload_id: str | None = None, **kwargs: Any
) -> UploadBytesReceived:
    upload_id = upload_id or os.urandom(16).hex()
    storage = stage_upload(settings.uploads_dir, data, upload_id)
    event = bytes_received(upload_id, storage, data, **kwargs)
    await bus.publish(event)
    return event


async def consumer(bus: EventBus) -> ConsumerInfo:
    return await bus.js.consumer_info(STREAM_NAME, CONSUMER)


async def test_delivers_and_reports_every_step(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    data = os.urandom(300_000)
    async with running_worker(settings):
        event = await publish_upload(bus, settings, data, filename="report.pdf")
        outcome = await log.wait_outcome(event.upload_id)
    assert isinstance(outcome, ProcessingFinished), outcome
    assert outcome.size == len(data) and outcome.sha256 == hashlib.sha256(data).hexdigest()
    path = outcome.destination["local"]["path"]
    assert path.startswith("alice/") and path.endswith("/report.pdf")
    assert (settings.delivered_dir / path).read_bytes() == data
    uid = event.upload_id
    [started] = log.of(ProcessingStarted, uid)
    assert started.attempt == 1 and started.kind == "upload"
    steps = [(e.step, e.ok) for e in log.of(ProcessingStepFinished, uid)]
    assert steps == [("size", True), ("sniff", True), ("checksum", True), ("deliver", True)]
    phases = [e.step for e in log.of(ProcessingProgress, uid)]
    assert phases[0] == "processing" and "finalizing" in phases
    for e in log.of(ProcessingStarted) + log.of(ProcessingStepFinished) + [outcome]:
        validate(e.to_envelope())
    info = await consumer(bus)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_retryable_failures_are_retried_with_backoff(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    destination = WrappedLocal(
        settings.delivered_dir,
        failures=[DestinationUnavailable("Graph is down"), DestinationUnavailable("still down")],
    )
    async with running_worker(settings, pipeline=pipeline_with(settings, destination)):
        event = await publish_upload(bus, settings, b"hello")
        outcome = await log.wait_outcome(event.upload_id)
    assert isinstance(outcome, ProcessingFinished)
    started = log.of(ProcessingStarted, event.upload_id)
    assert [e.attempt for e in started] == [1, 2, 3]
    gaps = [(b.event_time - a.event_time).total_seconds() for a, b in itertools.pairwise(started)]
    assert all(gap >= 0.19 for gap in gaps), gaps  # processing_backoff = 0.2
    failed = [e for e in log.of(ProcessingStepFinished, event.upload_id) if not e.ok]
    assert [(e.step, e.attempt) for e in failed] == [("deliver", 1), ("deliver", 2)]
    assert destination.calls == 3


async def test_after_max_deliver_attempts_the_last_error_is_reported(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    settings = settings.replace(processing_max_deliver=2)
    destination = WrappedLocal(settings.delivered_dir)
    destination.always = DestinationUnavailable("Graph is down")
    async with running_worker(settings, pipeline=pipeline_with(settings, destination)):
        event = await publish_upload(bus, settings, b"hello")
        outcome = await log.wait_outcome(event.upload_id)
        await wait_until(lambda: destination.calls == 2)
        await asyncio.sleep(0.3)
        info = await consumer(bus)
    assert isinstance(outcome, ProcessingAborted)
    assert (outcome.code, outcome.retryable) == ("destination_unavailable", True)
    assert outcome.message == "Graph is down"
    assert [e.attempt for e in log.of(ProcessingStarted, event.upload_id)] == [1, 2]
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_a_final_failure_aborts_at_once(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    destination = WrappedLocal(
        settings.delivered_dir, failures=[DestinationRejected("HTTP 400 from Graph")]
    )
    async with running_worker(settings, pipeline=pipeline_with(settings, destination)):
        event = await publish_upload(bus, settings, b"hello")
        outcome = await log.wait_outcome(event.upload_id)
    assert isinstance(outcome, ProcessingAborted)
    assert (outcome.code, outcome.retryable) == ("destination_rejected", False)
    assert destination.calls == 1


async def test_a_poison_message_is_terminated_and_reported(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    bad = b'{"specversion": "1.0", "type": "tusgate.upload.bytes-received.v1", "subject": "abc",'
    bad += (
        b' "id": "abc:bytes-received", "source": "/x", "time": "2025-01-01T00:00:00Z", "data": {}}'
    )
    async with running_worker(settings):
        await bus.publish_raw(UploadBytesReceived.event_type(), bad, msg_id="abc:bytes-received")
        await bus.publish_raw(UploadBytesReceived.event_type(), b"\xff not json", msg_id="junk")
        outcome = await log.wait_outcome("abc")
        await wait_until(lambda: True)
        await asyncio.sleep(0.5)
        info = await consumer(bus)
    assert isinstance(outcome, ProcessingAborted) and outcome.code == "invalid_event"
    assert info.num_ack_pending == 0 and info.num_redelivered == 0 and info.num_pending == 0


async def test_the_same_event_twice_delivers_one_file(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    settings = settings.replace(processing_ack_wait=1.5)
    destination = WrappedLocal(settings.delivered_dir, delay=0.3)
    async with running_worker(settings, pipeline=pipeline_with(settings, destination)):
        event = await publish_upload(bus, settings, b"twice")
        # A second copy while the first runs (as after a lost ack), and a third after success
        # (as after JetStream's duplicate window): different Nats-Msg-Ids, one upload.
        raw = event.to_json_bytes()
        await bus.publish_raw(event.nats_subject, raw, msg_id=event.msg_id + ":again")
        outcome = await log.wait_outcome(event.upload_id)
        await bus.publish_raw(event.nats_subject, raw, msg_id=event.msg_id + ":later")
        await wait_until(lambda: True)
        for _ in range(100):
            info = await consumer(bus)
            if info.num_ack_pending == 0 and info.num_pending == 0:
                break
            await asyncio.sleep(0.1)
    assert isinstance(outcome, ProcessingFinished)
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert destination.calls == 1
    files = [p for p in settings.delivered_dir.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].read_bytes() == b"twice"
    assert len(log.of(ProcessingStarted, event.upload_id)) == 1


async def test_attempts_that_crashed_count(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    """A job whose every attempt killed its worker still ends in processing.aborted."""
    settings = settings.replace(processing_max_deliver=2)
    ledger = Ledger(await open_bucket(bus.js))
    upload_id = os.urandom(16).hex()
    for _ in range(2):  # two workers took it and died (their leases ran out)
        await ledger.claim(upload_id, "dead-worker", lease=0.0)
    async with running_worker(settings):
        await publish_upload(bus, settings, b"x", upload_id=upload_id)
        outcome = await log.wait_outcome(upload_id)
    assert isinstance(outcome, ProcessingAborted)
    assert (outcome.code, outcome.retryable) == ("attempts_exhausted", True)
    assert not log.of(ProcessingStarted, upload_id)


async def test_a_job_held_by_a_live_worker_waits_for_its_lease(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    ledger = Ledger(await open_bucket(bus.js))
    upload_id = os.urandom(16).hex()
    await ledger.claim(upload_id, "other-worker", lease=1.0)
    async with running_worker(settings):
        await publish_upload(bus, settings, b"x", upload_id=upload_id)
        await asyncio.sleep(0.5)
        assert not log.of(ProcessingStarted, upload_id)
        outcome = await log.wait_outcome(upload_id)
    assert isinstance(outcome, ProcessingFinished)
    assert [e.attempt for e in log.of(ProcessingStarted, upload_id)] == [2]


async def test_heartbeats_keep_a_long_delivery_with_its_worker(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    settings = settings.replace(processing_ack_wait=1.0)
    destination = WrappedLocal(settings.delivered_dir, delay=2.2)
    async with running_worker(settings, pipeline=pipeline_with(settings, destination)):
        event = await publish_upload(bus, settings, b"slow")
        outcome = await log.wait_outcome(event.upload_id)
    assert isinstance(outcome, ProcessingFinished)
    assert destination.calls == 1
    assert len(log.of(ProcessingStarted, event.upload_id)) == 1


async def test_stopping_leaves_unfinished_jobs_to_another_worker(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    settings = settings.replace(processing_stop_timeout=0.2)
    stuck = WrappedLocal(settings.delivered_dir, gate=asyncio.Event())
    async with running_worker(settings, pipeline=pipeline_with(settings, stuck)):
        event = await publish_upload(bus, settings, b"handed over")
        await wait_until(lambda: stuck.calls == 1)
    # The stopped worker released the job at once: the next one need not wait for ack_wait.
    async with running_worker(settings):
        outcome = await log.wait_outcome(event.upload_id, timeout=2.5)
    assert isinstance(outcome, ProcessingFinished)
    assert [e.attempt for e in log.of(ProcessingStarted, event.upload_id)] == [1, 2]


class ChattyDestination(LocalFolderDestination):
    """Reports progress 50 times over ~2.5 s."""

    async def deliver(self, source: Any, target: DeliveryTarget, **kwargs: Any) -> DeliveryResult:
        progress = kwargs["progress"]
        for step in range(50):
            await progress(step * source.size // 50)
            await asyncio.sleep(0.05)
        return await super().deliver(source, target, **kwargs)


async def test_progress_is_at_most_one_event_per_second(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    destination = ChattyDestination(settings.delivered_dir, fsync=False)
    async with running_worker(settings, pipeline=pipeline_with(settings, destination)):
        event = await publish_upload(bus, settings, os.urandom(100_000))
        await log.wait_outcome(event.upload_id)
    finalizing = [e for e in log.of(ProcessingProgress, event.upload_id) if e.step == "finalizing"]
    assert 2 <= len(finalizing) <= 4, [e.percent for e in finalizing]
    times = [e.event_time for e in finalizing]
    assert all((b - a).total_seconds() >= 0.99 for a, b in itertools.pairwise(times))
    percents = [e.percent for e in finalizing]
    assert percents == sorted(percents)


async def store_upload(
    store: FileStore, data: bytes, *, owner: str = "alice", metadata_raw: str | None = None
) -> UploadInfo:
    info = await store.create(
        UploadInfo(id=os.urandom(16).hex(), size=len(data), owner=owner, metadata_raw=metadata_raw)
    )

    async def body() -> AsyncIterator[bytes]:
        yield data

    await store.write_chunk(info.id, 0, body())
    return await store.get_info(info.id)


async def test_staged_bytes_are_discarded_after_the_retention(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    settings = settings.replace(store_retention=0.6)
    store = FileStore(settings.uploads_dir)
    info = await store_upload(store, b"keep me a while")
    async with running_worker(settings):
        event = bytes_received(
            info.id,
            stage_upload(settings.uploads_dir, b"keep me a while", info.id),
            b"keep me a while",
        )
        await bus.publish(event)
        assert isinstance(await log.wait_outcome(info.id), ProcessingFinished)
        assert (await store.get_info(info.id)).offset == 15  # still there
        await asyncio.sleep(0.6)

        async def gone() -> bool:
            try:
                await store.get_info(info.id)
            except UploadGone as exc:
                return exc.reason == "delivered"
            return False

        for _ in range(100):
            if await gone():
                break
            await asyncio.sleep(0.05)
        assert await gone()
    assert not Path(info.storage["path"]).exists()


async def test_retention_zero_discards_at_once(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    store = FileStore(settings.uploads_dir)
    info = await store_upload(store, b"bye")
    async with running_worker(settings):
        await bus.publish(
            bytes_received(info.id, stage_upload(settings.uploads_dir, b"bye", info.id), b"bye")
        )
        assert isinstance(await log.wait_outcome(info.id), ProcessingFinished)
        await wait_until(lambda: not Path(info.storage["path"]).exists(), 5)
    with pytest.raises(UploadGone):
        await store.get_info(info.id)


async def test_a_redelivered_event_schedules_the_clean_up_a_dead_worker_did_not(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    store = FileStore(settings.uploads_dir)
    info = await store_upload(store, b"delivered before the crash")
    storage = stage_upload(settings.uploads_dir, b"delivered before the crash", info.id)
    event = bytes_received(info.id, storage, b"delivered before the crash")
    # A worker recorded the outcome with its clean-up, then died before writing cleanup.<id>.
    ledger = Ledger(await open_bucket(bus.js))
    finished = ProcessingFinished(
        id=info.id,
        destination={"local": {"path": "x"}},
        item_id=None,
        web_url=None,
        size=26,
        sha256="0" * 64,
    )
    await ledger.finish(
        info.id, "finished", finished.to_envelope(), cleanup=Cleanup(info.id, storage, 0.0)
    )
    assert await ledger.cleanups() == []
    async with running_worker(settings):
        await bus.publish(event)  # JetStream redelivers it: the outcome is there
        assert isinstance(await log.wait_outcome(info.id), ProcessingFinished)
        await wait_until(lambda: not Path(storage.path).exists(), 5)
    with pytest.raises(UploadGone):
        await store.get_info(info.id)
    assert await ledger.cleanups() == []
    assert not list(settings.delivered_dir.rglob("*"))  # not delivered a second time


async def test_transfers_that_cannot_be_delivered(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    store = FileStore(settings.uploads_dir)
    info = await store_upload(store, b"%PDF-1.7 transfer me", metadata_raw="filename YS5wZGY=")
    source = UploadSource(upload_id=info.id)

    def transfer(owner: str, destination: dict[str, Any]) -> TransferRequested:
        return TransferRequested(
            transfer_id="tr_" + os.urandom(8).hex(),
            source=source,
            owner=owner,
            destination=destination,
        )

    traversal = transfer("alice", {"local": {"path": "inbox/../../copy.pdf"}})
    stranger = transfer("mallory", {"local": {"path": "stolen.pdf"}})
    misrouted = transfer("alice", {"onedrive": {"path": "x.pdf"}})
    async with running_worker(settings):
        for event in (traversal, stranger, misrouted):
            await bus.publish(event)
        codes = []
        for event in (traversal, stranger, misrouted):
            outcome = await log.wait_outcome(event.transfer_id)
            assert isinstance(outcome, ProcessingAborted)
            codes.append(outcome.code)
    assert codes == ["invalid_target", "source_not_found", "destination_not_configured"]
    assert not list(settings.delivered_dir.rglob("*.pdf"))


async def test_transfer_delivers_to_the_named_path(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    store = FileStore(settings.uploads_dir)
    info = await store_upload(store, b"%PDF-1.7 transfer me", metadata_raw="filename YS5wZGY=")
    async with running_worker(settings):
        event = TransferRequested(
            transfer_id="tr_" + os.urandom(8).hex(),
            source=UploadSource(upload_id=info.id),
            owner="alice",
            destination={"local": {"path": "inbox/copy.pdf"}},
        )
        await bus.publish(event)
        outcome = await log.wait_outcome(event.transfer_id)
    assert isinstance(outcome, ProcessingFinished), outcome
    assert outcome.destination == {"local": {"path": "inbox/copy.pdf"}}
    assert (settings.delivered_dir / "inbox" / "copy.pdf").read_bytes() == b"%PDF-1.7 transfer me"
    # A transfer does not consume its source.
    assert (await store.get_info(info.id)).is_complete


async def test_workers_share_one_consumer(bus: EventBus, log: EventLog, settings: Settings) -> None:
    settings = settings.replace(processing_concurrency=2)
    destination = WrappedLocal(settings.delivered_dir, delay=0.2)
    other = WrappedLocal(settings.delivered_dir, delay=0.2)
    async with (
        running_worker(settings, pipeline=pipeline_with(settings, destination)),
        running_worker(settings, pipeline=pipeline_with(settings, other)),
    ):
        events = [
            await publish_upload(
                bus, settings, io.BytesIO(os.urandom(1000)).read(), filename=f"f{i}.bin"
            )
            for i in range(8)
        ]
        for event in events:
            assert isinstance(await log.wait_outcome(event.upload_id), ProcessingFinished)
    assert destination.calls + other.calls == 8
    assert destination.calls and other.calls
    assert len([p for p in settings.delivered_dir.rglob("*.bin")]) == 8


async def test_a_canceled_transfer_stops_and_is_not_delivered(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    settings = settings.replace(processing_ack_wait=1.5)  # heartbeats every 0.5 s
    store = FileStore(settings.uploads_dir)
    info = await store_upload(store, os.urandom(50_000))
    destination = WrappedLocal(settings.delivered_dir, delay=1.5)

    def transfer(path: str) -> TransferRequested:
        return TransferRequested(
            transfer_id="tr_" + os.urandom(16).hex(),
            owner="alice",
            source=UploadSource(upload_id=info.id),
            destination={"local": {"path": path}},
        )

    running, queued = transfer("running.bin"), transfer("queued.bin")
    async with running_worker(settings, pipeline=pipeline_with(settings, destination)):
        await bus.publish(running)
        await wait_until(lambda: destination.calls == 1)
        await bus.publish(TransferCanceled(transfer_id=running.transfer_id, at=utcnow()))
        # Canceled before any worker took it: it never starts. (Waiting for the cancel's
        # outcome first: events fetched in one batch are handled concurrently, so a request
        # published right behind its cancel could start and then be stopped instead.)
        await bus.publish(TransferCanceled(transfer_id=queued.transfer_id, at=utcnow()))
        queued_outcome = await log.wait_outcome(queued.transfer_id)
        await bus.publish(queued)
        outcomes = [await log.wait_outcome(running.transfer_id), queued_outcome]
        await asyncio.sleep(0.3)
    for outcome in outcomes:
        assert isinstance(outcome, ProcessingAborted) and outcome.code == "canceled", outcome
    assert destination.calls == 1
    assert not list(settings.delivered_dir.rglob("*.bin"))
    assert not log.of(ProcessingStarted, queued.transfer_id)


async def test_a_transfer_may_not_choose_another_drive(
    bus: EventBus, log: EventLog, settings: Settings
) -> None:
    from processing.job import Job
    from processing.pipeline import Pipeline as _Pipeline

    pipeline = _Pipeline(
        destination=LocalFolderDestination(settings.delivered_dir), default_drive="users/{owner}"
    )
    pipeline.destination.kind = "onedrive"  # type: ignore[misc]
    job = Job(
        id="tr_1",
        kind="transfer",
        owner="alice",
        size=1,
        destination={"onedrive": {"path": "/a.bin", "drive": "users/ceo"}},
    )
    with pytest.raises(ProcessingError) as info:
        pipeline.target_for(job, None)
    assert info.value.code == "drive_not_allowed"
    for drive in ("me", "users/alice", "users/{owner}", None):
        ok = Job(
            id="tr_1",
            kind="transfer",
            owner="alice",
            size=1,
            destination={"onedrive": {"path": "/a.bin", "drive": drive}},
        )
        assert pipeline.target_for(ok, None).drive is None


@pytest.fixture
def s3_bucket(
    moto_s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[tuple[Any, str]]:
    """A bucket in moto's S3 server, and AWS credentials for it in the environment."""
    for name, value in (
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none")),
        ("AWS_CONFIG_FILE", str(tmp_path / "none")),
    ):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    from processing.sources_s3 import make_s3_client

    client = make_s3_client(moto_s3_endpoint, "us-east-1")
    bucket = "b-" + os.urandom(6).hex()
    client.create_bucket(Bucket=bucket)
    yield client, bucket
    client.close()  # type: ignore[attr-defined]


async def test_s3_sources_transfers_and_staged_uploads(
    bus: EventBus, log: EventLog, settings: Settings, moto_s3_endpoint: str, s3_bucket: Any
) -> None:
    client, bucket = s3_bucket
    data = os.urandom(3 * 1024 * 1024 + 7)
    client.put_object(Bucket=bucket, Key="in/report.pdf", Body=data, ContentType="application/pdf")
    settings = settings.replace(s3_endpoint_url=moto_s3_endpoint)
    transfer = TransferRequested(
        transfer_id="tr_" + os.urandom(16).hex(),
        owner="alice",
        source=S3Source(bucket=bucket, key="in/report.pdf"),
        destination={"local": {"path": "/from-s3/report.pdf"}},
    )
    upload_id = os.urandom(16).hex()
    staged = bytes_received(
        upload_id, S3Storage(bucket=bucket, key="in/report.pdf"), data, filename="staged.pdf"
    )
    missing = TransferRequested(
        transfer_id="tr_" + os.urandom(16).hex(),
        owner="alice",
        source=S3Source(bucket=bucket, key="nope"),
        destination={"local": {"path": "/x.bin"}},
    )
    async with running_worker(settings):
        for event in (transfer, staged, missing):
            await bus.publish(event)
        finished = await log.wait_outcome(transfer.transfer_id)
        from_staging = await log.wait_outcome(upload_id)
        failed = await log.wait_outcome(missing.transfer_id)
    assert isinstance(finished, ProcessingFinished), finished
    assert (settings.delivered_dir / "from-s3" / "report.pdf").read_bytes() == data
    assert isinstance(from_staging, ProcessingFinished), from_staging
    assert from_staging.sha256 == hashlib.sha256(data).hexdigest()
    assert isinstance(failed, ProcessingAborted) and failed.code == "source_not_found"


def test_worker_config_from_settings(settings: Settings) -> None:
    config = worker_config(settings.replace(processing_backoff="1, 5,30"))
    assert config.backoff == (1.0, 5.0, 30.0)
    assert [config.backoff_for(n) for n in (1, 2, 3, 4, 9)] == [1.0, 5.0, 30.0, 30.0, 30.0]
    assert config.heartbeat == pytest.approx(1.0)
