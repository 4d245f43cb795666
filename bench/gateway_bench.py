"""Side-by-side upload benchmark: tusgate vs @tus/server vs a bare aiohttp handler.

    .venv/bin/python bench/gateway_bench.py --out bench/results/full      # ~5 min, 3 rounds
    .venv/bin/python bench/gateway_bench.py --quick --out bench/results/quick

Servers, each a subprocess on loopback with its data dir in a fresh temporary directory:
  gateway   `tusgate serve` with TUSGATE_PROCESSING_ENABLED=false
  tus-node  @tus/server 2.x + @tus/file-store (bench/tus_node_server.mjs; needs `npm ci`)
  bare      bench/bare_aiohttp.py: appends bodies to files and nothing else (the ceiling)
Workloads (issue 2):
  a  4 x 256 MiB in 8 MiB PATCHes, concurrency 4
  b  1 x 1 GiB in one PATCH
  c  2,000 x 64 KiB uploads (POST with the body: creation-with-upload), concurrency 32

Every measurement starts its server afresh (so peak RSS belongs to that workload), starts the
client (bench/load_client.py) in its own process, and samples the server's process tree: CPU
(user+system, psutil) from the client's start signal to its result, and RSS every 50 ms.
Rounds interleave the servers (the order rotates each round) because the machine is shared
and noisy; the report gives the median of the rounds and the ratios gateway/bare and
gateway/tus-node against the targets. Only uploads are compared: @tus/server 2.4.5's GET
handler can crash on Node 20.20.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

START_TIMEOUT = 30.0  # seconds for a server's start-up line
CLIENT_READY_TIMEOUT = 60.0
RUN_TIMEOUT = 1800.0  # seconds for one workload, client included
RSS_INTERVAL = 0.05  # seconds between RSS samples
READY_LINE = re.compile(r"listening on (?P<url>http://\S+/files/)")


# -- what is measured ------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    uploads: int
    size: int  # bytes per upload
    chunk: int  # bytes per PATCH
    concurrency: int
    creation_with_upload: bool = False
    prefer_async: bool = False  # send Prefer: respond-async (bench/events_bench.py)

    @property
    def total_bytes(self) -> int:
        return self.uploads * self.size


FULL = {
    "a": Workload("a", "4 x 256 MiB, 8 MiB PATCHes, conc. 4", 4, 256 * MiB, 8 * MiB, 4),
    "b": Workload("b", "1 x 1 GiB, one PATCH", 1, GiB, GiB, 1),
    "c": Workload(
        "c",
        "2,000 x 64 KiB, POST with body, conc. 32",
        2000,
        64 * KiB,
        64 * KiB,
        32,
        creation_with_upload=True,
    ),
}
QUICK = {
    "a": Workload("a", "4 x 32 MiB, 8 MiB PATCHes, conc. 4 (quick)", 4, 32 * MiB, 8 * MiB, 4),
    "b": Workload("b", "1 x 128 MiB, one PATCH (quick)", 1, 128 * MiB, 128 * MiB, 1),
    "c": Workload(
        "c",
        "200 x 64 KiB, POST with body, conc. 32 (quick)",
        200,
        64 * KiB,
        64 * KiB,
        32,
        creation_with_upload=True,
    ),
}


@dataclass(frozen=True)
class Server:
    name: str
    argv: Callable[[str, int, Path], list[str]]
    env: dict[str, str]


def _tusgate_argv(host: str, port: int, data_dir: Path) -> list[str]:
    script = Path(sys.executable).parent / "tusgate"
    exe = str(script) if script.exists() else shutil.which("tusgate") or "tusgate"
    return [exe, "serve", "--host", host, "--port", str(port), "--data-dir", str(data_dir)]


def _node_argv(host: str, port: int, data_dir: Path) -> list[str]:
    node = shutil.which("node") or "node"
    script = str(BENCH_DIR / "tus_node_server.mjs")
    return [node, script, "--host", host, "--port", str(port), "--dir", str(data_dir)]


def _bare_argv(host: str, port: int, data_dir: Path) -> list[str]:
    script = str(BENCH_DIR / "bare_aiohttp.py")
    return [sys.executable, script, "--host", host, "--port", str(port), "--dir", str(data_dir)]


SERVERS = {
    "gateway": Server("gateway", _tusgate_argv, {"TUSGATE_PROCESSING_ENABLED": "false"}),
    "tus-node": Server("tus-node", _node_argv, {}),
    "bare": Server("bare", _bare_argv, {}),
}


@dataclass(frozen=True)
class Measurement:
    server: str
    workload: str
    round: int
    elapsed_s: float
    bytes: int
    uploads: int
    requests: int
    mib_s: float
    uploads_s: float
    server_cpu_s: float  # user + system, server process tree, during the client's run
    cpu_s_per_gib: float
    user_s_per_gib: float  # Python/JS work: what the server's code controls
    sys_s_per_gib: float  # kernel: socket reads, page-cache writes, file creation
    peak_rss_mib: float
    idle_rss_mib: float
    client_cpu_s: float
    client_cpu_util: float  # client CPU seconds per wall second: near 1.0 = client-bound
    others_cpu_util: float  # cores busy with other processes of the machine during the run
    steal_util: float  # cores taken by the hypervisor (steal time) during the run
    latency_p50_ms: float
    latency_p99_ms: float
    stored_bytes: int
    errors: int
    error_samples: list[str]


# -- processes -------------------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu(proc: psutil.Process) -> tuple[float, float]:
    """(user, system) seconds of the process, its live descendants and its reaped children."""
    user = system = 0.0
    for p in tree(proc):
        try:
            t = p.cpu_times()
            user += t.user + t.children_user
            system += t.system + t.children_system
        except psutil.NoSuchProcess:
            pass
    return user, system


def machine_busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine except steal, steal seconds) so far."""
    t = psutil.cpu_times()
    steal = getattr(t, "steal", 0.0)
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - steal
    # guest time is already counted in user on Linux
    busy -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return busy, steal


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class RssSampler(threading.Thread):
    """Samples the RSS of a process tree every RSS_INTERVAL seconds; keeps the peak."""

    def __init__(self, proc: psutil.Process) -> None:
        super().__init__(daemon=True)
        self.proc = proc
        self.peak = tree_rss(proc)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(RSS_INTERVAL):
            self.peak = max(self.peak, tree_rss(self.proc))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, tree_rss(self.proc))
        return self.peak


