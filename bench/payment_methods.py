"""Cost of a paid call by payment method: `mcp-token` (an MCP session per call) against `token` (one HTTP POST).

In one invocation: the sandbox (in this process, no latency injected) and a static image server; a token is
bought per call either way (not timed), then the call alone is timed through worker.seams.marketplace, the
methods alternating, --calls each per round, best of --rounds. Prints milliseconds per call of each and the
ratio mcp-token ÷ token.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sandbox import images
from sandbox.server import SandboxConfig, SandboxServer
from worker.seams.marketplace import Marketplace

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


def timed_calls(market: Marketplace, urls: list[str], calls: int) -> float:
    """Seconds per call, purchases excluded."""
    spent = 0.0
    for _ in range(calls):
        payment = market.create_payment()
        assert payment.token is not None
        started = time.perf_counter()
        answer = market.call(payment.token, urls)
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
        methods = {"token": Marketplace(sandbox.url, SERVICE),
                   "mcp-token": Marketplace(sandbox.url, SERVICE, via_mcp=True)}
        best = {name: float("inf") for name in methods}
        for _ in range(args.rounds):
            for name, market in methods.items():
                best[name] = min(best[name], timed_calls(market, urls, args.calls))
        for market in methods.values():
            market.close()
    for name, seconds in best.items():
        print(f"{name:10s} {seconds * 1000:7.1f} ms per call ({args.images} images, best of {args.rounds} rounds "
              f"of {args.calls})")
    print(f"ratio mcp-token / token: {best['mcp-token'] / best['token']:.2f}")


if __name__ == "__main__":
    main()
