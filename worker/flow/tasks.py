"""Thin Celery tasks: decode the message, run the pipeline with the process's clients, map errors to retry/ack."""

from __future__ import annotations

import logging
import time
from typing import Any, NoReturn

from celery import Celery, Task
from celery.exceptions import Reject

from worker.app import chunk_argsrepr
from worker.backoff import Backoff
from worker.config import S3Location
from worker.errors import (
    BudgetExhausted,
    IrliveError,
    PermanentInputError,
    TransientError,
)
from worker.flow.finalize import finalize_run
from worker.flow.pipeline import ChunkProcessor, Deps
from worker.flow.states import RunState
from worker.judge.manifest import run_manifest_key
from worker.messages import CONTROL_QUEUE, FINALIZE_RUN, NOTIFY_RUN, PROCESS_CHUNK, Chunk
from worker.ops.notify import deliver, run_end_event
from worker.ops.redact import redact
from worker.ops.runtime import Runtime
from worker.outcomes import Action, outcome
from worker.seams.webhook import Notifier

log = logging.getLogger("irlive.tasks")
# A chunk that fails with an exception irlive does not know (a bug) is dead-lettered at its second such failure.
BUGS_BEFORE_DEAD_LETTER = 2
# A chunk that failed on transient trouble (S3, Redis, the seller) comes back after at most this long.
RETRY_CAP_S = 60.0
# Each attempt to POST a run's notification; five attempts with backoff hold one thread 80 s at worst.
NOTIFY_TIMEOUT_S = 10.0


