"""The x402 payer's signing seam: reads a seller's 402 offer, picks what the settings allow, signs with the SDK.

The only module that imports the official `x402` SDK and `eth-account` (lazily, at the first use: py_ecc under
eth-account raises the recursion limit on import, and it is put back). Their exceptions are translated here; no
message carries the key or a signature.
"""

from __future__ import annotations

import copy
import math
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.config import Settings, is_private_key, missing_extra
from worker.errors import ConfigError, TransientError

# The header a payment goes out in, by x402 version.
V2_HEADER = "PAYMENT-SIGNATURE"
V1_HEADER = "X-PAYMENT"
PAYMENT_IDENTIFIER = "payment-identifier"

_IMPORT_LOCK = threading.Lock()
_SDK: dict[str, Any] = {}


def _sdk() -> dict[str, Any]:
    """The SDK's pieces, imported once, with Python's recursion limit put back afterwards (py_ecc sets it to
    100000, after which a deep recursion crashes the interpreter instead of raising RecursionError)."""
    with _IMPORT_LOCK:
        if not _SDK:
            limit = sys.getrecursionlimit()
            try:
                from eth_account import Account
                from x402 import x402ClientSync
                from x402.extensions.payment_identifier import append_payment_identifier_to_extensions
                from x402.http.x402_http_client import x402HTTPClientSync
                from x402.mechanisms.evm.default_assets import find_default_asset
                from x402.mechanisms.evm.exact.register import register_exact_evm_client
                from x402.mechanisms.evm.signers import EthAccountSigner
                from x402.mechanisms.evm.v1.constants import V1_NETWORK_CHAIN_IDS
                from x402.schemas import PaymentRequired, PaymentRequiredV1
            except ImportError:
                raise ConfigError(missing_extra("x402") or "the x402 SDK cannot be imported") from None
            finally:
                sys.setrecursionlimit(limit)
            _SDK.update(Account=Account, Client=x402ClientSync, Http=x402HTTPClientSync,
                        register=register_exact_evm_client, Signer=EthAccountSigner,
                        find_default_asset=find_default_asset, V1_CHAINS=V1_NETWORK_CHAIN_IDS,
                        append_id=append_payment_identifier_to_extensions, PaymentRequired=PaymentRequired,
                        PaymentRequiredV1=PaymentRequiredV1)
        return _SDK


@dataclass(frozen=True)
class Offer:
    """One `accepts[]` entry the settings allow, with its price in cents; `required` is the seller's 402 narrowed
    to it (what the SDK signs from)."""

    version: int
    price_cents: int
    amount: int
    network: str
    asset: str
    pay_to: str
    max_timeout_s: int
    # Whether the seller declared the payment-identifier extension (a retry with the same id is answered again).
    identifier: bool
    required: Any = field(repr=False)


@dataclass(frozen=True)
class Signed:
    """One signed authorization, ready to send; `value` (the signature inside) is never printed or stored."""

    header: str
    value: str = field(repr=False)
    payer: str
    nonce: str
    amount: int
    valid_before: int
    payment_id: str | None


@dataclass(frozen=True)
class Settlement:
    """The seller's PAYMENT-RESPONSE: whether it settled, and on which transaction (empty if unreadable)."""

    success: bool
    transaction: str
    payer: str
    network: str
    error_reason: str


def read_key(settings: Settings) -> str:
    """The payer's key from IRLIVE_X402_PRIVATE_KEY or the file IRLIVE_X402_KEY_FILE names; ConfigError (never
    quoting the file's content) if it is missing or not a key."""
    if settings.x402_private_key:
        return settings.x402_private_key.strip()
    if not settings.x402_key_file:
        raise ConfigError("IRLIVE_PAYMENT_METHOD=x402 needs IRLIVE_X402_KEY_FILE or IRLIVE_X402_PRIVATE_KEY")
    try:
        text = Path(settings.x402_key_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"IRLIVE_X402_KEY_FILE={settings.x402_key_file!r} cannot be read "
                          f"({type(exc).__name__})") from None
    if not is_private_key(text):
        raise ConfigError(f"IRLIVE_X402_KEY_FILE={settings.x402_key_file!r} does not hold a private key (64 hex "
                          "digits, 0x optional, alone in the file)")
    return text


