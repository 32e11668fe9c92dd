"""The run watchdog: hands a dead worker's chunks back within a minute, finalises finished runs, finds lost ones.

Liveness comes from chunk leases and the workers' word (worker/ops/holding.py), not from the broker: a chunk
delivery that is delivered but unacked, whose lease has expired and that no live worker process says it holds
(its worker was SIGKILLed, OOM-killed, its host lost) is given back to the head of its
queue with kombu's own restore, without waiting for the broker's visibility timeout (about an hour). The
broker's late redelivery of anything restored this way finds the chunk complete and does nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from worker.errors import IrliveError
from worker.flow.intake import Intake
from worker.flow.runs import Runs
from worker.flow.states import ENDING, RunState
from worker.keys import Keys
from worker.messages import FINALIZE_RUN, PROCESS_CHUNK
from worker.money.ledger import Ledger
from worker.ops.broker import Broker
from worker.ops.holding import held
from worker.ops.periodic import Periodic
from worker.ops.recovery import Recovery
from worker.seams.store import Store

log = logging.getLogger("irlive.watchdog")
Send = Callable[[str, list[Any]], None]
# How often the leader looks; with the 15 s chunk lease a killed worker's chunk resumes in about 20-25 s.
INTERVAL_S = 5.0
# A delivery younger than this may not have taken its lease yet.
DELIVERY_GRACE_S = 10.0
# A finalisation delivered this long ago and not acked lost its worker (finalising takes seconds).
FINALIZE_GRACE_S = 120.0
# A running run with no progress for this long is searched for lost chunks (nowhere in the broker: a Redis
# restart that lost its last second of writes, kombu's fetch window), at most once per this interval.
STALL_S = 30.0


class Watchdog(Periodic):
    """One leader in the fleet: restores orphaned deliveries, sweeps the ledger, finalises, re-sends lost chunks."""

    def __init__(self, store: Store, keys: Keys, runs: Runs, broker: Broker, recovery: Recovery, send: Send, *,
                 ledger: Ledger | None = None, intake: Intake | None = None, interval_s: float = INTERVAL_S,
                 stall_s: float = STALL_S) -> None:
        super().__init__("watchdog", store, keys, interval_s=interval_s, lease_s=max(15.0, 4 * interval_s))
        self._store = store
        self._keys = keys
        self._runs = runs
        self._broker = broker
        self._recovery = recovery
        self._send = send
        self._ledger = ledger
        self._intake = intake
        self._stall_ms = stall_s * 1000
        self._searched_ms: dict[str, float] = {}

    def tick(self) -> int:
        """One pass; returns how many actions it took."""
        actions = self.restore_orphans()
        if self._ledger is not None and self.still_leader():
            # Tokens whose holder died: reservations go back to the pool, sent ones are reconciled.
            actions += self._ledger.sweep()
        if self._intake is not None and self.still_leader():
            actions += self._events_pass()
        if self.still_leader():
            actions += self._runs_pass()
        return actions

    def _events_pass(self) -> int:
        """The listeners' backstop: buffered event images go out even if every listener died, and a window
        that is over gets its run released (and finalised when nothing of it is pending)."""
        assert self._intake is not None
        chunks = self._intake.flush()
        for chunk in chunks:
            self._send(PROCESS_CHUNK, [chunk.to_message()])
        closed = self._intake.close_windows()
        for run_id in closed:
            self._send(FINALIZE_RUN, [run_id])
        return len(chunks) + len(closed)

    def restore_orphans(self, now: float | None = None) -> int:
        """Deliveries whose worker is gone (no lease, past their grace and their ETA, and no live process saying
        it holds them) go back to their queue."""
        now = time.time() if now is None else now
        restored = 0
        alive: set[str] | None = None  # read once a pass, when a delivery with no lease asks
        for d in self._broker.deliveries():
            if d.eta is not None and d.eta + DELIVERY_GRACE_S > now:
                continue  # a deferred task its worker is holding until it is due
            chunk = d.chunk
            if chunk is not None:
                if now - d.delivered_at < DELIVERY_GRACE_S:
                    continue
                try:
                    run_id, seq = str(chunk["run_id"]), int(chunk["seq"])
                except (KeyError, TypeError, ValueError):
                    continue
                if self._store.exists(self._keys.chunk_lease(run_id, seq)):
                    continue
                if alive is None:
                    alive = held(self._store, self._keys)
                if d.tag in alive:
                    continue  # its live worker has it waiting for a thread
                what = f"chunk {run_id}/{seq}"
            elif d.task == FINALIZE_RUN and now - d.delivered_at >= FINALIZE_GRACE_S:
                what = f"finalisation of {d.args[0] if d.args else '?'}"
            else:
                continue
            try:
                self._broker.restore(d.tag)
            except Exception as exc:  # kombu's errors: the next pass tries again
                log.warning("could not restore %s: %s", what, type(exc).__name__)
                continue
            log.warning("%s: its worker is gone (no lease for %.0fs since delivery); handed back to the queue",
                        what, now - d.delivered_at)
            restored += 1
        return restored

    def _runs_pass(self) -> int:
        actions = 0
        now_ms = time.time() * 1000
        week_ago = time.time() - 7 * 24 * 3600
        for run_id in self._store.zrangebyscore(self._keys.runs(), week_ago, "+inf"):
            run = self._runs.get(run_id)
            if run is not None and (run["state"] == RunState.DONE or run.get("finalised_at")) \
                    and not run.get("archived_at") and run.get("output"):
                # Finalised, but its worker died before the run's state left Redis: finish that.
                self._send(FINALIZE_RUN, [run_id])
                actions += 1
                continue
            # A cancelled or failed run winds its chunks down and finalises like a running one. A listing run is
            # searched for lost chunks too: an event window stays `listing` for its whole hour, and a chunk the
            # broker lost (a worker killed as it took the message) must not wait for the window to close.
            if run is None or run.get("finalised_at") \
                    or run["state"] not in (RunState.LISTING, RunState.RUNNING, *ENDING):
                continue
            if run["state"] in ENDING and self._runs.parked(run_id):
                # Failed while paused (its calls in flight crossed the failure threshold): its parked chunks
                # wind down like the others, so it finalises.
                parked = self._runs.parked_messages(run_id)
                for message in parked:
                    self._send(PROCESS_CHUNK, [message])
                self._runs.unpark(run_id, len(parked))
                log.warning("run %s is %s: %d parked chunks sent to wind down", run_id, run["state"], len(parked))
                actions += len(parked)
                continue
            if int(run["pending"]) <= 0:
                log.warning("run %s: all chunks complete but not finalised; finalising", run_id)
                self._send(FINALIZE_RUN, [run_id])
                actions += 1
                continue
            last = max(float(run.get("progress_ms") or run.get("created_ms") or 0), self._searched_ms.get(run_id, 0))
            if last and now_ms - last < self._stall_ms:
                continue
            # Reading the whole queue is not free: search a stalled run once per STALL_S, not on every pass.
            self._searched_ms[run_id] = now_ms
            try:
                lost = self._recovery.orphans(run_id)
            except IrliveError as exc:
                log.info("run %s: cannot look for lost chunks now: %s", run_id, exc)
                continue
            for chunk in lost:
                self._send(PROCESS_CHUNK, [chunk.to_message()])
            if lost:
                log.warning("run %s stalled: re-enqueued %d chunks the broker had lost", run_id, len(lost))
                self._store.hset(self._keys.run(run_id), "progress_ms", int(now_ms))
                actions += len(lost)
        return actions
