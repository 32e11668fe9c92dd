"""The one error tree: every failure irlive handles is one of these, each with one behaviour."""

from __future__ import annotations


class IrliveError(Exception):
    """Base of every error irlive raises on purpose; messages never carry secrets."""


class TransientError(IrliveError):
    """A failure that may pass: retry with exponential backoff and full jitter, bounded."""


class StoreUnavailable(TransientError):
    """Redis cannot be reached, or is not accepting writes for a while (a failover, loading, a busy script)."""


class StoreRefused(StoreUnavailable):
    """Redis refused a write: out of memory under `maxmemory`. Passes only when memory is freed."""


class PaymentRejected(TransientError):
    """The seller refused a payment token (used, expired or unknown): drop it and use another."""


class NotifyFailed(TransientError):
    """A webhook receiver could not take a notification now (5xx, 408, 429, timeout, no connection): retry."""

    def __init__(self, message: str, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RateLimited(IrliveError):
    """The seller or our own limiter said 'not now'; wait and retry without using up an attempt."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CallsUndecided(RateLimited):
    """The run's failure threshold holds the next call until calls in flight end (a seller failing every call
    costs at most the threshold's minimum)."""


class PermanentInputError(IrliveError):
    """The image itself is unacceptable: record it on the image, never retry, never pay."""

    def __init__(self, message: str, code: str = "invalid") -> None:
        super().__init__(message)
        self.code = code


class ConfigError(IrliveError):
    """Wrong settings, credentials or price: stop and say exactly what to fix."""


class NotifyRefused(ConfigError):
    """A webhook receiver refused a notification for good (4xx, a redirect): fix its URL or secret."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class OutcomeUnknown(IrliveError):
    """The request may have reached the seller and spent its token; reconcile before paying again."""


class UnreadableAnswer(IrliveError):
    """A paid call answered 2xx with a body irlive's reading of it failed on: spent, recorded, never re-paid."""

    def __init__(self, message: str, raw: bytes) -> None:
        super().__init__(message)
        self.raw = raw


class RunHeld(IrliveError):
    """The run is paused (by its owner, or by a cap): the chunk is parked until `irlive resume`."""


class BudgetExhausted(RunHeld):
    """The wallet cannot buy within the run's or the day's cap: pause until the cap is raised."""


class RunStopped(IrliveError):
    """The run was cancelled, or failed (its error rate, its settings): pay nothing more; what has no record
    yet is recorded `not_judged` and the run finalises with what it has."""


class NotFound(PermanentInputError):
    """An object listed earlier is gone: the image ends rejected, at no cost."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="not_found")


class ChunkBusy(IrliveError):
    """Another delivery of the same chunk is working on it (a broker duplicate): retry later, pay nothing."""


class UnknownRun(IrliveError):
    """A command named a run that this Redis (and key prefix) does not hold."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r} (check IRLIVE_REDIS_URL and IRLIVE_KEY_PREFIX)")
        self.run_id = run_id
