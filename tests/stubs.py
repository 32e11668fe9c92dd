"""In-process stand-ins for the fast tests of the core: a fake Redis that runs the real Lua scripts (fakeredis
with lupa), S3 in memory, and a scripted seller behind httpx's MockTransport. The real-process tests stay;
these drive every branch of the pipeline in milliseconds."""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote, unquote, urlsplit

import fakeredis
import httpx

from worker.config import Settings
from worker.errors import NotFound
from worker.flow.claims import Claims
from worker.flow.inline import InlineExecutor
from worker.flow.limiter import RateLimiter, RateSpec
from worker.flow.pipeline import Deps
from worker.flow.runs import Runs
from worker.keys import Keys
from worker.money.budgets import Budgets
from worker.money.ledger import Ledger
from worker.money.methods import TokenOverHttp
from worker.seams.marketplace import Marketplace
from worker.seams.storage import ObjectInfo, Storage
from worker.seams.store import Store

SERVICE = "infrared-face-liveness-detection"


def etag_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class StubStorage:
    """The Storage methods the pipeline uses, over objects in memory; counts every request."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.requests: Counter[str] = Counter()
        # Documents read back with get_json (tests read manifests through it too: not counted as requests).
        self.read_back: list[str] = []

    def put(self, bucket: str, key: str, data: bytes) -> str:
        self.objects[(bucket, key)] = data
        return etag_of(data)

    def read_head(self, bucket: str, key: str, max_bytes: int) -> tuple[ObjectInfo, bytes]:
        self.requests["get"] += 1
        data = self._get(bucket, key)
        return ObjectInfo(key, len(data), etag_of(data)), data[:max_bytes]

    def read_range(self, bucket: str, key: str, byte_range: str, etag: str | None = None) -> bytes:
        self.requests["get"] += 1
        data = self._get(bucket, key)
        if etag and etag != etag_of(data):
            raise NotFound(f"s3://{bucket}/{key}: changed")
        first, _, last = byte_range.removeprefix("bytes=").partition("-")
        return data[-int(last):] if not first else data[int(first):int(last) + 1]

    def presign_get(self, bucket: str, key: str, ttl_s: int, version_id: str | None = None) -> str:
        return f"https://s3.stub/{bucket}/{quote(key)}?X-Amz-Expires={ttl_s}&X-Amz-Signature=deadbeef"

    def current_etags(self, bucket: str, keys: list[str]) -> dict[str, str]:
        self.requests["list"] += 1
        return {k: etag_of(self.objects[(bucket, k)]) for k in keys if (bucket, k) in self.objects}

    def put_json(self, bucket: str, key: str, doc: Any) -> str:
        return self.put_bytes(bucket, key, json.dumps(doc, sort_keys=True).encode(), "application/json")

    def put_bytes(self, bucket: str, key: str, body: bytes, content_type: str) -> str:
        self.requests["put"] += 1
        return self.put(bucket, key, body)

    def get_json(self, bucket: str, key: str) -> tuple[Any, str]:
        self.read_back.append(key)
        data = self._get(bucket, key)
        return json.loads(data), etag_of(data)

    def get_bytes(self, bucket: str, key: str) -> bytes:
        return self._get(bucket, key)

    def _get(self, bucket: str, key: str) -> bytes:
        try:
            return self.objects[(bucket, key)]
        except KeyError:
            raise NotFound(f"s3://{bucket}/{key}: not found") from None


@dataclass
class StubSeller:
    """A scripted marketplace: settle-first tokens, and per call the next scripted behaviour (else 'ok').

    Behaviours: ok, 429, 503 (consumes the token), timeout (consumes, then no answer), 401, 402, garbage (a 200
    whose body is not JSON), nested (a 200 whose Result is too deeply nested to read), missing_last (the last
    image's element is missing), download_refused (400 InvalidImage.Download for the whole call, as a seller
    fetching from an overloaded store answers). Any call carrying one of `bad_keys` is refused so too.
    """

    price_cents: int = 20
    script: deque[str] = field(default_factory=deque)
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)  # keys per call that reached the upstream
    billed: Counter[str] = field(default_factory=Counter)
    bad_keys: set[str] = field(default_factory=set)
    # Called with the keys of each call once the token is consumed, before answering (to change the world).
    on_call: Any = None
    # The marketplace may send data.Result as a JSON-encoded string (the docs say either).
    result_as_string: bool = False

    # A chunk's calls may run together (worker/flow/pipeline.py): the seller's books change under one lock.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.startswith("/api/tools/"):
            return self._tool(request)
        with self._lock:
            return self._payments(request, path)

    def _payments(self, request: httpx.Request, path: str) -> httpx.Response:
        if path == "/api/payments" and request.method == "POST":
            pid = f"pay_{len(self.payments) + 1}"
            self.payments[pid] = {"paymentId": pid, "token": f"tok-{pid}", "amountCents": self.price_cents,
                                  "status": "paid", "remainingCalls": 1, "currency": "USD"}
            return httpx.Response(201, json=self.payments[pid])
        if path.startswith("/api/payments/"):
            doc = dict(self.payments[path.rsplit("/", 1)[1]])
            doc.pop("token")
            return httpx.Response(200, json=doc)
        return httpx.Response(404, json={"error": "no such path"})

    def _tool(self, request: httpx.Request) -> httpx.Response:
        token = request.headers.get("X-Payment-Token")
        if not token:
            return httpx.Response(402, json={"x402Version": 1, "serviceId": SERVICE, "priceCents": self.price_cents,
                                             "currency": "USD"})
        urls = [t["ImageURL"] for t in json.loads(request.content)["Tasks"]]
        keys = [unquote(urlsplit(u).path).split("/", 2)[2] for u in urls]
        with self._lock:
            payment = next((p for p in self.payments.values() if p["token"] == token), None)
            behaviour = self.script.popleft() if self.script else "ok"
            if behaviour == "402" or payment is None or not payment["remainingCalls"]:
                return httpx.Response(402, json={"error": "payment token already used"})
            if behaviour == "429":
                return httpx.Response(429, json={"error": "slow down"}, headers={"Retry-After": "0.01"})
            if behaviour == "401":
                return httpx.Response(401, json={"error": "API key missing or invalid"})
            payment["remainingCalls"] = 0  # settle first: from here on the call is paid for
            self.calls.append(keys)
            self.billed.update(keys)
            request_id = f"req-{len(self.calls)}"
        if self.on_call is not None:
            self.on_call(keys)
        if behaviour == "503":
            return httpx.Response(503, json={"Code": "ServiceUnavailable", "Message": "try later"})
        if behaviour == "timeout":
            raise httpx.ReadTimeout("the answer never came", request=request)
        if self.bad_keys & set(keys) or behaviour == "download_refused":
            return httpx.Response(400, json={"Code": "InvalidImage.Download", "Message": "cannot fetch"})
        if behaviour == "garbage":
            return httpx.Response(200, content=b"<html>oops</html>")
        elements = [{"FaceNumber": 1, "ImageURL": u, "Results": [
            {"Label": "normal", "Rate": 99.5, "Suggestion": "pass", "MessageTips": "",
             "Rect": {"Left": 1, "Top": 2, "Width": 3, "Height": 4}}]} for u in urls]
        if behaviour == "missing_last":
            elements = elements[:-1]
        result: Any = {"RequestId": "up-1", "Data": {"Elements": elements}}
        if behaviour == "nested":
            result = "[" * 100_000 + "]" * 100_000
        if self.result_as_string and not isinstance(result, str):
            result = json.dumps(result)
        body = {"code": "200", "message": "success", "requestId": request_id, "content": "",
                "data": {"Action": "DetectInfraredLivingFace", "Result": result}}
        return httpx.Response(200, json=body)


@dataclass
class Harness:
    """A pipeline's dependencies over the stand-ins, with the parts a test looks at."""

    deps: Deps
    storage: StubStorage
    seller: StubSeller
    redis: fakeredis.FakeRedis
    sleeps: list[float]


