"""The client-side commands: `tusgate upload`, `tusgate status`, `tusgate events`.

`upload` is tuspy with a progress bar: it remembers each file's upload URL (in
`~/.tusgate/uploads.json`, keyed by tuspy's fingerprint of the file) so that running it again
after an interruption resumes instead of starting over; then it follows the upload's
`Progress-Location` until processing ends, and exits non-zero when it failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

__all__ = ["follow_progress", "print_events", "show_status", "upload_file"]

DEFAULT_URL = "http://127.0.0.1:1080/files/"
RESUME_FILE = Path(os.environ.get("TUSGATE_CLIENT_STATE", Path.home() / ".tusgate" / "uploads.json"))
FAILED_STATES = {"failed", "terminated", "expired", "canceled"}


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer $TUSGATE_TOKEN` when the gateway wants tokens (auth.kind jwt).
    From the environment, not a flag: a flag would show the token in `ps`."""
    token = os.environ.get("TUSGATE_TOKEN", "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def upload_file(path: Path, *, url: str, chunk_size: int, respond_async: bool) -> int:
    """Upload (or resume) `path`; returns the process exit code."""
    from tusclient import client as tus_client
    from tusclient.exceptions import TusCommunicationError, TusUploadFailed
    from tusclient.storage.filestorage import FileStorage

    if not path.is_file():
        print(f"tusgate upload: {path} is not a file", file=sys.stderr)
        return 2
    RESUME_FILE.parent.mkdir(parents=True, exist_ok=True)
    headers = {"Prefer": "respond-async"} if respond_async else {}
    client = tus_client.TusClient(url, headers={**headers, **auth_headers()})
    storage = FileStorage(str(RESUME_FILE))
    metadata = {"filename": path.name}
    try:
        uploader = client.uploader(
            str(path), chunk_size=chunk_size, metadata=metadata, store_url=True,
            url_storage=storage, retries=3, retry_delay=1,
        )
        size = uploader.get_file_size()
        bar = tqdm(total=size, initial=uploader.offset, unit="B", unit_scale=True, desc=path.name)
        if uploader.offset:
            print(f"resuming at byte {uploader.offset}", file=sys.stderr)
        while uploader.offset < size or size == 0:
            before = uploader.offset
            uploader.upload_chunk()
            bar.update(uploader.offset - before)
            if size == 0:
                break
        bar.close()
    except (TusUploadFailed, TusCommunicationError) as exc:
        status = getattr(exc, "status_code", None)
        body = getattr(exc, "response_content", b"") or b""
        if status == 422:
            problem = json.loads(body or b"{}")
            print(f"processing failed: {problem.get('code')}: {problem.get('detail')}", file=sys.stderr)
            return 1
        print(f"tusgate upload: {exc} {body[:200]!r}", file=sys.stderr)
        return 1
    finally:
        storage.close()
    print(uploader.url)
    headers_in: dict[str, str] = uploader.request.response_headers if uploader.request else {}
    progress = headers_in.get("progress-location")
    if progress is None:
        return 0  # 204: processing finished (or is disabled) before the answer
    return asyncio.run(follow_progress(progress))


async def follow_progress(url: str) -> int:
    """Follow a Progress-Location stream to the end; 0 on succeeded, 1 otherwise."""
    last: dict[str, Any] = {}
    bar: tqdm[Any] | None = None
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with (
        aiohttp.ClientSession(timeout=timeout, headers=auth_headers()) as session,
        session.get(url) as resp,
    ):
        if resp.status != 200:
            print(f"progress: HTTP {resp.status}", file=sys.stderr)
            return 1
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            last = json.loads(line[6:])
            processing = last.get("processing") or {}
            percent = processing.get("percent")
            if percent is not None:
                if bar is None:
                    bar = tqdm(total=100, unit="%", desc="processing")
                bar.set_description(last["state"])
                bar.update(max(0.0, float(percent) - bar.n))
    if bar is not None:
        bar.close()
    state = last.get("state")
    if state == "succeeded":
        result = last.get("result") or {}
        print(json.dumps({"state": state, **result}))
        return 0
    error = last.get("error") or {}
    print(f"processing {state}: {error.get('code')}: {error.get('message')}", file=sys.stderr)
    return 1


async def show_status(upload_id: str, url: str) -> int:
    status_url = f"{url.rstrip('/')}/{upload_id}/status"
    async with (
        aiohttp.ClientSession(headers=auth_headers()) as session,
        session.get(status_url) as resp,
    ):
        body = await resp.text()
        if resp.status != 200:
            print(f"tusgate status: HTTP {resp.status}: {body.strip()}", file=sys.stderr)
            return 1
        print(json.dumps(json.loads(body), indent=2))
        return 0


async def print_events(nats_url: str, *, follow: bool, subjects: list[str]) -> int:
    """Events of the TUSGATE stream as JSON lines: all stored ones, then live ones if `follow`."""
    import nats
    from nats.js.api import ConsumerConfig, DeliverPolicy

    from events.bus import STREAM_NAME

    nc = await nats.connect(nats_url, connect_timeout=3, max_reconnect_attempts=-1 if follow else 0)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM_NAME)
        last_seq = info.state.last_seq
        if not follow and info.state.messages == 0:
            return 0
        config = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if len(subjects) > 1:
            config.filter_subjects = subjects
        sub = await js.subscribe(
            subjects[0] if len(subjects) == 1 else "tusgate.>",
            stream=STREAM_NAME, ordered_consumer=True, config=config, idle_heartbeat=2.0,
        )
        while True:
            try:
                msg = await sub.next_msg(timeout=None if follow else 2.0)
            except nats.errors.TimeoutError:
                if follow:
                    continue
                return 0
            print(msg.data.decode(), flush=True)
            if not follow and msg.metadata.sequence.stream >= last_seq:
                return 0
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


