"""The sandbox marketplace over HTTP: routes, payment gating, rate limiting, fault injection, and its CLI."""

from __future__ import annotations

import argparse
import base64
import json
import math
import random
import signal
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import httpx

from sandbox import upstream
from sandbox.config import SERVICE_IDS, SandboxConfig, add_flags, from_args, public_config, updated
from sandbox.ledger import Ledger, TokenRefused, x402_offer

__all__ = ["TOOL_PATHS", "SandboxConfig", "SandboxServer", "main"]

# Each tool path is its own listing, named by the service id its payments are created for.
LISTINGS = {f"/api/tools/{service_id}": service_id for service_id in SERVICE_IDS}
TOOL_PATHS = frozenset(LISTINGS)
_MAX_BODY = 1024 * 1024


class _Gcra:
    """Generic cell rate: decided before a token is touched, so a throttled call costs nothing."""

    def __init__(self) -> None:
        self._tat = 0.0
        self._lock = threading.Lock()

    def acquire(self, rate: float, burst: int) -> float:
        """0 if the call may go now, else the seconds to wait; a refusal leaves the state untouched."""
        if rate <= 0:
            return 0.0
        interval = 1.0 / rate
        with self._lock:
            now = time.monotonic()
            allowed_at = self._tat - interval * (burst - 1)
            if now < allowed_at:
                return allowed_at - now
            self._tat = max(self._tat, now) + interval
            return 0.0

    def reset(self) -> None:
        with self._lock:
            self._tat = 0.0


