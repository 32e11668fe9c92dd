"""The sandbox marketplace over HTTP: routes, payment gating, rate limiting, fault injection, and its CLI."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

from sandbox.config import (
    LEGACY_SERVICE_ID,
    SERVICE_ID,
    SERVICE_IDS,
    SandboxConfig,
    add_flags,
    from_args,
    public_config,
)
from sandbox.mcp_seller import MCP_PATH, McpEndpoint, Reply
from sandbox.selling import Answer, State, token_call, x402_call
from sandbox.x402_seller import REQUEST_HEADERS

__all__ = ["TOOL_PATHS", "SandboxConfig", "SandboxServer", "main"]

# Each tool path is its own listing, named by the service id its payments are created for.
LISTINGS = {f"/api/tools/{service_id}": service_id for service_id in SERVICE_IDS}
TOOL_PATHS = frozenset(LISTINGS)
LEGACY_PATH = f"/api/tools/{LEGACY_SERVICE_ID}"


def listing_of(config: SandboxConfig, path: str) -> str | None:
    """The service id a tool path sells, or None where this deployment exposes no tool."""
    if config.tool_paths == "legacy":
        return SERVICE_ID if path == LEGACY_PATH else None
    return LISTINGS.get(path)


def sold(config: SandboxConfig) -> tuple[str, ...]:
    """The service ids payments can be bought for."""
    return (SERVICE_ID,) if config.tool_paths == "legacy" else SERVICE_IDS


_MAX_BODY = 1024 * 1024


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: State) -> None:
        super().__init__(address, _Handler)
        self.state = state
        # Set once the socket is bound, since the endpoint needs the sandbox's own URL for its offers.
        self.mcp: McpEndpoint | None = None


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        # Quiet: a request line can carry a presigned query string, which is a credential.
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_body() if method == "POST" else b""
            if path == MCP_PATH:
                self._mcp(state, method, body)
            elif method == "POST" and (service := listing_of(state.config, path)) is not None:
                self._tool_call(state, service, body)
            elif method == "POST" and path == "/api/payments":
                self._create_payment(state, body)
            elif method == "GET" and path.startswith("/api/payments/"):
                self._read_payment(state, path.removeprefix("/api/payments/"))
            elif method == "GET" and path == "/_sandbox/ledger":
                self._send(200, state.ledger.snapshot())
            elif method == "GET" and path == "/_sandbox/config":
                self._send(200, public_config(state.config))
            elif method == "POST" and path == "/_sandbox/config":
                self._configure(state, body)
            elif method == "POST" and path == "/_sandbox/reset":
                state.ledger.reset()
                state.gcra.reset()
                self._send(200, state.ledger.snapshot())
            else:
                self._send(404, {"error": f"no route for {method} {path}"})
        except _BodyTooLarge:
            self._send(413, {"error": "request body too large"})
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (a timed-out call); nothing is left to answer.
            self.close_connection = True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._send(500, {"error": "sandbox internal error"})

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self.close_connection = True
            raise _BodyTooLarge
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(doc).encode(), "application/json", headers)

    def _send_raw(self, status: int, payload: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _authorized(self, config: SandboxConfig) -> bool:
        if config.api_key is None or self.headers.get(config.api_key_header) == config.api_key:
            return True
        self.server.state.ledger.count("rejected_401")
        self._send(401, {"error": "API key missing or invalid"})
        return False

    def _send_answer(self, answer: Answer) -> None:
        """Write an answer piece by piece; a caller that hangs up early (an answer too big for it) is not an error."""
        body = answer.body
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", body.content_type)
            self.send_header("Content-Length", str(body.length))
            for name, value in answer.headers.items():
                self.send_header(name, value)
            self.end_headers()
            for piece in body.pieces:
                self.wfile.write(piece)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _resource(self) -> str:
        return f"http://{self.headers.get('Host', '')}{self.path}"

    def _tool_call(self, state: State, service_id: str, raw: bytes) -> None:
        config = state.config
        state.ledger.count("calls_total")
        x402 = next(((name, value) for name in REQUEST_HEADERS if (value := self.headers.get(name))), None)
        if x402 is not None:
            # No API key on this path: a signature is the whole credential of a caller with no marketplace account.
            self._send_answer(x402_call(state, service_id, x402[0], x402[1], lambda: _json(raw), self._resource()))
            return
        if not self._authorized(config):
            return
        token = self.headers.get("X-Payment-Token")
        self._send_answer(token_call(state, service_id, token, lambda: _json(raw), self._resource()))

    def _mcp(self, state: State, method: str, raw: bytes) -> None:
        if not self._authorized(state.config):
            return
        if method == "GET":
            # No server-initiated stream (the endpoint is stateless and answers JSON): the spec's answer is 405,
            # not an SSE stream that would hold a handler thread open with nothing to say.
            self._send(405, {"error": "GET /mcp opens no stream here; POST JSON-RPC"}, {"Allow": "POST, DELETE"})
            return
        endpoint = self.server.mcp
        if endpoint is None:
            self._send(503, {"error": "the MCP endpoint is not running"})
            return
        self._send_reply(endpoint.handle(method, self.path, list(self.headers.items()), raw))

    def _send_reply(self, reply: Reply) -> None:
        try:
            self.send_response(reply.status)
            sized = False
            for name, value in reply.headers:
                sized = sized or name.lower() == "content-length"
                self.send_header(name, value)
            if not sized:
                # Without a length the only end of the body HTTP/1.1 gives us (short of chunking) is the close.
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            for piece in reply.pieces:
                self.wfile.write(piece)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _create_payment(self, state: State, raw: bytes) -> None:
        config = state.config
        if not self._authorized(config):
            return
        try:
            body = _json(raw)
        except ValueError as invalid:
            self._send(400, {"error": str(invalid)})
            return
        service = body.get("serviceId") if isinstance(body, dict) else None
        if not isinstance(service, str):
            self._send(400, {"error": "serviceId is required"})
        elif service not in sold(config):
            self._send(404, {"error": f"service {service!r} not found"})
        else:
            if config.payment_latency_ms > 0:
                # A slow purchase; woken by stop(), and then no payment is created at all.
                state.stopping.wait(config.payment_latency_ms / 1000)
                if state.stopping.is_set():
                    self._send(503, {"error": "the sandbox is shutting down"})
                    return
            created = state.ledger.create_payment(service, config.price_cents, config.token_ttl_s)
            self._answer_payment(state, created)

    def _answer_payment(self, state: State, created: dict[str, Any]) -> None:
        """The created (and charged) payment, answered as `payment_answer` says."""
        mode = state.config.payment_answer
        if mode == "renamed_token":
            created = {("tkn" if k in ("token", "paymentToken") else k): v for k, v in created.items()}
        elif mode == "empty":
            self._send_raw(201, b"", "application/json")
            return
        elif mode == "nested":
            self._send_raw(201, b"[" * 100_000 + b"]" * 100_000, "application/json")
            return
        elif mode == "server_error":
            self._send(500, {"error": "internal error"})
            return
        elif mode == "hang":
            state.stopping.wait(state.config.timeout_sleep_s)
        self._send(201, created)

    def _read_payment(self, state: State, payment_id: str) -> None:
        if not self._authorized(state.config):
            return
        doc = state.ledger.read_payment(payment_id)
        if doc is None:
            self._send(404, {"error": "payment not found"})
        else:
            self._send(200, doc)

    def _configure(self, state: State, raw: bytes) -> None:
        try:
            changes = _json(raw)
            if not isinstance(changes, dict):
                raise ValueError("config changes must be a JSON object")
            self._send(200, public_config(state.reconfigure(changes)))
        except ValueError as invalid:
            self._send(400, {"error": str(invalid)})


class _BodyTooLarge(Exception):
    pass


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError("request body is not valid JSON") from exc


class SandboxServer:
    """The sandbox on a real socket, served from a daemon thread; port 0 picks a free port."""

    def __init__(self, config: SandboxConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self._state = State(config)
        self._address = (host, port)
        self._httpd: _HTTPServer | None = None
        self._mcp: McpEndpoint | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("sandbox not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def config(self) -> SandboxConfig:
        return self._state.config

    def configure(self, **changes: Any) -> SandboxConfig:
        return self._state.reconfigure(changes)

    def ledger(self) -> dict[str, Any]:
        return self._state.ledger.snapshot()

    def start(self) -> SandboxServer:
        self._httpd = _HTTPServer(self._address, self._state)
        try:
            self._mcp = McpEndpoint(self._state, f"{self.url}{MCP_PATH}")
            self._mcp.start()
        except BaseException:
            self._httpd.server_close()
            raise
        self._httpd.mcp = self._mcp
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="sandbox", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        # Wake handlers sleeping on latency or an injected timeout before waiting for the loop to end.
        self._state.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        if self._mcp is not None:
            self._mcp.stop()
        self._state.client.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


PORT_RANGE = "0 to 65535"


def _port(text: str) -> int:
    refused = argparse.ArgumentTypeError(f"port must be {PORT_RANGE}, got {text!r}")
    try:
        port = int(text)
    except ValueError:
        raise refused from None
    if not 0 <= port <= 65_535:
        raise refused
    return port


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; prints `sandbox listening on URL` once the socket is bound."""
    parser = argparse.ArgumentParser(prog="irlive sandbox", description="Run the sandbox marketplace.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on; default: 127.0.0.1")
    parser.add_argument("--port", type=_port, default=0,
                        help=f"TCP port to listen on, 0 for any free one ({PORT_RANGE}); default: 0")
    add_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = from_args(args)
    except ValueError as invalid:
        print(f"irlive sandbox: {invalid}", file=sys.stderr)
        return 2
    server = SandboxServer(config, args.host, args.port).start()
    done = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        done.set()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    print(f"sandbox listening on {server.url}", flush=True)
    try:
        done.wait()
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
