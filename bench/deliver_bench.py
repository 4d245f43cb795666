"""Delivery benchmark: a staged 1 GiB upload delivered by a processing worker, against `cp`.

    .venv/bin/python bench/deliver_bench.py                       # 1 GiB, 3 rounds: ~2 min
    .venv/bin/python bench/deliver_bench.py --size-mib 256 --rounds 1 --targets local

What runs, each a process of its own, on loopback:
  nats     an embedded nats-server (events.natsd)
  graph    the Graph-compatible test server (python -m tests.graph_server), for `graph`
  worker   python -m processing.cli with TUSGATE_* settings (destination onedrive or local)
and this harness, which stages one upload in a filesystem store (as the gateway would: .bin and
.info in <data>/uploads), publishes its `upload.bytes-received`, and waits for
`processing.finished`.

Measured per round, the same file on the same disk, interleaved:
  cp         `cp staged copy` (coreutils; page cache, no fsync)
  cp+sync    `cp staged copy && sync` (the copy made durable, as the local destination does)
  graph      event published → processing.finished, OneDrive destination into the test server
             (10 MiB fragments, the default), which stores every fragment on the same disk
  local      the same into the local folder (fsync, then atomic rename: the destination's
             guarantee)
MB/s is 10^6 bytes per second of wall time. The worker's peak RSS is VmHWM of its process at
the end of a delivery (each target gets a fresh worker). CPU-s/GiB is user + system time of
the worker process (of `cp` and `sync`; of the Graph test server) during the measurement: on
this shared VM it varies far less than wall time. Every delivery's reported sha256 is checked
against the staged bytes. Before every measurement: `sync`, then a 2 s pause (see settle()).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))

from events.bus import EventBus
from events.model import (
    Event,
    FileStorage,
    ProcessingAborted,
    ProcessingFinished,
    UploadBytesReceived,
    utcnow,
)
from events.natsd import EmbeddedNats
from gateway.store.base import UploadInfo
from gateway.store.filestore import FileStore

MiB = 1 << 20
TOKEN = "bench-token"
START_TIMEOUT = 30.0
PAUSE = 2.0  # seconds of quiet before each measurement (see settle)
RUN_TIMEOUT = 900.0


@dataclass
class Measurement:
    target: str
    round: int
    seconds: float
    mb_per_s: float
    peak_rss_mib: float | None = None
    idle_rss_mib: float | None = None
    #: CPU seconds (user, system) of the worker (of cp) / the Graph test server.
    worker_cpu: tuple[float, float] | None = None
    graph_cpu: tuple[float, float] | None = None


@dataclass
class Results:
    size_bytes: int
    command: str
    machine: dict[str, Any]
    measurements: list[Measurement] = field(default_factory=list)


def vm_hwm_mib(pid: int) -> float:
    """Peak resident set size of a process (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def process(
    argv: list[str], env: dict[str, str], log: Path, ready: str
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while ready not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[2]} did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stage(store_dir: Path, source: Path, upload_id: str, size: int) -> FileStorage:
    """An upload as the gateway leaves it: info + bytes (a hard link to the prepared file)."""
    store = FileStore(store_dir)
    info = UploadInfo(
        id=upload_id, size=size, owner="bench", metadata_raw="filename YmVuY2guYmlu"
    )  # bench.bin
    asyncio.run(store.create(info))
    data = store_dir / f"{upload_id}.bin"
    data.unlink()
    os.link(source, data)
    return FileStorage(path=str(data.resolve()))


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = 64 * MiB
    with path.open("wb") as handle:
        left = size
        while left:
            chunk = os.urandom(min(block, left))
            handle.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def settle() -> None:
    """The same conditions before every measurement: dirty pages written, then a fixed pause.

    On this VM the cost of writing into the page cache depends on how long ago the pages were
    freed (docs/performance.md, "The machine"); without the pause, whatever runs right after
    a deletion is measured as faster than what runs after a process start.
    """
    subprocess.run(["sync"], check=True)
    time.sleep(PAUSE)


def time_cp(source: Path, target: Path, *, sync: bool) -> tuple[float, tuple[float, float]]:
    """Wall seconds and (user, system) CPU seconds of `cp` (and `sync`)."""
    settle()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(["cp", str(source), str(target)], check=True)
    if sync:
        subprocess.run(["sync"], check=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    target.unlink()
    return elapsed, (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime)


async def deliver(nats_url: str, event: UploadBytesReceived) -> tuple[float, Event]:
    bus = EventBus(nats_url, name="deliver-bench")
    await bus.start(wait=10)
    done: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

    async def on_event(received: Event) -> None:
        if (
            isinstance(received, ProcessingFinished | ProcessingAborted)
            and received.id == event.upload_id
            and not done.done()
        ):
            done.set_result(received)

    await bus.subscribe(
        ["tusgate.processing.finished.v1", "tusgate.processing.aborted.v1"], on_event
    )
    start = time.perf_counter()
    await bus.publish(event)
    outcome = await asyncio.wait_for(done, RUN_TIMEOUT)
    elapsed = time.perf_counter() - start
    await bus.close()
    return elapsed, outcome


def worker_env(data_dir: Path, nats_url: str, target: str, graph_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUSGATE_")}
    env.update(
        TUSGATE_DATA_DIR=str(data_dir),
        TUSGATE_NATS_URL=nats_url,
        TUSGATE_DESTINATION_KIND="onedrive" if target == "graph" else "local",
        TUSGATE_STORE_RETENTION="86400",  # keep the staged bytes: the next round reuses them
        TUSGATE_PROCESSING_ACK_WAIT="60",
    )
    if graph_url:
        env.update(TUSGATE_GRAPH_BASE_URL=graph_url, TUSGATE_GRAPH_TOKEN=TOKEN)
    return env


def run_target(
    target: str, work: Path, source: Path, sha256: str, size: int, nats_url: str, round_no: int
) -> Measurement:
    data_dir = work / f"data-{target}-{round_no}"
    upload_id = os.urandom(16).hex()
    storage = stage(data_dir / "uploads", source, upload_id, size)
    event = UploadBytesReceived(
        upload_id=upload_id,
        size=size,
        metadata={"filename": "bench.bin"},
        owner="bench",
        storage=storage,
        checksums={"sha256": sha256},
        content_type=None,
        filename="bench.bin",
        created_at=utcnow(),
        completed_at=utcnow(),
    )
    graph_ctx: Any = None
    graph_proc: subprocess.Popen[bytes] | None = None
    graph_url = None
    if target == "graph":
        port = free_port()
        graph_dir = work / f"graph-{round_no}"
        graph_dir.mkdir()
        env = {**os.environ, "TMPDIR": str(graph_dir)}
        graph_ctx = process(
            [sys.executable, "-m", "tests.graph_server", "--port", str(port), "--token", TOKEN],
            env,
            work / f"graph-{round_no}.log",
            "listening on",
        )
        graph_proc = graph_ctx.__enter__()
        graph_url = f"http://127.0.0.1:{port}/v1.0"
    try:
        with process(
            [sys.executable, "-m", "processing.cli"],
            worker_env(data_dir, nats_url, target, graph_url),
            work / f"worker-{target}-{round_no}.log",
            "processing worker ready",
        ) as proc:
            idle = vm_hwm_mib(proc.pid)
            settle()
            watched = [psutil.Process(proc.pid)] + (
                [psutil.Process(graph_proc.pid)] if graph_proc is not None else []
            )
            before = [p.cpu_times() for p in watched]
            seconds, outcome = asyncio.run(deliver(nats_url, event))
            after = [p.cpu_times() for p in watched]
            peak = vm_hwm_mib(proc.pid)
            cpu = [(a.user - b.user, a.system - b.system) for a, b in zip(after, before)]
    finally:
        if graph_ctx is not None:
            graph_ctx.__exit__(None, None, None)
    if (
        not isinstance(outcome, ProcessingFinished)
        or outcome.sha256 != sha256
        or outcome.size != size
    ):
        raise RuntimeError(f"{target}: delivery failed: {outcome}")
    if target == "local":
        delivered = data_dir / "delivered" / outcome.destination["local"]["path"]
        assert delivered.stat().st_size == size
    shutil.rmtree(data_dir, ignore_errors=True)
    shutil.rmtree(work / f"graph-{round_no}", ignore_errors=True)
    return Measurement(
        target,
        round_no,
        seconds,
        size / seconds / 1e6,
        peak,
        idle,
        cpu[0],
        cpu[1] if len(cpu) > 1 else None,
    )


def report(results: Results) -> str:
    by: dict[str, list[Measurement]] = {}
    for m in results.measurements:
        by.setdefault(m.target, []).append(m)
    lines = [
        (
            f"size: {results.size_bytes / MiB:.0f} MiB, rounds: "
            f"{max(m.round for m in results.measurements)}"
        ),
        "",
        (
            "| target | MB/s median (best) | seconds median | worker peak RSS MiB (idle) "
            "| CPU-s/GiB of the worker, or of cp (user + sys) | Graph server CPU-s/GiB |"
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    medians: dict[str, float] = {}
    for target, items in by.items():
        rates = [m.mb_per_s for m in items]
        medians[target] = statistics.median(rates)
        rss = [m.peak_rss_mib for m in items if m.peak_rss_mib is not None]
        idle = [m.idle_rss_mib for m in items if m.idle_rss_mib is not None]
        rss_text = f"{max(rss):.1f} ({max(idle):.1f})" if rss else "–"
        lines.append(
            f"| {target} | {medians[target]:.0f} ({max(rates):.0f}) | "
            f"{statistics.median(m.seconds for m in items):.2f} | {rss_text} | "
            f"{_cpu([m.worker_cpu for m in items], results.size_bytes)} | "
            f"{_cpu([m.graph_cpu for m in items], results.size_bytes)} |"
        )
    lines += ["", "| ratio (medians of per-round ratios) | value | target |", "|---|---:|---:|"]
    for target, base, goal in (
        ("graph", "cp", 0.5),
        ("local", "cp", 0.8),
        ("local", "cp+sync", 0.8),
    ):
        if target in by and base in by:
            ratios = [
                a.mb_per_s / b.mb_per_s for a in by[target] for b in by[base] if a.round == b.round
            ]
            lines.append(f"| {target} / {base} | {statistics.median(ratios):.2f} | ≥ {goal} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default="graph,local")
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=None,
        help="where the files go (default: the system temp dir)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write results.json here")
    args = parser.parse_args()
    targets = [t for t in args.targets.split(",") if t]
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="deliver-bench-", dir=args.tmp_dir))
    results = Results(
        size_bytes=size,
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        machine={
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "fs": _fs_type(work),
        },
    )
    try:
        source = work / "staged.bin"
        print(f"writing {args.size_mib} MiB of random bytes to {source}", flush=True)
        sha256 = write_random(source, size)
        nats = EmbeddedNats(work / "nats", port=0)
        nats.start()
        try:
            for round_no in range(1, args.rounds + 1):
                for name, sync in (("cp", False), ("cp+sync", True)):
                    seconds, cpu = time_cp(source, work / "copy.bin", sync=sync)
                    results.measurements.append(
                        Measurement(name, round_no, seconds, size / seconds / 1e6, worker_cpu=cpu)
                    )
                    print(f"round {round_no} {name}: {size / seconds / 1e6:.0f} MB/s", flush=True)
                for target in targets:
                    m = run_target(target, work, source, sha256, size, nats.url, round_no)
                    results.measurements.append(m)
                    print(
                        f"round {round_no} {target}: {m.mb_per_s:.0f} MB/s, worker peak RSS "
                        f"{m.peak_rss_mib:.1f} MiB",
                        flush=True,
                    )
        finally:
            nats.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(results)
    print("\n" + text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(asdict(results), indent=2))
        (args.out / "results.md").write_text(text + "\n")
    return 0


def _cpu(samples: list[tuple[float, float] | None], size: int) -> str:
    known = [s for s in samples if s is not None]
    if not known:
        return "–"
    per_gib = (1 << 30) / size
    user = statistics.median(s[0] for s in known) * per_gib
    system = statistics.median(s[1] for s in known) * per_gib
    return f"{user + system:.2f} ({user:.2f} + {system:.2f})"


def _fs_type(path: Path) -> str:
    try:
        out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=True)
        return re.split(r"\s+", out.stdout.splitlines()[1])[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
