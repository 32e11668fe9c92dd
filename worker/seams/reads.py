"""Ranged GETs of presigned S3 URLs over kept-alive http.client connections: the validation read's transport.

Every image is read once before any money moves (its first bytes, size and ETag): the worker's most frequent
request. Sent through urllib3 (as botocore's HTTP session sends it) such a read costs about twice the CPU of
the same request on a bare `http.client` connection: urllib3 re-encodes the ~500-character presigned URL byte by
byte and builds retry, timeout and header objects per request, and botocore adds its proxy lookup and request
and response wrappers (`bench/reads.py`: botocore's session, urllib3's pool, httpx and this, on the same URLs;
httpx costs more than botocore).
No maintained client sends a GET with less work, so this module keeps what urllib3's pool would: a few idle
connections per host, reused last-in first-out; one found closed by the server is replaced once at no cost to
the caller's attempts. Errors are the standard library's (`OSError`, `http.client.HTTPException`): the storage
seam translates them. Proxies are not handled here: with a proxy configured for S3, the seam reads through
botocore's session instead.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

# What a connection the server has already closed raises on its next request: it is replaced, not failed.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass(frozen=True)
class Answer:
    """An answer's status, its headers (names in lower case) and the first bytes of its body."""

    status: int
    headers: dict[str, str]
    body: bytes


class Reader:
    """Thread-safe: each request takes a connection of its own for its duration."""

    def __init__(self, *, ca_file: str | None, connect_timeout_s: float, read_timeout_s: float,
                 max_idle_per_host: int) -> None:
        self._ca_file = ca_file
        self._ssl: ssl.SSLContext | None = None
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple[str, str], deque[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def get(self, url: str, headers: dict[str, str], limit: int, error_limit: int) -> Answer:
        """GET url and read at most `limit` bytes of a 2xx answer's body, `error_limit` of another's. The
        connection is kept for the next request only if nothing of the body is left unread (a server that
        ignores a Range sends the whole object)."""
        split = urlsplit(url)
        if split.scheme not in ("http", "https"):
            raise ValueError(f"not an HTTP URL: {split.scheme}://")
        where = (split.scheme, split.netloc)
        target = f"{split.path}?{split.query}" if split.query else split.path or "/"
        conn, reused = self._take(where)
        try:
            try:
                response = self._send(conn, target, headers)
            except _STALE:
                if not reused:
                    raise
                conn.close()
                conn, reused = self._open(where), False
                response = self._send(conn, target, headers)
            body = response.read(limit if 200 <= response.status < 300 else error_limit)
        except BaseException:
            conn.close()
            raise
        if response.isclosed() and not response.will_close:
            self._give_back(where, conn)
        else:
            conn.close()
        return Answer(response.status, {name.lower(): value for name, value in response.getheaders()}, body)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _send(self, conn: http.client.HTTPConnection, target: str,
              headers: dict[str, str]) -> http.client.HTTPResponse:
        conn.request("GET", target, headers=headers)
        return conn.getresponse()

    def _take(self, where: tuple[str, str]) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(where)
            if idle:
                return idle.pop(), True
        return self._open(where), False

    def _give_back(self, where: tuple[str, str], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(where, deque())
            if len(idle) < self._max_idle:
                idle.append(conn)
                return
        conn.close()

    def _open(self, where: tuple[str, str]) -> http.client.HTTPConnection:
        scheme, netloc = where
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(netloc, timeout=self._connect_timeout_s, context=self._context())
        else:
            conn = http.client.HTTPConnection(netloc, timeout=self._connect_timeout_s)
        conn.connect()
        # Connected within the connect timeout; an answer may take as long as the read timeout.
        if conn.sock is not None:
            conn.sock.settimeout(self._read_timeout_s)
        return conn

    def _context(self) -> ssl.SSLContext:
        # Built on first use: a worker reading over plain HTTP never loads a CA bundle.
        if self._ssl is None:
            self._ssl = ssl.create_default_context(cafile=self._ca_file)
        return self._ssl
