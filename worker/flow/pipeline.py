"""One chunk end to end, Celery-free: lease, validate, claim, pay, call, judge, record, write the chunk manifest."""

from __future__ import annotations

import contextvars
import json
import logging
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from queue import SimpleQueue
from typing import Any

from worker.backoff import Backoff
from worker.config import MAX_LIMITER_WAIT_S, S3Location, Settings
from worker.errors import (
    BudgetExhausted,
    CallsUndecided,
    ChunkBusy,
    IrliveError,
    PermanentInputError,
    RateLimited,
    RunHeld,
    RunStopped,
    TransientError,
    UnreadableAnswer,
)
from worker.flow.claims import Claims, DoneEntry
from worker.flow.inline import InlineExecutor
from worker.flow.leases import ChunkLease
from worker.flow.limiter import Permit, RateLimiter
from worker.flow.runs import Runs, Save, now_iso
from worker.flow.states import ENDING, HELD, RunState
from worker.flow.validate import Limits, small_image_warning, validate
from worker.judge.imageinfo import ImageInfo
from worker.judge.manifest import (
    JUDGED,
    Item,
    chunk_document,
    chunk_key,
    content_key,
    duplicate_record,
    judged_record,
    same_content_record,
    sha256_content_key,
    unjudged_record,
)
from worker.judge.verdicts import AnswerError, ElementError, Judgement, judge_answer
from worker.messages import Chunk
from worker.meter import Meter, NullMeter
from worker.money.ledger import Ledger, Spend, Unrecorded
from worker.money.methods import PaymentMethod
from worker.outcomes import Action, outcome
from worker.seams.marketplace import Marketplace, is_permanent_code, parse_answer
from worker.seams.storage import ObjectInfo, Storage
from worker.seams.store import Store

log = logging.getLogger("irlive.pipeline")
CALL_BACKOFF = Backoff(base_s=0.5, cap_s=20.0)
INLINE = InlineExecutor()
# The most calls one chunk sends at once (its images / images per call: 5 for the default chunk).
MAX_CALLS_PER_CHUNK = 10
# Validation reads one worker process has under way at once, whatever the number of chunks (each read waits
# on S3 for 10-30 ms: a chunk's 50 read one after another held its first call back by a second). No more than
# the reader keeps idle connections (Storage's max_connections), so none is opened and closed per read.
READ_THREADS = 32
# A chunk's first read tells whether S3 makes reads wait: slower than this, the rest go together (Deps.reads);
# faster (S3 on the same host), they are read in the chunk's thread, as handing each read to a thread and back
# would cost more CPU than it saves time (bench/reads.py: a read's CPU grows ~1.5 x with eight threads at once).
READ_TOGETHER_AFTER_S = 0.005
# Beyond this many throttled calls in one chunk the task is deferred with a countdown, freeing the slot.
MAX_THROTTLES_PER_CHUNK = 50
# The limiter waits in-process at most this long for a slot; beyond it the task is deferred.
MAX_SLOT_WAIT_S = MAX_LIMITER_WAIT_S
# An object overwritten while its call was under way is judged again, up to this many times.
MAX_REJUDGE = 2
# Images another delivery holds are waited for this long in-process, then the chunk defers itself.
CLAIM_WAIT_S = 20.0
CLAIM_POLL_S = 0.5
# Validations kept for a deferred chunk's next delivery expire after this long (a chunk completing drops them).
CHECKED_TTL_S = 7 * 24 * 3600
# A call held back by the run's failure threshold (calls in flight could carry it over) waits in-process this
# long, polling, for them to end; then the chunk defers itself.
UNDECIDED_WAIT_S = 10.0
UNDECIDED_POLL_S = 0.1

# Failures of taking a token that the chunk retries itself (counted attempts); others go up to its task.
_RETRIED_PURCHASE = frozenset({Action.RETRY, Action.RECONCILE, Action.VOID_AND_RETRY})

__all__ = ["Chunk", "ChunkProcessor", "Deps"]


class ClaimsHeld(ChunkBusy):
    """Images of this chunk are being judged by another run's delivery: come back for their verdicts."""

    retry_after = 5.0


@dataclass
class Deps:
    """Everything a chunk needs, built once per worker process and passed in."""

    settings: Settings
    store: Store
    storage: Storage
    market: Marketplace
    # How a call is paid and sent (IRLIVE_PAYMENT_METHOD); the marketplace sells and reconciles the tokens.
    method: PaymentMethod
    ledger: Ledger
    limiter: RateLimiter
    runs: Runs
    claims: Claims
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    meter: Meter = field(default_factory=NullMeter)
    # Where a chunk's validation reads go together when S3 makes them wait (threads start as reads need them).
    reads: Executor = field(default_factory=lambda: ThreadPoolExecutor(READ_THREADS, thread_name_prefix="irlive-read"))