class X402Signer:
    """Signs EIP-3009 authorizations for one payer through the SDK's exact-EVM client; thread-safe."""

    def __init__(self, key: str, *, network: str, assets: tuple[str, ...], pay_to: str | None,
                 max_price_cents: int) -> None:
        sdk = _sdk()
        try:
            account = sdk["Account"].from_key(key)
        except Exception:  # eth-account raises several types; their text may quote the key
            raise ConfigError("the x402 private key is not a usable secp256k1 key") from None
        client = sdk["Client"]()
        # irlive enforces its own price cap (IRLIVE_MAX_PRICE_CENTS) before signing; the SDK's default cap
        # would refuse silently with another number.
        client.set_spend_controls(False)
        sdk["register"](client, sdk["Signer"](account))
        self._client = client
        self._http = sdk["Http"](client)
        self.address: str = str(account.address)
        self._network = network
        self._assets = {a.lower() for a in assets}
        self._pay_to = pay_to.lower() if pay_to else None
        self._max_price = max_price_cents
        self._lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings) -> X402Signer:
        return cls(read_key(settings), network=settings.x402_network, assets=settings.x402_assets,
                   pay_to=settings.x402_pay_to, max_price_cents=settings.max_price_cents)

    def offer(self, get_header: Callable[[str], str | None], body: bytes) -> Offer:
        """The entry of a 402 answer to pay (v2 header first, else the v1 body): the cheapest the settings allow.
        TransientError if the answer carries no readable offer; ConfigError if no entry may be paid."""
        sdk = _sdk()
        try:
            required = self._http.get_payment_required_response(get_header, body)
        except Exception:  # ValueError, pydantic's ValidationError, binascii errors: the seller's 402 is unreadable
            raise TransientError("the seller's 402 answer carries no readable x402 offer") from None
        version = int(required.x402_version)
        allowed: list[Offer] = []
        refused: list[str] = []
        for entry in required.accepts:
            why, offer = self._judge(sdk, version, entry, required)
            if offer is not None:
                allowed.append(offer)
            else:
                refused.append(why)
        if not allowed:
            raise ConfigError("no x402 payment option the settings allow: " + "; ".join(refused or ["none offered"]))
        return min(allowed, key=lambda o: o.amount)

    def _judge(self, sdk: dict[str, Any], version: int, entry: Any, required: Any) -> tuple[str, Offer | None]:
        network = str(entry.network)
        if version == 1:
            chain = sdk["V1_CHAINS"].get(network)
            network = f"eip155:{chain}" if chain is not None else network
        shown = f"{entry.scheme} on {network}, asset {entry.asset}, to {entry.pay_to}"
        if entry.scheme != "exact":
            return f"{shown}: only the exact scheme is signed", None
        if network != self._network:
            return f"{shown}: IRLIVE_X402_NETWORK is {self._network}", None
        if (entry.extra or {}).get("assetTransferMethod", "eip3009") != "eip3009":
            return f"{shown}: only EIP-3009 transfers are signed", None
        asset = sdk["find_default_asset"](str(entry.asset), network)
        if asset is None or not ({str(asset["symbol"]).lower(), str(asset["asset"]).lower()} & self._assets):
            return f"{shown}: not in IRLIVE_X402_ASSETS ({', '.join(sorted(self._assets))})", None
        if self._pay_to is not None and str(entry.pay_to).lower() != self._pay_to:
            return f"{shown}: IRLIVE_X402_PAY_TO is {self._pay_to}", None
        try:
            amount = int(entry.get_amount())
        except ValueError:
            return f"{shown}: an amount that is not a whole number of units", None
        # USD-pegged assets only (the SDK's default assets): cents from atomic units, rounded up.
        cents = math.ceil(amount * 100 / 10 ** int(asset["decimals"]))
        if cents > self._max_price:
            return (f"{shown}: {cents} cents per call; IRLIVE_MAX_PRICE_CENTS allows {self._max_price}: raise it "
                    "if that price is acceptable"), None
        if version == 1:
            narrowed = sdk["PaymentRequiredV1"](accepts=[entry])
            identifier = False
        else:
            narrowed = sdk["PaymentRequired"](resource=required.resource, accepts=[entry],
                                              extensions=required.extensions)
            identifier = PAYMENT_IDENTIFIER in (required.extensions or {})
        return "", Offer(version, cents, amount, network, str(entry.asset), str(entry.pay_to),
                         int(entry.max_timeout_seconds), identifier, narrowed)

    def sign(self, offer: Offer, payment_id: str | None) -> Signed:
        """A fresh authorization (random nonce, validBefore within maxTimeoutSeconds) for `offer`, naming
        `payment_id` where the seller declared the payment-identifier extension."""
        sdk = _sdk()
        extensions = None
        named = payment_id if offer.identifier else None
        if named is not None:
            extensions = sdk["append_id"](copy.deepcopy(dict(offer.required.extensions or {})), named)
        try:
            with self._lock:
                if offer.version == 1:
                    payload = self._client.create_payment_payload(offer.required)
                else:
                    payload = self._client.create_payment_payload(offer.required, extensions=extensions)
                headers = self._http.encode_payment_signature_header(payload)
        except Exception as exc:  # the SDK's selection and signing errors; none carries the key
            raise ConfigError(f"the x402 SDK could not sign a payment for this offer ({type(exc).__name__})") from None
        authorization = payload.payload.get("authorization") or {}
        ((header, value),) = headers.items()
        return Signed(header=header, value=value, payer=str(authorization.get("from", self.address)),
                      nonce=str(authorization.get("nonce", "")), amount=int(authorization.get("value", offer.amount)),
                      valid_before=int(authorization.get("validBefore", 0)), payment_id=named)

    def settlement(self, get_header: Callable[[str], str | None]) -> Settlement | None:
        """The PAYMENT-RESPONSE (or v1 X-PAYMENT-RESPONSE) of an answer; None when the answer has none. One that is
        there but unreadable counts as a success without a transaction: the seller may have settled."""
        if not (get_header("PAYMENT-RESPONSE") or get_header("X-PAYMENT-RESPONSE")):
            return None
        try:
            found = self._http.get_payment_settle_response(get_header)
        except Exception:
            return Settlement(True, "", "", "", "unreadable PAYMENT-RESPONSE")
        return Settlement(bool(found.success), str(found.transaction or ""), str(found.payer or ""),
                          str(found.network or ""), str(found.error_reason or ""))


def header_getter(headers: Mapping[str, str]) -> Callable[[str], str | None]:
    """Case-insensitive header lookup over a plain mapping."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return lambda name: lowered.get(name.lower())
