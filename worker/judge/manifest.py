"""Manifest documents (per image, per chunk, per run) and their S3 keys (pure: no I/O)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.config import S3Location
from worker.judge.verdicts import Judgement

SCHEMA_VERSION = 1
_MD5 = re.compile(r"[0-9a-f]{32}")
VERDICTS = ("live", "spoof", "no_face", "rejected", "error", "not_judged")
# Verdicts that say why an image has no judgment: failed.jsonl lists them, a redrive may judge them again.
UNJUDGED = ("rejected", "error", "not_judged")
JUDGED = ("live", "spoof", "no_face")


@dataclass(frozen=True)
class Item:
    """One image of a chunk: where it is and, once known, which version of it."""

    bucket: str
    key: str
    etag: str = ""

    @property
    def identity(self) -> str:
        """`bucket/key@etag`: a changed object is a new identity, an unchanged one never is."""
        return f"{self.bucket}/{self.key}@{self.etag}"


def join_identities(identities: list[str]) -> str:
    """A paid call's image identities as one field, comma-separated: an S3 key may hold commas (and `%`), so
    each is escaped; settle.lua counts the images by their commas."""
    return ",".join(i.replace("%", "%25").replace(",", "%2C") for i in identities)


def split_identities(field: str) -> list[str]:
    """The identities `join_identities` wrote."""
    return [i.replace("%2C", ",").replace("%25", "%") for i in field.split(",") if i]


# Ledger fields that payments.jsonl writes as numbers, and as true/false.
_PAYMENT_INTS = ("amount_cents", "price_cents", "created_ms", "updated_ms", "sent_ms", "expires_ms")
_PAYMENT_FLAGS = ("lost",)
# Ledger bookkeeping that means nothing once the payment is archived.
_PAYMENT_DROPPED = ("committed", "call_open")


def payment_document(record: dict[str, Any]) -> dict[str, Any]:
    """One line of payments.jsonl (docs/schemas/payment.schema.json) from the ledger's record (all strings) or
    from a line an earlier pass wrote: numbers as numbers, images and URLs as lists."""
    doc: dict[str, Any] = {k: v for k, v in record.items() if k not in _PAYMENT_DROPPED}
    for name in _PAYMENT_INTS:
        value = doc.get(name)
        if isinstance(value, str):
            doc[name] = int(value) if value.lstrip("-").isdigit() else None
    for name in _PAYMENT_FLAGS:
        if isinstance(doc.get(name), str):
            doc[name] = doc[name] == "1"
    if isinstance(doc.get("images"), str):
        doc["images"] = split_identities(doc["images"])
    if isinstance(doc.get("urls"), str):
        doc["urls"] = [u for u in doc["urls"].split("\n") if u]
    return doc


def iso_ms(iso: str | None) -> int:
    """An ISO 8601 time ('...Z' or with an offset) as epoch milliseconds; 0 when absent or unreadable."""
    if not iso:
        return 0
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return 0


def chunk_key(output: S3Location, run_id: str, seq: int) -> str:
    return output.key("runs", run_id, "chunks", f"{seq:06d}.json")


def run_manifest_key(output: S3Location, run_id: str) -> str:
    return output.key("runs", run_id, "manifest.json")


def failed_key(output: S3Location, run_id: str) -> str:
    return output.key("runs", run_id, "failed.jsonl")


def payments_key(output: S3Location, run_id: str) -> str:
    return output.key("runs", run_id, "payments.jsonl")


def results_key(output: S3Location, run_id: str, fmt: str = "csv") -> str:
    return output.key("runs", run_id, f"results.{fmt}")


def report_key(output: S3Location, run_id: str) -> str:
    return output.key("runs", run_id, "report.html")


def history_prefix(output: S3Location) -> str:
    return output.key("history") + "/"


def history_key(output: S3Location, run_id: str, created_ms: int) -> str:
    """One small summary per run; the name sorts newest first (S3 lists in ascending order)."""
    return output.key("history", f"{10**13 - created_ms:013d}-{run_id}.json")


def index_key(output: S3Location) -> str:
    return output.key("index.html")


def jsonl(docs: Iterable[dict[str, Any]]) -> bytes:
    lines = [json.dumps(d, sort_keys=True, ensure_ascii=True) for d in docs]
    return ("\n".join(lines) + "\n").encode() if lines else b""


def judged_record(item: Item, size: int, judgement: Judgement, *, request_id: str | None,
                  attempts: int, judged_at: str, warning: str | None = None) -> dict[str, Any]:
    return {
        "warning": warning,
        "bucket": item.bucket,
        "key": item.key,
        "etag": item.etag,
        "size": size,
        "verdict": judgement.verdict,
        "suggestion": judgement.suggestion,
        "rate": judgement.rate,
        "faces": judgement.faces,
        "face_results": [f.as_dict() for f in judgement.face_results],
        "message_tips": judgement.message_tips,
        "request_id": request_id,
        "reason": None,
        "error_code": None,
        "attempts": attempts,
        "judged_at": judged_at,
    }


def unjudged_record(item: Item, size: int | None, verdict: str, *, reason: str, code: str,
                    attempts: int, judged_at: str, request_id: str | None = None) -> dict[str, Any]:
    """A `rejected` (never paid), `error` (tried and failed) or `not_judged` (its run was cancelled or failed
    first) record, with why."""
    assert verdict in UNJUDGED
    return {
        "bucket": item.bucket,
        "key": item.key,
        "etag": item.etag,
        "size": size,
        "verdict": verdict,
        "suggestion": None,
        "rate": None,
        "faces": None,
        "face_results": [],
        "message_tips": None,
        "request_id": request_id,
        "reason": reason,
        "error_code": code,
        "attempts": attempts,
        "judged_at": judged_at,
    }


def duplicate_record(item: Item, size: int | None, verdict: str, first: dict[str, Any] | None, *,
                     run_id: str, seq: int, judged_at: str) -> dict[str, Any]:
    """The record of an image another run (or chunk) judged: its judgment, marked `duplicate_of`, paid nothing.

    `first` is that judgment's own record when it can still be read; else only the verdict is known.
    """
    record = dict(first) if first else {
        "suggestion": None, "rate": None, "faces": None, "face_results": [], "message_tips": None,
        "request_id": None, "judged_at": judged_at, "warning": None,
    }
    if verdict == "no_face":
        record["faces"] = 0
    record.update(bucket=item.bucket, key=item.key, etag=item.etag, size=size, verdict=verdict, reason=None,
                  error_code=None, attempts=0, duplicate_of={"run_id": run_id, "seq": seq})
    record.pop("reused_from_run", None)
    return record


def same_content_record(item: Item, size: int | None, verdict: str, first: dict[str, Any] | None, *,
                        run_id: str, seq: int, judged_at: str) -> dict[str, Any]:
    """The record of a byte-identical copy of an image judged before: that judgment, marked `same_content_as`
    (where the judged object is), paid nothing. Its own identity enters the done-set, so a rescan skips it."""
    record = duplicate_record(item, size, verdict, first, run_id=run_id, seq=seq, judged_at=judged_at)
    del record["duplicate_of"]
    record["same_content_as"] = {"run_id": run_id, "seq": seq, **({k: first[k] for k in ("bucket", "key", "etag")}
                                                                  if first else {})}
    return record


def content_key(etag: str, size: int | None) -> str | None:
    """Byte-identical objects share this key. A single-part upload's ETag is the MD5 of its bytes (the size is
    added, so a collision must match the length too); a multipart ETag ("...-N") is not: None."""
    etag = etag.lower()
    if size is None or not _MD5.fullmatch(etag):
        return None
    return f"md5:{etag}:{size}"


def sha256_content_key(data: bytes) -> str:
    """The content key of an object whose ETag says nothing of its bytes, from the bytes themselves."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}:{len(data)}"


