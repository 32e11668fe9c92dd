"""The pool keeper: a background thread that buys tokens ahead of need so calls never wait on a purchase."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any

from worker.errors import IrliveError
from worker.keys import Keys
from worker.wallet import Wallet

log = logging.getLogger("irlive.pool")
# Buy only while calls are being made: an idle fleet must not hold (and let expire) prepaid tokens.
DEMAND_WINDOW_S = 30.0


class PoolKeeper(threading.Thread):
    """Tops the shared pool up to `size` when it falls to `low`; one keeper refills at a time (Redis lock)."""

    def __init__(self, wallet: Wallet, redis: Any, keys: Keys, *, size: int, low: int,
                 interval_s: float = 0.5) -> None:
        super().__init__(name="irlive-pool-keeper", daemon=True)
        self._wallet = wallet
        self._redis = redis
        self._keys = keys
        self._size = size
        self._low = low
        self._interval = interval_s
        self._me = uuid.uuid4().hex
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval):
            try:
                self.tick()
            except IrliveError as exc:
                # Budget or seller trouble: the calls themselves will report it; keep the pool as it is.
                log.info("pool refill skipped: %s", exc)
            except Exception:
                log.exception("pool refill failed")

    def tick(self) -> int:
        if time.monotonic() - self._wallet.last_take_at > DEMAND_WINDOW_S:
            return 0
        if int(self._redis.llen(self._keys.pool())) > self._low:
            return 0
        lock = self._keys.pool() + ":refill-lock"
        if not self._redis.set(lock, self._me, nx=True, px=30_000):
            return 0
        try:
            return self._wallet.refill(self._size)
        finally:
            if self._redis.get(lock) == self._me:
                self._redis.delete(lock)