@contextmanager
def running(server: Server, work_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    data_dir = work_dir / "data"
    data_dir.mkdir(parents=True)
    log_path = work_dir / "server.log"
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            server.argv("127.0.0.1", port, data_dir),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **server.env},
            cwd=work_dir,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (match := READY_LINE.search(log_path.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{server.name} did not start:\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.05)
        yield proc, match.group("url")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"  note: {server.name} exited with {proc.returncode}", file=sys.stderr)


def client_argv(endpoint: str, w: Workload) -> list[str]:
    argv = [
        sys.executable,
        str(BENCH_DIR / "load_client.py"),
        "--endpoint",
        endpoint,
        "--uploads",
        str(w.uploads),
        "--size",
        str(w.size),
        "--chunk",
        str(w.chunk),
        "--concurrency",
        str(w.concurrency),
    ]
    argv += ["--creation-with-upload"] if w.creation_with_upload else []
    return argv + (["--prefer-async"] if w.prefer_async else [])


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(server: Server, w: Workload, round_no: int, tmp_root: Path) -> Measurement:
    work_dir = Path(tempfile.mkdtemp(prefix=f"{server.name}-{w.name}-", dir=tmp_root))
    try:
        with running(server, work_dir) as (proc, endpoint):
            ps = psutil.Process(proc.pid)
            client = subprocess.Popen(
                client_argv(endpoint, w),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert client.stdin is not None and client.stdout is not None
                ready = _readline(client, CLIENT_READY_TIMEOUT)
                if ready.strip() != "ready":
                    raise RuntimeError(f"client did not start: {ready!r}")
                idle_rss = tree_rss(ps)
                sampler = RssSampler(ps)
                sampler.start()
                user0, sys0 = tree_cpu(ps)
                busy0, steal0 = machine_busy()
                client.stdin.write("go\n")
                client.stdin.flush()
                line = _readline(client, RUN_TIMEOUT)
                user1, sys1 = tree_cpu(ps)
                busy1, steal1 = machine_busy()
                peak = sampler.stop()
            finally:
                if client.poll() is None:
                    client.kill()
                client.wait(10)
            if not line:
                raise RuntimeError(f"client died during {server.name}/{w.name}")
            stored = dir_bytes(work_dir / "data")
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
        os.sync()  # the next measurement should not pay for this one's writeback

    r = json.loads(line)
    elapsed = r["elapsed_s"]
    gib = r["bytes"] / GiB or float("nan")
    user, system = user1 - user0, sys1 - sys0
    return Measurement(
        server=server.name,
        workload=w.name,
        round=round_no,
        elapsed_s=elapsed,
        bytes=r["bytes"],
        uploads=r["uploads"],
        requests=r["requests"],
        mib_s=r["bytes"] / MiB / elapsed,
        uploads_s=r["uploads"] / elapsed,
        server_cpu_s=user + system,
        cpu_s_per_gib=(user + system) / gib,
        user_s_per_gib=user / gib,
        sys_s_per_gib=system / gib,
        peak_rss_mib=peak / MiB,
        idle_rss_mib=idle_rss / MiB,
        client_cpu_s=r["client_cpu_s"],
        client_cpu_util=r["client_cpu_s"] / elapsed,
        # The client's CPU is measured over its run only, the machine's from "go" to the
        # result: a few ms apart, noise next to a whole core taken by another process.
        others_cpu_util=max(0.0, busy1 - busy0 - user - system - r["client_cpu_s"]) / elapsed,
        steal_util=(steal1 - steal0) / elapsed,
        latency_p50_ms=r["latency_p50_ms"],
        latency_p99_ms=r["latency_p99_ms"],
        stored_bytes=stored,
        errors=r["errors"],
        error_samples=r["error_samples"],
    )


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of the client's stdout, or '' after ``timeout`` seconds (bounded wait)."""
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    return result[0] if result else ""


# -- report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    label: str
    metric: str
    versus: str | None  # the server of a ratio "gateway / versus >= bound"; None: absolute
    bound: float


TARGETS = {  # issue 2
    "a": [
        Target("MiB/s >= 0.85 x bare", "mib_s", "bare", 0.85),
        Target("MiB/s >= 1.6 x tus-node", "mib_s", "tus-node", 1.6),
        Target("CPU-s/GiB <= 0.8", "cpu_s_per_gib", None, 0.8),
    ],
    "b": [
        Target("MiB/s >= 0.85 x bare", "mib_s", "bare", 0.85),
        Target("MiB/s >= 1.6 x tus-node", "mib_s", "tus-node", 1.6),
        Target("peak RSS < 64 MiB", "peak_rss_mib", None, 64.0),
    ],
    "c": [Target("uploads/s >= 2 x tus-node", "uploads_s", "tus-node", 2.0)],
}


def summarize(results: list[Measurement]) -> dict[str, Any]:
    by: dict[tuple[str, str], list[Measurement]] = {}
    for m in results:
        by.setdefault((m.server, m.workload), []).append(m)
    summary: dict[str, Any] = {}
    for (server, workload), ms in sorted(by.items()):
        ok = [m for m in ms if m.errors == 0] or ms
        summary.setdefault(workload, {})[server] = {
            "rounds": len(ms),
            "failed_rounds": sum(1 for m in ms if m.errors),
            "mib_s": statistics.median(m.mib_s for m in ok),
            "mib_s_best": max(m.mib_s for m in ok),
            "uploads_s": statistics.median(m.uploads_s for m in ok),
            "uploads_s_best": max(m.uploads_s for m in ok),
            "cpu_s_per_gib": statistics.median(m.cpu_s_per_gib for m in ok),
            "user_s_per_gib": statistics.median(m.user_s_per_gib for m in ok),
            "sys_s_per_gib": statistics.median(m.sys_s_per_gib for m in ok),
            "peak_rss_mib": max(m.peak_rss_mib for m in ms),
            "client_cpu_util": max(m.client_cpu_util for m in ms),
            "others_cpu_util": statistics.median(m.others_cpu_util for m in ms),
            "latency_p99_ms": statistics.median(m.latency_p99_ms for m in ok),
        }

    def paired_ratio(workload: str, versus: str, metric: str) -> float | None:
        """Median over rounds of gateway/versus, each round's pair measured minutes apart."""
        ratios = []
        for g in by.get(("gateway", workload), []):
            for v in by.get((versus, workload), []):
                if v.round == g.round and getattr(v, metric):
                    ratios.append(getattr(g, metric) / getattr(v, metric))
        return statistics.median(ratios) if ratios else None

    checks = []
    for workload, targets in TARGETS.items():
        gw = summary.get(workload, {}).get("gateway")
        if gw is None:
            continue
        for t in targets:
            if t.versus is None:  # an absolute upper bound
                value: float | None = gw[t.metric]
                passed = value is not None and value <= t.bound
            else:
                value = paired_ratio(workload, t.versus, t.metric)
                if value is None:
                    continue
                passed = value >= t.bound
            checks.append(
                {"workload": workload, "target": t.label, "value": value, "passed": passed}
            )
    return {"per_workload": summary, "targets": checks}


def markdown(summary: dict[str, Any], workloads: dict[str, Workload], info: dict[str, Any]) -> str:
    lines = [
        (
            f"Run {info['started']} — {info['rounds']} round(s): median of rounds (best in "
            "brackets); peak RSS and client CPU are the max over rounds."
        ),
        "",
        (
            "| workload | server | MiB/s median (best) | uploads/s median (best) | "
            "server CPU-s/GiB (user + sys) | peak RSS MiB | client CPU util | "
            "other load (cores) | p99 upload ms |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for wname, per_server in summary["per_workload"].items():
        for server in ("gateway", "tus-node", "bare"):
            if server not in per_server:
                continue
            s = per_server[server]
            failed = f" ({s['failed_rounds']} failed)" if s["failed_rounds"] else ""
            lines.append(
                f"| {wname}: {workloads[wname].title} | {server}{failed} "
                f"| {s['mib_s']:.0f} ({s['mib_s_best']:.0f}) "
                f"| {s['uploads_s']:.1f} ({s['uploads_s_best']:.1f}) "
                f"| {s['cpu_s_per_gib']:.2f} ({s['user_s_per_gib']:.2f} + {s['sys_s_per_gib']:.2f}) "
                f"| {s['peak_rss_mib']:.1f} | {s['client_cpu_util']:.2f} "
                f"| {s['others_cpu_util']:.2f} | {s['latency_p99_ms']:.1f} |"
            )
    lines += [
        "",
        "Ratios are the median over rounds of gateway / other, each pair from the same round.",
        "",
        "| workload | target | measured | met |",
        "|---|---|---:|---|",
    ]
    for c in summary["targets"]:
        lines.append(
            f"| {c['workload']} | {c['target']} | {c['value']:.2f} | "
            f"{'yes' if c['passed'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        try:
            return subprocess.run(
                cmd, capture_output=True, text=True, check=False, timeout=10
            ).stdout.strip()
        except OSError:
            return "unavailable"

    def npm_version(package: str) -> str:
        try:
            manifest = REPO_ROOT / "node_modules" / package / "package.json"
            return str(json.loads(manifest.read_text())["version"])
        except OSError:
            return "not installed"

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import aiohttp

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "node": version(["node", "--version"]),
        "@tus/server": npm_version("@tus/server"),
        "@tus/file-store": npm_version("@tus/file-store"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for results.json and results.md (default bench/results/<timestamp>)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="default 3, or 1 with --quick")
    parser.add_argument("--servers", default="gateway,tus-node,bare")
    parser.add_argument("--workloads", default="a,b,c")
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the servers' data dirs go (same disk for all)",
    )
    args = parser.parse_args()

    catalogue = QUICK if args.quick else FULL
    workloads = {n: catalogue[n] for n in args.workloads.split(",")}
    servers = [SERVERS[n] for n in args.servers.split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = args.out or BENCH_DIR / "results" / started.replace(":", "")
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "started": started,
        "rounds": rounds,
        "quick": args.quick,
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "workloads": {n: asdict(w) for n, w in workloads.items()},
    }

    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="tusgate-bench-", dir=args.tmp_dir) as tmp:
        for round_no in range(rounds):
            order = servers[round_no % len(servers) :] + servers[: round_no % len(servers)]
            for w in workloads.values():
                for server in order:
                    m = measure(server, w, round_no, Path(tmp))
                    results.append(m)
                    flag = f"  ERRORS {m.errors}: {m.error_samples[:1]}" if m.errors else ""
                    print(
                        f"round {round_no} {w.name} {server.name:8} {m.mib_s:8.1f} MiB/s "
                        f"{m.uploads_s:8.1f} up/s  cpu {m.cpu_s_per_gib:5.2f} s/GiB  "
                        f"rss {m.peak_rss_mib:6.1f} MiB  client {m.client_cpu_util:.2f}  "
                        f"others {m.others_cpu_util:.2f}"
                        f"{flag}",
                        flush=True,
                    )

    summary = summarize(results)
    (out / "results.json").write_text(
        json.dumps(
            {"info": info, "summary": summary, "measurements": [asdict(m) for m in results]},
            indent=2,
        )
    )
    table = markdown(summary, workloads, info)
    (out / "results.md").write_text(table)
    print(table)
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")


if __name__ == "__main__":
    main()
