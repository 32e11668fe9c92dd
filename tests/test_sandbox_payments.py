"""The sandbox sells through x402 signatures and MCP on the token path's ledger, checked with the SDKs' own clients."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client
from x402 import x402ClientSync
from x402.http.x402_http_client import x402HTTPClientSync
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.mechanisms.evm.signers import EthAccountSigner

from sandbox import images, procs
from sandbox.config import DEFAULT_PAY_TO
from sandbox.server import SandboxServer
from tests.test_sandbox import ROOT, SERVICE, TOOL, ImageHost, call, client, elements, host, ledger, pay, sandbox

# py_ecc (under eth-account) raises the recursion limit to 100000 when imported, after which a deep recursion in any
# later test of this session (test_sandbox's nested_json answer) crashes the interpreter instead of raising
# RecursionError: put Python's default back.
if sys.getrecursionlimit() > 10_000:
    sys.setrecursionlimit(1000)

__all__ = ["client", "host", "sandbox"]  # fixtures used here by name

# A throwaway key: the sandbox settles on no chain, so this account never holds anything.
PAYER_KEY = "0x" + "4c" * 32
BASE_USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
TRANSFER_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}


@pytest.fixture(scope="module")
def payer() -> LocalAccount:
    account: LocalAccount = Account.from_key(PAYER_KEY)
    return account


@pytest.fixture(scope="module")
def x402_http(payer: LocalAccount) -> x402HTTPClientSync:
    """The x402 SDK's own sync HTTP client with its exact-EVM scheme (v2 and v1) signing with `payer`."""
    return x402HTTPClientSync(register_exact_evm_client(x402ClientSync(), EthAccountSigner(payer)))


@pytest.fixture
def urls(host: ImageHost) -> list[str]:
    live = host.put("/pay/live.png", images.png(64, 64, "live"))
    return [live, host.put("/pay/spoof.png", images.png(64, 64, "spoof"))]


def tasks(urls: list[str]) -> dict[str, Any]:
    return {"Tasks": [{"ImageURL": url} for url in urls]}


