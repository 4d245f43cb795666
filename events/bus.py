"""JetStream plumbing: the `TUSGATE` stream, and an `EventBus` that publishes and subscribes.

The bus never takes the host process down with NATS: `start()` returns even when no server is
reachable (it keeps connecting in the background, forever), publishing while disconnected
raises `BusUnavailable` at once (the outbox keeps the event and retries), and nats-py
reconnects by itself after an outage, re-creating our subscriptions.

Every publish carries ``Nats-Msg-Id: <event id>``; the stream drops a message whose id it has
already stored within its duplicate window (`DEFAULT_DUPLICATE_WINDOW`), which is what makes the
outbox's "publish, then delete the file" safe against a crash in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Literal, Self

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from events.errors import BusUnavailable, InvalidEvent, PublishError
from events.model import Event, parse_event

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DUPLICATE_WINDOW",
    "DEFAULT_MAX_AGE",
    "DEFAULT_PUBLISH_TIMEOUT",
    "DEFAULT_RECONNECT_WAIT",
    "MSG_ID_HEADER",
    "STREAM_NAME",
    "STREAM_SUBJECTS",
    "EventBus",
    "EventHandler",
    "EventSubscription",
    "ensure_stream",
    "stream_config",
]

log = logging.getLogger(__name__)

STREAM_NAME = "TUSGATE"
STREAM_SUBJECTS = ("tusgate.>",)
MSG_ID_HEADER = "Nats-Msg-Id"
# The CloudEvents NATS binding marks structured-mode messages with this content type.
CONTENT_TYPE = "application/cloudevents+json"

# Seconds JetStream remembers a Nats-Msg-Id. The default of JetStream is 2 min; 10 min also
# covers a processing redelivery (ack wait + backoff) re-publishing `<id>:finished`.
DEFAULT_DUPLICATE_WINDOW = 600.0
DEFAULT_MAX_AGE = 7 * 24 * 3600.0  # seconds events stay in the stream (limits retention)
CLOSE_TIMEOUT = 2.0  # seconds close() waits for background tasks and the connection
DEFAULT_CONNECT_TIMEOUT = 2.0  # seconds for one connection attempt
DEFAULT_RECONNECT_WAIT = 0.5  # seconds between attempts on the same server
DEFAULT_PUBLISH_TIMEOUT = 5.0  # seconds to wait for a PubAck


def stream_config(
    *,
    replicas: int = 1,
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
    max_age: float = DEFAULT_MAX_AGE,
) -> StreamConfig:
    """The configuration of the `TUSGATE` stream (SPEC §5: one stream, file storage)."""
    return StreamConfig(
        name=STREAM_NAME,
        description="tusgate events (CloudEvents 1.0 JSON), see docs/events.md",
        subjects=list(STREAM_SUBJECTS),
        retention=RetentionPolicy.LIMITS,  # many readers: processing, gateways, outsiders
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=duplicate_window,
        max_age=max_age,
    )


async def ensure_stream(
    js: JetStreamContext,
    *,
    replicas: int = 1,
    duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
    max_age: float = DEFAULT_MAX_AGE,
) -> StreamInfo:
    """Create the `TUSGATE` stream, or bring the settings we own up to date. Idempotent, and
    safe when several gateways run it at once. Other settings an operator changed are kept."""
    want = stream_config(replicas=replicas, duplicate_window=duplicate_window, max_age=max_age)
    try:
        info = await js.stream_info(STREAM_NAME)
    except nats.js.errors.NotFoundError:
        try:
            return await js.add_stream(want)
        except nats.js.errors.BadRequestError:
            # Another instance created it between our two calls; fall through to compare.
            info = await js.stream_info(STREAM_NAME)
    have = info.config
    if have.storage != StorageType.FILE:
        log.warning("stream %s uses %s storage; tusgate expects file", STREAM_NAME, have.storage)
    if (
        sorted(have.subjects or []) == sorted(STREAM_SUBJECTS)
        and have.num_replicas == replicas
        and abs((have.duplicate_window or 0) - duplicate_window) < 0.001
        and abs((have.max_age or 0) - max_age) < 0.001
    ):
        return info
    updated = dataclasses.replace(
        have,
        subjects=list(STREAM_SUBJECTS),
        num_replicas=replicas,
        duplicate_window=duplicate_window,
        max_age=max_age,
    )
    return await js.update_stream(updated)


EventHandler = Callable[[Event], Awaitable[None]]


class EventSubscription:
    """A live (core NATS) subscription made through `EventBus.subscribe`."""

    def __init__(self, bus: EventBus, subjects: tuple[str, ...], handler: EventHandler) -> None:
        self._bus = bus
        self.subjects = subjects
        self._handler = handler
        self._subs: list[Subscription] = []

    async def _attach(self, nc: NATS) -> None:
        if not self._subs:
            self._subs = [await nc.subscribe(s, cb=self._on_msg) for s in self.subjects]

    async def _on_msg(self, msg: Msg) -> None:
        # nats-py calls this sequentially per subscription, so events arrive in stream order.
        try:
            event = parse_event(msg.data)
        except InvalidEvent as exc:
            log.debug("skipping message on %s: %s", msg.subject, exc)
            return
        try:
            await self._handler(event)
        except Exception:
            log.exception("event handler failed for %s %s", event.type, event.event_id)

    async def unsubscribe(self) -> None:
        with contextlib.suppress(ValueError):
            self._bus._subscriptions.remove(self)
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


class EventBus:
    """A nats-py connection with the tusgate conventions. One per process.

    ``bus = EventBus("nats://127.0.0.1:4222"); await bus.start(wait=2)`` then `publish(event)`,
    `subscribe(subjects, handler)`, `iterate(...)`, and `close()` (or ``async with``).
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        name: str = "tusgate",
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_wait: float = DEFAULT_RECONNECT_WAIT,
        publish_timeout: float = DEFAULT_PUBLISH_TIMEOUT,
        manage_stream: bool = True,
        stream_replicas: int = 1,
        duplicate_window: float = DEFAULT_DUPLICATE_WINDOW,
        max_age: float = DEFAULT_MAX_AGE,
    ) -> None:
        """`servers`: one URL, a comma-separated list, or a sequence. With `manage_stream`
        (the default), the bus runs `ensure_stream` on every (re)connection."""
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        self.servers = list(servers)
        self.name = name
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.publish_timeout = publish_timeout
        self.manage_stream = manage_stream
        self.stream_replicas = stream_replicas
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._connect_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()
        self._stream_ready = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        self._subscriptions: list[EventSubscription] = []
        self._closed = False
        self._logged_down = False

    # -- connection --

    async def start(self, *, wait: float | None = None) -> bool:
        """Begin connecting (in the background, retried forever). Waits up to `wait` seconds
        for the first connection and returns whether it is connected; never raises because
        NATS is unreachable."""
        if self._connect_task is None:
            self._connect_task = asyncio.create_task(self._connect(), name="tusgate-nats-connect")
        if wait:
            return await self.wait_connected(wait)
        return self.connected

    async def close(self) -> None:
        self._closed = True
        task, self._connect_task = self._connect_task, None
        if task is not None and not task.done():
            task.cancel()
        pending = list(self._tasks) + ([task] if task else [])
        for t in pending:
            t.cancel()
        if pending:
            # Bounded: nats-py's connect-retry loop can swallow a cancel (Python 3.11), and a
            # shutdown must not hang on it while NATS is unreachable.
            _, stuck = await asyncio.wait(pending, timeout=CLOSE_TIMEOUT)
            for t in stuck:
                t.cancel()
                log.warning("a NATS task did not stop within %.0f s; leaving it", CLOSE_TIMEOUT)
            for t in set(pending) - stuck:
                if not t.cancelled():
                    t.exception()  # retrieved: no "exception was never retrieved" warning
        nc, self._nc, self._js = self._nc, None, None
        self._connected.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._js is not None and self._nc.is_connected

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            pass
        return self.connected

    async def wait_stream(self, timeout: float | None = None) -> bool:
        """Wait until `ensure_stream` has succeeded once (only with `manage_stream`)."""
        try:
            await asyncio.wait_for(self._stream_ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    @property
    def nc(self) -> NATS:
        """The nats-py client (for the processing worker's own consumers)."""
        if self._nc is None:
            raise BusUnavailable("NATS has not been connected yet")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusUnavailable("NATS has not been connected yet")
        return self._js

    def add_connect_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback` (synchronously, in the event loop) on every (re)connection: the
        outbox uses it to publish its backlog as soon as NATS is back."""
        self._listeners.append(callback)
        if self.connected:
            callback()

    async def _connect(self) -> None:
        nc = NATS()
        try:
            # max_reconnect_attempts=-1: nats-py retries the first connection and every later
            # reconnection forever, pausing reconnect_wait between attempts on one server.
            await nc.connect(
                servers=self.servers,
                name=self.name,
                connect_timeout=self.connect_timeout,  # type: ignore[arg-type]
                reconnect_time_wait=self.reconnect_wait,  # type: ignore[arg-type]
                max_reconnect_attempts=-1,
                allow_reconnect=True,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await nc.close()
            raise
        self._nc = nc
        self._js = nc.jetstream(timeout=self.publish_timeout)
        log.info("connected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?")
        for sub in list(self._subscriptions):
            await sub._attach(nc)
        await self._on_connected()

    async def _on_connected(self) -> None:
        self._logged_down = False
        self._connected.set()
        if self.manage_stream:
            self._spawn(self._ensure_stream_until_done())
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("NATS connect listener failed")

    async def _ensure_stream_until_done(self) -> None:
        # A fresh cluster has no JetStream leader for a moment: retry until the stream exists.
        delay = 0.05
        while not self._closed and self._js is not None:
            try:
                await ensure_stream(
                    self._js,
                    replicas=self.stream_replicas,
                    duplicate_window=self.duplicate_window,
                    max_age=self.max_age,
                )
                self._stream_ready.set()
                for callback in list(self._listeners):
                    callback()
                return
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("ensure_stream failed (%s); retrying in %.2fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_error(self, exc: Exception) -> None:
        # nats-py reports every failed attempt; say it once per outage, not every 0.5 s.
        if not self._logged_down:
            self._logged_down = True
            log.warning("NATS unavailable (%s); retrying in the background", exc or type(exc))
        else:
            log.debug("NATS error: %r", exc)

    async def _on_disconnected(self) -> None:
        self._connected.clear()
        if not self._closed:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")
        await self._on_connected()

    # -- publishing --

    async def publish(self, event: Event, *, timeout: float | None = None) -> PubAck:
        """Publish one event with its `Nats-Msg-Id` and wait for the stream's PubAck.

        Raises `BusUnavailable` (retry later) when NATS is down or does not answer in time,
        `PublishError` otherwise. `ack.duplicate` is true when the stream already had it."""
        return await self.publish_raw(
            event.nats_subject, event.to_json_bytes(), msg_id=event.msg_id, timeout=timeout
        )

    async def publish_raw(
        self, subject: str, payload: bytes, *, msg_id: str, timeout: float | None = None
    ) -> PubAck:
        """Publish an already encoded envelope (what the outbox stores)."""
        if self._js is None or self._nc is None or not self._nc.is_connected:
            raise BusUnavailable()
        headers = {MSG_ID_HEADER: msg_id, "Content-Type": CONTENT_TYPE}
        for attempt in (1, 2):
            try:
                return await self._js.publish(
                    subject, payload, timeout=timeout or self.publish_timeout, headers=headers
                )
            except nats.js.errors.NoStreamResponseError as exc:
                # No stream answered: it was never created on this server (or it is a new
                # server with an empty store). Create it and try once more.
                if attempt == 2 or not self.manage_stream:
                    raise PublishError(f"no stream for {subject}", retryable=True) from exc
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    await ensure_stream(
                        self._js,
                        replicas=self.stream_replicas,
                        duplicate_window=self.duplicate_window,
                        max_age=self.max_age,
                    )
            except (TimeoutError, nats.errors.ConnectionClosedError) as exc:
                raise BusUnavailable(f"publish to {subject} got no answer: {exc!r}") from exc
            except nats.errors.OutboundBufferLimitError as exc:
                raise BusUnavailable("NATS send buffer full while reconnecting") from exc
            except nats.errors.MaxPayloadError as exc:
                raise PublishError(f"event too large for NATS: {exc}", retryable=False) from exc
            except nats.js.errors.APIError as exc:
                # 503: JetStream not ready or no leader; anything else will not get better.
                retryable = exc.code is None or exc.code >= 500
                raise PublishError(
                    f"JetStream refused {subject}: {exc}", retryable=retryable
                ) from exc
            except nats.errors.Error as exc:
                raise PublishError(f"publish to {subject} failed: {exc!r}", retryable=True) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- subscribing --

    async def subscribe(
        self, subjects: str | Sequence[str], handler: EventHandler
    ) -> EventSubscription:
        """A live subscription: `handler` gets each event published from now on, parsed
        (messages that are not known events are skipped). Made at once when connected, or on
        the first connection; nats-py re-creates it after each reconnection. Events published
        while this process is disconnected are missed: use a JetStream consumer when that
        matters (see `iterate` and docs/events.md)."""
        subject_tuple = (subjects,) if isinstance(subjects, str) else tuple(subjects)
        sub = EventSubscription(self, subject_tuple, handler)
        self._subscriptions.append(sub)
        if self._nc is not None:
            await sub._attach(self._nc)
        return sub

    async def iterate(
        self,
        subjects: str | Sequence[str] = STREAM_SUBJECTS,
        *,
        deliver: Literal["all", "new", "last"] = "all",
        idle_heartbeat: float = 5.0,
    ) -> AsyncGenerator[Event, None]:
        """Read events from the stream through an ordered (ephemeral, in-order, gap-free)
        consumer: from the start (`all`), from now (`new`) or from the last message (`last`).
        Runs until the caller stops; wrap it in `contextlib.aclosing` so that the consumer is
        removed. Used by ``tusgate events --follow``."""
        subject_list = [subjects] if isinstance(subjects, str) else list(subjects)
        policy = {
            "all": DeliverPolicy.ALL,
            "new": DeliverPolicy.NEW,
            "last": DeliverPolicy.LAST,
        }[deliver]
        config = ConsumerConfig(deliver_policy=policy)
        if len(subject_list) > 1:
            config.filter_subjects = subject_list
        sub = await self.js.subscribe(
            subject_list[0],
            stream=STREAM_NAME,
            ordered_consumer=True,
            config=config,
            idle_heartbeat=idle_heartbeat,
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=None)
                except nats.errors.TimeoutError:
                    continue
                try:
                    yield parse_event(msg.data)
                except InvalidEvent as exc:
                    log.debug("skipping message on %s: %s", msg.subject, exc)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
