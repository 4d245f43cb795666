"""The tusgate events: one frozen, versioned dataclass per event type (SPEC §5).

Every event travels as a CloudEvents 1.0 structured JSON envelope::

    {"specversion": "1.0", "id": "<event id>", "source": "/tusgate/gateway",
     "type": "tusgate.upload.bytes-received.v1", "subject": "<upload or transfer id>",
     "time": "2025-01-01T12:00:00.000000Z", "datacontenttype": "application/json",
     "data": {...}}

on the NATS subject equal to its `type` (``tusgate.<name>.v<version>``). The envelope `id` is
also the `Nats-Msg-Id` header: deterministic for events that happen once per upload (e.g.
``<upload id>:bytes-received``), so that JetStream drops a re-publish; unique for the progress
events, which happen many times.

Readers ignore unknown fields (both in the envelope and in `data`): a newer producer may add
optional fields to a v1 event without breaking older readers. A change that removes or
retypes a field is a new version (`.v2`, a new class, a new subject).

The JSON Schema of each event ships in ``events/schemas/<name>.v1.json``; `validate()` checks
an envelope against it (needs the `jsonschema` package, installed with the `test` extra).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from time import time_ns
from typing import Any, ClassVar, Literal, Self

from events.errors import InvalidEvent

__all__ = [
    "DATACONTENTTYPE",
    "EVENT_TYPES",
    "SPECVERSION",
    "SUBJECT_PREFIX",
    "Event",
    "FileStorage",
    "ProcessingAborted",
    "ProcessingFinished",
    "ProcessingProgress",
    "ProcessingStarted",
    "ProcessingStepFinished",
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
    "event_class",
    "format_time",
    "from_timestamp",
    "new_unique_id",
    "parse_envelope",
    "parse_event",
    "parse_time",
    "schema_for",
    "storage_from_json",
    "utcnow",
    "validate",
]

SPECVERSION = "1.0"
DATACONTENTTYPE = "application/json"
SUBJECT_PREFIX = "tusgate"

# The envelope attributes that are dataclass fields of every event; everything else is `data`.
_ENVELOPE_FIELDS = frozenset({"event_id", "event_time", "event_source"})


# --- time --------------------------------------------------------------------------------------


def utcnow() -> datetime:
    return datetime.now(UTC)


def from_timestamp(epoch_seconds: float) -> datetime:
    """An aware UTC datetime from a POSIX timestamp (the store keeps `time.time()` floats)."""
    return datetime.fromtimestamp(epoch_seconds, UTC)


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a `Z`, e.g. ``2025-01-01T12:00:00.000000Z``."""
    if value.tzinfo is None:
        # A naive datetime is ambiguous; every producer in tusgate means UTC.
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """Parse RFC 3339 (`Z` or an offset); the result is aware and in UTC."""
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent(f"not an RFC 3339 time: {text!r}") from exc
    if value.tzinfo is None:
        raise InvalidEvent(f"time without offset: {text!r}")
    return value.astimezone(UTC)


