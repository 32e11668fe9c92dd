"""Events: how long a lone arriving capture waits for its verdict, idle and with a 5,000-image backfill queued.

From `put_object` to its record in a chunk manifest, through S3 -> SQS notifications (moto_server),
`irlive listen`, the Redis buffer, the events queue and the workers. The baseline, measured in the same
invocation, is the idle fleet; the bound the issue sets is IRLIVE_EVENT_MAX_WAIT_S + 3 s at p95.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import common
from sandbox import procs
from sandbox.images import png
from sandbox.stack import Stack

QUEUE = "irlive-bench-events"


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.events_latency", description=__doc__)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--backfill", type=int, default=5000, help="images queued as a backfill behind the events")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-wait", type=float, default=5.0, help="IRLIVE_EVENT_MAX_WAIT_S")
    p.add_argument("--rate", type=float, default=2.0, help="IRLIVE_RATE_LIMIT_PER_S (default: the shipped 2)")
    return p.parse_args(argv)


def manifest_keys(stack: Stack) -> set[str]:
    s3 = common.s3_client(stack, pool=4)
    found: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=common.OUT_BUCKET, Prefix="results/runs/ev-"):
        found.update(o["Key"] for o in page.get("Contents", ()) if "/chunks/" in o["Key"])
    return found


def lone_event(stack: Stack, key: str, seen: set[str], deadline_s: float = 120.0) -> float:
    """Put one capture; seconds until a chunk manifest holds its record."""
    s3 = common.s3_client(stack, pool=4)
    started = time.monotonic()
    s3.put_object(Bucket=common.IN_BUCKET, Key=key, Body=png(64, 64, "live", seed=hash(key) % 10_000))
    while time.monotonic() - started < deadline_s:
        for manifest in manifest_keys(stack) - seen:
            seen.add(manifest)
            doc = json.loads(s3.get_object(Bucket=common.OUT_BUCKET, Key=manifest)["Body"].read())
            if any(r["key"] == key for r in doc["images"]):
                return time.monotonic() - started
        time.sleep(0.05)
    raise RuntimeError(f"{key} got no record within {deadline_s:.0f}s")


def trials(stack: Stack, label: str, n: int, seen: set[str]) -> list[float]:
    out = []
    for i in range(n):
        out.append(lone_event(stack, f"events/{label}-{i:03d}.png", seen))
        # Let the window's buffer drain, so each trial is a lone event (nothing else arriving).
        time.sleep(0.5)
    return out


def summary(values: list[float]) -> tuple[str, str, str]:
    ordered = sorted(values)
    p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
    return f"{statistics.median(ordered):.2f}", f"{p95:.2f}", f"{ordered[-1]:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    common.keep_bytecode()
    ns = parse(argv)
    env = {"IRLIVE_EVENT_MAX_WAIT_S": f"{ns.max_wait:g}", "IRLIVE_RATE_LIMIT_PER_S": f"{ns.rate:g}"}
    with Stack(settings_env={**common.base_env(), **env}) as stack:
        common.upload_images(stack, ns.backfill, prefix="backfill")
        common.reset(stack)
        stack.event_queue(common.IN_BUCKET, QUEUE)
        log = Path(stack.workdir) / "listener.log"
        listener = subprocess.Popen([str(common.IRLIVE_BIN), "listen", f"sqs://{QUEUE}", "--wait", "1"],
                                    env={**os.environ, **stack.env}, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            common.start_workers(stack, ns.workers, ns.concurrency, env)
            seen: set[str] = set()
            idle = trials(stack, "idle", ns.trials, seen)
            scan = common.run_cli(stack, env, "scan", common.source("backfill"), "--priority", "backfill", "--json")
            client = stack.redis_client()
            busy = trials(stack, "busy", ns.trials, seen)
            left = client.llen("irlive.backfill")
        finally:
            procs.kill_group(listener, signal.SIGTERM, timeout=20)
    bound = ns.max_wait + 3
    rows = [["idle fleet (baseline)", *summary(idle)], [f"{ns.backfill}-image backfill queued", *summary(busy)]]
    print(f"{ns.trials} lone events per case, IRLIVE_EVENT_MAX_WAIT_S={ns.max_wait:g}, rate {ns.rate:g}/s, "
          f"{ns.workers}x{ns.concurrency} worker slots ({common.machine()}, {common.today()})")
    print(common.table(["case", "median s", "p95 s", "max s"], rows))
    busy_p95 = float(summary(busy)[1])
    print(f"p95 with backfill / p95 idle: {busy_p95 / float(summary(idle)[1]):.2f}; bound p95 <= {bound:g} s; "
          f"backfill run {scan['run_id']}: {scan['enqueued']} images enqueued, {left} backfill chunks still "
          "queued when the last event landed")
    return 0 if busy_p95 <= bound and float(summary(idle)[1]) <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
