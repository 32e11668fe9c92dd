"""The marketplace HTTP client: price quote, payments, paid calls; the only place that catches httpx errors."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import httpx

from worker.config import TOOL_PATH, Settings, pool_listing
from worker.errors import (
    ConfigError,
    IrliveError,
    NeverSent,
    OutcomeUnknown,
    PaymentRejected,
    PermanentInputError,
    PurchaseRefused,
    PurchaseUnknown,
    RateLimited,
    TransientError,
    UnreadableAnswer,
)
from worker.judge.verdicts import parse_json_int, safe_text
from worker.ops.redact import redact

MAX_ANSWER_BYTES = 8 * 1024 * 1024
TOO_LARGE = f"marketplace answer larger than {MAX_ANSWER_BYTES} bytes; dropped"
_PERMANENT_CODES = ("InvalidImage", "InvalidFile", "IllegalUrlParameter", "ParameterError",
                    "InvalidParameter", "MissingParameter")
_CONFIG_CODES = ("AuthFailed", "InvalidApi", "Forbidden", "InvalidAccessKeyId", "NoPermission")
_TRANSIENT_CODES = ("InternalError", "ServiceUnavailable", "Timeout", "SystemBusy")
_SECRET_QUERY = ("x-amz-signature", "x-amz-security-token", "signature")


@dataclass(frozen=True)
class Quote:
    """What the seller asks per call, read from the 402 answer before any payment."""

    price_cents: int
    service_id: str | None


@dataclass(frozen=True)
class Payment:
    """A payment as the marketplace reports it; the token is never printed."""

    payment_id: str
    amount_cents: int | None
    status: str
    remaining_calls: int | None
    expires_at: str | None
    token: str | None = field(default=None, repr=False)
    # Which field carried the token ("token" or "paymentToken": the docs leave it open).
    token_field: str | None = None


@dataclass(frozen=True)
class CallAnswer:
    """A successful call: the request id, the raw `data.Result` (object or JSON string), the body's bytes."""

    request_id: str | None
    result: Any
    raw: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class RawAnswer:
    """A tool endpoint's answer as received: status, headers, body (capped), Retry-After."""

    status: int
    headers: dict[str, str] = field(repr=False)
    raw: bytes = field(repr=False)
    retry_after: float | None = None


@dataclass(frozen=True)
class Endpoint:
    """A deployment's base URL, the headers every request carries (the API key among them), the timeout."""

    base_url: str
    headers: dict[str, str] = field(repr=False)
    timeout_s: float


