"""report.html in a real browser (Debian's headless chromium through Playwright's client; no browser is
downloaded): the reports of a demo run, a run with rejections and a lost answer, and a cancelled run show the
figures of their manifests, every thumbnail loads, the page makes no request and logs no error, and it reads
with scripts off. A screenshot of each goes to test-output/report-screens/."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from sandbox.images import demo_corpus
from sandbox.stack import Stack
from tests.conftest import IrliveRunner
from tests.e2e import IN_BUCKET, OUT_BUCKET, read_run, upload
from tests.faultproxy import FaultProxy
from tests.test_budget import clean_samples, poll, run_hash
from tests.test_faults import _paid_call_with_token

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SCREENS = Path(__file__).resolve().parents[1] / "test-output" / "report-screens"
# The flags a headless chromium needs on a machine with no network (background fetches are refused loudly).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def chromium_path() -> str:
    found = os.environ.get("IRLIVE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no chromium: `./dev.sh test` installs Debian's (apt-get install chromium), or set "
                    "IRLIVE_CHROMIUM to a Chromium binary")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Opened:
    """A page opened from a file, with every request it made and every error it logged."""

    def __init__(self, browser: Browser, path: Path, *, scripts: bool = True) -> None:
        self.context = browser.new_context(java_script_enabled=scripts, viewport={"width": 1200, "height": 900})
        self.page: Page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url, wait_until="load")

    def text(self, selector: str) -> str:
        return self.page.inner_text(selector).strip()

    def outside_requests(self) -> list[str]:
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]

    def close(self) -> None:
        self.context.close()


def _report_file(stack: Stack, run_id: str, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """The report written at the run's end, from S3, and the manifest it sits beside."""
    manifest = read_run(stack, run_id).manifest
    body = stack.s3_client().get_object(Bucket=OUT_BUCKET, Key=manifest["report"])["Body"].read()
    path = tmp_path / f"{run_id}.html"
    path.write_bytes(body)
    return path, manifest


def _check_figures(opened: Opened, manifest: dict[str, Any]) -> None:
    assert opened.text("#images") == str(manifest["images"])
    assert opened.text("#calls") == str(manifest["calls"])
    assert opened.text("#spend") == f"${manifest['spend_cents'] / 100:,.2f}"
    assert opened.text("#state") == manifest["state"]
    assert opened.text("#count-spoof") == str(manifest["counts"]["spoof"])
    judged = sum(manifest["counts"][v] for v in ("live", "spoof", "no_face"))
    assert opened.text("#judged") == str(judged)
    for verdict, n in manifest["counts"].items():
        assert opened.text(f"#count-{verdict}-cell") == str(n)
    assert opened.text("#answers-lost").startswith(f"{manifest['answers_lost']} calls, "
                                                   f"{manifest['answers_lost_images']} images")
    failed = sum(manifest["counts"][v] for v in ("rejected", "error", "not_judged"))
    if failed:
        shown = sum(int(c) for c in opened.page.locator("#errors tr td:nth-child(3)").all_inner_texts())
        assert shown == failed, "every image without a verdict is in the errors table"


def _look(browser: Browser, path: Path, manifest: dict[str, Any], name: str) -> Opened:
    opened = Opened(browser, path)
    SCREENS.mkdir(parents=True, exist_ok=True)
    opened.page.screenshot(path=str(SCREENS / f"{name}.png"), full_page=True)
    _check_figures(opened, manifest)
    assert opened.outside_requests() == [], "the page fetched something"
    assert opened.errors == [], opened.errors
    # With scripts off it reads the same (it has none).
    plain = Opened(browser, path, scripts=False)
    assert plain.text("#images") == str(manifest["images"]) and plain.text("#state") == manifest["state"]
    plain.close()
    return opened


