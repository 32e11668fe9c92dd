"""A fast S3 stand-in for listing benchmarks: ListObjectsV2 and HeadBucket over in-memory keys, nothing else.

moto_server renders every page from Python objects (~260 requests/s here), so against it the listing client
waits on the server. This one answers from a sorted key list whose `<Contents>` elements are rendered once, at
start: a page of 1000 is a join of pre-rendered bytes, so the client being measured is the bound.

Run it as its own process (`python -m bench.fakes3 --keys N`): it prints its port on the first line of stdout,
then serves until killed. Objects are empty-bodied and exist only in listings; GET/PUT of objects is 501.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import sys
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, quote, unquote, urlsplit
from xml.sax.saxutils import escape

MAX_KEYS = 1000
# One time for every object: what the client parses is the same string format S3 sends.
LAST_MODIFIED = "2026-11-29T10:11:12.000Z"
ETAG = "&quot;d41d8cd98f00b204e9800998ecf8427e&quot;"
NS = "http://s3.amazonaws.com/doc/2006-03-01/"


def bench_keys(n: int, prefix: str = "bench", layout: str = "flat") -> list[str]:
    """The keys the benchmark lists: flat under prefix/, or in date partitions prefix/YYYY/MM/DD/ (30 days)."""
    if layout == "dated":
        return sorted(f"{prefix}/2026/11/{1 + i % 30:02d}/img_{i:07d}.png" for i in range(n))
    return [f"{prefix}/img_{i:07d}.png" for i in range(n)]


class Bucket:
    """One bucket's sorted keys with each object's `<Contents>` element rendered once, URL-encoded: botocore
    always asks for encoding-type=url (a client that does not gets its page rendered per request)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = sorted(keys)
        self.encoded = [_contents(quote(k, safe="/")) for k in self.keys]

    def page(self, query: dict[str, str]) -> bytes:
        """One ListObjectsV2 page: prefix, delimiter (CommonPrefixes), start-after, continuation-token, max-keys."""
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        max_keys = max(0, min(MAX_KEYS, int(query.get("max-keys", MAX_KEYS))))
        url = query.get("encoding-type") == "url"
        token = query.get("continuation-token")
        after = base64.urlsafe_b64decode(token).decode() if token else query.get("start-after", "")
        i = bisect.bisect_right(self.keys, after) if after else bisect.bisect_left(self.keys, prefix)
        parts: list[bytes] = []
        commons: list[str] = []
        last = ""
        count = 0
        while i < len(self.keys) and count < max_keys:
            key = self.keys[i]
            if not key.startswith(prefix):
                break
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            if cut >= 0:
                common = key[:cut + len(delimiter)]
                commons.append(common)
                last = common
                # Every key under the common prefix is rolled up into it: go past them all.
                i = bisect.bisect_left(self.keys, common[:-1] + chr(ord(common[-1]) + 1))
            else:
                parts.append(self.encoded[i] if url else _contents(escape(key)))
                last = key
                i += 1
            count += 1
        truncated = i < len(self.keys) and self.keys[i].startswith(prefix)

        def enc(text: str) -> str:
            return quote(text, safe="/") if url else escape(text)

        head = [f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{NS}"><Name>bench</Name>'
                f"<Prefix>{enc(prefix)}</Prefix><KeyCount>{count}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"]
        if delimiter:
            head.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
        if url:
            head.append("<EncodingType>url</EncodingType>")
        if token:
            head.append(f"<ContinuationToken>{token}</ContinuationToken>")
        if truncated:
            head.append(f"<NextContinuationToken>{base64.urlsafe_b64encode(last.encode()).decode()}"
                        "</NextContinuationToken>")
        tail = "".join(f"<CommonPrefixes><Prefix>{enc(c)}</Prefix></CommonPrefixes>" for c in commons)
        return b"".join([("".join(head)).encode(), *parts, tail.encode(), b"</ListBucketResult>"])


def _contents(key_xml: str) -> bytes:
    return (f"<Contents><Key>{key_xml}</Key><LastModified>{LAST_MODIFIED}</LastModified><ETag>{ETAG}</ETag>"
            "<Size>0</Size><StorageClass>STANDARD</StorageClass></Contents>").encode()


class Handler(BaseHTTPRequestHandler):
    """Path-style requests: HEAD /bucket, GET /bucket?list-type=2..., GET /bucket?location."""

    protocol_version = "HTTP/1.1"  # keep-alive: botocore reuses its pooled connections
    buckets: ClassVar[dict[str, Bucket]] = {}

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a log line per page would cost more than the page."""

    def _target(self) -> tuple[Bucket | None, str, dict[str, str]]:
        parts = urlsplit(self.path)
        name = unquote(parts.path.strip("/").split("/", 1)[0])
        rest = parts.path.strip("/")[len(name):].strip("/")
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        return self.buckets.get(name), rest, query

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "fakes3")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str) -> None:
        self._send(status, f"<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{code}</Message>"
                           "</Error>".encode())

    def do_HEAD(self) -> None:
        bucket, rest, _ = self._target()
        if bucket is None:
            self._send(404)
        elif rest:
            self._send(501)
        else:
            self._send(200)

    def do_GET(self) -> None:
        bucket, rest, query = self._target()
        if bucket is None:
            self._error(404, "NoSuchBucket")
        elif rest:
            self._error(501, "NotImplemented")
        elif "location" in query:
            self._send(200, f'<LocationConstraint xmlns="{NS}"/>'.encode())
        elif query.get("list-type") == "2":
            self._send(200, bucket.page(query))
        else:
            self._error(501, "NotImplemented")

    def do_PUT(self) -> None:
        self._error(501, "NotImplemented")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fakes3", description=__doc__)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--bucket", default="bench-in")
    p.add_argument("--prefix", default="bench")
    p.add_argument("--layout", choices=("flat", "dated"), default="flat")
    p.add_argument("--empty", action="append", default=["bench-out"], help="an empty bucket (repeatable)")
    p.add_argument("--port", type=int, default=0)
    ns = p.parse_args(argv)
    Handler.buckets = {ns.bucket: Bucket(bench_keys(ns.keys, ns.prefix, ns.layout)),
                       **{name: Bucket([]) for name in ns.empty}}
    server = Server(("127.0.0.1", ns.port), Handler)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
