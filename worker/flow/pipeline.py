"""One chunk end to end, Celery-free: validate, dedupe, pay, call, judge, record, write the chunk manifest."""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.config import S3Location, Settings
from worker.errors import (
    BudgetExhausted,
    ChunkBusy,
    ConfigError,
    OutcomeUnknown,
    PaymentRejected,
    PermanentInputError,
    RateLimited,
    TransientError,
)
from worker.flow.leases import ChunkLease
from worker.flow.limiter import RateLimiter
from worker.flow.runs import Runs, now_iso
from worker.flow.validate import Limits, small_image_warning, validate
from worker.judge.manifest import Item, chunk_document, chunk_key, judged_record, unjudged_record
from worker.judge.verdicts import AnswerError, ElementError, Judgement, judge_answer
from worker.money.ledger import Wallet
from worker.seams.marketplace import Marketplace, is_permanent_code
from worker.seams.storage import Storage

log = logging.getLogger("irlive.pipeline")
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 20.0
# Beyond this many throttled calls in one chunk the task is deferred with a countdown, freeing the slot.
MAX_THROTTLES_PER_CHUNK = 50
# The limiter waits in-process at most this long for a slot; beyond it the task is deferred.
MAX_SLOT_WAIT_S = 10.0


@dataclass(frozen=True)
class Chunk:
    """A chunk message: keys only (never tokens or URLs), with the ETag seen when listed."""

    run_id: str
    seq: int
    bucket: str
    items: list[tuple[str, str]]

    @classmethod
    def from_message(cls, body: dict[str, Any]) -> Chunk:
        try:
            items = [(str(k), str(e)) for k, e in body["items"]]
            return cls(str(body["run_id"]), int(body["seq"]), str(body["bucket"]), items)
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentInputError(f"malformed chunk message: {exc!r}", code="bad_message") from None

    def to_message(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "seq": self.seq, "bucket": self.bucket, "items": [list(i) for i in self.items]}


@dataclass
class Deps:
    """Everything a chunk needs, built once per worker process and passed in."""

    settings: Settings
    storage: Storage
    market: Marketplace
    wallet: Wallet
    limiter: RateLimiter
    runs: Runs
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)


@dataclass
class _Image:
    index: int
    item: Item
    size: int
    warning: str | None = None


@dataclass
class _Group:
    images: list[_Image]
    attempts: int = 0


