"""An outside subscriber, written from docs/events.md alone, consumes tusgate's events.

The consumer below is not a copy: it is the code block of the "Consuming with nats-py" section
of docs/events.md, executed as is. If the documentation drifts from the wire format, this
test fails.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from events.bus import EventBus
from tests.events.samples import one_of_each

DOC = Path(__file__).resolve().parents[2] / "docs" / "events.md"


def documented_consumer() -> Any:
    text = DOC.read_text()
    section = text.split("## Consuming with nats-py", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(code.group(1), str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    return namespace["consume"]


def documented_subjects() -> set[str]:
    return set(re.findall(r"^\| `(tusgate\.[a-z.-]+\.v1)` \|", DOC.read_text(), re.MULTILINE))


def test_docs_list_every_subject() -> None:
    assert documented_subjects() == {e.type for e in one_of_each()}


async def test_documented_durable_consumer_gets_every_event_once_in_order(
    bus: EventBus, nats_url: str
) -> None:
    consume = documented_consumer()
    events = one_of_each()
    for event in events[:6]:
        await bus.publish(event)

    received: list[dict[str, Any]] = []
    stop = asyncio.Event()

    async def handle(event: dict[str, Any]) -> None:
        received.append(event)
        if len(received) == len(events):
            stop.set()

    task = asyncio.create_task(consume(nats_url, handle, durable="docs-test", stop=stop))
    await asyncio.sleep(0.2)
    for event in events[6:]:  # published while the consumer runs
        await bus.publish(event)
    await asyncio.wait_for(task, 10)

    assert [e["id"] for e in received] == [e.msg_id for e in events]
    for got, sent in zip(received, events, strict=True):
        assert got == sent.to_envelope()
        assert got["type"] == sent.nats_subject and got["subject"] == sent.subject

    # The durable consumer resumes after what it acknowledged: a restart sees only new events.
    later = one_of_each()[0]
    await bus.publish(later)
    received.clear()
    stop = asyncio.Event()

    async def handle_one(event: dict[str, Any]) -> None:
        received.append(event)
        stop.set()

    await asyncio.wait_for(consume(nats_url, handle_one, durable="docs-test", stop=stop), 10)
    assert [e["id"] for e in received] == [later.msg_id]