class Marketplace:
    """A synchronous client of one marketplace deployment: the price, payments, and the paid call over its HTTP
    tool endpoint; thread-safe, one per worker process."""

    def __init__(
        self,
        base_url: str,
        service_id: str,
        *,
        api_key: str | None = None,
        api_key_header: str = "X-API-Key",
        timeout_s: float = 30.0,
        tool_path: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Accept": "application/json", "User-Agent": "irlive/0.1"}
        if api_key:
            headers[api_key_header] = api_key
        self.service_id = service_id
        self._tool_path = tool_path or TOOL_PATH.replace("{service_id}", service_id)
        # Which pool its tokens wait in ('' for the default listing): worker.config.listing_name.
        self.pool_listing = pool_listing(service_id, self._tool_path)
        self._endpoint = Endpoint(base_url, dict(headers), timeout_s)
        self._client = httpx.Client(
            base_url=base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            transport=transport,
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
        )

    @classmethod
    def for_settings(cls, settings: Settings, *, timeout_s: float | None = None) -> Marketplace:
        """The client of the configured deployment: its URL, listing, tool path and API key."""
        return cls(settings.marketplace_url, settings.service_id, api_key=settings.api_key,
                   api_key_header=settings.api_key_header, tool_path=settings.tool_endpoint,
                   timeout_s=settings.call_timeout_s if timeout_s is None else timeout_s)

    def close(self) -> None:
        self._client.close()

    def quote(self) -> Quote:
        """Ask the tool endpoint without paying; the 402 answer carries the price."""
        return parse_quote(self._price_probe())

    def offer(self) -> RawAnswer:
        """The tool endpoint's 402 answer to an unpaid call, as received (for x402: what to sign for)."""
        response = self._price_probe()
        return RawAnswer(402, dict(response.headers), response.content)

    def _price_probe(self) -> httpx.Response:
        probe = {"Tasks": [{"ImageURL": "https://example.com/irlive-price-probe.png"}]}
        with self._translate(sent_means_unknown=False):
            response = self._client.post(self._tool_path, json=probe)
        self._check_tool_exists(response)
        if response.status_code != 402:
            if response.status_code >= 300:
                _raise_for(response, _json_or_none(response))
            raise ConfigError(f"price probe expected HTTP 402, got {response.status_code}")
        return response

    def post_tool(self, payload: Any, headers: dict[str, str]) -> RawAnswer:
        """POST `payload` to the tool endpoint with extra `headers` (a payment): the answer as received. NeverSent
        if it certainly never left, OutcomeUnknown if it left and no answer came back; the headers' values never
        appear in an error."""
        try:
            request = self._client.build_request("POST", self._tool_path, json=payload, headers=headers)
        except (UnicodeError, ValueError):
            raise PaymentRejected("the payment cannot be sent in an HTTP header") from None
        with self._translate(sent_means_unknown=True):
            response = self._client.send(request, stream=True)
            try:
                raw = _read_capped(response)
            finally:
                response.close()
        self._check_tool_exists(response)
        return RawAnswer(response.status_code, dict(response.headers), raw, _retry_after(response))

    def create_payment(self) -> Payment:
        """Buy one token, with a usable token in the answer, or raise what says whether money may have moved:
        NeverSent, PurchaseRefused, RateLimited or ConfigError (nothing bought), or OutcomeUnknown (a timeout
        after sending, a 5xx, an answer without a readable payment and token: it may have been charged)."""
        with self._translate(sent_means_unknown=True):
            response = self._client.post("/api/payments", json={"serviceId": self.service_id})
        status = response.status_code
        body = _json_or_none(response)
        if status == 404:
            raise ConfigError(f"the marketplace does not know service {self.service_id!r} (IRLIVE_SERVICE_ID)")
        if status >= 500:
            raise PurchaseUnknown(f"the seller answered a purchase with {status} ({_shape(response, body)}): it "
                                  "may have charged for it")
        if status >= 300:
            try:
                _raise_for(response, body)
            except (TransientError, PaymentRejected) as exc:
                raise PurchaseRefused(f"the seller refused the purchase: {exc}") from None
        try:
            payment = parse_payment(body)
        except TransientError:
            raise PurchaseUnknown(f"the seller answered a purchase with {status} but no readable payment "
                                  f"({_shape(response, body)})") from None
        if payment.token is None:
            raise PurchaseUnknown(f"the seller answered a purchase with {status} and payment {payment.payment_id} "
                                  f"but no token under `token` or `paymentToken` ({_shape(response, body)})",
                                  payment.payment_id)
        return payment

    def get_payment(self, payment_id: str) -> Payment:
        with self._translate(sent_means_unknown=False):
            response = self._client.get(f"/api/payments/{payment_id}")
        body = _json_or_none(response)
        if response.status_code >= 300:
            try:
                _raise_for(response, body)
            except PaymentRejected as exc:
                # Reading a payment moves no money: a 402 here is the seller not answering the question.
                raise TransientError(str(exc)) from None
        return parse_payment(body)

    @property
    def endpoint(self) -> Endpoint:
        """Where this deployment is and what every request carries (its API key): for other ways to call it."""
        return self._endpoint

    def call(self, token: str, urls: list[str]) -> CallAnswer:
        """One paid call on the HTTP tool endpoint, the token in X-Payment-Token; raises the error tree on
        anything but a verdict."""
        # post_tool never quotes a header's value: a token that cannot be sent is refused without it.
        answer = self.post_tool({"Tasks": [{"ImageURL": u} for u in urls]}, {"X-Payment-Token": token})
        return read_answer(answer.status, answer.raw, token, urls, retry_after=answer.retry_after)

    def _check_tool_exists(self, response: httpx.Response) -> None:
        if response.status_code in (404, 405):
            # No tool there: a setting to fix, not trouble to wait out (the deployment may only expose the
            # legacy listing's path).
            raise ConfigError(
                f"the marketplace has no tool at POST {self._tool_path} ({response.status_code}): set "
                "IRLIVE_TOOL_PATH to the path this deployment exposes (its legacy listing is "
                "/api/tools/aliyun-facebody-detect-infrared-living-face), keeping IRLIVE_SERVICE_ID the id "
                "payments are bought for")

    @contextmanager
    def _translate(self, *, sent_means_unknown: bool) -> Iterator[None]:
        try:
            yield
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise NeverSent(f"marketplace unreachable: {type(exc).__name__}") from None
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.RemoteProtocolError, httpx.ReadError) as exc:
            what = f"marketplace connection failed after the request was sent: {type(exc).__name__}"
            if sent_means_unknown:
                raise OutcomeUnknown(what) from None
            raise TransientError(what) from None
        except httpx.HTTPError as exc:
            # Sent or not, we cannot tell (a decoding error comes after the seller answered).
            what = f"marketplace transport error: {type(exc).__name__}"
            if sent_means_unknown:
                raise OutcomeUnknown(what) from None
            raise TransientError(what) from None


