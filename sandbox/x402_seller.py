"""The sandbox as its own x402 seller and facilitator: offers, EIP-3009 payload verification, settlement headers."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.config import X402_NETWORKS, SandboxConfig

__all__ = [
    "ERR_NONCE_USED",
    "REQUEST_HEADERS",
    "Offer",
    "Verified",
    "X402Refused",
    "offer_for",
    "settlement_header",
    "transaction_hash",
    "verify",
]

# Header a payment comes in -> the x402 version it must carry, and the header its settlement answer goes out in.
REQUEST_HEADERS: dict[str, tuple[int, str]] = {
    "PAYMENT-SIGNATURE": (2, "PAYMENT-RESPONSE"),
    "X-PAYMENT": (1, "X-PAYMENT-RESPONSE"),
}
# Error reasons as the x402 spec and the reference facilitators name them; the SDK's own names where the spec has
# none (a reused nonce), so a client that maps reasons finds the one it knows.
ERR_PAYLOAD = "invalid_payload"
ERR_VERSION = "invalid_x402_version"
ERR_SCHEME = "invalid_scheme"
ERR_NETWORK = "invalid_network"
ERR_RECIPIENT = "invalid_exact_evm_payload_recipient_mismatch"
ERR_VALUE = "invalid_exact_evm_payload_authorization_value"
ERR_VALID_BEFORE = "invalid_exact_evm_payload_authorization_valid_before"
ERR_VALID_AFTER = "invalid_exact_evm_payload_authorization_valid_after"
ERR_SIGNATURE = "invalid_exact_evm_payload_signature"
ERR_NONCE_USED = "invalid_exact_evm_nonce_already_used"
# USDC has 6 decimals: one US cent is 10_000 atomic units.
UNITS_PER_CENT = 10_000
PAYMENT_IDENTIFIER = "payment-identifier"
_PAYMENT_ID = re.compile(r"[A-Za-z0-9_-]{16,128}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_UINT = re.compile(r"[0-9]{1,78}")
# Optional idempotency: a client may name its payment, and a retry with the same name gets the same answer.
_PAYMENT_IDENTIFIER_DECLARATION = {
    "info": {"required": False},
    "schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "required": {"type": "boolean"},
            "id": {"type": "string", "minLength": 16, "maxLength": 128, "pattern": "^[a-zA-Z0-9_-]+$"},
        },
        "required": ["required"],
    },
}
_DESCRIPTION = "Infrared face liveness detection (Alibaba Cloud DetectInfraredLivingFace)"
_AUTHORIZATION_TYPES = {
    "EIP712Domain": [
        {"name": "name", "type": "string"},
        {"name": "version", "type": "string"},
        {"name": "chainId", "type": "uint256"},
        {"name": "verifyingContract", "type": "address"},
    ],
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ],
}


_ETH_LOCK = threading.Lock()
_ETH: list[tuple[Callable[..., Any], Callable[..., Any]]] = []


def _eth_account() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """eth-account's (Account.recover_message, encode_typed_data), imported on first use with the recursion limit
    put back: its py_ecc dependency raises the limit to 100000 on import, and with that a deeply nested hostile JSON
    payload overflows a handler thread's C stack (a crash of the whole sandbox) instead of raising RecursionError."""
    with _ETH_LOCK:
        if not _ETH:
            limit = sys.getrecursionlimit()
            try:
                from eth_account import Account
                from eth_account.messages import encode_typed_data
            finally:
                sys.setrecursionlimit(limit)
            _ETH.append((Account.recover_message, encode_typed_data))
        return _ETH[0]


