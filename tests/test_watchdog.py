"""The watchdog on a real Redis: finalises runs whose counters say done, re-enqueues stalled runs' chunks."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from sandbox.stack import Stack
from worker.flow.leases import Lease
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.ops.broker import Broker
from worker.ops.recovery import Recovery
from worker.ops.watchdog import Watchdog
from worker.seams.store import Store

pytestmark = pytest.mark.integration


def _watchdog(stack: Stack, sent: list[tuple[str, list[Any]]]) -> tuple[Runs, Watchdog]:
    store = Store(redis.Redis.from_url(stack.redis_url, decode_responses=True))
    keys = Keys()
    runs = Runs(store, keys)
    broker = Broker(store)
    dog = Watchdog(store, keys, runs, broker, Recovery(store, keys, runs, broker), lambda n, a: sent.append((n, a)),
                   stall_s=0.0)
    return runs, dog


def test_a_run_whose_chunks_all_completed_is_finalised(clean_stack: Stack) -> None:
    sent: list[tuple[str, list[Any]]] = []
    runs, dog = _watchdog(clean_stack, sent)
    runs.create("r1", source="s3://irlive-in/x", output="s3://irlive-out/results", settings={})
    seq = runs.add_chunk("r1", [("x/a.png", "e1")])
    runs.listing_finished("r1")
    runs.complete_chunk("r1", seq, "etag", {})  # as if the worker died before enqueueing finalisation

    assert dog.holds_lock()
    assert dog.tick() == 1
    assert sent == [("irlive.finalize_run", ["r1"])]


def test_a_stalled_run_gets_its_lost_chunks_back_and_only_those(clean_stack: Stack) -> None:
    sent: list[tuple[str, list[Any]]] = []
    runs, dog = _watchdog(clean_stack, sent)
    runs.create("r2", source="s3://irlive-in/x", output="s3://irlive-out/results", settings={})
    lost = runs.add_chunk("r2", [("x/a.png", "e1")])
    held = runs.add_chunk("r2", [("x/b.png", "e2")])
    done = runs.add_chunk("r2", [("x/c.png", "e3")])
    runs.listing_finished("r2")
    runs.complete_chunk("r2", done, "etag", {})
    assert Lease(runs.store, Keys().chunk_lease("r2", held), 60).take()

    assert dog.holds_lock()
    assert dog.tick() == 1
    assert sent == [("irlive.process_chunk", [{"run_id": "r2", "seq": lost, "bucket": "irlive-in",
                                               "items": [["x/a.png", "e1"]], "priority": "nightly"}])]


def test_a_run_still_listing_gets_a_lost_chunk_back(clean_stack: Stack) -> None:
    # An event window's run stays `listing` for its whole window: a chunk the broker lost must not wait for it.
    sent: list[tuple[str, list[Any]]] = []
    runs, dog = _watchdog(clean_stack, sent)
    runs.create("r4", source="s3://irlive-in/x", output="s3://irlive-out/results", settings={})
    lost = runs.add_chunk("r4", [("x/a.png", "e1")])

    assert dog.holds_lock()
    assert dog.tick() == 1
    assert sent == [("irlive.process_chunk", [{"run_id": "r4", "seq": lost, "bucket": "irlive-in",
                                               "items": [["x/a.png", "e1"]], "priority": "nightly"}])]


def test_a_run_that_failed_while_paused_sends_its_parked_chunks_to_wind_down(clean_stack: Stack) -> None:
    sent: list[tuple[str, list[Any]]] = []
    runs, dog = _watchdog(clean_stack, sent)
    runs.create("r3", source="s3://irlive-in/x", output="s3://irlive-out/results", settings={})
    seq = runs.add_chunk("r3", [("x/a.png", "e1")])
    runs.listing_finished("r3")
    message = {"run_id": "r3", "seq": seq, "bucket": "irlive-in", "items": [["x/a.png", "e1"]],
               "priority": "nightly"}
    assert runs.owner_pause("r3")[0] and runs.park("r3", message)
    # The calls that were in flight at the pause end failing: the threshold fails the run (as call_end.lua does).
    assert runs.fail("r3", "20 of 20 paid calls failed")

    assert dog.holds_lock()
    assert dog.tick() == 1
    assert sent == [("irlive.process_chunk", [message])]
    assert runs.parked("r3") == 0


def test_only_one_watchdog_acts_at_a_time(clean_stack: Stack) -> None:
    sent: list[tuple[str, list[Any]]] = []
    _, first = _watchdog(clean_stack, sent)
    _, second = _watchdog(clean_stack, sent)

    assert first.holds_lock() and not second.holds_lock()
    assert first.holds_lock(), "the holder keeps it"


def _delivered_by_hand(stack: Stack, tag: str) -> redis.Redis:
    """A chunk message moved from its queue into kombu's unacked hash as `tag` (its time index left to the test),
    as a worker's fetch leaves it; the stack's Redis client."""
    from worker.app import make_app, send_chunk
    from worker.config import Settings
    from worker.messages import Chunk

    send_chunk(make_app(Settings.from_env(stack.env)), Chunk("r1", 0, "irlive-in", [("x/a.png", "e1")], "nightly"))
    client = stack.redis_client()
    raw = client.lpop("irlive.nightly")
    assert raw is not None
    client.hset("unacked", tag, json.dumps([json.loads(raw), "", "irlive.nightly"]))
    return client


def test_a_delivery_without_its_index_entry_is_not_read_as_delivered_in_1970(clean_stack: Stack) -> None:
    """kombu writes and acks a delivery in the unacked hash and its time index together; a delivery seen in one and
    not the other (acked between two reads) is skipped, never handed back for 'no lease for 56 years'."""
    client = _delivered_by_hand(clean_stack, "tag-1")
    broker = Broker(Store(redis.Redis.from_url(clean_stack.redis_url, decode_responses=True)))
    assert broker.deliveries() == [], "half of a delivery is not a delivery"
    client.zadd("unacked_index", {"tag-1": 1_796_000_000.5})
    [delivery] = broker.deliveries()
    assert (delivery.tag, delivery.delivered_at, delivery.chunk["seq"] if delivery.chunk else None) == (
        "tag-1", 1_796_000_000.5, 0)


def test_a_delivery_a_live_worker_holds_without_a_lease_is_not_handed_back(clean_stack: Stack) -> None:
    """A chunk delivered 60 s ago with no lease yet (waiting for a free thread in its live worker) stays with
    that worker while the process says it holds it; once its word lapses (the process died), it is handed back."""
    from worker.ops.holding import Holding

    client = _delivered_by_hand(clean_stack, "tag-1")
    client.zadd("unacked_index", {"tag-1": time.time() - 60})
    store = Store(redis.Redis.from_url(clean_stack.redis_url, decode_responses=True))
    keys = Keys()
    runs = Runs(store, keys)
    restored: list[str] = []
    broker = Broker(store, restore=restored.append)
    dog = Watchdog(store, keys, runs, broker, Recovery(store, keys, runs, broker), lambda n, a: None)
    worker = Holding(store, keys, forget_after_s=3600, process="host-a/41")
    worker.received("task-1", "tag-1")
    worker.say()

    assert dog.restore_orphans() == 0 and restored == [], "its live worker holds it"
    client.delete(keys.holding("host-a/41"))  # the process stopped saying so: it is gone
    assert dog.restore_orphans() == 1 and restored == ["tag-1"]
    assert client.smembers(keys.holders()) == set(), "a process gone quiet is dropped from the holders"


def test_a_worker_says_what_it_holds_while_it_lives_and_takes_it_back_when_it_stops(clean_stack: Stack) -> None:
    import socket

    from sandbox import procs

    keys = Keys()
    client = clean_stack.redis_client()
    worker = clean_stack.start_worker()
    me = f"{socket.gethostname()}/{worker.proc.pid}"
    procs.wait_until(lambda: me.encode() in client.smembers(keys.holders()) and client.exists(keys.holding(me)) == 1,
                     30, "the worker's word in Redis", log=worker.log)
    assert json.loads(client.get(keys.holding(me)) or "null") == []
    assert 0 < client.pttl(keys.holding(me)) <= 15_000
    clean_stack.stop_workers()
    assert client.exists(keys.holding(me)) == 0 and me.encode() not in client.smembers(keys.holders())


def test_a_worker_stops_saying_it_holds_a_delivery_its_broker_connection_loss_let_go(clean_stack: Stack) -> None:
    """A chunk waiting in its worker for a retry's countdown when the broker connection drops: Celery lets the
    request go (its delivery tag belongs to the lost channel; the broker gives it out again), so the worker must
    stop saying it holds it, or the watchdog leaves it alone until the visibility timeout (about three hours:
    a Sentinel failover that the workers rode out left a run one chunk short)."""
    import socket

    from sandbox import procs
    from worker.app import make_app
    from worker.config import Settings
    from worker.messages import PROCESS_CHUNK, Chunk

    keys = Keys()
    clean_stack.restart_redis(appendonly=True)  # the broker's deliveries survive the crash below
    worker = clean_stack.start_worker()
    me = f"{socket.gethostname()}/{worker.proc.pid}"
    chunk = Chunk("r1", 0, "irlive-in", [("x/a.png", "e1")], "nightly")
    make_app(Settings.from_env(clean_stack.env)).send_task(PROCESS_CHUNK, args=[chunk.to_message()],
                                                           queue=chunk.queue, countdown=3600)

    def said() -> list[str]:
        raw = clean_stack.redis_client().get(keys.holding(me))
        return list(json.loads(raw)) if raw else []

    procs.wait_until(lambda: len(said()) == 1, 30, "the worker to say it holds the chunk", log=worker.log)
    [tag] = said()
    clean_stack.restart_redis(appendonly=True)
    procs.wait_until(lambda: clean_stack.redis_client().hexists("unacked", tag) and said() == [], 40,
                     "the worker to stop saying it holds the delivery it let go", log=worker.log)
