"""Cost of a paid call by payment method: `mcp-token` (an MCP session per call) and `x402` (a signature made
for the call) against `token` (one HTTP POST).

In one invocation: the sandbox (in this process, no latency injected) and a static image server; a token is
bought per call (for x402: a payment id committed, as the ledger does), not timed; then the call alone is timed
through worker.money.methods (for x402 that includes signing with the SDK and writing the settlement to the
ledger record, in an in-memory Redis), the methods alternating, --calls each per round, best of --rounds.
Prints milliseconds per call of each and the ratio of each to token.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fakeredis

from sandbox import images
from sandbox.server import SandboxConfig, SandboxServer
from worker.keys import Keys
from worker.money.methods import PaymentMethod, TokenOverHttp, TokenOverMcp
from worker.money.x402 import X402Payer
from worker.seams.marketplace import Marketplace
from worker.seams.store import Store
from worker.seams.x402_signer import X402Signer

SERVICE = "infrared-face-liveness-detection"


@contextmanager
def image_host(count: int) -> Iterator[list[str]]:
    """A static server with `count` small live captures; yields their URLs."""
    files = {f"/img{i}.png": images.png(256, 256, "live", seed=i) for i in range(count)}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            data = files.get(self.path.split("?", 1)[0], b"")
            self.send_response(200 if data else 404)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield [f"http://127.0.0.1:{httpd.server_address[1]}{path}" for path in files]
    finally:
        httpd.shutdown()
        httpd.server_close()


# A throwaway payer key: the sandbox settles on no chain.
PAYER_KEY = "0x" + "5d" * 32


def timed_calls(buy: Callable[[], str], method: PaymentMethod, urls: list[str], calls: int) -> float:
    """Seconds per call, purchases excluded."""
    spent = 0.0
    for _ in range(calls):
        token = buy()
        started = time.perf_counter()
        answer = method.call(token, urls)
        spent += time.perf_counter() - started
        assert answer.request_id
    return spent / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30, help="calls per method per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=10, help="images per call (1-10)")
    args = parser.parse_args()
    with SandboxServer(SandboxConfig()) as sandbox, image_host(args.images) as urls:
        market = Marketplace(sandbox.url, SERVICE)
        store, keys = Store(fakeredis.FakeRedis(decode_responses=True)), Keys()
        payer = X402Payer(market, X402Signer(PAYER_KEY, network="eip155:8453", assets=("USDC",), pay_to=None,
                                             max_price_cents=20), store, keys)

        def buy_token() -> str:
            payment = market.create_payment()
            assert payment.token is not None
            return payment.token

        def commit_x402() -> str:
            # What the ledger writes when it commits a payment id (buy_end.lua), reduced to what the call reads.
            payment_id = payer.create_payment().payment_id
            store.hset(keys.payment(payment_id), mapping={"amount_cents": 20, "state": "sent"})
            return payment_id

        methods: dict[str, tuple[Callable[[], str], PaymentMethod]] = {
            "token": (buy_token, TokenOverHttp(market)), "mcp-token": (buy_token, TokenOverMcp(market.endpoint)),
            "x402": (commit_x402, payer)}
        best = {name: float("inf") for name in methods}
        for _ in range(args.rounds):
            for name, (buy, method) in methods.items():
                best[name] = min(best[name], timed_calls(buy, method, urls, args.calls))
        market.close()
    for name, seconds in best.items():
        print(f"{name:10s} {seconds * 1000:7.1f} ms per call ({args.images} images, best of {args.rounds} rounds "
              f"of {args.calls})")
    for name in ("mcp-token", "x402"):
        print(f"ratio {name} / token: {best[name] / best['token']:.2f}")


if __name__ == "__main__":
    main()
