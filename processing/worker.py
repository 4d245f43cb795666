"""The processing worker: a durable JetStream pull consumer and the ack decision per event.

Every worker of every host pulls from one durable consumer, ``processing`` on the ``TUSGATE``
stream, filtered to ``tusgate.upload.bytes-received.v1``, ``tusgate.transfer.requested.v1`` and
``tusgate.transfer.canceled.v1``: JetStream hands each event to one of them. A worker runs up to ``concurrency`` jobs at once and
fetches only as many events as it has free slots (an event waiting in a busy worker would hold
up nobody else's, but its ``ack_wait`` would be ticking).

One event, one decision (SPEC §5)::

    unparseable / not a job          term()  (+ processing.aborted invalid_event, if it names
                                              an upload)
    another worker holds the job     nak(delay = rest of its lease)
    the job already has an outcome   re-publish that outcome, ack()      (redelivery: no
                                                                           second file)
    attempt > max_deliver            processing.aborted with the last error, ack()
    delivered                        processing.finished (PubAck), ack()
    failed, not retryable            processing.aborted (PubAck), ack()
    failed, retryable, attempts left nak(delay = backoff[attempt])
    failed, retryable, last attempt  processing.aborted with that error, ack()
    worker stopping                  left to another worker: lease released, nak()
    transfer.canceled                outcome "canceled" recorded (unless delivered), published,
                                     ack(); a worker running the transfer stops at its next
                                     heartbeat and deletes the remote session

While a job runs, a heartbeat every ``ack_wait / 3`` sends ``in_progress()`` (JetStream keeps
the event ours) and renews the job's lease in the ledger (:mod:`processing.ledger`). The
outcome is recorded in the ledger *before* the outcome event is published, and the event is
acked only after the PubAck: a crash anywhere in between leads to a redelivery that re-publishes
the recorded outcome instead of delivering again. The consumer's own ``max_deliver`` is
unlimited; the worker counts attempts in the ledger, so that even an attempt that crashed the
worker (``kill -9``, out of memory) counts, and the upload still ends in ``processing.aborted``
rather than silently falling out of the consumer.

Events emitted per attempt: processing.started (``attempt`` = attempts so far, from the
ledger), processing.step-finished per step (size, sniff, checksum, hook, deliver, manifest),
processing.progress (at most one per second; the first of each phase at once: ``processing``
while checking, ``finalizing`` while delivering), then processing.finished or .aborted.

After a delivery the staged bytes are discarded ``store_retention`` seconds later: the deadline
is recorded in the ledger (``cleanup.<id>``), and every worker sweeps due deadlines every
``store_sweep_interval`` seconds; with retention 0 the worker discards at once after the ack.
A transfer with ``delete_source`` (an S3 object) is cleaned up the same way, at once. The
clean-up is part of the recorded ``finished`` outcome (never of another one: a failed or
canceled transfer keeps its source) and is written to ``cleanup.<id>`` after it; a redelivered
event whose outcome is recorded writes it again, so a worker that dies in between loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from events.bus import STREAM_NAME, EventBus
from events.errors import EventsError, InvalidEvent
from events.model import (
    Event,
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
    parse_envelope,
    parse_event,
)
from events.tasks import stop_task
from gateway.store.kvrecords import KvRecords
from processing.checkpoints_kv import KvCheckpointStore, open_bucket
from processing.config import JobSources, WorkerConfig
from processing.errors import ProcessingError, as_processing_error
from processing.job import Job, job_from_event
from processing.ledger import Busy, Cleanup, JobRecord, LeaseLost, Ledger, recorded_cleanup
from processing.pipeline import Phase, Pipeline, PipelineResult
from processing.sources import SourceError
from processing.staging import delete_source, discard_staged

__all__ = ["CONSUMER", "SUBJECTS", "Worker", "consumer_config"]

log = logging.getLogger("tusgate.processing")

CONSUMER = "processing"
SUBJECTS = (
    UploadBytesReceived.event_type(),
    TransferRequested.event_type(),
    TransferCanceled.event_type(),
)
RETRY_PAUSE = 1.0  # seconds between attempts to reach NATS when it does not answer
CANCEL_GRACE = 5.0  # seconds a cancelled job may take to unwind at shutdown
#: Errors of talking to NATS (publish, KV, acks): the job is retried, nothing is decided.
NATS_ERRORS = (nats.errors.Error, TimeoutError, EventsError)


def consumer_config(config: WorkerConfig) -> ConsumerConfig:
    return ConsumerConfig(
        name=CONSUMER,
        durable_name=CONSUMER,
        description="tusgate processing workers (one event to one worker)",
        filter_subjects=list(SUBJECTS),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=config.ack_wait,
        max_deliver=-1,  # the worker counts attempts itself (see the module docstring)
        max_ack_pending=10_000,
    )


def _percent(done: int, total: int | None) -> float | None:
    if total is None:
        return None
    if total == 0:
        return 100.0
    return round(min(done, total) * 100.0 / total, 2)


class _EventReporter:
    """The pipeline's Reporter: step results and rate-limited progress as events."""

    def __init__(self, worker: Worker, job: Job, attempt: int) -> None:
        self._worker = worker
        self._job = job
        self._attempt = attempt
        self._phase: Phase | None = None
        self._last = 0.0

    async def step_finished(self, step: str, ok: bool, detail: str | None) -> None:
        await self._worker._publish_quietly(
            ProcessingStepFinished(
                id=self._job.id, step=step, ok=ok, detail=detail, attempt=self._attempt
            )
        )

    async def progress(self, phase: Phase, done: int, total: int | None) -> None:
        now = time.monotonic()
        if phase == self._phase and now - self._last < self._worker.config.progress_interval:
            return
        self._phase, self._last = phase, now
        await self._worker._publish_quietly(
            ProcessingProgress(
                id=self._job.id,
                step=phase,
                bytes_done=done,
                bytes_total=total,
                percent=_percent(done, total),
            )
        )


