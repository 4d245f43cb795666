"""The embedded default: uploads delivered into the local folder, with manifest and retention."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, datetime

from tests.e2e.conftest import MakeSystem, sha256


async def test_local_destination_end_to_end(make_system: MakeSystem) -> None:
    system = await make_system("local", destination_manifest=True, store_retention=1.0)
    data = os.urandom(4 * 1024 * 1024 + 1)
    path, response = await system.upload(
        data, filename="report.pdf", filetype="application/pdf", project="apollo"
    )
    assert response.status == 204, await response.text()
    day = datetime.now(UTC).date().isoformat()
    delivered = system.settings.delivered_dir / "anonymous" / day / "report.pdf"
    assert delivered.read_bytes() == data
    manifest = json.loads(delivered.with_name("report.pdf.manifest.json").read_text())
    assert manifest["sha256"] == sha256(data) and manifest["size"] == len(data)
    assert manifest["content_type"] == "application/pdf"
    assert manifest["metadata"]["project"] == "apollo"
    assert manifest["source"] == {"upload": path.rsplit("/", 1)[1]}
    status = await system.wait_state(path, "succeeded", timeout=5)
    assert status["result"]["destination"] == {"local": {"path": f"anonymous/{day}/report.pdf"}}
    # Kept for store_retention seconds, then 410 Gone.
    assert (await system.client.get(path)).status == 200
    for _ in range(100):
        if (await system.client.get(path)).status == 410:
            break
        await asyncio.sleep(0.05)
    assert (await system.client.get(path)).status == 410


async def test_empty_and_same_name_uploads(make_system: MakeSystem) -> None:
    system = await make_system("local")
    _, response = await system.upload(b"", filename="empty.txt")
    assert response.status == 201
    for content in (b"first", b"second"):
        _, response = await system.upload(content, filename="same.txt")
        assert response.status == 204
    files = {p.name: p.read_bytes() for p in system.delivered_files()}
    assert files == {"empty.txt": b"", "same.txt": b"first", "same (1).txt": b"second"}
