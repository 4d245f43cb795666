"""S3 benchmark: uploads into S3 through tusgate vs @tus/server + @tus/s3-store, same endpoint.

    .venv/bin/python bench/s3_bench.py --out bench/results/s3                # 3 rounds, ~6 min
    .venv/bin/python bench/s3_bench.py --quick --out bench/results/s3-quick  # smoke run, ~1 min

One moto S3 server (``moto_server``, a process of its own) is the S3 endpoint of every
measurement in the run; each measurement gets a new bucket, which is checked (one whole object
per upload), emptied and deleted afterwards -- moto keeps every byte in memory.

Servers, each started afresh per measurement (bench/gateway_bench.py's ``measure``):
  gateway       `tusgate serve`, TUSGATE_STORE_KIND=s3, 8 MiB parts, processing disabled, with
                the nats-server started for the run: the S3 store keeps its upload records in
                NATS KV, the one-writer lock is in NATS KV, and events flow (scaled mode)
  tus-node      @tus/server 2.x + @tus/s3-store, 8 MiB parts (bench/tus_node_s3_server.mjs)
Workloads, from bench/gateway_bench.py (client: bench/load_client.py):
  a  4 x 256 MiB in 8 MiB PATCHes, concurrency 4      target: MiB/s >= 1.2 x tus-node
  b  1 x 1 GiB in one PATCH                           target: gateway peak RSS < 128 MiB

Besides what gateway_bench measures (throughput, server CPU, server peak RSS, client CPU),
moto's CPU time and peak RSS are sampled during each measurement: moto is Python and does real
work per byte (MD5 of every part, copies on CompleteMultipartUpload), so on two cores it
competes with the server under test for CPU. "Other load" excludes moto's share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import boto3
import gateway_bench as gb  # bench/ is sys.path[0] when this file runs as a script
import psutil

REPO_ROOT = gb.REPO_ROOT
MiB, GiB = gb.MiB, gb.GiB
PART_SIZE = 8 * MiB  # both servers: the gateway's default, @tus/s3-store's documented example
MOTO_START_TIMEOUT = 30.0
AWS_ENV = {  # moto accepts anything; the servers' SDKs need some credentials
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
WORKLOADS = "a,b"
TARGET_RATIO = 1.2  # workload a: gateway MiB/s / tus-node MiB/s
TARGET_RSS_MIB = 128.0  # workload b: gateway peak RSS


# -- the S3 endpoint -------------------------------------------------------------------------


@dataclass(frozen=True)
class Moto:
    process: subprocess.Popen[bytes]
    url: str

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.process.pid)

    def cpu_s(self) -> float:
        user, system = gb.tree_cpu(self.ps)
        return user + system


@contextlib.contextmanager
def moto_server(work_dir: Path) -> Iterator[Moto]:
    script = Path(sys.executable).parent / "moto_server"
    exe = str(script) if script.exists() else shutil.which("moto_server") or "moto_server"
    port = gb.free_port()
    log = (work_dir / "moto.log").open("wb")
    process = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + MOTO_START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: see {work_dir / 'moto.log'}")
                time.sleep(0.1)
        yield Moto(process, url)
    finally:
        stop(process)
        log.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextlib.contextmanager
def nats_server(work_dir: Path) -> Iterator[str]:
    sys.path.insert(0, str(REPO_ROOT))
    from events.natsd import EmbeddedNats

    with EmbeddedNats(work_dir / "nats") as nats:
        yield nats.url


def empty_bucket(s3: Any, bucket: str) -> None:
    for upload in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def whole_objects(s3: Any, bucket: str, size: int) -> tuple[int, int]:
    """(objects of exactly `size` bytes, bytes in all objects): each finished upload must have
    become one whole object, whatever the server's key layout."""
    count = total = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            total += obj["Size"]
            count += obj["Size"] == size
    return count, total


# -- the servers -----------------------------------------------------------------------------


def make_server(name: str, bucket: str, endpoint: str, nats_url: str) -> gb.Server:
    if name == "gateway":
        env = {
            "TUSGATE_PROCESSING_ENABLED": "false",
            "TUSGATE_STORE_KIND": "s3",
            "TUSGATE_S3_BUCKET": bucket,
            "TUSGATE_S3_ENDPOINT_URL": endpoint,
            "TUSGATE_S3_PART_SIZE": str(PART_SIZE),
            "TUSGATE_NATS_URL": nats_url,
        }
        return gb.Server(name, gb._tusgate_argv, env)
    if name == "tus-node":
        script = str(gb.BENCH_DIR / "tus_node_s3_server.mjs")

        def argv(host: str, port: int, data_dir: Path) -> list[str]:
            node = shutil.which("node") or "node"
            return [
                node,
                script,
                "--host",
                host,
                "--port",
                str(port),
                "--bucket",
                bucket,
                "--endpoint",
                endpoint,
                "--part-size",
                str(PART_SIZE),
            ]

        return gb.Server(name, argv, {})
    raise ValueError(f"unknown server {name!r}")