class _State:
    """What every request thread shares; the config is swapped whole, never edited in place."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = updated(config, {})
        self.ledger = Ledger()
        self.gcra = _Gcra()
        self.rng = random.Random(config.seed)
        self.rng_lock = threading.Lock()
        self.stopping = threading.Event()
        # Straight to the image host, like the upstream: a proxy from the environment would not see 127.0.0.1.
        self.client = httpx.Client(trust_env=False)

    def rolls(self, n: int) -> list[float]:
        with self.rng_lock:
            return [self.rng.random() for _ in range(n)]

    def reconfigure(self, changes: dict[str, Any]) -> SandboxConfig:
        new = updated(self.config, changes)
        if "seed" in changes:
            with self.rng_lock:
                self.rng.seed(new.seed)
        self.config = new
        return new


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        super().__init__(address, _Handler)
        self.state = state


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

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        path = self.path.split("?", 1)[0]
        try:
            body = self._read_body() if method == "POST" else b""
            if method == "POST" and path in LISTINGS:
                self._tool_call(state, LISTINGS[path], body)
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
        payload = json.dumps(doc).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _send_body(self, status: int, body: upstream.Body) -> None:
        """Write an answer piece by piece; a caller that hangs up early (an answer too big for it) is not an error."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", body.content_type)
            self.send_header("Content-Length", str(body.length))
            self.end_headers()
            for piece in body.pieces:
                self.wfile.write(piece)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _authorized(self, config: SandboxConfig) -> bool:
        if config.api_key is None or self.headers.get(config.api_key_header) == config.api_key:
            return True
        self.server.state.ledger.count("rejected_401")
        self._send(401, {"error": "API key missing or invalid"})
        return False

    def _payment_required(self, state: _State, service_id: str, error: str) -> None:
        state.ledger.count("rejected_402")
        resource = f"http://{self.headers.get('Host', '')}{self.path}"
        doc = x402_offer(service_id, state.config.price_cents, resource, error)
        header = base64.b64encode(json.dumps(doc).encode()).decode()
        self._send(402, doc, {"PAYMENT-REQUIRED": header})

    def _tool_call(self, state: _State, service_id: str, raw: bytes) -> None:
        config = state.config
        ledger = state.ledger
        ledger.count("calls_total")
        if not self._authorized(config):
            return
        token = self.headers.get("X-Payment-Token")
        if not token:
            self._payment_required(state, service_id, "payment required")
            return
        try:
            ledger.check(token, service_id)
            urls = upstream.parse_tasks(_json(raw))
        except TokenRefused as refused:
            self._payment_required(state, service_id, str(refused))
            return
        except ValueError as invalid:
            ledger.count("rejected_400")
            self._send(400, {"error": str(invalid)})
            return
        wait = state.gcra.acquire(config.rate_limit_per_s, config.rate_burst)
        if wait > 0:
            ledger.count("throttled")
            self._throttled(config, wait)
            return
        paths = [upstream.url_path(url) for url in urls]
        try:
            payment = ledger.consume(token, service_id, paths)
        except TokenRefused as refused:
            # Another call spent the same token between the check and here.
            self._payment_required(state, service_id, str(refused))
            return
        status, body = self._run_upstream(state, config, urls)
        if status != 200 and not config.failed_calls_consume_token:
            ledger.restore(payment, paths)
        self._send_body(status, body)

    def _throttled(self, config: SandboxConfig, wait: float) -> None:
        if config.throttle_style == "400":
            error = upstream.UpstreamError("Throttling.User", "Request was denied due to user flow control.")
            self._send(400, error.body())
            return
        seconds = f"{math.ceil(wait * 1000) / 1000:.3f}".rstrip("0").rstrip(".")
        doc = {"error": "rate limit exceeded", "retryAfter": float(seconds)}
        # The body keeps the real wait; only the header is replaced, since that is what clients obey.
        self._send(429, doc, {"Retry-After": config.retry_after or seconds})

    def _run_upstream(self, state: _State, config: SandboxConfig, urls: list[str]) -> tuple[int, upstream.Body]:
        ledger = state.ledger
        fail_roll, timeout_roll, kind_roll = state.rolls(3)
        if config.latency_ms > 0:
            state.stopping.wait(config.latency_ms / 1000)
        if timeout_roll < config.p_timeout:
            ledger.count("timeouts")
            # Longer than any sane client timeout: the caller sees a read timeout on a spent token.
            state.stopping.wait(config.timeout_sleep_s)
        if state.stopping.is_set():
            return _shutting_down()
        if fail_roll < config.p_5xx:
            ledger.count("errors_5xx")
            if kind_roll < 0.5:
                error = upstream.UpstreamError("ServiceUnavailable", "The service is unavailable.", 503)
            else:
                error = upstream.UpstreamError("InternalError", "The request processing has failed.", 500)
            return error.status, upstream.json_body(error.body())
        if config.fetch_delay_ms > 0:
            # The token is spent and nothing is downloaded yet: a test changes an object inside this window.
            state.stopping.wait(config.fetch_delay_ms / 1000)
            if state.stopping.is_set():
                return _shutting_down()
        elements: list[dict[str, Any]] = []
        failures: list[upstream.UpstreamError] = []
        for url in urls:
            try:
                upstream.check_url(url, time.time())
                data = upstream.fetch(state.client, url, config.max_image_bytes, config.fetch_timeout_s)
                elements.append(upstream.judge(url, data, upstream.inspect(data, config.max_image_pixels)))
            except upstream.UpstreamError as error:
                if config.bad_image_fails_call:
                    ledger.count("upstream_errors")
                    return error.status, upstream.json_body(error.body())
                failures.append(error)
                elements.append(upstream.failed_element(url, error))
        if len(failures) == len(urls):
            # Nothing was judged: a call that only carries errors is a failed call.
            ledger.count("upstream_errors")
            return failures[0].status, upstream.json_body(failures[0].body())
        ledger.count("succeeded")
        return 200, upstream.answer(config.answer_mode, elements, config.result_as_string)

    def _create_payment(self, state: _State, raw: bytes) -> None:
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
        elif service not in SERVICE_IDS:
            self._send(404, {"error": f"service {service!r} not found"})
        else:
            if config.payment_latency_ms > 0:
                # A slow purchase; woken by stop(), and then no payment is created at all.
                state.stopping.wait(config.payment_latency_ms / 1000)
                if state.stopping.is_set():
                    self._send(503, {"error": "the sandbox is shutting down"})
                    return
            self._send(201, state.ledger.create_payment(service, config.price_cents, config.token_ttl_s))

    def _read_payment(self, state: _State, payment_id: str) -> None:
        if not self._authorized(state.config):
            return
        doc = state.ledger.read_payment(payment_id)
        if doc is None:
            self._send(404, {"error": "payment not found"})
        else:
            self._send(200, doc)

    def _configure(self, state: _State, raw: bytes) -> None:
        try:
            changes = _json(raw)
            if not isinstance(changes, dict):
                raise ValueError("config changes must be a JSON object")
            self._send(200, public_config(state.reconfigure(changes)))
        except ValueError as invalid:
            self._send(400, {"error": str(invalid)})


class _BodyTooLarge(Exception):
    pass


def _shutting_down() -> tuple[int, upstream.Body]:
    shutting = upstream.UpstreamError("ServiceUnavailable", "The sandbox is shutting down.", 503)
    return shutting.status, upstream.json_body(shutting.body())


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError("request body is not valid JSON") from exc


class SandboxServer:
    """The sandbox on a real socket, served from a daemon thread; port 0 picks a free port."""

    def __init__(self, config: SandboxConfig, host: str = "127.0.0.1", port: int = 0) -> None:
        self._state = _State(config)
        self._address = (host, port)
        self._httpd: _HTTPServer | None = None
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
        self._state.client.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve until SIGTERM or SIGINT; prints `sandbox listening on URL` once the socket is bound."""
    parser = argparse.ArgumentParser(prog="irlive sandbox", description="Run the sandbox marketplace.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
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
