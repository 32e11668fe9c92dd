"""A small threaded TCP fault proxy for the fault-injection tests.

`FaultProxy(host, port)` listens on 127.0.0.1:<free port> and forwards every connection to host:port.
Faults are switched at run time and apply to connections accepted from then on:

- `pass_through()`: forward untouched.
- `drop_mid_answer(after_bytes=N)`: forward the request, then only the first N bytes of the answer, then close.
- `reset_on_connect()`: accept, then close at once with a TCP RST.
- `hold_answer(seconds)`: forward the request, then sit on the answer for that long (a slow or hung peer).
- `cut_on_send(pattern)`: when the client sends bytes containing `pattern` (bytes, or a compiled bytes regex
  for several commands at once), drop them and close the connection (for raw protocols such as Redis: fail
  one chosen command, e.g. by its script SHA).
- `http_error(503)` (HTTP targets): answer the request itself with an S3-style XML error body.

Every fault takes `p` (probability per connection or request), and `count` and/or `duration_s` (after that
many faults, or that many seconds, the proxy goes back to passing); `match` limits a fault to requests whose
head (request line and headers, bytes) it accepts.

With `http=True` the proxy speaks just enough HTTP/1.1 to make each request its own connection: it rewrites
`Connection: close` into the request and the final response head, so a keep-alive client (httpx, botocore)
opens a new connection per request and a fault switched on mid-run reaches the very next request. Without it
the proxy is a plain byte pipe and faults act per TCP connection.
"""

from __future__ import annotations

import contextlib
import random
import re
import select
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

