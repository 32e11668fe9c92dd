"""The overwrite check before a chunk's answers are recorded (were any of its objects overwritten while the
seller fetched them?) reads each camera's keys with one bounded listing or a HEAD each, never every key
between a chunk's first and last (issue 22, item 8)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from sandbox.images import Sample, png
from sandbox.stack import Stack
from tests.e2e import IN_BUCKET, upload
from tests.faultproxy import FaultProxy
from tests.faults import drive_to_completion, scan
from worker.seams import storage as storage_module
from worker.seams.storage import LIST_PAGES, Storage

OLDER = 2500  # older captures of another camera, sorting between the chunk's two cameras


def _fill_between(stack: Stack) -> None:
    s3 = stack.s3_client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=IN_BUCKET, Key=f"site/cam-b/{i:06d}.txt", Body=b"x"),
                      range(OLDER)))


def test_a_chunk_from_two_cameras_checks_its_keys_without_listing_the_captures_between(clean_stack: Stack) -> None:
    _fill_between(clean_stack)
    upload(clean_stack, [Sample("site/cam-a/new.png", png(96, 96, "live", seed=1), "live"),
                         Sample("site/cam-c/new.png", png(96, 96, "live", seed=2), "live")])
    with FaultProxy.for_url(clean_stack.s3_endpoint) as proxy:
        env = {"IRLIVE_S3_ENDPOINT_URL": proxy.url}
        clean_stack.start_worker(extra_env=env, concurrency=1)
        # One chunk, one call for the two images (cam-b holds no image: the scan filters it out), then the check.
        run_id = scan(clean_stack, "site")
        drive_to_completion(clean_stack, run_id, deadline_s=120)
        # Of the captures' bucket (finalisation lists the output's history/ for index.html).
        lists = [line for line in proxy.request_lines if b"list-type=2" in line and f"/{IN_BUCKET}".encode() in line]
        heads = [line for line in proxy.request_lines if line.startswith(b"HEAD ")]
    print(f"{len(lists)} listings, {len(heads)} HEADs")
    assert not lists and len(heads) == 2, "one HEAD per lone key, no listing"


def test_the_check_reads_changes_and_deletions_with_bounded_listings(clean_stack: Stack,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in clean_stack.env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)  # the workers' credentials for the S3 stand-in
    _fill_between(clean_stack)
    s3 = clean_stack.s3_client()
    keys = ["site/cam-b/000100.txt", "site/cam-b/002400.txt", "site/cam-d/a.txt", "site/cam-d/b.txt",
            "site/cam-e/only.txt"]
    for key in keys[2:]:
        s3.put_object(Bucket=IN_BUCKET, Key=key, Body=b"y")
    etags = {k: s3.head_object(Bucket=IN_BUCKET, Key=k)["ETag"].strip('"') for k in keys}
    s3.put_object(Bucket=IN_BUCKET, Key="site/cam-b/002400.txt", Body=b"changed")
    s3.delete_object(Bucket=IN_BUCKET, Key="site/cam-d/b.txt")
    with FaultProxy.for_url(clean_stack.s3_endpoint) as proxy:
        now = Storage(proxy.url).current_etags(IN_BUCKET, keys)
        lines = list(proxy.request_lines)
    assert now["site/cam-b/000100.txt"] == etags["site/cam-b/000100.txt"]
    assert now["site/cam-b/002400.txt"] != etags["site/cam-b/002400.txt"], "an overwrite is seen"
    assert "site/cam-d/b.txt" not in now and now["site/cam-d/a.txt"] == etags["site/cam-d/a.txt"]
    assert now["site/cam-e/only.txt"] == etags["site/cam-e/only.txt"]
    lists = [line for line in lines if b"list-type=2" in line]
    heads = [line for line in lines if line.startswith(b"HEAD ")]
    # cam-b: 2,300 objects between its two keys: LIST_PAGES pages (12 + 1,000 + 1,000 keys), then a HEAD for
    # the key not reached;
    # cam-d: one listing; cam-e: one HEAD.
    assert len(lists) == LIST_PAGES + 1 and len(heads) == 2, lines
    # The first page of each listing is sized to the keys it wants (botocore parses every key of a page).
    first_pages = [line for line in lists if b"continuation-token" not in line]
    assert len(first_pages) == 2 and all(b"max-keys=12" in line for line in first_pages), first_pages


@pytest.mark.parametrize("whole", [True, False], ids=["read-raw", "page-too-long-for-a-raw-read"])
def test_a_listing_reads_keys_with_any_characters_as_they_are(clean_stack: Stack, monkeypatch: pytest.MonkeyPatch,
                                                              whole: bool) -> None:
    # The page comes back with its keys percent-encoded (encoding-type=url, as botocore asks): a key read
    # undecoded would be missed, taken as deleted, and its image judged (and paid for) again.
    for name, value in clean_stack.env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    if not whole:
        monkeypatch.setattr(storage_module, "_LIST_BYTES", 200)  # botocore lists the page instead
    s3 = clean_stack.s3_client()
    keys = sorted(f"site/cam 1/{name}" for name in ("a b.png", "a+b.png", "ü-ä.png", "x&y=z.png", "100%25.png",
                                                     "tab\there.png", "plain.png"))
    for key in keys:
        s3.put_object(Bucket=IN_BUCKET, Key=key, Body=key.encode())
    etags = {k: s3.head_object(Bucket=IN_BUCKET, Key=k)["ETag"].strip('"') for k in keys}
    with FaultProxy.for_url(clean_stack.s3_endpoint) as proxy:
        now = Storage(proxy.url).current_etags(IN_BUCKET, keys)
        lines = list(proxy.request_lines)
    assert now == etags
    lists = [line for line in lines if b"list-type=2" in line]
    assert not [line for line in lines if line.startswith(b"HEAD ")], lines
    # Read raw: one request; a page too long for it is listed again through botocore.
    assert len(lists) == (1 if whole else 2), lines
