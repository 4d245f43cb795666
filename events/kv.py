"""NATS KV buckets, created on first use by whichever process gets there first."""

from __future__ import annotations

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

__all__ = ["TRANSIENT_ERRORS", "keys_under", "open_bucket"]

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


async def keys_under(kv: KeyValue, prefix: str) -> list[str]:
    """The keys of `kv` that start with `prefix` (a whole token, e.g. "cleanup."), sorted;
    deleted keys may be among them (their `get` raises KeyNotFoundError).

    Read from the bucket's stream (its per-subject message counts), not from a KV watch: a
    watch's "initial values done" marker is unreliable while others write to the bucket (an
    empty listing was seen), and nats-py's `keys(filters=...)` matches substrings. nats-py has
    no public accessor for the stream and subject prefix, hence the private attributes."""
    pre: str = kv._pre
    info = await kv._js.stream_info(kv._stream, subjects_filter=f"{pre}{prefix}>")
    return sorted(subject[len(pre) :] for subject in info.state.subjects or {})