# The seller's code for a call refused over an image it could not fetch (see _split_or_fail).
DOWNLOAD_REFUSED = "InvalidImage.Download"


@dataclass
class _Image:
    index: int
    item: Item
    size: int | None
    warning: str | None = None
    # The version validated, in a versioned bucket: the seller is given a URL to exactly that version.
    version_id: str | None = None


@dataclass
class _Group:
    images: list[_Image]
    attempts: int = 0
    # Sent once more whole after a call refused for a download (its halves inherit this: no second time).
    download_retried: bool = False


@dataclass
class _Answer:
    """A paid answer, read, waiting for the chunk's one check that its objects were not overwritten meanwhile."""

    group: _Group
    # One per image, or why the answer could not be read.
    judgements: list[Judgement | AnswerError] | str
    request_id: str | None
    payment_id: str


class ChunkProcessor:
    """Judges one chunk; safe to run again on the same chunk (it resumes from the recorded progress)."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._limits = Limits(deps.settings.max_image_bytes, deps.settings.min_image_side,
                             deps.settings.max_image_side)
        self._lease: ChunkLease | None = None
        # Images whose object changed between validation and the seller's fetch (index -> times).
        self._changed: dict[int, int] = {}
        # Content keys of the images validated (index -> key): byte-identical copies are judged once.
        self._content: dict[int, str] = {}

    @property
    def lease(self) -> ChunkLease:
        assert self._lease is not None, "only inside run()"
        return self._lease

    def run(self, chunk: Chunk) -> int | None:
        """Process the chunk; returns the run's pending chunk count after it, or None if the run is gone."""
        runs = self.deps.runs
        run = runs.get(chunk.run_id)
        if run is None:
            log.warning("dropping chunk %s: run unknown", chunk.label())
            return None
        if runs.chunk_complete(chunk.run_id, chunk.seq):
            # A late duplicate delivery (the broker's redelivery after a watchdog restore): nothing to do.
            return int(run["pending"])
        if run["state"] == RunState.PAUSED_BUDGET:
            raise BudgetExhausted(run.get("pause_reason") or "run paused for budget")
        if run["state"] in HELD:
            raise RunHeld(f"run {chunk.run_id} is paused")
        with ChunkLease(self.deps.store, runs.keys, chunk.run_id, chunk.seq) as lease:
            self._lease = lease
            if run["state"] in ENDING:
                return self._wind_down(chunk, run)
            try:
                return self._run(chunk, run)
            except RunStopped as exc:
                # Cancelled or failed while this chunk was being judged: the calls already answered are
                # recorded; no other is paid.
                log.info("chunk %s: %s; recording the rest as not judged", chunk.label(), exc)
                return self._wind_down(chunk, runs.get(chunk.run_id) or run)

    def give_up(self, chunk: Chunk, reason: str) -> int | None:
        """Dead-letter: every image of the chunk still without a record ends `error`, so the run can finish."""
        run = self.deps.runs.get(chunk.run_id)
        if run is None:
            return None
        try:
            # Answers already paid for are verdicts, not errors (and their records release the claims they pin).
            self._replay(chunk)
        except IrliveError as exc:
            log.warning("chunk %s: paid answers not recorded before dead-lettering: %s", chunk.label(), exc)
        if not self._content:  # not read already by the replay
            self._restore_contents(chunk)
        progress = self.deps.runs.progress(chunk.run_id, chunk.seq)
        saves = [Save(index, item, unjudged_record(item, None, "error", reason=f"dead-lettered: {reason}",
                                                   code="dead_letter", attempts=0, judged_at=now_iso()))
                 for index, item in enumerate(_items(chunk)) if index not in progress]
        self.deps.runs.record(chunk.run_id, chunk.seq, saves)
        return self._finish(chunk, S3Location.parse(run["output"], "run output"))

    def _wind_down(self, chunk: Chunk, run: dict[str, Any]) -> int:
        """A cancelled or failed run's chunk: answers already paid for are recorded, every other image without a
        record ends `not_judged` (nothing is paid), and the chunk completes so the run can finalise."""
        self._replay(chunk)
        if not self._content:  # not read already by the replay
            self._restore_contents(chunk)
        progress = self.deps.runs.progress(chunk.run_id, chunk.seq)
        reason = run.get("stop_reason") or f"the run was {run['state']}"
        self._save(chunk, [Save(index, item, unjudged_record(
            item, None, "not_judged", reason=reason, code=f"run_{run['state']}", attempts=0, judged_at=now_iso()))
            for index, item in enumerate(_items(chunk)) if index not in progress])
        return self._finish(chunk, S3Location.parse(run["output"], "run output"))

    # ---- the chunk ----------------------------------------------------------------------------------------

    def _run(self, chunk: Chunk, run: dict[str, Any]) -> int:
        output = S3Location.parse(run["output"], "run output")
        self._replay(chunk)
        progress = self.deps.runs.progress(chunk.run_id, chunk.seq)
        todo = self._validate(chunk, progress)
        not_before = int(run.get("created_ms") or 1) if run["settings"].get("force") else 0
        deadline = time.monotonic() + CLAIM_WAIT_S
        while todo:
            result = self.deps.claims.claim(self.lease, chunk.run_id, chunk.seq,
                                            [img.item.identity for img in todo], not_before,
                                            [self._content.get(img.index) for img in todo])
            self._record_duplicates(chunk, {todo[p].index: (todo[p], e) for p, e in result.judged.items()})
            self._record_copies(chunk, {todo[p].index: (todo[p], e) for p, e in result.same.items()})
            self._pay_for(chunk, [todo[p] for p in result.mine])
            todo = [todo[p] for p in sorted(result.busy)] + self._rejudge(chunk)
            if not result.busy:
                continue
            holders = sorted({f"{r}/{s}" for r, s in result.busy.values()})
            if time.monotonic() > deadline:
                raise ClaimsHeld(f"chunk {chunk.label()}: {len(todo)} images are being judged by "
                                 f"{', '.join(holders[:3])}; waiting for their verdicts")
            log.info("chunk %s: waiting for %d images held by %s", chunk.label(), len(todo), ", ".join(holders[:3]))
            self.deps.sleep(CLAIM_POLL_S)
        return self._finish(chunk, output)

    def _rejudge(self, chunk: Chunk) -> list[_Image]:
        """Objects overwritten while their call was under way: validated again (their new ETag is a new
        identity), or, once they changed MAX_REJUDGE times, recorded as errors."""
        pending = [i for i, n in self._changed.items() if n > 0]
        if not pending:
            return []
        for index in pending:
            self._changed[index] = -self._changed[index]  # taken care of
        progress = self.deps.runs.progress(chunk.run_id, chunk.seq)
        todo = self._validate(chunk, progress, only=set(pending))
        again = [img for img in todo if -self._changed[img.index] <= MAX_REJUDGE]
        self._save(chunk, [Save(img.index, img.item, unjudged_record(
            img.item, img.size, "error", reason="the object kept changing while it was being judged",
            code="changed_during_call", attempts=0, judged_at=now_iso())) for img in todo if img not in again])
        return again

    def _validate(self, chunk: Chunk, progress: dict[int, dict[str, Any]],
                  only: set[int] | None = None) -> list[_Image]:
        """The images still to judge, validated: read once per image across deliveries (an earlier delivery's
        validations are kept in Redis until the chunk completes), except `only`, objects known to have changed."""
        todo: list[_Image] = []
        rejected: list[Save] = []
        checked_key = self.deps.runs.keys.chunk_checked(chunk.run_id, chunk.seq)
        checked = {} if only is not None else self.deps.store.hgetall(checked_key)
        wanted = [(index, item) for index, item in enumerate(_items(chunk))
                  if index not in progress and (only is None or index in only)]
        # Taken in order; together (Deps.reads) when the first read shows S3 makes them wait. After a read
        # fails, those not begun are cancelled (S3 is flapping: no point asking it the rest now); those under
        # way are waited for and kept.
        unread = [(index, item) for index, item in wanted if str(index) not in checked]
        reads: dict[int, Future[tuple[ObjectInfo, ImageInfo, str | None]]] = {}
        if unread:
            started = time.monotonic()
            first = reads[unread[0][0]] = INLINE.submit(self._check, unread[0][1])
            slow = first.exception() is None and time.monotonic() - started >= READ_TOGETHER_AFTER_S
            executor = self.deps.reads if slow else INLINE
            for index, item in unread[1:]:
                reads[index] = executor.submit(contextvars.copy_context().run, self._check, item)
        fresh: dict[int, str] = {}
        failure: Exception | None = None
        try:
            for index, item in wanted:
                if index not in reads:
                    etag, size, warning, version_id, content = json.loads(checked[str(index)])
                    todo.append(_Image(index, Item(item.bucket, item.key, etag), size, warning, version_id))
                    self._set_content(index, content)
                    continue
                if failure is not None and reads[index].cancel():
                    continue
                try:
                    info, image, content = reads[index].result()
                except PermanentInputError as exc:
                    rejected.append(Save(index, item, unjudged_record(
                        item, None, "rejected", reason=str(exc), code=exc.code, attempts=0, judged_at=now_iso())))
                    continue
                except Exception as exc:  # raised once the reads under way have ended and been kept
                    failure = failure or exc
                    continue
                img = _Image(index, Item(item.bucket, item.key, info.etag), info.size, small_image_warning(image),
                             info.version_id)
                todo.append(img)
                self._set_content(index, content)
                fresh[index] = json.dumps([info.etag, info.size, img.warning, info.version_id, content])
        finally:
            # Kept even when a read fails (S3 flapping): the next delivery goes on from there, instead of
            # needing every read of the chunk to succeed in one go.
            if fresh:
                pipe = self.deps.store.pipeline(transaction=False)
                pipe.hset(checked_key, mapping={str(i): v for i, v in fresh.items()})
                pipe.expire(checked_key, CHECKED_TTL_S)
                _best_effort(pipe.execute, "keeping the validations for a later delivery")
        if failure is not None:
            raise failure
        self._save(chunk, rejected)
        return todo

    def _check(self, item: Item) -> tuple[ObjectInfo, ImageInfo, str | None]:
        """One object validated (PermanentInputError says why not), and its content key."""
        info, image = validate(self.deps.storage, item.bucket, item.key, self._limits)
        return info, image, self._content_of(item.bucket, item.key, info)

    def _set_content(self, index: int, content: str | None) -> None:
        if content:
            self._content[index] = content
        else:
            self._content.pop(index, None)

    def _content_of(self, bucket: str, key: str, info: ObjectInfo) -> str | None:
        """The object's content key: its ETag where that is the MD5 of its bytes (a single-part upload), else
        a hash of the whole object read once more (multipart uploads; a failed read only skips dedup)."""
        content = content_key(info.etag, info.size)
        if content or info.size > self.deps.settings.max_image_bytes:
            return content
        try:
            whole, data = self.deps.storage.read_head(bucket, key, max(info.size, 1))
        except IrliveError as exc:
            log.info("s3://%s/%s: no content key (%s); judged without looking for copies", bucket, key, exc)
            return None
        return sha256_content_key(data) if whole.etag == info.etag and len(data) == info.size else None

    def _record_duplicates(self, chunk: Chunk, judged: dict[int, tuple[_Image, DoneEntry]]) -> None:
        """Images judged by another run (or by an earlier delivery of another chunk): their verdict, at no cost."""
        if not judged:
            return
        firsts: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
        saves: list[Save] = []
        for index, (img, entry) in sorted(judged.items()):
            where = (entry.run_id, entry.seq)
            if where not in firsts:
                firsts[where] = self.deps.runs.progress(*where)
            first = next((r for r in firsts[where].values()
                          if r.get("key") == img.item.key and r.get("etag") == img.item.etag
                          and r.get("bucket") == img.item.bucket), None)
            record = duplicate_record(img.item, img.size, entry.verdict, first, run_id=entry.run_id, seq=entry.seq,
                                      judged_at=now_iso())
            saves.append(Save(index, img.item, record, duplicate=True))
        self._save(chunk, saves)

    def _record_copies(self, chunk: Chunk, same: dict[int, tuple[_Image, DoneEntry]]) -> None:
        """Images byte-identical to one judged before (a re-upload, a copy under another key or bucket): its
        verdict, marked `same_content_as`, at no cost."""
        if not same:
            return
        saves: list[Save] = []
        records: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for index, (img, entry) in sorted(same.items()):
            content = self._content[index]
            where = (entry.run_id, entry.seq)
            if where not in records:
                records[where] = self._records_of(*where)
            first = next((r for r in records[where] if r.get("content_key") == content), None)
            record = same_content_record(img.item, img.size, entry.verdict, first, run_id=entry.run_id,
                                         seq=entry.seq, judged_at=now_iso())
            saves.append(Save(index, img.item, record, same_content=True))
        self._save(chunk, saves)

    def _records_of(self, run_id: str, seq: int) -> list[dict[str, Any]]:
        """A chunk's records: its progress while its run is in Redis, else its manifest in S3 (best effort)."""
        progress = self.deps.runs.progress(run_id, seq)
        if progress:
            return list(progress.values())
        run = self.deps.runs.get(run_id)
        try:
            output = S3Location.parse(run["output"], "run output") if run else None
            doc = self.deps.storage.get_json(output.bucket, chunk_key(output, run_id, seq))[0] if output else {}
        except IrliveError as exc:
            log.info("records of %s/%d unreadable (%s): copies name only the run and chunk", run_id, seq, exc)
            return []
        return list(doc.get("images", ()))

    # ---- paying -------------------------------------------------------------------------------------------

    def _pay_for(self, chunk: Chunk, images: list[_Image]) -> None:
        """Pay and call for the images; once the calls are made, their answers are recorded after one check
        (a listing for the chunk) that none of their objects was overwritten while the seller fetched it.

        One call at a time, and one more alongside for every call the limiter admitted promptly (a place in
        line within its horizon, a slot at once): while the fleet has room a chunk's calls go together, so the
        last chunks of a run keep the rate filled instead of sending their calls one latency apart. When the
        line is long, a chunk waits in it with one call, as before."""
        per_call = self.deps.settings.images_per_call
        queue = deque(_Group(images[i:i + per_call]) for i in range(0, len(images), per_call))
        width = max(1, min(MAX_CALLS_PER_CHUNK, len(queue)))
        held: list[_Answer] = []
        events: SimpleQueue[Future[int] | None] = SimpleQueue()
        running: dict[Future[int], _Group] = {}
        stop = threading.Event()
        failure: BaseException | None = None
        throttled = 0
        undecided_since: float | None = None

        def send(pool: ThreadPoolExecutor, group: _Group) -> None:
            call = pool.submit(contextvars.copy_context().run, self._call, chunk, group, queue, held, stop,
                               lambda: events.put(None))
            running[call] = group
            call.add_done_callback(events.put)

        try:
            with ThreadPoolExecutor(max_workers=width, thread_name_prefix="irlive-call") as pool:
                try:
                    while queue or running:
                        if failure is None and queue and not running:
                            send(pool, queue.popleft())
                        if not running:
                            break
                        done = events.get()
                        if done is None:
                            # A call admitted promptly: the next one goes alongside it.
                            if failure is None and queue and len(running) < width:
                                send(pool, queue.popleft())
                            continue
                        group = running.pop(done)
                        try:
                            throttled += done.result()
                            undecided_since = None
                        except CallsUndecided as exc:
                            undecided_since = undecided_since or time.monotonic()
                            if time.monotonic() - undecided_since > UNDECIDED_WAIT_S:
                                failure = failure or exc
                            else:
                                queue.appendleft(group)
                                if not running:
                                    self.deps.sleep(UNDECIDED_POLL_S)
                        except BaseException as exc:  # the first failure is raised once the others end
                            failure = failure or exc
                            # Calls still waiting in line give up; those already sent finish and are recorded.
                            stop.set()
                        if failure is None and throttled > MAX_THROTTLES_PER_CHUNK:
                            failure = RateLimited("throttled too often in this chunk; deferring it", retry_after=5.0)
                            stop.set()
                        if failure is None and held and not queue and not running:
                            # Meanwhile each answer waits in the ledger with its images' claims pinned to it
                            # (settle.lua): a worker killed now leaves it for the chunk's next delivery to record,
                            # and no other run pays for those images. Retries the answers ask for join the queue.
                            self._record_answers(chunk, held, queue)
                finally:
                    stop.set()
            if failure is not None:
                raise failure
        finally:
            if held:
                # Leaving early (a deferral, a lost lease, a stopped run): what was bought is recorded now, or
                # by the next delivery from the ledger.
                try:
                    self._record_answers(chunk, held, None)
                except IrliveError as exc:
                    log.warning("chunk %s: %d paid answers left for the next delivery to record: %s",
                                chunk.label(), len(held), exc)

    def _call(self, chunk: Chunk, group: _Group, queue: deque[_Group], held: list[_Answer],
              stop: threading.Event | None = None, admitted: Callable[[], None] | None = None) -> int:
        """One paid call for the group; failures requeue it by the error tree. Returns 1 if throttled.
        `admitted` is told when the limiter let the call go promptly; a set `stop` ends its wait in line."""
        deps = self.deps
        if not self.lease.held:
            raise ChunkBusy(f"chunk {chunk.label()}: lease lost to another delivery")
        waited = time.monotonic()
        # The slot lives as long as the chunk's lease and is renewed with it: a killed worker's slots come free
        # with its chunks instead of starving the fleet's in-flight cap for a call timeout.
        permit = deps.limiter.admit(MAX_SLOT_WAIT_S, urgent=chunk.priority == "events", lease_s=self.lease.ttl_s,
                                    cancel=stop)
        self.lease.hold_slot(permit.member)
        try:
            deps.meter.limiter_wait(time.monotonic() - waited)
            if admitted is not None and permit.prompt:
                admitted()
            return self._pay_and_call(chunk, group, queue, held, permit)
        finally:
            self.lease.drop_slot(permit.member)
            # A slot not given back lapses with its lease; it must not hide what happened to the call.
            _best_effort(permit.release, "giving the in-flight slot back")

    def _pay_and_call(self, chunk: Chunk, group: _Group, queue: deque[_Group], held: list[_Answer],
                      permit: Permit) -> int:
        deps = self.deps
        try:
            token = deps.ledger.take(chunk.run_id, self.lease.token)
        except IrliveError as exc:
            # Retried here: what can pass, and purchases settled by the ledger (unknown ones stay charged and
            # count towards the run's pause). The rest (a hold, a deferral, a stop) is the chunk's to act on.
            if outcome(exc).action not in _RETRIED_PURCHASE:
                raise
            self._retry_or_fail(chunk, group, queue, exc, "payment_failed")
            return 0
        try:
            urls = [deps.storage.presign_get(img.item.bucket, img.item.key, deps.settings.presign_ttl,
                                             img.version_id) for img in group.images]
        except TransientError as exc:
            deps.ledger.give_back(token)
            self._retry_or_fail(chunk, group, queue, exc, "presign_failed")
            return 0
        identities = [img.item.identity for img in group.images]
        claim_keys = deps.claims.claim_keys(identities, [self._content.get(img.index) for img in group.images])
        with deps.ledger.spend(token, identities, self.lease.key, f"{chunk.run_id} {chunk.seq}",
                               claim_keys, urls) as spend:
            sent = time.monotonic()
            try:
                answer = deps.method.call(token.secret, urls)
            except IrliveError as exc:
                return self._call_failed(chunk, group, queue, spend, exc, sent)
            judgements = _read_answer(urls, answer.result)
            # Read before it is written down, so the call ends now for the run's failure threshold.
            bought = None if isinstance(judgements, str) else any(isinstance(j, Judgement) for j in judgements)
            spend.answered(answer.request_id, answer.raw, bought=bought)
            took = time.monotonic() - sent
            deps.meter.call("answered", took)
            # Given back with the slot: the seller's latency (the in-flight cap follows it) and the AIMD step.
            permit.answered(took)
        held.append(_Answer(group, judgements, answer.request_id, token.payment_id))
        return 0

    def _call_failed(self, chunk: Chunk, group: _Group, queue: deque[_Group], spend: Spend, exc: IrliveError,
                     sent: float) -> int:
        """A paid call that brought no answer to record: the token is settled and the group goes on as the
        outcome table (worker/outcomes.py) says. Returns 1 if the call was throttled."""
        deps = self.deps
        took = time.monotonic() - sent
        action = outcome(exc).action
        if action is Action.RECORD_PAID and isinstance(exc, UnreadableAnswer):
            spend.answered(None, exc.raw)
            deps.meter.call("answered", took)
            self._unreadable(chunk, group, str(exc), spend.token.payment_id, None)
            return 0
        if action is Action.VOID_AND_RETRY:
            spend.refused(str(exc)[:200])
            deps.meter.call("refused", took)
            self._retry_or_fail(chunk, group, queue, exc, "payment_rejected")
            return 0
        if action is Action.RECONCILE:
            spend.unknown()
            deps.meter.call("unknown", took)
            self._retry_or_fail(chunk, group, queue, exc, type(exc).__name__)
            return 0
        if action is Action.WAIT and isinstance(exc, RateLimited):
            # Not an attempt: everyone slows down and waits out Retry-After (the limiter's shared cool-down).
            wait = exc.retry_after
            _best_effort(lambda: deps.limiter.throttled(wait), "slowing the fleet down")
            spend.failed()
            deps.meter.call("throttled", took)
            queue.appendleft(group)
            return 1
        # The seller answered an error: it is asked whether the token was used (back to the pool if not).
        spend.failed()
        deps.meter.call("failed", took)
        if action in (Action.SPLIT, Action.RECORD) and isinstance(exc, PermanentInputError):
            self._split_or_fail(chunk, group, queue, exc)
        elif action is Action.RETRY:
            self._retry_or_fail(chunk, group, queue, exc, type(exc).__name__)
        else:
            raise exc
        return 0

    def _record_answers(self, chunk: Chunk, held: list[_Answer], queue: deque[_Group] | None) -> None:
        """Record the answers held, but not for objects overwritten since they were validated."""
        answers = list(held)
        changed = self._changed_objects(chunk, [img for a in answers for img in a.group.images])
        for answer in answers:
            judgements = answer.judgements
            if isinstance(judgements, str):
                self._unreadable(chunk, answer.group, judgements, answer.payment_id, answer.request_id)
            else:
                kept = [(img, j) for img, j in zip(answer.group.images, judgements, strict=True)
                        if img.index not in changed]
                self._record_answer(chunk, _Group([img for img, _ in kept], answer.group.attempts), queue,
                                    [j for _, j in kept], answer.request_id, answer.payment_id)
            held.remove(answer)

    def _changed_objects(self, chunk: Chunk, images: list[_Image]) -> set[int]:
        """Indexes of the images whose object is no longer the one validated. A versioned object was fetched by
        its version; the others are checked by listing (one request for a chunk's keys): an object overwritten
        meanwhile may have been judged in its new form, so its verdict cannot be recorded against the old ETag."""
        loose = [img for img in images if img.version_id is None]
        if not loose:
            return set()
        try:
            now = self.deps.storage.current_etags(loose[0].item.bucket, [img.item.key for img in loose])
        except IrliveError as exc:
            log.warning("chunk %s: could not check whether objects changed during the calls (%s)", chunk.label(),
                        exc)
            return set()
        changed = {img.index for img in loose if now.get(img.item.key) != img.item.etag}
        if not changed:
            return changed
        log.warning("chunk %s: %d objects were overwritten while the seller judged them; judging them again",
                    chunk.label(), len(changed))
        self.deps.runs.count(chunk.run_id, "changed_during_call", len(changed))
        for index in changed:
            self._changed[index] = abs(self._changed.get(index, 0)) + 1
        return changed

    def _record_answer(self, chunk: Chunk, group: _Group, queue: deque[_Group] | None,
                       judgements: list[Judgement | AnswerError], request_id: str | None, payment_id: str) -> None:
        """Save every verdict a paid answer bought, then let the ledger forget the answer; retry what it lacks."""
        saves: list[Save] = []
        unanswered: list[_Image] = []
        for img, judgement in zip(group.images, judgements, strict=True):
            if isinstance(judgement, ElementError) and is_permanent_code(judgement.code):
                # Refused by the seller for this image alone: record it, never retry it.
                saves.append(Save(img.index, img.item, unjudged_record(
                    img.item, img.size, "error", reason=str(judgement), code=judgement.code,
                    attempts=group.attempts + 1, judged_at=now_iso(), request_id=request_id)))
            elif isinstance(judgement, AnswerError):
                unanswered.append(img)
            else:
                saves.append(Save(img.index, img.item, judged_record(
                    img.item, img.size or 0, judgement, request_id=request_id, attempts=group.attempts + 1,
                    judged_at=now_iso(), warning=img.warning)))
        self._save(chunk, saves)
        # A paid call that bought no verdict counts against the run's failure threshold.
        self.deps.ledger.recorded(payment_id, failed=not any(s.record["verdict"] in JUDGED for s in saves),
                                  run_id=chunk.run_id)
        if unanswered and queue is not None:
            log.warning("call %s answered %d of %d images", request_id, len(group.images) - len(unanswered),
                        len(group.images))
            reason = judgements[0] if len(unanswered) == len(group.images) else "no usable element in the answer"
            self._retry_or_fail(chunk, _Group(unanswered, group.attempts), queue, AnswerError(str(reason)),
                                "bad_answer")

    def _unreadable(self, chunk: Chunk, group: _Group, reason: str, payment_id: str, request_id: str | None) -> None:
        log.error("chunk %s: paid answer %s unreadable: %s (kept in the ledger for inspection)", chunk.label(),
                  payment_id, reason)
        self._save(chunk, [Save(img.index, img.item, unjudged_record(
            img.item, img.size, "error", reason=reason, code="unreadable_answer", attempts=group.attempts + 1,
            judged_at=now_iso(), request_id=request_id)) for img in group.images])
        self.deps.ledger.recorded(payment_id, failed=True, keep_answer=True, run_id=chunk.run_id)

    def _replay(self, chunk: Chunk) -> None:
        """Record answers this chunk paid for and the ledger holds, but a crash or Redis kept from its records."""
        items = {item.identity.rsplit("@", 1)[0]: (index, item) for index, item in enumerate(_items(chunk))}
        unrecorded = self.deps.ledger.unrecorded(chunk.run_id, chunk.seq)
        if unrecorded:
            self._restore_contents(chunk)
        for paid in unrecorded:
            # The answer names the URLs the earlier delivery sent, which another worker may presign differently
            # (another endpoint): read it back against those, as written down when it was sent.
            sent = paid.urls if len(paid.urls) == len(paid.identities) else [""] * len(paid.identities)
            images: list[_Image] = []
            urls: list[str] = []
            for identity, url in zip(paid.identities, sent, strict=True):
                bucket_key, _, etag = identity.rpartition("@")
                if bucket_key in items:
                    index, item = items[bucket_key]
                    images.append(_Image(index, Item(item.bucket, item.key, etag), None))
                    urls.append(url or self.deps.storage.presign_get(item.bucket, item.key,
                                                                     self.deps.settings.presign_ttl))
            log.warning("chunk %s: recording answer %s paid by an earlier delivery", chunk.label(), paid.payment_id)
            group = _Group(images)
            try:
                judgements = _read_answer(urls, _result_of(paid))
            except Exception as exc:
                judgements = f"the answer could not be read ({type(exc).__name__})"
            if isinstance(judgements, str):
                self._unreadable(chunk, group, judgements, paid.payment_id, paid.request_id or None)
            else:
                self._record_answer(chunk, group, None, judgements, paid.request_id or None, paid.payment_id)

    def _restore_contents(self, chunk: Chunk) -> None:
        """The content keys of the chunk's images, from the validations an earlier delivery kept: records
        written without validating again (a paid answer replayed, a stopped run's rest) release the content
        claims that delivery took and pinned, and copies of these images find the judgments."""
        checked = self.deps.store.hgetall(self.deps.runs.keys.chunk_checked(chunk.run_id, chunk.seq))
        for index, kept in checked.items():
            self._set_content(int(index), json.loads(kept)[4])

    # ---- failure handling ---------------------------------------------------------------------------------

    def _retry_or_fail(self, chunk: Chunk, group: _Group, queue: deque[_Group], exc: Exception, code: str) -> None:
        group.attempts += 1
        if group.attempts >= self.deps.settings.max_attempts:
            self._save(chunk, [Save(img.index, img.item, unjudged_record(
                img.item, img.size, "error", reason=str(exc), code=code, attempts=group.attempts,
                judged_at=now_iso())) for img in group.images])
            return
        log.info("chunk %s: attempt %d failed (%s); retrying", chunk.label(), group.attempts, code)
        self.deps.sleep(self._backoff(group.attempts))
        queue.append(group)

    def _split_or_fail(self, chunk: Chunk, group: _Group, queue: deque[_Group], exc: PermanentInputError) -> None:
        """A batch refused for one bad image: halve it to find the image (each half is a new, counted call).

        A call refused for a download the seller could not make is, more often than not, the storage (an
        overloaded S3, a blip) and not an image the worker has just read: the whole batch is sent once more
        after a pause, one extra call, before it is halved (when one image truly is bad, 2n calls for n images
        instead of 2n - 1)."""
        if exc.code.startswith(DOWNLOAD_REFUSED) and not group.download_retried:
            self.deps.meter.download_retry()
            log.warning("chunk %s: the seller could not download the images of a call (%s); sending its %d images "
                        "once more before splitting", chunk.label(), exc.code, len(group.images))
            self.deps.sleep(self._backoff(group.attempts + 1))
            queue.appendleft(_Group(group.images, group.attempts, download_retried=True))
            return
        if len(group.images) > 1:
            mid = len(group.images) // 2
            log.warning("chunk %s: call refused (%s); splitting %d images", chunk.label(), exc.code,
                        len(group.images))
            queue.appendleft(_Group(group.images[mid:], group.attempts, group.download_retried))
            queue.appendleft(_Group(group.images[:mid], group.attempts, group.download_retried))
            return
        img = group.images[0]
        self._save(chunk, [Save(img.index, img.item, unjudged_record(
            img.item, img.size, "error", reason=str(exc), code=exc.code, attempts=group.attempts + 1,
            judged_at=now_iso()))])

    def _backoff(self, attempt: int) -> float:
        return CALL_BACKOFF.delay(attempt, self.deps.rng.random())

    def _save(self, chunk: Chunk, saves: list[Save]) -> None:
        if not saves:
            return
        # Every record of a validated image carries its content key: a judged one is found by later copies
        # (and rebuilt from the manifests by reindex), and any one releases the content's claim.
        saves = [replace(s, content=self._content[s.index], record={**s.record, "content_key": self._content[s.index]})
                 if s.index in self._content and not s.duplicate else s for s in saves]
        holder = self._lease.token if self._lease is not None else ""
        recorded = self.deps.runs.record(chunk.run_id, chunk.seq, saves, holder=holder)
        # Counted when every save was new; a save repeated by an overlapping delivery was counted by it.
        if recorded == len(saves):
            for verdict, n in Counter("duplicate" if s.duplicate or s.same_content else str(s.record["verdict"])
                                      for s in saves).items():
                self.deps.meter.images(verdict, n)
        if self._lease is not None:
            self._lease.drop_claims(self.deps.claims.claim_keys([s.item.identity for s in saves],
                                                                [s.content for s in saves]))

    def _finish(self, chunk: Chunk, output: S3Location) -> int:
        progress = self.deps.runs.progress(chunk.run_id, chunk.seq)
        missing = [i for i in range(len(chunk.items)) if i not in progress]
        if missing:
            raise TransientError(f"chunk {chunk.seq} has {len(missing)} images without a record")
        records = [progress[i] for i in range(len(chunk.items))]
        doc = chunk_document(chunk.run_id, chunk.seq, records)
        etag = self.deps.storage.put_json(output.bucket, chunk_key(output, chunk.run_id, chunk.seq), doc)
        pending = self.deps.runs.complete_chunk(chunk.run_id, chunk.seq, etag, doc["counts"])
        _best_effort(lambda: self.deps.store.delete(self.deps.runs.keys.chunk_checked(chunk.run_id, chunk.seq)),
                     "dropping the chunk's validations")
        return pending


def _best_effort(step: Callable[[], object], what: str) -> None:
    """A step whose failure (Redis away for a moment) costs pace or a repeated read, never a paid answer."""
    try:
        step()
    except IrliveError as exc:
        log.warning("%s skipped: %s", what, exc)


def _items(chunk: Chunk) -> list[Item]:
    return [Item(chunk.bucket, key, etag) for key, etag in chunk.items]


def _read_answer(urls: list[str], result: Any) -> list[Judgement | AnswerError] | str:
    """One judgement per URL, or why the answer cannot be read; never raises (the call is paid for)."""
    try:
        return judge_answer(urls, result)
    except AnswerError as exc:
        return [exc] * len(urls)
    except Exception as exc:
        # Our reading failed on something the seller sent: the call is paid, its images end recorded.
        return f"the answer could not be read ({type(exc).__name__})"


def _result_of(paid: Unrecorded) -> Any:
    """`data.Result` of an answer the ledger kept (the marketplace envelope, as received)."""
    raw = paid.raw.encode()
    return parse_answer(json.loads(raw), raw).result

