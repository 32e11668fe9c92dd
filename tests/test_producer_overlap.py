"""The scan lists a page ahead in a thread (bounded, errors raised as they were) and registers each chunk in one
Redis round trip: done-set check, skipped count and chunk bookkeeping together."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from producer.filters import DEFAULT_SUFFIXES
from producer.scan import ScanRequest, scan
from producer.sources import Listed, Source, ahead
from sandbox.procs import wait_until
from sandbox.stack import Stack
from worker.app import make_app
from worker.config import Settings
from worker.errors import TransientError
from worker.flow.claims import Claims, DoneEntry
from worker.flow.runs import Runs
from worker.judge.manifest import Item
from worker.keys import Keys
from worker.messages import QUEUES
from worker.seams.storage import ObjectInfo
from worker.seams.store import Store

BUCKET = "irlive-in"
KEYS = Keys("irlive")


# ---- the read-ahead thread, without servers --------------------------------------------------------------


class Counted:
    """An iterator of 0..n-1 that records how far it ever ran ahead of its consumer, and whether it was closed."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.produced = self.consumed = self.most_ahead = 0
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[int]:
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise TransientError(f"s3://{BUCKET}/x: S3 answered SlowDown")
                self.produced += 1
                self.most_ahead = max(self.most_ahead, self.produced - self.consumed)
                yield i
        finally:
            self.closed.set()


def test_read_ahead_yields_everything_in_order_and_never_runs_more_than_its_depth_ahead() -> None:
    source = Counted(200)
    got = []
    for item in ahead(iter(source), depth=5):
        source.consumed += 1
        got.append(item)
        if item == 0:
            # Let the thread fill the queue while the consumer holds the first item.
            wait_until(lambda: source.produced >= 7, 5, "the thread to fill the queue")
    assert got == list(range(200))
    # depth items queued, one more held by the thread waiting to put it, and the one the consumer holds.
    assert source.most_ahead <= 5 + 2
    assert source.closed.is_set()


def test_an_error_in_the_listing_thread_reaches_the_consumer_after_what_was_listed_before_it() -> None:
    source = Counted(100, fail_at=42)
    got: list[int] = []
    with pytest.raises(TransientError, match=r"S3 answered SlowDown"):
        for item in ahead(iter(source), depth=3):
            got.append(item)
    assert got == list(range(42))


def test_a_consumer_that_stops_early_stops_the_thread_and_closes_the_listing() -> None:
    source = Counted(10_000)
    listing = ahead(iter(source), depth=4)
    assert [next(listing) for _ in range(3)] == [0, 1, 2]
    listing.close()  # type: ignore[attr-defined]
    wait_until(source.closed.is_set, 5, "the listing to be closed")
    assert source.produced < 10_000
    with pytest.raises(ValueError):
        next(ahead(iter([1]), depth=0))


# ---- the scan against real Redis (a stub source and storage: S3 is not what is under test) ------------------


class Rows(Source):
    """`n` listed images with ETags; raises a TransientError after `fail_after` of them when given."""

    def __init__(self, n: int, fail_after: int | None = None, etag: str = "e") -> None:
        super().__init__("s3", f"s3://{BUCKET}/stub")
        self.n, self.fail_after, self.etag = n, fail_after, etag

    def rows(self, storage: Any) -> Iterator[Listed]:
        for i in range(self.n):
            if i == self.fail_after:
                raise TransientError(f"s3://{BUCKET}/stub: S3 answered InternalError")
            yield Listed(BUCKET, ObjectInfo(f"stub/img_{i:05d}.png", 1, self.etag, None, None))


class NoS3:
    """Every bucket exists; nothing else is asked of S3 by a scan of a stub source."""

    def check_bucket(self, bucket: str) -> None:
        return None


def _parts(stack: Stack) -> tuple[Settings, Store, Runs, Claims, Any]:
    settings = Settings.from_env({**stack.env, "IRLIVE_OUTPUT": "s3://irlive-out/results"})
    store = Store.from_url(stack.redis_url)
    return settings, store, Runs(store, KEYS), Claims(store, KEYS), make_app(settings)


def _scan(stack: Stack, source: Source, force: bool = False) -> tuple[Any, Store, Runs]:
    settings, store, runs, claims, app = _parts(stack)
    request = ScanRequest(source, DEFAULT_SUFFIXES, force=force)
    return scan(settings, NoS3(), runs, claims, app, request,  # type: ignore[arg-type]
                settings.require_output()), store, runs


def test_a_listing_error_mid_scan_raises_as_before_and_every_registered_chunk_is_enqueued(
        clean_stack: Stack) -> None:
    settings, store, runs, claims, app = _parts(clean_stack)
    request = ScanRequest(Rows(1000, fail_after=120), DEFAULT_SUFFIXES)
    with pytest.raises(TransientError, match=r"stub: S3 answered InternalError"):
        scan(settings, NoS3(), runs, claims, app, request, settings.require_output())  # type: ignore[arg-type]
    run_id = store.zrange(KEYS.runs(), 0, -1)[0]
    status = runs.status(run_id)
    assert status is not None
    # As before the thread: the two full chunks listed before the error are registered and sent, the 20 rows
    # of the open chunk are not; the run keeps the producer's hold and stays `listing` (never finalised empty).
    assert (status.state, status.chunks, status.total, status.pending) == ("listing", 2, 100, 3)
    assert store.llen(QUEUES["nightly"]) == 2
    assert sorted(int(s) for s in store.hkeys(KEYS.chunk_items(run_id))) == [0, 1]


