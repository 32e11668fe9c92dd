"""Run control through real workers: pause, resume and cancel while calls are in flight, and the failure
threshold that stops a run whose seller fails every call — all with the shipped defaults."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from sandbox.images import Sample, png
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, OUT_BUCKET, OUT_PREFIX, read_run, upload, validator
from tests.test_budget import clean_samples, poll, run_hash
from tests.test_notify import Receiver, receiver  # noqa: F401 (the fixture)
from worker.ops.notify import verify

pytestmark = pytest.mark.integration

# Slow calls keep several in flight when the command lands.
LATENCY_MS = 600


def _start(stack: Stack, irlive: IrliveRunner, prefix: str, n: int) -> str:
    upload(stack, clean_samples(n, prefix))
    stack.sandbox_config(latency_ms=LATENCY_MS)
    # 5 calls/s: a chunk's calls go together, and a command must land while most calls have yet to leave.
    stack.start_worker(extra_env={"IRLIVE_RATE_LIMIT_PER_S": "5"}, concurrency=4)
    scanned = irlive("scan", f"s3://{IN_BUCKET}/{prefix}", "--json")
    assert scanned.returncode == 0, scanned.stderr
    run_id: str = json.loads(scanned.stdout)["run_id"]
    # Commands land while the seller is judging: some calls answered, others under way.
    poll(lambda: int(run_hash(stack, run_id).get("calls_in_flight") or 0) >= 2
         and int(run_hash(stack, run_id).get("calls") or 0) >= 1, 90, "calls in flight")
    return run_id


def _payments(stack: Stack, run_id: str) -> list[dict[str, Any]]:
    body = stack.s3_client().get_object(Bucket=OUT_BUCKET,
                                        Key=f"{OUT_PREFIX}/runs/{run_id}/payments.jsonl")["Body"].read()
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


def _sent_ms(stack: Stack, run_id: str) -> list[int]:
    """When each token the run spent (or sent) was written `sent`, on the Redis clock (this machine's)."""
    return sorted(int(p["sent_ms"]) for p in _payments(stack, run_id) if p.get("sent_ms"))


def test_pause_stops_payment_at_once_and_resume_finishes_the_run(clean_stack: Stack,
                                                                 irlive: IrliveRunner) -> None:
    # 30 calls: on a loaded machine `irlive pause` takes seconds to start, and 20 could all be paid by then.
    run_id = _start(clean_stack, irlive, "pausing", 300)

    paused = irlive("pause", run_id, "--json")
    paused_ms = time.time() * 1000
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["state"] == "paused"
    # In-flight calls finish and are recorded; then nothing moves.
    poll(lambda: int(run_hash(clean_stack, run_id).get("calls_in_flight") or 0) == 0, 60, "calls in flight to end")
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", "30")
    assert waited.returncode == 3 and json.loads(waited.stdout)["state"] == "paused", waited.stdout
    at_pause = clean_stack.sandbox_ledger()["tokens_consumed"]
    assert 0 < at_pause < 30, "paused part-way through the run"

    # Taken before the resume is asked for: a loaded machine may take seconds to return from it, and the
    # workers pay again as soon as it takes effect.
    resume_asked_ms = time.time() * 1000
    resumed = irlive("resume", run_id, "--json")
    assert resumed.returncode == 0, resumed.stderr
    done = irlive("status", run_id, "--wait", "--json", "--timeout", "150", timeout=180)
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "done", done.stdout

    output = read_run(clean_stack, run_id)
    assert sorted(r["key"] for r in output.records) == sorted(s.key for s in clean_samples(300, "pausing"))
    assert {r["verdict"] for r in output.records} == {"live"}
    ledger = clean_stack.sandbox_ledger()
    assert max(ledger["billed_image_urls_path_counts"].values()) == 1, "no image paid twice"
    assert ledger["tokens_consumed"] == output.manifest["calls"] == 30
    # Not one token was sent between the pause's return and the resume.
    assert [ms for ms in _sent_ms(clean_stack, run_id) if paused_ms < ms < resume_asked_ms] == []


def test_cancel_pays_nothing_more_records_calls_in_flight_and_lists_the_rest_not_judged(
        clean_stack: Stack, irlive: IrliveRunner) -> None:
    run_id = _start(clean_stack, irlive, "cancelling", 300)

    cancelled = irlive("cancel", run_id, "--wait", "--json", timeout=120)
    cancelled_ms = time.time() * 1000
    assert cancelled.returncode == 0, "cancelled is what `cancel --wait` asked for: " + cancelled.stderr
    assert json.loads(cancelled.stdout.splitlines()[0])["state"] == "cancelled"
    # Whoever else follows the run learns it was cancelled: 5.
    waited = irlive("status", run_id, "--wait", "--json", "--timeout", "60")
    assert waited.returncode == 5 and json.loads(waited.stdout)["state"] == "cancelled", waited.stdout

    output = read_run(clean_stack, run_id)
    manifest = output.manifest
    assert manifest["state"] == "cancelled" and "cancelled by its owner" in manifest["stop_reason"]
    records = output.records
    assert sorted(r["key"] for r in records) == sorted(s.key for s in clean_samples(300, "cancelling")), \
        "every image has exactly one record"
    judged = [r for r in records if r["verdict"] == "live"]
    not_judged = [r for r in records if r["verdict"] == "not_judged"]
    assert judged and not_judged and len(judged) + len(not_judged) == 300
    assert all(r["error_code"] == "run_cancelled" for r in not_judged)
    assert manifest["counts"]["not_judged"] == len(not_judged)
    assert len(output.failed_jsonl.splitlines()) == len(not_judged), "failed.jsonl lists what was not judged"
    # Every call the seller billed was recorded: its images are judged, none is not_judged.
    ledger = clean_stack.sandbox_ledger()
    billed = {path.rsplit("/", 1)[-1] for path in ledger["billed_image_urls_path_counts"]}
    assert billed == {r["key"].rsplit("/", 1)[-1] for r in judged}
    assert ledger["tokens_consumed"] == manifest["calls"]
    # No token was sent once the command had returned.
    assert max(_sent_ms(clean_stack, run_id)) < cancelled_ms
    assert run_hash(clean_stack, run_id)["state"] == "cancelled"


def test_a_seller_failing_every_call_ends_the_run_failed_after_min_calls(clean_stack: Stack,
                                                                       irlive: IrliveRunner) -> None:
    # 300 images would take 30 calls x 5 attempts = 150 paid calls without the threshold.
    upload(clean_stack, clean_samples(300, "failing"))
    clean_stack.sandbox_config(p_5xx=1.0)
    clean_stack.start_worker(concurrency=4)
    clean_stack.start_worker(concurrency=4)

    scanned = irlive("scan", f"s3://{IN_BUCKET}/failing", "--wait", "--json", timeout=240)

    assert scanned.returncode == 1, scanned.stdout + scanned.stderr
    run_id = json.loads(scanned.stdout.splitlines()[0])["run_id"]
    run = run_hash(clean_stack, run_id)
    assert run["state"] == "failed"
    assert "20 of 20 paid calls failed" in run["stop_reason"], run["stop_reason"]
    ledger = clean_stack.sandbox_ledger()
    assert ledger["tokens_consumed"] == 20, "at most --min-calls calls paid"
    poll(lambda: bool(run_hash(clean_stack, run_id).get("finalised_at")), 60, "the failed run's manifest")
    output = read_run(clean_stack, run_id)
    assert output.manifest["state"] == "failed" and output.manifest["calls"] == 20
    assert output.manifest["calls_failed"] == 20
    assert len(output.records) == 300 and {r["verdict"] for r in output.records} <= {"error", "not_judged"}
    status = irlive("status", run_id)
    assert status.returncode == 1 and "failure threshold" in status.stdout


def test_redrive_finishes_a_run_its_failure_threshold_stopped(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(250, "recovering"))
    clean_stack.sandbox_config(p_5xx=1.0)
    clean_stack.start_worker(concurrency=4)
    scanned = irlive("scan", f"s3://{IN_BUCKET}/recovering", "--wait", "--json", timeout=240)
    run_id = json.loads(scanned.stdout.splitlines()[0])["run_id"]
    assert scanned.returncode == 1 and run_hash(clean_stack, run_id)["state"] == "failed"
    poll(lambda: bool(run_hash(clean_stack, run_id).get("finalised_at")), 60, "the failed run's manifest")

    # The seller is well again: a redrive judges everything the threshold left, in one go (the 20 failed calls
    # before it do not stop it again at its first call).
    clean_stack.sandbox_config(p_5xx=0.0)
    redriven = irlive("redrive", run_id, "--json")
    assert redriven.returncode == 0, redriven.stderr
    done = irlive("status", run_id, "--wait", "--json", "--timeout", "120", timeout=150)
    assert json.loads(done.stdout)["state"] == "done", done.stdout
    poll(lambda: bool(run_hash(clean_stack, run_id).get("finalised_at")), 60, "the redriven run's manifest")
    output = read_run(clean_stack, run_id)
    assert {r["verdict"] for r in output.records} == {"live"} and len(output.records) == 250
    assert output.manifest["calls_failed"] == 20, "the failed calls are still counted in the manifest"


def test_a_webhook_gets_one_signed_post_per_run_end(clean_stack: Stack, irlive: IrliveRunner,
                                                     receiver: Receiver) -> None:  # noqa: F811
    secret = "whsec-e2e-not-logged"
    upload(clean_stack, clean_samples(30, "hooked"))
    # 2 calls/s (the shipped rate): a chunk's calls go together, so the run to cancel must not send them all at once.
    worker = clean_stack.start_worker(extra_env={"IRLIVE_NOTIFY_SECRET": secret, "IRLIVE_RATE_LIMIT_PER_S": "2"})

    done = irlive("scan", f"s3://{IN_BUCKET}/hooked", "--notify", receiver.url, "--wait", "--json", timeout=150)
    assert done.returncode == 0, done.stderr
    done_id = json.loads(done.stdout.splitlines()[0])["run_id"]
    (first,) = receiver.wait_for(1, timeout=60)
    # A second run, cancelled while its first calls are under way (a slow seller; ten calls at the default
    # 2 calls/s take 5 s to leave), ends too.
    clean_stack.sandbox_config(latency_ms=3000)
    # New content (copies of the first run's images would be recorded from it at once, for free).
    upload(clean_stack, [Sample(f"hooked2/img_{i:05d}.png", png(96, 96, "live", seed=1000 + i), "live")
                         for i in range(100)])
    scanned = irlive("scan", f"s3://{IN_BUCKET}/hooked2", "--notify", receiver.url, "--json")
    cancel_id = json.loads(scanned.stdout)["run_id"]
    assert irlive("cancel", cancel_id, "--wait", timeout=120).returncode == 0
    _, second = receiver.wait_for(2, timeout=60)
    poll(lambda: all(run_hash(clean_stack, r).get("archived_at") for r in (done_id, cancel_id)), 60, "archiving")

    assert len(receiver.requests) == 2, "one POST per run end"
    for got, run_id, event in ((first, done_id, "run.done"), (second, cancel_id, "run.cancelled")):
        payload = json.loads(got.body)
        assert (payload["run_id"], payload["event"], got.headers["X-Irlive-Event"]) == (run_id, event, event)
        assert verify(secret, got.headers["X-Irlive-Timestamp"], got.body, got.headers["X-Irlive-Signature"])
        validator("notification").validate(payload)
    assert json.loads(first.body)["counts"]["live"] == 30
    assert json.loads(first.body)["manifest"].endswith(f"/runs/{done_id}/manifest.json")
    counts = json.loads(second.body)["counts"]
    assert counts["not_judged"] > 0 and counts["live"] + counts["not_judged"] == 100
    log = worker.log.read_text()
    assert secret not in log and "T0PSECRETPATH" not in log and "QUERYSECRET" not in log


def test_resume_of_a_run_that_is_not_paused_says_so_and_exits_2(clean_stack: Stack, irlive: IrliveRunner) -> None:
    # No worker: the run stays running.
    upload(clean_stack, clean_samples(5, "notpaused"))
    scanned = irlive("scan", f"s3://{IN_BUCKET}/notpaused", "--json")
    assert scanned.returncode == 0, scanned.stderr
    run_id = json.loads(scanned.stdout)["run_id"]

    done = irlive("resume", run_id)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"run {run_id} is not paused (running): nothing to resume" in done.stderr
    as_json = irlive("resume", run_id, "--budget", "5", "--json")
    assert as_json.returncode == 2
    doc = json.loads(as_json.stdout)
    validator("resume").validate(doc)
    assert (doc["state"], doc["changed"], doc["chunks_resent"], doc["budget_cents"]) == ("running", False, 0, None), \
        "a budget given to a run that is not paused is not taken silently"

    assert irlive("cancel", run_id).returncode == 0
    ended = irlive("resume", run_id)
    assert ended.returncode == 2 and f"run {run_id} has ended (cancelled)" in ended.stderr

def test_scan_wait_json_prints_the_started_document_then_the_final_state(clean_stack: Stack,
                                                                         irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(12, "waitjson"))
    clean_stack.start_worker()
    done = irlive("scan", f"s3://{IN_BUCKET}/waitjson", "--wait", "--json", timeout=180)
    assert done.returncode == 0, done.stderr
    started, final = (json.loads(line) for line in done.stdout.splitlines())
    validator("scan").validate(started)
    validator("status").validate(final)
    assert final["run_id"] == started["run_id"] and final["state"] == "done" and final["total"] == 12


def test_a_run_done_with_every_image_in_error_does_not_exit_0(clean_stack: Stack, irlive: IrliveRunner) -> None:
    """--max-error-rate 1 turns the failure threshold off: the run ends done, but no image was judged. The
    exit code says so (6), for `scan --wait` and `status --wait` alike."""
    upload(clean_stack, clean_samples(10, "allerrors"))
    clean_stack.sandbox_config(p_5xx=1.0)
    clean_stack.start_worker()
    done = irlive("scan", f"s3://{IN_BUCKET}/allerrors", "--max-error-rate", "1", "--wait", "--json", timeout=240)
    started, final = (json.loads(line) for line in done.stdout.splitlines())
    assert (final["state"], final["errors"]) == ("done", 10), final
    assert done.returncode == 6, done.stderr
    assert irlive("status", started["run_id"], "--wait", "--timeout", "30").returncode == 6
    assert irlive("status", started["run_id"]).returncode == 0, "a look without --wait is not a verdict on the run"


def test_waiting_on_a_run_no_worker_takes_says_how_to_start_one(clean_stack: Stack, irlive: IrliveRunner) -> None:
    """`scan --wait` with no worker showed `0/min | running` for ever; after 30 s it says what is likely wrong."""
    upload(clean_stack, clean_samples(3, "noworker"))
    scanned = irlive("scan", f"s3://{IN_BUCKET}/noworker", "--json")
    run_id = json.loads(scanned.stdout)["run_id"]
    waited = irlive("status", run_id, "--wait", "--timeout", "33", timeout=90)
    assert f"nothing of run {run_id} recorded and no call made in 30s: is a worker running" in waited.stderr
    assert waited.stderr.count("is a worker running") == 1


def test_a_wait_whose_timeout_runs_out_before_the_run_ends_exits_124(clean_stack: Stack,
                                                                     irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(5, "notyet"))
    started = json.loads(irlive("scan", f"s3://{IN_BUCKET}/notyet", "--json").stdout)  # no worker: it waits
    waited = irlive("status", started["run_id"], "--wait", "--timeout", "1", "--json")
    assert waited.returncode == 124, waited.stdout + waited.stderr
    assert json.loads(waited.stdout)["state"] == "running"
