"""`irlive demo`: a local stack, synthetic captures with known truth, a scan, and a checked summary."""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

from producer.filters import DEFAULT_SUFFIXES
from producer.scan import ScanRequest, scan
from producer.status import follow
from sandbox.images import Sample, demo_corpus
from sandbox.stack import AWS_ENV, Stack
from worker.app import make_app
from worker.config import S3Location, Settings
from worker.flow.claims import Claims
from worker.flow.runs import Runs
from worker.judge.manifest import chunk_key, failed_key, payments_key, run_manifest_key
from worker.keys import Keys
from worker.seams.storage import Storage
from worker.seams.store import Store

SOURCE = S3Location("irlive-demo-captures", "captures")
OUTPUT = S3Location("irlive-demo-results", "irlive")
TRUTHS = ("live", "spoof", "no_face", "rejected")


def run_demo(images: int, workers: int, out_dir: str, json_out: bool = False, payment_method: str = "token") -> int:
    """Returns 0 when every verdict matches the truth and the worker's calls equal the sandbox's bills.

    With json_out the running commentary goes to stderr and stdout gets one JSON document (docs/schemas/
    demo.schema.json) summarising the run, whatever its end.
    """
    say = _Say(sys.stderr if json_out else sys.stdout)
    started = time.monotonic()
    corpus = demo_corpus(images, prefix=SOURCE.prefix)
    doc: dict[str, Any] = {"schema_version": 1, "ok": False, "images": len(corpus),
                           "invalid_images": sum(s.expected == "rejected" for s in corpus), "workers": workers,
                           "run_id": None, "state": None}
    env_extra = {
        "IRLIVE_OUTPUT": str(OUTPUT),
        "IRLIVE_RATE_LIMIT_PER_S": "20",
        "IRLIVE_RATE_BURST": "4",
        "IRLIVE_PAYMENT_METHOD": payment_method,
    }
    if payment_method == "x402":
        # A throwaway payer made for this demo: the sandbox settles on no chain, so it never holds anything.
        env_extra["IRLIVE_X402_PRIVATE_KEY"] = "0x" + secrets.token_hex(32)
    say(f"starting a local stack: redis, moto_server, the sandbox marketplace, {workers} worker(s) paying by "
        f"{payment_method}")
    try:
        with Stack(workers=workers, concurrency=8, settings_env=env_extra) as stack:
            settings = Settings.from_env({**os.environ, **stack.env})
            storage = Storage(settings.s3_endpoint_url, settings.s3_region,
                              credentials=(AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"]))
            _upload(storage, corpus)
            say(f"uploaded {len(corpus)} captures to {SOURCE} ({doc['invalid_images']} of them deliberately "
                "invalid)")
            store, keys = Store.from_url(settings.redis_url), Keys(settings.key_prefix)
            runs = Runs(store, keys)
            result = scan(settings, storage, runs, Claims(store, keys), make_app(settings),
                          ScanRequest(SOURCE, DEFAULT_SUFFIXES), OUTPUT)
            assert result.run_id is not None
            doc["run_id"] = result.run_id
            say(f"run {result.run_id}: {result.enqueued} images in {result.chunks} chunks")
            final = follow(runs, result.run_id, timeout_s=300)
            doc["state"] = final.state
            if final.state != "done":
                doc["error"] = final.error or "timed out"
                say(f"run ended in state {final.state}: {doc['error']}")
                return 1
            ledger = stack.sandbox_ledger()
            copied = _copy_manifests(storage, result.run_id, Path(out_dir))
            doc["manifests"] = str(copied)
            doc.update(_summary(storage, result.run_id, corpus, ledger, say))
        say(f"manifests copied to {copied}  ({time.monotonic() - started:.1f}s in all)")
        if (copied / "report.html").exists():
            doc["report"] = str(copied / "report.html")
            say(f"report: {copied / 'report.html'}  (open it in a browser: the run, its money and what to review)")
        return 0 if doc["ok"] else 1
    finally:
        doc["elapsed_s"] = round(time.monotonic() - started, 1)
        if json_out:
            print(json.dumps(doc), flush=True)


class _Say:
    """The demo's running commentary: stdout, or stderr when stdout carries the JSON summary."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def _upload(storage: Storage, corpus: list[Sample]) -> None:
    for location in (SOURCE, OUTPUT):
        storage.ensure_bucket(location.bucket)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda s: storage.put_bytes(SOURCE.bucket, s.key, s.body, _content_type(s.key)), corpus))


def _content_type(key: str) -> str:
    return "image/jpeg" if key.lower().endswith((".jpg", ".jpeg")) else "image/png"


def _records(storage: Storage, run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    manifest, _ = storage.get_json(OUTPUT.bucket, run_manifest_key(OUTPUT, run_id))
    records: list[dict[str, Any]] = []
    for chunk in manifest["chunks"]:
        doc, _ = storage.get_json(OUTPUT.bucket, chunk["key"])
        records.extend(doc["images"])
    return manifest, records


def _summary(storage: Storage, run_id: str, corpus: list[Sample], ledger: dict[str, Any],
             say: Callable[[str], None]) -> dict[str, Any]:
    """Print the verdicts against the truth and the calls against the sandbox's bills; return them as the
    demo's JSON summary fields (ok says whether everything matched)."""
    manifest, records = _records(storage, run_id)
    by_key = {r["key"]: r for r in records}
    table: dict[str, Counter[str]] = {}
    mismatches: list[str] = []
    for sample in corpus:
        got = by_key.get(sample.key, {}).get("verdict", "missing")
        row = table.setdefault(sample.expected, Counter())
        row["images"] += 1
        row["matched" if got == sample.expected else "wrong"] += 1
        if got != sample.expected:
            mismatches.append(f"{sample.key}: expected {sample.expected}, got {got}")
    say("")
    say(f"{'truth':<10}{'images':>8}{'matched':>9}{'wrong':>7}")
    for truth in TRUTHS:
        row = table.get(truth, Counter())
        say(f"{truth:<10}{row['images']:>8}{row['matched']:>9}{row['wrong']:>7}")
    judged = sum(manifest["counts"][v] for v in ("live", "spoof", "no_face"))
    calls = manifest["calls"]
    say("")
    say(f"records   {len(records)} for {len(corpus)} objects (one per image: {len(by_key) == len(records)})")
    say(f"calls     {calls} paid calls for {judged} judged images: {calls / max(judged, 1):.3f} calls per image")
    say(f"spend     ${manifest['spend_usd']}  (${int(manifest['spend_cents']) / max(judged, 1) / 100:.4f} per image)")
    say(f"sandbox   billed {ledger['calls_billed']} calls, {ledger['images_billed']} images")
    say(f"failed    {manifest['failed']['count']} images listed in failed.jsonl")
    for line in mismatches[:20]:
        say("  " + line)
    agrees = ledger["calls_billed"] == calls
    if not agrees:
        say("MISMATCH: the worker recorded a different number of calls than the sandbox billed")
    return {
        "ok": not mismatches and agrees and len(records) == len(corpus),
        "truth": {t: {k: table.get(t, Counter())[k] for k in ("images", "matched", "wrong")} for t in TRUTHS},
        "records": len(records),
        "judged": judged,
        "calls": calls,
        "spend_cents": int(manifest["spend_cents"]),
        "sandbox": {"calls_billed": ledger["calls_billed"], "images_billed": ledger["images_billed"]},
        "failed": manifest["failed"]["count"],
        "mismatches": mismatches[:20],
    }


def _copy_manifests(storage: Storage, run_id: str, out_dir: Path) -> Path:
    target = out_dir / run_id
    (target / "chunks").mkdir(parents=True, exist_ok=True)
    manifest, _ = storage.get_json(OUTPUT.bucket, run_manifest_key(OUTPUT, run_id))
    keys = [run_manifest_key(OUTPUT, run_id), failed_key(OUTPUT, run_id), payments_key(OUTPUT, run_id)]
    keys += [key for key in (manifest.get("report"), (manifest.get("results") or {}).get("csv")) if key]
    keys += [chunk_key(OUTPUT, run_id, c["seq"]) for c in manifest["chunks"]]
    for key in keys:
        relative = key.split(f"/runs/{run_id}/", 1)[1]
        (target / relative).write_bytes(storage.get_bytes(OUTPUT.bucket, key))
    return target.resolve()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(200, 2, "irlive-demo-output"))
