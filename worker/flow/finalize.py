"""Run finalisation: the run manifest, failed.jsonl and payments.jsonl from the chunk manifests, then the
run's per-image state leaves Redis (idempotent: running it twice writes the same documents)."""

from __future__ import annotations

import json
from typing import Any

from worker.config import S3Location
from worker.errors import NotFound, TransientError
from worker.flow.runs import Runs, now_iso
from worker.flow.states import RunState
from worker.judge.manifest import (
    chunk_key,
    failed_key,
    failed_lines,
    jsonl,
    payments_key,
    run_document,
    run_manifest_key,
)
from worker.money.ledger import Ledger
from worker.seams.storage import Storage


def finalize_run(runs: Runs, storage: Storage, ledger: Ledger, run_id: str,
                 enforced: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Write manifest.json, failed.jsonl and payments.jsonl, mark the run done, then archive its state.

    `enforced` are the money settings the workers applied (they, not the producer, decide what is paid).
    """
    run = runs.get(run_id)
    if run is None:
        return None
    output = S3Location.parse(run["output"], "run output")
    if run["state"] == RunState.DONE:
        archive_run(runs, storage, ledger, run_id, output)
        return None
    # A call whose answer was lost leaves its token 'sent'; the manifest's calls must include it.
    if ledger.settle_run(run_id):
        raise TransientError(f"run {run_id}: some tokens could not be reconciled yet; finalising later")
    run = runs.get(run_id) or run
    run["finished_at"] = runs.set_once(run_id, "finished_at", now_iso())
    chunks: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    for seq in range(int(run["chunks"])):
        key = chunk_key(output, run_id, seq)
        doc, etag = storage.get_json(output.bucket, key)
        chunks.append({"seq": seq, "key": key, "etag": etag, "images": len(doc["images"]), "counts": doc["counts"]})
        failed.extend(r for r in doc["images"] if r["verdict"] in ("rejected", "error"))
    body = failed_lines(failed)
    fkey = failed_key(output, run_id)
    storage.put_bytes(output.bucket, fkey, body, "application/x-ndjson")
    payments = _write_payments(storage, ledger, run_id, output)
    manifest = run_document(run, chunks, {"key": fkey, "count": len(failed)})
    manifest["payments"] = {"key": payments_key(output, run_id), "count": len(payments)}
    manifest["tokens_bought"] = int(run.get("tokens_bought") or 0)
    manifest["budget_cents"] = int(run["budget_cents"]) if run.get("budget_cents") else None
    manifest["duplicates"] = int(run.get("duplicates") or 0)
    # Calls paid whose answer never reached the ledger (a worker killed mid-call, a timeout after the seller
    # took the token): their images were judged again, and this is the only way an image is paid twice.
    manifest["answers_lost"] = int(run.get("answers_lost") or 0)
    manifest["answers_lost_images"] = int(run.get("answers_lost_images") or 0)
    # Objects overwritten while the seller judged them: judged again, so the record matches the ETag.
    manifest["changed_during_call"] = int(run.get("changed_during_call") or 0)
    if enforced:
        manifest["enforced"] = enforced
    # Prepaid tokens still in the shared pool when the run ended (money paid, not yet used by any run).
    manifest["tokens_unspent"] = int(runs.set_once(run_id, "tokens_unspent", str(ledger.totals()["pool"])))
    storage.put_json(output.bucket, run_manifest_key(output, run_id), manifest)
    runs.set_state(run_id, RunState.DONE)
    archive_run(runs, storage, ledger, run_id, output)
    return manifest


def archive_run(runs: Runs, storage: Storage, ledger: Ledger, run_id: str, output: S3Location) -> None:
    """A done run keeps nothing per image in Redis but its done-set entries: payments and progress go."""
    run = runs.get(run_id)
    if run is None or run.get("archived_at") or run["state"] != RunState.DONE:
        return
    payments = _write_payments(storage, ledger, run_id, output)
    ledger.forget_settled(run_id, [p["payment_id"] for p in payments])
    runs.forget_chunks(run_id)
    runs.set_once(run_id, "archived_at", now_iso())


def _write_payments(storage: Storage, ledger: Ledger, run_id: str, output: S3Location) -> list[dict[str, Any]]:
    """payments.jsonl: every payment the run settled, merged with what an earlier (interrupted) pass wrote."""
    key = payments_key(output, run_id)
    by_id: dict[str, dict[str, Any]] = {}
    try:
        previous = storage.get_bytes(output.bucket, key)
        for line in previous.decode().splitlines():
            if line.strip():
                doc = json.loads(line)
                by_id[str(doc["payment_id"])] = doc
    except NotFound:
        pass
    for record in ledger.settled_payments(run_id):
        # An answer still held here is one irlive could not read: it stays, for a person to look at.
        by_id[record["payment_id"]] = record
    payments = [by_id[k] for k in sorted(by_id)]
    storage.put_bytes(output.bucket, key, jsonl(payments), "application/x-ndjson")
    return payments
