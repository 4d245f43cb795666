"""The event model: envelopes, ids, schemas, tolerant parsing."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from events.errors import InvalidEvent
from events.model import (
    EVENT_TYPES,
    Event,
    ProcessingStarted,
    ProcessingStepFinished,
    UploadBytesReceived,
    UploadProgress,
    event_class,
    from_timestamp,
    parse_event,
    schema_for,
    validate,
)
from tests.events.samples import T0, VARIANTS, one_of_each

SAMPLES = one_of_each(upload_id="0123456789abcdef0123456789abcdef", transfer_id="t" * 32)
ids = [type(e).__name__ for e in SAMPLES]


def test_every_event_type_has_a_sample_and_a_schema() -> None:
    assert {type(e) for e in SAMPLES} == set(EVENT_TYPES.values())
    assert len(EVENT_TYPES) == 12
    for event_type in EVENT_TYPES:
        assert schema_for(event_type)["properties"]["type"]["const"] == event_type


@pytest.mark.parametrize("event", SAMPLES, ids=ids)
def test_envelope_is_cloudevents_and_validates(event: Event) -> None:
    envelope = json.loads(event.to_json_bytes())
    assert envelope["specversion"] == "1.0"
    assert envelope["datacontenttype"] == "application/json"
    assert envelope["type"] == event.nats_subject == f"tusgate.{event.NAME}.v1"
    assert envelope["subject"] == event.subject
    assert envelope["id"] == event.msg_id
    assert envelope["time"].endswith("Z")
    validate(envelope)


@pytest.mark.parametrize("event", SAMPLES + VARIANTS, ids=ids + ["variant"] * len(VARIANTS))
def test_round_trip(event: Event) -> None:
    assert parse_event(event.to_json_bytes(), check_schema=True) == event


@pytest.mark.parametrize("event", SAMPLES, ids=ids)
def test_schema_of_another_event_rejects_it(event: Event) -> None:
    other = next(t for t in EVENT_TYPES if t != event.type)
    with pytest.raises(InvalidEvent):
        validate(event.to_envelope(), as_type=other)


@pytest.mark.parametrize("event", SAMPLES, ids=ids)
def test_schema_and_dataclass_agree(event: Event) -> None:
    """The schema lists exactly the dataclass's data fields; required = no default."""
    data_schema = schema_for(type(event))["properties"]["data"]
    fields = {f.name: f for f in dataclasses.fields(event) if f.name in event.data_fields()}
    assert set(data_schema["properties"]) == set(fields)
    required = {
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    assert set(data_schema["required"]) == required


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda e: e["data"].pop("storage"), "missing field"),
        (lambda e: e["data"].__setitem__("size", "12"), "size as a string"),
        (lambda e: e["data"].__setitem__("size", -1), "negative size"),
        (lambda e: e["data"]["storage"].__setitem__("kind", "ftp"), "unknown storage kind"),
        (lambda e: e["data"]["checksums"].__setitem__("sha256", "XYZ"), "checksum not hex"),
        (lambda e: e.__setitem__("specversion", "0.3"), "CloudEvents version"),
        (lambda e: e.__setitem__("time", "yesterday"), "time not RFC 3339"),
        (lambda e: e.pop("subject"), "no subject"),
    ],
)
def test_invalid_envelopes_fail_validation(mutate: Any, why: str) -> None:
    envelope = SAMPLES[2].to_envelope()
    assert envelope["type"] == "tusgate.upload.bytes-received.v1"
    mutate(envelope)
    with pytest.raises(InvalidEvent):
        validate(envelope)


def test_readers_ignore_unknown_fields() -> None:
    event = SAMPLES[2]
    envelope = event.to_envelope()
    envelope["traceparent"] = "00-abc-def-01"  # a CloudEvents extension
    envelope["data"]["added_in_v1_1"] = {"anything": [1, 2]}
    envelope["data"]["storage"]["region"] = "eu-west-1"
    validate(envelope)  # schemas allow additions too: they are not breaking changes
    assert parse_event(json.dumps(envelope).encode()) == event


def test_missing_optional_field_takes_its_default() -> None:
    envelope = ProcessingStepFinished(id="u", step="sniff", ok=False).to_envelope()
    del envelope["data"]["attempt"], envelope["data"]["detail"]
    parsed = parse_event(envelope)
    assert isinstance(parsed, ProcessingStepFinished)
    assert (parsed.attempt, parsed.detail) == (1, None)


@pytest.mark.parametrize(
    "raw",
    [b"not json", b"[]", b'{"type": "tusgate.nope.v1", "data": {}}', b'{"data": {}}'],
)
def test_garbage_raises_invalid_event(raw: bytes) -> None:
    with pytest.raises(InvalidEvent):
        parse_event(raw)


def test_missing_required_data_field_raises() -> None:
    envelope = SAMPLES[2].to_envelope()
    del envelope["data"]["owner"]
    with pytest.raises(InvalidEvent, match="owner"):
        parse_event(envelope)


def test_deterministic_ids_for_once_per_upload_events() -> None:
    by_type = {type(e).__name__: e.msg_id for e in one_of_each(upload_id="U", transfer_id="T")}
    assert by_type == {
        "UploadCreated": "U:created",
        "UploadProgress": by_type["UploadProgress"],
        "UploadBytesReceived": "U:bytes-received",
        "UploadTerminated": "U:terminated",
        "UploadExpired": "U:expired",
        "ProcessingStarted": "U:started:1",
        "ProcessingStepFinished": "U:step-finished:checksum:1",
        "ProcessingProgress": by_type["ProcessingProgress"],
        "ProcessingFinished": "U:finished",
        "ProcessingAborted": "U:aborted",
        "TransferRequested": "T:requested",
        "TransferCanceled": "T:canceled",
    }
    assert ProcessingStarted(id="U", kind="upload", attempt=3, worker="w").msg_id == "U:started:3"


def test_progress_ids_are_unique_and_time_sortable() -> None:
    ids = [UploadProgress(upload_id="U", offset=i, size=None).msg_id for i in range(1000)]
    assert len(set(ids)) == 1000
    assert all(i.startswith("U:progress:") for i in ids)
    assert [i[:21] for i in ids] == sorted(i[:21] for i in ids)  # millisecond prefix sorts


def test_event_class_accepts_both_names() -> None:
    assert event_class("upload.bytes-received") is UploadBytesReceived
    assert event_class("tusgate.upload.bytes-received.v1") is UploadBytesReceived
    with pytest.raises(InvalidEvent):
        event_class("upload.bytes-received.v2")


def test_times_are_utc_rfc3339() -> None:
    event = UploadProgress(upload_id="U", offset=1, size=2, event_time=from_timestamp(0))
    assert event.to_envelope()["time"] == "1970-01-01T00:00:00.000000Z"
    assert SAMPLES[0].to_envelope()["data"]["created_at"] == "2025-01-02T03:04:05.678901Z"
    assert T0.tzinfo is not None


def test_events_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLES[1].offset = 7  # type: ignore[attr-defined]


def test_schema_for_returns_a_copy() -> None:
    schema_for("upload.created")["title"] = "changed"
    assert schema_for("upload.created")["title"] == "tusgate.upload.created.v1"


def test_only_progress_events_are_volatile() -> None:
    volatile = {cls.NAME for cls in EVENT_TYPES.values() if not cls.DURABLE}
    assert volatile == {"upload.progress", "processing.progress"}


def test_public_api_is_importable_from_the_package() -> None:
    import events

    for name in events.__all__:
        assert getattr(events, name) is not None
