"""Waiting for the outcome of an upload (SPEC §3.2): the final PATCH waits for
`processing.finished` (→ 204) or `processing.aborted` (→ 422), up to `processing.wait` seconds.

One `OutcomeWaiters` per gateway process holds ONE subscription (core NATS, on the finished and
aborted subjects) and hands each outcome to the asyncio futures waiting for that id. Nothing
polls. Requests cost a dict entry, not a NATS subscription.

Races, and how they are closed:

* Outcome before the waiter. The gateway should register first, then record the event::

      with waiters.expect(upload_id) as waiter:
          await outbox.record(bytes_received)
          outcome = await waiter.wait(timeout)

  As a second net, the last `recent_size` outcomes are kept for `recent_ttl` seconds, so a
  plain ``await waiters.wait(id, timeout)`` after `record` also sees an outcome that arrived
  in between.
* Outcome while this process was disconnected from NATS. A core subscription misses it, so on
  every reconnection, if anybody is waiting, the waiters replay the finished/aborted events
  stored in the stream since the oldest waiter registered (an ephemeral ordered consumer that
  lives for the replay only).

If NATS stays down, `wait` simply times out (None): the gateway answers 202 and the client
follows `Progress-Location`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from datetime import datetime, timedelta
from types import TracebackType
from typing import Self

import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from events.bus import STREAM_NAME, EventBus, EventSubscription
from events.errors import InvalidEvent
from events.model import Event, ProcessingAborted, ProcessingFinished, parse_event, utcnow
from events.tasks import stop_task

__all__ = [
    "DEFAULT_RECENT_SIZE",
    "DEFAULT_RECENT_TTL",
    "OUTCOME_SUBJECTS",
    "Outcome",
    "OutcomeWaiter",
    "OutcomeWaiters",
]

log = logging.getLogger(__name__)

Outcome = ProcessingFinished | ProcessingAborted
OUTCOME_SUBJECTS = (ProcessingFinished.event_type(), ProcessingAborted.event_type())
DEFAULT_RECENT_SIZE = 10_000  # outcomes remembered for late waiters
DEFAULT_RECENT_TTL = 300.0  # seconds an outcome is remembered
_CLOCK_MARGIN = timedelta(seconds=2)  # replay a little earlier than the oldest waiter
_REPLAY_TIMEOUT = 5.0  # seconds a replay may take before it gives up


class OutcomeWaiter:
    """One registered wait for the outcome of `id`; see `OutcomeWaiters.expect`."""

    def __init__(self, owner: OutcomeWaiters, id: str) -> None:
        self.id = id
        self.registered_at = utcnow()
        self._owner = owner
        self._future: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()

    async def wait(self, timeout: float | None) -> Outcome | None:
        """The outcome, or None after `timeout` seconds (or when the waiters are closed)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            return None

    def cancel(self) -> None:
        self._owner._unregister(self)

    def _resolve(self, outcome: Outcome | None) -> None:
        if not self._future.done():
            self._future.set_result(outcome)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cancel()


class OutcomeWaiters:
    """Dispatches `processing.finished` / `processing.aborted` to whoever waits for that id."""

    def __init__(
        self,
        bus: EventBus,
        *,
        recent_size: int = DEFAULT_RECENT_SIZE,
        recent_ttl: float = DEFAULT_RECENT_TTL,
    ) -> None:
        self._bus = bus
        self._recent_size = recent_size
        self._recent_ttl = recent_ttl
        self._recent: OrderedDict[str, tuple[float, Outcome]] = OrderedDict()
        self._waiting: dict[str, set[OutcomeWaiter]] = {}
        self._subscription: EventSubscription | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._replay_again = False

    async def start(self) -> None:
        if self._subscription is None:
            self._subscription = await self._bus.subscribe(OUTCOME_SUBJECTS, self._on_event)
            self._bus.add_connect_listener(self._on_connected)

    async def close(self) -> None:
        sub, self._subscription = self._subscription, None
        if sub is not None:
            await sub.unsubscribe()
        task, self._replay_task = self._replay_task, None
        if task is not None:
            await stop_task(task)
        # Whoever still waits gets "no outcome yet": the gateway answers 202.
        for waiters in list(self._waiting.values()):
            for waiter in list(waiters):
                waiter._resolve(None)
        self._waiting.clear()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- waiting --

    def expect(self, id: str) -> OutcomeWaiter:
        """Register interest in `id` now (before recording the event that leads to the
        outcome). Use as a context manager so the registration is always removed."""
        waiter = OutcomeWaiter(self, id)
        recent = self.recent(id)
        if recent is not None:
            waiter._resolve(recent)
        self._waiting.setdefault(id, set()).add(waiter)
        return waiter

    async def wait(self, id: str, timeout: float | None) -> Outcome | None:
        """The outcome of `id` (possibly one that arrived up to `recent_ttl` seconds ago), or
        None after `timeout` seconds."""
        with self.expect(id) as waiter:
            return await waiter.wait(timeout)

    def recent(self, id: str) -> Outcome | None:
        entry = self._recent.get(id)
        if entry is None:
            return None
        if time.monotonic() - entry[0] > self._recent_ttl:
            del self._recent[id]
            return None
        return entry[1]

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def _unregister(self, waiter: OutcomeWaiter) -> None:
        waiters = self._waiting.get(waiter.id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiting[waiter.id]

    # -- dispatching --

    async def _on_event(self, event: Event) -> None:
        self._dispatch(event)

    def _dispatch(self, event: Event) -> None:
        if not isinstance(event, ProcessingFinished | ProcessingAborted):
            return
        now = time.monotonic()
        self._recent[event.id] = (now, event)
        self._recent.move_to_end(event.id)
        while len(self._recent) > self._recent_size:
            self._recent.popitem(last=False)
        for waiter in self._waiting.get(event.id, ()):
            waiter._resolve(event)

    # -- replay after a reconnection --

    def _on_connected(self) -> None:
        # Also runs on the first connection: a waiter registered while NATS was still
        # unreachable may have missed an outcome published meanwhile by another path.
        if not self._waiting or self._subscription is None:
            return
        if self._replay_task is not None and not self._replay_task.done():
            self._replay_again = True
            return
        self._replay_task = asyncio.create_task(self._replay(), name="tusgate-outcome-replay")

    async def _replay(self) -> None:
        while True:
            self._replay_again = False
            waiters = [w for ws in self._waiting.values() for w in ws]
            if not waiters:
                return
            since = min(w.registered_at for w in waiters) - _CLOCK_MARGIN
            try:
                await asyncio.wait_for(self._replay_since(since), _REPLAY_TIMEOUT)
            except (nats.errors.Error, TimeoutError) as exc:
                log.debug("outcome replay failed: %r", exc)
            if not self._replay_again:
                return

    async def _replay_since(self, since: datetime) -> None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=since,
            filter_subjects=list(OUTCOME_SUBJECTS),
        )
        sub = await self._bus.js.subscribe(
            OUTCOME_SUBJECTS[0], stream=STREAM_NAME, ordered_consumer=True, config=config
        )
        try:
            # A push consumer starts delivering at once: what it matched is what it has
            # already pushed to us (delivered) plus what it has not yet (num_pending).
            info = await sub.consumer_info()
            delivered = info.delivered.consumer_seq if info.delivered is not None else 0
            matched = (info.num_pending or 0) + delivered
            while matched > 0:
                msg = await sub.next_msg(timeout=_REPLAY_TIMEOUT)
                with contextlib.suppress(InvalidEvent):
                    self._dispatch(parse_event(msg.data))
                if msg.metadata.num_pending == 0:
                    break
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
