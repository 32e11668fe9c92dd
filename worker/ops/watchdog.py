"""The run watchdog: a background thread that finishes runs whose counters say done and revives stalled ones."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from worker.flow.runs import Runs
from worker.keys import Keys
from worker.money.ledger import Wallet
from worker.ops.periodic import Periodic
from worker.ops.recovery import Recovery

log = logging.getLogger("irlive.watchdog")
Send = Callable[[str, list[Any]], None]


class Watchdog(Periodic):
    """Finalises runs whose chunks are all complete, re-enqueues stalled runs' lost chunks, sweeps the wallet."""

    def __init__(self, runs: Runs, recovery: Recovery, keys: Keys, send: Send, *, stall_s: float,
                 wallet: Wallet | None = None, interval_s: float = 30.0, chunk_task: str = "irlive.process_chunk",
                 finalize_task: str = "irlive.finalize_run") -> None:
        super().__init__("irlive-watchdog", runs.redis, keys.prefix + ":watchdog-lock", interval_s)
        self._runs = runs
        self._recovery = recovery
        self._keys = keys
        self._send = send
        self._stall_ms = stall_s * 1000
        self._chunk_task = chunk_task
        self._finalize_task = finalize_task
        self._wallet = wallet

    def tick(self) -> int:
        """One pass; returns how many actions it took."""
        redis = self._runs.redis
        # Tokens whose holder died: reservations go back to the pool, sent ones are reconciled with the seller.
        actions = self._wallet.sweep() if self._wallet is not None else 0
        now_ms = time.time() * 1000
        week_ago = time.time() - 7 * 24 * 3600
        for run_id in redis.zrangebyscore(self._keys.runs(), week_ago, "+inf"):
            run = self._runs.get(run_id)
            if run is None or run["state"] != "running":
                continue
            if int(run["pending"]) <= 0:
                log.warning("run %s: all chunks complete but not finalised; finalising", run_id)
                self._send(self._finalize_task, [run_id])
                actions += 1
                continue
            last = float(run.get("progress_ms") or 0)
            if last and now_ms - last < self._stall_ms:
                continue
            lost = self._recovery.orphans(run_id)
            for chunk in lost:
                self._send(self._chunk_task, [chunk.to_message()])
            if lost:
                log.warning("run %s stalled: re-enqueued %d chunks nobody held", run_id, len(lost))
                redis.hset(self._keys.run(run_id), "progress_ms", int(now_ms))
                actions += len(lost)
        return actions
