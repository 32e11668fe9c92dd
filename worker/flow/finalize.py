"""Run finalisation: the run manifest, failed.jsonl and payments.jsonl from the chunk manifests, then the
run's per-image state leaves Redis (idempotent: running it twice writes the same documents)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from worker.config import S3Location
from worker.errors import NotFound, TransientError
from worker.flow.leases import Lease
from worker.flow.runs import Runs, now_iso
from worker.flow.states import ENDING, RunState
from worker.flow.watermarks import Watermarks
from worker.judge.manifest import (
    UNJUDGED,
    chunk_key,
    failed_key,
    failed_lines,
    jsonl,
    payment_document,
    payments_key,
    run_document,
    run_manifest_key,
)
from worker.money.ledger import Ledger
from worker.seams.storage import Storage

log = logging.getLogger("irlive.finalize")
# Longer than most finalisations take (seconds; a 100,000-image run's can take longer, and a second may then
# start: harmless, every document is written the same): while held, no other worker finalises the run. Short,
# because a holder killed mid-way keeps the run from its manifest until it expires.
FINALIZE_LEASE_S = 30.0


def finalize_run(runs: Runs, storage: Storage, ledger: Ledger, run_id: str,
                 enforced: dict[str, Any] | None = None,
                 on_end: Callable[[str], None] | None = None,
                 review_live_below: float = 80.0) -> dict[str, Any] | None:
    """Write manifest.json, failed.jsonl and payments.jsonl, mark the run done (a cancelled or failed run keeps
    its state), then archive its state.

    `enforced` are the money settings the workers applied (they, not the producer, decide what is paid).
    `review_live_below` is the confidence under which report.html lists a live capture for review.
    `on_end(state)` runs once the manifest is written and before the run is marked finalised, so a crash
    between them repeats it (notifications are at least once, with a stable event id).

    One finalisation of a run at a time (a lease): a second finalize message (the last chunk's and the
    watchdog's, a cancel's) raises TransientError and is retried, and then finds the run finalised.
    """
    lease = Lease(runs.store, runs.keys.job_lease(f"finalize:{run_id}"), FINALIZE_LEASE_S)
    if not lease.take():
        raise TransientError(f"run {run_id} is being finalised by another worker; trying again later")
    try:
        return _finalize_run(runs, storage, ledger, run_id, enforced, on_end, review_live_below)
    finally:
        lease.release()


def _finalize_run(runs: Runs, storage: Storage, ledger: Ledger, run_id: str, enforced: dict[str, Any] | None,
                  on_end: Callable[[str], None] | None, review_live_below: float) -> dict[str, Any] | None:
    run = runs.get(run_id)
    if run is None:
        return None
    output = S3Location.parse(run["output"], "run output")
    if run["state"] == RunState.DONE or run.get("finalised_at"):
        archive_run(runs, storage, ledger, run_id, output)
        return None
    if run["state"] not in (RunState.RUNNING, *ENDING) or int(run["pending"]) > 0:
        # Paused, listing, or chunks still to come (a cancel races its last chunks): their completion, the
        # watchdog or `irlive reconcile` finalises it later.
        log.info("run %s: not finalised now (%s, %s chunks pending)", run_id, run["state"], run["pending"])
        return None
    # A call whose answer was lost leaves its token 'sent'; the manifest's calls must include it.
    if ledger.settle_run(run_id):
        raise TransientError(f"run {run_id}: some tokens could not be reconciled yet; finalising later")
    run = runs.get(run_id) or run
    run["finished_at"] = runs.set_once(run_id, "finished_at", now_iso())
    chunks: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    everything: list[dict[str, Any]] = []
    summaries = runs.chunk_summaries(run_id)
    kept = runs.progress_of(run_id, sorted(seq for seq in summaries if seq < int(run["chunks"])))
    for seq in range(int(run["chunks"])):
        key = chunk_key(output, run_id, seq)
        progress = kept.get(seq, {})
        if progress:
            # What the chunk's manifest was written from, still in Redis: no need to read it back from S3.
            records = [progress[i] for i in sorted(progress)]
            etag, counts = summaries[seq]["etag"], summaries[seq]["counts"]
        else:
            doc, etag = storage.get_json(output.bucket, key)
            records, counts = doc["images"], doc["counts"]
        chunks.append({"seq": seq, "key": key, "etag": etag, "images": len(records), "counts": counts})
        failed.extend(r for r in records if r["verdict"] in UNJUDGED)
        everything.extend(records)
    body = failed_lines(failed)
    fkey = failed_key(output, run_id)
    storage.put_bytes(output.bucket, fkey, body, "application/x-ndjson")
    payments = _write_payments(storage, ledger, run_id, output)
    manifest = run_document(run, chunks, {"key": fkey, "count": len(failed)})
    manifest["payments"] = {"key": payments_key(output, run_id), "count": len(payments)}
    manifest["tokens_bought"] = int(run.get("tokens_bought") or 0)
    # Purchases made for this run that left and brought no usable token: charged to it, as they may have been.
    manifest["unknown_purchases"] = int(run.get("unknown_purchases") or 0)
    manifest["unknown_purchase_cents"] = int(run.get("unknown_purchase_cents") or 0)
    manifest["budget_cents"] = int(run["budget_cents"]) if run.get("budget_cents") else None
    manifest["duplicates"] = int(run.get("duplicates") or 0)
    # Byte-identical copies of an image judged before (recorded `same_content_as`, paid nothing).
    manifest["same_content"] = int(run.get("same_content") or 0)
    # Calls paid whose answer never reached the ledger (a worker killed mid-call, a timeout after the seller
    # took the token): their images were judged again, and this is the only way an image is paid twice.
    manifest["answers_lost"] = int(run.get("answers_lost") or 0)
    manifest["answers_lost_images"] = int(run.get("answers_lost_images") or 0)
    # Objects overwritten while the seller judged them: judged again, so the record matches the ETag.
    manifest["changed_during_call"] = int(run.get("changed_during_call") or 0)
    if enforced:
        manifest["enforced"] = enforced
    # Prepaid tokens still in the shared pool when the run ended (money paid, not yet used by any run).
    manifest["tokens_unspent"] = int(runs.set_once(run_id, "tokens_unspent", str(ledger.tokens_pooled())))
    final = RunState(run["state"]) if run["state"] in ENDING else RunState.DONE
    manifest["state"] = str(final)
    manifest["stop_reason"] = run.get("stop_reason") if final in ENDING else None
    # Paid calls that bought no verdict, as the failure threshold counted them.
    manifest["calls_failed"] = int(run.get("calls_failed") or 0)
    manifest["tags"] = json.loads(run.get("tags") or "{}")
    manifest.update(_publish(storage, output, manifest, everything, payments, review_live_below))
    storage.put_json(output.bucket, run_manifest_key(output, run_id), manifest)
    if on_end is not None:
        on_end(str(final))
    marks = Watermarks(runs.store, runs.keys)
    if final == RunState.DONE:
        runs.set_state(run_id, RunState.DONE)
        if run.get("watermark_source") and run.get("watermark_to"):
            # Only a run that judged everything it listed moves its source on: a failed or cancelled night is
            # listed again by the next `scan --since last`.
            marks.advance(run["watermark_source"], run["watermark_to"])
    runs.set_once(run_id, "finalised_at", now_iso())
    if run.get("watermark_source"):
        marks.release(run["watermark_source"], run_id)
    archive_run(runs, storage, ledger, run_id, output, written=payments)
    return manifest


def _publish(storage: Storage, output: S3Location, manifest: dict[str, Any], records: list[dict[str, Any]],
             payments: list[dict[str, Any]], live_below: float) -> dict[str, Any]:
    """results.csv, report.html and the history page, before the manifest that points at them. A store that
    fails is retried with the finalisation; a bug here must not keep a paid-for run from its manifest."""
    # Jinja2, pygal and pyarrow load at the first finalisation, not at every worker's start (~0.1 s of CPU).
    from worker.report.publish import publish_run

    try:
        return publish_run(storage, output, manifest, records, payments, live_below=live_below)
    except TransientError:
        raise
    except Exception:
        log.exception("run %s: report and results not written; `irlive report %s` writes the report",
                      manifest["run_id"], manifest["run_id"])
        return {"report": None, "results": None}


def archive_run(runs: Runs, storage: Storage, ledger: Ledger, run_id: str, output: S3Location,
                written: list[dict[str, Any]] | None = None) -> None:
    """A done run keeps nothing per image in Redis but its done-set entries: payments and progress go.

    `written`: the payments.jsonl the caller has just written; it is read and written again only if a payment
    was settled since (a late reconciliation) or one written may still change (spent with no answer: an answer
    arriving late is kept on it), so a finalisation reads each payment once, not twice."""
    run = runs.get(run_id)
    if run is None or run.get("archived_at") or not (run["state"] == RunState.DONE or run.get("finalised_at")):
        return
    if (written is None or not ledger.settled_ids(run_id) <= {str(p["payment_id"]) for p in written}
            or any(p.get("state") == "spent" and not p.get("request_id") for p in written)):
        written = _write_payments(storage, ledger, run_id, output)
    ledger.forget_settled(run_id, [p["payment_id"] for p in written])
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
                doc = payment_document(json.loads(line))
                by_id[str(doc["payment_id"])] = doc
    except NotFound:
        pass
    for record in ledger.settled_payments(run_id):
        # An answer still held here is one irlive could not read: it stays, for a person to look at.
        by_id[record["payment_id"]] = payment_document(record)
    payments = [by_id[k] for k in sorted(by_id)]
    storage.put_bytes(output.bucket, key, jsonl(payments), "application/x-ndjson")
    return payments
