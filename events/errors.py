"""Every error the events package raises, under one root.

    EventsError
    ├── InvalidEvent          bytes or a dict that is not a valid tusgate event (parse/validate)
    ├── PublishError          an event could not be published; `.retryable` says whether to retry
    │   └── BusUnavailable    NATS is not reachable right now (always retryable)
    ├── OutboxError           the outbox cannot accept or relay events
    │   ├── OutboxClosed      record() after close()
    │   ├── OutboxLocked      another process relays from the same outbox directory
    │   └── OutboxWriteFailed the event could not be made durable (disk full: `.errno`)
    └── NatsServerError       the embedded nats-server did not start or died

Foreign exceptions (nats-py, OSError, jsonschema) are translated at the edge with
``raise ... from exc`` so that callers only need to know this module.
"""

from __future__ import annotations

__all__ = [
    "BusUnavailable",
    "EventsError",
    "InvalidEvent",
    "NatsServerError",
    "OutboxClosed",
    "OutboxError",
    "OutboxLocked",
    "OutboxWriteFailed",
    "PublishError",
]


class EventsError(Exception):
    """Root of every error raised by the events package."""


class InvalidEvent(EventsError):
    """Not a tusgate event: bad JSON, unknown type, missing or mistyped field."""


class PublishError(EventsError):
    """Publishing failed. Retryable errors (timeouts, no stream yet) are worth another try;
    the others (payload too large, permission denied) will fail the same way again."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class BusUnavailable(PublishError):
    """NATS is down or not connected yet; the outbox keeps the event and retries."""

    def __init__(self, message: str = "NATS is not connected") -> None:
        super().__init__(message, retryable=True)


class OutboxError(EventsError):
    """The outbox cannot do what was asked."""


class OutboxClosed(OutboxError):
    """record() was called after close()."""


class OutboxLocked(OutboxError):
    """Another process already relays from this outbox directory (one directory per process)."""


class NatsServerError(EventsError):
    """The embedded nats-server failed to start, or is not running when it should be."""


class OutboxWriteFailed(OutboxError):
    """Writing the event to disk failed. `errno` is ENOSPC/EDQUOT on a full disk (the gateway
    answers 507), something else for other I/O errors (503)."""

    def __init__(self, message: str, *, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno
