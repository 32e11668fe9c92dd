"""Listing a prefix of date partitions: one paginator against IRLIVE_LIST_WORKERS threads, in the same run.

Puts empty objects under captures/YYYY/MM/DD/HH/ in moto_server, then times `S3Source.rows` with one
paginator and with the parallel split on "/" (both must list the same keys), best of a few alternating rounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from bench import common
from producer.sources import S3Source
from sandbox.stack import AWS_ENV, Stack
from worker.config import S3Location
from worker.seams.storage import Storage

BUCKET = "bench-list"
PREFIX = "captures"


def keys_for(n: int, days: int) -> list[str]:
    return [f"{PREFIX}/2026/11/{1 + i % days:02d}/{i // days % 24:02d}/img_{i:06d}.png" for i in range(n)]


def timed(source: S3Source, storage: Storage) -> tuple[float, list[str]]:
    started = time.perf_counter()
    keys = [row.info.key for row in source.rows(storage)]
    return time.perf_counter() - started, keys


def main(argv: Sequence[str] | None = None) -> int:
    common.keep_bytecode()
    p = argparse.ArgumentParser(prog="python -m bench.listing", description=__doc__)
    p.add_argument("--keys", type=int, default=20_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--workers", type=int, default=8, help="listing threads of the parallel run (IRLIVE_LIST_WORKERS)")
    p.add_argument("--rounds", type=int, default=2)
    ns = p.parse_args(argv)
    with Stack(settings_env=common.base_env()) as stack:
        s3 = common.s3_client(stack)
        s3.create_bucket(Bucket=BUCKET)
        keys = keys_for(ns.keys, ns.days)
        started = time.perf_counter()
        with ThreadPoolExecutor(common.UPLOAD_THREADS) as pool:
            list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=b""), keys))
        print(f"put {len(keys)} objects over {ns.days} days x 24 hours in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
        storage = Storage(stack.s3_endpoint, credentials=(AWS_ENV["AWS_ACCESS_KEY_ID"],
                                                          AWS_ENV["AWS_SECRET_ACCESS_KEY"]))
        location = S3Location(BUCKET, PREFIX)
        plain, parallel = S3Source(location, 1), S3Source(location, ns.workers)
        best_plain = best_parallel = float("inf")
        for _ in range(ns.rounds):
            secs, one = timed(plain, storage)
            best_plain = min(best_plain, secs)
            secs, many = timed(parallel, storage)
            best_parallel = min(best_parallel, secs)
            if sorted(many) != one or len(one) != ns.keys:
                print("parallel listing found different keys", file=sys.stderr)
                return 1
    print(f"one paginator       {best_plain:6.2f} s  ({ns.keys / best_plain:7.0f} keys/s)")
    print(f"{ns.workers} listing threads  {best_parallel:6.2f} s  ({ns.keys / best_parallel:7.0f} keys/s)")
    print(f"speed-up {best_plain / best_parallel:.2f}x (same {ns.keys} keys, best of {ns.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