def read_answer(status: int, raw: bytes, token: str, urls: list[str], *, retry_after: float | None = None
                ) -> CallAnswer:
    """A paid call's answer (its status and body, however it came) read by the error tree; the token and the
    URLs' signatures are scrubbed from any error's text."""
    try:
        body = _json_bytes_or_none(raw)
        if status >= 300:
            raise_for_status(status, body, retry_after)
        return parse_answer(body, raw)
    except IrliveError as exc:
        # The seller may echo the token or a URL in free text (or percent-encoded) that redact() misses.
        scrub(exc, token, urls)
        raise
    except Exception as exc:
        # Our reading of the answer failed (a library raised on hostile content): after a 2xx the call is
        # paid for, so it must end recorded, never retried as if nothing had been bought.
        if status < 300:
            raise UnreadableAnswer(f"the answer could not be read ({type(exc).__name__})", raw) from None
        raise TransientError(f"marketplace answered {status} with an unreadable body") from None


def parse_quote(response: httpx.Response) -> Quote:
    """Read the price from the 402 body, or from the base64 PAYMENT-REQUIRED header."""
    candidates: list[dict[str, Any]] = []
    body = _json_or_none(response)
    if isinstance(body, dict):
        candidates.append(body)
    header = response.headers.get("PAYMENT-REQUIRED")
    if header:
        try:
            decoded = json.loads(base64.b64decode(header))
            if isinstance(decoded, dict):
                candidates.append(decoded)
        except ValueError:
            pass
    for doc in candidates:
        cents = _price_cents(doc)
        if cents is not None:
            service = doc.get("serviceId")
            return Quote(cents, service if isinstance(service, str) else None)
    raise ConfigError("the marketplace's 402 answer carries no price irlive can read; refusing to pay")


# USDC contracts whose decimals (6) irlive knows without the seller saying so, by x402 network name.
_KNOWN_ASSETS = {
    ("base", "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"): 6,
    ("eip155:8453", "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"): 6,
    ("base-sepolia", "0x036cbd53842c5426634e7929541ec2318f3dcf7e"): 6,
    ("eip155:84532", "0x036cbd53842c5426634e7929541ec2318f3dcf7e"): 6,
}