def count_verdicts(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(VERDICTS, 0)
    for record in records:
        counts[record["verdict"]] += 1
    return counts


def chunk_document(run_id: str, seq: int, records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "chunk",
        "run_id": run_id,
        "seq": seq,
        "counts": count_verdicts(records),
        "images": records,
    }


def run_document(run: dict[str, Any], chunks: list[dict[str, Any]], failed: dict[str, Any]) -> dict[str, Any]:
    """The run index; `chunks` are {seq, key, etag, counts}; counts are the sum of the chunks' counts."""
    counts = dict.fromkeys(VERDICTS, 0)
    for chunk in chunks:
        for verdict, n in chunk["counts"].items():
            counts[verdict] += n
    images = sum(counts.values())
    spend_cents = int(run.get("spend_cents", 0))
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "run",
        "run_id": run["run_id"],
        "source": run.get("source"),
        "created_at": run.get("created_at"),
        "finished_at": run.get("finished_at"),
        "images": images,
        "skipped": int(run.get("skipped", 0)),
        "counts": counts,
        "calls": int(run.get("calls", 0)),
        "spend_cents": spend_cents,
        "spend_usd": f"{spend_cents / 100:.2f}",
        "chunks": chunks,
        "failed": failed,
        "settings": run.get("settings", {}),
    }


def failed_lines(records: Iterable[dict[str, Any]]) -> bytes:
    """failed.jsonl: one line per image that ended without a judgment (rejected, error, not_judged)."""
    failed = (r for r in records if r["verdict"] in UNJUDGED)
    lines = [json.dumps(r, sort_keys=True, ensure_ascii=True) for r in failed]
    return ("\n".join(lines) + "\n").encode() if lines else b""