def register_tasks(app: Celery, runtime: Runtime) -> None:
    settings = runtime.settings
    # Countdowns keep the message unacked on the worker, so they must stay well under the visibility timeout.
    max_countdown = max(1.0, settings.visibility_timeout / 4)

    def _retry(task: Task, chunk: Chunk, countdown: float) -> NoReturn:
        """Send the chunk again in `countdown` seconds; this delivery is acked once that is sent."""
        try:
            raise task.retry(countdown=countdown, queue=chunk.queue, argsrepr=chunk_argsrepr(chunk))
        except Reject as exc:
            # Celery acks a delivery whose retry it could not send, chunk unfinished. Requeue it instead; a broker
            # that cannot take that either keeps it unacked, for the watchdog once the chunk's lease is gone.
            log.warning("chunk %s: could not send its retry (%s); requeueing the delivery", chunk.label(),
                        type(exc.reason).__name__)
            raise Reject(type(exc.reason).__name__, requeue=True) from None

    # No jitter: a chunk's countdown is already spread by its own history, and must stay under max_countdown.
    backoff = Backoff(base_s=2.0, cap_s=min(max_countdown, RETRY_CAP_S), jitter=False)

    def _backoff(task: Task) -> float:
        return backoff.delay(int(task.request.retries or 0))

    @app.task(name=PROCESS_CHUNK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
    def process_chunk(self: Task, message: dict[str, Any]) -> None:
        try:
            chunk = Chunk.from_message(message)
        except PermanentInputError as exc:
            log.error("dropping message: %s", exc)
            return
        try:
            _handle(self, chunk, message)
        except TransientError as exc:
            # Redis (or S3) failed around the pipeline: before it (the first reads, the delivery count) or while
            # acting on its outcome. An exception out of the task would ack the delivery, chunk unfinished.
            countdown = _backoff(self)
            log.warning("chunk %s: %s; retrying in %.0fs", chunk.label(), redact(f"{type(exc).__name__}: {exc}"),
                        countdown)
            _retry(self, chunk, countdown)

    def _handle(task: Task, chunk: Chunk, message: dict[str, Any]) -> None:
        deps = runtime.deps()
        runs = deps.runs
        run = runs.get(chunk.run_id)
        if run is None or run["state"] == RunState.DONE or run.get("finalised_at") \
                or runs.chunk_complete(chunk.run_id, chunk.seq):
            # A late duplicate (the broker's own redelivery after the watchdog restored it), or a chunk of a
            # run that is finished or unknown: nothing to do, nothing to count.
            return
        processor = ChunkProcessor(deps)
        # Counted before the work, so a chunk that kills its worker every time is still caught.
        deliveries = runs.count_delivery(chunk.run_id, chunk.seq)
        deps.meter.delivery(chunk.queue)
        started = time.monotonic()
        if deliveries > settings.max_deliveries:
            pending = _dead_letter(task, deps, processor, chunk, deliveries - 1)
        else:
            try:
                pending = _process(task, deps, processor, chunk, message)
            finally:
                deps.meter.chunk(time.monotonic() - started)
        if pending == 0:
            app.send_task(FINALIZE_RUN, args=[chunk.run_id], queue=CONTROL_QUEUE)

    def _dead_letter(task: Task, deps: Deps, processor: ChunkProcessor, chunk: Chunk, deliveries: int) -> int | None:
        reason = deps.runs.last_error(chunk.run_id, chunk.seq)
        log.error("chunk %s dead-lettered after %d deliveries: %s", chunk.label(), deliveries, reason)
        deps.meter.dead_letter()
        runtime.recovery().dead_letter(chunk, deliveries, reason)
        try:
            return processor.give_up(chunk, reason)
        except IrliveError:
            _retry(task, chunk, max_countdown)

    def _process(task: Task, deps: Deps, processor: ChunkProcessor, chunk: Chunk,
                 message: dict[str, Any]) -> int | None:
        runs = deps.runs
        try:
            return processor.run(chunk)
        except IrliveError as exc:
            action = outcome(exc).action
            if action not in (Action.WAIT, Action.DEFER, Action.HOLD, Action.STOP):
                return _failed(task, deps, processor, chunk, exc)
            if action in (Action.WAIT, Action.DEFER):
                # A deferral, not a failure: give the delivery back to the dead-letter count.
                runs.count_delivery(chunk.run_id, chunk.seq, -1)
                _retry(task, chunk, min(max_countdown, getattr(exc, "retry_after", None) or 5.0))
            if action is Action.HOLD:
                runs.count_delivery(chunk.run_id, chunk.seq, -1)
                if isinstance(exc, BudgetExhausted) and runs.pause(chunk.run_id, str(exc)):
                    log.warning("run %s paused: %s", chunk.run_id, exc)
                    _announce(chunk.run_id, "paused_budget")
                if not runs.park(chunk.run_id, message):
                    # Resumed (or cancelled) between our failure and the park: go round again.
                    _retry(task, chunk, 1.0)
                return None
            log.error("run %s stopped: %s", chunk.run_id, exc)
            runs.fail(chunk.run_id, str(exc))
            # Failed now: the same chunk winds down (its images `not_judged`), so the run still finalises.
            _retry(task, chunk, 1.0)
        except Exception as exc:
            return _failed(task, deps, processor, chunk, exc)

    def _failed(task: Task, deps: Deps, processor: ChunkProcessor, chunk: Chunk, exc: Exception) -> int | None:
        """A failure the outcome table retries (or a bug): noted, then the chunk goes again after a backoff;
        the same bug three times dead-letters it at once."""
        runs = deps.runs
        known = isinstance(exc, IrliveError)
        what = redact(f"{type(exc).__name__}: {exc}")
        bugs = 0
        try:
            runs.note_error(chunk.run_id, chunk.seq, what)
            if not known:
                bugs = runs.count_bug(chunk.run_id, chunk.seq)
        except IrliveError as unrecorded:
            # Redis is down too: the retry below (or, failing that, the watchdog) brings the chunk back.
            log.warning("chunk %s: could not note the failure: %s", chunk.label(), unrecorded)
        if not known:
            log.exception("chunk %s: unexpected failure", chunk.label())
            if bugs >= BUGS_BEFORE_DEAD_LETTER:
                # The same bug will strike again: do not spend ten deliveries finding that out.
                deliveries = runs.count_delivery(chunk.run_id, chunk.seq, 0)
                return _dead_letter(task, deps, processor, chunk, deliveries)
        countdown = _backoff(task)
        log.warning("chunk %s: %s; retrying in %.0fs", chunk.label(), what, countdown)
        _retry(task, chunk, countdown)

    def _announce(run_id: str, state: str) -> None:
        """Queue the run's end (or budget pause) notification, if anyone is to be told."""
        run = runtime.deps().runs.get(run_id)
        if run is not None and (run.get("notify_url") or settings.notify_url):
            app.send_task(NOTIFY_RUN, args=[run_id, f"run.{state}"], queue=CONTROL_QUEUE)

    @app.task(name=FINALIZE_RUN, bind=True, max_retries=10)  # type: ignore[untyped-decorator]
    def finalize(self: Task, run_id: str) -> None:
        deps = runtime.deps()
        try:
            finalize_run(deps.runs, deps.storage, deps.ledger, run_id, enforced=settings.enforced_view(),
                         on_end=lambda state: _announce(run_id, state),
                         review_live_below=settings.review_live_below)
        except TransientError:
            raise self.retry(countdown=5.0) from None

    @app.task(name=NOTIFY_RUN)  # type: ignore[untyped-decorator]
    def notify(run_id: str, event: str) -> None:
        deps = runtime.deps()
        run = deps.runs.get(run_id)
        url = (run or {}).get("notify_url") or settings.notify_url
        if run is None or not url:
            return
        manifest = None
        if event != "run.paused_budget":
            try:
                output = S3Location.parse(run["output"], "run output")
                manifest, _ = deps.storage.get_json(output.bucket, run_manifest_key(output, run_id))
            except IrliveError as exc:
                log.warning("run %s: notifying without its manifest (%s)", run_id, exc)
        # Retries with backoff inside; never raises: a receiver's trouble never touches the run. Each attempt
        # has its own client, closed when it ends: nothing to close here.
        deliver(Notifier(timeout_s=NOTIFY_TIMEOUT_S), url, settings.notify_secret, run_end_event(run, manifest, event))
