"""Run processing workers: `run_process` for ``tusgate process`` / ``tusgate up``, and a bare
entry point, ``python -m processing.cli``, that takes its settings from the environment only
(``TUSGATE_*``; used by tests that need a worker they can ``kill -9``).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys

from events.bus import EventBus
from events.tasks import stop_task
from gateway.settings import ConfigError, Settings, load_settings
from processing.config import WorkerConfig, build_pipeline, validate_settings, worker_config
from processing.pipeline import Pipeline
from processing.worker import Worker

__all__ = ["limit_malloc_arenas", "main", "run_process"]

log = logging.getLogger("tusgate.processing")

M_ARENA_MAX = -8  # glibc's mallopt parameter number
NATS_START_WAIT = 2.0  # seconds to wait for NATS at start; then it keeps connecting


async def run_process(
    settings: Settings,
    stop: asyncio.Event,
    *,
    pipeline: Pipeline | None = None,
    config: WorkerConfig | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """One worker (``processing_concurrency`` jobs at once) until `stop` is set.

    Needs ``settings.nats_url``. Raises ConfigError (naming the key) for invalid processing
    settings before connecting to anything. `pipeline` / `config` replace what the settings
    would build (tests, benchmarks); `ready` is set once the worker consumes.
    """
    if not settings.nats_url:
        raise ConfigError("nats_url: required by process")
    validate_settings(settings)
    limit_malloc_arenas()
    config = config or worker_config(settings)
    pipeline = pipeline or build_pipeline(settings)
    bus = EventBus(
        settings.nats_url, name="tusgate-processing", stream_replicas=settings.nats_replicas
    )
    try:
        if not await bus.start(wait=NATS_START_WAIT):
            log.warning(
                "NATS at %s is not reachable yet; the worker starts when it is", settings.nats_url
            )
        worker = Worker(bus, pipeline, config)
        run = asyncio.create_task(worker.run(stop), name="processing-worker")
        if ready is not None:
            waiting = asyncio.create_task(worker.ready.wait())
            await asyncio.wait({run, waiting}, return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            if worker.ready.is_set():
                ready.set()
        await run
    finally:
        await pipeline.aclose()
        await bus.close()


def limit_malloc_arenas() -> None:
    """One glibc malloc arena for the process, unless ``MALLOC_ARENA_MAX`` says otherwise.

    glibc gives every thread that allocates an arena of its own and keeps what is freed there
    for reuse by that arena. Deliveries read fragments in worker threads (``asyncio.to_thread``),
    so each of them ends up holding a fragment's worth of freed memory: a 1 GiB delivery into
    Graph peaked at ~110 MiB RSS, with one arena at ~82 MiB, for the same CPU time
    (bench/deliver_bench.py). Process-wide, and a no-op where there is no glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass


def main() -> int:
    """``python -m processing.cli``: one worker, settings from TUSGATE_* only; prints
    ``processing worker ready`` once it consumes; SIGTERM/SIGINT stop it cleanly."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = load_settings()
        validate_settings(settings)
    except ConfigError as exc:
        print(f"tusgate: invalid configuration: {exc}", file=sys.stderr)
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        ready = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        async def announce() -> None:
            await ready.wait()
            print("processing worker ready", flush=True)

        announcer = asyncio.create_task(announce())
        try:
            await run_process(settings, stop, ready=ready)
        finally:
            await stop_task(announcer)

    try:
        asyncio.run(run())
    except ConfigError as exc:
        print(f"tusgate: invalid configuration: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
