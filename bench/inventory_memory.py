"""Peak memory of a dry run over an S3 Inventory: 100,000 rows against 10,000 in the same run (flat = ~1).

Writes both inventories in the real S3 Inventory layout (manifest.json naming gzip CSV data files, keys
URL-encoded, every field quoted) into moto_server, then runs `producer.scan.estimate` over each one under
tracemalloc. Nothing is uploaded but the inventory itself: a dry run reads no image.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import sys
import time
import tracemalloc
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote_plus

from sandbox.stack import AWS_ENV, Stack
from worker.config import S3Location, Settings

SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag, IsLatest, IsDeleteMarker"
INV_BUCKET = "bench-inventory"
ROWS_PER_FILE = 25_000


def inventory_rows(bucket: str, n: int, prefix: str = "captures") -> Iterable[tuple[str, str, int, str]]:
    """(bucket, key, size, etag) of n synthetic captures (not uploaded: a dry run does not read them)."""
    for i in range(n):
        yield bucket, f"{prefix}/day {i % 30:02d}/img_{i:07d}.png", 4000 + i % 97, f"{i:032x}"


def write_inventory(s3: Any, dest_bucket: str, source_bucket: str, rows: Iterable[tuple[str, str, int, str]],
                    config_id: str = "irlive", rows_per_file: int = ROWS_PER_FILE,
                    modified: datetime | None = None) -> str:
    """Write an inventory as S3 does (CSV, gzip, keys URL-encoded); returns the manifest's key."""
    when = (modified or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%MZ")
    base = f"inventory/{source_bucket}/{config_id}"
    files: list[dict[str, Any]] = []
    buffer: list[tuple[str, str, int, str]] = []

    def flush() -> None:
        text = io.StringIO()
        writer = csv.writer(text, quoting=csv.QUOTE_ALL, lineterminator="\n")
        for bucket, key, size, etag in buffer:
            writer.writerow([bucket, quote_plus(key, safe="/"), size, when, etag, "true", "false"])
        body = gzip.compress(text.getvalue().encode())
        key = f"{base}/data/{uuid.uuid4()}.csv.gz"
        s3.put_object(Bucket=dest_bucket, Key=key, Body=body)
        files.append({"key": key, "size": len(body), "MD5checksum": "0" * 32})
        buffer.clear()

    for row in rows:
        buffer.append(row)
        if len(buffer) >= rows_per_file:
            flush()
    if buffer:
        flush()
    manifest = {"sourceBucket": source_bucket, "destinationBucket": f"arn:aws:s3:::{dest_bucket}",
                "version": "2016-11-30", "creationTimestamp": str(int(time.time() * 1000)),
                "fileFormat": "CSV", "fileSchema": SCHEMA, "files": files}
    manifest_key = f"{base}/{stamp}/manifest.json"
    s3.put_object(Bucket=dest_bucket, Key=manifest_key, Body=json.dumps(manifest).encode())
    return manifest_key


def measure(stack: Stack, manifest_key: str) -> tuple[int, int, float]:
    """(images found, peak bytes allocated, seconds) of one dry run over the inventory."""
    from producer.filters import DEFAULT_SUFFIXES
    from producer.scan import ScanRequest, estimate
    from producer.sources import parse_source
    from worker.flow.claims import Claims
    from worker.keys import Keys
    from worker.seams.storage import Storage
    from worker.seams.store import Store

    settings = replace(Settings(), output=S3Location("bench-out", "results"))
    storage = Storage(stack.s3_endpoint, credentials=(AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"]))
    claims = Claims(Store.from_url(stack.redis_url), Keys())
    request = ScanRequest(parse_source(f"inventory://{INV_BUCKET}/{manifest_key}"), DEFAULT_SUFFIXES)
    assert settings.output is not None
    tracemalloc.start()
    tracemalloc.reset_peak()
    started = time.perf_counter()
    est = estimate(settings, storage, claims, request, settings.output, 20, "bench")
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return est.found, peak, elapsed


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inventory_memory", description=__doc__)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--large", type=int, default=100_000)
    ns = p.parse_args(argv)
    with Stack(settings_env={"IRLIVE_OUTPUT": "s3://bench-out/results"}) as stack:
        s3 = stack.s3_client()
        for bucket in (INV_BUCKET, "bench-in", "bench-out"):
            s3.create_bucket(Bucket=bucket)
        small = write_inventory(s3, INV_BUCKET, "bench-in", inventory_rows("bench-in", ns.small), config_id="small")
        large = write_inventory(s3, INV_BUCKET, "bench-in", inventory_rows("bench-in", ns.large), config_id="large")
        measure(stack, small)  # warm-up: imports and the S3 client's first connection are not the inventory's
        found_s, peak_s, secs_s = measure(stack, small)
        found_l, peak_l, secs_l = measure(stack, large)
    print(f"inventory {found_s:>7} rows: peak {peak_s / 1e6:6.2f} MB traced, {secs_s:5.1f} s")
    print(f"inventory {found_l:>7} rows: peak {peak_l / 1e6:6.2f} MB traced, {secs_l:5.1f} s")
    print(f"rows ratio {found_l / max(found_s, 1):.1f}x, peak memory ratio {peak_l / max(peak_s, 1):.2f} (flat = ~1)")
    return 0 if found_s == ns.small and found_l == ns.large else 1


if __name__ == "__main__":
    sys.exit(main())
