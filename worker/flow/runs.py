"""Run records, per-image progress and chunk completion, in Redis (through the store seam)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.errors import ConfigError, StoreUnavailable, TransientError
from worker.flow.claims import DoneEntry
from worker.flow.states import ENDING, RunState, can_move, stopped
from worker.judge.manifest import JUDGED, VERDICTS, Item
from worker.keys import Keys
from worker.seams.store import Store

# A paid answer's records are retried this long over Redis trouble before the delivery gives up (the answer
# stays in the ledger and the next delivery records it without paying again).
RECORD_RETRY_S = 120.0
# Chunks whose progress is read per pipelined round trip (50 records each).
PROGRESS_BATCH = 100
# The producer holds one extra 'pending' while it lists, so early chunks cannot finish the run.
LISTING_HOLD = 1


@dataclass(frozen=True)
class Save:
    """One record to save: the image's position in its chunk, the image, the record, and how it was judged."""

    index: int
    item: Item
    record: dict[str, Any]
    # A record copied from another run's judgment (it is already in the done-set).
    duplicate: bool = False
    # The image's content key (byte-identical objects share it), None where unknown.
    content: str | None = None
    # A record of a copy: another object with the same content was judged (its identity enters the done-set).
    same_content: bool = False


@dataclass(frozen=True)
class Scanned:
    """What registering one listed chunk did: its number (None: nothing left to judge, or the run is ending),
    the images to judge, how many were judged already, and the state that stopped it (None: it went on)."""

    seq: int | None
    fresh: list[tuple[str, str]]
    skipped: int
    ending: str | None = None


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
    duplicates: int = 0
    answers_lost: int = 0
    answers_lost_images: int = 0
    # The run manifest is written (a cancelled or failed run winds its chunks down first).
    finalised: bool = False
    created_ms: int = 0
    progress_ms: int = 0

    @property
    def stopped(self) -> bool:
        """Where `status --wait` stops following: paused, done, or cancelled/failed with its manifest written."""
        return stopped(self.state, self.finalised)


