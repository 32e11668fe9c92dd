"""Buying tokens: the price guard, then each purchase written down before it leaves and settled after.

A purchase is committed against the day's cap (and the run's, for a run's own purchase) at the quoted price
before the request is sent (buy_begin.lua); its answer re-charges both at what the payment really cost
(buy_end.lua). A purchase is `failed` (both commitments back) only when it certainly never left or the seller
refused it; one that left and brought back no usable answer (a timeout, a 5xx, an unreadable or token-less
2xx, our own failure reading it) cannot be looked up (no idempotency key): it is `unknown`, stays charged to
the day and the run, and is never repeated blindly; IRLIVE_MAX_UNKNOWN_PURCHASES in a row pause the run.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from worker.errors import (
    BudgetExhausted,
    CallsUndecided,
    ConfigError,
    IrliveError,
    NeverSent,
    PaymentNeverPaid,
    PaymentStillPending,
    PurchaseRefused,
    PurchaseUnknown,
    RateLimited,
    RunHeld,
    RunStopped,
)
from worker.judge.manifest import iso_ms
from worker.keys import Keys
from worker.meter import Meter, NullMeter
from worker.money.budgets import Budgets, today
from worker.ops.redact import redact
from worker.seams.marketplace import Payment, Quote
from worker.seams.store import Store

log = logging.getLogger("irlive.money")
QUOTE_TTL_S = 300.0
PENDING_WAIT_S = 20.0
PENDING_POLL_S = 0.5
# A purchase's answer that Redis refuses to write down is held and retried this long.
PURCHASE_HOLD_S = 600.0
# A purchase request's settlement (failed or unknown) is retried this long before the sweep is left to do it.
SETTLE_HOLD_S = 30.0


class Seller(Protocol):
    """What money needs of the marketplace (worker.seams.marketplace.Marketplace is one)."""

    service_id: str

    def quote(self) -> Quote: ...

    def create_payment(self) -> Payment: ...

    def get_payment(self, payment_id: str) -> Payment: ...


@dataclass(frozen=True)
class Token:
    """A token lent to one chunk delivery (`holder`) of one run for one call; the secret never prints."""

    payment_id: str
    amount_cents: int
    run_id: str
    holder: str
    secret: str = field(repr=False)


class Purchaser:
    """Buys one token at a time, for a run (lent to its holder at once) or for the shared pool."""

    def __init__(self, store: Store, keys: Keys, seller: Seller, budgets: Budgets, *, max_price_cents: int,
                 lease_ms: int, meter: Meter | None = None, max_unknown: int = 3, pool_listing: str = "") -> None:
        self._store = store
        self._keys = keys
        self._seller = seller
        # The listing a pool purchase waits for (worker.config.pool_listing), written on every token bought.
        self._pool_listing = pool_listing
        self._budgets = budgets
        self._meter: Meter = meter or NullMeter()
        self._max_price = max_price_cents
        self._lease_ms = lease_ms
        self.max_unknown = max_unknown
        self._begin = store.script("money", "buy_begin")
        self._end = store.script("money", "buy_end")
        self._failed = store.script("money", "buy_failed")
        self._quote_lock = threading.Lock()
        self._quote_checked_at = -QUOTE_TTL_S
        self._price = max_price_cents
        self._broken = ""

    def price(self) -> int:
        """The seller's price per call from its 402 answer (cached); ConfigError above IRLIVE_MAX_PRICE_CENTS."""
        with self._quote_lock:
            if time.monotonic() - self._quote_checked_at < QUOTE_TTL_S:
                return self._price
            quote = self._seller.quote()
            if quote.price_cents > self._max_price:
                raise ConfigError(
                    f"the seller asks {quote.price_cents} cents per call; IRLIVE_MAX_PRICE_CENTS allows "
                    f"{self._max_price}: raise it if that price is acceptable"
                )
            self._price = quote.price_cents
            self._quote_checked_at = time.monotonic()
            return self._price

    def forget_quote(self) -> None:
        """The seller charged something else than it quoted: ask again before the next purchase."""
        with self._quote_lock:
            self._quote_checked_at = -QUOTE_TTL_S

    def buy(self, run_id: str = "", holder: str = "") -> Token | None:
        """Buy one token: for `run_id` (lent to `holder`, returned) or, with no run, into the pool (None)."""
        if self._broken:
            raise ConfigError(f"{self._broken}; this process buys nothing more until it is restarted")
        price = self.price()
        request_id = f"req-{uuid.uuid4().hex}"
        request_key = self._keys.payment(request_id)
        day = today()
        run_key = self._keys.run(run_id) if run_id else self._keys.no_run()
        try:
            begun = int(self._begin(
                [request_key, self._keys.requests(), self._keys.day(day), run_key, self._keys.wallet_totals()],
                [request_id, price, self._budgets.day_cap_arg, day, run_id, self.max_unknown]))
        except IrliveError:
            # Not sent: whether or not the script applied (a short WAIT applies it on the master all the same),
            # the request is settled `failed` so no phantom purchase stays charged (best effort: if Redis is gone
            # the whole write is too, or the sweep settles it).
            self._settle_quietly(request_id, "failed")
            raise
        if begun == -1:
            raise self._budgets.day_exhausted(day)
        if begun == -2:
            raise self._budgets.run_exhausted(run_id)
        if begun == -5:
            raise CallsUndecided(f"{'run ' + run_id if run_id else 'the pool'}: purchases in flight may end unknown; "
                                 f"waiting for them before buying another (IRLIVE_MAX_UNKNOWN_PURCHASES "
                                 f"{self.max_unknown} in a row)", retry_after=1.0)
        if begun in (-3, -4):
            raise (RunHeld(f"run {run_id} is paused: nothing is bought for it") if begun == -3
                   else RunStopped(f"run {run_id} is cancelled or failed: nothing is bought for it"))
        try:
            payment = self._seller.create_payment()
        except (NeverSent, PurchaseRefused, RateLimited, ConfigError):
            self._settle_request(request_id, "failed")
            raise
        except PurchaseUnknown as exc:
            self._settle_unknown(request_id, run_id, str(exc), exc.payment_id or "")
            raise
        except BaseException as exc:
            # It left; whatever came back (a timeout, our own failure reading it) may have been charged for.
            self._settle_unknown(request_id, run_id, f"{type(exc).__name__}: {exc}", "")
            raise
        if payment.token is None:
            # Marketplace.create_payment never returns one; another Seller might.
            what = f"payment {payment.payment_id} answered without a token"
            self._settle_unknown(request_id, run_id, what, payment.payment_id)
            raise PurchaseUnknown(what, payment.payment_id)
        amount = self._end_purchase(request_id, run_id, holder, payment, price, day)
        if not run_id:
            return None
        token = Token(payment.payment_id, amount, run_id, holder, payment.token)
        if payment.status == "pending":
            self._await_paid(token)
        return token

    def _end_purchase(self, request_id: str, run_id: str, holder: str, payment: Payment, price: int,
                      day: str) -> int:
        """Write the answered purchase down (buy_end.lua) with the day its quote was charged to in buy_begin."""
        amount = payment.amount_cents if payment.amount_cents is not None else price
        run_key = self._keys.run(run_id) if run_id else self._keys.no_run()
        keys = [self._keys.payment(request_id), self._keys.requests(), self._keys.payment(payment.payment_id),
                self._keys.leases(), self._keys.wallet_totals(), self._keys.day(day), run_key,
                self._keys.pool(self._pool_listing), self._keys.held()]
        args = [request_id, payment.payment_id, payment.token or "", amount, run_id, holder, self._lease_ms,
                iso_ms(payment.expires_at), self._seller.service_id, payment.status, self._max_price,
                self._pool_listing, payment.token_field or ""]
        try:
            ended = int(self._store.persist(lambda: self._end(keys, args), PURCHASE_HOLD_S,
                                            f"purchase {payment.payment_id}"))
        except IrliveError as exc:
            # Paid for, and not written down: buying more from this process could repeat it without end.
            self._broken = f"purchase {payment.payment_id} could not be written to the ledger ({exc})"
            raise ConfigError(f"{self._broken}; this process buys nothing more until it is restarted") from None
        if ended != 0:
            # 0: the purchase was written down already (a repeated answer): counted then.
            self._meter.money("bought", amount)
        if amount != price:
            log.warning("the seller charged %d cents for a call quoted at %d; budgets are charged what was paid",
                        amount, price)
            self.forget_quote()
        if ended == -3:
            raise ConfigError(f"the seller charged {amount} cents per call; IRLIVE_MAX_PRICE_CENTS allows "
                              f"{self._max_price} (the token bought is held, never spent unless released with "
                              "`irlive wallet --release-held`)")
        if ended == -2:
            raise BudgetExhausted(f"{self._budgets.run_exhausted(run_id)} (the seller charged {amount} cents, not "
                                  f"the {price} it quoted; the token bought went to the pool)")
        return amount

    def _settle_request(self, request_id: str, to: str, reason: str = "", payment_id: str = "") -> int:
        """A purchase that certainly failed (`failed`) or may have happened (`unknown`); 2 if that paused its run."""
        request = self._store.hgetall(self._keys.payment(request_id))
        run_id = request.get("run_id") or ""
        keys = [self._keys.payment(request_id), self._keys.requests(), self._keys.day(request.get("day") or today()),
                self._keys.run(run_id) if run_id else self._keys.no_run(), self._keys.wallet_totals()]
        # Held over Redis trouble (idempotent: a settled request is left alone): left open, the sweep could only
        # count a purchase that never left as unknown, charged for nothing.
        return int(self._store.persist(
            lambda: self._failed(keys, [request_id, to, self.max_unknown, reason, payment_id]), SETTLE_HOLD_S,
            f"purchase request {request_id}"))

    def _settle_quietly(self, request_id: str, to: str) -> None:
        try:
            self._settle_request(request_id, to)
        except IrliveError as exc:
            log.warning("purchase request %s not settled %s now (%s); the sweep settles it", request_id, to, exc)

    def _settle_unknown(self, request_id: str, run_id: str, what: str, payment_id: str) -> None:
        """A purchase that may have been charged: counted, charged, and after a few in a row the run pauses."""
        log.error("purchase %s may have been charged and brought no usable token: %s", request_id, redact(what))
        reason = (f"{self.max_unknown} purchases in a row brought no usable token and may have been charged "
                  f"(last: {redact(what)[:300]}); check with the seller, then `irlive resume {run_id}`")
        if self._settle_request(request_id, "unknown", reason, payment_id) == 2:
            log.error("run %s paused: %s", run_id, reason)

    def expire_requests(self, older_than_ms: int) -> int:
        """Purchase requests with no answer written down (their worker died mid-request): `unknown`."""
        expired = 0
        for request_id in self._store.zrangebyscore(self._keys.requests(), "-inf", older_than_ms):
            run_id = str(self._store.hget(self._keys.payment(request_id), "run_id") or "")
            self._settle_unknown(request_id, run_id, "its worker stopped before the answer was written down", "")
            expired += 1
        return expired

    def _await_paid(self, token: Token) -> None:
        """A payment not settled yet: poll it (never buy another) until it is paid or has expired."""
        deadline = time.monotonic() + PENDING_WAIT_S
        while time.monotonic() < deadline:
            time.sleep(PENDING_POLL_S)
            try:
                status = self._seller.get_payment(token.payment_id).status
            except IrliveError:
                continue
            if status == "paid":
                return
            if status in ("expired", "exhausted"):
                raise PaymentNeverPaid(token, f"payment {token.payment_id} ended {status} before it was paid")
        raise PaymentStillPending(token, f"payment {token.payment_id} still pending after {PENDING_WAIT_S:.0f}s")

