"""The sandbox's money book: 402 offers, payments, single-use tokens, and the oracle counters tests read."""

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
)


# USDC on Base Sepolia: 6 decimals, so one cent is 10_000 units.
_NETWORK = "base-sepolia"
_ASSET = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
_PAY_TO = "0x000000000000000000000000000000000000402a"


def x402_offer(service_id: str, price_cents: int, resource: str, error: str) -> dict[str, Any]:
    """The 402 body (x402 v1 style) that tells a caller what to pay, and why this call was refused."""
    units = str(price_cents * 10_000)
    return {
        "x402Version": 1,
        "error": error,
        "accepts": [
            {
                "scheme": "exact",
                "network": _NETWORK,
                "maxAmountRequired": units,
                "amount": units,
                "payTo": _PAY_TO,
                "asset": _ASSET,
                "resource": resource,
                "description": "Infrared face liveness detection (Alibaba Cloud DetectInfraredLivingFace)",
                "mimeType": "application/json",
                "maxTimeoutSeconds": 60,
                "extra": {"name": "USDC", "version": "2", "serviceId": service_id},
            }
        ],
        "serviceId": service_id,
        "priceCents": price_cents,
        "currency": "USD",
    }


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


class TokenRefused(Exception):
    """A payment token that cannot pay for a call; the message says why, for the 402 body."""


@dataclass
class Ledger:
    """All mutable money state behind one lock, so a token can never be accepted by two calls at once."""

    counts: Counter[str] = field(default_factory=Counter)
    billed_paths: Counter[str] = field(default_factory=Counter)
    payments: dict[str, Payment] = field(default_factory=dict)
    by_token: dict[str, Payment] = field(default_factory=dict)
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

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            doc: dict[str, Any] = {name: self.counts[name] for name in COUNTERS}
            doc["billed_image_urls_path_counts"] = dict(self.billed_paths)
            doc["token_uses"] = max((p.billed_uses for p in self.payments.values()), default=0)
            return doc

    def reset(self) -> None:
        with self.lock:
            self.counts.clear()
            self.billed_paths.clear()
            self.payments.clear()
            self.by_token.clear()

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
