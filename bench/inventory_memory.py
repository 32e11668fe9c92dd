"""Peak memory of a dry run over an S3 Inventory: 100,000 rows against 10,000 in the same run (flat = ~1).

Writes both inventories in the real S3 Inventory layout (manifest.json naming gzip CSV data files, keys
URL-encoded, every field quoted; or with --format Parquet, Parquet data files) into moto_server, then runs
`producer.scan.estimate` over each one under tracemalloc. Nothing is uploaded but the inventory itself: a dry run
reads no image. tracemalloc does not see Arrow's own buffers: for Parquet the Arrow memory pool's peak is printed
too (a process-wide high-water mark, so the large run's figure includes the small one's).
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

from bench import common
from sandbox.stack import AWS_ENV, Stack
from worker.config import S3Location, Settings

SCHEMA = "Bucket, Key, Size, LastModifiedDate, ETag, IsLatest, IsDeleteMarker"
# The fileSchema AWS writes in the manifest of a Parquet inventory (versions "All": version_id, is_latest and
# is_delete_marker come together), trimmed to the fields irlive reads.
PARQUET_SCHEMA = ("message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); optional binary "
                  "version_id (UTF8); optional boolean is_latest; optional boolean is_delete_marker; optional int64 "
                  "size; optional int64 last_modified_date (TIMESTAMP_MILLIS); optional binary e_tag (UTF8); }")
INV_BUCKET = "bench-inventory"
ROWS_PER_FILE = 25_000


def inventory_rows(bucket: str, n: int, prefix: str = "captures") -> Iterable[tuple[str, str, int, str]]:
    """(bucket, key, size, etag) of n synthetic captures (not uploaded: a dry run does not read them)."""
    for i in range(n):
        yield bucket, f"{prefix}/day {i % 30:02d}/img_{i:07d}.png", 4000 + i % 97, f"{i:032x}"


def write_inventory(s3: Any, dest_bucket: str, source_bucket: str, rows: Iterable[tuple[str, str, int, str]],
                    config_id: str = "irlive", rows_per_file: int = ROWS_PER_FILE,
                    modified: datetime | None = None, file_format: str = "CSV") -> str:
    """Write an inventory as S3 does (CSV: gzip, keys URL-encoded; Parquet: keys as they are, written with pyarrow);
    returns the manifest's key."""
    moment = modified or datetime.now(UTC)
    when = moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H-%MZ")
    base = f"inventory/{source_bucket}/{config_id}"
    files: list[dict[str, Any]] = []
    buffer: list[tuple[str, str, int, str]] = []

    def flush() -> None:
        if file_format == "Parquet":
            body = _parquet_body(buffer, moment.replace(microsecond=0))
            key = f"{base}/data/{uuid.uuid4()}.parquet"
            s3.put_object(Bucket=dest_bucket, Key=key, Body=body)
            files.append({"key": key, "size": len(body), "MD5checksum": "0" * 32})
            buffer.clear()
            return
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
                "fileFormat": file_format, "fileSchema": PARQUET_SCHEMA if file_format == "Parquet" else SCHEMA,
                "files": files}
    manifest_key = f"{base}/{stamp}/manifest.json"
    s3.put_object(Bucket=dest_bucket, Key=manifest_key, Body=json.dumps(manifest).encode())
    return manifest_key


def _parquet_body(rows: list[tuple[str, str, int, str]], modified: datetime) -> bytes:
    import pyarrow as pa  # the optional `parquet` extra (in `dev`)
    import pyarrow.parquet as pq

    schema = pa.schema([("bucket", pa.string(), False), ("key", pa.string(), False), ("version_id", pa.string()),
                        ("is_latest", pa.bool_()), ("is_delete_marker", pa.bool_()), ("size", pa.int64()),
                        ("last_modified_date", pa.timestamp("ms", tz="UTC")), ("e_tag", pa.string())])
    table = pa.table({"bucket": [r[0] for r in rows], "key": [r[1] for r in rows], "version_id": [None] * len(rows),
                      "is_latest": [True] * len(rows), "is_delete_marker": [False] * len(rows),
                      "size": [r[2] for r in rows], "last_modified_date": [modified] * len(rows),
                      "e_tag": [r[3] for r in rows]}, schema=schema)
    out = io.BytesIO()
    pq.write_table(table, out, compression="snappy")
    return out.getvalue()


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


def arrow_peak() -> str:
    """The Arrow memory pool's high-water mark, when pyarrow has been loaded (a Parquet inventory was read)."""
    if "pyarrow" not in sys.modules:
        return ""
    return f", Arrow pool peak {sys.modules['pyarrow'].default_memory_pool().max_memory() / 1e6:6.2f} MB"


def main(argv: Sequence[str] | None = None) -> int:
    common.keep_bytecode()
    p = argparse.ArgumentParser(prog="python -m bench.inventory_memory", description=__doc__)
    p.add_argument("--small", type=int, default=10_000)
    p.add_argument("--large", type=int, default=100_000)
    p.add_argument("--format", choices=("CSV", "Parquet"), default="CSV", help="the inventory's data files")
    ns = p.parse_args(argv)
    with Stack(settings_env={"IRLIVE_OUTPUT": "s3://bench-out/results"}) as stack:
        s3 = stack.s3_client()
        for bucket in (INV_BUCKET, "bench-in", "bench-out"):
            s3.create_bucket(Bucket=bucket)
        small = write_inventory(s3, INV_BUCKET, "bench-in", inventory_rows("bench-in", ns.small), config_id="small",
                                file_format=ns.format)
        large = write_inventory(s3, INV_BUCKET, "bench-in", inventory_rows("bench-in", ns.large), config_id="large",
                                file_format=ns.format)
        measure(stack, small)  # warm-up: imports and the S3 client's first connection are not the inventory's
        found_s, peak_s, secs_s = measure(stack, small)
        arrow_s = arrow_peak()
        found_l, peak_l, secs_l = measure(stack, large)
        arrow_l = arrow_peak()
    print(f"{ns.format} inventory {found_s:>7} rows: peak {peak_s / 1e6:6.2f} MB traced, {secs_s:5.1f} s{arrow_s}")
    print(f"{ns.format} inventory {found_l:>7} rows: peak {peak_l / 1e6:6.2f} MB traced, {secs_l:5.1f} s{arrow_l}")
    print(f"rows ratio {found_l / max(found_s, 1):.1f}x, peak memory ratio {peak_l / max(peak_s, 1):.2f} (flat = ~1)")
    return 0 if found_s == ns.small and found_l == ns.large else 1


if __name__ == "__main__":
    sys.exit(main())
