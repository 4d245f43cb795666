"""The worker's ledger in NATS KV: who works on a job, how often it was tried, how it ended.

Key ``job.<id>`` in the processing bucket (see :mod:`processing.checkpoints_kv`), a JSON object::

    {"attempts": 2,                      attempts started (crashed ones included)
     "worker": "host-123-ab12",          who holds the lease, or null
     "lease_until": 1735700000.0,        epoch seconds; renewed with every heartbeat
     "last_error": {"code", "message", "retryable"} | null,
     "outcome": {"type": "finished" | "aborted", "envelope": {...}} | null}

Every change is compare-and-set on the key's revision, so two workers never both believe they
hold a job: JetStream redelivers an event whose heartbeats stopped (``ack_wait``), and a worker
that was only slow -- not dead -- must not deliver in parallel with the one that took over.
The lease lasts as long as ``ack_wait`` and is renewed with each heartbeat; a worker killed with
``kill -9`` stops renewing, so its job is free once both the lease and ``ack_wait`` ran out.
Leases compare wall-clock times of different hosts: keep their clocks in sync (NTP).

Once ``outcome`` is set the job is done for good: a redelivered event re-publishes the recorded
outcome event instead of delivering again (exactly one delivered file per upload).

Key ``cleanup.<id>``: ``{"upload_id", "storage", "due"}``, the staged bytes to discard at
``due`` (epoch seconds) -- the retention after a successful delivery (``store_retention``).
With ``"source_etag"`` it is a transfer's S3 source to delete instead (``delete_source``; that
version of the object only); ``upload_id`` is then the transfer's id. The same object is kept
in the ``finished`` outcome (``outcome.cleanup``), written in the same update: a worker that
dies before it wrote ``cleanup.<id>`` leaves the job's redelivered event to schedule it
(:func:`recorded_cleanup`), so nothing is left behind, and nothing is deleted before the
outcome is recorded.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nats.js.errors
from nats.js.kv import KeyValue

from events.kv import keys_under
from events.model import FileStorage, S3Storage, Storage
from processing.checkpoints_kv import decode, encode, kv_key

__all__ = ["Busy", "Cleanup", "JobRecord", "LeaseLost", "Ledger", "recorded_cleanup"]

CAS_ATTEMPTS = 20


class Busy(Exception):
    """Another live worker holds the job's lease for `remaining` more seconds."""

    def __init__(self, worker: str, remaining: float) -> None:
        super().__init__(f"held by {worker} for {remaining:.1f}s")
        self.worker = worker
        self.remaining = remaining


class LeaseLost(Exception):
    """The job is no longer ours: another worker took it over (our heartbeats did not reach
    NATS in time), or it got an outcome meanwhile (`outcome`: a canceled transfer)."""

    def __init__(self, job_id: str, outcome: dict[str, Any] | None = None) -> None:
        super().__init__(job_id)
        self.outcome = outcome


@dataclass(frozen=True)
class JobRecord:
    attempts: int = 0
    worker: str | None = None
    lease_until: float = 0.0
    last_error: dict[str, Any] | None = None
    outcome: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, raw: dict[str, Any] | None) -> JobRecord:
        if raw is None:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Cleanup:
    upload_id: str
    storage: Storage
    due: float
    #: Set for a transfer's source to delete (the ETag of the version delivered).
    source_etag: str | None = None


def _cleanup_json(cleanup: Cleanup) -> dict[str, Any]:
    value: dict[str, Any] = {
        "upload_id": cleanup.upload_id,
        "storage": cleanup.storage.to_json(),
        "due": cleanup.due,
    }
    if cleanup.source_etag is not None:
        value["source_etag"] = cleanup.source_etag
    return value


def _cleanup_from(raw: Any) -> Cleanup | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("upload_id"), str):
        return None
    storage = _storage_from(raw.get("storage") or {})
    if storage is None:
        return None
    etag = raw.get("source_etag")
    return Cleanup(
        raw["upload_id"],
        storage,
        float(raw.get("due") or 0.0),
        etag if isinstance(etag, str) else None,
    )


def recorded_cleanup(record: JobRecord) -> Cleanup | None:
    """The clean-up recorded with the job's ``finished`` outcome, if any."""
    outcome = record.outcome or {}
    return _cleanup_from(outcome.get("cleanup")) if outcome.get("type") == "finished" else None


def _storage_from(raw: dict[str, Any]) -> Storage | None:
    if raw.get("kind") == "file" and isinstance(raw.get("path"), str):
        return FileStorage(path=raw["path"])
    if raw.get("kind") == "s3" and isinstance(raw.get("bucket"), str):
        return S3Storage(
            bucket=raw["bucket"], key=str(raw.get("key")), endpoint_url=raw.get("endpoint_url")
        )
    return None


