"""One paid tool call whatever pays for it (token, x402, MCP): shared state, rate limit, settlement, faults."""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from sandbox import upstream, x402_seller
from sandbox.config import SandboxConfig, updated
from sandbox.ledger import CachedAnswer, Ledger, Settlement, TokenRefused
from sandbox.x402_seller import X402Refused

# The knobs that make the next N tool calls fail one way, counted down as calls meet them.
COUNTDOWNS = frozenset({"download_refusals", "forced_timeouts"})

__all__ = ["Answer", "State", "payment_required", "token_call", "x402_call"]


class Gcra:
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


class State:
    """What every request thread shares; the config is swapped whole, never edited in place."""

    def __init__(self, config: SandboxConfig) -> None:
        self.config = updated(config, {})
        self.ledger = Ledger()
        self.gcra = Gcra()
        self.rng = random.Random(config.seed)
        self.rng_lock = threading.Lock()
        self.stopping = threading.Event()
        # Straight to the image host, like the upstream: a proxy from the environment would not see 127.0.0.1.
        self.client = httpx.Client(trust_env=False)
        # The knobs that count the next N calls down: what each has left.
        self._left = {name: getattr(self.config, name) for name in COUNTDOWNS}

    def take_download_refusal(self) -> bool:
        """Whether this call's downloads are refused (one of config.download_refusals, counted down)."""
        return self._take("download_refusals")

    def take_forced_timeout(self) -> bool:
        """Whether this call hangs after settling (one of config.forced_timeouts, counted down)."""
        return self._take("forced_timeouts")

    def _take(self, name: str) -> bool:
        with self.rng_lock:
            if self._left[name] <= 0:
                return False
            self._left[name] -= 1
            return True

    def rolls(self, n: int) -> list[float]:
        with self.rng_lock:
            return [self.rng.random() for _ in range(n)]

    def reconfigure(self, changes: dict[str, Any]) -> SandboxConfig:
        new = updated(self.config, changes)
        with self.rng_lock:
            if "seed" in changes:
                self.rng.seed(new.seed)
            for name in COUNTDOWNS & changes.keys():
                self._left[name] = getattr(new, name)
        self.config = new
        return new


@dataclass(frozen=True)
class Answer:
    """What a tool call answers, whichever transport carries it back."""

    status: int
    body: upstream.Body
    headers: dict[str, str] = field(default_factory=dict)
    # The parsed document for answers the sandbox itself wrote (refusals), so MCP need not re-read the bytes.
    doc: Any = None


def json_answer(status: int, doc: Any, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, upstream.json_body(doc), headers or {}, doc)


def payment_required(state: State, service_id: str, resource: str, error: str) -> Answer:
    """402 with the offer: x402 v1 in the body, v2 in the PAYMENT-REQUIRED header, `error` saying why."""
    state.ledger.count("rejected_402")
    offer = x402_seller.offer_for(state.config, service_id, resource)
    return json_answer(402, offer.v1_body(error), {"PAYMENT-REQUIRED": offer.v2_header(error)})


def _admit(state: State, load: Callable[[], Any]) -> list[str] | Answer:
    """The call's image URLs, or the answer that turns it away: 400 for a body that is not Tasks, 429 over the rate
    limit (both before any payment is taken)."""
    try:
        urls = upstream.parse_tasks(load())
    except ValueError as invalid:
        state.ledger.count("rejected_400")
        return json_answer(400, {"error": str(invalid)})
    wait = state.gcra.acquire(state.config.rate_limit_per_s, state.config.rate_burst)
    if wait > 0:
        state.ledger.count("throttled")
        return throttled(state.config, wait)
    return urls


def token_call(state: State, service_id: str, token: str | None, load: Callable[[], Any], resource: str) -> Answer:
    """A call paid by a marketplace token: settled first, refunded on failure only if the config says so."""
    config = state.config
    ledger = state.ledger
    if not token:
        return payment_required(state, service_id, resource, "payment required")
    try:
        ledger.check(token, service_id)
    except TokenRefused as refused:
        return payment_required(state, service_id, resource, str(refused))
    urls = _admit(state, load)
    if isinstance(urls, Answer):
        return urls
    paths = [upstream.url_path(url) for url in urls]
    try:
        payment = ledger.consume(token, service_id, paths)
    except TokenRefused as refused:
        # Another call spent the same token between the check and here.
        return payment_required(state, service_id, resource, str(refused))
    status, body = run_upstream(state, config, urls)
    if status != 200 and not config.failed_calls_consume_token:
        ledger.restore(payment, paths)
    return Answer(status, body)


