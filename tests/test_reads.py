"""The validation read's transport (worker/seams/reads.py) against a real HTTP server on loopback: connections
kept and reused, one the server closed replaced without failing the read, a server that ignores the Range
costs the connection, not the whole object."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from worker.seams.reads import Reader

BODY = bytes(range(256)) * 4096  # 1 MiB


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: ClassVar[list[int]] = []
    # Set by a test: close each connection after its answer without saying so (as an idle timeout does).
    drop_after_answer: ClassVar[bool] = False
    ignore_range: ClassVar[bool] = False

    def setup(self) -> None:
        super().setup()
        self.connections.append(1)

    def do_GET(self) -> None:
        if self.path.startswith("/missing"):
            body = b"<Error><Code>NoSuchKey</Code>" + b"x" * 100_000 + b"</Error>"
            self._answer(404, body, {})
        elif self.ignore_range or "Range" not in self.headers:
            self._answer(200, BODY, {"ETag": '"abc"'})
        else:
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            part = BODY[int(first):int(last) + 1]
            self._answer(206, part, {"ETag": '"abc"', "Content-Range": f"bytes {first}-{last}/{len(BODY)}"})
        if self.drop_after_answer:
            self.close_connection = True

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        # A client that stopped reading a whole object closes its end.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a connection the client dropped mid-answer, on purpose


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.connections = []
    _Handler.drop_after_answer = False
    _Handler.ignore_range = False
    httpd = _Server(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _reader() -> Reader:
    return Reader(ca_file=None, connect_timeout_s=5, read_timeout_s=5, max_idle_per_host=4)


def test_reads_reuse_one_connection_and_return_headers_in_lower_case(server: str) -> None:
    reader = _reader()
    for _ in range(5):
        answer = reader.get(f"{server}/b/k.png?X-Amz-Signature=s", {"Range": "bytes=0-99"}, 100, 1000)
        assert answer.status == 206
        assert answer.body == BODY[:100]
        assert answer.headers["etag"] == '"abc"'
        assert answer.headers["content-range"] == f"bytes 0-99/{len(BODY)}"
    reader.close()
    assert len(_Handler.connections) == 1


def test_a_connection_the_server_closed_is_replaced_without_failing_the_read(server: str) -> None:
    _Handler.drop_after_answer = True
    reader = _reader()
    for _ in range(3):
        answer = reader.get(f"{server}/b/k.png", {"Range": "bytes=0-9"}, 10, 1000)
        assert answer.body == BODY[:10]
    reader.close()
    assert len(_Handler.connections) == 3


def test_a_server_ignoring_the_range_costs_the_connection_not_the_whole_object(server: str) -> None:
    _Handler.ignore_range = True
    reader = _reader()
    answer = reader.get(f"{server}/b/k.png", {"Range": "bytes=0-99"}, 100, 1000)
    assert answer.status == 200 and answer.body == BODY[:100]
    reader.get(f"{server}/b/k.png", {"Range": "bytes=0-99"}, 100, 1000)
    reader.close()
    assert len(_Handler.connections) == 2, "a connection with a body left unread is not reused"


def test_an_error_answer_is_read_up_to_its_own_limit(server: str) -> None:
    reader = _reader()
    answer = reader.get(f"{server}/missing/k.png", {"Range": "bytes=0-9"}, 10, 64)
    assert answer.status == 404
    assert answer.body.startswith(b"<Error><Code>NoSuchKey</Code>") and len(answer.body) == 64
    reader.close()


def test_an_unreachable_server_raises_the_standard_librarys_error() -> None:
    reader = _reader()
    with pytest.raises(OSError):
        reader.get("http://127.0.0.1:1/b/k.png", {}, 10, 10)