# --- unique ids --------------------------------------------------------------------------------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_unique_id() -> str:
    """A ULID-like id: 26 Crockford base32 chars, 48-bit milliseconds then 80 random bits,
    so ids sort by creation time (handy when reading a stream by eye)."""
    value = ((time_ns() // 1_000_000) << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


# --- nested values -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FileStorage:
    """Staged bytes on a local filesystem (embedded mode)."""

    path: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": "file", "path": self.path}


@dataclass(frozen=True, kw_only=True)
class S3Storage:
    """Staged bytes in an S3 bucket (scaled mode). `endpoint_url` is set for non-AWS S3."""

    bucket: str
    key: str
    endpoint_url: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "s3", "bucket": self.bucket, "key": self.key}
        if self.endpoint_url is not None:
            out["endpoint_url"] = self.endpoint_url
        return out


Storage = FileStorage | S3Storage


def storage_from_json(raw: Any) -> Storage:
    """A Storage from its JSON form (`{"kind": "file"|"s3", ...}`, as UploadInfo.storage)."""
    kind = _get(raw, "kind", str)
    if kind == "file":
        return FileStorage(path=_get(raw, "path", str))
    if kind == "s3":
        endpoint = raw.get("endpoint_url")
        return S3Storage(
            bucket=_get(raw, "bucket", str),
            key=_get(raw, "key", str),
            endpoint_url=endpoint if isinstance(endpoint, str) else None,
        )
    raise InvalidEvent(f"unknown storage kind {kind!r}")


@dataclass(frozen=True, kw_only=True)
class S3Source:
    """Transfer source ``{"s3": {"bucket": ..., "key": ...}}``."""

    bucket: str
    key: str

    def to_json(self) -> dict[str, Any]:
        return {"s3": {"bucket": self.bucket, "key": self.key}}


@dataclass(frozen=True, kw_only=True)
class UrlSource:
    """Transfer source ``{"url": "https://..."}``."""

    url: str

    def to_json(self) -> dict[str, Any]:
        return {"url": self.url}


@dataclass(frozen=True, kw_only=True)
class UploadSource:
    """Transfer source ``{"upload": "<upload id>"}``: a finished TUS upload of this gateway."""

    upload_id: str

    def to_json(self) -> dict[str, Any]:
        return {"upload": self.upload_id}


TransferSource = S3Source | UrlSource | UploadSource


def _source_from_json(raw: Any) -> TransferSource:
    if not isinstance(raw, dict):
        raise InvalidEvent("transfer source must be an object")
    if "s3" in raw:
        s3 = raw["s3"]
        return S3Source(bucket=_get(s3, "bucket", str), key=_get(s3, "key", str))
    if "url" in raw:
        return UrlSource(url=_get(raw, "url", str))
    if "upload" in raw:
        return UploadSource(upload_id=_get(raw, "upload", str))
    raise InvalidEvent(f"unknown transfer source {sorted(raw)!r}")


def _get(raw: Any, key: str, kind: type) -> Any:
    if not isinstance(raw, dict) or not isinstance(raw.get(key), kind):
        raise InvalidEvent(f"missing or mistyped field {key!r}")
    return raw[key]


# --- the base event ----------------------------------------------------------------------------

# How a `data` value becomes a field value, by the field's (resolved) type hint. Plain JSON
# values (str, int, bool, dict, list) need no conversion and are not listed.
_DECODERS: dict[Any, Callable[[Any], Any]] = {
    datetime: parse_time,
    datetime | None: lambda raw: None if raw is None else parse_time(raw),
    Storage: storage_from_json,
    TransferSource: _source_from_json,
    tuple[str, ...]: tuple,
}


def _encode(value: Any) -> Any:
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, FileStorage | S3Storage | S3Source | UrlSource | UploadSource):
        return value.to_json()
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of every event. Subclasses declare their `data` fields and four class constants.

    The envelope attributes are the fields `event_id`, `event_time` and `event_source` (prefixed,
    because `source` is also a data field of transfer.requested). They have defaults: the id is
    derived (see `default_event_id`), the time is now, the source is the producing component.
    Pass them explicitly only to rebuild a received event.
    """

    NAME: ClassVar[str] = ""  # e.g. "upload.created"
    VERSION: ClassVar[int] = 1
    DEFAULT_SOURCE: ClassVar[str] = "/tusgate"
    SUBJECT_FIELD: ClassVar[str] = ""  # the data field that is the CloudEvents `subject`
    # Suffix of the deterministic id "<subject>:<suffix>" of a once-per-upload event; None for
    # events that happen many times (they get a unique id instead).
    ONCE_SUFFIX: ClassVar[str | None] = None
    # Whether losing the event in a crash would lose information. Progress events are
    # superseded by the next one within a second, so the outbox keeps them in memory only.
    DURABLE: ClassVar[bool] = True

    event_id: str = ""
    event_time: datetime = field(default_factory=utcnow)
    event_source: str = ""

    def __post_init__(self) -> None:
        # Frozen dataclasses may only set derived defaults through object.__setattr__.
        if not self.event_id:
            object.__setattr__(self, "event_id", self.default_event_id())
        if not self.event_source:
            object.__setattr__(self, "event_source", self.DEFAULT_SOURCE)

    # -- names --

    @classmethod
    def event_type(cls) -> str:
        """The CloudEvents `type`, equal to the NATS subject: ``tusgate.<name>.v<version>``."""
        return f"{SUBJECT_PREFIX}.{cls.NAME}.v{cls.VERSION}"

    @property
    def type(self) -> str:
        return self.event_type()

    @property
    def nats_subject(self) -> str:
        return self.event_type()

    @property
    def subject(self) -> str:
        """The CloudEvents `subject`: the upload or transfer id this event is about."""
        value = getattr(self, self.SUBJECT_FIELD)
        assert isinstance(value, str)
        return value

    @property
    def msg_id(self) -> str:
        """The `Nats-Msg-Id` header: the envelope id."""
        return self.event_id

    def default_event_id(self) -> str:
        if self.ONCE_SUFFIX is None:
            return f"{self.subject}:{self.NAME.rsplit('.', 1)[-1]}:{new_unique_id()}"
        return f"{self.subject}:{self.ONCE_SUFFIX}"

    # -- encoding --

    @classmethod
    def data_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _ENVELOPE_FIELDS)

    def data(self) -> dict[str, Any]:
        return {name: _encode(getattr(self, name)) for name in self.data_fields()}

    def to_envelope(self) -> dict[str, Any]:
        return {
            "specversion": SPECVERSION,
            "id": self.event_id,
            "source": self.event_source,
            "type": self.type,
            "subject": self.subject,
            "time": format_time(self.event_time),
            "datacontenttype": DATACONTENTTYPE,
            "data": self.data(),
        }

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_envelope(), separators=(",", ":"), ensure_ascii=False).encode()

    # -- decoding --

    @classmethod
    def from_envelope(cls, envelope: Mapping[str, Any]) -> Self:
        """Rebuild an event of this class from an envelope dict; unknown fields are ignored."""
        data = envelope.get("data")
        if not isinstance(data, dict):
            raise InvalidEvent("envelope has no data object")
        hints = _type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in _ENVELOPE_FIELDS:
                continue
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise InvalidEvent(f"{cls.event_type()}: data.{f.name} is missing")
                continue  # optional field added after the sender was built: keep the default
            decode = _DECODERS.get(hints[f.name])
            values[f.name] = decode(data[f.name]) if decode else data[f.name]
        event_id = envelope.get("id")
        source = envelope.get("source")
        time = envelope.get("time")
        if not isinstance(event_id, str) or not isinstance(source, str):
            raise InvalidEvent("envelope id and source must be strings")
        if not isinstance(time, str):
            raise InvalidEvent("envelope time must be an RFC 3339 string")
        try:
            return cls(
                event_id=event_id, event_source=source, event_time=parse_time(time), **values
            )
        except TypeError as exc:
            raise InvalidEvent(f"{cls.event_type()}: {exc}") from exc


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


# --- the events --------------------------------------------------------------------------------

_GATEWAY = "/tusgate/gateway"
_PROCESSING = "/tusgate/processing"


@dataclass(frozen=True, kw_only=True)
class UploadCreated(Event):
    """A TUS upload was created (POST /files/)."""

    NAME: ClassVar[str] = "upload.created"
    DEFAULT_SOURCE: ClassVar[str] = _GATEWAY
    SUBJECT_FIELD: ClassVar[str] = "upload_id"
    ONCE_SUFFIX: ClassVar[str | None] = "created"

    upload_id: str
    size: int | None  # None while the length is deferred
    metadata: dict[str, str | None]  # decoded Upload-Metadata; a key without value is None
    owner: str
    is_partial: bool
    is_final: bool
    partial_uploads: tuple[str, ...]  # the parts of a final (concatenated) upload, in order
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True, kw_only=True)
class UploadProgress(Event):
    """Bytes arrived for an upload. Rate-limited by the producer to at most 1/s per upload."""

    NAME: ClassVar[str] = "upload.progress"
    DEFAULT_SOURCE: ClassVar[str] = _GATEWAY
    SUBJECT_FIELD: ClassVar[str] = "upload_id"
    DURABLE: ClassVar[bool] = False

    upload_id: str
    offset: int
    size: int | None
    bytes_per_second: float | None = None


@dataclass(frozen=True, kw_only=True)
class UploadBytesReceived(Event):
    """The last byte of an upload arrived. Carries everything processing needs (SPEC §5)."""

    NAME: ClassVar[str] = "upload.bytes-received"
    DEFAULT_SOURCE: ClassVar[str] = _GATEWAY
    SUBJECT_FIELD: ClassVar[str] = "upload_id"
    ONCE_SUFFIX: ClassVar[str | None] = "bytes-received"

    upload_id: str
    size: int
    metadata: dict[str, str | None]
    owner: str
    storage: Storage
    checksums: dict[str, str]  # algorithm → lowercase hex, computed while receiving
    content_type: str | None  # as declared by the client (metadata `filetype`), not sniffed
    filename: str | None  # metadata `filename`
    created_at: datetime
    completed_at: datetime


@dataclass(frozen=True, kw_only=True)
class UploadTerminated(Event):
    """The client deleted the upload (TUS termination)."""

    NAME: ClassVar[str] = "upload.terminated"
    DEFAULT_SOURCE: ClassVar[str] = _GATEWAY
    SUBJECT_FIELD: ClassVar[str] = "upload_id"
    ONCE_SUFFIX: ClassVar[str | None] = "terminated"

    upload_id: str
    at: datetime


@dataclass(frozen=True, kw_only=True)
class UploadExpired(Event):
    """An unfinished upload passed its `Upload-Expires` and was removed."""

    NAME: ClassVar[str] = "upload.expired"
    DEFAULT_SOURCE: ClassVar[str] = _GATEWAY
    SUBJECT_FIELD: ClassVar[str] = "upload_id"
    ONCE_SUFFIX: ClassVar[str | None] = "expired"

    upload_id: str
    at: datetime


@dataclass(frozen=True, kw_only=True)
class ProcessingStarted(Event):
    """A worker began attempt number `attempt` (1-based) on an upload or transfer."""

    NAME: ClassVar[str] = "processing.started"
    DEFAULT_SOURCE: ClassVar[str] = _PROCESSING
    SUBJECT_FIELD: ClassVar[str] = "id"

    id: str
    kind: Literal["upload", "transfer"]
    attempt: int
    worker: str

    def default_event_id(self) -> str:
        return f"{self.id}:started:{self.attempt}"


@dataclass(frozen=True, kw_only=True)
class ProcessingStepFinished(Event):
    """One pipeline step (size, sniff, checksum, hook, deliver, cleanup...) ended."""

    NAME: ClassVar[str] = "processing.step-finished"
    DEFAULT_SOURCE: ClassVar[str] = _PROCESSING
    SUBJECT_FIELD: ClassVar[str] = "id"

    id: str
    step: str
    ok: bool
    detail: str | None = None
    # Part of the id so that a retried attempt's step result is not dropped as a duplicate.
    attempt: int = 1

    def default_event_id(self) -> str:
        return f"{self.id}:step-finished:{self.step}:{self.attempt}"


@dataclass(frozen=True, kw_only=True)
class ProcessingProgress(Event):
    """Progress of the processing (`processing`) or delivery (`finalizing`) of an upload."""

    NAME: ClassVar[str] = "processing.progress"
    DEFAULT_SOURCE: ClassVar[str] = _PROCESSING
    SUBJECT_FIELD: ClassVar[str] = "id"
    DURABLE: ClassVar[bool] = False

    id: str
    step: Literal["processing", "finalizing"]
    bytes_done: int
    bytes_total: int | None
    percent: float | None  # 0..100, None when the total is unknown


@dataclass(frozen=True, kw_only=True)
class ProcessingFinished(Event):
    """The upload or transfer was delivered. Terminal: the gateway answers 204/201."""

    NAME: ClassVar[str] = "processing.finished"
    DEFAULT_SOURCE: ClassVar[str] = _PROCESSING
    SUBJECT_FIELD: ClassVar[str] = "id"
    ONCE_SUFFIX: ClassVar[str | None] = "finished"

    id: str
    # Where the file landed, in the shape of a transfer destination with the final path,
    # e.g. {"onedrive": {"drive": "b!x", "path": "/a/b.pdf"}} or {"local": {"path": "/d/b.pdf"}}.
    destination: dict[str, Any]
    item_id: str | None  # the destination's id of the file (Graph driveItem id)
    web_url: str | None
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class ProcessingAborted(Event):
    """Processing gave up. Terminal: the gateway answers 422 with `code` and `message`."""

    NAME: ClassVar[str] = "processing.aborted"
    DEFAULT_SOURCE: ClassVar[str] = _PROCESSING
    SUBJECT_FIELD: ClassVar[str] = "id"
    ONCE_SUFFIX: ClassVar[str | None] = "aborted"

    id: str
    code: str  # stable machine-readable reason, e.g. "checksum_mismatch", "too_large"
    message: str
    retryable: bool  # whether the same input could succeed later (e.g. destination was down)


@dataclass(frozen=True, kw_only=True)
class TransferRequested(Event):
    """A server-side transfer was requested (POST /transfers)."""

    NAME: ClassVar[str] = "transfer.requested"
    DEFAULT_SOURCE: ClassVar[str] = _GATEWAY
    SUBJECT_FIELD: ClassVar[str] = "transfer_id"
    ONCE_SUFFIX: ClassVar[str | None] = "requested"

    transfer_id: str
    source: TransferSource
    destination: dict[str, Any]  # {"onedrive": {"drive", "path", "conflict"}} | {"local": ...}
    owner: str
    description: str | None = None
    delete_source: bool = False


@dataclass(frozen=True, kw_only=True)
class TransferCanceled(Event):
    """A transfer was canceled (DELETE /transfers/{id})."""

    NAME: ClassVar[str] = "transfer.canceled"
    DEFAULT_SOURCE: ClassVar[str] = _GATEWAY
    SUBJECT_FIELD: ClassVar[str] = "transfer_id"
    ONCE_SUFFIX: ClassVar[str | None] = "canceled"

    transfer_id: str
    at: datetime


# --- registry, parsing, schemas ----------------------------------------------------------------

_ALL: tuple[type[Event], ...] = (
    UploadCreated,
    UploadProgress,
    UploadBytesReceived,
    UploadTerminated,
    UploadExpired,
    ProcessingStarted,
    ProcessingStepFinished,
    ProcessingProgress,
    ProcessingFinished,
    ProcessingAborted,
    TransferRequested,
    TransferCanceled,
)

# CloudEvents `type` (= NATS subject) → class.
EVENT_TYPES: Mapping[str, type[Event]] = types.MappingProxyType(
    {cls.event_type(): cls for cls in _ALL}
)
_BY_NAME: Mapping[str, type[Event]] = {cls.NAME: cls for cls in _ALL}


def event_class(type_or_name: str) -> type[Event]:
    """The class for ``tusgate.upload.created.v1`` or its short name ``upload.created``."""
    cls = EVENT_TYPES.get(type_or_name) or _BY_NAME.get(type_or_name)
    if cls is None:
        raise InvalidEvent(f"unknown event type {type_or_name!r}")
    return cls


def parse_envelope(raw: bytes | str) -> dict[str, Any]:
    """JSON-decode a message body into an envelope dict (no schema check)."""
    try:
        envelope = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidEvent(f"not JSON: {exc}") from exc
    if not isinstance(envelope, dict):
        raise InvalidEvent("an event envelope must be a JSON object")
    return envelope


def parse_event(raw: bytes | str | Mapping[str, Any], *, check_schema: bool = False) -> Event:
    """Decode a message body (or an already decoded envelope) into its event dataclass.

    Dispatches on the envelope `type`; unknown fields are ignored, an unknown type raises
    `InvalidEvent` (a subscriber on ``tusgate.>`` should skip those: they are newer events).
    With `check_schema`, the envelope is first validated against the shipped JSON Schema.
    """
    envelope = dict(raw) if isinstance(raw, Mapping) else parse_envelope(raw)
    event_type = envelope.get("type")
    if not isinstance(event_type, str):
        raise InvalidEvent("envelope has no type")
    if check_schema:
        validate(envelope)
    return event_class(event_type).from_envelope(envelope)


@cache
def _load_schema(event_type: str) -> dict[str, Any]:
    cls = event_class(event_type)
    name = f"{cls.NAME}.v{cls.VERSION}.json"
    text = resources.files("events").joinpath("schemas", name).read_text(encoding="utf-8")
    schema = json.loads(text)
    assert isinstance(schema, dict)
    return schema


def schema_for(event_type: str | type[Event]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one event type, envelope included. A fresh copy."""
    key = event_type.event_type() if isinstance(event_type, type) else event_type
    return json.loads(json.dumps(_load_schema(event_class(key).event_type())))  # type: ignore[no-any-return]


@cache
def _validator(event_type: str) -> Any:
    try:
        import jsonschema
    except ImportError as exc:  # pragma: no cover - jsonschema comes with the test extra
        raise RuntimeError("validate() needs the jsonschema package") from exc
    return jsonschema.Draft202012Validator(
        _load_schema(event_type), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def validate(envelope: Mapping[str, Any], *, as_type: str | None = None) -> None:
    """Check an envelope dict against the schema of its `type` (or of `as_type`, to check it
    is *not* another event); raise `InvalidEvent` with the first problem if it does not fit."""
    event_type = as_type or envelope.get("type")
    if not isinstance(event_type, str):
        raise InvalidEvent("envelope has no type")
    cls = event_class(event_type)
    validator = _validator(cls.event_type())
    errors = sorted(validator.iter_errors(dict(envelope)), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(envelope)"
        raise InvalidEvent(f"{event_type}: {where}: {first.message}")
