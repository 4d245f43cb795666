"""Uploads staged in S3 (the scaled mode's store): after delivery the staged object is
discarded like a file-staged one (``store_retention`` 0), and the tombstone answers 410."""

from __future__ import annotations

import asyncio
import os

import boto3

from tests.e2e.conftest import MakeSystem, System, sha256, wait_until


async def download_status(system: System, path: str) -> int:
    async with system.client.get(path) as response:  # released: the body is not wanted
        return response.status


async def test_s3_staged_bytes_are_discarded_after_delivery(
    s3_server: str, s3_bucket: str, make_system: MakeSystem
) -> None:
    # The bucket first: it must outlive the gateway (whose expiry sweep lists it every 0.2 s
    # here, while the upload runs: listing reads records only and must not disturb it).
    system = await make_system(
        "local",
        store_kind="s3",
        s3_bucket=s3_bucket,
        s3_endpoint_url=s3_server,
        s3_part_size=5 * 1024 * 1024,
    )
    data = os.urandom(6 * 1024 * 1024 + 5)  # a multipart upload of two parts
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
