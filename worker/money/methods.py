"""Ways of paying for one call: the payment-method seam, one implementation per way the listing accepts.

Every method spends a token the ledger lent and returns the call's answer or raises the error tree, which
worker/outcomes.py maps to actions; the ledger, budgets and reconciliation see only this protocol. The token
methods buy and reconcile through POST/GET /api/payments; x402 (worker/money/x402.py) is its own seller: its
"token" is a payment id committed by the ledger and signed for at the call.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

from worker.config import Settings
from worker.errors import IrliveError, TransientError
from worker.seams.marketplace import (
    MAX_ANSWER_BYTES,
    TOO_LARGE,
    CallAnswer,
    Endpoint,
    Marketplace,
    read_answer,
    scrub,
)

if TYPE_CHECKING:
    from worker.keys import Keys
    from worker.money.purchaser import Seller
    from worker.seams.mcp_tool import McpTool
    from worker.seams.store import Store


class PaymentMethod(Protocol):
    """Sends one paid call for up to 10 image URLs with a lent token."""

    name: str

    def call(self, token: str, urls: list[str]) -> CallAnswer: ...


class TokenOverHttp:
    """`token`: the tool's HTTP endpoint, the token in `X-Payment-Token`."""

    name = "token"

    def __init__(self, market: Marketplace) -> None:
        self._market = market

    def call(self, token: str, urls: list[str]) -> CallAnswer:
        return self._market.call(token, urls)


class TokenOverMcp:
    """`mcp-token`: the marketplace's MCP tool (`tools/call` with `paymentToken`), through the official SDK."""

    name = "mcp-token"

    def __init__(self, endpoint: Endpoint) -> None:
        self._endpoint = endpoint
        self._tool: McpTool | None = None
        self._lock = threading.Lock()

    def call(self, token: str, urls: list[str]) -> CallAnswer:
        try:
            reply = self._mcp().call(token, urls)
        except IrliveError as exc:
            scrub(exc, token, urls)
            raise
        if len(reply.raw) > MAX_ANSWER_BYTES:
            # The SDK has read it whole already; the answer is dropped as the HTTP one would be.
            raise TransientError(TOO_LARGE)
        return read_answer(reply.status, reply.raw, token, urls)

    def _mcp(self) -> McpTool:
        with self._lock:
            if self._tool is None:
                # Built at the first paid call, not for a price probe (`scan`): the SDK (pydantic, anyio) is not
                # free to import.
                from worker.seams.mcp_tool import McpTool

                self._tool = McpTool(self._endpoint.base_url, headers=self._endpoint.headers,
                                     timeout_s=self._endpoint.timeout_s)
            return self._tool


def method_for(settings: Settings, market: Marketplace, store: Store, keys: Keys) -> tuple[PaymentMethod, Seller]:
    """The method IRLIVE_PAYMENT_METHOD names, and the seller the ledger buys and reconciles its tokens with."""
    if settings.payment_method == "x402":
        from worker.money.x402 import X402Payer
        from worker.seams.x402_signer import X402Signer

        payer = X402Payer(market, lambda: X402Signer.for_settings(settings), store, keys)
        return payer, payer
    if settings.payment_method == "mcp-token":
        return TokenOverMcp(market.endpoint), market
    return TokenOverHttp(market), market
