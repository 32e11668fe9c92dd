"""The one backoff irlive waits by: exponential, capped, with full jitter unless a wait must be predictable."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Before retry n (0-based) wait uniform(0, min(cap, base * 2**n)) (full jitter, as the AWS Architecture
    Blog's "Exponential Backoff And Jitter" recommends), or min(cap, base * 2**n) itself with `jitter=False`."""

    base_s: float = 2.0
    cap_s: float = 60.0
    jitter: bool = True

    def delay(self, retry: int, rand: float | None = None) -> float:
        """The wait before retry `retry`; `rand` in [0, 1) is the jitter draw (one is made if not given)."""
        ceiling = min(self.cap_s, self.base_s * 2.0 ** min(max(retry, 0), 60))
        if not self.jitter:
            return ceiling
        return (random.random() if rand is None else rand) * ceiling
