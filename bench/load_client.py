"""The benchmark's TUS client: one process, aiohttp, bodies from a pregenerated random buffer.

Run by bench/gateway_bench.py, one process per measurement, never in the server's process:

    python bench/load_client.py --endpoint URL --uploads N --size BYTES --chunk BYTES
                                --concurrency N [--creation-with-upload]

Handshake so that start-up is not measured: the client prepares its buffer and session, prints
``ready``, waits for a line on stdin, runs, and prints one JSON object with what it measured,
including its own CPU time (``client_cpu_s``): a client near one full core would be the
bottleneck, not the server.

Each upload is ``POST`` (``Upload-Length``) then ``PATCH``es of ``--chunk`` bytes in order
(a chunk of the whole size is one PATCH streamed from the buffer, so memory stays bounded), or,
with ``--creation-with-upload``, a single ``POST`` carrying the whole body. Every response is
checked (status, ``Upload-Offset``); failures are counted and the first few are reported with
the request that broke, never retried.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urljoin

import aiohttp

BUFFER_SIZE = 8 * 1024 * 1024  # random bytes, sent again and again
MAX_REPORTED_ERRORS = 5
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=600, sock_connect=10, sock_read=120)
RUN_TIMEOUT = 1800.0  # seconds for the whole workload, whatever happens


class UploadFailed(Exception):
    """A response that was not what TUS promises; the message names the request."""


@dataclass
class Stats:
    bytes_sent: int = 0
    uploads_done: int = 0
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)  # seconds per whole upload

    def failed(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_REPORTED_ERRORS:
            self.error_samples.append(message)


def body_of(buffer: bytes, size: int) -> bytes | AsyncIterator[bytes]:
    """``size`` bytes: a slice of the buffer, or a stream of it repeated for larger sizes."""
    if size <= len(buffer):
        return buffer[:size]

    async def stream() -> AsyncIterator[bytes]:
        remaining = size
        while remaining:
            piece = buffer if remaining >= len(buffer) else buffer[:remaining]
            remaining -= len(piece)
            yield piece

    return stream()


async def describe(resp: aiohttp.ClientResponse) -> str:
    body = (await resp.read())[:200].decode(errors="replace").strip()
    headers = {k: v for k, v in resp.headers.items() if k.lower().startswith(("upload", "tus"))}
    return f"{resp.method} {resp.url} -> {resp.status} {headers} {body!r}"


async def one_upload(
    session: aiohttp.ClientSession, args: argparse.Namespace, buffer: bytes, stats: Stats
) -> None:
    started = time.perf_counter()
    headers = {"Tus-Resumable": "1.0.0", "Upload-Length": str(args.size)}
    if args.prefer_async:
        headers["Prefer"] = "respond-async"
    data: bytes | AsyncIterator[bytes] | None = None
    if args.creation_with_upload:
        headers["Content-Type"] = "application/offset+octet-stream"
        headers["Content-Length"] = str(args.size)
        data = body_of(buffer, args.size)
    async with session.post(args.endpoint, headers=headers, data=data) as resp:
        stats.requests += 1
        location = resp.headers.get("Location")
        if resp.status != 201 or location is None:
            raise UploadFailed(await describe(resp))
        offset = int(resp.headers.get("Upload-Offset", "0"))
        await resp.read()
    url = urljoin(args.endpoint, location)
    if args.creation_with_upload and offset != args.size:
        raise UploadFailed(f"POST {url}: Upload-Offset {offset}, expected {args.size}")
    stats.bytes_sent += offset

    while offset < args.size:
        length = min(args.chunk, args.size - offset)
        patch_headers = {
            "Tus-Resumable": "1.0.0",
            "Upload-Offset": str(offset),
            "Content-Type": "application/offset+octet-stream",
            "Content-Length": str(length),
        }
        if args.prefer_async:
            patch_headers["Prefer"] = "respond-async"
        async with session.patch(url, headers=patch_headers, data=body_of(buffer, length)) as resp:
            stats.requests += 1
            last = offset + length == args.size
            ok = resp.status == 204 or (args.prefer_async and last and resp.status == 202)
            if not ok or resp.headers.get("Upload-Offset") != str(offset + length):
                raise UploadFailed(await describe(resp))
            await resp.read()
        offset += length
        stats.bytes_sent += length
    stats.uploads_done += 1
    stats.latencies.append(time.perf_counter() - started)


async def run(args: argparse.Namespace) -> dict[str, object]:
    buffer = os.urandom(min(BUFFER_SIZE, max(args.size, 1)))
    stats = Stats()
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(args.uploads):
            queue.put_nowait(n)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                try:
                    await one_upload(session, args, buffer, stats)
                except (TimeoutError, UploadFailed, aiohttp.ClientError) as exc:
                    stats.failed(f"{type(exc).__name__}: {exc}")

        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with asyncio.timeout(RUN_TIMEOUT):
            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - wall0
        client_cpu = time.process_time() - cpu0

    latencies = sorted(stats.latencies) or [0.0]
    return {
        "elapsed_s": elapsed,
        "bytes": stats.bytes_sent,
        "uploads": stats.uploads_done,
        "requests": stats.requests,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "client_cpu_s": client_cpu,
        "latency_p50_ms": 1000 * latencies[len(latencies) // 2],
        "latency_p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="the TUS endpoint, ending in /files/")
    parser.add_argument("--uploads", type=int, required=True)
    parser.add_argument("--size", type=int, required=True, help="bytes per upload")
    parser.add_argument("--chunk", type=int, required=True, help="bytes per PATCH")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--creation-with-upload", action="store_true")
    parser.add_argument("--prefer-async", action="store_true", help="send Prefer: respond-async")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