# -- one measurement -------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Measurement:
    m: gb.Measurement
    whole_objects: int  # objects of exactly the upload size: must equal the uploads
    moto_cpu_s_per_gib: float
    moto_peak_rss_mib: float
    others_cpu_util: float  # gateway_bench's "other load" without moto's share

    @property
    def ok(self) -> bool:
        return self.m.errors == 0 and self.whole_objects == self.m.uploads


def measure(
    name: str,
    w: gb.Workload,
    round_no: int,
    tmp: Path,
    moto: Moto,
    s3: Any,
    nats_url: str,
) -> S3Measurement:
    bucket = f"bench-{name}-{w.name}-{round_no}-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    try:
        sampler = gb.RssSampler(moto.ps)
        sampler.start()
        cpu0 = moto.cpu_s()
        try:
            m = gb.measure(make_server(name, bucket, moto.url, nats_url), w, round_no, tmp)
        finally:
            moto_cpu = moto.cpu_s() - cpu0
            moto_peak = sampler.stop()
        count, stored = whole_objects(s3, bucket, w.size)
    finally:
        empty_bucket(s3, bucket)
    # gb.measure counts moto in "other load" and measures the cpu window from the client's
    # start to its result; moto's window here also covers the server's start and stop (idle).
    others = max(0.0, m.others_cpu_util - moto_cpu / m.elapsed_s)
    return S3Measurement(
        m=replace(m, stored_bytes=stored),
        whole_objects=count,
        moto_cpu_s_per_gib=moto_cpu / (m.bytes / GiB or float("nan")),
        moto_peak_rss_mib=moto_peak / MiB,
        others_cpu_util=others,
    )


# -- report ----------------------------------------------------------------------------------


def summarize(results: list[S3Measurement]) -> dict[str, Any]:
    by: dict[tuple[str, str], list[S3Measurement]] = {}
    for r in results:
        by.setdefault((r.m.workload, r.m.server), []).append(r)
    per: dict[str, dict[str, Any]] = {}
    for (workload, server), rs in sorted(by.items()):
        ok = [r for r in rs if r.ok] or rs
        per.setdefault(workload, {})[server] = {
            "rounds": len(rs),
            "failed_rounds": sum(1 for r in rs if not r.ok),
            "mib_s": statistics.median(r.m.mib_s for r in ok),
            "mib_s_best": max(r.m.mib_s for r in ok),
            "cpu_s_per_gib": statistics.median(r.m.cpu_s_per_gib for r in ok),
            "user_s_per_gib": statistics.median(r.m.user_s_per_gib for r in ok),
            "sys_s_per_gib": statistics.median(r.m.sys_s_per_gib for r in ok),
            "peak_rss_mib": max(r.m.peak_rss_mib for r in rs),
            "moto_cpu_s_per_gib": statistics.median(r.moto_cpu_s_per_gib for r in ok),
            "moto_peak_rss_mib": max(r.moto_peak_rss_mib for r in rs),
            "client_cpu_util": max(r.m.client_cpu_util for r in rs),
            "others_cpu_util": statistics.median(r.others_cpu_util for r in rs),
            "latency_p99_ms": statistics.median(r.m.latency_p99_ms for r in ok),
        }

    ratios = [
        g.m.mib_s / t.m.mib_s
        for g in by.get(("a", "gateway"), [])
        for t in by.get(("a", "tus-node"), [])
        if g.m.round == t.m.round and g.ok and t.ok and t.m.mib_s
    ]
    targets = []
    if ratios:
        value = statistics.median(ratios)
        targets.append(
            {
                "workload": "a",
                "target": f"MiB/s >= {TARGET_RATIO} x tus-node",
                "value": value,
                "rounds": [round(r, 2) for r in ratios],
                "passed": value >= TARGET_RATIO,
            }
        )
    if "gateway" in per.get("b", {}):
        value = per["b"]["gateway"]["peak_rss_mib"]
        targets.append(
            {
                "workload": "b",
                "target": f"gateway peak RSS < {TARGET_RSS_MIB:.0f} MiB",
                "value": value,
                "passed": value < TARGET_RSS_MIB,
            }
        )
    return {"per_workload": per, "targets": targets}