class Ledger:
    """Job records and cleanup deadlines (see the module docstring)."""

    def __init__(self, kv: KeyValue, *, clock: Callable[[], float] = time.time) -> None:
        self._kv = kv
        self._clock = clock

    # -- job records ------------------------------------------------------------------------

    async def get(self, job_id: str) -> tuple[JobRecord, int | None]:
        try:
            entry = await self._kv.get(kv_key("job", job_id))
        except nats.js.errors.KeyNotFoundError:
            return JobRecord(), None
        return JobRecord.from_json(decode(entry.value)), entry.revision

    async def _change(
        self, job_id: str, change: Callable[[JobRecord], JobRecord | None]
    ) -> JobRecord:
        """Apply `change` with compare-and-set; `change` returns None to leave it as it is."""
        key = kv_key("job", job_id)
        for _ in range(CAS_ATTEMPTS):
            record, revision = await self.get(job_id)
            new = change(record)
            if new is None:
                return record
            try:
                if revision is None:
                    await self._kv.create(key, encode(new.to_json()))
                else:
                    await self._kv.update(key, encode(new.to_json()), last=revision)
                return new
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # someone else changed it in between: decide again on theirs
        raise TimeoutError(f"job {job_id}: too many concurrent ledger updates")

    async def claim(self, job_id: str, worker: str, lease: float) -> JobRecord:
        """Take the job for one attempt (``attempts`` + 1). A job with an outcome is returned
        unchanged (the caller re-publishes it); raises Busy when another worker holds it."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.outcome is not None:
                return None
            now = self._clock()
            if record.worker not in (None, worker) and record.lease_until > now:
                raise Busy(record.worker or "?", record.lease_until - now)
            return dataclasses.replace(
                record, attempts=record.attempts + 1, worker=worker, lease_until=now + lease
            )

        return await self._change(job_id, change)

    async def renew(self, job_id: str, worker: str, lease: float) -> None:
        """Extend our lease; LeaseLost if another worker has the job now."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.worker != worker or record.outcome is not None:
                raise LeaseLost(job_id, record.outcome)
            return dataclasses.replace(record, lease_until=self._clock() + lease)

        await self._change(job_id, change)

    async def fail(self, job_id: str, worker: str, error: dict[str, Any]) -> None:
        """An attempt failed (to be retried): remember the error, free the job at once."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.worker not in (None, worker):
                return None  # someone else's attempt now: theirs to record
            return dataclasses.replace(record, worker=None, lease_until=0.0, last_error=error)

        await self._change(job_id, change)

    async def release(self, job_id: str, worker: str) -> None:
        """Give the job back without a verdict (shutdown): the next worker may start at once."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.worker != worker:
                return None
            return dataclasses.replace(record, worker=None, lease_until=0.0)

        await self._change(job_id, change)

    async def finish(
        self,
        job_id: str,
        outcome_type: str,
        envelope: dict[str, Any],
        *,
        cleanup: Cleanup | None = None,
    ) -> JobRecord:
        """Record the final outcome (the envelope of processing.finished / .aborted), with
        the clean-up it calls for (see :func:`recorded_cleanup`). The first recorded outcome
        wins; the one in the returned record is the one to publish."""
        outcome: dict[str, Any] = {"type": outcome_type, "envelope": envelope}
        if cleanup is not None:
            outcome["cleanup"] = _cleanup_json(cleanup)

        def change(record: JobRecord) -> JobRecord | None:
            if record.outcome is not None:
                return None
            return dataclasses.replace(record, worker=None, lease_until=0.0, outcome=outcome)

        return await self._change(job_id, change)

    # -- cleanup deadlines ------------------------------------------------------------------

    async def schedule_cleanup(
        self, upload_id: str, storage: Storage, due: float, *, source_etag: str | None = None
    ) -> Cleanup:
        cleanup = Cleanup(upload_id, storage, due, source_etag)
        await self.schedule(cleanup)
        return cleanup

    async def schedule(self, cleanup: Cleanup) -> None:
        """Write ``cleanup.<id>`` (again: the same value, so writing it twice is harmless)."""
        await self._kv.put(kv_key("cleanup", cleanup.upload_id), encode(_cleanup_json(cleanup)))

    async def cleanups(self) -> list[Cleanup]:
        """Every scheduled cleanup, due or not."""
        found = []
        for key in await keys_under(self._kv, "cleanup."):
            try:
                entry = await self._kv.get(key)
            except nats.js.errors.KeyNotFoundError:  # done meanwhile (also a deleted key)
                continue
            cleanup = _cleanup_from(decode(entry.value))
            if cleanup is None:
                await self._kv.delete(key)  # unreadable: nothing could ever use it
                continue
            found.append(cleanup)
        return found

    async def cleanup_done(self, upload_id: str) -> None:
        try:
            await self._kv.delete(kv_key("cleanup", upload_id))
        except nats.js.errors.KeyNotFoundError:
            pass
