"""One object S3 will not serve rejects that image with its reason; the run goes on and pays for the rest
(issue 22, item 3): an archived (GLACIER) object from moto itself, an object denied alone through a proxy that
answers 403 AccessDenied for its key only."""

from __future__ import annotations

import json

from sandbox.images import Sample, png
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run, upload
from tests.faultproxy import FaultProxy


def _denied_read(head: bytes) -> bool:
    # The worker's validation read of that one key (a ranged GET); the seller never gets that far.
    line, _, headers = head.partition(b"\r\n")
    return b"/refusals/denied.png" in line and b"\r\nrange:" in b"\r\n" + headers.lower()


def test_an_archived_or_denied_object_is_rejected_alone_and_the_run_goes_on(clean_stack: Stack,
                                                                            irlive: IrliveRunner) -> None:
    judged = [Sample(f"refusals/ok_{i}.png", png(96, 96, "live", seed=700 + i), "live") for i in range(3)]
    upload(clean_stack, [*judged, Sample("refusals/denied.png", png(96, 96, "live", seed=710), "live")])
    clean_stack.s3_client().put_object(Bucket=IN_BUCKET, Key="refusals/cold.png", StorageClass="GLACIER",
                                       Body=png(96, 96, "live", seed=711))
    with FaultProxy.for_url(clean_stack.s3_endpoint, seed=1) as proxy:
        proxy.http_error(403, match=_denied_read)
        clean_stack.start_worker(extra_env={"IRLIVE_S3_ENDPOINT_URL": proxy.url})
        done = irlive("scan", f"s3://{IN_BUCKET}/refusals", "--wait", "--json", timeout=180)
        assert proxy.stats["http_error"] >= 1, "the denied object's read was refused"
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    assert final["state"] == "done", final

    records = {r["key"]: r for r in read_run(clean_stack, final["run_id"]).records}
    assert records["refusals/cold.png"]["verdict"] == "rejected"
    assert records["refusals/cold.png"]["error_code"] == "archived"
    assert "restore it" in records["refusals/cold.png"]["reason"]
    assert records["refusals/denied.png"]["verdict"] == "rejected"
    assert records["refusals/denied.png"]["error_code"] == "access_denied"
    assert all(records[s.key]["verdict"] == "live" for s in judged)
    ledger = clean_stack.sandbox_ledger()
    assert ledger["calls_billed"] == 1 and len(ledger["billed_image_urls_path_counts"]) == 3, \
        "one call for the three readable images; nothing for the refused ones"


def test_a_call_the_seller_could_not_download_is_sent_once_more_whole_not_bisected(clean_stack: Stack,
                                                                                   irlive: IrliveRunner) -> None:
    """The seller's store overloaded for one call (the sandbox refuses every download of the next call): the
    worker sends the same ten images once more, one extra paid call, instead of 2 x 10 - 1 calls of a bisection."""
    upload(clean_stack, [Sample(f"blip/img_{i}.png", png(96, 96, "live", seed=720 + i), "live") for i in range(10)])
    clean_stack.sandbox_config(download_refusals=1)
    worker = clean_stack.start_worker()
    done = irlive("scan", f"s3://{IN_BUCKET}/blip", "--wait", "--json", timeout=180)
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.splitlines()[-1])
    records = read_run(clean_stack, final["run_id"]).records
    assert sorted(r["verdict"] for r in records) == ["live"] * 10
    ledger = clean_stack.sandbox_ledger()
    assert ledger["upstream_errors"] == 1 and ledger["calls_billed"] == 2, ledger
    assert "once more before splitting" in worker.log.read_text()