def decode(value: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(base64.b64decode(value))
    return doc


def encode(doc: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(doc).encode()).decode()


def offer_402(client: httpx.Client, urls: list[str]) -> httpx.Response:
    response = client.post(TOOL, json=tasks(urls))
    assert response.status_code == 402
    return response


def sdk_headers(
    x402_http: x402HTTPClientSync,
    client: httpx.Client,
    urls: list[str],
    *,
    v1: bool = False,
    requirements: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, str]:
    """Payment headers the SDK builds from the sandbox's own 402: v2 from PAYMENT-REQUIRED, or v1 from the body
    alone; `requirements` may alter the v2 offer first, so the SDK signs for what a misbehaving client would."""
    offer = offer_402(client, urls)
    headers = {} if v1 else {"PAYMENT-REQUIRED": offer.headers["PAYMENT-REQUIRED"]}
    if requirements is not None:
        required = decode(headers["PAYMENT-REQUIRED"])
        requirements(required)
        headers["PAYMENT-REQUIRED"] = encode(required)
    built, _ = x402_http.handle_402_response(headers, offer.content, str(client.base_url.join(TOOL)))
    return built


def resigned(headers: dict[str, str], payer: LocalAccount, **changes: int) -> dict[str, str]:
    """An SDK-made v2 payment with authorization fields changed and signed again (EIP-712) by the same payer."""
    doc = decode(headers["PAYMENT-SIGNATURE"])
    authorization = doc["payload"]["authorization"]
    authorization.update({key: str(value) for key, value in changes.items()})
    extra = doc["accepted"]["extra"]
    domain = {"name": extra["name"], "version": extra["version"], "chainId": 8453, "verifyingContract": BASE_USDC}
    message = {**{k: int(authorization[k]) for k in ("value", "validAfter", "validBefore")},
               "from": authorization["from"], "to": authorization["to"],
               "nonce": bytes.fromhex(authorization["nonce"][2:])}  # fmt: skip
    signed = payer.sign_typed_data(domain_data=domain, message_types=TRANSFER_TYPES, message_data=message)
    doc["payload"]["signature"] = "0x" + signed.signature.hex().removeprefix("0x")
    return {"PAYMENT-SIGNATURE": encode(doc)}


def altered(headers: dict[str, str], change: Callable[[dict[str, Any]], None]) -> dict[str, str]:
    """An SDK-made v2 payment with its document changed and not signed again."""
    doc = decode(headers["PAYMENT-SIGNATURE"])
    change(doc)
    return {"PAYMENT-SIGNATURE": encode(doc)}


def assert_refused(response: httpx.Response, reason: str) -> None:
    assert response.status_code == 402, response.text
    assert response.json()["error"] == reason
    assert decode(response.headers["PAYMENT-REQUIRED"])["error"] == reason
    assert "PAYMENT-RESPONSE" not in response.headers and "X-PAYMENT-RESPONSE" not in response.headers


def assert_nothing_billed(client: httpx.Client) -> None:
    counts = ledger(client)
    assert counts["calls_billed"] == counts["images_billed"] == counts["x402_settled"] == 0
    assert counts["x402_settlements"] == [] and counts["billed_image_urls_path_counts"] == {}


def test_402_offers_x402_v2_in_the_header_and_v1_in_the_body(client: httpx.Client, urls: list[str]) -> None:
    response = offer_402(client, urls)
    required = decode(response.headers["PAYMENT-REQUIRED"])
    assert required["x402Version"] == 2 and required["resource"]["url"].endswith(TOOL)
    [accept] = required["accepts"]
    assert accept == {
        "scheme": "exact",
        "network": "eip155:8453",
        "amount": "200000",
        "asset": BASE_USDC,
        "payTo": DEFAULT_PAY_TO,
        "maxTimeoutSeconds": 60,
        "extra": {"name": "USD Coin", "version": "2"},
    }
    assert "payment-identifier" in required["extensions"]
    [v1] = response.json()["accepts"]
    assert v1["network"] == "base" and v1["maxAmountRequired"] == "200000" and v1["payTo"] == DEFAULT_PAY_TO


def test_a_v2_payment_made_by_the_x402_sdk_is_accepted_and_settled_once(
    client: httpx.Client, urls: list[str], x402_http: x402HTTPClientSync, payer: LocalAccount
) -> None:
    headers = sdk_headers(x402_http, client, urls)
    assert set(headers) == {"PAYMENT-SIGNATURE"}
    response = client.post(TOOL, json=tasks(urls), headers=headers)
    assert [e["Results"][0]["Label"] for e in elements(response)] == ["normal", "liveness"]
    settled = x402_http.get_payment_settle_response(response.headers.get)
    assert settled.success and settled.payer == payer.address and settled.network == "eip155:8453"
    assert settled.transaction.startswith("0x") and len(settled.transaction) == 66
    counts = ledger(client)
    assert counts["calls_billed"] == counts["x402_settled"] == 1 and counts["images_billed"] == 2
    assert counts["tokens_consumed"] == 0 and counts["payments_created"] == 0
    assert counts["x402_settlements"] == [
        {"payer": payer.address, "transaction": settled.transaction, "amount": "200000", "network": "eip155:8453",
         "serviceId": SERVICE, "settledAt": counts["x402_settlements"][0]["settledAt"]}
    ]  # fmt: skip


def test_a_v1_payment_made_by_the_x402_sdk_from_the_402_body_is_accepted(
    client: httpx.Client, urls: list[str], x402_http: x402HTTPClientSync, payer: LocalAccount
) -> None:
    headers = sdk_headers(x402_http, client, urls, v1=True)
    assert set(headers) == {"X-PAYMENT"}
    response = client.post(TOOL, json=tasks(urls), headers=headers)
    assert len(elements(response)) == 2
    settlement = decode(response.headers["X-PAYMENT-RESPONSE"])
    assert settlement["success"] is True and settlement["payer"] == payer.address and settlement["network"] == "base"
    assert ledger(client)["calls_billed"] == 1


def test_a_replayed_payment_is_refused_as_a_used_nonce_and_billed_once(
    client: httpx.Client, urls: list[str], x402_http: x402HTTPClientSync
) -> None:
    headers = sdk_headers(x402_http, client, urls)
    assert client.post(TOOL, json=tasks(urls), headers=headers).status_code == 200
    assert_refused(client.post(TOOL, json=tasks(urls), headers=headers), "invalid_exact_evm_nonce_already_used")
    counts = ledger(client)
    assert counts["calls_billed"] == counts["x402_settled"] == 1 and counts["x402_refused"] == 1


def _pay_to_elsewhere(required: dict[str, Any]) -> None:
    required["accepts"][0]["payTo"] = "0x" + "ab" * 20


def _short_amount(required: dict[str, Any]) -> None:
    required["accepts"][0]["amount"] = "199999"


@pytest.mark.parametrize(
    ("requirements", "reason"),
    [
        (_pay_to_elsewhere, "invalid_exact_evm_payload_recipient_mismatch"),
        (_short_amount, "invalid_exact_evm_payload_authorization_value"),
    ],
)
def test_an_sdk_payment_signed_for_the_wrong_terms_is_refused(
    client: httpx.Client,
    urls: list[str],
    x402_http: x402HTTPClientSync,
    requirements: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    headers = sdk_headers(x402_http, client, urls, requirements=requirements)
    assert_refused(client.post(TOOL, json=tasks(urls), headers=headers), reason)
    assert_nothing_billed(client)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"validBefore": -60}, "invalid_exact_evm_payload_authorization_valid_before"),
        ({"validAfter": 3600}, "invalid_exact_evm_payload_authorization_valid_after"),
        ({"value": 100_000}, "invalid_exact_evm_payload_authorization_value"),
    ],
)
def test_a_re_signed_payment_outside_its_window_or_short_is_refused(
    client: httpx.Client,
    urls: list[str],
    x402_http: x402HTTPClientSync,
    payer: LocalAccount,
    changes: dict[str, int],
    reason: str,
) -> None:
    now = int(time.time())
    stamped = {k: now + v if k.startswith("valid") else v for k, v in changes.items()}
    headers = resigned(sdk_headers(x402_http, client, urls), payer, **stamped)
    assert_refused(client.post(TOOL, json=tasks(urls), headers=headers), reason)
    assert_nothing_billed(client)