def _price_cents(doc: dict[str, Any]) -> int | None:
    """The price in US cents, or None if this document states none; ConfigError for a price irlive must not
    guess at (negative, another currency, an asset whose decimals it cannot establish)."""
    currency = doc.get("currency")
    if isinstance(currency, str) and currency.strip().upper() not in ("USD", ""):
        raise ConfigError(f"the seller quotes in {currency!r}, not USD; irlive budgets in US cents and will not "
                          "convert: refusing to pay")
    for key in ("priceCents", "amountCents"):
        value = doc.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return _non_negative(math.ceil(value) if math.isfinite(value) else -1, key)
    price = doc.get("price")
    if isinstance(price, int | float | str) and not isinstance(price, bool):
        usd = _decimal(str(price).lstrip("$"))
        if usd is not None:
            return _non_negative(math.ceil(usd * 100), "price")
    accepts = doc.get("accepts")
    if not isinstance(accepts, list):
        return None
    unreadable = []
    for option in accepts:
        if not isinstance(option, dict):
            continue
        amount = _decimal(str(option.get("maxAmountRequired", option.get("amount", ""))))
        decimals = _asset_decimals(option)
        if amount is None or decimals is None:
            unreadable.append(str(option.get("asset", "?"))[:60])
            continue
        # x402 amounts are in the asset's smallest unit.
        return _non_negative(math.ceil(amount * 100 / (Decimal(10) ** decimals)), "accepts[].amount")
    if unreadable:
        raise ConfigError(f"the seller asks to be paid in assets whose decimals irlive cannot establish "
                          f"({', '.join(unreadable)}): refusing to guess a price")
    return None


def _asset_decimals(option: dict[str, Any]) -> int | None:
    extra = option.get("extra")
    if isinstance(extra, dict) and isinstance(extra.get("decimals"), int) and 0 <= extra["decimals"] <= 36:
        return int(extra["decimals"])
    key = (str(option.get("network", "")).lower(), str(option.get("asset", "")).lower())
    return _KNOWN_ASSETS.get(key)


def _non_negative(cents: int, field_name: str) -> int:
    if cents < 0:
        raise ConfigError(f"the seller quotes a negative or unreadable price ({field_name}): refusing to pay")
    return cents


def parse_payment(body: Any) -> Payment:
    if not isinstance(body, dict) or not isinstance(body.get("paymentId"), str | int):
        raise TransientError("payment answer has no paymentId")
    token_field = next((f for f in ("token", "paymentToken") if isinstance(body.get(f), str) and body[f]), None)
    token = body[token_field] if token_field else None
    amount = body.get("amountCents")
    remaining = body.get("remainingCalls")
    return Payment(
        payment_id=str(body["paymentId"]),
        amount_cents=amount if isinstance(amount, int) else None,
        status=str(body.get("status", "unknown")),
        remaining_calls=remaining if isinstance(remaining, int) else None,
        expires_at=body.get("expiresAt") if isinstance(body.get("expiresAt"), str) else None,
        token=token if isinstance(token, str) and token else None,
        token_field=token_field,
    )


def parse_answer(body: Any, raw: bytes) -> CallAnswer:
    """The 2xx envelope: `code` is a string; an error Code can still hide in a 2xx body."""
    if not isinstance(body, dict):
        raise TransientError(f"marketplace answer is not a JSON object ({len(raw)} bytes)")
    code = body.get("code")
    if code is not None and str(code) != "200":
        _raise_code(str(body.get("Code") or code), str(body.get("message") or body.get("Message") or ""), None)
    if isinstance(body.get("Code"), str):
        _raise_code(body["Code"], str(body.get("Message", "")), None)
    data = body.get("data")
    if not isinstance(data, dict) or "Result" not in data:
        raise TransientError("marketplace answer has no data.Result")
    result = data["Result"]
    inner = _json_text_or_none(result) if isinstance(result, str) else result
    if isinstance(inner, dict) and isinstance(inner.get("Code"), str):
        _raise_code(inner["Code"], str(inner.get("Message", "")), None)
    request_id = body.get("requestId")
    # Copied into every record: it must be short and encodable whatever the seller sent.
    rid = safe_text(request_id)[:200] if isinstance(request_id, str) else None if request_id is None else str(
        request_id)[:200]
    return CallAnswer(request_id=rid, result=result, raw=raw)


def _raise_for(response: httpx.Response, body: Any) -> None:
    raise_for_status(response.status_code, body, _retry_after(response))


