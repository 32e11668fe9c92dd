"""`x402`: each call paid by an EIP-3009 authorization signed for it; the payment method and the ledger's seller.

A signature plays the ledger's token: "bought" is a payment id committed against the run's and the day's caps
(no network, nothing pooled: a signature lives maxTimeoutSeconds), signed just before its call leaves, and
settled from the answer. What became of it is written on its ledger record (`x402_outcome`), so any process
can answer the ledger's reconciliation:

- a 2xx with PAYMENT-RESPONSE: settled (transaction, payer, nonce and amount kept);
- a 4xx/5xx with none, a 402 refusal, a request that never left: unsettled (the reference middleware settles
  only after a 2xx): the ledger releases the commitment, nothing is charged;
- no answer (a timeout, a dropped connection): the same payload, same payment identifier, is sent again until
  the seller answers it (the settled answer again, without a second charge) or the signature expires; after
  that, a probe signed anew under the same identifier with an empty body asks the seller: 409 (the identifier
  settled with another payload) means paid, 400 (the body refused, so past the payment check) means not, anything
  else is asked again later. Never a fresh identifier blindly. (That a seller looks the identifier up before it
  reads the body is what the reference middleware and the sandbox do; a seller that does otherwise would make
  400 say nothing, and the probe would have to change.)
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from worker.errors import (
    ChunkBusy,
    ConfigError,
    IrliveError,
    NeverSent,
    OutcomeUnknown,
    PaymentRejected,
    SignatureRefused,
    TransientError,
    WalletRefused,
)
from worker.keys import Keys
from worker.seams.marketplace import CallAnswer, Marketplace, Payment, Quote, RawAnswer, read_answer, scrub
from worker.seams.store import Store
from worker.seams.x402_signer import Offer, Signed, X402Signer, header_getter

log = logging.getLogger("irlive.money")
# The seller's offer is asked for again after this long (or at once when a 402 says it changed).
OFFER_TTL_S = 300.0
# An unanswered payment is sent again this often, while its signature is valid.
RESEND_EVERY_S = 1.0
# A signature this close to its validBefore is not sent again (clocks differ; the seller must verify it in time).
EXPIRY_MARGIN_S = 3.0
# An unanswered payment whose signature expires within this long is waited out in the call, so it is reconciled
# there and then; a longer-lived one is left `sent` for the sweep.
MAX_EXPIRY_WAIT_S = 90.0
# Reasons of a 402 that no new signature will change: a person must look at the wallet or the settings.
# (A recipient or amount mismatch is an offer that changed: it is read again and the retry signs anew.)
_WALLET_REASONS = ("insufficient_funds", "invalid_exact_evm_payload_signature", "invalid_network", "invalid_scheme",
                   "invalid_x402_version")
SETTLED, UNSETTLED = "settled", "unsettled"


class X402Payer:
    """Signs, sends and settles x402 calls; the ledger's Seller for them. One per worker process, thread-safe."""

    name = "x402"

    def __init__(self, market: Marketplace, signer: X402Signer | Callable[[], X402Signer], store: Store,
                 keys: Keys, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._market = market
        self.service_id = market.service_id
        self._signer_source = signer
        self._signer: X402Signer | None = signer if isinstance(signer, X402Signer) else None
        self._store = store
        self._keys = keys
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._offer: Offer | None = None
        self._offer_at = -OFFER_TTL_S
        # Called when the offer's price differs from a commitment: the ledger's purchaser quotes again.
        self.on_price_change: Callable[[], None] = lambda: None
        self._write = store.script("money", "x402_note")

    @property
    def signer(self) -> X402Signer:
        with self._lock:
            if self._signer is None:
                # Built at the first payment, not for a worker that never pays: the SDK is not free to import.
                source = self._signer_source
                assert not isinstance(source, X402Signer)
                self._signer = source()
            return self._signer

    # ---- the ledger's seller ------------------------------------------------------------------------------

    def quote(self) -> Quote:
        """The price of the offer the settings allow, in cents (ConfigError if none may be paid)."""
        return Quote(self.offer(refresh=True).price_cents, self.service_id)

    def create_payment(self) -> Payment:
        """A payment id to sign one call under (its payment-identifier): nothing leaves, nothing is paid yet."""
        offer = self.offer()
        payment_id = f"x402_{uuid.uuid4().hex}"
        return Payment(payment_id, offer.price_cents, "paid", 1, None, token=payment_id)

    def get_payment(self, payment_id: str) -> Payment:
        """What became of a payment id, from its ledger record, or (an unknown outcome whose signature expired)
        from the seller through the payment identifier. TransientError while that cannot be told yet."""
        record: dict[str, str] = self._store.hgetall(self._keys.payment(payment_id))
        if not record:
            # Settled and archived already (or never written): nothing here to settle again.
            raise TransientError(f"x402 payment {payment_id} has no ledger record")
        amount = int(record.get("amount_cents") or 0)
        outcome = record.get("x402_outcome", "")
        if not outcome:
            valid_before = int(record.get("x402_valid_before") or 0)
            if not valid_before:
                # Never signed (its worker stopped before): nothing can have been sent.
                outcome = UNSETTLED
            elif self._clock() < valid_before + EXPIRY_MARGIN_S:
                raise TransientError(f"x402 payment {payment_id}: its signature is still valid; asked again later")
            else:
                outcome = self._probe(payment_id)
        if outcome == SETTLED:
            return Payment(payment_id, amount, "exhausted", 0, None)
        return Payment(payment_id, amount, "paid", 1, None)

    # ---- the payment method -------------------------------------------------------------------------------

    def call(self, token: str, urls: list[str]) -> CallAnswer:
        """One call of `urls` paid by a signature made now under the payment id `token`."""
        payment_id = token
        offer = self.offer()
        committed = int(self._store.hget(self._keys.payment(payment_id), "amount_cents") or 0)
        if offer.price_cents > committed:
            # The offer costs more than the ledger committed for this call: nothing is signed above it.
            self._note(payment_id, x402_outcome=UNSETTLED)
            self.on_price_change()
            raise SignatureRefused(f"the seller now asks {offer.price_cents} cents per call, {committed} were "
                                   "committed for this one: nothing signed; the next purchase quotes again")
        signed = self.signer.sign(offer, payment_id)
        # Written down before it leaves: a process reconciling it later knows a signature was made and until when
        # it could be settled (the signature itself is never written).
        if not self._note(payment_id, x402_valid_before=signed.valid_before, x402_nonce=signed.nonce,
                          x402_payer=signed.payer, x402_amount=signed.amount, x402_network=offer.network):
            raise ChunkBusy(f"x402 payment {payment_id} has no ledger record any more: not sent")
        payload = {"Tasks": [{"ImageURL": u} for u in urls]}
        try:
            answer = self._market.post_tool(payload, {signed.header: signed.value})
        except (NeverSent, PaymentRejected, ConfigError):
            # Never sent (no connection; a header that cannot be sent), or no tool there (404/405): not settled.
            self._note(payment_id, x402_outcome=UNSETTLED)
            raise
        except OutcomeUnknown as exc:
            answer = self._resend(payment_id, signed, payload, exc)
        except IrliveError as exc:
            # An answer came and could not be taken in (larger than allowed): the seller may have settled.
            self._note(payment_id, x402_outcome=SETTLED, x402_answer="dropped")
            scrub(exc, signed.value, urls)
            raise
        return self._read(payment_id, signed, answer, urls)

    def _resend(self, payment_id: str, signed: Signed, payload: Any, first: OutcomeUnknown) -> RawAnswer:
        """The same signed payment again, while it is valid, until the seller answers it; OutcomeUnknown if not."""
        if signed.payment_id is None:
            log.warning("x402 payment %s: the seller offers no payment identifier; its outcome is reconciled "
                        "after the signature expires", payment_id)
        while self._clock() + RESEND_EVERY_S < signed.valid_before - EXPIRY_MARGIN_S:
            self._sleep(RESEND_EVERY_S)
            try:
                answer = self._market.post_tool(payload, {signed.header: signed.value})
            except (OutcomeUnknown, NeverSent):
                continue
            if answer.status == 402:
                # Its nonce held (the first request still served, or settled by a seller keeping no answers), or
                # a verdict on this signature only (expired by the seller's clock): nothing said about the first.
                continue
            log.info("x402 payment %s: answered %d when sent again", payment_id, answer.status)
            return answer
        # Past validBefore nobody can settle it any more: what the seller did is final, and the ledger's
        # reconciliation asks at once (a signature longer-lived than MAX_EXPIRY_WAIT_S is left to the sweep).
        left = signed.valid_before + EXPIRY_MARGIN_S - self._clock()
        if 0 < left <= MAX_EXPIRY_WAIT_S:
            self._sleep(left)
        raise OutcomeUnknown(f"{first}; not answered before the x402 signature expired")

    def _read(self, payment_id: str, signed: Signed, answer: RawAnswer, urls: list[str]) -> CallAnswer:
        settlement = self.signer.settlement(header_getter(answer.headers))
        if settlement is not None and settlement.success:
            self._note(payment_id, x402_outcome=SETTLED, x402_transaction=settlement.transaction,
                       x402_payer=settlement.payer or signed.payer)
        elif 200 <= answer.status < 300:
            # The reference middleware always says; a seller that does not may still have settled: counted paid.
            log.warning("x402 payment %s: a %d answer without a PAYMENT-RESPONSE; counted as settled", payment_id,
                        answer.status)
            self._note(payment_id, x402_outcome=SETTLED)
        elif answer.status == 409:
            # This identifier settled before with another payload: paid, and that answer is not this one.
            self._note(payment_id, x402_outcome=SETTLED)
            raise OutcomeUnknown(f"x402 payment {payment_id}: the seller says its identifier was paid with another "
                                 "payload")
        else:
            self._note(payment_id, x402_outcome=UNSETTLED)
            if answer.status == 402:
                raise self._refusal(_reason(answer))
        return read_answer(answer.status, answer.raw, signed.value, urls, retry_after=answer.retry_after)

    def _refusal(self, reason: str) -> IrliveError:
        shown = reason[:120] or "payment required"
        if any(r in reason for r in _WALLET_REASONS):
            return WalletRefused(f"the seller refuses the x402 payment of {self.signer.address}: {shown}")
        # The offer may have changed (price, address, timeout): asked again before the next signature.
        self.forget_offer()
        return SignatureRefused(f"the seller did not accept the x402 signature ({shown}); nothing was settled")

    def _probe(self, payment_id: str) -> str:
        """After its signature expired: was `payment_id` settled? Asked under the same identifier with an empty
        call (which no seller settles); 409 says the identifier was paid."""
        offer = self.offer()
        if not offer.identifier:
            # No way to ask: counted paid (charged, its answer lost), as a token whose answer was lost.
            log.warning("x402 payment %s: the seller offers no payment identifier to ask; counted as settled",
                        payment_id)
            self._note(payment_id, x402_outcome=SETTLED)
            return SETTLED
        signed = self.signer.sign(offer, payment_id)
        try:
            answer = self._market.post_tool({"Tasks": []}, {signed.header: signed.value})
        except IrliveError as exc:
            raise TransientError(f"x402 payment {payment_id}: the seller could not be asked ({type(exc).__name__})"
                                 ) from None
        settlement = self.signer.settlement(header_getter(answer.headers))
        if answer.status == 409 or 200 <= answer.status < 300 or (settlement and settlement.success):
            outcome = SETTLED
        elif answer.status == 400:
            # Past the payment check (the reference middleware and the sandbox look the identifier up before the
            # handler reads the body): the identifier was never paid.
            outcome = UNSETTLED
        else:
            # A 402 for the probe's own signature, a 5xx, a throttle: nothing said about the identifier.
            raise TransientError(f"x402 payment {payment_id}: the seller answered {answer.status} when asked; "
                                 "asked again later")
        log.info("x402 payment %s: the seller answered %d to the identifier: %s", payment_id, answer.status, outcome)
        self._note(payment_id, x402_outcome=outcome, x402_reconciled="identifier")
        return outcome

    # ---- the offer ---------------------------------------------------------------------------------------

    def offer(self, *, refresh: bool = False) -> Offer:
        with self._lock:
            if not refresh and self._offer is not None and time.monotonic() - self._offer_at < OFFER_TTL_S:
                return self._offer
        answer = self._market.offer()
        offer = self.signer.offer(header_getter(answer.headers), answer.raw)
        with self._lock:
            self._offer, self._offer_at = offer, time.monotonic()
        return offer

    def forget_offer(self) -> None:
        with self._lock:
            self._offer_at = -OFFER_TTL_S

    def _note(self, payment_id: str, **fields: str | int) -> bool:
        """Fields on the payment's ledger record (never a signature), if it still has one; held over Redis trouble
        like an answer. False if the record is gone (settled and archived meanwhile)."""
        args = [str(v) for pair in fields.items() for v in pair]
        return bool(self._store.persist(lambda: self._write([self._keys.payment(payment_id)], args), 600.0,
                                        f"x402 payment {payment_id}"))


def _reason(answer: RawAnswer) -> str:
    """The x402 error reason of a 402 answer (PAYMENT-REQUIRED's `error`, else the body's), '' if none."""
    header = header_getter(answer.headers)("PAYMENT-REQUIRED") or ""
    for text in (header, answer.raw):
        try:
            doc = json.loads(base64.b64decode(text, validate=True) if text is header else text)
        except (ValueError, binascii.Error, RecursionError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return str(doc["error"])[:200]
    return ""
