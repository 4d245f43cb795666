"""Helpers for the worker and end-to-end tests: an event log, a worker in a task, events."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from events.bus import EventBus
from events.model import (
    Event,
    FileStorage,
    ProcessingAborted,
    ProcessingFinished,
    UploadBytesReceived,
    utcnow,
)
from gateway.settings import Settings, load_settings
from processing.cli import run_process
from processing.config import WorkerConfig, build_pipeline, worker_config
from processing.pipeline import Pipeline

__all__ = [
    "FAST_GRAPH",
    "EventLog",
    "RunningWorker",
    "bytes_received",
    "running_worker",
    "stage_upload",
    "test_settings",
    "wait_until",
]

#: OneDrive retry timing for tests: milliseconds instead of seconds.
FAST_GRAPH: dict[str, Any] = {"backoff_initial": 0.01, "backoff_max": 0.05, "request_timeout": 30.0}


def test_settings(data_dir: Path, nats_url: str, **overrides: Any) -> Settings:
    """Settings for a test system: quick heartbeats and retries."""
    base = {
        "data_dir": str(data_dir),
        "nats_url": nats_url,
        "processing_ack_wait": 3.0,
        "processing_backoff": "0.2",
        "processing_stop_timeout": 2.0,
        "store_sweep_interval": 0.2,
    }
    return load_settings(environ={}, overrides=base).replace(**overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


async def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.02)


@dataclass
class EventLog:
    """Every processing event published while it listens (a core NATS subscription)."""

    events: list[Event] = field(default_factory=list)

    async def on_event(self, event: Event) -> None:
        self.events.append(event)

    def of(self, cls: type[Event], job_id: str | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, cls) and (job_id is None or getattr(e, "id", None) == job_id)
        ]

    def outcome(self, job_id: str) -> ProcessingFinished | ProcessingAborted | None:
        found = self.of(ProcessingFinished, job_id) + self.of(ProcessingAborted, job_id)
        return found[0] if found else None

    async def wait_outcome(
        self, job_id: str, timeout: float = 20.0
    ) -> ProcessingFinished | ProcessingAborted:
        result = await wait_until(lambda: self.outcome(job_id), timeout, f"outcome of {job_id}")
        assert isinstance(result, ProcessingFinished | ProcessingAborted)
        return result


@dataclass
class RunningWorker:
    task: asyncio.Task[None]
    stop: asyncio.Event

    async def close(self) -> None:
        self.stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 20)
        except TimeoutError:
            for task in asyncio.all_tasks():  # where it hangs, for the test report
                task.print_stack(file=sys.stderr)
            raise


@contextlib.asynccontextmanager
async def running_worker(
    settings: Settings,
    *,
    pipeline: Pipeline | None = None,
    config: WorkerConfig | None = None,
    **onedrive_overrides: Any,
) -> AsyncIterator[RunningWorker]:
    """`run_process` in a task of this loop, ready when entered, stopped when left."""
    stop, ready = asyncio.Event(), asyncio.Event()
    if pipeline is None:
        overrides = onedrive_overrides or (
            FAST_GRAPH if settings.destination_kind == "onedrive" else {}
        )
        pipeline = build_pipeline(settings, **overrides)
    config = config or dataclasses.replace(worker_config(settings), fetch_timeout=0.2)
    task = asyncio.create_task(
        run_process(settings, stop, pipeline=pipeline, config=config, ready=ready)
    )
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if task.done():
        task.result()  # raise what ended it
    assert ready.is_set(), "worker did not become ready"
    worker = RunningWorker(task, stop)
    try:
        yield worker
    finally:
        await worker.close()


def stage_upload(uploads: Path, data: bytes, upload_id: str) -> FileStorage:
    """Write bytes where the filesystem store would have staged them (no gateway)."""
    uploads.mkdir(parents=True, exist_ok=True)
    path = uploads / f"{upload_id}.bin"
    path.write_bytes(data)
    return FileStorage(path=str(path))


def bytes_received(
    upload_id: str,
    storage: FileStorage,
    data: bytes,
    *,
    filename: str | None = "file.bin",
    content_type: str | None = None,
    owner: str = "alice",
    metadata: dict[str, str | None] | None = None,
) -> UploadBytesReceived:
    meta = dict(metadata or {})
    if filename is not None:
        meta.setdefault("filename", filename)
    if content_type is not None:
        meta.setdefault("filetype", content_type)
    return UploadBytesReceived(
        upload_id=upload_id,
        size=len(data),
        metadata=meta,
        owner=owner,
        storage=storage,
        checksums={"sha256": hashlib.sha256(data).hexdigest()},
        content_type=content_type,
        filename=filename,
        created_at=utcnow(),
        completed_at=utcnow(),
    )


async def event_log(bus: EventBus) -> EventLog:
    log = EventLog()
    await bus.subscribe("tusgate.processing.>", log.on_event)
    return log
