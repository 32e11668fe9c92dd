"""Producer throughput: `irlive scan` (list, filter, dedup, register, enqueue) against a raw boto3 paginator.

In one invocation: (1) a fast S3 stand-in (bench/fakes3.py, its own process) serving N keys, where the client
is the bound: the raw paginator (plain boto3, botocore's default timestamp parsing, keys collected in a list:
what a plain script does) and the producer (producer.scan.scan in this process: listing, filters, the done-set
check, chunk registration and send_task into the stack's Redis broker; no workers, chunks stay queued) run
alternately, best of --rounds each; (2) the same on moto_server with fewer keys (uploading is slow there);
(3) the producer's peak RSS (VmHWM) at each of --memory-sizes keys on the stand-in, one fresh process per size.
Prints keys/s of each, the ratio producer ÷ raw, and the peak RSS of each size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from bench import common
from bench.fakes3 import bench_keys
from producer.filters import DEFAULT_SUFFIXES
from producer.scan import ScanRequest, ScanResult, scan
from sandbox.stack import AWS_ENV, Stack
from worker.app import make_app
from worker.config import S3Location, Settings
from worker.flow.claims import Claims
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.messages import QUEUES
from worker.seams.storage import Storage
from worker.seams.store import Store

IN_BUCKET, OUT_BUCKET, PREFIX = common.IN_BUCKET, common.OUT_BUCKET, "bench"
FAKE_START_TIMEOUT_S = 120.0
CREDENTIALS = (AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"])


@dataclass(frozen=True)
class Timing:
    """Best wall time of each side over the rounds, over the same keys."""

    keys: int
    raw_s: float
    producer_s: float

    def line(self, where: str) -> str:
        return (f"{where}: {self.keys} keys  raw paginator {self.keys / self.raw_s:8.0f} keys/s ({self.raw_s:.2f} s)"
                f"  producer {self.keys / self.producer_s:8.0f} keys/s ({self.producer_s:.2f} s)"
                f"  producer / raw = {self.raw_s / self.producer_s:.2f}")


def raw_client(endpoint: str) -> Any:
    """A plain boto3 client, as a script would make it (botocore's default parsers: dateutil timestamps)."""
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name=AWS_ENV["AWS_DEFAULT_REGION"], aws_access_key_id=CREDENTIALS[0],
        aws_secret_access_key=CREDENTIALS[1],
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))


def raw_list(client: Any) -> int:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=IN_BUCKET, Prefix=f"{PREFIX}/")
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", ())]
    return len(keys)


class Producer:
    """The producer's clients, built once (as `irlive scan` builds them once), against one S3 and one Redis."""

    def __init__(self, s3_endpoint: str, redis_url: str) -> None:
        self.settings = Settings.from_env({"IRLIVE_REDIS_URL": redis_url, "IRLIVE_S3_ENDPOINT_URL": s3_endpoint,
                                           "IRLIVE_OUTPUT": f"s3://{OUT_BUCKET}/results"})
        self.store = Store.from_url(redis_url)
        keys = Keys(self.settings.key_prefix)
        self.runs, self.claims = Runs(self.store, keys), Claims(self.store, keys)
        self.app = make_app(self.settings)
        self.storage = Storage(s3_endpoint, credentials=CREDENTIALS)
        self.request = ScanRequest(S3Location(IN_BUCKET, PREFIX), DEFAULT_SUFFIXES)

    def scan(self) -> ScanResult:
        # Each round starts from an empty Redis: the same 100 % to enqueue, and a broker queue that does not grow.
        self.store.flushall()
        result = scan(self.settings, self.storage, self.runs, self.claims, self.app, self.request,
                      self.settings.require_output())
        queued = int(self.store.llen(QUEUES["nightly"]))
        if queued != result.chunks or result.enqueued != result.found:
            raise RuntimeError(f"the scan enqueued {result.enqueued} of {result.found} in {result.chunks} chunks, "
                               f"{queued} messages queued")
        return result

    def close(self) -> None:
        self.store.close()


def compare(s3_endpoint: str, redis_url: str, n: int, rounds: int) -> Timing:
    client, producer = raw_client(s3_endpoint), Producer(s3_endpoint, redis_url)
    best_raw = best_producer = float("inf")
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            listed = raw_list(client)
            best_raw = min(best_raw, time.perf_counter() - started)
            started = time.perf_counter()
            found = producer.scan().found
            best_producer = min(best_producer, time.perf_counter() - started)
            if listed != n or found != n:
                raise RuntimeError(f"expected {n} keys: the raw paginator listed {listed}, the producer {found}")
    finally:
        producer.close()
    return Timing(n, best_raw, best_producer)


