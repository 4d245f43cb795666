"""50 uploads spread at random over two gateways, finalized by two `tusgate process` workers.

Every request of every upload goes to a gateway picked at random (POST, each PATCH), with chunk
boundaries picked at random, eight uploads at a time: no instance sees all of an upload, and the
last PATCH often lands on an instance that did not create it. The workers deliver into one local
folder. Checked: every upload is intact (the delivered file's sha256), and finalized exactly
once -- one `upload.bytes-received` and one `processing.finished` each in the stream, no
`processing.aborted`, one delivered file each (a second delivery would show up as
``name (1).bin``), and the completing PATCH answered 204 (the outcome reached the instance
that took the last byte, whichever worker produced it).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.scale.conftest import PART, Deployment, TusClient, metadata, stream_events, wait_for

UPLOADS = 50
CONCURRENCY = 8
KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Plan:
    index: int
    data: bytes
    cuts: tuple[int, ...]  # PATCH boundaries, ending with len(data)
    instances: tuple[int, ...]  # gateway per request: POST, then each PATCH

    @property
    def filename(self) -> str:
        return f"upload-{self.index:02d}.bin"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def plans(seed: str) -> list[Plan]:
    rng = random.Random(seed)
    out = []
    for i in range(UPLOADS):
        if i == 0:
            size = 0  # complete at creation: the POST emits bytes-received
        elif i % 5 == 0:
            size = PART + rng.randrange(3 * MiB)  # parts, and a tail folded in at the end
        else:
            size = rng.randrange(1, 2 * MiB)
        pieces = rng.randint(1, 4) if size else 0
        inner = {rng.randrange(1, size) for _ in range(pieces - 1)} if size > 1 else set()
        cuts = [*sorted(inner), size] if size else []
        out.append(
            Plan(
                i,
                rng.randbytes(size),
                tuple(cuts),
                tuple(rng.randrange(2) for _ in range(len(cuts) + 1)),
            )
        )
    return out


async def test_fifty_uploads_over_two_gateways_each_finalized_once(
    deployment: Deployment, tus: TusClient, tmp_path: Path
) -> None:
    delivered = tmp_path / "delivered"
    processing = {"TUSGATE_PROCESSING_ENABLED": "true", "TUSGATE_PROCESSING_WAIT": "60"}
    gateways = deployment.gateways("a", "b", **processing)
    for name in ("w1", "w2"):
        deployment.worker(
            name,
            **processing,
            TUSGATE_DESTINATION_KIND="local",
            TUSGATE_DESTINATION_LOCAL_PATH=str(delivered),
            TUSGATE_DESTINATION_PATH_TEMPLATE="{filename}",
            TUSGATE_PROCESSING_ACK_WAIT="10",
        )
    endpoints = [g.endpoint for g in gateways]
    todo = plans("fifty")
    ids: dict[str, Plan] = {}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def upload(plan: Plan) -> None:
        async with gate:
            meta = metadata(filename=plan.filename, filetype="application/octet-stream")
            uid = await tus.create(
                endpoints[plan.instances[0]], len(plan.data), **{"Upload-Metadata": meta}
            )
            ids[uid] = plan
            offset = 0
            for cut, instance in zip(plan.cuts, plan.instances[1:], strict=True):
                reply = await tus.patch(endpoints[instance], uid, offset, plan.data[offset:cut])
                assert reply.status == 204, (plan.index, offset, reply.status, reply.body)
                assert reply.offset == cut
                offset = cut

    await asyncio.wait_for(asyncio.gather(*(upload(p) for p in todo)), 100)
    assert len(ids) == UPLOADS

    async def all_finished() -> list[tuple[str, dict[str, Any]]] | None:
        events = await stream_events(deployment.nats_url)
        done = {e["subject"] for _, e in events if e["type"] == "tusgate.processing.finished.v1"}
        return events if set(ids) <= done else None

    events = await wait_for(all_finished, timeout=30, interval=0.5, what="50 processing.finished")
    counts = Counter((e["type"].split(".", 1)[1], e["subject"]) for _, e in events)
    for uid, plan in ids.items():
        assert counts["upload.bytes-received.v1", uid] == 1, plan.index
        assert counts["processing.finished.v1", uid] == 1, plan.index
        assert counts["processing.aborted.v1", uid] == 0, plan.index
    finished = {
        e["subject"]: e["data"] for _, e in events if e["type"] == "tusgate.processing.finished.v1"
    }
    for uid, plan in ids.items():
        assert (finished[uid]["size"], finished[uid]["sha256"]) == (len(plan.data), plan.sha256)

    files = sorted(p for p in delivered.rglob("*") if p.is_file())
    assert [p.name for p in files] == sorted(p.filename for p in todo)  # one each, no "(1)"
    by_name = {p.filename: p for p in todo}
    for path in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == by_name[path.name].sha256
