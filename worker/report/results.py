"""One results file per run (as S3 Batch Operations' completion report): one row per image, from the chunk
records and the run's payments (pure: no I/O; parquet through pyarrow when the extra is installed)."""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from worker.errors import ConfigError
from worker.judge.manifest import split_identities

FIELDS = ("bucket", "key", "etag", "verdict", "suggestion", "confidence", "faces", "reason", "error_code",
          "request_id", "cost_cents", "judged_at", "duplicate_of_run")
FORMATS = ("csv", "jsonl", "parquet")


def cost_shares(payments: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """What each image identity cost: every spent payment's amount shared among the images it carried (an
    image whose answer was lost and that was paid again carries both shares)."""
    shares: dict[str, float] = defaultdict(float)
    for payment in payments:
        if payment.get("state") != "spent":
            continue
        raw = payment.get("images") or []
        images = list(raw) if isinstance(raw, list) else split_identities(str(raw))
        amount = float(payment.get("amount_cents") or payment.get("price_cents") or 0)
        for identity in images:
            shares[identity] += amount / len(images)
    return dict(shares)


def result_row(record: Mapping[str, Any], shares: Mapping[str, float]) -> dict[str, Any]:
    """One image's row; `confidence` is the seller's Rate (0-100) of its worst face."""
    identity = f"{record['bucket']}/{record['key']}@{record.get('etag') or ''}"
    duplicate = record.get("duplicate_of") or record.get("same_content_as") or {}
    return {
        "bucket": record["bucket"],
        "key": record["key"],
        "etag": record.get("etag") or "",
        "verdict": record["verdict"],
        "suggestion": record.get("suggestion"),
        "confidence": record.get("rate"),
        "faces": record.get("faces"),
        "reason": record.get("reason"),
        "error_code": record.get("error_code"),
        "request_id": record.get("request_id"),
        "cost_cents": round(shares.get(identity, 0.0), 4),
        "judged_at": record.get("judged_at"),
        "duplicate_of_run": duplicate.get("run_id"),
    }


def rows(records: Iterable[Mapping[str, Any]], payments: Iterable[Mapping[str, Any]],
         verdict: str | None = None) -> list[dict[str, Any]]:
    shares = cost_shares(payments)
    return [result_row(r, shares) for r in records if verdict is None or r["verdict"] == verdict]


def to_csv(table: Iterable[Mapping[str, Any]]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: "" if row[k] is None else row[k] for k in FIELDS})
    return out.getvalue().encode()


def to_jsonl(table: Iterable[Mapping[str, Any]]) -> bytes:
    return b"".join(json.dumps(dict(row), ensure_ascii=True).encode() + b"\n" for row in table)


def parquet_available() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def to_parquet(table: list[dict[str, Any]]) -> bytes:
    """The rows as one Parquet file, typed (confidence and cost as doubles, faces as an integer)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("parquet needs pyarrow: pip install 'irlive[parquet]'") from exc
    types = {"confidence": pa.float64(), "cost_cents": pa.float64(), "faces": pa.int64()}
    schema = pa.schema([(name, types.get(name, pa.string())) for name in FIELDS])
    columns = {name: [row[name] for row in table] for name in FIELDS}
    out = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), out)
    return bytes(out.getvalue().to_pybytes())


def encode(table: list[dict[str, Any]], fmt: str) -> bytes:
    if fmt == "csv":
        return to_csv(table)
    if fmt == "jsonl":
        return to_jsonl(table)
    if fmt == "parquet":
        return to_parquet(table)
    raise ConfigError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
