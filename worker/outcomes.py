"""The outcome table: what irlive does with each error class, in one place.

Every failure irlive handles is a class of worker/errors.py; this table gives each its one action. The
`except` ladders of the pipeline and the Celery glue ask `outcome(exc)` instead of ordering `except` clauses,
so whether a failure is paid again is a row here, with its reason, not the order of a ladder. Classes raised
once money may have moved (a purchase request sent, a token sent) are the `MoneyMoved` branch: none is
transient, and `test_outcomes` walks the tree to keep it so.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from worker.errors import (
    AccessRefused,
    BudgetExhausted,
    CallsUndecided,
    ChunkBusy,
    ConfigError,
    IrliveError,
    MoneyMoved,
    NeverSent,
    NotFound,
    NotifyFailed,
    NotifyRefused,
    ObjectRefused,
    OutcomeUnknown,
    PaymentNeverPaid,
    PaymentRejected,
    PaymentStillPending,
    PermanentInputError,
    PurchaseRefused,
    PurchaseUnknown,
    RateLimited,
    RunHeld,
    RunStopped,
    SignatureRefused,
    StoreBug,
    StoreRefused,
    StoreUnavailable,
    TransientError,
    UnknownRun,
    UnreadableAnswer,
    WalletRefused,
)


class Action(StrEnum):
    """What is done with a failure."""

    RETRY = "retry with backoff (counts an attempt)"
    WAIT = "wait out Retry-After and go again (no attempt used; the fleet slows down)"
    SPLIT = ("split the call to find the image (a lone image is recorded with the code); a call refused for a "
             "download is first sent once more whole (the store, more often than the image)")
    RECORD = "record on the image with its code; never retried, never paid"
    RECORD_PAID = "record the paid call's images with the code; never paid again"
    VOID_AND_RETRY = "the token is void (settled with the seller); retry with another (counts an attempt)"
    RECONCILE = "settle what may have been paid from the seller's books before any new payment; then retry"
    HOLD = "park the chunk until the run is resumed"
    WIND_DOWN = "record what has no record `not_judged`; pay nothing more"
    STOP = "fail the run, saying exactly what to fix"
    DEFER = "come back later (another delivery holds it); no attempt used"
    REPORT = "tell the operator; the run is not touched"


@dataclass(frozen=True)
class Row:
    action: Action
    why: str


TABLE: dict[type[IrliveError], Row] = {
    TransientError: Row(Action.RETRY, "nothing was paid on its strength; it may pass"),
    NeverSent: Row(Action.RETRY, "the request never left: nothing can have been paid"),
    StoreUnavailable: Row(Action.RETRY, "Redis away for a moment; every write is idempotent and made again"),
    StoreRefused: Row(Action.RETRY, "Redis out of memory: passes when memory is freed"),
    StoreBug: Row(Action.RETRY, "a script or command of ours Redis refused: retried within the chunk's "
                                "deliveries, then dead-lettered"),
    PurchaseRefused: Row(Action.RETRY, "the seller said no to a purchase: nothing was bought"),
    NotifyFailed: Row(Action.RETRY, "a webhook receiver busy for now"),
    SignatureRefused: Row(Action.RETRY, "the seller refused an x402 signature without settling it: nothing was "
                                        "paid; the retry signs a new one"),
    RateLimited: Row(Action.WAIT, "the seller or our limiter said not now; the call was not paid"),
    CallsUndecided: Row(Action.WAIT, "calls in flight decide the run's failure threshold first"),
    PermanentInputError: Row(Action.SPLIT, "the seller refused the batch for an image in it"),
    NotFound: Row(Action.RECORD, "the object is gone"),
    ObjectRefused: Row(Action.RECORD, "S3 will not hand over this one object"),
    ConfigError: Row(Action.STOP, "a setting, a credential or the price: a person must fix it"),
    AccessRefused: Row(Action.STOP, "S3 refused our credentials for the bucket"),
    WalletRefused: Row(Action.STOP, "the seller refuses the x402 payer's funds or signature: a person must fix "
                                    "the wallet or its settings"),
    NotifyRefused: Row(Action.REPORT, "a webhook receiver refused for good: its URL or secret"),
    UnknownRun: Row(Action.REPORT, "a command named a run this Redis does not hold"),
    RunHeld: Row(Action.HOLD, "paused by its owner, or a purchase outcome a person must look at"),
    BudgetExhausted: Row(Action.HOLD, "the run's or the day's cap would be crossed"),
    RunStopped: Row(Action.WIND_DOWN, "cancelled or failed while the chunk was judged"),
    ChunkBusy: Row(Action.DEFER, "another delivery holds the chunk or its images"),
    # ---- money may have moved: never transient ----
    MoneyMoved: Row(Action.RECONCILE, "money may have moved; nothing is paid again before it is settled"),
    OutcomeUnknown: Row(Action.RECONCILE, "the request left and its answer never came: the sent token is "
                                          "reconciled with the seller (spent: counted as an answer lost)"),
    PurchaseUnknown: Row(Action.RECONCILE, "a purchase left without a usable answer: charged to the run and "
                                           "the day as unknown, never repeated blindly; a few in a row pause "
                                           "the run"),
    PaymentRejected: Row(Action.VOID_AND_RETRY, "the seller refused the token (used, expired, unknown)"),
    PaymentNeverPaid: Row(Action.VOID_AND_RETRY, "a pending payment expired unpaid: its token is void"),
    PaymentStillPending: Row(Action.RECONCILE, "a payment still pending: its token goes back to the pool, "
                                               "asked about again before it is lent"),
    # A garbage 2xx answer to a paid call: the seller took the token and answered; paying again for the same
    # images would pay twice for a reading that failed on our side, so they are recorded, the raw answer kept.
    UnreadableAnswer: Row(Action.RECORD_PAID, "a paid call answered 2xx with a body that cannot be read"),
}


def outcome(exc: BaseException) -> Row:
    """The row of the nearest class of `exc` in the table; an exception not ours is a bug: retried (bounded)."""
    for cls in type(exc).__mro__:
        if cls in TABLE:
            return TABLE[cls]
    return Row(Action.RETRY, "not one of ours: a bug; retried a few times, then the chunk is dead-lettered")

