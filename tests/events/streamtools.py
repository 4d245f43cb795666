"""Reading the TUSGATE stream from the outside, message by message."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS

from events.bus import MSG_ID_HEADER, STREAM_NAME


async def stream_messages(nc: NATS) -> list[tuple[str, dict[str, Any]]]:
    """(Nats-Msg-Id, envelope) of every message in the stream, in stream order."""
    js = nc.jetstream()
    try:
        info = await js.stream_info(STREAM_NAME)
    except nats.js.errors.NotFoundError:
        return []
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(STREAM_NAME, seq)
        headers = msg.headers or {}
        assert msg.data is not None
        out.append((headers.get(MSG_ID_HEADER, ""), json.loads(msg.data)))
    return out


async def msg_id_counts(nc: NATS) -> Counter[str]:
    return Counter(msg_id for msg_id, _ in await stream_messages(nc))
