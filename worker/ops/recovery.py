"""Getting stuck runs home: reconcile lost chunks, dead-letter poison chunks, redrive failed images."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from worker.config import S3Location
from worker.errors import UnknownRun
from worker.flow.pipeline import Chunk
from worker.flow.runs import Runs, now_iso
from worker.keys import Keys

BROKER_QUEUE = "irlive"
# Reopen one chunk: drop its error (and optionally rejected) records so they are judged again.
_REOPEN = """
local removed = 0
for i = 1, #ARGV - 1 do
  local rec = redis.call('HGET', KEYS[1], ARGV[i])
  if rec then
    local verdict = cjson.decode(rec)['verdict']
    redis.call('HDEL', KEYS[1], ARGV[i])
    redis.call('HINCRBY', KEYS[2], verdict, -1)
    redis.call('HINCRBY', KEYS[2], 'done', -1)
    removed = removed + 1
  end
end
if removed > 0 and redis.call('SREM', KEYS[3], ARGV[#ARGV]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'pending', 1)
end
if removed > 0 then
  redis.call('HSET', KEYS[2], 'state', 'running')
  redis.call('HDEL', KEYS[2], 'finished_at', 'tokens_unspent')
  redis.call('HDEL', KEYS[4], ARGV[#ARGV])
end
return removed
"""


@dataclass(frozen=True)
class Reconciled:
    """What a reconcile did."""

    run_id: str
    requeued_chunks: list[int]
    finalize_enqueued: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recovery:
    """Reads the broker's queue and the run's records to find chunks nobody is working on."""

    def __init__(self, redis: Any, keys: Keys, runs: Runs) -> None:
        self._redis = redis
        self._keys = keys
        self._runs = runs
        self._reopen = redis.register_script(_REOPEN)

    def orphans(self, run_id: str) -> list[Chunk]:
        """Chunks not complete, not parked, not leased by a delivery, and not waiting in the broker."""
        run = self._runs.get(run_id)
        if run is None:
            raise UnknownRun(run_id)
        if run["state"] in ("failed", "paused_budget"):
            return []
        done = {int(s) for s in self._redis.smembers(self._keys.chunks_done(run_id))}
        parked = {int(json.loads(m)["seq"]) for m in self._redis.lrange(self._keys.parked(run_id), 0, -1)}
        queued = {int(m["seq"]) for m in self.broker_messages() if m.get("run_id") == run_id}
        bucket = S3Location.parse(run["source"], "run source").bucket
        lost: list[Chunk] = []
        for seq in range(int(run["chunks"])):
            if seq in done or seq in parked or seq in queued:
                continue
            if self._redis.exists(self._keys.chunk_progress(run_id, seq) + ":lease"):
                continue
            items = self._runs.chunk_items(run_id, seq)
            if items is not None:
                lost.append(Chunk(run_id, seq, bucket, items))
        return lost

    def broker_messages(self) -> Iterator[dict[str, Any]]:
        """Chunk messages waiting in the queue or delivered but unacked (kombu's Redis layout)."""
        raws = list(self._redis.lrange(BROKER_QUEUE, 0, -1))
        raws += [json.dumps(json.loads(v)[0]) for v in self._redis.hvals("unacked")]
        for raw in raws:
            message = _chunk_message(raw)
            if message is not None:
                yield message

    def reopen_failed(self, run_id: str, *, include_rejected: bool = False) -> list[Chunk]:
        """Drop the run's error (and dead-lettered) records so their images are judged again; returns chunks."""
        run = self._runs.get(run_id)
        if run is None:
            raise UnknownRun(run_id)
        verdicts = ("error", "rejected") if include_rejected else ("error",)
        bucket = S3Location.parse(run["source"], "run source").bucket
        reopened: list[Chunk] = []
        for seq in range(int(run["chunks"])):
            progress = self._runs.progress(run_id, seq)
            indices = [i for i, rec in progress.items() if rec["verdict"] in verdicts]
            items = self._runs.chunk_items(run_id, seq)
            if not indices or items is None:
                continue
            self._reopen(keys=[self._keys.chunk_progress(run_id, seq), self._keys.run(run_id),
                               self._keys.chunks_done(run_id), self._keys.deliveries(run_id)],
                         args=[*indices, seq])
            reopened.append(Chunk(run_id, seq, bucket, items))
        self._drop_dead_letters(run_id)
        return reopened

    def dead_letter(self, chunk: Chunk, deliveries: int, last_error: str) -> None:
        """List the chunk once, however many deliveries it takes to write its error records."""
        if not self._redis.sadd(self._keys.dlq() + ":members", f"{chunk.run_id}/{chunk.seq}"):
            return
        entry = {"run_id": chunk.run_id, "seq": chunk.seq, "deliveries": deliveries, "last_error": last_error,
                 "images": len(chunk.items), "at": now_iso()}
        self._redis.rpush(self._keys.dlq(), json.dumps(entry, sort_keys=True))

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self._redis.lrange(self._keys.dlq(), 0, -1)]

    def _drop_dead_letters(self, run_id: str) -> None:
        for raw in self._redis.lrange(self._keys.dlq(), 0, -1):
            entry = json.loads(raw)
            if entry.get("run_id") == run_id:
                self._redis.lrem(self._keys.dlq(), 0, raw)
                self._redis.srem(self._keys.dlq() + ":members", f"{run_id}/{entry['seq']}")


def _chunk_message(raw: str | bytes) -> dict[str, Any] | None:
    try:
        envelope = json.loads(raw)
        if envelope.get("headers", {}).get("task") != "irlive.process_chunk":
            return None
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        message = args[0]
        return message if isinstance(message, dict) else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