def test_re_signing_itself_is_sound(
    client: httpx.Client, urls: list[str], x402_http: x402HTTPClientSync, payer: LocalAccount
) -> None:
    # The refusals above are only meaningful if a payment re-signed with nothing wrong is accepted.
    headers = resigned(sdk_headers(x402_http, client, urls), payer, value=200_000)
    assert client.post(TOOL, json=tasks(urls), headers=headers).status_code == 200


def _set(path: tuple[str, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        for key in path[:-1]:
            doc = doc[key]
        doc[path[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (_set(("payload", "authorization", "value"), "300000"), "invalid_exact_evm_payload_signature"),
        (_set(("payload", "signature"), "0x" + "00" * 65), "invalid_exact_evm_payload_signature"),
        (_set(("accepted", "network"), "eip155:84532"), "invalid_network"),
        (_set(("accepted", "scheme"), "upto"), "invalid_scheme"),
        (_set(("x402Version",), 1), "invalid_x402_version"),
        (_set(("payload", "authorization", "nonce"), "0x1234"), "invalid_payload"),
    ],
)
def test_a_tampered_sdk_payment_is_refused(
    client: httpx.Client,
    urls: list[str],
    x402_http: x402HTTPClientSync,
    change: Callable[[dict[str, Any]], None],
    reason: str,
) -> None:
    headers = altered(sdk_headers(x402_http, client, urls), change)
    assert_refused(client.post(TOOL, json=tasks(urls), headers=headers), reason)
    assert_nothing_billed(client)


def test_garbage_in_the_payment_header_is_an_invalid_payload(client: httpx.Client, urls: list[str]) -> None:
    for value in ("not base64!", encode({"x402Version": 2}), base64.b64encode(b"[" * 40_000).decode()):
        assert_refused(client.post(TOOL, json=tasks(urls), headers={"PAYMENT-SIGNATURE": value}), "invalid_payload")
    assert_nothing_billed(client)


def test_a_failed_call_settles_no_x402_payment_but_spends_a_token(
    sandbox: SandboxServer, client: httpx.Client, urls: list[str], x402_http: x402HTTPClientSync
) -> None:
    headers = sdk_headers(x402_http, client, urls)
    sandbox.configure(p_5xx=1.0)
    failed = client.post(TOOL, json=tasks(urls), headers=headers)
    assert failed.status_code in (500, 503) and "PAYMENT-RESPONSE" not in failed.headers
    counts = ledger(client)
    assert counts["x402_unsettled"] == 1 and counts["errors_5xx"] == 1
    assert_nothing_billed(client)
    # The same failure paid by a token is billed: that path settles before the upstream runs.
    token = pay(client)["token"]
    assert call(client, token, urls).status_code in (500, 503)
    counts = ledger(client)
    assert counts["calls_billed"] == counts["tokens_consumed"] == 1 and counts["images_billed"] == 2
    assert counts["x402_settled"] == 0 and counts["x402_settlements"] == []
    # The unsettled authorization is still unspent, as on a chain: the same payment pays once the seller recovers.
    sandbox.configure(p_5xx=0.0)
    assert client.post(TOOL, json=tasks(urls), headers=headers).status_code == 200
    assert ledger(client)["x402_settled"] == 1


def test_a_throttled_x402_call_is_not_settled(
    sandbox: SandboxServer, client: httpx.Client, urls: list[str], x402_http: x402HTTPClientSync
) -> None:
    sandbox.configure(rate_limit_per_s=0.001, rate_burst=1)
    assert call(client, pay(client)["token"], urls).status_code == 200
    throttled = client.post(TOOL, json=tasks(urls), headers=sdk_headers(x402_http, client, urls))
    assert throttled.status_code == 429 and "PAYMENT-RESPONSE" not in throttled.headers
    counts = ledger(client)
    assert counts["throttled"] == 1 and counts["calls_billed"] == 1 and counts["x402_settled"] == 0


def test_payment_identifier_replays_the_answer_and_refuses_another_payload(
    client: httpx.Client, urls: list[str], x402_http: x402HTTPClientSync
) -> None:
    def with_id(headers: dict[str, str]) -> dict[str, str]:
        def add(doc: dict[str, Any]) -> None:
            extension = {"info": {"required": False, "id": "run-42_chunk-7_call-1"}}
            doc.setdefault("extensions", {})["payment-identifier"] = extension

        return altered(headers, add)

    first_headers = with_id(sdk_headers(x402_http, client, urls))
    first = client.post(TOOL, json=tasks(urls), headers=first_headers)
    again = client.post(TOOL, json=tasks(urls), headers=first_headers)
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers["PAYMENT-RESPONSE"] == first.headers["PAYMENT-RESPONSE"]
    other = client.post(TOOL, json=tasks(urls), headers=with_id(sdk_headers(x402_http, client, urls)))
    assert other.status_code == 409
    counts = ledger(client)
    assert counts["calls_billed"] == counts["x402_settled"] == 1 and counts["succeeded"] == 1


def run_mcp(url: str, calls: list[dict[str, Any]]) -> tuple[Any, list[Any]]:
    """tools/list, then one tools/call per argument set, through the mcp SDK's own client over streamable HTTP."""

    async def session() -> tuple[Any, list[Any]]:
        async with streamable_http_client(url) as (read, write), ClientSession(read, write) as mcp:
            await mcp.initialize()
            listed = await mcp.list_tools()
            results = [await mcp.call_tool("infrared_face_liveness_detection", arguments) for arguments in calls]
            return listed, results

    return asyncio.run(session())


def test_the_mcp_sdk_client_lists_and_calls_the_tool_with_a_token(
    sandbox: SandboxServer, client: httpx.Client, urls: list[str]
) -> None:
    by_http = elements(call(client, pay(client)["token"], urls))
    token = pay(client)["token"]
    listed, [paid] = run_mcp(f"{sandbox.url}/mcp", [{**tasks(urls), "paymentToken": token}])
    [tool] = listed.tools
    assert tool.name == "infrared_face_liveness_detection"
    schema = tool.input_schema
    assert set(schema["properties"]) == {"Tasks", "paymentToken"} and schema["required"] == ["Tasks"]
    assert not paid.is_error
    document = json.loads(paid.content[0].text)
    assert paid.structured_content == document and document["code"] == "200"
    result = document["data"]["Result"]
    by_mcp = (json.loads(result) if isinstance(result, str) else result)["Data"]["Elements"]
    assert by_mcp == by_http
    counts = ledger(client)
    assert counts["mcp_calls"] == 1 and counts["calls_billed"] == counts["tokens_consumed"] == 2
    assert counts["images_billed"] == 4


def test_an_mcp_call_with_a_bogus_spent_or_missing_token_is_a_payment_required_tool_error(
    sandbox: SandboxServer, client: httpx.Client, urls: list[str]
) -> None:
    spent = pay(client)["token"]
    assert call(client, spent, urls).status_code == 200
    arguments = [{**tasks(urls), "paymentToken": "ptk_bogus"}, {**tasks(urls), "paymentToken": spent}, tasks(urls)]
    _, results = run_mcp(f"{sandbox.url}/mcp", arguments)
    errors = []
    for result in results:
        assert result.is_error and result.meta == {"httpStatus": 402}
        offer = json.loads(result.content[0].text)
        assert offer["x402Version"] == 1 and offer["serviceId"] == SERVICE and offer["priceCents"] == 20
        assert offer["accepts"][0]["maxAmountRequired"] == "200000"
        errors.append(offer["error"])
    assert errors == ["payment token unknown", "payment token already used", "payment required"]
    counts = ledger(client)
    assert counts["calls_billed"] == 1 and counts["mcp_calls"] == 3 and counts["rejected_402"] == 3


def stop_process(proc: procs.Proc) -> None:
    """SIGTERM, as the stack stops the sandbox, so whatever it prints on the way out is in the log too."""
    procs.signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        procs.kill_group(proc)


def test_mcp_answers_the_listings_protocol_version_as_plain_json_rpc(client: httpx.Client, urls: list[str]) -> None:
    # The listing names protocol 2025-06-18; a client that speaks only that version is served too.
    headers = {"Accept": "application/json, text/event-stream"}
    hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}
    request = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}
    init = client.post("/mcp", headers=headers, json=request)
    assert init.status_code == 200 and init.json()["result"]["protocolVersion"] == "2025-06-18"
    arguments = {**tasks(urls), "paymentToken": pay(client)["token"]}
    params = {"name": "infrared_face_liveness_detection", "arguments": arguments}
    called = client.post("/mcp", headers={**headers, "MCP-Protocol-Version": "2025-06-18"},
                         json={"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": params})  # fmt: skip
    result = called.json()["result"]
    assert not result.get("isError") and json.loads(result["content"][0]["text"])["code"] == "200"
    assert client.get("/mcp").status_code == 405
    assert ledger(client)["calls_billed"] == 1


