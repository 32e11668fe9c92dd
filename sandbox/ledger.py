"""The sandbox's money book: payments, single-use tokens, x402 nonces and settlements, and the oracle counters."""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

COUNTERS: tuple[str, ...] = (
    "payments_created",
    "tokens_consumed",
    "tokens_restored",
    "calls_total",
    "calls_billed",
    "images_billed",
    "throttled",
    "rejected_402",
    "rejected_400",
    "rejected_401",
    "upstream_errors",
    "errors_5xx",
    "timeouts",
    "succeeded",
    "x402_settled",
    "x402_refused",
    "x402_unsettled",
    "mcp_calls",
)


def iso_utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Payment:
    """One purchase of one call; `billed_uses` counts accepted calls that were not refunded."""

    payment_id: str
    token: str
    service_id: str
    amount_cents: int
    created_at: float
    expires_at: float
    remaining_calls: int = 1
    billed_uses: int = 0

    def status(self, now: float) -> str:
        if self.remaining_calls <= 0:
            return "exhausted"
        return "expired" if now >= self.expires_at else "paid"

    def public(self, now: float, with_token: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "paymentId": self.payment_id,
            "serviceId": self.service_id,
            "amountCents": self.amount_cents,
            "currency": "USD",
            "status": self.status(now),
            "maxCalls": 1,
            "remainingCalls": self.remaining_calls,
            "expiresAt": iso_utc(self.expires_at),
            "paidAt": iso_utc(self.created_at),
        }
        # Only the creating answer carries the token: a read-back must not leak a spendable secret.
        if with_token:
            doc["token"] = self.token
        return doc


@dataclass(frozen=True)
class Settlement:
    """One x402 payment settled after a 2xx answer: what a chain would show, never the signature."""

    payer: str
    transaction: str
    amount: int
    network: str
    service_id: str
    settled_at: float

    def public(self) -> dict[str, Any]:
        return {
            "payer": self.payer,
            "transaction": self.transaction,
            "amount": str(self.amount),
            "network": self.network,
            "serviceId": self.service_id,
            "settledAt": iso_utc(self.settled_at),
        }


@dataclass(frozen=True)
class CachedAnswer:
    """A settled x402 answer kept for the payment-identifier extension: a retry with the same id gets it again."""

    digest: str
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...]


class TokenRefused(Exception):
    """A payment token that cannot pay for a call; the message says why, for the 402 body."""


@dataclass
class Ledger:
    """All mutable money state behind one lock, so a token can never be accepted by two calls at once."""

    counts: Counter[str] = field(default_factory=Counter)
    billed_paths: Counter[str] = field(default_factory=Counter)
    payments: dict[str, Payment] = field(default_factory=dict)
    by_token: dict[str, Payment] = field(default_factory=dict)
    # x402 nonces: in flight (verified, call running) and settled; a chain refuses a used nonce the same way.
    nonces_in_flight: set[str] = field(default_factory=set)
    nonces_settled: set[str] = field(default_factory=set)
    settlements: list[Settlement] = field(default_factory=list)
    answers_by_payment_id: dict[str, CachedAnswer] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def create_payment(self, service_id: str, amount_cents: int, ttl_s: float) -> dict[str, Any]:
        now = time.time()
        payment = Payment(
            payment_id="pay_" + secrets.token_hex(12),
            token="ptk_" + secrets.token_urlsafe(24),
            service_id=service_id,
            amount_cents=amount_cents,
            created_at=now,
            expires_at=now + ttl_s,
        )
        with self.lock:
            self.payments[payment.payment_id] = payment
            self.by_token[payment.token] = payment
            self.counts["payments_created"] += 1
        return payment.public(now, with_token=True)

    def read_payment(self, payment_id: str) -> dict[str, Any] | None:
        with self.lock:
            payment = self.payments.get(payment_id)
            return None if payment is None else payment.public(time.time(), with_token=False)

    def check(self, token: str, service_id: str) -> None:
        """Refuse a token that could not pay for a call to `service_id` now; consume() checks again under the lock."""
        with self.lock:
            self._usable(token, service_id)

    def consume(self, token: str, service_id: str, image_paths: list[str]) -> Payment:
        """Settle first: spend the token and bill the call before the upstream runs."""
        with self.lock:
            payment = self._usable(token, service_id)
            payment.remaining_calls -= 1
            payment.billed_uses += 1
            self.counts["tokens_consumed"] += 1
            self.counts["calls_billed"] += 1
            self.counts["images_billed"] += len(image_paths)
            self.billed_paths.update(image_paths)
            return payment

    def restore(self, payment: Payment, image_paths: list[str]) -> None:
        """Refund a failed call: the token can pay again and the call no longer counts as billed."""
        with self.lock:
            payment.remaining_calls += 1
            payment.billed_uses -= 1
            self.counts["tokens_restored"] += 1
            self.counts["calls_billed"] -= 1
            self.counts["images_billed"] -= len(image_paths)
            self.billed_paths.subtract(image_paths)
            for path in image_paths:
                if self.billed_paths[path] <= 0:
                    del self.billed_paths[path]

    def reserve_nonce(self, nonce: str) -> bool:
        """Hold an x402 nonce for one call; False if it settled before or another call holds it."""
        with self.lock:
            if nonce in self.nonces_in_flight or nonce in self.nonces_settled:
                return False
            self.nonces_in_flight.add(nonce)
            return True

    def release_nonce(self, nonce: str) -> None:
        """An unsettled call gives its nonce back: on a chain the authorization would still be unspent."""
        with self.lock:
            self.nonces_in_flight.discard(nonce)

    def settle_x402(self, nonce: str, settlement: Settlement, image_paths: list[str]) -> None:
        """Settle after a 2xx answer: the nonce is spent for good and the call is billed like a token's."""
        with self.lock:
            self.nonces_in_flight.discard(nonce)
            self.nonces_settled.add(nonce)
            self.settlements.append(settlement)
            self.counts["x402_settled"] += 1
            self.counts["calls_billed"] += 1
            self.counts["images_billed"] += len(image_paths)
            self.billed_paths.update(image_paths)

    def cached_answer(self, payment_id: str) -> CachedAnswer | None:
        with self.lock:
            return self.answers_by_payment_id.get(payment_id)

    def cache_answer(self, payment_id: str, answer: CachedAnswer) -> None:
        with self.lock:
            self.answers_by_payment_id.setdefault(payment_id, answer)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            doc: dict[str, Any] = {name: self.counts[name] for name in COUNTERS}
            doc["billed_image_urls_path_counts"] = dict(self.billed_paths)
            doc["token_uses"] = max((p.billed_uses for p in self.payments.values()), default=0)
            doc["x402_settlements"] = [s.public() for s in self.settlements]
            return doc

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.billed_paths.clear()
            self.payments.clear()
            self.by_token.clear()
            self.nonces_in_flight.clear()
            self.nonces_settled.clear()
            self.settlements.clear()
            self.answers_by_payment_id.clear()

    def _usable(self, token: str, service_id: str) -> Payment:
        payment = self.by_token.get(token)
        if payment is None:
            raise TokenRefused("payment token unknown")
        # A strict seller binds a token to the listing it was bought for; refusing it here spends nothing.
        if payment.service_id != service_id:
            raise TokenRefused(
                f"payment token was bought for another service ({payment.service_id!r}), not {service_id!r}"
            )
        if payment.remaining_calls <= 0:
            raise TokenRefused("payment token already used")
        if time.time() >= payment.expires_at:
            raise TokenRefused("payment token expired")
        return payment