def x402_call(state: State, service_id: str, header: str, value: str, load: Callable[[], Any], resource: str) -> Answer:
    """A call paid by an x402 signature: verified first, settled only after a 2xx answer (as the reference
    middleware does), so a failed call is not charged on this path whatever failed_calls_consume_token says."""
    config = state.config
    ledger = state.ledger
    offer = x402_seller.offer_for(config, service_id, resource)
    version = x402_seller.REQUEST_HEADERS[header][0]
    try:
        verified = x402_seller.verify(value, version, offer, time.time())
    except X402Refused as refused:
        ledger.count("x402_refused")
        return payment_required(state, service_id, resource, refused.reason)
    if verified.payment_id is not None:
        cached = ledger.cached_answer(verified.payment_id)
        if cached is not None and cached.digest != verified.digest:
            return json_answer(409, {"error": "payment-identifier already used with a different payment payload"})
        if cached is not None:
            return Answer(cached.status, upstream.Body(len(cached.body), (cached.body,), cached.content_type),
                          dict(cached.headers))  # fmt: skip
    if not ledger.reserve_nonce(verified.nonce):
        ledger.count("x402_refused")
        return payment_required(state, service_id, resource, x402_seller.ERR_NONCE_USED)
    settled = False
    try:
        urls = _admit(state, load)
        if isinstance(urls, Answer):
            return urls
        status, body = run_upstream(state, config, urls)
        if not 200 <= status < 300:
            ledger.count("x402_unsettled")
            return Answer(status, body)
        if time.time() >= verified.valid_before:
            # Settled on a chain, an authorization past its validBefore is refused: the answer is not given (the
            # reference middleware answers 402 when settlement fails).
            ledger.count("x402_unsettled")
            return payment_required(state, service_id, resource, x402_seller.ERR_VALID_BEFORE)
        transaction = x402_seller.transaction_hash(offer, verified)
        settlement = Settlement(verified.payer, transaction, offer.amount, offer.network, service_id, time.time())
        ledger.settle_x402(verified.nonce, settlement, [upstream.url_path(url) for url in urls])
        settled = True
        name, header_value = x402_seller.settlement_header(offer, verified, transaction)
        if verified.payment_id is None:
            return Answer(status, body, {name: header_value})
        # Only an answer that will be replayed is held in memory; others stream as they are made.
        data = b"".join(body.pieces)
        cached = CachedAnswer(verified.digest, status, data, body.content_type, ((name, header_value),))
        ledger.cache_answer(verified.payment_id, cached)
        return Answer(status, upstream.Body(len(data), (data,), body.content_type), {name: header_value})
    finally:
        if not settled:
            ledger.release_nonce(verified.nonce)


def throttled(config: SandboxConfig, wait: float) -> Answer:
    if config.throttle_style == "400":
        error = upstream.UpstreamError("Throttling.User", "Request was denied due to user flow control.")
        return json_answer(400, error.body())
    seconds = f"{math.ceil(wait * 1000) / 1000:.3f}".rstrip("0").rstrip(".")
    doc = {"error": "rate limit exceeded", "retryAfter": float(seconds)}
    # The body keeps the real wait; only the header is replaced, since that is what clients obey.
    return json_answer(429, doc, {"Retry-After": config.retry_after or seconds})


def run_upstream(state: State, config: SandboxConfig, urls: list[str]) -> tuple[int, upstream.Body]:
    ledger = state.ledger
    fail_roll, timeout_roll, kind_roll = state.rolls(3)
    if config.latency_ms > 0:
        state.stopping.wait(config.latency_ms / 1000)
    if timeout_roll < config.p_timeout or state.take_forced_timeout():
        ledger.count("timeouts")
        # Longer than any sane client timeout: the caller sees a read timeout on a spent token.
        state.stopping.wait(config.timeout_sleep_s)
    if state.stopping.is_set():
        return shutting_down()
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
            return shutting_down()
    if state.take_download_refusal():
        ledger.count("upstream_errors")
        refused = upstream.UpstreamError("InvalidImage.Download", "Failed to download the image: HTTP 503.")
        return refused.status, upstream.json_body(refused.body())
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


def shutting_down() -> tuple[int, upstream.Body]:
    shutting = upstream.UpstreamError("ServiceUnavailable", "The sandbox is shutting down.", 503)
    return shutting.status, upstream.json_body(shutting.body())