class Worker:
    """Consumes processing jobs until `run`'s stop event is set (see the module docstring)."""

    def __init__(
        self,
        bus: EventBus,
        pipeline: Pipeline,
        config: WorkerConfig | None = None,
        *,
        name: str | None = None,
    ) -> None:
        self.bus = bus
        self.pipeline = pipeline
        self.config = config or WorkerConfig()
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        #: Set once the worker consumes (tests and the CLI wait for it).
        self.ready = asyncio.Event()
        self._kv: KeyValue | None = None
        self._ledger: Ledger | None = None
        self._checkpoints: KvCheckpointStore | None = None
        # The S3 store's upload records: the tombstone left when staged bytes are discarded,
        # and the info of an S3-staged upload a transfer reads.
        self._records = KvRecords(bus, replicas=self.config.replicas)
        if isinstance(pipeline.open_job_source, JobSources) and pipeline.open_job_source.records is None:
            pipeline.open_job_source.records = self._records
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: set[str] = set()
        self._stopping = False

    @property
    def ledger(self) -> Ledger:
        assert self._ledger is not None, "worker not started"
        return self._ledger

    @property
    def checkpoints(self) -> KvCheckpointStore:
        assert self._checkpoints is not None, "worker not started"
        return self._checkpoints

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; then let running jobs finish for ``stop_timeout``
        seconds, and leave the rest to other workers."""
        subscription = await self._start(stop)
        if subscription is None:
            return
        sweeping_done = asyncio.Event()
        sweeper = asyncio.create_task(self._sweep_until(sweeping_done), name="processing-sweeper")
        self.ready.set()
        log.info("processing worker %s consuming %s", self.name, ", ".join(SUBJECTS))
        try:
            await self._fetch_until(stop, subscription)
        finally:
            self._stopping = True
            await self._drain()
            await _end(sweeper, sweeping_done)
            with contextlib.suppress(*NATS_ERRORS):
                await subscription.unsubscribe()  # the durable consumer stays
            self.ready.clear()

    async def _start(self, stop: asyncio.Event) -> Any:
        """Bucket and consumer, retried until NATS answers (None if stopped first)."""
        while not stop.is_set():
            if not await self.bus.wait_stream(RETRY_PAUSE):
                continue
            try:
                self._kv = await open_bucket(self.bus.js, replicas=self.config.replicas)
                self._ledger = Ledger(self._kv)
                self._checkpoints = KvCheckpointStore(self._kv)
                return await self._subscribe()
            except NATS_ERRORS as exc:
                log.warning("processing cannot start yet (%s); retrying", exc)
                await _wait(stop, RETRY_PAUSE)
        return None

    async def _subscribe(self) -> Any:
        js = self.bus.js
        try:
            # Creates the consumer, or updates what may change (ack_wait, filters) in place.
            await js.add_consumer(STREAM_NAME, consumer_config(self.config))
        except nats.js.errors.BadRequestError as exc:
            log.warning("keeping the existing %s consumer as it is: %s", CONSUMER, exc)
        return await js.pull_subscribe_bind(durable=CONSUMER, stream=STREAM_NAME)

    async def _fetch_until(self, stop: asyncio.Event, subscription: Any) -> None:
        while not stop.is_set():
            free = self.config.concurrency - len(self._tasks)
            if free <= 0:
                await _first_of(stop.wait(), *self._tasks)
                continue
            try:
                messages = await subscription.fetch(batch=free, timeout=self.config.fetch_timeout)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except NATS_ERRORS as exc:
                log.debug("fetch failed (%s); retrying", exc)
                await _wait(stop, RETRY_PAUSE)
                with contextlib.suppress(*NATS_ERRORS):
                    subscription = await self._subscribe()
                continue
            for msg in messages:
                task = asyncio.create_task(self._handle(msg), name="processing-job")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.config.stop_timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.info("left %d unfinished jobs to other workers", len(pending))
            # nats-py swallows a cancellation in places: do not wait for ever.
            await asyncio.wait(pending, timeout=CANCEL_GRACE)

    # -- one event --------------------------------------------------------------------------

    async def _handle(self, msg: Msg) -> None:
        try:
            event = parse_event(msg.data)
            if isinstance(event, TransferCanceled):
                await self._cancel(msg, event.transfer_id)
                return
            job = job_from_event(event)
        except (InvalidEvent, ProcessingError) as exc:
            await self._poison(msg, exc)
            return
        except NATS_ERRORS as exc:
            log.warning("cancel not recorded (%s); it will be redelivered", exc)
            await _quietly(msg.nak(delay=RETRY_PAUSE))
            return
        if job.id in self._active:
            # JetStream redelivered an event this worker is still working on (heartbeats
            # were late): the running attempt decides; look again when it should be done.
            await _quietly(msg.nak(delay=self.config.ack_wait))
            return
        self._active.add(job.id)
        try:
            await self._process(msg, job)
        except NATS_ERRORS as exc:
            # NATS went away while recording or publishing: nothing was acked, so the event
            # comes back (and finds the recorded outcome, if there is one).
            log.warning(
                "%s %s: NATS unavailable (%s); it will be redelivered", job.kind, job.id, exc
            )
            await _quietly(msg.nak(delay=RETRY_PAUSE))
        except Exception:
            log.exception("%s %s: unexpected failure; it will be redelivered", job.kind, job.id)
            await _quietly(msg.nak(delay=self.config.backoff_for(1)))
        finally:
            self._active.discard(job.id)

    async def _poison(self, msg: Msg, exc: Exception) -> None:
        log.error("terminating unprocessable message on %s: %s", msg.subject, exc)
        subject = None
        with contextlib.suppress(InvalidEvent):
            subject = parse_envelope(msg.data).get("subject")
        if isinstance(subject, str) and subject:
            # The client may be waiting for this upload: tell it, rather than leave it waiting.
            await self._publish_quietly(
                ProcessingAborted(
                    id=subject,
                    code="invalid_event",
                    retryable=False,
                    message=f"the event could not be processed: {exc}",
                )
            )
        await _quietly(msg.term())

    async def _cancel(self, msg: Msg, transfer_id: str) -> None:
        """transfer.canceled: record the outcome, so that no worker starts or finishes it.

        A worker running it notices at its next heartbeat and stops (its destination deletes
        the remote session); without a live one, the recorded session is deleted here. A
        transfer that already has an outcome (delivered) is not changed.
        """
        record, _ = await self.ledger.get(transfer_id)
        if record.outcome is None:
            event = ProcessingAborted(
                id=transfer_id,
                code="canceled",
                retryable=False,
                message="the transfer was canceled",
            )
            held = record.worker is not None and record.lease_until > time.time()
            record = await self._persist(
                lambda: self.ledger.finish(transfer_id, "aborted", event.to_envelope())
            )
            if not held:
                with contextlib.suppress(Exception):
                    await self.pipeline.destination.abort(transfer_id, self.checkpoints)
            log.info("transfer %s canceled", transfer_id)
            await self._republish(record.outcome or {})
        await msg.ack()

    async def _process(self, msg: Msg, job: Job) -> None:
        try:
            record = await self.ledger.claim(job.id, self.name, lease=self.config.ack_wait)
        except Busy as busy:
            log.info(
                "%s %s is held by %s; retrying in %.1fs",
                job.kind,
                job.id,
                busy.worker,
                busy.remaining,
            )
            await msg.nak(delay=busy.remaining + 0.5)
            return
        if record.outcome is not None:
            # The worker that recorded it may have died before it scheduled the clean-up.
            await self._schedule_cleanup(record)
            await self._republish(record.outcome)
            await msg.ack()
            return
        attempt = record.attempts
        if attempt > self.config.max_deliver:
            error = record.last_error or {
                "code": "attempts_exhausted",
                "retryable": True,
                "message": f"{attempt - 1} attempts ended without a result",
            }
            await self._conclude_aborted(job, error)
            await msg.ack()
            return
        await self._publish_quietly(
            ProcessingStarted(id=job.id, kind=job.kind, attempt=attempt, worker=self.name)
        )
        outcome = await self._attempt(msg, job, attempt)
        if outcome is None:
            return  # lease lost or stopping: another worker continues
        if isinstance(outcome, PipelineResult):
            cleanup = await self._conclude_finished(job, outcome)
            await msg.ack()
            if cleanup is not None:
                await self._cleanup_now(cleanup)
            return
        failure = outcome
        if failure.retryable and attempt < self.config.max_deliver:
            delay = self.config.backoff_for(attempt)
            log.warning(
                "%s %s attempt %d failed (%s: %s); retrying in %gs",
                job.kind,
                job.id,
                attempt,
                failure.code,
                failure.message,
                delay,
            )
            await self.ledger.fail(job.id, self.name, failure.as_dict())
            await msg.nak(delay=delay)
            return
        await self._conclude_aborted(job, failure.as_dict())
        await msg.ack()

    async def _attempt(
        self, msg: Msg, job: Job, attempt: int
    ) -> PipelineResult | ProcessingError | None:
        """Run the pipeline under heartbeats; the result, the error, or None when the job was
        taken away (lease lost) or the worker is stopping."""
        cancel, lost, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()
        work = asyncio.create_task(
            self.pipeline.run(
                job,
                checkpoint=self.checkpoints,
                reporter=_EventReporter(self, job, attempt),
                cancel=cancel,
            )
        )
        heartbeat = asyncio.create_task(self._heartbeat(msg, job, work, lost, finished, cancel))
        try:
            return await work
        except asyncio.CancelledError:
            if lost.is_set():
                log.warning("%s %s was taken over by another worker", job.kind, job.id)
                return None
            work.cancel()
            # Stopping: hand the job back at once instead of after ack_wait.
            with contextlib.suppress(*NATS_ERRORS):
                await self.ledger.release(job.id, self.name)
            await _quietly(msg.nak())
            raise
        except Exception as exc:  # noqa: BLE001 - any failure is reported as an error
            return as_processing_error(exc)
        finally:
            await _end(heartbeat, finished)

    async def _heartbeat(
        self,
        msg: Msg,
        job: Job,
        work: asyncio.Task[Any],
        lost: asyncio.Event,
        finished: asyncio.Event,
        cancel: asyncio.Event,
    ) -> None:
        while not await _wait(finished, self.config.heartbeat):
            await _quietly(msg.in_progress())
            try:
                await self.ledger.renew(job.id, self.name, self.config.ack_wait)
            except LeaseLost as exc:
                if exc.outcome is not None:
                    # Canceled meanwhile: the destination stops and cleans up (deletes the
                    # upload session); the attempt then ends with the recorded outcome.
                    cancel.set()
                else:
                    lost.set()
                    work.cancel()
                return
            except NATS_ERRORS as exc:
                log.debug("lease renewal of %s failed (%s)", job.id, exc)

    # -- outcomes ---------------------------------------------------------------------------

    async def _conclude_finished(self, job: Job, result: PipelineResult) -> Cleanup | None:
        """Record and publish processing.finished; the clean-up it scheduled, if any (only
        when this outcome is the recorded one: a cancel recorded first wins)."""
        delivery = result.delivery
        event = ProcessingFinished(
            id=job.id,
            destination=result.destination,
            item_id=delivery.item_id or None,
            web_url=delivery.web_url or None,
            size=delivery.size,
            sha256=delivery.sha256,
        )
        planned = self._planned_cleanup(job, result)
        record = await self._persist(
            lambda: self.ledger.finish(job.id, "finished", event.to_envelope(), cleanup=planned)
        )
        cleanup = await self._schedule_cleanup(record)
        log.info(
            "%s %s delivered to %s (%d bytes)",
            job.kind,
            job.id,
            delivery.destination,
            delivery.size,
        )
        await self._republish(record.outcome or {})
        return cleanup

    def _planned_cleanup(self, job: Job, result: PipelineResult) -> Cleanup | None:
        """What to delete once the delivery is recorded: an upload's staged bytes (after
        ``store_retention``), or a transfer's S3 source (``delete_source``, at once)."""
        if job.delete_source and isinstance(job.transfer_source, S3Source):
            if result.source_etag is None:
                log.warning("transfer %s: source not deleted, its version is unknown", job.id)
                return None
            source = S3Storage(bucket=job.transfer_source.bucket, key=job.transfer_source.key)
            return Cleanup(job.id, source, time.time(), result.source_etag)
        if job.storage is None:
            return None
        return Cleanup(job.id, job.storage, time.time() + self.config.retention)

    async def _schedule_cleanup(self, record: JobRecord) -> Cleanup | None:
        """Write the clean-up recorded with a ``finished`` outcome (none for another one)."""
        cleanup = recorded_cleanup(record)
        if cleanup is not None:
            await self._persist(lambda: self.ledger.schedule(cleanup))
        return cleanup

    async def _conclude_aborted(self, job: Job, error: dict[str, Any]) -> None:
        event = ProcessingAborted(
            id=job.id,
            code=str(error.get("code") or "processing_failed"),
            message=str(error.get("message") or ""),
            retryable=bool(error.get("retryable")),
        )
        record = await self._persist(
            lambda: self.ledger.finish(job.id, "aborted", event.to_envelope())
        )
        log.warning("%s %s aborted: %s: %s", job.kind, job.id, event.code, event.message)
        try:
            # Nothing will resume it now: delete a remote upload session, drop the checkpoint.
            await self.pipeline.destination.abort(job.id, self.checkpoints)
        except Exception as exc:  # noqa: BLE001 - best effort: a session expires on its own
            log.info("could not clean up the delivery state of %s: %s", job.id, exc)
        await self._republish(record.outcome or {})

    async def _republish(self, outcome: dict[str, Any]) -> None:
        """Publish a recorded outcome event (again): same id, so JetStream drops a duplicate."""
        event = parse_event(outcome["envelope"])
        await self.bus.publish(event)

    async def _persist(self, write: Callable[[], Awaitable[Any]]) -> Any:
        """A ledger write that must not be lost to a short NATS hiccup: retried for ack_wait."""
        deadline = time.monotonic() + self.config.ack_wait
        while True:
            try:
                return await write()
            except NATS_ERRORS:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(RETRY_PAUSE)

    async def _publish_quietly(self, event: Event) -> None:
        """Publish a non-terminal event; losing one (NATS down) must not fail the job."""
        try:
            await self.bus.publish(event)
        except NATS_ERRORS as exc:
            log.debug("could not publish %s: %s", event.type, exc)

    # -- staged bytes -----------------------------------------------------------------------

    async def _cleanup_now(self, cleanup: Cleanup) -> None:
        if cleanup.due > time.time():
            return
        try:
            await self._clean_up(cleanup)
        except Exception as exc:  # noqa: BLE001 - the sweep tries again
            log.warning("could not clean up after %s: %s", cleanup.upload_id, exc)

    async def _clean_up(self, cleanup: Cleanup) -> None:
        """Discard staged bytes or delete a transfer's source; then forget the deadline.
        Raises when it should be tried again (the sweep does)."""
        s3_client = self.pipeline.s3_client
        if cleanup.source_etag is None:
            await discard_staged(
                cleanup.storage, cleanup.upload_id, s3_client=s3_client, records=self._records
            )
        elif isinstance(cleanup.storage, S3Storage):
            try:
                deleted = await delete_source(
                    cleanup.storage, cleanup.source_etag, s3_client=s3_client
                )
            except SourceError as exc:
                if exc.retryable:
                    raise
                # e.g. no s3:DeleteObject: asking again would not help.
                log.error("transfer %s: source not deleted: %s", cleanup.upload_id, exc.message)
            else:
                if deleted:
                    log.info("transfer %s: deleted its source", cleanup.upload_id)
        await self.ledger.cleanup_done(cleanup.upload_id)

    async def sweep(self, now: float | None = None) -> list[str]:
        """Carry out the clean-ups that are due (staged bytes whose retention is over, sources
        to delete); returns their job ids. One that fails is left for the next sweep."""
        now = time.time() if now is None else now
        done = []
        for cleanup in await self.ledger.cleanups():
            if cleanup.due > now:
                continue
            try:
                await self._clean_up(cleanup)
            except Exception as exc:  # noqa: BLE001 - the next sweep tries again
                log.warning("could not clean up after %s: %s", cleanup.upload_id, exc)
                continue
            done.append(cleanup.upload_id)
        if done:
            log.info("cleaned up after %d delivered jobs", len(done))
        return done

    async def _sweep_until(self, done: asyncio.Event) -> None:
        while not done.is_set():
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 - a failed sweep must not end the sweeper
                log.warning("cleanup sweep failed: %s", exc)
            await _wait(done, self.config.sweep_interval)


async def _quietly(call: Awaitable[Any]) -> None:
    """An ack/nak/term/in_progress: if NATS is gone, JetStream redelivers anyway."""
    try:
        await call
    except (*NATS_ERRORS, nats.errors.MsgAlreadyAckdError):
        pass


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep `seconds` or until `event` is set; whether it is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


async def _end(task: asyncio.Task[Any], done: asyncio.Event) -> None:
    """Stop a background loop: by its event (nats-py may swallow a cancellation inside a
    call), and by cancelling it (it may be waiting on NATS)."""
    done.set()
    await stop_task(task)


async def _first_of(*awaitables: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Only the stop waiter is ours to cancel; job tasks run on.
        tasks[0].cancel()