class ChunkProcessor:
    """Judges one chunk; safe to run again on the same chunk (it resumes from the recorded progress)."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        self._limits = Limits(deps.settings.max_image_bytes, deps.settings.min_image_side)
        self._lease: ChunkLease | None = None

    def run(self, chunk: Chunk) -> int | None:
        """Process the chunk; returns the run's pending chunk count after it, or None if the run is gone."""
        runs = self.deps.runs
        run = runs.get(chunk.run_id)
        if run is None or run["state"] == "failed":
            log.warning("dropping chunk %s/%s: run %s", chunk.run_id, chunk.seq,
                        "unknown" if run is None else "failed")
            return None
        if run["state"] == "paused_budget":
            raise BudgetExhausted(run.get("pause_reason") or "run paused for budget")
        with ChunkLease(runs, chunk.run_id, chunk.seq) as lease:
            self._lease = lease
            return self._run(chunk, run)

    def give_up(self, chunk: Chunk, reason: str) -> int | None:
        """Dead-letter: every image of the chunk still without a record ends `error`, so the run can finish."""
        run = self.deps.runs.get(chunk.run_id)
        if run is None:
            return None
        progress = self.deps.runs.progress(chunk.run_id, chunk.seq)
        for index, (key, etag) in enumerate(chunk.items):
            if index not in progress:
                item = Item(chunk.bucket, key, etag)
                self._save(chunk, index, item, unjudged_record(
                    item, None, "error", reason=f"dead-lettered: {reason}", code="dead_letter", attempts=0,
                    judged_at=now_iso()))
        return self._finish(chunk, S3Location.parse(run["output"], "run output"))

    def _run(self, chunk: Chunk, run: dict[str, Any]) -> int:
        runs = self.deps.runs
        output = S3Location.parse(run["output"], "run output")
        force = bool(run["settings"].get("force"))
        progress = runs.progress(chunk.run_id, chunk.seq)
        todo = self._validate(chunk, progress)
        if not force:
            todo = self._skip_judged(chunk, todo)
        per_call = self.deps.settings.images_per_call
        queue = deque(_Group(todo[i:i + per_call]) for i in range(0, len(todo), per_call))
        throttled = 0
        while queue:
            group = queue.popleft()
            throttled += self._call(chunk, group, queue)
            if throttled > MAX_THROTTLES_PER_CHUNK:
                raise RateLimited("throttled too often in this chunk; deferring it", retry_after=5.0)
        return self._finish(chunk, output)

    def _validate(self, chunk: Chunk, progress: dict[int, dict[str, Any]]) -> list[_Image]:
        todo: list[_Image] = []
        for index, (key, etag) in enumerate(chunk.items):
            if index in progress:
                continue
            item = Item(chunk.bucket, key, etag)
            try:
                info, image = validate(self.deps.storage, chunk.bucket, key, self._limits)
            except PermanentInputError as exc:
                self._save(chunk, index, item, unjudged_record(
                    item, None, "rejected", reason=str(exc), code=exc.code, attempts=0, judged_at=now_iso()))
                continue
            todo.append(_Image(index, Item(chunk.bucket, key, info.etag), info.size, small_image_warning(image)))
        return todo

    def _skip_judged(self, chunk: Chunk, todo: list[_Image]) -> list[_Image]:
        """Redelivered chunks, overlapping runs, duplicate events: never pay again for a known identity."""
        prior = self.deps.runs.already_judged([img.item.identity for img in todo])
        left: list[_Image] = []
        for img, seen in zip(todo, prior, strict=True):
            if seen is None:
                left.append(img)
                continue
            record = dict(seen.get("record") or {})
            record.update(bucket=img.item.bucket, key=img.item.key, etag=img.item.etag, size=img.size,
                          verdict=seen["verdict"], reused_from_run=seen.get("run_id"))
            self._save(chunk, img.index, img.item, record)
        return left

    def _call(self, chunk: Chunk, group: _Group, queue: deque[_Group]) -> int:
        """One paid call for the group; failures requeue it by the error tree. Returns 1 if throttled."""
        deps = self.deps
        if self._lease is not None and not self._lease.held:
            raise ChunkBusy(f"chunk {chunk.run_id}/{chunk.seq}: lease lost to another delivery")
        release_slot = deps.limiter.slot(lease_s=deps.settings.call_timeout_s + 30, max_wait_s=MAX_SLOT_WAIT_S)
        try:
            deps.limiter.acquire(MAX_SLOT_WAIT_S)
            return self._pay_and_call(chunk, group, queue)
        finally:
            release_slot()

    def _pay_and_call(self, chunk: Chunk, group: _Group, queue: deque[_Group]) -> int:
        deps = self.deps
        run_id = chunk.run_id
        try:
            token = deps.wallet.take(run_id)
        except (TransientError, OutcomeUnknown) as exc:
            self._retry_or_fail(chunk, group, queue, exc, "payment_failed")
            return 0
        try:
            urls = [deps.storage.presign_get(img.item.bucket, img.item.key, deps.settings.presign_ttl)
                    for img in group.images]
        except TransientError as exc:
            deps.wallet.release(token)
            self._retry_or_fail(chunk, group, queue, exc, "presign_failed")
            return 0
        deps.wallet.sent(token, [img.item.identity for img in group.images])
        try:
            answer = deps.market.call(token.secret, urls)
        except PaymentRejected as exc:
            deps.wallet.void(token, run_id)
            self._retry_or_fail(chunk, group, queue, exc, "payment_rejected")
            return 0
        except RateLimited as exc:
            # Not an attempt: everyone slows down and waits out Retry-After (the limiter's shared cool-down).
            deps.limiter.throttled(exc.retry_after)
            deps.wallet.after_failure(token, run_id)
            queue.appendleft(group)
            return 1
        except PermanentInputError as exc:
            deps.wallet.after_failure(token, run_id)
            self._split_or_fail(chunk, group, queue, exc)
            return 0
        except (TransientError, OutcomeUnknown) as exc:
            deps.wallet.after_failure(token, run_id)
            self._retry_or_fail(chunk, group, queue, exc, type(exc).__name__)
            return 0
        except ConfigError:
            deps.wallet.after_failure(token, run_id)
            raise
        deps.limiter.answered()
        self._record_answer(chunk, group, queue, urls, answer.result, answer.request_id,
                            (token.payment_id, token.amount_cents, answer.request_id or ""))
        return 0

    def _record_answer(self, chunk: Chunk, group: _Group, queue: deque[_Group], urls: list[str], result: Any,
                       request_id: str | None, paid_by: tuple[str, int, str]) -> None:
        """Settle the token and save every verdict it bought in one step; retry the images it did not answer."""
        saves: list[tuple[int, Item, dict[str, Any]]] = []
        unanswered: list[_Image] = []
        try:
            judgements: list[Judgement | AnswerError] = judge_answer(urls, result)
        except AnswerError as exc:
            judgements = [exc] * len(group.images)
        for img, judgement in zip(group.images, judgements, strict=True):
            if isinstance(judgement, ElementError) and is_permanent_code(judgement.code):
                # Refused by the seller for this image alone: record it, never retry it.
                saves.append((img.index, img.item, unjudged_record(
                    img.item, img.size, "error", reason=str(judgement), code=judgement.code,
                    attempts=group.attempts + 1, judged_at=now_iso(), request_id=request_id)))
            elif isinstance(judgement, AnswerError):
                unanswered.append(img)
            else:
                saves.append((img.index, img.item, judged_record(
                    img.item, img.size, judgement, request_id=request_id, attempts=group.attempts + 1,
                    judged_at=now_iso(), warning=img.warning)))
        self.deps.runs.record(chunk.run_id, chunk.seq, saves, paid_by=paid_by)
        if unanswered:
            log.warning("call %s answered %d of %d images", request_id, len(group.images) - len(unanswered),
                        len(group.images))
            reason = judgements[0] if len(unanswered) == len(group.images) else "no usable element in the answer"
            self._retry_or_fail(chunk, _Group(unanswered, group.attempts), queue, AnswerError(str(reason)),
                                "bad_answer")

    def _retry_or_fail(self, chunk: Chunk, group: _Group, queue: deque[_Group], exc: Exception, code: str) -> None:
        group.attempts += 1
        if group.attempts >= self.deps.settings.max_attempts:
            self.deps.runs.record(chunk.run_id, chunk.seq, [
                (img.index, img.item, unjudged_record(img.item, img.size, "error", reason=str(exc), code=code,
                                                      attempts=group.attempts, judged_at=now_iso()))
                for img in group.images])
            return
        log.info("chunk %s/%s: attempt %d failed (%s); retrying", chunk.run_id, chunk.seq, group.attempts, code)
        self.deps.sleep(self._backoff(group.attempts))
        queue.append(group)

    def _split_or_fail(self, chunk: Chunk, group: _Group, queue: deque[_Group], exc: PermanentInputError) -> None:
        """A batch refused for one bad image: halve it to find the image (each half is a new, counted call)."""
        if len(group.images) > 1:
            mid = len(group.images) // 2
            log.warning("chunk %s/%s: call refused (%s); splitting %d images", chunk.run_id, chunk.seq, exc.code,
                        len(group.images))
            queue.appendleft(_Group(group.images[mid:], group.attempts))
            queue.appendleft(_Group(group.images[:mid], group.attempts))
            return
        img = group.images[0]
        self._save(chunk, img.index, img.item, unjudged_record(
            img.item, img.size, "error", reason=str(exc), code=exc.code, attempts=group.attempts + 1,
            judged_at=now_iso()))

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        return self.deps.rng.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** attempt))

    def _save(self, chunk: Chunk, index: int, item: Item, record: dict[str, Any]) -> None:
        self.deps.runs.save(chunk.run_id, chunk.seq, index, item, record)

    def _finish(self, chunk: Chunk, output: S3Location) -> int:
        progress = self.deps.runs.progress(chunk.run_id, chunk.seq)
        missing = [i for i in range(len(chunk.items)) if i not in progress]
        if missing:
            raise TransientError(f"chunk {chunk.seq} has {len(missing)} images without a record")
        records = [progress[i] for i in range(len(chunk.items))]
        self.deps.storage.put_json(output.bucket, chunk_key(output, chunk.run_id, chunk.seq),
                                   chunk_document(chunk.run_id, chunk.seq, records))
        return self.deps.runs.complete_chunk(chunk.run_id, chunk.seq)