class Runs:
    """Run bookkeeping. Money fields of the run hash (committed, calls, spend) are written by the ledger."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self.store = store
        self._keys = keys
        self._record = store.script("flow", "record")
        self._complete = store.script("flow", "complete_chunk")
        self._listed = store.script("flow", "listing_finished")
        self._add_chunk = store.script("flow", "add_chunk")
        self._scan_chunk = store.script("flow", "scan_chunk")
        self._park = store.script("flow", "park")
        self._pause = store.script("flow", "pause")
        self._resume = store.script("flow", "resume")
        self._control = store.script("flow", "control")

    @property
    def keys(self) -> Keys:
        return self._keys

    def create(self, run_id: str, *, source: str, output: str, settings: dict[str, Any],
               budget_cents: int | None = None, extra: Mapping[str, str | int] | None = None) -> None:
        """A new run record; `extra` adds fields a source or a flag needs (a watermark, a notify URL)."""
        self.store.hset(self._keys.run(run_id), mapping={
            **(extra or {}),
            "run_id": run_id, "state": RunState.LISTING, "source": source, "output": output,
            "created_at": now_iso(), "created_ms": now_ms(), "total": 0, "chunks": 0, "pending": LISTING_HOLD,
            "skipped": 0, "done": 0, "calls": 0, "spend_cents": 0, "committed_cents": 0, "tokens_bought": 0,
            "budget_cents": "" if budget_cents is None else budget_cents,
            "settings": json.dumps(settings, sort_keys=True),
        })
        self.store.zadd(self._keys.runs(), {run_id: time.time()})

    def add_chunk(self, run_id: str, items: list[tuple[str, str]], bucket: str | None = None) -> int:
        """Count and keep one more chunk (its keys, for reconcile and redrive) before it is enqueued; `bucket`
        names it where a run's chunks come from several buckets (an inventory, a list file)."""
        doc: Any = items if bucket is None else {"bucket": bucket, "items": items}
        seq = self._add_chunk([self._keys.run(run_id), self._keys.chunk_items(run_id)],
                              [len(items), json.dumps(doc)])
        return int(seq)

    def add_scanned(self, run_id: str, bucket: str, items: Sequence[tuple[str, str]],
                    look_up: Sequence[bool]) -> Scanned:
        """A listed chunk of a scan in one round trip (scan_chunk.lua): the images `look_up` marks are checked
        against the done-set and counted as skipped when judged; the rest become the run's next chunk (kept and
        counted before it is enqueued, as add_chunk does). Nothing is written once the run is ending."""
        keys = [self._keys.run(run_id), self._keys.chunk_items(run_id)]
        fields: list[str] = []
        for (key, etag), check in zip(items, look_up, strict=True):
            if check:
                ref = self._keys.done(Item(bucket, key, etag).identity)
                keys.append(ref.shard)
                fields.append(ref.field)
            else:
                keys.append(keys[0])
                fields.append("")
        head = json.dumps({"bucket": bucket, "items": []})[:-2]  # the document add_chunk keeps, open at its items
        answer = self._scan_chunk(keys, [" ".join(sorted(ENDING)), head, len(items), *fields,
                                         *(json.dumps(list(i)) for i in items)])
        if int(answer[0]) == -2:
            return Scanned(None, [], 0, str(answer[1]))
        seq, flags = int(answer[0]), str(answer[2])
        fresh = [item for item, flag in zip(items, flags, strict=True) if flag == "1"]
        return Scanned(None if seq < 0 else seq, fresh, int(answer[1]))

    def chunk_items(self, run_id: str, seq: int) -> list[tuple[str, str]] | None:
        entry = self.chunk_entry(run_id, seq)
        return entry[1] if entry else None

    def chunk_entry(self, run_id: str, seq: int) -> tuple[str | None, list[tuple[str, str]]] | None:
        """(bucket, [(key, etag)]) of a chunk; the bucket is None where it is the run's source bucket (scans:
        a JSON list), and named where chunks of one run come from several buckets (events: an object)."""
        raw = self.store.hget(self._keys.chunk_items(run_id), seq)
        if not raw:
            return None
        doc = json.loads(raw)
        if isinstance(doc, dict):
            return str(doc["bucket"]), [(k, e) for k, e in doc["items"]]
        return None, [(k, e) for k, e in doc]

    def add_skipped(self, run_id: str, n: int) -> None:
        if n:
            self.store.hincrby(self._keys.run(run_id), "skipped", n)

    def listing_finished(self, run_id: str) -> int:
        """Release the producer's hold; returns pending chunks (0 means the run can be finalised)."""
        return int(self._listed([self._keys.run(run_id)], [LISTING_HOLD]))

    def pause(self, run_id: str, reason: str) -> bool:
        """Running -> paused_budget (a cap); False if the run was not running (already paused, failed, done)."""
        return bool(self._pause([self._keys.run(run_id)], [reason]))

    def park(self, run_id: str, message: dict[str, Any]) -> bool:
        """Keep a chunk of a paused run (by its owner or a cap) until it resumes; False if it is not paused (send
        it on instead)."""
        return bool(self._park([self._keys.run(run_id), self._keys.parked(run_id)],
                               [json.dumps(message, sort_keys=True)]))

    def resume(self, run_id: str, budget_cents: int | None) -> list[dict[str, Any]] | None:
        """Raise the cap (if given) and unpause; returns the parked chunk messages to send again (then unpark),
        or None if the run is not paused (nothing changed, the cap neither).

        ConfigError when the new cap leaves no room for one more call, or no cap is given and the current
        one is what paused the run.
        """
        answer = self._resume([self._keys.run(run_id), self._keys.parked(run_id)],
                              ["" if budget_cents is None else budget_cents])
        status = int(answer[0])
        if status == -1:
            committed, price = int(answer[1]), int(answer[2])
            raise ConfigError(f"--budget must be at least ${(committed + price) / 100:.2f}: the run has already "
                              f"committed ${committed / 100:.2f} and one more call costs ${price / 100:.2f}")
        if status == -2:
            committed = int(answer[1])
            raise ConfigError(f"run {run_id} is paused because its budget is spent (${committed / 100:.2f} "
                              f"committed); give a higher one: `irlive resume {run_id} --budget USD`")
        if status == 0:
            return None
        return [json.loads(m) for m in answer[1:]]

    def unpark(self, run_id: str, count: int) -> None:
        """Drop the first `count` parked messages once they have been re-sent."""
        self.store.ltrim(self._keys.parked(run_id), count, -1)

    def parked(self, run_id: str) -> int:
        return int(self.store.llen(self._keys.parked(run_id)))

    def parked_messages(self, run_id: str) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.store.lrange(self._keys.parked(run_id), 0, -1)]

    def count_delivery(self, run_id: str, seq: int, step: int = 1) -> int:
        """Deliveries of a chunk that failed or crashed (deferrals give theirs back); for dead-lettering."""
        return int(self.store.hincrby(self._keys.deliveries(run_id), seq, step))

    def count_bug(self, run_id: str, seq: int) -> int:
        """Deliveries of a chunk that ended in an exception irlive does not know (a bug, not bad luck)."""
        return int(self.store.hincrby(self._keys.deliveries(run_id), f"bug:{seq}", 1))

    def note_error(self, run_id: str, seq: int, error: str) -> None:
        self.store.hset(self._keys.deliveries(run_id), f"error:{seq}", error[:500])

    def last_error(self, run_id: str, seq: int) -> str:
        return str(self.store.hget(self._keys.deliveries(run_id), f"error:{seq}") or "unknown")

    def get(self, run_id: str) -> dict[str, Any] | None:
        raw: dict[str, str] = self.store.hgetall(self._keys.run(run_id))
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
            tokens_bought=int(run.get("tokens_bought") or 0), duplicates=int(run.get("duplicates") or 0),
            answers_lost=int(run.get("answers_lost") or 0),
            answers_lost_images=int(run.get("answers_lost_images") or 0),
            finalised=bool(run.get("finalised_at")) or run["state"] == RunState.DONE,
            created_ms=int(run.get("created_ms") or 0), progress_ms=int(run.get("progress_ms") or 0),
        )

    def set_state(self, run_id: str, state: RunState, error: str | None = None) -> None:
        mapping = {"state": str(state)}
        if error is not None:
            mapping["stop_reason"] = error
        self.store.hset(self._keys.run(run_id), mapping=mapping)

    def move(self, run_id: str, to: RunState, error: str | None = None) -> bool:
        """Change state if the table allows it from the current one; False (nothing written) if not."""
        current = self.store.hget(self._keys.run(run_id), "state")
        if current is None or not can_move(current, to):
            return False
        self.set_state(run_id, to, error)
        return True

    def fail(self, run_id: str, error: str) -> bool:
        """Stop the run for a reason a person must fix: nothing more is paid, its chunks wind down (`not_judged`)
        and it finalises; False if it had ended already."""
        return self.control(run_id, "fail", error)[0]

    def owner_pause(self, run_id: str) -> tuple[bool, str]:
        """`irlive pause`: (paused now, the state); nothing is paid for the run once this returns."""
        done, state, _ = self.control(run_id, "pause", "paused by its owner")
        return done, state

    def cancel(self, run_id: str) -> tuple[bool, str, list[dict[str, Any]]]:
        """`irlive cancel`: (cancelled now, the state, parked chunk messages to send again so they wind down)."""
        return self.control(run_id, "cancel", "cancelled by its owner")

    def control(self, run_id: str, action: str, reason: str) -> tuple[bool, str, list[dict[str, Any]]]:
        answer = self._control([self._keys.run(run_id), self._keys.parked(run_id)], [action, reason])
        return int(answer[0]) == 1, str(answer[1]), [json.loads(m) for m in answer[2:]]

    def progress(self, run_id: str, seq: int) -> dict[int, dict[str, Any]]:
        return _records(self.store.hgetall(self._keys.chunk_progress(run_id, seq)))

    def progress_of(self, run_id: str, seqs: list[int]) -> dict[int, dict[int, dict[str, Any]]]:
        """progress() of many chunks, read in pipelined batches (finalising reads every chunk's)."""
        raw = self.store.hgetall_many([self._keys.chunk_progress(run_id, seq) for seq in seqs], PROGRESS_BATCH)
        return {seq: _records(chunk) for seq, chunk in zip(seqs, raw, strict=True)}

    def record(self, run_id: str, seq: int, saves: list[Save], holder: str = "",
               retry_s: float = RECORD_RETRY_S) -> int:
        """Save records once each; judgments enter the done-set and the claims `holder` took are released.

        The script is idempotent, so Redis trouble (unreachable, failing over, out of memory) is retried here
        for `retry_s` before giving up with TransientError.
        """
        if not saves:
            return 0
        now = now_ms()
        keys = [self._keys.chunk_progress(run_id, seq), self._keys.run(run_id)]
        args: list[Any] = [now, holder, f"{run_id} {seq}"]
        for save in saves:
            verdict = save.record["verdict"]
            image_keys, field, cfield = self._keys.image(save.item.identity, save.content)
            keys += image_keys
            judged = not save.duplicate and verdict in JUDGED
            done = DoneEntry(verdict, now, run_id, seq)
            kind = "1" if save.duplicate else "2" if save.same_content else "0"
            args += [save.index, json.dumps(save.record, sort_keys=True), verdict, field if judged else "",
                     done.encode() if judged else "", kind, cfield, field, done.encode_content() if judged else ""]
        try:
            return int(self.store.persist(lambda: self._record(keys, args), retry_s, f"records of {run_id}/{seq}"))
        except StoreUnavailable as exc:
            raise TransientError(f"could not record results: {exc}") from None

    def complete_chunk(self, run_id: str, seq: int, etag: str, counts: Mapping[str, int]) -> int:
        """Count the chunk done once, keeping its manifest's ETag and counts for the run manifest."""
        summary = json.dumps({"etag": etag, "counts": dict(counts)}, sort_keys=True)
        return int(self._complete([self._keys.chunks_done(run_id), self._keys.run(run_id),
                                   self._keys.chunk_summaries(run_id)], [seq, summary]))

    def chunk_summaries(self, run_id: str) -> dict[int, dict[str, Any]]:
        """What complete_chunk kept of each chunk's manifest (absent for chunks restored by a redrive)."""
        raw: dict[str, str] = self.store.hgetall(self._keys.chunk_summaries(run_id))
        return {int(seq): json.loads(doc) for seq, doc in raw.items()}

    def chunk_complete(self, run_id: str, seq: int) -> bool:
        return bool(self.store.sismember(self._keys.chunks_done(run_id), seq))

    def set_once(self, run_id: str, name: str, value: str) -> str:
        """Set a field only the first time, so finalising twice writes the same manifest; returns the value."""
        self.store.hsetnx(self._keys.run(run_id), name, value)
        stored: str = self.store.hget(self._keys.run(run_id), name)
        return stored

    def forget_chunks(self, run_id: str) -> None:
        """Drop what only a running run needs (per-image progress, chunk keys, delivery counts): the chunk
        manifests in S3 hold it from now on, and the done-set keeps one short entry per judged image."""
        chunks = int(self.store.hget(self._keys.run(run_id), "chunks") or 0)
        pipe = self.store.pipeline(transaction=False)
        for seq in range(chunks):
            pipe.delete(self._keys.chunk_progress(run_id, seq))
        for key in self._keys.run_keys(run_id):
            pipe.delete(key)
        pipe.execute()

    def restore_chunk(self, run_id: str, seq: int, records: list[dict[str, Any]], complete: bool) -> None:
        """Put a finished chunk's records back from its manifest (before a redrive of an archived run)."""
        pipe = self.store.pipeline(transaction=True)
        pipe.delete(self._keys.chunk_progress(run_id, seq))
        if records:
            pipe.hset(self._keys.chunk_progress(run_id, seq),
                      mapping={str(i): json.dumps(r, sort_keys=True) for i, r in enumerate(records)})
        pipe.hset(self._keys.chunk_items(run_id), seq, json.dumps(
            {"bucket": records[0]["bucket"], "items": [[r["key"], r["etag"]] for r in records]} if records else []))
        if complete:
            pipe.sadd(self._keys.chunks_done(run_id), seq)
        pipe.execute()

    def state(self, run_id: str) -> str | None:
        state: str | None = self.store.hget(self._keys.run(run_id), "state")
        return state

    def count(self, run_id: str, name: str, n: int = 1) -> None:
        """A plain counter of the run (duplicates, images validated again...)."""
        if n:
            self.store.hincrby(self._keys.run(run_id), name, n)


def now_ms() -> int:
    return int(time.time() * 1000)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _records(progress: dict[str, str]) -> dict[int, dict[str, Any]]:
    """A chunk's progress hash as records by image index."""
    return {int(k): json.loads(v) for k, v in progress.items()}
