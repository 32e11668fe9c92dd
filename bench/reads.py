"""What the worker's S3 requests for an image cost it: client CPU per validation read (a presigned ranged GET)
through each way it could be sent, against botocore's HTTP session (what irlive used before
`worker/seams/reads.py`), on the same URLs in the same run; and per overwrite check of a 50-key chunk, with a
first page of 1,000 keys (before) and sized to the chunk (now). From bench.fakes3 on loopback (in memory,
keep-alive: the server is not what is measured).

    python -m bench.reads [--reads 3000] [--threads 1]

Rows: botocore's client (`get_object` with a Range: the whole request pipeline), botocore's URLLib3Session
with a presigned URL, urllib3's connection pool, httpx, irlive's reader; then the validation read as it was
(a URL presigned, then sent through botocore's session) and `Storage.read_head` as it is (presigning, the
reader, the answer's parsing). With --threads N, N threads read at once (the GIL's share is
then counted in too, as in a worker).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import httpx
import urllib3
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.httpsession import URLLib3Session

from bench import common
from bench.throughput import fast_s3
from sandbox.images import png
from worker.seams.reads import Reader
from worker.seams.storage import Storage

# bench.fakes3 as the throughput benchmark starts it: its empty output bucket is this one's.
BUCKET = common.OUT_BUCKET
OBJECTS = 200
HEAD_BYTES = 4096
RANGE = {"Range": f"bytes=0-{HEAD_BYTES - 1}"}
CHUNK = 50
LISTED = 12_000


def _timed(read: Callable[[str, str], object], keys: list[str], urls: list[str], threads: int) -> float:
    """CPU microseconds of this process per read."""
    for key, url in zip(keys[:50], urls[:50], strict=True):
        read(key, url)  # connections opened, caches warm
    started = time.process_time()
    if threads == 1:
        for key, url in zip(keys, urls, strict=True):
            read(key, url)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, keys, urls))
    return 1e6 * (time.process_time() - started) / len(keys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=3000, help="reads timed per way (default 3000)")
    parser.add_argument("--threads", type=int, default=1, help="threads reading at once (default 1)")
    ns = parser.parse_args(argv)
    with fast_s3() as (endpoint, _):
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"})
        storage = Storage(endpoint, max_connections=max(4, ns.threads))
        s3 = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          max_pool_connections=max(4, ns.threads)))
        for i in range(OBJECTS):
            s3.put_object(Bucket=BUCKET, Key=f"k/img_{i:04d}.png", Body=png(64, 64, "live", seed=i))
        keys = [f"k/img_{i % OBJECTS:04d}.png" for i in range(ns.reads)]
        urls = [storage.presign_get(BUCKET, key, 900) for key in keys]
        session = URLLib3Session(timeout=(10, 30), max_pool_connections=max(4, ns.threads))
        pool = urllib3.HTTPConnectionPool("127.0.0.1", int(endpoint.rsplit(":", 1)[1]), maxsize=max(4, ns.threads))
        client = httpx.Client(limits=httpx.Limits(max_keepalive_connections=max(4, ns.threads)))
        reader = Reader(ca_file=None, connect_timeout_s=10, read_timeout_s=30, max_idle_per_host=max(4, ns.threads))

        def botocore_client(key: str, url: str) -> object:
            return s3.get_object(Bucket=BUCKET, Key=key, Range=RANGE["Range"])["Body"].read()

        def botocore_session(key: str, url: str) -> object:
            request = AWSRequest(method="GET", url=url, headers=RANGE)
            request.stream_output = True
            response = session.send(request.prepare())
            body = response.raw.read(HEAD_BYTES)
            response.raw.release_conn()
            return body, response.headers.get("ETag")

        def urllib3_pool(key: str, url: str) -> object:
            response = pool.urlopen("GET", url[len(endpoint):], headers=RANGE, preload_content=False,
                                    retries=False, redirect=False)
            body = response.read(HEAD_BYTES)
            response.release_conn()
            return body, response.headers.get("ETag")

        def httpx_client(key: str, url: str) -> object:
            with client.stream("GET", url, headers=RANGE) as response:
                return b"".join(response.iter_raw()), response.headers.get("etag")

        def irlive_reader(key: str, url: str) -> object:
            return reader.get(url, RANGE, HEAD_BYTES, 64 * 1024)

        def read_head_before(key: str, url: str) -> object:
            return botocore_session(key, storage.presign_get(BUCKET, key, 300))

        def read_head(key: str, url: str) -> object:
            return storage.read_head(BUCKET, key, HEAD_BYTES)

        ways: list[tuple[str, Callable[[str, str], object]]] = [
            ("botocore session (before)", botocore_session), ("botocore client get_object", botocore_client),
            ("urllib3 pool", urllib3_pool), ("httpx", httpx_client), ("irlive reader", irlive_reader),
            ("presign + botocore session (read_head before)", read_head_before),
            ("Storage.read_head (presign + reader)", read_head)]
        figures = {name: _timed(read, keys, urls, ns.threads) for name, read in ways}
        checks = _overwrite_checks(storage, s3)
    base = figures["botocore session (before)"]
    print(f"{ns.reads} presigned ranged GETs of {HEAD_BYTES} bytes per way, {ns.threads} thread(s), "
          f"bench.fakes3 on loopback ({common.machine()}, {common.today()})")
    print(common.table(["way", "client CPU µs per read", "÷ botocore session"],
                       [[name, f"{us:.0f}", f"{us / base:.2f}"] for name, us in figures.items()]))
    print()
    print(f"Overwrite check of a chunk of {CHUNK} keys that share no long prefix ({LISTED:,} objects in the bucket)")
    print(common.table(["way", "client CPU ms per check", "÷ before"],
                       [[name, f"{ms:.1f}", f"{ms / checks['first page of 1,000 keys (before)']:.2f}"]
                        for name, ms in checks.items()]))
    return 0


def _overwrite_checks(storage: Storage, s3: Any) -> dict[str, float]:
    """CPU ms per check of CHUNK keys straddling a decimal boundary (their common prefix bounds nothing, as with
    random names): botocore's paginator with pages of 1,000 (before), and Storage.current_etags (now)."""
    names = [f"c/img_{i:07d}.png" for i in range(LISTED)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=b"x"), names))
    chunks = [names[start - CHUNK // 2:start + CHUNK // 2] for start in range(1000, LISTED - 1000, 1000)]

    def before(chunk: list[str]) -> object:
        # The storage's own client (its fast timestamp parser), as current_etags used it before.
        pages = storage._s3.get_paginator("list_objects_v2").paginate(
            Bucket=BUCKET, Prefix="c/img_", StartAfter=chunk[0][:-1], PaginationConfig={"PageSize": 1000})
        return next(iter(pages))

    def sized(chunk: list[str]) -> object:
        # One page sized to the chunk, through botocore, as current_etags read it until December 7.
        return storage._s3.list_objects_v2(Bucket=BUCKET, Prefix="c/img_", StartAfter=chunk[0][:-1],
                                           MaxKeys=2 * len(chunk) + 8)

    def now(chunk: list[str]) -> object:
        return storage.current_etags(BUCKET, chunk)

    figures = {}
    for name, check in (("first page of 1,000 keys (before)", before),
                        ("a page sized to the chunk, botocore", sized),
                        ("Storage.current_etags (now: read raw)", now)):
        check(chunks[0])
        started = time.process_time()
        for _ in range(3):
            for chunk in chunks:
                check(chunk)
        figures[name] = 1e3 * (time.process_time() - started) / (3 * len(chunks))
    return figures


if __name__ == "__main__":
    sys.exit(main())
