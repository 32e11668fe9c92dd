"""The token ledger: the life of every token, written down in Redis before each step happens.

Why hand-written: no library keeps a money ledger on Redis with fencing. Every transition is one Lua script
(worker/money/scripts/*.lua, each stating its KEYS, ARGV and return value), so a crash at any line leaves a
state the next process can finish.

States of a payment (hash `<prefix>:pay:<id>`):

    requested -> paid -> reserved -> sent -> spent      (spent: with the answer, or counted as an answer lost)
                   ^--------+----------+                back to the pool: never sent, or the seller says unused
    requested -> unknown    the purchase request timed out: counted as bought, never repeated
    requested -> failed     the purchase certainly did not happen
    paid/sent -> void       the seller refused the token (expired, used, or never paid)
    reserved/sent -> unsettled   not stock (`pooled=False`, x402): instead of going back to the pool, the
                            commitment is released (never sent, or the seller settled nothing)

Callers use one protocol: `token = ledger.take(run, holder)`, then `with ledger.spend(token, ...) as spend:`
marks it sent (fenced by the chunk lease) and the caller ends it with `spend.answered(...)`, `.failed()`,
`.unknown()` or `.refused()`; leaving the block any other way leaves the token `sent` for reconciliation.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from worker.config import DEFAULT_LISTING
from worker.errors import (
    CallsUndecided,
    ChunkBusy,
    OutcomeUnknown,
    PaymentNeverPaid,
    PaymentStillPending,
    RunHeld,
    RunStopped,
    TransientError,
)
from worker.judge.manifest import join_identities, split_identities
from worker.judge.verdicts import plain_url
from worker.keys import Keys
from worker.meter import Meter, NullMeter
from worker.money.budgets import Budgets
from worker.money.purchaser import Purchaser, Seller, Token
from worker.ops.redact import redact, scrub_answer
from worker.seams.marketplace import Payment
from worker.seams.store import Store

log = logging.getLogger("irlive.money")
# A pool token closer than this to its expiry is not lent: the call might outlive it.
EXPIRY_MARGIN_MS = 60_000
# An answer (and a purchase) that Redis refuses to write is held in-process and retried this long.
ANSWER_HOLD_S = 600.0
# The raw answer kept with a token until its verdicts are recorded (an answer for 10 images is ~4 KB).
MAX_ANSWER_KEPT = 256 * 1024
_POOL_PEEK = 8
# A call held back by the run's failure threshold waits this long for the calls in flight to end.
UNDECIDED_WAIT_S = 2.0
# The image claims of a paid answer not yet recorded are pinned this long: past a killed worker's lease, until
# the chunk's next delivery records the answer (the watchdog brings it back within a minute). Bounded so that a
# chunk never resumed cannot hold its images from other runs for ever.
PAID_CLAIM_TTL_S = 3600.0

__all__ = ["Ledger", "Spend", "Token", "Unrecorded"]



@dataclass(frozen=True)
class Unrecorded:
    """A paid answer written down in the ledger whose verdicts its chunk has not recorded yet."""

    payment_id: str
    identities: list[str]
    request_id: str
    raw: str
    # The URLs as sent, without their queries, one per identity (empty if not written down).
    urls: list[str]


class Spend:
    """One lent token between `sent` and its end; made by Ledger.spend()."""

    def __init__(self, ledger: Ledger, token: Token, chunk_ref: str, claim_keys: list[str]) -> None:
        self.token = token
        self._ledger = ledger
        self._chunk_ref = chunk_ref
        self._claim_keys = claim_keys
        self.settled = False

    def answered(self, request_id: str | None, raw: bytes, *, bought: bool | None = None) -> None:
        """The seller answered with a body to judge: the token is spent and the answer kept until recorded.

        `bought`, where the answer was read: whether it bought any verdict. The call then ends now for the
        run's failure threshold (its records may be saved later); None ends it when they are.
        """
        # Kept readable (the next delivery may have to record it), without the presigned URLs' signatures.
        text = scrub_answer(raw[:MAX_ANSWER_KEPT]) if len(raw) <= MAX_ANSWER_KEPT else redact(
            raw[:MAX_ANSWER_KEPT].decode("utf-8", errors="replace"))
        ended = "" if bought is None else "0" if bought else "1"
        if self._ledger.settle(self.token.payment_id, "spent", request_id=request_id or "-", answer=text,
                               chunk_ref=self._chunk_ref, hold_s=ANSWER_HOLD_S, ended=ended,
                               pins=self._claim_keys, run_id=self.token.run_id) == 2:
            log.warning("run %s failed: too many of its paid calls bought no verdict", self.token.run_id)
        self.settled = True

    def refused(self, reason: str) -> None:
        """The seller refused the token itself (expired, used, unknown): it can never be used again."""
        self._ledger.settle(self.token.payment_id, "void", reason=reason, run_id=self.token.run_id)
        self.settled = True

    def failed(self) -> bool:
        """The seller answered an error: ask it whether the token was used; back to the pool if not.

        Returns True if the token is (or may be) spent.
        """
        self.settled = True
        return self._ledger.reconcile_sent(self.token.payment_id, lost=False)

    def unknown(self) -> bool:
        """No answer (timeout, dropped connection) after the request left: reconcile before paying again.

        A token the seller consumed is spent with its answer lost (counted). True if spent (or may be).
        """
        self.settled = True
        return self._ledger.reconcile_sent(self.token.payment_id, lost=True)


class Ledger:
    """Lends, settles and reconciles tokens; one per worker process, thread-safe."""

    def __init__(self, store: Store, keys: Keys, seller: Seller, budgets: Budgets, *, max_price_cents: int,
                 lease_s: float = 120.0, meter: Meter | None = None, max_unknown_purchases: int = 3,
                 pooled: bool = True) -> None:
        self._store = store
        self._keys = keys
        self._seller = seller
        self.budgets = budgets
        self._lease_ms = int(lease_s * 1000)
        self._meter: Meter = meter or NullMeter()
        # Tokens wait in the pool of the listing they were bought for: another listing would refuse them.
        self.pool_listing = str(getattr(seller, "pool_listing", ""))
        self.pool_key = keys.pool(self.pool_listing)
        self.purchaser = Purchaser(store, keys, seller, budgets, max_price_cents=max_price_cents,
                                   lease_ms=self._lease_ms, meter=self._meter, max_unknown=max_unknown_purchases,
                                   pool_listing=self.pool_listing)
        self._take = store.script("money", "take")
        self._send = store.script("money", "send")
        self._settle = store.script("money", "settle")
        self._give_back = store.script("money", "give_back")
        self._release = store.script("money", "release")
        # False for a way to pay whose "token" is a signature made per call (x402): what is not spent is
        # released, never pooled for another call.
        self.pooled = pooled
        self._call_end = store.script("money", "call_end")
        self._release_held = store.script("money", "release_held")
        self._max_price = max_price_cents
        self._rng = random.Random()
        self.last_take_at = 0.0

    @property
    def seller(self) -> Seller:
        """Who the tokens are bought from and reconciled with (the marketplace, or the x402 payer)."""
        return self._seller

    # ---- lending ----------------------------------------------------------------------------------------

    def take(self, run_id: str, holder: str) -> Token:
        """A token for one call of `run_id` by the delivery `holder`: from the pool if one waits, else bought.

        BudgetExhausted when the run's or the day's cap would be crossed.
        """
        self.last_take_at = time.monotonic()
        while True:
            candidates: list[str] = self._store.lrange(self.pool_key, 0, _POOL_PEEK - 1)
            if not candidates:
                return self._buy(run_id, holder)
            pid = self._rng.choice(candidates)
            got = self._take(
                [self.pool_key, self._keys.payment(pid), self._keys.leases(), self._keys.run(run_id),
                 self._keys.wallet_totals(), self._keys.held()],
                [pid, run_id, holder, self._lease_ms, EXPIRY_MARGIN_MS, self._max_price])
            status = int(got[0])
            if status == 1:
                return Token(pid, int(got[2]), run_id, holder, str(got[1]))
            if status == -1:
                raise self.budgets.run_exhausted(run_id)
            if status in (-4, -5):
                raise _run_closed(run_id, status == -4)
            if status == -6:
                log.warning("token %s costs more than IRLIVE_MAX_PRICE_CENTS (%d): held for a person "
                            "(`irlive wallet --release-held`), not spent", pid, self._max_price)
            # 0: another worker took that one first; -3: it had expired in the pool; -6: held. Look again.

    def _buy(self, run_id: str, holder: str) -> Token:
        try:
            token = self.purchaser.buy(run_id, holder)
        except PaymentNeverPaid as exc:
            self.settle(exc.token.payment_id, "void", reason="never paid")
            raise
        except PaymentStillPending as exc:
            self.give_back(exc.token)
            raise
        assert token is not None
        return token

    def refill(self, target: int, still_leader: Callable[[], bool] | None = None) -> int:
        """Buy tokens into the pool until it holds `target`; stops as soon as `still_leader()` says no.

        Buys nothing after IRLIVE_MAX_UNKNOWN_PURCHASES purchases in a row that may have been charged without a
        usable token: buying ahead of need must not repeat that without end (a run's own purchase that
        succeeds, after a person looked, lets it buy again).
        """
        in_row = int(self._store.hget(self._keys.wallet_totals(), "unknown_in_row") or 0)
        if in_row >= self.purchaser.max_unknown:
            log.warning("the pool is not refilled: the last %d purchases brought no usable token and may have been "
                        "charged (see `irlive wallet`)", in_row)
            return 0
        bought = 0
        while int(self._store.llen(self.pool_key)) < target:
            if still_leader is not None and not still_leader():
                break
            try:
                self.purchaser.buy()
            except CallsUndecided:
                break  # purchases in flight decide first; the next tick goes on
            bought += 1
        return bought

    def give_back(self, token: Token) -> bool:
        """A lent token that was never sent goes back to the pool (and the run gets its commitment back)."""
        return self._back(token.payment_id, token.run_id, "reserved", token.holder, only_if_expired=False)

    @contextmanager
    def spend(self, token: Token, identities: list[str], chunk_lease_key: str, chunk_ref: str,
              claim_keys: list[str] | None = None, urls: list[str] | None = None) -> Iterator[Spend]:
        """Mark the token sent (only its holder, still holding the chunk lease, may) and hand over a Spend.

        `claim_keys`: the chunk's claims on these images, pinned to the answer when one is kept (settle.lua).
        `urls`: the URLs the call carries; written down without their queries, for reading the answer back.

        ChunkBusy if fenced out: the token went back to the pool, or the chunk lease was lost (then the
        token goes back to the pool here). Leaving the block without settling leaves the token `sent`,
        for the sweep to reconcile with the seller.
        """
        sent = int(self._send([self._keys.payment(token.payment_id), self._keys.leases(), chunk_lease_key,
                               self._keys.run(token.run_id)],
                              [token.payment_id, token.holder, join_identities(identities), self._lease_ms,
                               "\n".join(plain_url(u) or "" for u in urls or ())]))
        if sent != 1:
            self.give_back(token)
            if sent in (-1, -2):
                raise _run_closed(token.run_id, sent == -1)
            if sent == -3:
                raise CallsUndecided(f"run {token.run_id}: waiting for calls in flight to end before paying "
                                     "another (its failure threshold)", retry_after=UNDECIDED_WAIT_S)
            raise ChunkBusy(f"token {token.payment_id} may not be sent: the chunk lease or the reservation "
                            "was lost")
        spend = Spend(self, token, chunk_ref, list(claim_keys or ()))
        try:
            yield spend
        finally:
            if not spend.settled:
                log.warning("token %s left 'sent' for reconciliation", token.payment_id)

    # ---- settling -----------------------------------------------------------------------------------------

    def settle(self, payment_id: str, to: str, *, request_id: str = "", answer: str = "", lost: bool = False,
               chunk_ref: str = "", reason: str = "", hold_s: float = 0.0, ended: str = "",
               pins: list[str] | None = None, run_id: str | None = None) -> int:
        """Spent or void, once; the run is charged on the first transition into spent only.

        With an answer kept for `chunk_ref`, the claims `pins` that chunk holds are pinned until it records it.
        `run_id`: the run the token was lent to, when the caller holds it (else read first; settle.lua checks it).

        Returns 0 if it was settled before, 1 if this settled it, 2 if ending its call also failed the run.
        """
        args = [payment_id, to, request_id, answer, "1" if lost else "0", chunk_ref, reason, ended,
                round(PAID_CLAIM_TTL_S * 1000)]

        def write() -> int:
            # Read and written under one hold: after a paid answer, no Redis step may give up early.
            amount = 0

            def step(run: str) -> int:
                nonlocal amount
                keys = [self._keys.payment(payment_id), self._keys.leases(), self._keys.wallet_totals(),
                        self._keys.run(run) if run else self._keys.no_run(), self._keys.unrecorded(),
                        self._keys.run_payments(run or "-"), *(pins or ())]
                status, amount = (int(v) for v in self._settle(keys, [*args, run]))
                return status

            status, _ = self._for_run(payment_id, run_id, step)
            if status:
                self._meter.money(to, amount)
                if lost and to == "spent":
                    self._meter.money("unknown", amount)
            return status

        return self._store.persist(write, hold_s, f"token {payment_id}")

    def reconcile_sent(self, payment_id: str, *, lost: bool, only_if_expired: bool = False) -> bool:
        """Ask the seller what became of a sent token: unused -> pool; consumed -> spent; refused -> void.

        True if the token is spent, or could not be looked up (it stays `sent` for the next sweep).
        """
        try:
            payment = self._seller.get_payment(payment_id)
        except (TransientError, OutcomeUnknown) as exc:
            log.info("token %s: cannot reconcile now (%s); the sweep will", payment_id, exc)
            return True
        return self._apply(payment_id, payment, lost=lost, only_if_expired=only_if_expired)

    def _apply(self, payment_id: str, payment: Payment, *, lost: bool, only_if_expired: bool) -> bool:
        record: dict[str, str] = self._store.hgetall(self._keys.payment(payment_id))
        if payment.remaining_calls and payment.status not in ("expired", "exhausted"):
            back = self._back(payment_id, record.get("run_id", ""), "sent", "", only_if_expired=only_if_expired)
            if back:
                self._store.hincrby(self._keys.wallet_totals(), "reconciled_unspent", 1)
                if self.pooled:
                    self._meter.money("returned", int(record.get("amount_cents") or 0))
            return not back
        if payment.status == "expired" and payment.remaining_calls:
            self.settle(payment_id, "void", reason="expired unused")
            return False
        if self.settle(payment_id, "spent", lost=lost):
            self._store.hincrby(self._keys.wallet_totals(), "reconciled_spent", 1)
        return True

    def _back(self, payment_id: str, run_id: str, expected: str, holder: str, *, only_if_expired: bool) -> bool:
        if not self.pooled:
            day = str(self._store.hget(self._keys.payment(payment_id), "day") or "")
            released = int(self._release(
                [self._keys.payment(payment_id), self._keys.leases(),
                 self._keys.run(run_id) if run_id else self._keys.no_run(), self._keys.day(day or "-"),
                 self._keys.wallet_totals()],
                [payment_id, run_id, expected, holder, "1" if only_if_expired else "0"]))
            if released == 1:
                self._meter.money("released", int(self._store.hget(self._keys.payment(payment_id),
                                                                   "amount_cents") or 0))
            return released == 1
        # Back into the pool of the listing it was bought for, whichever listing this process serves.
        listing = str(self._store.hget(self._keys.payment(payment_id), "listing") or "")
        result = int(self._give_back(
            [self._keys.payment(payment_id), self._keys.leases(), self._keys.pool(listing),
             self._keys.run(run_id) if run_id else self._keys.no_run()],
            [payment_id, run_id, expected, holder, "1" if only_if_expired else "0"]))
        return result == 1

    # ---- answers kept until recorded ------------------------------------------------------------------------

    def unrecorded(self, run_id: str, seq: int) -> list[Unrecorded]:
        """Paid answers of this chunk written down but not yet recorded (a crash or Redis refusal came between)."""
        mine = f"{run_id} {seq}"
        found: list[Unrecorded] = []
        for pid, ref in self._store.hgetall(self._keys.unrecorded()).items():
            if ref != mine:
                continue
            record: dict[str, str] = self._store.hgetall(self._keys.payment(pid))
            identities = split_identities(record.get("images", ""))
            urls = record.get("urls", "").split("\n") if record.get("urls") else []
            found.append(Unrecorded(pid, identities, record.get("request_id", ""), record.get("answer", ""), urls))
        return found

    def recorded(self, payment_id: str, *, failed: bool, keep_answer: bool = False, run_id: str | None = None) -> bool:
        """The answer's records are saved; the raw answer is dropped, or kept for a person to read (unreadable).

        This ends the paid call, `failed` if it bought no verdict; True if that stopped the run (its failure
        threshold was crossed). `run_id`: the recording chunk's run (else read first; call_end.lua checks it).
        """
        stopped, run = self._for_run(payment_id, run_id, lambda run: int(self._call_end(
            [self._keys.payment(payment_id), self._keys.run(run) if run else self._keys.no_run(),
             self._keys.unrecorded()],
            [payment_id, "1" if failed else "0", "1" if keep_answer else "0", run])))
        if stopped:
            log.warning("run %s failed: too many of its paid calls bought no verdict", run)
        return bool(stopped)

    def _for_run(self, payment_id: str, run_id: str | None, step: Callable[[str], int]) -> tuple[int, str]:
        """(step(run), run) for a script whose keys name the payment's run: the run the caller holds, else (or
        when the script answers -1: the payment is another run's) the one its record names."""
        while True:
            run = run_id if run_id is not None else str(self._store.hget(self._keys.payment(payment_id), "run_id")
                                                       or "")
            result = step(run)
            if result != -1:
                return result, run
            run_id = None

    # ---- reconciliation -----------------------------------------------------------------------------------

    def sweep(self, *, everything: bool = False) -> int:
        """Finish what dead workers left: expired reservations go back, expired `sent` tokens are reconciled,
        purchases that never got an answer are counted as unknown.

        everything=True ignores leases: only safe when no worker is running.
        """
        now = self.redis_now_ms()
        limit: float | str = "+inf" if everything else now
        done = self._settle_open(self._store.zrangebyscore(self._keys.leases(), "-inf", limit),
                                 only_if_expired=not everything)[0]
        done += self.purchaser.expire_requests(now if everything else now - self._lease_ms)
        self._store.hset(self._keys.wallet_totals(), "last_reconciled_ms", now)
        return done

    def settle_run(self, run_id: str) -> int:
        """Settle every open token of a run whose chunks are all complete; returns how many stay open."""
        mine = [pid for pid in self._store.zrange(self._keys.leases(), 0, -1)
                if self._store.hget(self._keys.payment(pid), "run_id") == run_id]
        return self._settle_open(mine, only_if_expired=False)[1]

    def _settle_open(self, pids: list[str], *, only_if_expired: bool) -> tuple[int, int]:
        """(settled, left open) for tokens reserved or sent."""
        done = left = 0
        for pid in pids:
            record: dict[str, str] = self._store.hgetall(self._keys.payment(pid))
            state, run_id = record.get("state"), record.get("run_id", "")
            if state == "reserved":
                if not self._back(pid, run_id, "reserved", "", only_if_expired=only_if_expired):
                    left += 1
                    continue
            elif state == "sent":
                try:
                    payment = self._seller.get_payment(pid)
                except (TransientError, OutcomeUnknown):
                    left += 1
                    continue
                self._apply(pid, payment, lost=True, only_if_expired=only_if_expired)
                if self._store.hget(self._keys.payment(pid), "state") == "sent":
                    left += 1
                    continue
            else:
                self._store.zrem(self._keys.leases(), pid)
                continue
            done += 1
        return done, left

    def redis_now_ms(self) -> int:
        seconds, micros = self._store.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # ---- archiving a finished run's payments ----------------------------------------------------------------

    def settled_ids(self, run_id: str) -> set[str]:
        """The ids of the run's settled payments (settle.lua adds each as it settles it)."""
        return {str(pid) for pid in self._store.smembers(self._keys.run_payments(run_id))}

    def settled_payments(self, run_id: str) -> list[dict[str, str]]:
        """The run's spent and void payments as the ledger holds them, without their secrets."""
        found: list[dict[str, str]] = []
        pids = sorted(self.settled_ids(run_id))
        records = self._store.hgetall_many([self._keys.payment(pid) for pid in pids])
        for pid, record in zip(pids, records, strict=True):
            if record.get("state") not in ("spent", "void"):
                continue
            record = {k: v for k, v in record.items() if k not in ("token", "holder")}
            record["payment_id"] = pid
            found.append(record)
        return found

    def forget_settled(self, run_id: str, payment_ids: list[str]) -> None:
        """Drop archived payments from Redis (they are in the run's payments.jsonl in S3)."""
        pipe = self._store.pipeline(transaction=False)
        for pid in payment_ids:
            pipe.delete(self._keys.payment(pid))
            pipe.hdel(self._keys.unrecorded(), pid)
        pipe.delete(self._keys.run_payments(run_id))
        pipe.execute()

    # ---- reporting ----------------------------------------------------------------------------------------

    def release_held(self) -> int:
        """Tokens held for costing more than a price cap go back to the pool (a person said so); how many."""
        pids: list[str] = self._store.lrange(self._keys.held(), 0, -1)
        if not pids:
            return 0
        pipe = self._store.pipeline(transaction=False)
        for pid in pids:
            pipe.hget(self._keys.payment(pid), "listing")
        by_listing: dict[str, list[str]] = {}
        for pid, listing in zip(pids, pipe.execute(), strict=True):
            by_listing.setdefault(str(listing or ""), []).append(pid)
        return sum(int(self._release_held([self._keys.held(), self._keys.pool(listing),
                                           *map(self._keys.payment, group)], group))
                   for listing, group in by_listing.items())

    def other_pools(self) -> dict[str, int]:
        """Tokens waiting in the pools of listings other than this process's, by listing (kept for them)."""
        keys: list[str] = []
        cursor = 0
        while True:
            cursor, batch = self._store.scan(cursor, match=self._keys.pools_pattern(), count=1000)
            keys += [str(k) for k in batch if k != self.pool_key]
            if not int(cursor):
                break
        if self.pool_listing:
            keys.append(self._keys.pool())
        found: dict[str, int] = {}
        for key in keys:
            count = int(self._store.llen(key))
            if count:
                first = self._store.lindex(key, 0)
                listing = str(self._store.hget(self._keys.payment(str(first)), "listing") or "") if first else ""
                name = listing or DEFAULT_LISTING
                found[name] = found.get(name, 0) + count
        return found

    def tokens_pooled(self) -> int:
        """Prepaid tokens waiting in this listing's pool."""
        return int(self._store.llen(self.pool_key))

    def totals(self, other_pools: dict[str, int] | None = None) -> dict[str, int]:
        """The wallet's counters; `other_pools` as other_pools() returned it, if the caller has it (a SCAN)."""
        raw: dict[str, str] = self._store.hgetall(self._keys.wallet_totals())
        totals = {k: int(v) for k, v in raw.items()}
        totals["pool"] = self.tokens_pooled()
        others = self.other_pools() if other_pools is None else other_pools
        totals["pool_other_listings"] = sum(others.values())
        totals["held"] = int(self._store.llen(self._keys.held()))
        totals["in_flight"] = int(self._store.zcard(self._keys.leases()))
        totals["unrecorded_answers"] = int(self._store.hlen(self._keys.unrecorded()))
        totals["spent_today_cents"] = self.budgets.spent_today()
        return totals


def _run_closed(run_id: str, held: bool) -> RunHeld | RunStopped:
    """What a refusal to lend or send for a run means to the chunk: park (paused) or wind down (ended)."""
    if held:
        return RunHeld(f"run {run_id} is paused: nothing is paid for it until `irlive resume {run_id}`")
    return RunStopped(f"run {run_id} is cancelled or failed: nothing more is paid for it")