class X402Refused(Exception):
    """A payment payload the sandbox will not accept; `reason` is the x402 error reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Offer:
    """What one listing asks to be paid, on the network and address the sandbox is configured with."""

    service_id: str
    price_cents: int
    resource: str
    network: str
    pay_to: str
    max_timeout_s: int

    @property
    def amount(self) -> int:
        return self.price_cents * UNITS_PER_CENT

    @property
    def v1_network(self) -> str:
        return X402_NETWORKS[self.network][0]

    @property
    def asset(self) -> str:
        return X402_NETWORKS[self.network][1]

    @property
    def chain_id(self) -> int:
        return int(self.network.split(":", 1)[1])

    def extra(self) -> dict[str, Any]:
        return {"name": X402_NETWORKS[self.network][2], "version": "2"}

    def v1_body(self, error: str) -> dict[str, Any]:
        """The 402 body (x402 v1, plus the marketplace's service id and price in cents)."""
        units = str(self.amount)
        return {
            "x402Version": 1,
            "error": error,
            "accepts": [
                {
                    "scheme": "exact",
                    "network": self.v1_network,
                    "maxAmountRequired": units,
                    "amount": units,
                    "payTo": self.pay_to,
                    "asset": self.asset,
                    "resource": self.resource,
                    "description": _DESCRIPTION,
                    "mimeType": "application/json",
                    "maxTimeoutSeconds": self.max_timeout_s,
                    "extra": {**self.extra(), "serviceId": self.service_id},
                }
            ],
            "serviceId": self.service_id,
            "priceCents": self.price_cents,
            "currency": "USD",
        }

    def v2_header(self, error: str) -> str:
        """The PAYMENT-REQUIRED header value (x402 v2, base64 JSON)."""
        doc = {
            "x402Version": 2,
            "error": error,
            "resource": {"url": self.resource, "description": _DESCRIPTION, "mimeType": "application/json"},
            "accepts": [
                {
                    "scheme": "exact",
                    "network": self.network,
                    "amount": str(self.amount),
                    "asset": self.asset,
                    "payTo": self.pay_to,
                    "maxTimeoutSeconds": self.max_timeout_s,
                    "extra": self.extra(),
                }
            ],
            "extensions": {PAYMENT_IDENTIFIER: _PAYMENT_IDENTIFIER_DECLARATION},
        }
        return _b64json(doc)


def offer_for(config: SandboxConfig, service_id: str, resource: str) -> Offer:
    return Offer(
        service_id=service_id,
        price_cents=config.price_cents,
        resource=resource,
        network=config.x402_network,
        pay_to=config.x402_pay_to,
        max_timeout_s=config.x402_max_timeout_s,
    )


@dataclass(frozen=True)
class Verified:
    """A payload that verified: who pays, with which nonce; `digest` identifies the payload without keeping it."""

    version: int
    payer: str
    nonce: str
    value: int
    digest: str
    payment_id: str | None
    # Past this (unix seconds) the authorization cannot be settled: a chain refuses transferWithAuthorization.
    valid_before: int = 0


def verify(header: str, version: int, offer: Offer, now: float) -> Verified:
    """Check a payment header as a facilitator would, short of the chain: X402Refused names the first fault.

    The nonce is not checked here: whether it was seen before is the ledger's to say, under its lock."""
    doc = _decode(header)
    if doc.get("x402Version") != version:
        raise X402Refused(ERR_VERSION)
    if version == 2:
        accepted = doc.get("accepted")
        if not isinstance(accepted, dict):
            raise X402Refused(ERR_PAYLOAD)
        scheme, network, wanted_network = accepted.get("scheme"), accepted.get("network"), offer.network
    else:
        scheme, network, wanted_network = doc.get("scheme"), doc.get("network"), offer.v1_network
    if scheme != "exact":
        raise X402Refused(ERR_SCHEME)
    if network != wanted_network:
        raise X402Refused(ERR_NETWORK)
    payload = doc.get("payload")
    authorization = payload.get("authorization") if isinstance(payload, dict) else None
    signature = payload.get("signature") if isinstance(payload, dict) else None
    if not isinstance(authorization, dict) or not isinstance(signature, str):
        raise X402Refused(ERR_PAYLOAD)
    payer, to, value, valid_after, valid_before, nonce = _authorization(authorization)
    if to.lower() != offer.pay_to.lower():
        raise X402Refused(ERR_RECIPIENT)
    if value < offer.amount:
        raise X402Refused(ERR_VALUE)
    if valid_before <= now:
        raise X402Refused(ERR_VALID_BEFORE)
    if valid_after > now:
        raise X402Refused(ERR_VALID_AFTER)
    message = {
        "from": payer,
        "to": to,
        "value": value,
        "validAfter": valid_after,
        "validBefore": valid_before,
        "nonce": bytes.fromhex(nonce[2:]),
    }
    # The domain is the sandbox's own asset and chain, not what the payload claims: a signature made for another
    # token or chain must not recover to the payer here.
    domain = {**offer.extra(), "chainId": offer.chain_id, "verifyingContract": offer.asset}
    typed = {
        "types": _AUTHORIZATION_TYPES,
        "primaryType": "TransferWithAuthorization",
        "domain": domain,
        "message": message,
    }
    recover_message, encode_typed_data = _eth_account()
    try:
        signer = recover_message(encode_typed_data(full_message=typed), signature=signature)
    except Exception as exc:  # eth-account raises several unrelated types for a malformed signature
        raise X402Refused(ERR_SIGNATURE) from exc
    if str(signer).lower() != payer.lower():
        raise X402Refused(ERR_SIGNATURE)
    return Verified(
        version=version,
        payer=payer,
        nonce=nonce.lower(),
        value=value,
        digest=hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest(),
        payment_id=_payment_id(doc),
        valid_before=valid_before,
    )


def transaction_hash(offer: Offer, verified: Verified) -> str:
    """A fake but stable 0x… transaction hash: one authorization settles as one transaction."""
    seed = f"sandbox-settlement:{offer.network}:{offer.asset.lower()}:{verified.payer.lower()}:{verified.nonce}"
    return "0x" + hashlib.sha256(seed.encode()).hexdigest()


def settlement_header(offer: Offer, verified: Verified, transaction: str) -> tuple[str, str]:
    """The settlement answer's header name (v1 or v2, as the payment came) and value."""
    name = next(out for version, out in REQUEST_HEADERS.values() if version == verified.version)
    network = offer.network if verified.version == 2 else offer.v1_network
    doc = {"success": True, "transaction": transaction, "network": network, "payer": verified.payer}
    return name, _b64json(doc)


def _decode(header: str) -> dict[str, Any]:
    try:
        doc = json.loads(base64.b64decode(header.strip(), validate=True))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise X402Refused(ERR_PAYLOAD) from exc
    if not isinstance(doc, dict):
        raise X402Refused(ERR_PAYLOAD)
    return doc


def _authorization(doc: dict[str, Any]) -> tuple[str, str, int, int, int, str]:
    """(from, to, value, validAfter, validBefore, nonce), each checked for shape; decimal strings as the spec has."""
    payer, to, nonce = doc.get("from"), doc.get("to"), doc.get("nonce")
    numbers = [doc.get(key) for key in ("value", "validAfter", "validBefore")]
    if not (
        isinstance(payer, str)
        and _ADDRESS.fullmatch(payer)
        and isinstance(to, str)
        and _ADDRESS.fullmatch(to)
        and isinstance(nonce, str)
        and _NONCE.fullmatch(nonce)
        and all(isinstance(n, str) and _UINT.fullmatch(n) for n in numbers)
    ):
        raise X402Refused(ERR_PAYLOAD)
    value, valid_after, valid_before = (int(str(n)) for n in numbers)
    return payer, to, value, valid_after, valid_before, nonce


def _payment_id(doc: dict[str, Any]) -> str | None:
    extensions = doc.get("extensions")
    entry = extensions.get(PAYMENT_IDENTIFIER) if isinstance(extensions, dict) else None
    info = entry.get("info") if isinstance(entry, dict) else None
    found = info.get("id") if isinstance(info, dict) else None
    if found is None:
        return None
    if not isinstance(found, str) or not _PAYMENT_ID.fullmatch(found):
        raise X402Refused(ERR_PAYLOAD)
    return found


def _b64json(doc: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()
