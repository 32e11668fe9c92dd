"""The x402 signing seam against the sandbox's own seller code: offers read from its 402 (v2 header, v1 body),
chosen by the settings, signed by the SDK, verified by the sandbox as its facilitator. No servers."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox.config import DEFAULT_PAY_TO
from sandbox.x402_seller import Offer as SellerOffer
from sandbox.x402_seller import verify
from worker.errors import ConfigError, TransientError
from worker.seams.x402_signer import X402Signer, header_getter

ROOT = Path(__file__).resolve().parents[1]
KEY = "0x" + "5d" * 32
SELLER = SellerOffer(service_id="infrared-face-liveness-detection", price_cents=20,
                     resource="http://127.0.0.1/api/tools/infrared-face-liveness-detection",
                     network="eip155:8453", pay_to=DEFAULT_PAY_TO, max_timeout_s=60)


def signer(**changes: object) -> X402Signer:
    settings: dict[str, object] = {"network": "eip155:8453", "assets": ("USDC",), "pay_to": None,
                                   "max_price_cents": 20, **changes}
    return X402Signer(KEY, **settings)  # type: ignore[arg-type]


def v2_answer(seller: SellerOffer = SELLER) -> tuple[dict[str, str], bytes]:
    return {"PAYMENT-REQUIRED": seller.v2_header("payment required")}, json.dumps(seller.v1_body("x")).encode()


def test_a_v2_offer_is_chosen_signed_with_the_payment_identifier_and_verifies_at_the_seller() -> None:
    payer = signer()
    headers, body = v2_answer()
    offer = payer.offer(header_getter(headers), body)
    assert (offer.version, offer.price_cents, offer.amount, offer.identifier) == (2, 20, 200_000, True)
    before = time.time()
    signed = payer.sign(offer, "x402_0123456789abcdef")
    assert signed.header == "PAYMENT-SIGNATURE" and signed.payment_id == "x402_0123456789abcdef"
    assert before + 50 <= signed.valid_before <= time.time() + 60, "validBefore within maxTimeoutSeconds"
    verified = verify(signed.value, 2, SELLER, time.time())
    assert verified.payer == payer.address == signed.payer and verified.nonce == signed.nonce.lower()
    assert verified.payment_id == "x402_0123456789abcdef" and verified.value == 200_000
    again = payer.sign(offer, "x402_0123456789abcdef")
    assert again.nonce != signed.nonce, "a fresh nonce for every signature"
    assert "5d5d5d" not in repr(signed) + repr(offer) and signed.value not in repr(signed)


def test_a_v1_only_seller_is_paid_from_the_body_with_x_payment() -> None:
    payer = signer()
    offer = payer.offer(header_getter({}), json.dumps(SELLER.v1_body("payment required")).encode())
    assert offer.version == 1 and offer.network == "eip155:8453" and not offer.identifier
    signed = payer.sign(offer, "x402_0123456789abcdef")
    assert signed.header == "X-PAYMENT" and signed.payment_id is None
    assert verify(signed.value, 1, SELLER, time.time()).payer == payer.address


@pytest.mark.parametrize(("changes", "why"), [
    ({"network": "eip155:84532"}, "IRLIVE_X402_NETWORK"),
    ({"assets": ("USDT",)}, "IRLIVE_X402_ASSETS"),
    ({"pay_to": "0x" + "77" * 20}, "IRLIVE_X402_PAY_TO"),
    ({"max_price_cents": 19}, "IRLIVE_MAX_PRICE_CENTS"),
])
def test_an_offer_the_settings_do_not_allow_is_refused_saying_which(changes: dict[str, object], why: str) -> None:
    headers, body = v2_answer()
    with pytest.raises(ConfigError, match=why):
        signer(**changes).offer(header_getter(headers), body)


def test_an_unreadable_402_is_transient_and_settlements_are_read_from_either_header() -> None:
    payer = signer()
    with pytest.raises(TransientError):
        payer.offer(header_getter({"PAYMENT-REQUIRED": "not base64!"}), b"<html>")
    doc = {"success": True, "transaction": "0x" + "ab" * 32, "network": "eip155:8453", "payer": payer.address}
    value = base64.b64encode(json.dumps(doc).encode()).decode()
    for name in ("PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE", "payment-response"):
        found = payer.settlement(header_getter({name: value}))
        assert found is not None and found.success and found.transaction == doc["transaction"]
    assert payer.settlement(header_getter({})) is None
    garbled = payer.settlement(header_getter({"PAYMENT-RESPONSE": "%%%"}))
    assert garbled is not None and garbled.success and garbled.transaction == "", "counted as possibly settled"


def test_a_bad_key_is_refused_without_quoting_it() -> None:
    with pytest.raises(ConfigError) as info:
        X402Signer("0x" + "00" * 32, network="eip155:8453", assets=("USDC",), pay_to=None, max_price_cents=20)
    assert "00000000" not in str(info.value)


def test_signing_puts_python_s_recursion_limit_back() -> None:
    """py_ecc (under eth-account) raises it to 100000 on import; the seam restores it (a fresh interpreter, so
    the import really happens here)."""
    code = ("import sys, json; before = sys.getrecursionlimit()\n"
            "from tests.test_x402_signer import signer, v2_answer\n"
            "from worker.seams.x402_signer import header_getter\n"
            "p = signer(); h, b = v2_answer(); p.sign(p.offer(header_getter(h), b), None)\n"
            "print(json.dumps([before, sys.getrecursionlimit(), 'py_ecc' in str(sys.modules.keys())]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=True)
    before, after, imported = json.loads(done.stdout)
    assert imported and after == before