def test_the_report_of_a_demo_run_in_a_browser(clean_stack: Stack, irlive: IrliveRunner, browser: Browser,
                                               tmp_path: Path) -> None:
    upload(clean_stack, demo_corpus(60, seed=5, prefix="demo"))
    clean_stack.start_worker()
    done = irlive("scan", f"s3://{IN_BUCKET}/demo", "--wait", "--tag", "site=demo", timeout=180)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.splitlines()[0].strip()
    path, manifest = _report_file(clean_stack, run_id, tmp_path)
    opened = _look(browser, path, manifest, "demo-run")
    assert "site=demo" in opened.text("p.sub")
    records = read_run(clean_stack, run_id).records
    review = {r["key"] for r in records if r["verdict"] == "spoof" or (r["faces"] or 0) > 1}
    shown = set(opened.page.locator("#review td.key:nth-of-type(2)").all_inner_texts())
    assert review <= shown, "every spoof and every capture with two faces is on the review list"
    assert opened.page.locator("svg.pygal-chart").count() == 4
    opened.close()

    # The same run with thumbnails: every one of them loads.
    thumbs = tmp_path / "thumbs.html"
    made = irlive("report", run_id, "--thumbnails", "--out", str(thumbs))
    assert made.returncode == 0, made.stderr
    opened = _look(browser, thumbs, manifest, "demo-run-thumbnails")
    images = opened.page.locator("img.thumb")
    assert images.count() == opened.page.locator("tr.review-row").count() > 0
    widths = opened.page.eval_on_selector_all("img.thumb", "els => els.map(e => e.complete && e.naturalWidth)")
    assert all(w and w > 0 for w in widths), widths
    opened.close()


def test_the_report_of_a_run_with_rejections_and_a_lost_answer_in_a_browser(
        clean_stack: Stack, irlive: IrliveRunner, browser: Browser, tmp_path: Path) -> None:
    upload(clean_stack, demo_corpus(40, seed=9, prefix="lossy"))
    with FaultProxy.for_url(clean_stack.sandbox_url) as proxy:
        env = {"IRLIVE_MARKETPLACE_URL": proxy.url}
        # The first paid call's answer is lost after the seller billed it, and so is the read-back of its token:
        # the images are paid again, and the run says so. (A chunk's calls go together: once one call's answer
        # is dropped, only a read-back matches.)
        lock, dropped = threading.Lock(), []

        def first_call_then_a_read_back(head: bytes) -> bool:
            with lock:
                if not dropped and _paid_call_with_token(head):
                    dropped.append(head)
                    return True
                return bool(dropped) and head.startswith(b"GET /api/payments/")

        proxy.drop_mid_answer(0, count=2, match=first_call_then_a_read_back)
        clean_stack.start_worker(extra_env=env, concurrency=1)
        done = irlive("scan", f"s3://{IN_BUCKET}/lossy", "--wait", env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.splitlines()[0].strip()
    path, manifest = _report_file(clean_stack, run_id, tmp_path)
    assert manifest["answers_lost"] == 1 and manifest["counts"]["rejected"] > 0
    opened = _look(browser, path, manifest, "rejections-and-a-lost-answer")
    assert "Money moved without a verdict in return" in opened.page.inner_text("body")
    advice = opened.page.locator("#errors").inner_text()
    assert "not_an_image" in advice or "empty" in advice
    opened.close()


def test_the_report_of_a_cancelled_run_in_a_browser(clean_stack: Stack, irlive: IrliveRunner, browser: Browser,
                                                    tmp_path: Path) -> None:
    upload(clean_stack, clean_samples(300, "cancelled"))
    clean_stack.sandbox_config(latency_ms=600)
    # 5 calls/s: the 30 calls take 6 s to leave (a chunk's calls go together), so the cancel lands mid-run.
    clean_stack.start_worker(extra_env={"IRLIVE_RATE_LIMIT_PER_S": "5"}, concurrency=4)
    scanned = irlive("scan", f"s3://{IN_BUCKET}/cancelled", "--json")
    run_id = json.loads(scanned.stdout)["run_id"]
    poll(lambda: int(run_hash(clean_stack, run_id).get("calls") or 0) >= 1, 90, "a first call")
    assert irlive("cancel", run_id, "--wait", "--json", timeout=120).returncode == 0
    deadline = time.monotonic() + 60
    while not run_hash(clean_stack, run_id).get("finalised_at"):
        assert time.monotonic() < deadline, "the cancelled run was never finalised"
        time.sleep(0.2)
    path, manifest = _report_file(clean_stack, run_id, tmp_path)
    assert manifest["state"] == "cancelled" and manifest["counts"]["not_judged"] > 0
    opened = _look(browser, path, manifest, "cancelled-run")
    assert re.search(r"stopped: .*cancelled", opened.text("p.sub"))
    assert "run_cancelled" in opened.page.locator("#errors").inner_text()
    opened.close()
