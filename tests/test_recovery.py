"""Recovery on the real stack: a lost broker message is reconciled, failed images are redriven."""

from __future__ import annotations

import json

import pytest

from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run, upload
from tests.faultproxy import FaultProxy
from tests.test_budget import clean_samples, poll, run_hash

pytestmark = pytest.mark.integration


def test_reconcile_requeues_chunks_the_broker_lost(clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = clean_samples(120)
    upload(clean_stack, samples)
    scanned = irlive("scan", f"s3://{IN_BUCKET}/clean", "--json")
    run_id = json.loads(scanned.stdout)["run_id"]
    r = clean_stack.redis_client()
    assert r.llen("irlive.nightly") == 3
    r.delete("irlive.nightly")  # the broker lost every message
    clean_stack.start_worker()

    before = json.loads(irlive("reconcile", run_id, "--json").stdout)
    assert sorted(before["requeued_chunks"]) == [0, 1, 2]
    again = json.loads(irlive("reconcile", run_id, "--json").stdout)
    assert again["requeued_chunks"] == [], "queued or running chunks are not requeued twice"
    poll(lambda: run_hash(clean_stack, run_id)["state"] == "done", 60, "the run to finish")

    run = read_run(clean_stack, run_id)
    assert sorted(rec["key"] for rec in run.records) == sorted(s.key for s in samples)
    assert max(clean_stack.sandbox_ledger()["billed_image_urls_path_counts"].values()) == 1


def test_reconcile_finalises_a_run_whose_finalisation_was_lost(clean_stack: Stack, irlive: IrliveRunner) -> None:
    upload(clean_stack, clean_samples(10))
    clean_stack.start_worker()
    run_id = json.loads(irlive("scan", f"s3://{IN_BUCKET}/clean", "--json").stdout)["run_id"]
    # Finalisation sets the state, then `finalised_at`, then archives the run (`archived_at`): all three, or the
    # undoing below races its last steps (a second finalize message, from the watchdog on a loaded machine,
    # would finish the run again before the reconcile looks).
    poll(lambda: {"finalised_at", "archived_at"} <= run_hash(clean_stack, run_id).keys()
         and run_hash(clean_stack, run_id)["state"] == "done", 60, "the run to finish")
    # The workers are down while the finalisation is lost (else their watchdog may finish the run before the
    # reconcile looks: it does the same, on its own, within seconds).
    clean_stack.stop_workers()
    r = clean_stack.redis_client()
    # As if the finalize message was lost: never finalised.
    r.hset(f"irlive:run:{run_id}", "state", "running")
    r.hdel(f"irlive:run:{run_id}", "finalised_at")

    result = json.loads(irlive("reconcile", run_id, "--json").stdout)

    assert result == {"run_id": run_id, "requeued_chunks": [], "finalize_enqueued": True}
    clean_stack.start_worker()
    poll(lambda: run_hash(clean_stack, run_id)["state"] == "done", 60, "finalisation")


def test_redrive_judges_failed_images_again_and_nothing_else(clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = clean_samples(30)
    upload(clean_stack, samples)
    clean_stack.sandbox_config(p_5xx=1.0)
    clean_stack.start_worker(extra_env={"IRLIVE_MAX_ATTEMPTS": "1"})
    run_id = json.loads(irlive("scan", f"s3://{IN_BUCKET}/clean", "--json").stdout)["run_id"]
    poll(lambda: run_hash(clean_stack, run_id)["state"] == "done", 60, "the run to finish with errors")
    assert read_run(clean_stack, run_id).manifest["counts"]["error"] == 30
    calls_before = clean_stack.sandbox_ledger()["calls_billed"]
    clean_stack.sandbox_config(p_5xx=0.0)

    redriven = json.loads(irlive("redrive", run_id, "--json").stdout)

    assert sorted(redriven["chunks_redriven"]) == [0]
    poll(lambda: run_hash(clean_stack, run_id)["state"] == "done", 60, "the redriven run to finish")
    run = read_run(clean_stack, run_id)
    assert run.manifest["counts"]["live"] == 30 and run.manifest["counts"]["error"] == 0
    assert sorted(rec["key"] for rec in run.records) == sorted(s.key for s in samples)
    assert clean_stack.sandbox_ledger()["calls_billed"] == calls_before + 3
    assert run.manifest["calls"] == calls_before + 3
    nothing = json.loads(irlive("redrive", run_id, "--json").stdout)
    assert nothing["chunks_redriven"] == []


def test_dlq_is_empty_and_readable(clean_stack: Stack, irlive: IrliveRunner) -> None:
    assert json.loads(irlive("dlq", "--json").stdout) == []
    assert "no dead-lettered chunks" in irlive("dlq").stdout


def test_a_chunk_that_keeps_failing_is_dead_lettered_then_redriven(clean_stack: Stack, irlive: IrliveRunner) -> None:
    samples = clean_samples(10)
    upload(clean_stack, samples)
    with FaultProxy.for_url(clean_stack.s3_endpoint) as proxy:
        # S3 refuses the workers' reads, so every delivery of the chunk fails before paying anything.
        proxy.http_error(503, match=lambda head: head.startswith(b"GET "))
        env = {"IRLIVE_S3_ENDPOINT_URL": proxy.url, "IRLIVE_MAX_DELIVERIES": "2"}
        clean_stack.start_worker(extra_env=env)
        run_id = json.loads(irlive("scan", f"s3://{IN_BUCKET}/clean", "--json").stdout)["run_id"]
        poll(lambda: bool(json.loads(irlive("dlq", "--json").stdout)), 120, "the chunk to be dead-lettered")
        proxy.pass_through()
        poll(lambda: run_hash(clean_stack, run_id)["state"] == "done", 60, "the run to end with errors")

        entries = json.loads(irlive("dlq", "--json").stdout)
        assert [(e["run_id"], e["seq"], e["deliveries"]) for e in entries] == [(run_id, 0, 2)]
        assert "503" in entries[0]["last_error"] or "S3" in entries[0]["last_error"]
        run = read_run(clean_stack, run_id)
        assert run.manifest["counts"]["error"] == 10
        assert all(r["error_code"] == "dead_letter" for r in run.records)
        assert clean_stack.sandbox_ledger()["payments_created"] == 0

        redriven = json.loads(irlive("redrive", run_id, "--json").stdout)
        assert redriven["chunks_redriven"] == [0]
        poll(lambda: run_hash(clean_stack, run_id)["state"] == "done", 60, "the redriven run")
    assert read_run(clean_stack, run_id).manifest["counts"]["live"] == 10
    assert json.loads(irlive("dlq", "--json").stdout) == []
