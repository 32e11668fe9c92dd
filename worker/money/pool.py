"""The pool keeper: buys tokens ahead of need so calls never wait on a purchase."""

from __future__ import annotations

import time

from worker.keys import Keys
from worker.money.ledger import Ledger
from worker.ops.periodic import Periodic
from worker.seams.store import Store

# Buy only while calls are being made: an idle fleet must not hold (and let expire) prepaid tokens.
DEMAND_WINDOW_S = 30.0


class PoolKeeper(Periodic):
    """Tops the shared pool up to `size` when it falls to `low`; one keeper in the fleet buys at a time.

    Its lease outlasts a slow purchase (`lease_s`, from the call timeout) and is renewed before each one,
    so a second keeper never starts buying while the first is still waiting on the seller.
    """

    def __init__(self, ledger: Ledger, store: Store, keys: Keys, *, size: int, low: int, lease_s: float,
                 interval_s: float = 0.5) -> None:
        super().__init__("pool-keeper", store, keys, interval_s=interval_s, lease_s=lease_s)
        self._ledger = ledger
        self._size = size
        self._low = low

    def holds_lock(self) -> bool:
        # Demand is per process; a process whose workers are idle must not hold the fleet's refill lease.
        return time.monotonic() - self._ledger.last_take_at <= DEMAND_WINDOW_S and super().holds_lock()

    def tick(self) -> int:
        if self._ledger.tokens_pooled() > self._low:
            return 0
        return self._ledger.refill(self._size, self.still_leader)