def markdown(
    summary: dict[str, Any], workloads: dict[str, gb.Workload], info: dict[str, Any]
) -> str:
    lines = [
        (
            f"Run {info['started']} -- {info['rounds']} round(s): median of rounds (best in "
            "brackets); peak RSS is the max over rounds."
        ),
        "",
        (
            "| workload | server | MiB/s median (best) | server CPU-s/GiB (user + sys) | server "
            "peak RSS MiB | moto CPU-s/GiB | moto peak RSS MiB | client CPU util | other load "
            "(cores) | p99 upload ms |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for wname, per_server in summary["per_workload"].items():
        for server, s in per_server.items():
            failed = f" ({s['failed_rounds']} failed)" if s["failed_rounds"] else ""
            lines.append(
                f"| {wname}: {workloads[wname].title} | {server}{failed} "
                f"| {s['mib_s']:.0f} ({s['mib_s_best']:.0f}) "
                f"| {s['cpu_s_per_gib']:.2f} ({s['user_s_per_gib']:.2f} + {s['sys_s_per_gib']:.2f}) "
                f"| {s['peak_rss_mib']:.1f} | {s['moto_cpu_s_per_gib']:.2f} "
                f"| {s['moto_peak_rss_mib']:.0f} | {s['client_cpu_util']:.2f} "
                f"| {s['others_cpu_util']:.2f} | {s['latency_p99_ms']:.0f} |"
            )
    lines += ["", "| workload | target | measured | met |", "|---|---|---:|---|"]
    for t in summary["targets"]:
        per_round = f" (rounds: {', '.join(map(str, t['rounds']))})" if "rounds" in t else ""
        lines.append(
            f"| {t['workload']} | {t['target']} | {t['value']:.2f}{per_round} | "
            f"{'yes' if t['passed'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for results.json and results.md (default bench/results/s3-<timestamp>)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="default 3, or 1 with --quick")
    parser.add_argument(
        "--servers",
        default="gateway,tus-node",
        help="gateway, tus-node (comma-separated)",
    )
    parser.add_argument("--workloads", default=WORKLOADS)
    parser.add_argument("--tmp-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()

    catalogue = gb.QUICK if args.quick else gb.FULL
    workloads = {n: catalogue[n] for n in args.workloads.split(",")}
    if "c" in workloads:
        parser.error("workload c (2,000 small uploads) is not part of the S3 benchmark")
    servers = args.servers.split(",")
    rounds = args.rounds or (1 if args.quick else 3)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = args.out or gb.BENCH_DIR / "results" / ("s3-" + started.replace(":", ""))
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(AWS_ENV)  # inherited by the servers (gb.running passes os.environ on)
    machine = gb.machine_info()
    machine["@tus/s3-store"] = json.loads(
        (REPO_ROOT / "node_modules/@tus/s3-store/package.json").read_text()
    )["version"]
    machine["moto"] = __import__("moto").__version__
    info = {
        "started": started,
        "rounds": rounds,
        "quick": args.quick,
        "command": " ".join(sys.argv),
        "machine": machine,
        "part_size": PART_SIZE,
        "workloads": {n: asdict(w) for n, w in workloads.items()},
    }

    results: list[S3Measurement] = []
    with tempfile.TemporaryDirectory(prefix="tusgate-s3-bench-", dir=args.tmp_dir) as tmp_dir:
        tmp = Path(tmp_dir)
        with nats_server(tmp) as nats_url, moto_server(tmp) as moto:
            s3 = boto3.client("s3", endpoint_url=moto.url, region_name="us-east-1")
            for round_no in range(rounds):
                order = servers[round_no % len(servers) :] + servers[: round_no % len(servers)]
                for w in workloads.values():
                    for name in order:
                        r = measure(name, w, round_no, tmp, moto, s3, nats_url)
                        results.append(r)
                        flag = (
                            ""
                            if r.ok
                            else (
                                f"  FAILED: {r.m.errors} errors {r.m.error_samples[:1]}, "
                                f"{r.whole_objects}/{r.m.uploads} whole objects"
                            )
                        )
                        print(
                            f"round {round_no} {w.name} {name:12} {r.m.mib_s:7.1f} MiB/s  "
                            f"cpu {r.m.cpu_s_per_gib:5.2f} s/GiB  rss {r.m.peak_rss_mib:6.1f} MiB"
                            f"  moto {r.moto_cpu_s_per_gib:5.2f} s/GiB {r.moto_peak_rss_mib:6.0f}"
                            f" MiB  client {r.m.client_cpu_util:.2f}  others "
                            f"{r.others_cpu_util:.2f}{flag}",
                            flush=True,
                        )
            s3.close()

    summary = summarize(results)
    (out / "results.json").write_text(
        json.dumps(
            {
                "info": info,
                "summary": summary,
                "measurements": [
                    {**asdict(r.m), **{k: v for k, v in asdict(r).items() if k != "m"}}
                    for r in results
                ],
            },
            indent=2,
        )
    )
    table = markdown(summary, workloads, info)
    (out / "results.md").write_text(table)
    print(table)
    print(f"written: {out / 'results.json'}, {out / 'results.md'}")


if __name__ == "__main__":
    main()
