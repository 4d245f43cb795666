"""NATS KV buckets, created on first use by whichever process gets there first."""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

__all__ = ["TRANSIENT_ERRORS", "open_bucket"]

# Errors that mean "NATS cannot answer right now" (a replicated bucket electing its leader after
# creation or after losing a node, a reconnect under way), not "the answer is no": worth a retry.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.errors.ConnectionClosedError,
)


async def open_bucket(
    js: JetStreamContext, name: str, *, ttl: float, replicas: int = 1, history: int = 1
) -> KeyValue:
    """The bucket `name`, created with these settings if it does not exist yet. Safe when
    several instances race to create it: the losers open the winner's."""
    try:
        return await js.key_value(name)
    except nats.js.errors.BucketNotFoundError:
        pass
    config = KeyValueConfig(bucket=name, history=history, ttl=ttl, replicas=replicas)
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:
        return await js.key_value(name)  # another instance created it a moment ago
