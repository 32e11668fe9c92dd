"""Content dedup through real workers: byte-identical objects under different keys are judged and paid once."""

from __future__ import annotations

import json

import pytest

from sandbox.images import png
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, read_run, validator
from tests.test_e2e import scan_and_wait

pytestmark = pytest.mark.integration


def _put(stack: Stack, key: str, body: bytes) -> str:
    return str(stack.s3_client().put_object(Bucket=IN_BUCKET, Key=key, Body=body)["ETag"]).strip('"')


def _put_multipart(stack: Stack, key: str, body: bytes) -> str:
    """One-part multipart upload: its ETag ("...-1") is not the MD5 of its bytes."""
    s3 = stack.s3_client()
    upload = s3.create_multipart_upload(Bucket=IN_BUCKET, Key=key)
    part = s3.upload_part(Bucket=IN_BUCKET, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=body)
    done = s3.complete_multipart_upload(Bucket=IN_BUCKET, Key=key, UploadId=upload["UploadId"],
                                        MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})
    return str(done["ETag"]).strip('"')


def test_five_identical_copies_cost_one_images_share_of_a_call(clean_stack: Stack, irlive: IrliveRunner) -> None:
    same = png(96, 96, "live", seed=7)
    copies = [f"copies/cam{i}/capture.png" for i in range(5)]
    for key in copies:
        _put(clean_stack, key, same)
    others = [f"copies/other_{i}.png" for i in range(5)]
    for i, key in enumerate(others):
        _put(clean_stack, key, png(96, 96, "spoof", seed=100 + i))
    clean_stack.start_worker()

    run_id = scan_and_wait(irlive, f"s3://{IN_BUCKET}/copies")

    run = read_run(clean_stack, run_id)
    ledger = clean_stack.sandbox_ledger()
    billed = ledger["billed_image_urls_path_counts"]
    billed_copies = [k for k in copies if any(path.endswith(k) for path in billed)]
    assert len(billed_copies) == 1, f"one copy paid for, not {billed_copies}"
    assert sorted(billed.values()) == [1] * 6 and ledger["calls_billed"] == run.manifest["calls"] == 1
    by_key = {r["key"]: r for r in run.records}
    (judged,) = billed_copies
    assert by_key[judged]["verdict"] == "live" and not by_key[judged].get("same_content_as")
    for key in copies:
        if key != judged:
            record = by_key[key]
            assert record["verdict"] == "live"
            assert record["same_content_as"] == {"run_id": run_id, "seq": 0, "bucket": IN_BUCKET, "key": judged,
                                                 "etag": by_key[judged]["etag"]}
            assert record["content_key"] == by_key[judged]["content_key"]
    assert run.manifest["same_content"] == 4 and run.manifest["counts"]["live"] == 5
    for chunk in run.chunks:
        validator("chunk").validate(chunk)

    # Later re-uploads (one single-part, two multipart) and a rescan: the single-part copy is recognised
    # without a call; the two multipart ones (ETags that are not MD5s) are hashed, judged once between them.
    _put(clean_stack, "copies/late/capture.png", same)
    multipart_body = png(96, 96, "live", seed=8)
    etags = {_put_multipart(clean_stack, f"copies/mp{i}/capture.png", multipart_body) for i in range(2)}
    assert all("-" in e for e in etags)
    before = clean_stack.sandbox_ledger()["images_billed"]
    again = scan_and_wait(irlive, f"s3://{IN_BUCKET}/copies")
    rerun = read_run(clean_stack, again)
    assert sorted(r["key"] for r in rerun.records) == ["copies/late/capture.png", "copies/mp0/capture.png",
                                                        "copies/mp1/capture.png"], "the rest was judged already"
    late = next(r for r in rerun.records if r["key"] == "copies/late/capture.png")
    assert late["same_content_as"]["key"] == judged and late["same_content_as"]["run_id"] == run_id
    multipart = [r for r in rerun.records if r["key"] != "copies/late/capture.png"]
    assert all(r["content_key"].startswith("sha256:") for r in multipart)
    assert sum(1 for r in multipart if r.get("same_content_as")) == 1
    assert clean_stack.sandbox_ledger()["images_billed"] - before == 1
    # A third scan finds every copy's own identity judged: nothing is enqueued.
    dry = irlive("scan", f"s3://{IN_BUCKET}/copies", "--dry-run", "--json")
    assert json.loads(dry.stdout)["to_judge"] == 0