def harness(settings: Settings | None = None, seller: StubSeller | None = None) -> Harness:
    settings = settings or Settings(output=None, token_pool_size=0, rate_limit_per_s=1000.0, max_in_flight=0)
    client = fakeredis.FakeRedis(decode_responses=True)
    store = Store(client)
    keys = Keys()
    seller = seller or StubSeller()
    market = Marketplace("http://seller.stub", SERVICE, transport=httpx.MockTransport(seller.handle), timeout_s=5)
    ledger = Ledger(store, keys, market, Budgets(store, keys, settings.daily_budget_cents),
                    max_price_cents=settings.max_price_cents, lease_s=60,
                    max_unknown_purchases=settings.max_unknown_purchases)
    storage = StubStorage()
    sleeps: list[float] = []
    deps = Deps(settings=settings, store=store, storage=cast(Storage, storage), market=market,
                method=TokenOverHttp(market), ledger=ledger,
                limiter=RateLimiter(store, keys, RateSpec(settings.rate_limit_per_s, max_in_flight=0),
                                    sleep=sleeps.append),
                runs=Runs(store, keys), claims=Claims(store, keys), sleep=sleeps.append, rng=random.Random(7),
                reads=InlineExecutor())
    return Harness(deps, storage, seller, client, sleeps)
