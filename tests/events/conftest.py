"""Fixtures for the events tests: a connected EventBus and a plain nats-py client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from events.bus import EventBus


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[EventBus]:
    b = EventBus(nats_url, reconnect_wait=0.1)
    assert await b.start(wait=5)
    assert await b.wait_stream(5)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    """An independent plain connection, to look at the stream from the outside."""
    client = await nats.connect(nats_url)
    try:
        yield client
    finally:
        await client.close()
