"""Uploads staged in S3 (the scaled mode's store): after delivery the staged object is
discarded like a file-staged one (``store_retention`` 0), and the tombstone answers 410."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import boto3
import pytest

from tests.e2e.conftest import MakeSystem, System, sha256, wait_until

JSON = {"Content-Type": "application/json"}
MiB = 1024 * 1024


@pytest.fixture
def s3_system(s3_server: str, s3_bucket: str, make_system: MakeSystem) -> MakeSystem:
    """make_system with the S3 store on a fresh bucket, 5 MiB parts, the local destination.
    The bucket comes first: it must outlive the gateway (whose expiry sweep lists it every
    0.2 s here, while uploads run: listing reads records only and must not disturb them)."""

    async def make(**overrides: Any) -> System:
        s3 = {"s3_bucket": s3_bucket, "s3_endpoint_url": s3_server, "s3_part_size": 5 * MiB}
        return await make_system("local", store_kind="s3", **s3, **overrides)

    return make


async def download_status(system: System, path: str) -> int:
    async with system.client.get(path) as response:  # released: the body is not wanted
        return response.status


async def test_s3_staged_bytes_are_discarded_after_delivery(
    s3_server: str, s3_bucket: str, s3_system: MakeSystem
) -> None:
    system = await s3_system()
    data = os.urandom(6 * MiB + 5)  # a multipart upload of two parts
    path, response = await system.upload(data, filename="staged.bin")
    assert response.status == 204, await response.text()
    status = await system.wait_state(path, "succeeded")
    assert status["result"]["sha256"] == sha256(data)
    [delivered] = system.delivered_files()
    assert delivered.read_bytes() == data

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    try:
        for _ in range(100):
            if await download_status(system, path) == 410:
                break
            await asyncio.sleep(0.05)
        assert await download_status(system, path) == 410

        def keys() -> list[str]:
            listed = s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
            return [str(o["Key"]) for o in listed]

        # The tombstone (in the upload's NATS KV record) is written first (410 from then on),
        # the object deleted right after: nothing of the upload is left in the bucket.
        await wait_until(lambda: keys() == [], 5, "the staged object deleted")
    finally:
        s3.close()


async def test_a_transfer_of_an_upload_staged_in_s3(s3_system: MakeSystem) -> None:
    """`{"upload": id}` in scaled mode: the worker finds the upload's record in NATS KV and
    reads its object from S3 (ranged GETs)."""
    # The staged bytes outlive the upload's own delivery.
    system = await s3_system(store_retention=3600.0)
    data = os.urandom(5 * MiB + 77)
    path, response = await system.upload(data, filename="report.bin")
    assert response.status == 204, await response.text()
    upload_id = path.rsplit("/", 1)[1]
    unfinished = await system.client.post(
        "/files/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "10"}
    )
    unfinished_id = unfinished.headers["Location"].rsplit("/", 1)[1]

    async def transfer(source_id: str, target: str) -> dict[str, Any]:
        body = {"source": {"upload": source_id}, "destination": {"local": {"path": target}}}
        created = await system.client.post("/transfers", data=json.dumps(body), headers=JSON)
        assert created.status == 202, await created.text()
        transfer_id = (await created.json())["id"]
        for _ in range(400):
            view: dict[str, Any] = await (await system.client.get(f"/transfers/{transfer_id}")).json()
            if view["state"] in ("succeeded", "failed", "canceled"):
                return view
            await asyncio.sleep(0.05)
        raise AssertionError(f"transfer {transfer_id} never ended: {view}")

    copied = await transfer(upload_id, "copies/report.bin")
    assert copied["state"] == "succeeded", copied
    assert (system.settings.delivered_dir / "copies" / "report.bin").read_bytes() == data
    assert copied["result"]["sha256"] == sha256(data)
    # An unfinished upload is refused at once by the gateway, which reads the same record.
    body = {"source": {"upload": unfinished_id}, "destination": {"local": {"path": "x.bin"}}}
    refused = await system.client.post("/transfers", data=json.dumps(body), headers=JSON)
    assert refused.status == 400
    assert "not complete" in (await refused.json())["detail"]
