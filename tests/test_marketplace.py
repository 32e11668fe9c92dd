"""worker.seams.marketplace: quote, payments, calls and the error translation, over httpx.MockTransport."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from worker.errors import (
    ConfigError,
    IrliveError,
    OutcomeUnknown,
    PaymentRejected,
    PermanentInputError,
    RateLimited,
    TransientError,
)
from worker.seams import marketplace as mp
from worker.seams.marketplace import Marketplace, parse_payment

SERVICE = "infrared-face-liveness-detection"
TOOL = f"/api/tools/{SERVICE}"
TOKEN = "tok_SECRET_4f9a1c"
SIG_VALUE = "deadbeefcafe0123"
SIG = "X-Amz-Signature=" + SIG_VALUE
URL = ("https://in.s3.amazonaws.com/cam/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
       "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&" + SIG)

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler) -> Marketplace:
    return Marketplace("http://market.test", SERVICE, api_key="key-123", transport=httpx.MockTransport(handler))


def answer(status: int, body: Any = None, *, headers: dict[str, str] | None = None,
           content: bytes | None = None) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if content is not None:
            return httpx.Response(status, content=content, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    return handler


def raising(exc: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    return handler


def envelope(result: Any) -> dict[str, Any]:
    return {"code": "200", "message": "success", "requestId": "mkt-req-1", "content": "",
            "data": {"Action": "DetectInfraredLivingFace", "Result": result}}


UPSTREAM = {"RequestId": "up-1", "Data": {"Elements": [
    {"FaceNumber": 1, "ImageURL": URL, "Results": [{"Label": "normal", "Rate": 99, "Suggestion": "pass"}]}]}}


def call_with(handler: Handler) -> mp.CallAnswer:
    return client(handler).call(TOKEN, [URL])


# --- quote (HTTP 402) -------------------------------------------------------------------------------------


def test_quote_reads_price_cents_from_the_402_body() -> None:
    q = client(answer(402, {"serviceId": SERVICE, "priceCents": 20})).quote()
    assert (q.price_cents, q.service_id) == (20, SERVICE)


def test_quote_reads_x402_accepts_max_amount_required_with_decimals() -> None:
    body: dict[str, Any] = {"x402Version": 1, "accepts": [{"scheme": "exact", "network": "base", "payTo": "0xabc",
                            "maxAmountRequired": "200000", "asset": "0xusdc", "extra": {"decimals": 6}}]}
    assert client(answer(402, body)).quote().price_cents == 20
    body["accepts"][0].update(maxAmountRequired="35", extra={"decimals": 2})
    assert client(answer(402, body)).quote().price_cents == 35
    # No decimals given: known only for USDC's own contracts; a fraction of a cent rounds up (never under-reads).
    body["accepts"][0].update(maxAmountRequired="200001", extra={},
                              asset="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")
    assert client(answer(402, body)).quote().price_cents == 21
    body["accepts"][0].update(asset="0xusdc")
    with pytest.raises(ConfigError, match="decimals irlive cannot establish"):
        client(answer(402, body)).quote()


@pytest.mark.parametrize("body", [{"priceCents": -20}, {"price": "-0.20"}, {"priceCents": 20, "currency": "EUR"},
                                  {"accepts": [{"amount": "-200000", "extra": {"decimals": 6}}]}])
def test_quote_refuses_a_price_it_must_not_guess(body: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="refusing"):
        client(answer(402, body)).quote()


def test_quote_reads_the_base64_payment_required_header() -> None:
    doc = {"x402Version": 2, "serviceId": SERVICE, "accepts": [{"amount": "250000", "extra": {"decimals": 6}}]}
    header = base64.b64encode(json.dumps(doc).encode()).decode()
    q = client(answer(402, content=b"Payment Required", headers={"PAYMENT-REQUIRED": header})).quote()
    assert (q.price_cents, q.service_id) == (25, SERVICE)


def test_quote_without_a_readable_price_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no price"):
        client(answer(402, {"x402Version": 1, "accepts": []}, headers={"PAYMENT-REQUIRED": "%%%"})).quote()


def test_quote_answered_without_402_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="402"):
        client(answer(200, envelope(UPSTREAM))).quote()


# --- payments ---------------------------------------------------------------------------------------------

PAYMENT = {"paymentId": "pay_1", "amountCents": 20, "currency": "USD", "status": "paid", "maxCalls": 1,
           "remainingCalls": 1, "expiresAt": "2030-01-01T00:00:00Z", "paidAt": "2029-12-31T00:00:00Z"}


@pytest.mark.parametrize("field", ["token", "paymentToken"])
def test_payment_token_is_read_from_token_or_payment_token(field: str) -> None:
    p = parse_payment({**PAYMENT, field: TOKEN})
    assert (p.payment_id, p.token, p.amount_cents, p.status, p.remaining_calls) == ("pay_1", TOKEN, 20, "paid", 1)
    assert TOKEN not in repr(p)


def test_create_payment_posts_the_service_id_and_parses_the_answer() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={**PAYMENT, "paymentToken": TOKEN})

    p = client(handler).create_payment()
    assert p.token == TOKEN
    assert seen[0].url.path == "/api/payments"
    assert json.loads(seen[0].content) == {"serviceId": SERVICE}
    assert seen[0].headers["X-API-Key"] == "key-123"


def test_payment_answer_without_payment_id_is_transient() -> None:
    with pytest.raises(TransientError):
        parse_payment({"token": TOKEN})


def test_get_payment_reads_the_state_back() -> None:
    p = client(answer(200, {**PAYMENT, "status": "exhausted", "remainingCalls": 0})).get_payment("pay_1")
    assert (p.status, p.remaining_calls, p.token) == ("exhausted", 0, None)


# --- call: success ----------------------------------------------------------------------------------------


def test_call_sends_tasks_and_token_and_returns_the_envelope_result() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=envelope(json.dumps(UPSTREAM)))

    got = call_with(handler)
    assert got.request_id == "mkt-req-1"
    assert json.loads(got.result) == UPSTREAM
    assert seen[0].url.path == TOOL
    assert seen[0].headers["X-Payment-Token"] == TOKEN
    assert json.loads(seen[0].content) == {"Tasks": [{"ImageURL": URL}]}


def test_call_accepts_result_as_object() -> None:
    assert call_with(answer(200, envelope(UPSTREAM))).result == UPSTREAM


# --- call: error translation ------------------------------------------------------------------------------


def test_429_with_retry_after_is_rate_limited_with_that_delay() -> None:
    with pytest.raises(RateLimited) as info:
        call_with(answer(429, {"message": "slow down"}, headers={"Retry-After": "3"}))
    assert info.value.retry_after == 3.0


def test_400_throttling_user_code_is_rate_limited() -> None:
    body = {"RequestId": "r", "HostId": "h", "Code": "Throttling.User", "Message": "Request was denied"}
    with pytest.raises(RateLimited):
        call_with(answer(400, body))


def test_400_invalid_image_download_is_permanent_with_its_code() -> None:
    body = {"RequestId": "r", "Code": "InvalidImage.Download", "Message": "download failed"}
    with pytest.raises(PermanentInputError) as info:
        call_with(answer(400, body))
    assert info.value.code == "InvalidImage.Download"


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_are_config_errors(status: int) -> None:
    with pytest.raises(ConfigError, match="IRLIVE_API_KEY"):
        call_with(answer(status, {"error": "unauthorized"}))


def test_402_on_a_call_is_payment_rejected() -> None:
    with pytest.raises(PaymentRejected):
        call_with(answer(402, {"error": "payment exhausted"}))


@pytest.mark.parametrize("status", [500, 503, 581])
def test_5xx_and_58x_are_transient(status: int) -> None:
    with pytest.raises(TransientError) as info:
        call_with(answer(status, content=b"upstream failure"))
    assert not isinstance(info.value, PaymentRejected)


def test_503_service_unavailable_code_is_transient() -> None:
    with pytest.raises(TransientError):
        call_with(answer(503, {"Code": "ServiceUnavailable", "Message": "try later"}))


def test_2xx_with_top_level_error_code_is_classified_by_code() -> None:
    with pytest.raises(PermanentInputError) as info:
        call_with(answer(200, {"RequestId": "r", "Code": "InvalidImage.Format", "Message": "bad format"}))
    assert info.value.code == "InvalidImage.Format"
    with pytest.raises(RateLimited):
        call_with(answer(200, {"code": "400", "Code": "Throttling.User", "message": "denied"}))


def test_2xx_with_error_code_inside_result_object_is_classified_by_code() -> None:
    with pytest.raises(ConfigError):
        call_with(answer(200, envelope({"RequestId": "r", "Code": "InvalidApi.NotPurchase", "Message": "no"})))


def test_2xx_with_error_code_inside_result_json_string_is_classified_by_code() -> None:
    result = json.dumps({"RequestId": "r", "Code": "InvalidImage.Download", "Message": "timeout downloading"})
    with pytest.raises(PermanentInputError) as info:
        call_with(answer(200, envelope(result)))
    assert info.value.code == "InvalidImage.Download"


def test_non_json_2xx_is_transient() -> None:
    with pytest.raises(TransientError, match="not a JSON object"):
        call_with(answer(200, content=b"<html>ok</html>"))


def test_2xx_without_data_result_is_transient() -> None:
    with pytest.raises(TransientError, match=r"data\.Result"):
        call_with(answer(200, {"code": "200", "message": "success", "data": {}}))


def test_answer_over_max_answer_bytes_is_transient() -> None:
    big = b'{"code": "200", "pad": "' + b"x" * mp.MAX_ANSWER_BYTES + b'"}'
    with pytest.raises(TransientError, match="larger than"):
        call_with(answer(200, content=big))


def test_connect_error_is_transient() -> None:
    with pytest.raises(TransientError):
        call_with(raising(httpx.ConnectError))
    with pytest.raises(TransientError):
        client(raising(httpx.ConnectError)).create_payment()


def test_read_timeout_on_call_is_outcome_unknown() -> None:
    with pytest.raises(OutcomeUnknown):
        call_with(raising(httpx.ReadTimeout))


def test_read_timeout_while_reading_the_call_answer_is_outcome_unknown() -> None:
    class Stalls(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield b'{"code": "200", '
            raise httpx.ReadTimeout("stalled")

    with pytest.raises(OutcomeUnknown):
        call_with(lambda request: httpx.Response(200, stream=Stalls()))


def test_read_timeout_on_create_payment_is_outcome_unknown() -> None:
    with pytest.raises(OutcomeUnknown):
        client(raising(httpx.ReadTimeout)).create_payment()


def test_read_timeout_on_get_payment_is_transient() -> None:
    with pytest.raises(TransientError):
        client(raising(httpx.ReadTimeout)).get_payment("pay_1")


# --- secrets never reach exception text -------------------------------------------------------------------

ECHOES = [
    (402, {"error": f"payment token {TOKEN} was already used"}),
    (402, {"message": f"X-Payment-Token: {TOKEN} expired"}),
    (429, {"message": f"token {TOKEN} throttled"}),
    (401, {"message": f"bad request for {URL} with token={TOKEN}"}),
    (400, {"Code": "InvalidImage.Download", "Message": f"could not download {URL}"}),
    (400, {"Code": "InvalidImage.Download", "Message": f"could not download {URL} ({TOKEN})"}),
    (400, {"Code": "Throttling.User", "Message": f"denied for {TOKEN}"}),
    (400, {"message": f"schema mismatch in Tasks[0].ImageURL={URL}"}),
    (500, {"message": f"internal error at {URL} for {TOKEN}"}),
    (200, {"Code": "InternalError", "Message": f"failed {URL} {TOKEN}"}),
    (400, {"Code": "InvalidImage.URL", "Message": f"bad url={quote(URL, safe='')}"}),
    (400, {"Code": "InvalidImage.URL", "Message": f"bad tasks {json.dumps({'Tasks': [{'ImageURL': URL}]})}"}),
    (200, envelope({"Code": "InvalidImage.URL", "Message": f"bad url {URL} token {TOKEN}"})),
    (200, envelope(json.dumps({"Code": "InvalidImage.URL", "Message": f"bad url {URL} token {TOKEN}"}))),
]


@pytest.mark.parametrize(("status", "body"), ECHOES)
def test_no_exception_text_carries_the_token_or_a_presigned_query(status: int, body: Any) -> None:
    with pytest.raises(IrliveError) as info:
        call_with(answer(status, body))
    text = str(info.value) + repr(info.value) + repr(info.value.args)
    assert TOKEN not in text
    assert SIG_VALUE not in text
    assert "X-Amz-Credential=AKIA" not in text


@pytest.mark.parametrize("status", [404, 405])
def test_no_tool_at_the_path_is_a_config_error_naming_the_tool_path_setting(status: int) -> None:
    market = client(answer(status, {"error": "no route"}))
    for attempt in (market.quote, lambda: market.call(TOKEN, [URL])):
        with pytest.raises(ConfigError) as info:
            attempt()
        assert "IRLIVE_TOOL_PATH" in str(info.value) and f"POST {TOOL} ({status})" in str(info.value)
        assert TOKEN not in str(info.value) and SIG_VALUE not in str(info.value)


def test_the_tool_path_is_the_one_configured_and_payments_keep_the_service_id() -> None:
    legacy = "/api/tools/aliyun-facebody-detect-infrared-living-face"
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.content.decode()))
        if request.url.path == "/api/payments":
            return httpx.Response(201, json={"paymentId": "p1", "token": TOKEN, "status": "paid", "amountCents": 20})
        if request.url.path == legacy and "X-Payment-Token" not in request.headers:
            return httpx.Response(402, json={"serviceId": SERVICE, "priceCents": 20})
        return httpx.Response(200, json=envelope({"Data": {"Elements": []}}))

    market = Marketplace("http://market.test", SERVICE, tool_path=legacy, transport=httpx.MockTransport(handler))
    assert market.quote().price_cents == 20
    market.create_payment()
    market.call(TOKEN, [URL])
    assert [path for path, _ in seen] == [legacy, "/api/payments", legacy]
    assert json.loads(seen[1][1]) == {"serviceId": SERVICE}


def test_an_mcp_tool_result_reads_as_the_http_answer_it_stands_for() -> None:
    import mcp_types as types

    from worker.seams.mcp_tool import reply_of

    def result(text: str, is_error: bool, meta: dict[str, Any] | None = None) -> Any:
        return types.CallToolResult(content=[types.TextContent(text=text)], is_error=is_error, _meta=meta)

    body = json.dumps(envelope({"Data": {"Elements": []}}))
    assert reply_of(result(body, False)) == mp_reply(200, body)
    assert reply_of(result('{"error": "x"}', True, {"httpStatus": 429})).status == 429
    # No status given: a payment request reads as a 402, any other error as a 502, a bogus status is ignored.
    assert reply_of(result('{"x402Version": 2, "accepts": []}', True)).status == 402
    assert reply_of(result('{"Code": "Throttling.User"}', True, {"httpStatus": "400"})).status == 502
    assert reply_of(result("not json", True, {"httpStatus": True})).status == 502
    structured = types.CallToolResult(content=[], structured_content={"code": "200"}, is_error=False)
    assert json.loads(reply_of(structured).raw) == {"code": "200"}


def mp_reply(status: int, text: str) -> Any:
    from worker.seams.mcp_tool import ToolReply

    return ToolReply(status, text.encode())


def test_the_mcp_tool_missing_or_unreachable_is_said_plainly(monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.server import SandboxConfig, SandboxServer
    from worker.seams import mcp_tool

    with SandboxServer(SandboxConfig()) as sandbox:
        monkeypatch.setattr(mcp_tool, "TOOL_NAME", "no_such_tool")
        with pytest.raises(ConfigError, match="lists no tool 'no_such_tool'"):
            mcp_tool.McpTool(sandbox.url, headers={}, timeout_s=5).call(TOKEN, [URL])
    with pytest.raises(TransientError, match="unreachable: ConnectError") as info:
        mcp_tool.McpTool("http://127.0.0.1:1", headers={}, timeout_s=5).call(TOKEN, [URL])
    assert TOKEN not in str(info.value)