@contextmanager
def fake_s3(n: int) -> Iterator[str]:
    """bench/fakes3.py serving n keys under bench-in/bench/ (and an empty bench-out), in its own process."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.fakes3", "--keys", str(n), "--bucket", IN_BUCKET,
                             "--prefix", PREFIX, "--empty", OUT_BUCKET], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the port, once every key is rendered
        if not line.strip():
            raise RuntimeError(f"bench.fakes3 exited {proc.wait()} before printing its port")
        yield f"http://127.0.0.1:{int(line)}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def vm_hwm_kb(pid: int | str = "self") -> int:
    """Peak resident memory of a process (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc status")


def child_memory(s3_endpoint: str, redis_url: str) -> dict[str, Any]:
    """In a fresh process: one scan, with the peak RSS before it (imports and clients) and after it."""
    producer = Producer(s3_endpoint, redis_url)
    producer.store.ping()
    before = vm_hwm_kb()
    started = time.perf_counter()
    result = producer.scan()
    return {"found": result.found, "chunks": result.chunks, "secs": time.perf_counter() - started,
            "hwm_before_kb": before, "hwm_kb": vm_hwm_kb()}


def memory(redis_url: str, n: int) -> dict[str, Any]:
    with fake_s3(n) as endpoint:
        done = subprocess.run([sys.executable, "-m", "bench.producer", "--child-memory", endpoint, redis_url],
                              capture_output=True, text=True, check=False, env={**os.environ, **AWS_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory child for {n} keys exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    doc: dict[str, Any] = json.loads(done.stdout)
    if doc["found"] != n:
        raise RuntimeError(f"memory child listed {doc['found']} keys, expected {n}")
    return doc


def upload_empty(stack: Stack, n: int) -> None:
    s3 = common.s3_client(stack)
    for bucket in (IN_BUCKET, OUT_BUCKET):
        s3.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(common.UPLOAD_THREADS) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=IN_BUCKET, Key=k, Body=b""), bench_keys(n, PREFIX)))


def main(argv: Sequence[str] | None = None) -> int:
    common.keep_bytecode()
    p = argparse.ArgumentParser(prog="python -m bench.producer", description=__doc__)
    p.add_argument("--keys", type=int, default=100_000, help="keys on the fast S3 stand-in")
    p.add_argument("--moto-keys", type=int, default=20_000, help="keys on moto_server (0: skip)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--memory-sizes", default="10000,100000,1000000", help="comma-separated key counts ('': skip)")
    p.add_argument("--child-memory", nargs=2, metavar=("S3_ENDPOINT", "REDIS_URL"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child_memory:
        print(json.dumps(child_memory(*ns.child_memory)))
        return 0
    os.environ.update(AWS_ENV)
    sizes = [int(s) for s in ns.memory_sizes.split(",") if s.strip()]
    print(f"{common.machine()}, {common.today()}")
    with Stack(settings_env=common.base_env(), redis_appendonly=False) as stack:
        with fake_s3(ns.keys) as endpoint:
            print(compare(endpoint, stack.redis_url, ns.keys, ns.rounds).line("fast S3 stand-in"), flush=True)
        if ns.moto_keys:
            started = time.perf_counter()
            upload_empty(stack, ns.moto_keys)
            print(f"(put {ns.moto_keys} empty objects in moto_server in {time.perf_counter() - started:.0f} s)")
            print(compare(stack.s3_endpoint, stack.redis_url, ns.moto_keys, ns.rounds).line("moto_server     "),
                  flush=True)
        peaks = []
        for n in sizes:
            doc = memory(stack.redis_url, n)
            peaks.append(doc["hwm_kb"])
            print(f"producer peak RSS at {n:>8} keys: {doc['hwm_kb'] / 1024:7.1f} MB (before the scan "
                  f"{doc['hwm_before_kb'] / 1024:.1f} MB, scan {doc['secs']:.1f} s, {n / doc['secs']:.0f} keys/s)",
                  flush=True)
        if len(peaks) > 1:
            print(f"peak RSS from {sizes[0]} to {sizes[-1]} keys: {(peaks[-1] - peaks[0]) / 1024:+.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
