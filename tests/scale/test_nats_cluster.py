"""The scaled mode on a three-node NATS JetStream cluster: losing a node loses nothing.

Two gateways connect to all three nodes (``TUSGATE_NATS_URL`` lists them) with
``TUSGATE_NATS_REPLICAS=3``. Several uploads are in flight over both gateways when the node that
leads the TUSGATE stream is killed (SIGKILL). The clients behave as TUS clients do: on an
error they ask HEAD for the offset and resume. Afterwards every upload is complete and intact,
and every upload's `upload.created` and `upload.bytes-received` are in the stream exactly once
(the outboxes delivered what waited out the fail-over; duplicates dropped by Nats-Msg-Id).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from typing import Any

import aiohttp
import nats
import nats.errors

from events.bus import STREAM_NAME
from events.natsd import NatsCluster
from tests.scale.conftest import PART, Deployment, TusClient, stream_events, wait_for

UPLOADS = 10
KiB = 1024
MiB = 1024 * KiB
CHUNK = 1 * MiB  # bytes per PATCH
PATIENCE = 30.0  # seconds an upload keeps retrying without progress before the test fails
RETRY_PAUSE = 0.25  # seconds between a failed request and the client's HEAD
#: Answers a client may see while a NATS node is lost, and then resumes after (SPEC §8: "the
#: client sees 507 or 503 and can resume later"; 409/423 while the interrupted request unwinds).
RETRYABLE = {409, 423, 503}


async def stream_leader(nats_url: str) -> tuple[str, int]:
    nc = await nats.connect(servers=nats_url.split(","), connect_timeout=2)
    try:
        info = await nc.jetstream().stream_info(STREAM_NAME)
        assert info.cluster is not None and info.cluster.leader is not None
        return info.cluster.leader, info.config.num_replicas or 1
    finally:
        await nc.close()


async def replicas_of(nats_url: str, stream: str) -> int:
    nc = await nats.connect(servers=nats_url.split(","), connect_timeout=2)
    try:
        return (await nc.jetstream().stream_info(stream)).config.num_replicas or 1
    finally:
        await nc.close()


async def test_killing_a_nats_node_during_uploads_loses_nothing(
    cluster_deployment: Deployment, nats_cluster: NatsCluster, tus: TusClient
) -> None:
    deployment = cluster_deployment
    gateways = deployment.gateways("a", "b")
    endpoints = [g.endpoint for g in gateways]
    rng = random.Random("cluster")
    sizes = [PART + rng.randrange(2 * MiB) for _ in range(UPLOADS)]
    datas = [rng.randbytes(size) for size in sizes]
    sent = 0
    kill_now = asyncio.Event()
    failures: Counter[str] = Counter()

    async def upload(i: int) -> str:
        nonlocal sent
        data = datas[i]
        uid = await tus.create(endpoints[i % 2], len(data))
        offset = 0
        give_up_at = time.monotonic() + PATIENCE
        while offset < len(data):
            endpoint = endpoints[rng.randrange(2)]
            end = min(offset + CHUNK, len(data))
            try:
                reply = await tus.patch(endpoint, uid, offset, data[offset:end])
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1
                reply = None
            if reply is not None and reply.status == 204:
                sent += reply.offset - offset
                offset = reply.offset
                give_up_at = time.monotonic() + PATIENCE
                if sent >= sum(sizes) // 3:
                    kill_now.set()
                continue
            if reply is not None:  # anything else is checked once every upload is done
                failures[str(reply.status)] += 1
            assert time.monotonic() < give_up_at, f"upload {i} stuck at {offset}: {failures}"
            await asyncio.sleep(RETRY_PAUSE)
            # A TUS client resumes from what the server says it has.
            while True:
                try:
                    offset = await tus.offset(endpoints[rng.randrange(2)], uid)
                    break
                except (aiohttp.ClientError, AssertionError) as exc:
                    failures[f"HEAD {type(exc).__name__}"] += 1
                    assert time.monotonic() < give_up_at, f"upload {i}: HEAD fails: {failures}"
                    await asyncio.sleep(RETRY_PAUSE)
        return uid

    leader, replicas = await stream_leader(deployment.nats_url)
    assert replicas == 3
    tasks = [asyncio.create_task(upload(i)) for i in range(UPLOADS)]
    await asyncio.wait_for(kill_now.wait(), 60)
    victim = next(node for node in nats_cluster.nodes if node.server_name == leader)
    victim.kill()  # SIGKILL: the stream leader goes, with uploads in flight
    print(f"killed {leader} at {time.strftime('%H:%M:%S')} after {sent} bytes")
    ids = await asyncio.wait_for(asyncio.gather(*tasks), 90)
    print(f"client-side errors: {dict(failures)}")
    unexpected = {k: n for k, n in failures.items() if k.isdigit() and int(k) not in RETRYABLE}

    for uid, data in zip(ids, datas, strict=True):
        assert await tus.offset(endpoints[0], uid) == len(data)
        assert await tus.sha256(endpoints[1], uid) == hashlib.sha256(data).hexdigest()

    async def all_events() -> list[tuple[str, dict[str, Any]]] | None:
        events = await stream_events(deployment.nats_url)
        seen = {e["subject"] for _, e in events if e["type"] == "tusgate.upload.bytes-received.v1"}
        return events if set(ids) <= seen else None

    events = await wait_for(
        all_events,
        timeout=30,
        interval=0.5,
        what="every bytes-received",
        retry_on=(nats.errors.Error,),  # the stream may still be electing its new leader
    )
    counts = Counter((e["type"], e["subject"]) for _, e in events)
    for uid in ids:
        assert counts["tusgate.upload.created.v1", uid] == 1, uid
        assert counts["tusgate.upload.bytes-received.v1", uid] == 1, uid
    new_leader, replicas = await wait_for(
        lambda: stream_leader(deployment.nats_url), timeout=10, retry_on=(nats.errors.Error,)
    )
    assert new_leader != leader and replicas == 3
    for bucket in ("KV_tusgate_locks", "KV_tusgate_status"):
        replicas = await wait_for(
            lambda b=bucket: replicas_of(deployment.nats_url, b),
            timeout=10,
            retry_on=(nats.errors.Error,),
        )
        assert replicas == 3, bucket
    # Nothing was lost. While the node was gone, clients should have been told to come back
    # (503), not that the server broke (500).
    assert not unexpected, f"answers other than {sorted(RETRYABLE)}: {unexpected}"
