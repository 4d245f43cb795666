"""Events: what tusgate says on NATS, and the plumbing to say it reliably.

    model    one frozen dataclass per event (CloudEvents 1.0 envelope), JSON Schemas, parsing
    bus      the TUSGATE JetStream stream, EventBus (publish with Nats-Msg-Id, subscribe)
    outbox   durable hand-over from the gateway: record before the response, relay to NATS
    waiters  the gateway's wait for processing.finished / processing.aborted (SPEC §3.2)
    natsd    an embedded nats-server (tusgate up, test fixtures)
    errors   EventsError and its children

Subscribers outside tusgate need none of this: docs/events.md describes the wire format.
"""

from events.bus import (
    MSG_ID_HEADER,
    STREAM_NAME,
    STREAM_SUBJECTS,
    EventBus,
    EventSubscription,
    ensure_stream,
)
from events.errors import (
    BusUnavailable,
    EventsError,
    InvalidEvent,
    NatsServerError,
    OutboxClosed,
    OutboxError,
    OutboxLocked,
    OutboxWriteFailed,
    PublishError,
)
from events.model import (
    EVENT_TYPES,
    Event,
    FileStorage,
    ProcessingAborted,
    ProcessingFinished,
    ProcessingProgress,
    ProcessingStarted,
    ProcessingStepFinished,
    S3Source,
    S3Storage,
    Storage,
    TransferCanceled,
    TransferRequested,
    TransferSource,
    UploadBytesReceived,
    UploadCreated,
    UploadExpired,
    UploadProgress,
    UploadSource,
    UploadTerminated,
    UrlSource,
    event_class,
    from_timestamp,
    parse_event,
    schema_for,
    utcnow,
    validate,
)
from events.natsd import EmbeddedNats, NatsCluster
from events.outbox import FileOutbox, Outbox
from events.waiters import Outcome, OutcomeWaiter, OutcomeWaiters

__all__ = [
    "EVENT_TYPES",
    "MSG_ID_HEADER",
    "STREAM_NAME",
    "STREAM_SUBJECTS",
    "BusUnavailable",
    "EmbeddedNats",
    "Event",
    "EventBus",
    "EventSubscription",
    "EventsError",
    "FileOutbox",
    "FileStorage",
    "InvalidEvent",
    "NatsCluster",
    "NatsServerError",
    "Outbox",
    "OutboxClosed",
    "OutboxError",
    "OutboxLocked",
    "OutboxWriteFailed",
    "Outcome",
    "OutcomeWaiter",
    "OutcomeWaiters",
    "ProcessingAborted",
    "ProcessingFinished",
    "ProcessingProgress",
    "ProcessingStarted",
    "ProcessingStepFinished",
    "PublishError",
    "S3Source",
    "S3Storage",
    "Storage",
    "TransferCanceled",
    "TransferRequested",
    "TransferSource",
    "UploadBytesReceived",
    "UploadCreated",
    "UploadExpired",
    "UploadProgress",
    "UploadSource",
    "UploadTerminated",
    "UrlSource",
    "ensure_stream",
    "event_class",
    "from_timestamp",
    "parse_event",
    "schema_for",
    "utcnow",
    "validate",
]