def _server_root(url: str) -> str:
    """The server's root URL from a TUS endpoint URL (http://h:p/files/ -> http://h:p)."""
    parts = url.split("/", 3)
    return "/".join(parts[:3])


def transfer_body(s3: str | None, source_url: str | None, to: str, conflict: str,
                  description: str | None, delete_source: bool) -> dict[str, Any]:
    """The POST /transfers body from the command line's words."""
    if s3:
        bucket, _, key = s3.partition("/")
        source: dict[str, Any] = {"s3": {"bucket": bucket, "key": key}}
    else:
        source = {"url": source_url}
    kind, _, path = to.partition(":")
    if kind == "onedrive":
        destination: dict[str, Any] = {"onedrive": {"path": path, "conflict": conflict}}
    else:
        destination = {"local": {"path": path}}
    body: dict[str, Any] = {"source": source, "destination": destination, "delete_source": delete_source}
    if description:
        body["description"] = description
    return body


async def transfer_command(action: str, *, url: str, transfer_id: str | None = None,
                           body: dict[str, Any] | None = None, follow: bool = False) -> int:
    root = _server_root(url)
    async with aiohttp.ClientSession(headers=auth_headers()) as session:
        if action == "create":
            async with session.post(f"{root}/transfers", json=body) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 202:
                    print(f"tusgate transfer: HTTP {resp.status}: {answer.get('detail')}", file=sys.stderr)
                    return 1
                print(json.dumps(answer, indent=2))
                progress = resp.headers["Progress-Location"]
            return await follow_progress(progress) if follow else 0
        method = "DELETE" if action == "cancel" else "GET"
        async with session.request(method, f"{root}/transfers/{transfer_id}") as resp:
            text = await resp.text()
            if resp.status >= 400:
                print(f"tusgate transfer: HTTP {resp.status}: {text.strip()}", file=sys.stderr)
                return 1
            print(json.dumps(json.loads(text), indent=2))
            return 0