def raise_for_status(status: int, body: Any, retry_after: float | None = None) -> None:
    """Raise the error tree's class for an error answer: its status, its JSON body (or None), its Retry-After."""
    doc = body if isinstance(body, dict) else {}
    code = doc.get("Code") or doc.get("code")
    message = str(doc.get("Message") or doc.get("message") or doc.get("error") or "")
    if status == 429:
        raise RateLimited(f"marketplace throttled the call: {redact(message)}", retry_after)
    if status in (401, 403):
        raise ConfigError(
            f"marketplace answered {status}: the API key (IRLIVE_API_KEY) is missing, wrong or not allowed "
            f"for {doc.get('serviceId', 'this service')}: {redact(message)}"
        )
    if status == 402:
        raise PaymentRejected(f"marketplace refused the payment token: {redact(message) or 'payment required'}")
    if isinstance(code, str) and not code.isdigit():
        _raise_code(code, message, retry_after)
    if status >= 500:
        raise TransientError(f"marketplace answered {status}: {redact(message)}")
    if status == 400:
        raise ConfigError(f"marketplace rejected the request body (400): {redact(message)}")
    raise TransientError(f"marketplace answered unexpected status {status}")


def is_permanent_code(code: str) -> bool:
    """An upstream Code that says the image itself is unacceptable (never retry it)."""
    return code.startswith(_PERMANENT_CODES)


def _raise_code(code: str, message: str, retry_after: float | None) -> None:
    text = f"{code}: {redact(message)}" if message else code
    if code.startswith("Throttling"):
        raise RateLimited(f"upstream throttled the call: {text}", retry_after)
    if code.startswith(_PERMANENT_CODES):
        raise PermanentInputError(text, code=code)
    if code.startswith(_CONFIG_CODES):
        raise ConfigError(f"the seller refused our credentials or API: {text}")
    if code.startswith(_TRANSIENT_CODES) or code[:1] == "5":
        raise TransientError(text)
    raise TransientError(f"unrecognised seller error {text}")


def _secrets_of(token: str, urls: list[str]) -> list[str]:
    """The token and each presigned URL's signature values, as sent and percent-encoded."""
    found = [token]
    for url in urls:
        for name, value in parse_qsl(urlsplit(url).query):
            if name.lower() in _SECRET_QUERY and value:
                found += [value, quote(value, safe="")]
    return [s for s in found if len(s) >= 4]


def scrub(exc: IrliveError, token: str, urls: list[str]) -> None:
    """Replace the token and the URLs' signatures in the exception's text arguments with ***, in place."""
    secrets = _secrets_of(token, urls)
    text_args: list[object] = []
    for arg in exc.args:
        if isinstance(arg, str):
            for secret in secrets:
                arg = arg.replace(secret, "***")
        text_args.append(arg)
    exc.args = tuple(text_args)


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date (RFC 9110); None if absent or unreadable.

    Huge or infinite values come back as they are (capped by the limiter, IRLIVE_MAX_RETRY_AFTER_S).
    """
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    number = _decimal(value.strip())
    if number is not None:
        return float(min(number, Decimal(10) ** 12)) if number >= 0 else None
    try:
        when = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _read_capped(response: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > MAX_ANSWER_BYTES:
            raise TransientError(TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


def _json_or_none(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, RecursionError, httpx.ResponseNotRead):
        # RecursionError: JSON nested deeper than Python's parser goes is no answer either.
        return None


def _shape(response: httpx.Response, body: Any) -> str:
    """What an answer looked like, without any of its values (a purchase's answer may hold the token)."""
    size = len(response.content)
    if isinstance(body, dict):
        names = ", ".join(redact(safe_text(str(k)))[:40] for k in list(body)[:12])
        return f"{size} bytes, a JSON object with fields [{names}]"
    if body is None:
        return f"{size} bytes, not JSON" if size else "an empty body"
    return f"{size} bytes, JSON {type(body).__name__}"


def _json_bytes_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_int=parse_json_int)
    except ValueError:
        return None


def _json_text_or_none(text: str) -> Any:
    try:
        return json.loads(text, parse_int=parse_json_int)
    except ValueError:
        return None


def _decimal(text: str) -> Decimal | None:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None