@pytest.fixture
def sandbox_process(tmp_path: Path) -> Iterator[tuple[str, Path, procs.Proc]]:
    """The sandbox as `python -m sandbox` in its own process, as the stack starts it, with its output in a file."""
    port = procs.free_port()
    log = tmp_path / "sandbox.log"
    proc = procs.spawn([sys.executable, "-m", "sandbox", "--host", "127.0.0.1", "--port", str(port)], log, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        procs.wait_until(lambda: procs.http_ok(f"{url}/_sandbox/ledger"), 30, "sandbox", log=log, proc=proc)
        yield url, log, proc
    finally:
        stop_process(proc)


def test_no_signature_or_token_reaches_the_sandbox_log(
    sandbox_process: tuple[str, Path, procs.Proc], urls: list[str], x402_http: x402HTTPClientSync, payer: LocalAccount
) -> None:
    url, log, proc = sandbox_process
    secrets: list[str] = []
    with httpx.Client(base_url=url, timeout=10) as http:
        paid = sdk_headers(x402_http, http, urls)
        expired = resigned(sdk_headers(x402_http, http, urls), payer, validBefore=int(time.time()) - 60)
        for headers in (paid, paid, expired):
            http.post(TOOL, json=tasks(urls), headers=headers)
            value = headers["PAYMENT-SIGNATURE"]
            secrets += [value, decode(value)["payload"]["signature"]]
        tokens = [pay(http)["token"], pay(http)["token"]]
        assert call(http, tokens[0], urls).status_code == 200
        run_mcp(f"{url}/mcp", [{**tasks(urls), "paymentToken": tokens[1]}, {**tasks(urls), "paymentToken": "ptk_x"}])
        # A request the sandbox refuses after verifying its payment must not print what it was sent either.
        unread = sdk_headers(x402_http, http, urls)
        assert http.post(TOOL, content=b"{", headers=unread).status_code == 400
        secrets += [unread["PAYMENT-SIGNATURE"], decode(unread["PAYMENT-SIGNATURE"])["payload"]["signature"], *tokens]
        assert ledger(http)["calls_billed"] == 3
    stop_process(proc)
    text = log.read_text(errors="replace")
    assert "sandbox listening on" in text
    for secret in secrets:
        assert secret not in text and secret.removeprefix("0x") not in text
