"""The one error tree: every failure irlive handles is one of these; worker/outcomes.py gives each its action.

Classes raised once money may have moved (a purchase request sent, a token sent) are the `MoneyMoved` branch,
never `TransientError`: nothing is paid again on the strength of a retry before what was paid is settled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.money.purchaser import Token


class IrliveError(Exception):
    """Base of every error irlive raises on purpose; messages never carry secrets."""


class TransientError(IrliveError):
    """A failure that may pass: retry with exponential backoff and full jitter, bounded."""


class StoreBug(IrliveError):
    """Redis answered an error that is ours to fix (a script or a command used wrongly)."""


class NeverSent(TransientError):
    """The request certainly never left (connection refused, no such host, connect timeout): nothing can have
    been paid or charged by it."""


class PurchaseRefused(TransientError):
    """The seller answered a purchase with a refusal (a 4xx other than 401/403/429): nothing was bought."""


class SignatureRefused(TransientError):
    """The seller answered a signed x402 payment with 402 and no settlement (expired, its nonce seen, a price
    changed): the reference middleware settles only after a 2xx, so nothing was paid; a retry signs anew."""


class StoreUnavailable(TransientError):
    """Redis cannot be reached, or is not accepting writes for a while (a failover, loading, a busy script)."""


class StoreRefused(StoreUnavailable):
    """Redis refused a write: out of memory under `maxmemory`. Passes only when memory is freed."""


class MoneyMoved(IrliveError):
    """Raised once money may have moved: a purchase request or a paid call left the process. Never transient:
    what was paid is settled (answered, refused, or reconciled with the seller) before anything is paid again."""


class PaymentRejected(MoneyMoved):
    """The seller refused a payment token (used, expired or unknown): the token is void; another is used."""


class PaymentNeverPaid(MoneyMoved):
    """A pending payment expired unpaid: the caller voids the token it was lent."""

    def __init__(self, token: Token, message: str) -> None:
        super().__init__(message)
        self.token = token


class PaymentStillPending(MoneyMoved):
    """A payment still pending after the wait: the caller gives the token back to the pool for later."""

    def __init__(self, token: Token, message: str) -> None:
        super().__init__(message)
        self.token = token


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


class AccessRefused(ConfigError):
    """S3 refused our credentials (`code`: AccessDenied, InvalidAccessKeyId, ...): on a bucket it stops the run;
    on one object of a readable bucket the storage seam turns it into ObjectRefused."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class NotifyRefused(ConfigError):
    """A webhook receiver refused a notification for good (4xx, a redirect): fix its URL or secret."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WalletRefused(ConfigError):
    """The seller refuses what the x402 payer signs for good (insufficient funds, a signature or recipient it does
    not accept): nothing was settled; fix the wallet or the IRLIVE_X402_* settings."""


class OutcomeUnknown(MoneyMoved):
    """The request may have reached the seller and spent its token; reconcile before paying again."""


class PurchaseUnknown(OutcomeUnknown):
    """A purchase request left and no usable answer came back (a 5xx, a 2xx without a readable payment or token):
    it may have been charged, so it is counted as bought, charged to the run and the day, and never repeated
    blindly. The message describes the answer's shape, never its values (they may hold the token)."""

    def __init__(self, message: str, payment_id: str | None = None) -> None:
        super().__init__(message)
        self.payment_id = payment_id


class UnreadableAnswer(MoneyMoved):
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


class ObjectRefused(PermanentInputError):
    """S3 will not hand over this one object (archived in Glacier, denied to us alone, a key too long): the image
    ends rejected with the reason, at no cost; the run goes on."""


class ChunkBusy(IrliveError):
    """Another delivery of the same chunk is working on it (a broker duplicate): retry later, pay nothing."""


class UnknownRun(IrliveError):
    """A command named a run that this Redis (and key prefix) does not hold."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"no run {run_id!r} (check IRLIVE_REDIS_URL and IRLIVE_KEY_PREFIX)")
        self.run_id = run_id
