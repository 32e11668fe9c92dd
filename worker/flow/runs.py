"""Run records, per-image progress, the done-set and chunk completion, all in Redis."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis import exceptions as redis_errors

from worker.errors import TransientError
from worker.judge.manifest import JUDGED, VERDICTS, Item
from worker.keys import Keys
from worker.settle_lua import SETTLE_FN

# Records are saved once per image per chunk (only the first save counts, so redelivery never double counts),
# together with the settlement of the token that paid for them, if any: an answer is never lost between the
# two. KEYS: progress, run, done, pay, leases, totals. ARGV: now_ms, pid ('' = none), amount, request_id,
# then five per record: index, record, verdict, identity, done-set entry ('' = none).
_RECORD = SETTLE_FN + """
if ARGV[2] ~= '' then
  settle(KEYS[4], KEYS[5], KEYS[6], KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[1], 'spent')
end
local saved = 0
for i = 5, #ARGV, 5 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[i + 2], 1)
    redis.call('HINCRBY', KEYS[2], 'done', 1)
    if ARGV[i + 4] ~= '' then redis.call('HSET', KEYS[3], ARGV[i + 3], ARGV[i + 4]) end
    saved = saved + 1
  end
end
redis.call('HSET', KEYS[2], 'progress_ms', ARGV[1])
return saved
"""
# A new chunk: its number, its counters and its keys, in one step (a crash cannot count it without its keys).
_ADD_CHUNK = """
local seq = redis.call('HINCRBY', KEYS[1], 'chunks', 1) - 1
redis.call('HINCRBY', KEYS[1], 'pending', 1)
redis.call('HINCRBY', KEYS[1], 'total', tonumber(ARGV[1]))
redis.call('HSET', KEYS[2], seq, ARGV[2])
return seq
"""
# Returns the chunks still pending after this one; a repeated completion changes nothing.
_COMPLETE = """
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 then
  return redis.call('HINCRBY', KEYS[2], 'pending', -1)
end
return tonumber(redis.call('HGET', KEYS[2], 'pending') or '0')
"""
# End of listing: release the producer's hold; a run paused meanwhile stays paused.
_LISTED = """
if redis.call('HGET', KEYS[1], 'state') == 'listing' then redis.call('HSET', KEYS[1], 'state', 'running') end
redis.call('HSET', KEYS[1], 'listed', '1')
return redis.call('HINCRBY', KEYS[1], 'pending', -tonumber(ARGV[1]))
"""
# Park a chunk of a paused run; 0 means the run is no longer paused and the caller must send it on itself.
_PARK = """
if redis.call('HGET', KEYS[1], 'state') ~= 'paused_budget' then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""
_PAUSE = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'running' and state ~= 'listing' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'paused_budget', 'pause_reason', ARGV[1])
return 1
"""
# Raise the cap (if given) and unpause; the parked chunks are returned, removed only once re-sent.
_RESUME = """
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'budget_cents', ARGV[1]) end
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'paused_budget' then
  redis.call('HSET', KEYS[1], 'state', redis.call('HGET', KEYS[1], 'listed') == '1' and 'running' or 'listing')
  redis.call('HDEL', KEYS[1], 'pause_reason')
