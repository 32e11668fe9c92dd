"""Getting stuck runs home: find lost chunks, dead-letter poison chunks, redrive failed images."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from worker.config import S3Location
from worker.errors import ConfigError, UnknownRun
from worker.flow.runs import Runs, now_iso
from worker.flow.states import HELD
from worker.judge.manifest import chunk_key
from worker.keys import Keys
from worker.messages import DEFAULT_PRIORITY, PRIORITIES, Chunk
from worker.ops.broker import Broker
from worker.seams.store import Store

if TYPE_CHECKING:  # boto3 is loaded by whoever builds a Storage, not by the commands that read Redis only
    from worker.seams.storage import Storage


def priority_of(run: dict[str, Any]) -> str:
    """The priority a run's chunks were queued with (older runs: the default)."""
    priority = str(run.get("settings", {}).get("priority") or DEFAULT_PRIORITY)
    return priority if priority in PRIORITIES else DEFAULT_PRIORITY


@dataclass(frozen=True)
class Reconciled:
    """What a reconcile did."""

    run_id: str
    requeued_chunks: list[int]
    finalize_enqueued: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Recovery:
    """Reads the broker and the run's records to find chunks nobody is working on."""

    def __init__(self, store: Store, keys: Keys, runs: Runs, broker: Broker | None = None) -> None:
        self._store = store
        self._keys = keys
        self._runs = runs
        self._broker = broker or Broker(store)
        self._reopen = store.script("flow", "reopen")

    def orphans(self, run_id: str) -> list[Chunk]:
        """Chunks not complete, not parked, not leased by a delivery, and nowhere in the broker (lost)."""
        run = self._runs.get(run_id)
        if run is None:
            raise UnknownRun(run_id)
        if run["state"] in HELD or run.get("finalised_at"):
            return []
        done = {int(s) for s in self._store.smembers(self._keys.chunks_done(run_id))}
        parked = {int(json.loads(m)["seq"]) for m in self._store.lrange(self._keys.parked(run_id), 0, -1)}
        in_broker = [m for m in self._broker.queued_chunks()]
        in_broker += [d.chunk for d in self._broker.deliveries() if d.chunk is not None]
        queued = {int(m["seq"]) for m in in_broker if m.get("run_id") == run_id}
        lost: list[Chunk] = []
        for seq in range(int(run["chunks"])):
            if seq in done or seq in parked or seq in queued:
                continue
            if self._store.exists(self._keys.chunk_lease(run_id, seq)):
                continue
            chunk = self._chunk(run_id, run, seq)
            if chunk is not None:
                lost.append(chunk)
        return lost

    def reopen_failed(self, run_id: str, *, include_rejected: bool = False,
                      storage: Storage | None = None) -> list[Chunk]:
        """Drop the run's error (and dead-lettered) records so their images are judged again; returns chunks.

        A run finalised and archived keeps its records only in its chunk manifests: they are read back
        from S3 (`storage`) into Redis first.
        """
        run = self._runs.get(run_id)
        if run is None:
            raise UnknownRun(run_id)
        # not_judged: images a cancelled or failed run never paid for; a redrive judges them after all.
        verdicts = ("error", "not_judged", "rejected") if include_rejected else ("error", "not_judged")
        if run.get("archived_at"):
            if storage is None:
                raise ConfigError(f"run {run_id} is archived: its records are read back from S3")
            self._restore_from_manifests(run_id, run, storage, verdicts)
        reopened: list[Chunk] = []
        for seq in range(int(run["chunks"])):
            progress = self._runs.progress(run_id, seq)
            indices = [i for i, rec in progress.items() if rec["verdict"] in verdicts]
            chunk = self._chunk(run_id, run, seq)
            if not indices or chunk is None:
                continue
            self._reopen([self._keys.chunk_progress(run_id, seq), self._keys.run(run_id),
                          self._keys.chunks_done(run_id), self._keys.deliveries(run_id)], [*indices, seq])
            reopened.append(chunk)
        self._drop_dead_letters(run_id)
        return reopened

    def _chunk(self, run_id: str, run: dict[str, Any], seq: int) -> Chunk | None:
        entry = self._runs.chunk_entry(run_id, seq)
        if entry is None:
            return None
        bucket, items = entry
        if bucket is None:
            bucket = S3Location.parse(run["source"], "run source").bucket
        return Chunk(run_id, seq, bucket, items, priority_of(run))

    def _restore_from_manifests(self, run_id: str, run: dict[str, Any], storage: Storage,
                                verdicts: tuple[str, ...]) -> None:
        output = S3Location.parse(run["output"], "run output")
        for seq in range(int(run["chunks"])):
            doc, _ = storage.get_json(output.bucket, chunk_key(output, run_id, seq))
            records = list(doc["images"])
            if any(r["verdict"] in verdicts for r in records):
                self._runs.restore_chunk(run_id, seq, records, complete=True)

    def dead_letter(self, chunk: Chunk, deliveries: int, last_error: str) -> None:
        """List the chunk once, however many deliveries it takes to write its error records."""
        if not self._store.sadd(self._keys.dlq_members(), chunk.label()):
            return
        entry = {"run_id": chunk.run_id, "seq": chunk.seq, "deliveries": deliveries, "last_error": last_error,
                 "images": len(chunk.items), "at": now_iso()}
        self._store.rpush(self._keys.dlq(), json.dumps(entry, sort_keys=True))

    def dead_letters(self) -> list[dict[str, Any]]:
        return [json.loads(e) for e in self._store.lrange(self._keys.dlq(), 0, -1)]

    def _drop_dead_letters(self, run_id: str) -> None:
        for raw in self._store.lrange(self._keys.dlq(), 0, -1):
            entry = json.loads(raw)
            if entry.get("run_id") == run_id:
                self._store.lrem(self._keys.dlq(), 0, raw)
                self._store.srem(self._keys.dlq_members(), f"{run_id}/{entry['seq']}")
