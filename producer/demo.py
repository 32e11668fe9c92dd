"""`irlive demo`: a local stack, synthetic captures with known truth, a scan, and a checked summary."""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from producer.filters import DEFAULT_SUFFIXES
from producer.scan import ScanRequest, scan
from producer.status import follow
from sandbox.images import Sample, demo_corpus
from sandbox.stack import AWS_ENV, Stack
from worker.app import make_app
from worker.config import S3Location, Settings
from worker.flow.claims import Claims
from worker.flow.runs import Runs
from worker.judge.manifest import chunk_key, failed_key, run_manifest_key
from worker.keys import Keys
from worker.seams.storage import Storage
from worker.seams.store import Store

SOURCE = S3Location("irlive-demo-captures", "captures")
OUTPUT = S3Location("irlive-demo-results", "irlive")


def run_demo(images: int, workers: int, out_dir: str) -> int:
    """Returns 0 when every verdict matches the truth and the worker's calls equal the sandbox's bills."""
    started = time.monotonic()
    corpus = demo_corpus(images, prefix=SOURCE.prefix)
    env_extra = {
        "IRLIVE_OUTPUT": str(OUTPUT),
        "IRLIVE_RATE_LIMIT_PER_S": "20",
        "IRLIVE_RATE_BURST": "4",
    }
    say(f"starting a local stack: redis, moto_server, the sandbox marketplace, {workers} worker(s)")
    with Stack(workers=workers, concurrency=8, settings_env=env_extra) as stack:
        settings = Settings.from_env({**os.environ, **stack.env})
        storage = Storage(settings.s3_endpoint_url, settings.s3_region,
                          credentials=(AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"]))
        _upload(storage, corpus)
        say(f"uploaded {len(corpus)} captures to {SOURCE} ({sum(s.expected == 'rejected' for s in corpus)} "
            "of them deliberately invalid)")
        store, keys = Store.from_url(settings.redis_url), Keys(settings.key_prefix)
        runs = Runs(store, keys)
        result = scan(settings, storage, runs, Claims(store, keys), make_app(settings),
                      ScanRequest(SOURCE, DEFAULT_SUFFIXES), OUTPUT)
        assert result.run_id is not None
        say(f"run {result.run_id}: {result.enqueued} images in {result.chunks} chunks")
        final = follow(runs, result.run_id, timeout_s=300)
        if final.state != "done":
            say(f"run ended in state {final.state}: {final.error or 'timed out'}")
            return 1
        ledger = stack.sandbox_ledger()
        copied = _copy_manifests(storage, result.run_id, Path(out_dir))
        ok = _summary(storage, result.run_id, corpus, ledger)
    say(f"manifests copied to {copied}  ({time.monotonic() - started:.1f}s in all)")
    return 0 if ok else 1


def say(text: str) -> None:
    print(text, flush=True)


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


def _summary(storage: Storage, run_id: str, corpus: list[Sample], ledger: dict[str, Any]) -> bool:
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
            mismatches.append(f"  {sample.key}: expected {sample.expected}, got {got}")
    say("")
    say(f"{'truth':<10}{'images':>8}{'matched':>9}{'wrong':>7}")
    for truth in ("live", "spoof", "no_face", "rejected"):
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
        say(line)
    agrees = ledger["calls_billed"] == calls
    if not agrees:
        say("MISMATCH: the worker recorded a different number of calls than the sandbox billed")
    return not mismatches and agrees and len(records) == len(corpus)


def _copy_manifests(storage: Storage, run_id: str, out_dir: Path) -> Path:
    target = out_dir / run_id
    (target / "chunks").mkdir(parents=True, exist_ok=True)
    manifest, _ = storage.get_json(OUTPUT.bucket, run_manifest_key(OUTPUT, run_id))
    keys = [run_manifest_key(OUTPUT, run_id), failed_key(OUTPUT, run_id)]
    keys += [chunk_key(OUTPUT, run_id, c["seq"]) for c in manifest["chunks"]]
    for key in keys:
        relative = key.split(f"/runs/{run_id}/", 1)[1]
        (target / relative).write_bytes(storage.get_bytes(OUTPUT.bucket, key))
    return target.resolve()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(200, 2, "irlive-demo-output"))
