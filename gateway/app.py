"""The aiohttp application: `create_app(settings)` wires store, locker, lifecycle and routes.

With `nats_url` set, the gateway talks to NATS: events go through the outbox, completing
requests wait for outcomes, and statuses come from the KV projection. Without it, it is a pure
TUS server (statuses then come from the store alone).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from events.bus import EventBus
from events.outbox import FileOutbox
from events.tasks import stop_task
from events.waiters import OutcomeWaiters
from gateway.auth import AUTH, Authenticator, auth_middleware
from gateway.cors import setup_cors
from gateway.errors import error_middleware
from gateway.events_lifecycle import EventLifecycle
from gateway.expiry import run_sweeper
from gateway.lifecycle import Lifecycle
from gateway.limits import OwnerSlots
from gateway.locks import LocalLocker
from gateway.locks_kv import KvLocker
from gateway.metrics import METRICS, Metrics, add_metrics_routes, metrics_middleware
from gateway.progress import STATUS, add_progress_routes
from gateway.settings import ConfigError, Settings
from gateway.status_store import StatusStore
from gateway.store.base import DataStore, StoreComposer
from gateway.store.filestore import FileStore
from gateway.store.kvrecords import KvRecords
from gateway.transfers import add_transfer_routes
from gateway.tus.context import TUS, TusContext
from gateway.tus.routes import add_tus_routes

__all__ = ["S3_NEEDS_NATS", "create_app", "make_store"]

log = logging.getLogger("tusgate.gateway")

# Upload-Metadata may be large (many keys); aiohttp's default field limit is 8190 bytes.
MAX_FIELD_SIZE = 64 * 1024
NATS_START_WAIT = 2.0  # seconds to wait for NATS at start; after that it connects in background
S3_NEEDS_NATS = "nats_url: required when store_kind is s3 (instances share upload records in NATS KV)"


def make_store(settings: Settings, bus: EventBus | None = None) -> DataStore:
    """The configured store. The S3 store keeps its records in NATS KV, through `bus`."""
    if settings.store_kind == "file":
        store = FileStore(settings.uploads_dir, fsync=settings.store_fsync)
        store.recover()
        return store
    from gateway.store.s3store import S3Store, make_s3_client  # boto3 only when it is used

    if bus is None:
        raise ConfigError(S3_NEEDS_NATS)
    endpoint = settings.s3_endpoint_url or None
    return S3Store(
        make_s3_client(endpoint_url=endpoint, region=settings.s3_region),
        settings.s3_bucket,
        KvRecords(bus, replicas=settings.nats_replicas),
        prefix=settings.s3_prefix,
        endpoint_url=endpoint,
        max_size=settings.server_max_size,
        part_size=settings.s3_part_size,
        buffer_limit=settings.s3_buffer_limit,
        buffer_wait=settings.server_idle_timeout,
    )


BUS: web.AppKey[EventBus | None] = web.AppKey("bus", EventBus)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive (it answers)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to take uploads: the store answers, and NATS is connected when configured."""
    checks: dict[str, str] = {}
    store = request.app[TUS].store.core
    try:
        ping = getattr(store, "ping", None)
        if ping is not None:
            await ping()
        checks["store"] = "ok"
    except Exception as exc:  # noqa: BLE001 -- any failure means "not ready", reason shown
        checks["store"] = f"failed: {type(exc).__name__}: {exc}"[:200]
    bus = request.app[BUS]
    if bus is not None:
        checks["nats"] = "ok" if bus.connected else "disconnected"
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


OPENAPI = Path(__file__).with_name("openapi.json")  # docs/openapi.json is the same file


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


def create_app(
    settings: Settings,
    *,
    store: DataStore | None = None,
    lifecycle: Lifecycle | None = None,
) -> web.Application:
    app = web.Application(
        middlewares=[metrics_middleware, error_middleware, auth_middleware],
        handler_args={
            "max_field_size": MAX_FIELD_SIZE,
            # Also ends connections that never finish sending a request head (slowloris):
            # aiohttp arms this timer when a connection opens.
            "keepalive_timeout": settings.server_idle_timeout,
        },
    )
    metrics = Metrics()
    bus = outbox = waiters = status = None
    kv_locker: KvLocker | None = None
    if settings.nats_url:
        bus = EventBus(settings.nats_url, name="tusgate-gateway", stream_replicas=settings.nats_replicas)
    if lifecycle is None and bus is not None:
        outbox = FileOutbox(settings.data_dir / "outbox", bus, fsync=settings.store_fsync)
        waiters = OutcomeWaiters(bus)
        status = StatusStore(bus, replicas=settings.nats_replicas, observe=metrics.observe_event)
        lifecycle = EventLifecycle(settings, outbox, waiters)
    if bus is not None and settings.store_kind == "s3":
        # Instances share S3 uploads, so they must share the one-writer lock too.
        kv_locker = KvLocker(bus, timeout=settings.server_lock_timeout, replicas=settings.nats_replicas)
    ctx = TusContext(
        settings=settings,
        store=StoreComposer(store or make_store(settings, bus)),
        locker=kv_locker or LocalLocker(timeout=settings.server_lock_timeout),
        lifecycle=lifecycle or Lifecycle(),
        owner_slots=OwnerSlots(settings.server_max_uploads_per_owner),
    )
    app[TUS] = ctx
    app[AUTH] = Authenticator(settings)
    app[STATUS] = status
    app[BUS] = bus
    metrics.outbox = outbox
    metrics.budget = getattr(ctx.store.core, "budget", None)  # the S3 store's part buffers
    app[METRICS] = metrics
    setup_cors(app, settings.server_cors_origins)
    add_progress_routes(app, settings.server_base_path)
    add_tus_routes(app, settings.server_base_path)
    add_transfer_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_metrics_routes(app)
    app.router.add_get("/openapi.json", openapi)

    async def events(app: web.Application) -> AsyncIterator[None]:
        if bus is None:
            yield
            return
        if not await bus.start(wait=NATS_START_WAIT):
            log.warning("NATS at %s is not reachable yet; events wait in the outbox", settings.nats_url)
        if outbox is not None and waiters is not None and status is not None:
            await outbox.start()
            await waiters.start()
            await status.start_projector()
        if kv_locker is not None:
            await kv_locker.start()
        yield
        if kv_locker is not None:
            await kv_locker.close()
        if outbox is not None and waiters is not None and status is not None:
            await status.close()
            await waiters.close()
            await outbox.close(flush_timeout=2.0)
        await bus.close()

    async def background(app: web.Application) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(run_sweeper(ctx), name="expiry-sweeper")
        yield
        for task in [sweeper, *ctx.background]:
            await stop_task(task)
        ctx.hash_executor.shutdown(wait=True)
        close_store = getattr(ctx.store.core, "close", None)  # the S3 store's thread pool
        if close_store is not None:
            close_store()

    app.cleanup_ctx.append(events)
    app.cleanup_ctx.append(background)
    return app