HEAD_LIMIT = 64 * 1024
IO_TIMEOUT_S = 120.0
_CONNECTION_HEADER = re.compile(rb"\r\n(?:connection|keep-alive|proxy-connection):[^\r\n]*", re.IGNORECASE)
_S3_ERRORS = {
    403: ("AccessDenied", "Access Denied"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "Bad Gateway."),
    503: ("SlowDown", "Please reduce your request rate."),
    504: ("GatewayTimeout", "Gateway Timeout."),
}
_REASONS = {403: "Forbidden", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout"}

Match = Callable[[bytes], bool]


@dataclass
class _Fault:
    kind: str  # "drop" | "reset" | "http_error" | "hold" | "cut_on_send"
    p: float = 1.0
    count: int | None = None
    until: float | None = None
    after_bytes: tuple[int, int] = (0, 0)
    status: int = 503
    rst: bool = False
    hold_s: float = 0.0
    pattern: bytes | re.Pattern[bytes] = b""
    match: Match | None = None
    applied: int = 0

    def expired(self, now: float) -> bool:
        return (self.count is not None and self.applied >= self.count) or (self.until is not None and now >= self.until)


class FaultProxy:
    """Start with `with FaultProxy(host, port, http=True) as proxy:`; `proxy.url` is what clients dial."""

    def __init__(self, target_host: str, target_port: int, *, http: bool = False, seed: int = 0) -> None:
        self.target = (target_host, target_port)
        self.http = http
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._fault: _Fault | None = None
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self.stats: Counter[str] = Counter()
        # With http=True: the request line of every request forwarded or answered (what a client asked for).
        self.request_lines: list[bytes] = []

    @classmethod
    def for_url(cls, url: str, *, http: bool = True, seed: int = 0) -> FaultProxy:
        """A proxy in front of http://host:port (HTTP-aware by default)."""
        hostport = url.split("://", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        return cls(host, int(port), http=http, seed=seed)

    # ---- lifecycle -------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._listener is None:
            raise RuntimeError("proxy not started")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        listener.settimeout(0.1)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every open connection, join the threads; idempotent."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sockets, threads = list(self._open), list(self._threads)
        for s in sockets:
            _close(s)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- modes -----------------------------------------------------------------------------------------

    def pass_through(self) -> None:
        with self._lock:
            self._fault = None

    def drop_mid_answer(self, after_bytes: int | tuple[int, int] = 0, *, p: float = 1.0, count: int | None = None,
                        duration_s: float | None = None, rst: bool = False, match: Match | None = None) -> None:
        """Forward the request, then N answer bytes (N fixed, or uniform in an inclusive range), then close."""
        span = (after_bytes, after_bytes) if isinstance(after_bytes, int) else after_bytes
        self._set(_Fault("drop", p, count, _until(duration_s), after_bytes=span, rst=rst, match=match))

    def hold_answer(self, seconds: float, *, p: float = 1.0, count: int | None = None,
                    duration_s: float | None = None, match: Match | None = None) -> None:
        """Forward the request, then hold the answer `seconds` before passing it on (stop() cuts it short)."""
        self._set(_Fault("hold", p, count, _until(duration_s), hold_s=seconds, match=match))

    def cut_on_send(self, pattern: bytes | re.Pattern[bytes], *, p: float = 1.0, count: int | None = None,
                    duration_s: float | None = None) -> None:
        """Client bytes containing `pattern` are not forwarded: the connection is closed instead."""
        self._set(_Fault("cut_on_send", p, count, _until(duration_s), pattern=pattern))

    def reset_on_connect(self, *, p: float = 1.0, count: int | None = None, duration_s: float | None = None) -> None:
        self._set(_Fault("reset", p, count, _until(duration_s)))

    def http_error(self, status: int = 503, *, p: float = 1.0, count: int | None = None,
                   duration_s: float | None = None, match: Match | None = None) -> None:
        """Answer matching requests with `status` and an S3-style XML error (only with http=True)."""
        if not self.http:
            raise ValueError("http_error needs FaultProxy(..., http=True)")
        if status not in _S3_ERRORS:
            raise ValueError(f"status must be one of {sorted(_S3_ERRORS)}")
        self._set(_Fault("http_error", p, count, _until(duration_s), status=status, match=match))

    @property
    def mode(self) -> str:
        with self._lock:
            fault = self._current()
            return "pass" if fault is None else fault.kind

    def _set(self, fault: _Fault) -> None:
        with self._lock:
            self._fault = fault

    def _current(self) -> _Fault | None:
        if self._fault is not None and self._fault.expired(time.monotonic()):
            self._fault = None
        return self._fault

    def _decide(self, stage: str, head: bytes | None) -> _Fault | None:
        """The fault to apply now (counted as applied), or None to pass; stage is 'connect' or 'request'."""
        with self._lock:
            fault = self._current()
            if fault is None or fault.kind == "cut_on_send" or (fault.kind == "reset") != (stage == "connect"):
                return None
            if fault.match is not None and (head is None or not fault.match(head)):
                return None
            if self._rng.random() >= fault.p:
                return None
            fault.applied += 1
            self.stats[fault.kind] += 1
            return _Fault(**{**fault.__dict__, "after_bytes": (self._rng.randint(*fault.after_bytes),) * 2})

    # ---- plumbing --------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(IO_TIMEOUT_S)
            thread = threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn", daemon=True)
            with self._lock:
                self.stats["connections"] += 1
                self._open.add(client)
                self._threads.add(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            if self._decide("connect", None) is not None:
                _reset(client)
                return
            head, rest = b"", b""
            if self.http:
                got = _read_head(client)
                if got is None:
                    return
                head, rest = got
                with self._lock:
                    self.request_lines.append(head.partition(b"\r\n")[0])
            fault = self._decide("request", head if self.http else None)
            if fault is not None and fault.kind == "http_error":
                self._answer_error(client, head, rest, fault.status)
                return
            upstream = socket.create_connection(self.target, timeout=10)
            upstream.settimeout(IO_TIMEOUT_S)
            with self._lock:
                self._open.add(upstream)
            if self.http:
                upstream.sendall(_with_close(head) + rest)
            limit = fault.after_bytes[0] if fault is not None and fault.kind == "drop" else None
            hold = fault.hold_s if fault is not None and fault.kind == "hold" else 0.0
            done = threading.Event()
            pump = threading.Thread(target=self._pump_up, args=(client, upstream, done), daemon=True)
            pump.start()
            try:
                cut = self._pump_down(upstream, client, limit, hold)
            finally:
                # The other direction must let go of the client socket before it is closed (or reset).
                done.set()
                pump.join(5)
            if cut and fault is not None and fault.rst:
                _reset(client)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    _close(s)
                    with self._lock:
                        self._open.discard(s)
            with self._lock:
                self._threads.discard(threading.current_thread())
                self.stats["closed"] += 1

    def _pump_up(self, client: socket.socket, upstream: socket.socket, done: threading.Event) -> None:
        """Client to target, until the client stops sending or the answer is over."""
        tail = b""
        try:
            while not done.is_set():
                readable, _, _ = select.select([client], [], [], 0.05)
                if not readable:
                    continue
                data = client.recv(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        upstream.shutdown(socket.SHUT_WR)
                    return
                if self._cut_due(tail + data):
                    # Not forwarded; ending the target side ends _pump_down, which closes the client.
                    with contextlib.suppress(OSError):
                        upstream.shutdown(socket.SHUT_RDWR)
                    return
                tail = (tail + data)[-256:]
                upstream.sendall(data)
        except OSError:
            return

    def _cut_due(self, sent: bytes) -> bool:
        with self._lock:
            fault = self._current()
            if fault is None or fault.kind != "cut_on_send":
                return False
            pattern = fault.pattern
            if not (pattern.search(sent) if isinstance(pattern, re.Pattern) else pattern in sent):
                return False
            if self._rng.random() >= fault.p:
                return False
            fault.applied += 1
            self.stats["cut"] += 1
            return True

    def _pump_down(self, upstream: socket.socket, client: socket.socket, limit: int | None, hold: float) -> bool:
        """Target to client until the target closes, or until `limit` bytes; True if the answer was cut."""
        if hold > 0:
            # Wait for the first answer byte (the request reached the target), then sit on it.
            readable, _, _ = select.select([upstream], [], [], IO_TIMEOUT_S)
            if readable and self._stopping.wait(hold):
                return True
        sent = 0
        pending = b""
        head_done = not self.http
        while True:
            data = upstream.recv(65536)
            if not data:
                if pending:
                    client.sendall(pending)
                return False
            if not head_done:
                pending += data
                rewritten, pending, head_done = _rewrite_response_heads(pending)
                data = rewritten
            if limit is not None and sent + len(data) >= limit:
                client.sendall(data[: limit - sent])
                self.stats["dropped_mid_answer"] += 1
                return True
            client.sendall(data)
            sent += len(data)

    def _answer_error(self, client: socket.socket, head: bytes, rest: bytes, status: int) -> None:
        _drain_body(client, head, rest)
        code, message = _S3_ERRORS[status]
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<RequestId>{request_id}</RequestId><HostId>faultproxy</HostId></Error>"
        ).encode()
        is_head = head.split(b" ", 1)[0].upper() == b"HEAD"
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            "Content-Type: application/xml",
            f"Content-Length: {len(body)}",
            f"x-amz-request-id: {request_id}",
            "Connection: close",
        ]
        if status == 503:
            lines.append("Retry-After: 1")
        client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if is_head else body))
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)


