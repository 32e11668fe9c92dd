"""What the core reports as it works (images, calls, money, waits): a protocol, and the no-op it defaults to."""

from __future__ import annotations

from typing import Protocol


class Meter(Protocol):
    """Implemented by worker.ops.metrics.Metrics; the core never imports a metrics library."""

    def money(self, kind: str, cents: int) -> None:
        """Cents bought, spent, returned (a sent token the seller did not use, back to the pool), released (an
        x402 commitment the seller did not settle), void, or unknown (spent, its answer lost)."""

    def call(self, outcome: str, seconds: float) -> None:
        """A paid call ended: answered, failed, unknown, refused or throttled."""

    def images(self, verdict: str, n: int) -> None:
        """Records saved (verdict, or `duplicate` for one recorded from an earlier judgment)."""

    def limiter_wait(self, seconds: float) -> None: ...

    def chunk(self, seconds: float) -> None: ...

    def delivery(self, queue: str) -> None: ...

    def dead_letter(self) -> None: ...

    def download_retry(self) -> None:
        """A call refused for a download the seller could not make, sent once more whole before it is split."""


class NullMeter:
    """Counts nothing: what the core uses when no metrics are served."""

    def money(self, kind: str, cents: int) -> None:
        pass

    def call(self, outcome: str, seconds: float) -> None:
        pass

    def images(self, verdict: str, n: int) -> None:
        pass

    def limiter_wait(self, seconds: float) -> None:
        pass

    def chunk(self, seconds: float) -> None:
        pass

    def delivery(self, queue: str) -> None:
        pass

    def dead_letter(self) -> None:
        pass

    def download_retry(self) -> None:
        pass