end
return redis.call('LRANGE', KEYS[2], 0, -1)
"""
RECORD_RETRY_S = 60.0
# The producer holds one extra 'pending' while it lists, so early chunks cannot finish the run.
LISTING_HOLD = 1
TERMINAL_STATES = ("done", "failed")
STOPPED_STATES = ("done", "failed", "paused_budget")


@dataclass(frozen=True)
class RunStatus:
    """What `irlive status` shows."""

    run_id: str
    state: str
    total: int
    done: int
    counts: dict[str, int]
    skipped: int
    chunks: int
    pending: int
    calls: int
    spend_cents: int
    error: str | None
    budget_cents: int | None = None
    tokens_bought: int = 0


class Runs:
    """Run bookkeeping; the Redis client must use decode_responses=True."""

    def __init__(self, redis: Any, keys: Keys) -> None:
        self.redis = redis
        self._redis = redis
        self._keys = keys
        self._record = redis.register_script(_RECORD)
        self._complete = redis.register_script(_COMPLETE)
        self._listed = redis.register_script(_LISTED)
        self._add_chunk = redis.register_script(_ADD_CHUNK)
        self._park = redis.register_script(_PARK)
        self._pause = redis.register_script(_PAUSE)
        self._resume = redis.register_script(_RESUME)

    def create(self, run_id: str, *, source: str, output: str, settings: dict[str, Any],
               budget_cents: int | None = None) -> None:
        self._redis.hset(self._keys.run(run_id), mapping={
            "run_id": run_id, "state": "listing", "source": source, "output": output,
            "created_at": now_iso(), "total": 0, "chunks": 0, "pending": LISTING_HOLD, "skipped": 0,
            "done": 0, "calls": 0, "spend_cents": 0, "committed_cents": 0, "tokens_bought": 0,
            "budget_cents": "" if budget_cents is None else budget_cents,
            "settings": json.dumps(settings, sort_keys=True),
        })
        self._redis.zadd(self._keys.runs(), {run_id: time.time()})

    def add_chunk(self, run_id: str, items: list[tuple[str, str]]) -> int:
        """Count and keep one more chunk (its keys, for reconcile and redrive) before it is enqueued."""
        seq = self._add_chunk(keys=[self._keys.run(run_id), self._keys.chunk_items(run_id)],
                              args=[len(items), json.dumps(items)])
        return int(seq)

    def chunk_items(self, run_id: str, seq: int) -> list[tuple[str, str]] | None:
        raw = self._redis.hget(self._keys.chunk_items(run_id), seq)
        return [(k, e) for k, e in json.loads(raw)] if raw else None

    def add_skipped(self, run_id: str, n: int) -> None:
        if n:
            self._redis.hincrby(self._keys.run(run_id), "skipped", n)

    def listing_finished(self, run_id: str) -> int:
        """Release the producer's hold; returns pending chunks (0 means the run can be finalised)."""
        return int(self._listed(keys=[self._keys.run(run_id)], args=[LISTING_HOLD]))

    def pause(self, run_id: str, reason: str) -> bool:
        """Running -> paused_budget; False if the run was not running (already paused, failed, done)."""
        return bool(self._pause(keys=[self._keys.run(run_id)], args=[reason]))

    def park(self, run_id: str, message: dict[str, Any]) -> bool:
        """Keep a chunk of a paused run until it resumes; False if it is not paused (send it on instead)."""
        return bool(self._park(keys=[self._keys.run(run_id), self._keys.parked(run_id)],
                               args=[json.dumps(message, sort_keys=True)]))

    def resume(self, run_id: str, budget_cents: int | None) -> list[dict[str, Any]]:
        """Raise the cap and unpause; returns the parked chunk messages to send again (then call unpark)."""
        raw = self._resume(keys=[self._keys.run(run_id), self._keys.parked(run_id)],
                           args=["" if budget_cents is None else budget_cents])
        return [json.loads(m) for m in raw]

    def unpark(self, run_id: str, count: int) -> None:
        """Drop the first `count` parked messages once they have been re-sent."""
        self._redis.ltrim(self._keys.parked(run_id), count, -1)

    def parked(self, run_id: str) -> int:
        return int(self._redis.llen(self._keys.parked(run_id)))

    def count_delivery(self, run_id: str, seq: int, step: int = 1) -> int:
        """Deliveries of a chunk that failed or crashed (deferrals give theirs back); for dead-lettering."""
        return int(self._redis.hincrby(self._keys.deliveries(run_id), seq, step))

    def note_error(self, run_id: str, seq: int, error: str) -> None:
        self._redis.hset(self._keys.deliveries(run_id), f"error:{seq}", error[:500])

    def last_error(self, run_id: str, seq: int) -> str:
        return str(self._redis.hget(self._keys.deliveries(run_id), f"error:{seq}") or "unknown")

    def lease_chunk(self, run_id: str, seq: int, holder: str, ttl_s: float) -> bool:
        """One delivery of a chunk works at a time: a duplicate delivery must not pay for the same images."""
        key = self._keys.chunk_progress(run_id, seq) + ":lease"
        ms = int(ttl_s * 1000)
        if self._redis.set(key, holder, nx=True, px=ms):
            return True
        if self._redis.get(key) == holder:
            self._redis.pexpire(key, ms)
            return True
        return False

    def release_chunk(self, run_id: str, seq: int, holder: str) -> None:
        key = self._keys.chunk_progress(run_id, seq) + ":lease"
        if self._redis.get(key) == holder:
            self._redis.delete(key)

    def get(self, run_id: str) -> dict[str, Any] | None:
        raw: dict[str, str] = self._redis.hgetall(self._keys.run(run_id))
        if not raw:
            return None
        run: dict[str, Any] = dict(raw)
        run["settings"] = json.loads(raw.get("settings", "{}"))
        return run

    def status(self, run_id: str) -> RunStatus | None:
        run = self.get(run_id)
        if run is None:
            return None
        return RunStatus(
            run_id=run_id, state=run["state"], total=int(run["total"]), done=int(run["done"]),
            counts={v: int(run.get(v, 0)) for v in VERDICTS}, skipped=int(run["skipped"]),
            chunks=int(run["chunks"]), pending=int(run["pending"]), calls=int(run["calls"]),
            spend_cents=int(run["spend_cents"]), error=run.get("stop_reason") or run.get("pause_reason"),
            budget_cents=int(run["budget_cents"]) if run.get("budget_cents") else None,
            tokens_bought=int(run.get("tokens_bought") or 0),
        )

    def set_state(self, run_id: str, state: str, error: str | None = None) -> None:
        mapping = {"state": state}
        if error is not None:
            mapping["stop_reason"] = error
        self._redis.hset(self._keys.run(run_id), mapping=mapping)

    def fail(self, run_id: str, error: str) -> None:
        """Stop the run for a reason a person must fix; later chunks of it are dropped on arrival."""
        self.set_state(run_id, "failed", error)

    def progress(self, run_id: str, seq: int) -> dict[int, dict[str, Any]]:
        raw: dict[str, str] = self._redis.hgetall(self._keys.chunk_progress(run_id, seq))
        return {int(k): json.loads(v) for k, v in raw.items()}

    def save(self, run_id: str, seq: int, index: int, item: Item, record: dict[str, Any]) -> bool:
        """Record one image's outcome once; judged verdicts also enter the done-set."""
        return self.record(run_id, seq, [(index, item, record)]) == 1

    def record(self, run_id: str, seq: int, saves: list[tuple[int, Item, dict[str, Any]]],
               paid_by: tuple[str, int, str] | None = None) -> int:
        """Save records, and settle the token (payment id, cents, request id) that paid for them, atomically."""
        args: list[Any] = [_now_ms(), *(paid_by or ("", 0, ""))]
        for index, item, rec in saves:
            args += [index, json.dumps(rec, sort_keys=True), rec["verdict"], item.identity,
                     _done_entry(run_id, rec)]
        pid = paid_by[0] if paid_by else "none"
        keys = [self._keys.chunk_progress(run_id, seq), self._keys.run(run_id), self._keys.done(),
                self._keys.payment(pid), self._keys.leases(), self._keys.wallet_totals()]
        # The script is idempotent, so a Redis blip is retried here rather than losing a paid answer.
        deadline = time.monotonic() + RECORD_RETRY_S
        delay = 0.1
        while True:
            try:
                return int(self._record(keys=keys, args=args))
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise TransientError(f"could not record results in Redis: {type(exc).__name__}") from None
                time.sleep(delay)
                delay = min(2.0, delay * 2)

    def complete_chunk(self, run_id: str, seq: int) -> int:
        return int(self._complete(keys=[self._keys.chunks_done(run_id), self._keys.run(run_id)], args=[seq]))

    def already_judged(self, identities: list[str]) -> list[dict[str, Any] | None]:
        if not identities:
            return []
        values = self._redis.hmget(self._keys.done(), identities)
        return [json.loads(v) if v else None for v in values]

    def set_once(self, run_id: str, name: str, value: str) -> str:
        """Set a field only the first time, so finalising twice writes the same manifest; returns the value."""
        self._redis.hsetnx(self._keys.run(run_id), name, value)
        stored: str = self._redis.hget(self._keys.run(run_id), name)
        return stored


def _done_entry(run_id: str, record: dict[str, Any]) -> str:
    if record["verdict"] not in JUDGED:
        return ""
    brief = {k: record.get(k) for k in ("suggestion", "rate", "faces", "request_id", "judged_at")}
    return json.dumps({"run_id": run_id, "verdict": record["verdict"], "record": brief}, sort_keys=True)


def _now_ms() -> int:
    return int(time.time() * 1000)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
