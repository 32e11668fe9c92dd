"""The pool keeper: buys tokens ahead of need so calls never wait on a purchase."""

from __future__ import annotations

import time
from typing import Any

from worker.keys import Keys
from worker.money.ledger import Wallet
from worker.ops.periodic import Periodic

# Buy only while calls are being made: an idle fleet must not hold (and let expire) prepaid tokens.
DEMAND_WINDOW_S = 30.0


class PoolKeeper(Periodic):
    """Tops the shared pool up to `size` when it falls to `low`; one keeper in the fleet buys at a time."""

    def __init__(self, wallet: Wallet, redis: Any, keys: Keys, *, size: int, low: int,
                 interval_s: float = 0.5) -> None:
        super().__init__("irlive-pool-keeper", redis, keys.pool() + ":refill-lock", interval_s)
        self._wallet = wallet
        self._redis = redis
        self._keys = keys
        self._size = size
        self._low = low

    def holds_lock(self) -> bool:
        # Demand is per process; a process whose workers are idle must not hold the fleet's refill lock.
        return time.monotonic() - self._wallet.last_take_at <= DEMAND_WINDOW_S and super().holds_lock()

    def tick(self) -> int:
        if int(self._redis.llen(self._keys.pool())) > self._low:
            return 0
        return self._wallet.refill(self._size)