def test_one_round_trip_checks_the_done_set_counts_skips_and_keeps_the_chunk_as_add_chunk_did(
        clean_stack: Stack) -> None:
    _, store, runs, claims, _ = _parts(clean_stack)
    run_id = "r1"
    runs.create(run_id, source="s", output="o", settings={})
    items = [(f"k/{i}.png", f"etag{i}") for i in range(6)]
    claims.restore_judged([(Item(BUCKET, k, e).identity, DoneEntry("live", 1, "old", 0)) for k, e in items[:2]])
    # A malformed entry is not a judgment (as DoneEntry.decode says), and a row not looked up is always fresh.
    store.hset(KEYS.done(Item(BUCKET, *items[2]).identity).shard, KEYS.done(Item(BUCKET, *items[2]).identity).field,
               "garbage")
    done = runs.add_scanned(run_id, BUCKET, items, [True, False, True, True, True, True])
    assert (done.seq, done.skipped, done.fresh) == (0, 1, items[1:])
    raw = store.hget(KEYS.chunk_items(run_id), 0)
    assert raw == json.dumps({"bucket": BUCKET, "items": [list(i) for i in items[1:]]})
    assert runs.chunk_entry(run_id, 0) == (BUCKET, items[1:])
    run = store.hgetall(KEYS.run(run_id))
    assert (run["chunks"], run["total"], run["skipped"], run["pending"]) == ("1", "5", "1", "2")
    # Every image judged: counted as skipped, no chunk.
    again = runs.add_scanned(run_id, BUCKET, items[:1], [True])
    assert (again.seq, again.skipped, again.fresh) == (None, 1, [])
    # Cancelled while listing: nothing more is written.
    runs.cancel(run_id)
    stopped = runs.add_scanned(run_id, BUCKET, items, [True] * 6)
    assert stopped.ending == "cancelled" and stopped.seq is None
    assert store.hget(KEYS.run(run_id), "chunks") == "1"


def _commands_sent(stack: Stack, n: int) -> Counter[str]:
    """The commands clients sent Redis (MONITOR, leaving out those scripts ran) while scanning n stub rows."""
    stack.redis_client().flushall()
    seen: Counter[str] = Counter()
    monitor_client = stack.redis_client()
    with monitor_client.monitor() as monitor:
        def watch() -> None:
            while True:
                command = monitor.next_command()
                if command["command"] == "ECHO end-of-probe":
                    return
                if command.get("client_type") != "lua":
                    seen[command["command"].split(" ", 1)[0].upper()] += 1

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        result, _, _ = _scan(stack, Rows(n))
        stack.redis_client().echo("end-of-probe")
        watcher.join(timeout=30)
    assert not watcher.is_alive() and result.chunks == n // 50
    return seen


def test_a_scan_sends_redis_one_command_per_chunk_to_register_it_one_to_enqueue_it_and_the_sent_event(
        clean_stack: Stack) -> None:
    _commands_sent(clean_stack, 50)  # Redis learns the scripts: what is left is the same for any size
    small, large = _commands_sent(clean_stack, 500), _commands_sent(clean_stack, 1500)
    per_chunk = {name: (large[name] - small[name]) / 20 for name in large.keys() | small.keys()
                 if large[name] != small[name]}
    # The done-set check, the skipped count and the chunk's bookkeeping are one script; the message one LPUSH;
    # Celery's task-sent event (what Flower shows of a queued chunk) one PUBLISH, answered by nobody.
    assert per_chunk == {"EVALSHA": 1.0, "LPUSH": 1.0, "PUBLISH": 1.0}


def test_a_scan_skips_what_the_done_set_holds_and_force_or_no_etag_judges_it_again(clean_stack: Stack) -> None:
    claims = _parts(clean_stack)[3]
    judged = [(Item(BUCKET, f"stub/img_{i:05d}.png", "e").identity, DoneEntry("spoof", 1, "old", 0))
              for i in range(0, 120, 2)]
    claims.restore_judged(judged)
    result, _, runs = _scan(clean_stack, Rows(120))
    assert (result.found, result.skipped, result.enqueued, result.chunks) == (120, 60, 60, 3)
    status = runs.status(result.run_id)
    assert status is not None and (status.skipped, status.total, status.chunks) == (60, 60, 3)
    forced, _, _ = _scan(clean_stack, Rows(120), force=True)
    assert (forced.skipped, forced.enqueued) == (0, 120)
    unknown, _, _ = _scan(clean_stack, Rows(120, etag=""))
    assert (unknown.skipped, unknown.enqueued) == (0, 120)


def test_a_run_cancelled_while_listing_stops_the_listing(clean_stack: Stack) -> None:
    settings, store, runs, claims, app = _parts(clean_stack)
    progress: list[int] = []

    def cancel_once(result: Any) -> None:
        progress.append(result.chunks)
        if result.chunks == 2:
            runs.cancel(result.run_id)

    request = ScanRequest(Rows(5000), DEFAULT_SUFFIXES)
    result = scan(settings, NoS3(), runs, claims, app, request, settings.require_output(),  # type: ignore[arg-type]
                  cancel_once)
    assert result.chunks == 2 and any("was cancelled while listing" in w for w in result.warnings)
    assert store.llen(QUEUES["nightly"]) == 2
    assert progress == [1, 2]
