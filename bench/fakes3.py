"""A fast S3 stand-in for benchmarks: ListObjectsV2, HeadBucket, and PUT/GET (ranged or whole) of objects held
in memory, over keep-alive connections.

moto_server renders every page from Python objects and closes every connection (~260 requests/s here, about
2.5 ms of its CPU each), so against it the client waits on the server. This one answers from a sorted key list
whose `<Contents>` elements are rendered once: a page of 1000 is a join of pre-rendered bytes. Signatures are
not checked (nor are they by moto_server). GET /_stats answers what it served, by kind: a ranged GET (what
irlive's workers send) apart from a whole one (what the seller sends).

Run it as its own process (`python -m bench.fakes3 --keys N`): it prints its port on the first line of stdout,
then serves until killed. The generated keys are empty objects; PUT adds real ones.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import hashlib
import json
import sys
import threading
import time
from collections import Counter
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
        self.bodies: dict[str, tuple[bytes, str]] = {}  # key -> (body, its ETag)
        self.lock = threading.Lock()

    def put(self, key: str, body: bytes) -> str:
        """Store an object; its listing entry carries its real ETag and size. Returns the ETag."""
        etag = hashlib.md5(body).hexdigest()  # what S3 puts in a single-part ETag
        entry = _contents(quote(key, safe="/"), f"&quot;{etag}&quot;", len(body))
        with self.lock:
            i = bisect.bisect_left(self.keys, key)
            if i < len(self.keys) and self.keys[i] == key:
                self.encoded[i] = entry
            else:
                self.keys.insert(i, key)
                self.encoded.insert(i, entry)
            self.bodies[key] = (body, etag)
        return etag

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


def _contents(key_xml: str, etag: str = ETAG, size: int = 0) -> bytes:
    return (f"<Contents><Key>{key_xml}</Key><LastModified>{LAST_MODIFIED}</LastModified><ETag>{etag}</ETag>"
            f"<Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>").encode()


def _decode_aws_chunked(body: bytes) -> bytes:
    """The payload of botocore's aws-chunked upload encoding: hex size lines, data, a zero chunk, trailers."""
    out: list[bytes] = []
    i = 0
    while True:
        eol = body.index(b"\r\n", i)
        size = int(body[i:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[eol + 2:eol + 2 + size])
        i = eol + 2 + size + 2


class Handler(BaseHTTPRequestHandler):
    """Path-style requests: HEAD /bucket, GET /bucket?list-type=2..., GET /bucket?location."""

    protocol_version = "HTTP/1.1"  # keep-alive: botocore reuses its pooled connections
    # Headers and body leave in one write (flushed after each request): written apart, Nagle's algorithm holds
    # the body until the client's delayed ACK of the headers, 40 ms on Linux.
    wbufsize = 64 * 1024
    buckets: ClassVar[dict[str, Bucket]] = {}
    served: ClassVar[Counter[str]] = Counter()
    # S3's own time to first byte (--latency-ms): every answer but /_stats waits this long, each on its thread.
    latency_s: ClassVar[float] = 0.0

    def handle_expect_100(self) -> bool:
        # botocore sends PUT bodies after "Expect: 100-continue": the interim answer must leave at once, not
        # wait in the write buffer (the client would give up waiting after a second and send anyway).
        ok = super().handle_expect_100()
        self.wfile.flush()
        return ok

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: a log line per page would cost more than the page."""

    def _target(self) -> tuple[Bucket | None, str, dict[str, str]]:
        parts = urlsplit(self.path)
        name = unquote(parts.path.strip("/").split("/", 1)[0])
        rest = parts.path.strip("/")[len(name):].strip("/")
        query = {k: v[0] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        return self.buckets.get(name), rest, query

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/xml",
              headers: dict[str, str] | None = None) -> None:
        if self.latency_s and self.path != "/_stats":
            time.sleep(self.latency_s)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
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
        self.served["head"] += 1
        if bucket is None:
            self._send(404)
        elif rest:
            self._send(200 if rest in bucket.bodies else 404)
        else:
            self._send(200)

    def do_GET(self) -> None:
        if self.path == "/_stats":
            self._send(200, json.dumps(self.served).encode(), "application/json")
            return
        if urlsplit(self.path).path == "/":
            names = "".join(f"<Bucket><Name>{escape(n)}</Name><CreationDate>{LAST_MODIFIED}</CreationDate></Bucket>"
                            for n in sorted(self.buckets))
            self._send(200, f'<ListAllMyBucketsResult xmlns="{NS}"><Buckets>{names}</Buckets>'
                            "</ListAllMyBucketsResult>".encode())
            return
        bucket, rest, query = self._target()
        if bucket is None:
            self._error(404, "NoSuchBucket")
        elif rest:
            self._object(bucket, rest)
        elif "location" in query:
            self._send(200, f'<LocationConstraint xmlns="{NS}"/>'.encode())
        elif query.get("list-type") == "2":
            self.served["list"] += 1
            self._send(200, bucket.page(query))
        else:
            self._error(501, "NotImplemented")

    def _object(self, bucket: Bucket, key: str) -> None:
        stored = bucket.bodies.get(key)
        if stored is None:
            self._error(404, "NoSuchKey")
            return
        body, etag = stored[0], f'"{stored[1]}"'
        ranged = self.headers.get("Range", "")
        self.served["ranged_get" if ranged else "get"] += 1
        if not ranged:
            self._send(200, body, "application/octet-stream", {"ETag": etag})
            return
        first, _, last = ranged.removeprefix("bytes=").partition("-")
        if not first:
            start, end = max(0, len(body) - int(last)), len(body) - 1
        else:
            start, end = int(first), min(len(body) - 1, int(last) if last else len(body) - 1)
        if start >= len(body):
            self._error(416, "InvalidRange")
            return
        self._send(206, body[start:end + 1], "application/octet-stream",
                   {"ETag": etag, "Content-Range": f"bytes {start}-{end}/{len(body)}"})

    def do_PUT(self) -> None:
        bucket, rest, _ = self._target()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.served["put"] += 1
        if bucket is None:
            self._error(404, "NoSuchBucket")
            return
        if not rest:
            self._send(200)  # CreateBucket of one that exists
            return
        if self.headers.get("x-amz-decoded-content-length") is not None:
            body = _decode_aws_chunked(body)
        etag = bucket.put(unquote(rest), body)
        self._send(200, headers={"ETag": f'"{etag}"'})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The seller fetches ten images per call for every call in flight: hundreds of connections at once.
    request_queue_size = 1024


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fakes3", description=__doc__)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--bucket", default="bench-in")
    p.add_argument("--prefix", default="bench")
    p.add_argument("--layout", choices=("flat", "dated"), default="flat")
    p.add_argument("--empty", action="append", default=["bench-out"], help="an empty bucket (repeatable)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="time before every answer (S3's first-byte latency: 10-30 ms for a small GET in-region)")
    ns = p.parse_args(argv)
    Handler.latency_s = ns.latency_ms / 1000
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
