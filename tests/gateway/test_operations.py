"""Operations endpoints (SPEC §3.5): /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.settings import load_settings
from tests.gateway.conftest import ClientFactory, create_upload, patch


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing"
    return float(match.group(1))


async def test_metrics_count_requests_bytes_and_durations(client: TestClient[Any, Any]) -> None:
    path = await create_upload(client, 10)
    await patch(client, path, 0, b"12345")
    await patch(client, path, 5, b"67890")
    await patch(client, path, 0, b"x")  # 409
    text = await (await client.get("/metrics")).text()
    assert metric(text, 'tusgate_http_requests_total{method="PATCH",status="204"}') == 2
    assert metric(text, 'tusgate_http_requests_total{method="PATCH",status="409"}') == 1
    assert metric(text, 'tusgate_http_requests_total{method="POST",status="201"}') == 1
    assert metric(text, "tusgate_bytes_received_total") == 10
    assert metric(text, "tusgate_active_uploads") == 0
    assert metric(text, "tusgate_upload_duration_seconds_count") == 1


async def test_healthz_and_readyz(client: TestClient[Any, Any]) -> None:
    assert (await client.get("/healthz")).status == 200
    resp = await client.get("/readyz")
    assert resp.status == 200
    assert (await resp.json())["checks"] == {"store": "ok"}


async def test_not_ready_when_the_store_is_gone(make_client: ClientFactory, tmp_path: Path) -> None:
    client = await make_client()
    # The directory vanishes (unmounted disk); root would ignore a permission change.
    (tmp_path / "data" / "uploads").rename(tmp_path / "moved")
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["checks"]["store"].startswith("failed")


async def test_readyz_reports_nats(aiohttp_client: Any, tmp_path: Path, nats_server: Any) -> None:
    settings = load_settings(environ={}, overrides={"data_dir": str(tmp_path / "d"), "nats_url": nats_server.url})
    client = await aiohttp_client(create_app(settings))
    resp = await client.get("/readyz")
    assert (await resp.json())["checks"]["nats"] == "ok"
    text = await (await client.get("/metrics")).text()
    assert "tusgate_events_pending" in text
    nats_server.stop()
    for _ in range(100):
        resp = await client.get("/readyz")
        if resp.status == 503:
            break
        await asyncio.sleep(0.05)
    assert resp.status == 503 and (await resp.json())["checks"]["nats"] == "disconnected"