def _until(duration_s: float | None) -> float | None:
    return None if duration_s is None else time.monotonic() + duration_s


def _read_head(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """(head including the blank line, bytes read past it); None if the peer closed first."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > HEAD_LIMIT:
            return None
        data = sock.recv(65536)
        if not data:
            return None
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _with_close(head: bytes) -> bytes:
    """The head with any Connection/Keep-Alive header replaced by `Connection: close`."""
    body_end = head.rindex(b"\r\n\r\n")
    stripped = _CONNECTION_HEADER.sub(b"", head[:body_end])
    return stripped + b"\r\nConnection: close\r\n\r\n"


def _rewrite_response_heads(buf: bytes) -> tuple[bytes, bytes, bool]:
    """Rewrite the final response head in `buf` (1xx heads pass); (to send, to keep buffering, final seen)."""
    out = b""
    while b"\r\n\r\n" in buf:
        end = buf.index(b"\r\n\r\n") + 4
        head, buf = buf[:end], buf[end:]
        status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
        if status.startswith(b"1"):
            out += head
            continue
        return out + _with_close(head) + buf, b"", True
    return out, buf, False


def _drain_body(sock: socket.socket, head: bytes, rest: bytes) -> None:
    """Read the request body the client is sending (Content-Length or chunked), briefly, so closing is clean."""
    if b"100-continue" in head.lower():
        return  # the client waits for our answer before sending the body
    match = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.IGNORECASE)
    chunked = re.search(rb"\r\ntransfer-encoding:[^\r\n]*chunked", head, re.IGNORECASE) is not None
    want = int(match.group(1)) if match else 0
    sock.settimeout(2.0)
    try:
        got = rest
        while (chunked and not got.endswith(b"0\r\n\r\n")) or (not chunked and len(got) < want):
            data = sock.recv(65536)
            if not data:
                return
            got += data
    except OSError:
        return


def _reset(sock: socket.socket) -> None:
    """Close with RST rather than FIN (SO_LINGER on, zero timeout)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _close(sock)


def _close(sock: socket.socket) -> None:
    """FIN, waking any thread blocked on the socket, then close."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
