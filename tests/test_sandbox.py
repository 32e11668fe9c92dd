"""The sandbox marketplace over real HTTP: payment gating, validation, image fetching, verdicts, faults, ledger."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image, ImageFile

from sandbox import images
from sandbox.server import TOOL_PATHS, SandboxConfig, SandboxServer
from sandbox.truth import fallback_truth

TOOL = "/api/tools/infrared-face-liveness-detection"
LEGACY = "/api/tools/aliyun-facebody-detect-infrared-living-face"
SERVICE = "infrared-face-liveness-detection"
LEGACY_SERVICE = "aliyun-facebody-detect-infrared-living-face"
ROOT = Path(__file__).resolve().parent.parent


class ImageHost:
    """A tiny static file server standing in for S3: path → bytes, queries ignored."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        files = self.files

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                data = files.get(self.path.split("?", 1)[0])
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def put(self, path: str, data: bytes) -> str:
        self.files[path] = data
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    served = ImageHost()
    yield served
    served.close()


@pytest.fixture
def sandbox() -> Iterator[SandboxServer]:
    with SandboxServer(SandboxConfig()) as server:
        yield server


@pytest.fixture
def client(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, timeout=10) as http:
        yield http


def pay(client: httpx.Client, service: str = SERVICE) -> dict[str, Any]:
    response = client.post("/api/payments", json={"serviceId": service})
    assert response.status_code == 201, response.text
    doc: dict[str, Any] = response.json()
    return doc


def call(client: httpx.Client, token: str | None, urls: list[str], path: str = TOOL) -> httpx.Response:
    headers = {"X-Payment-Token": token} if token else {}
    return client.post(path, json={"Tasks": [{"ImageURL": url} for url in urls]}, headers=headers)


def elements(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["code"] == "200" and doc["message"] == "success" and doc["content"] == ""
    assert doc["data"]["Action"] == "DetectInfraredLivingFace"
    result = doc["data"]["Result"]
    body = json.loads(result) if isinstance(result, str) else result
    assert body["RequestId"]
    found: list[dict[str, Any]] = body["Data"]["Elements"]
    return found


def payment_state(client: httpx.Client, payment: dict[str, Any]) -> dict[str, Any]:
    response = client.get(f"/api/payments/{payment['paymentId']}")
    assert response.status_code == 200
    doc: dict[str, Any] = response.json()
    return doc


def ledger(client: httpx.Client) -> dict[str, Any]:
    doc: dict[str, Any] = client.get("/_sandbox/ledger").json()
    return doc


def presigned(url: str, signed_at: datetime, expires_s: int) -> str:
    stamp = signed_at.strftime("%Y%m%dT%H%M%SZ")
    return f"{url}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date={stamp}&X-Amz-Expires={expires_s}&X-Amz-Signature=ab"


@pytest.mark.parametrize("path", sorted(TOOL_PATHS))
def test_no_token_answers_402_with_x402_metadata_in_body_and_header(client: httpx.Client, path: str) -> None:
    response = client.post(path, json={"Tasks": [{"ImageURL": "http://example.invalid/a.png"}]})
    assert response.status_code == 402
    body = response.json()
    # Each path is its own listing: the offer names the service id a payment for it must be created with.
    assert body["x402Version"] == 1 and body["serviceId"] == path.rsplit("/", 1)[1] and body["priceCents"] == 20
    offer = body["accepts"][0]
    for key in ("scheme", "network", "maxAmountRequired", "amount", "payTo", "asset", "resource",
                "description", "mimeType", "maxTimeoutSeconds", "extra"):  # fmt: skip
        assert key in offer
    assert offer["maxAmountRequired"] == "200000" and offer["resource"].endswith(path)
    # The header is the same offer in x402 v2's shape (what the x402 SDK reads), with the same refusal reason.
    required = json.loads(base64.b64decode(response.headers["PAYMENT-REQUIRED"]))
    assert required["x402Version"] == 2 and required["error"] == body["error"]
    assert required["resource"]["url"] == offer["resource"] and required["accepts"][0]["amount"] == "200000"
    assert ledger(client)["rejected_402"] == 1


def test_payment_is_created_and_read_back_without_its_token(client: httpx.Client) -> None:
    payment = pay(client)
    assert payment["token"] and payment["paymentId"]
    assert payment["amountCents"] == 20 and payment["currency"] == "USD" and payment["status"] == "paid"
    assert payment["maxCalls"] == 1 and payment["remainingCalls"] == 1
    expires = datetime.fromisoformat(payment["expiresAt"].replace("Z", "+00:00"))
    assert expires > datetime.now(UTC)
    read = payment_state(client, payment)
    assert "token" not in read and "paymentToken" not in read
    assert {k: v for k, v in payment.items() if k != "token"} == read


def test_unknown_service_and_unknown_payment_are_404(client: httpx.Client) -> None:
    assert client.post("/api/payments", json={"serviceId": "nope"}).status_code == 404
    assert client.post("/api/payments", json={"serviceId": "/api/tools/" + SERVICE}).status_code == 404
    assert client.post("/api/payments", json={}).status_code == 400
    assert client.get("/api/payments/pay_missing").status_code == 404
    assert ledger(client)["payments_created"] == 0


def test_a_token_pays_for_exactly_one_call(client: httpx.Client, host: ImageHost) -> None:
    url = host.put("/once.png", images.png(64, 64, "live"))
    payment = pay(client)
    assert call(client, payment["token"], [url]).status_code == 200
    state = payment_state(client, payment)
    assert state["status"] == "exhausted" and state["remainingCalls"] == 0
    again = call(client, payment["token"], [url])
    assert again.status_code == 402 and again.json()["error"] == "payment token already used"
    unknown = call(client, "ptk_forged", [url])
    assert unknown.status_code == 402 and unknown.json()["error"] == "payment token unknown"
    counts = ledger(client)
    assert counts["tokens_consumed"] == 1 and counts["calls_billed"] == 1 and counts["token_uses"] == 1


@pytest.mark.parametrize(("bought", "used", "other"), [(SERVICE, LEGACY, TOOL), (LEGACY_SERVICE, TOOL, LEGACY)])
def test_a_token_is_bound_to_the_service_it_was_bought_for(
    client: httpx.Client, host: ImageHost, bought: str, used: str, other: str
) -> None:
    url = host.put("/bound.png", images.png(64, 64, "live"))
    payment = pay(client, bought)
    assert payment["serviceId"] == bought
    refused = call(client, payment["token"], [url], path=used)
    assert refused.status_code == 402
    body = refused.json()
    assert "bought for another service" in body["error"] and bought in body["error"]
    # The offer is the one of the listing that was called, in the body and in the header.
    assert body["serviceId"] == used.rsplit("/", 1)[1] and body["accepts"][0]["resource"].endswith(used)
    required = json.loads(base64.b64decode(refused.headers["PAYMENT-REQUIRED"]))
    assert required["error"] == body["error"] and required["resource"]["url"] == body["accepts"][0]["resource"]
    # The refusal spent nothing: the token still pays for one call on its own listing.
    state = payment_state(client, payment)
    assert state["status"] == "paid" and state["remainingCalls"] == 1
    counts = ledger(client)
    assert counts["tokens_consumed"] == 0 and counts["calls_billed"] == 0 and counts["rejected_402"] == 1
    assert len(elements(call(client, payment["token"], [url], path=other))) == 1
    assert payment_state(client, payment)["status"] == "exhausted"
    # Once spent, the token is refused on both listings.
    assert call(client, payment["token"], [url], path=other).status_code == 402
    assert call(client, payment["token"], [url], path=used).status_code == 402
    assert ledger(client)["tokens_consumed"] == 1


def test_expired_token_is_refused(sandbox: SandboxServer, client: httpx.Client, host: ImageHost) -> None:
    sandbox.configure(token_ttl_s=-1)
    payment = pay(client)
    assert payment_state(client, payment)["status"] == "expired"
    response = call(client, payment["token"], [host.put("/late.png", images.png(64, 64, "live"))])
    assert response.status_code == 402 and response.json()["error"] == "payment token expired"


def test_concurrent_calls_with_one_token_bill_once(client: httpx.Client, host: ImageHost) -> None:
    url = host.put("/race.png", images.png(64, 64, "live"))
    token = pay(client)["token"]
    with ThreadPoolExecutor(8) as pool:
        statuses = sorted(pool.map(lambda _: call(client, token, [url]).status_code, range(8)))
    assert statuses == [200] + [402] * 7
    assert ledger(client)["token_uses"] == 1


def test_truth_in_the_image_gives_inverted_labels_in_input_order(client: httpx.Client, host: ImageHost) -> None:
    live = host.put("/t/live.png", images.png(320, 240, "live"))
    spoof = host.put("/t/spoof.jpg", images.jpeg(320, 240, "spoof"))
    pair = host.put("/t/pair.png", images.png(400, 240, "live,spoof"))
    empty = host.put("/t/empty.jpg", images.jpeg(320, 240, "no_face"))
    signed = presigned(live, datetime.now(UTC), 900)
    urls = [spoof, live, pair, empty, signed]
    found = elements(call(client, pay(client, LEGACY_SERVICE)["token"], urls, path=LEGACY))
    assert [e["ImageURL"] for e in found] == urls
    assert all("TaskId" not in e for e in found)
    by_label = [[(r["Label"], r["Suggestion"]) for r in e["Results"]] for e in found]
    assert found[0]["FaceNumber"] == 1 and by_label[0][0][0] == "liveness" and by_label[0][0][1] in ("block", "review")
    assert found[1]["FaceNumber"] == 1 and by_label[1] == [("normal", "pass")]
    assert found[2]["FaceNumber"] == 2 and [label for label, _ in by_label[2]] == ["normal", "liveness"]
    assert found[3] == {
        "FaceNumber": 0,
        "ImageURL": empty,
        "Results": [
            {
                "Label": "liveness",
                "Rate": 100,
                "Rect": {"Left": 0, "Top": 0, "Width": 0, "Height": 0},
                "Suggestion": "block",
                "MessageTips": "no face detected, try again please.",
            }
        ],
    }
    assert found[4]["Results"][0]["Label"] == "normal"
    assert 90 <= found[1]["Results"][0]["Rate"] <= 100 and 80 <= found[0]["Results"][0]["Rate"] <= 100
    assert set(found[1]["Results"][0]["Rect"]) == {"Left", "Top", "Width", "Height"}


def test_result_can_be_an_object_and_tasks_a_json_string(
    sandbox: SandboxServer, client: httpx.Client, host: ImageHost
) -> None:
    sandbox.configure(result_as_string=False)
    url = host.put("/s/live.png", images.png(64, 64, "live"))
    body = {"Tasks": json.dumps([{"ImageURL": url}])}
    response = client.post(TOOL, json=body, headers={"X-Payment-Token": pay(client)["token"]})
    assert isinstance(response.json()["data"]["Result"], dict)
    assert [e["ImageURL"] for e in elements(response)] == [url]


@pytest.mark.parametrize(
    "body",
    [
        {"Tasks": []},
        {"Tasks": [{"ImageURL": "http://127.0.0.1:9/x.png"}] * 11},
        {"Tasks": "not json"},
        {"Tasks": {"ImageURL": "http://127.0.0.1:9/x.png"}},
        {"Tasks": [{"imageUrl": "http://127.0.0.1:9/x.png"}]},
        {"tasks": [{"ImageURL": "http://127.0.0.1:9/x.png"}]},
        [],
    ],
)
def test_bad_bodies_are_400_and_spend_nothing(client: httpx.Client, body: Any) -> None:
    payment = pay(client)
    response = client.post(TOOL, json=body, headers={"X-Payment-Token": payment["token"]})
    assert response.status_code == 400 and response.json()["error"]
    assert payment_state(client, payment)["remainingCalls"] == 1
    assert ledger(client)["tokens_consumed"] == 0


def _error(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) >= {"RequestId", "HostId", "Code", "Message"}
    return body["Code"], body["Message"]


def test_image_failures_answer_upstream_codes(sandbox: SandboxServer, client: httpx.Client, host: ImageHost) -> None:
    good = images.png(64, 64, "live")
    limit = len(good) + 100
    cases = {
        presigned(host.put("/e/old.png", good), datetime.now(UTC) - timedelta(hours=2), 900): "InvalidImage.Download",
        host.put("/e/v2.png", good) + f"?Signature=x&Expires={int(time.time()) - 60}": "InvalidImage.Download",
        host.put("/e/missing.png", good).replace("missing", "absent"): "InvalidImage.Download",
        host.put("/e/text.png", b"just some text, not an image"): "InvalidImage.Format",
        host.put("/e/cut.png", good[: len(good) // 2]): "InvalidImage.Decode",
        host.put("/e/cut.jpg", images.jpeg(64, 64, "live")[:-200]): "InvalidImage.Decode",
        host.put("/e/big.png", images.png(64, 64, "live", pad_to=limit + 1)): "InvalidImage.Size",
        host.put("/e/%E4%BA%BA.png", good).replace("%E4%BA%BA", "人"): "IllegalUrlParameter",
        "ftp://127.0.0.1/x.png": "InvalidImage.URL",
    }
    sandbox.configure(max_image_bytes=limit)
    for url, code in cases.items():
        got, message = _error(call(client, pay(client)["token"], [host.put("/e/ok.png", good), url]))
        assert got == code, (url, message)
        if "Expires" in url:
            assert "expired" in message
    # Settle first: each of those calls reached the upstream, so each spent its token.
    counts = ledger(client)
    assert counts["calls_billed"] == len(cases) and counts["upstream_errors"] == len(cases)


def _encoded(fmt: str, **params: Any) -> bytes:
    """A synthetic capture re-encoded by Pillow in `fmt`: such files carry no truth, so the fallback judges them."""
    picture = Image.open(io.BytesIO(images.png(96, 96, "spoof", seed=11)))
    out = io.BytesIO()
    picture.save(out, fmt, **params)
    return out.getvalue()


ACCEPTED = {
    "png": ("PNG", {}),
    "jpeg": ("JPEG", {"quality": 90}),
    "bmp": ("BMP", {}),
    "gif": ("GIF", {}),
    "webp": ("WEBP", {"quality": 80}),
    "webp-lossless": ("WEBP", {"lossless": True}),
}


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_every_documented_format_is_decoded_and_judged(client: httpx.Client, host: ImageHost, kind: str) -> None:
    fmt, params = ACCEPTED[kind]
    data = _encoded(fmt, **params)
    url = host.put(f"/fmt/{kind}", data)
    [found] = elements(call(client, pay(client)["token"], [url]))
    assert found["FaceNumber"] == len(fallback_truth(data))
    for result in found["Results"]:
        rect = result["Rect"]
        assert rect["Left"] + rect["Width"] <= 96 and rect["Top"] + rect["Height"] <= 96


@pytest.mark.parametrize("kind", sorted(ACCEPTED))
def test_every_truncated_format_is_undecodable(client: httpx.Client, host: ImageHost, kind: str) -> None:
    fmt, params = ACCEPTED[kind]
    data = _encoded(fmt, **params)
    for cut in (len(data) * 6 // 10, 40):
        url = host.put(f"/cut/{kind}-{cut}", data[:cut])
        assert _error(call(client, pay(client)["token"], [url])) == (
            "InvalidImage.Decode",
            "The image cannot be decoded: the file is incomplete or corrupt.",
        ), (kind, cut)


def test_other_formats_and_non_images_are_refused_as_format(client: httpx.Client, host: ImageHost) -> None:
    for name, data in {
        "tiff": _encoded("TIFF"),
        "ico": _encoded("ICO"),
        "pdf": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n",
        "text": b"camera 3 heartbeat ok\n",
        "empty": b"",
        "html": b"<html><body>403 Forbidden</body></html>",
    }.items():
        url = host.put(f"/other/{name}", data)
        assert _error(call(client, pay(client)["token"], [url]))[0] == "InvalidImage.Format", name


def _with_chunk_replaced(data: bytes, kind: bytes, body: bytes) -> bytes:
    """A PNG with the data of its first `kind` chunk replaced (and a correct CRC, so only the content is bad)."""
    pos = 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == kind:
            chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
            return data[:pos] + chunk + data[pos + 12 + length :]
        pos += 12 + length
    raise AssertionError(f"no {kind!r} chunk")


def test_corrupt_and_undecodable_images_are_refused_as_decode(client: httpx.Client, host: ImageHost) -> None:
    good = images.png(64, 64, "live")
    cases = {
        # Whole files whose header and end are fine: only decoding the pixels shows what is wrong.
        "zeroed-idat": _with_chunk_replaced(good, b"IDAT", bytes(400)),
        "garbage-idat": _with_chunk_replaced(good, b"IDAT", zlib.compress(b"\x07" * 65 * 64)),
        # The truth marker the sandbox keeps for batch-splitting tests: a perfect file the upstream refuses.
        "marked": images.png(64, 64, "undecodable"),
        "marked-jpeg": images.jpeg(64, 64, "undecodable"),
    }
    for name, data in cases.items():
        url = host.put(f"/corrupt/{name}", data)
        assert _error(call(client, pay(client)["token"], [url]))[0] == "InvalidImage.Decode", name


def _with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG whose header claims another size: the shape of a decompression bomb, without its memory."""
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def test_decompression_bombs_are_refused_by_size_before_decoding(
    sandbox: SandboxServer, client: httpx.Client, host: ImageHost
) -> None:
    good = images.png(64, 64, "live")
    above_ours = host.put("/bomb/ours.png", _with_size(good, 5000, 5000))
    above_pillows = host.put("/bomb/pillow.png", _with_size(good, 60000, 60000))
    code, message = _error(call(client, pay(client)["token"], [above_ours]))
    assert code == "InvalidImage.Size" and "5000x5000" in message
    assert _error(call(client, pay(client)["token"], [above_pillows]))[0] == "InvalidImage.Size"
    # The limit is a setting; the server thread survived both and still judges.
    small = host.put("/bomb/small.png", good)
    assert len(elements(call(client, pay(client)["token"], [small]))) == 1
    sandbox.configure(max_image_pixels=64 * 64 - 1)
    assert _error(call(client, pay(client)["token"], [small]))[0] == "InvalidImage.Size"
    assert client.post("/_sandbox/config", json={"max_image_pixels": 0}).status_code == 400


def test_truth_after_the_pixel_data_is_judged(client: httpx.Client, host: ImageHost) -> None:
    # Only a full decode reaches a text chunk placed between the pixel data and IEND.
    plain = images.png(64, 64, None, seed=2)
    text = b"irlive-truth\x00spoof"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", zlib.crc32(b"tEXt" + text))
    [found] = elements(call(client, pay(client)["token"], [host.put("/late.png", plain[:-12] + chunk + plain[-12:])]))
    assert [r["Label"] for r in found["Results"]] == ["liveness"]


def test_truncated_images_stay_refused_by_pillow() -> None:
    # The sandbox relies on Pillow's default; a library that turned it on would make truncated files judgeable.
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_the_sandbox_imports_nothing_from_the_worker() -> None:
    code = (
        "import sys, pkgutil, importlib, sandbox\n"
        "for m in pkgutil.iter_modules(sandbox.__path__): importlib.import_module('sandbox.' + m.name)\n"
        "leaked = sorted(n for n in sys.modules if n == 'worker' or n.startswith('worker.'))\n"
        "assert not leaked, leaked\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr


def test_failed_calls_keep_the_token_when_configured(
    sandbox: SandboxServer, client: httpx.Client, host: ImageHost
) -> None:
    bad = host.put("/r/text.png", b"not an image")
    good = host.put("/r/good.png", images.png(64, 64, "live"))
    sandbox.configure(failed_calls_consume_token=False)
    payment = pay(client)
    assert _error(call(client, payment["token"], [good, bad]))[0] == "InvalidImage.Format"
    assert payment_state(client, payment)["remainingCalls"] == 1
    counts = ledger(client)
    assert counts["tokens_consumed"] == 1 and counts["tokens_restored"] == 1
    assert counts["calls_billed"] == 0 and counts["images_billed"] == 0
    assert counts["billed_image_urls_path_counts"] == {}
    assert len(elements(call(client, payment["token"], [good]))) == 1
    assert ledger(client)["billed_image_urls_path_counts"] == {"/r/good.png": 1}


def test_bad_image_can_fail_alone(sandbox: SandboxServer, client: httpx.Client, host: ImageHost) -> None:
    bad = host.put("/b/text.png", b"not an image")
    good = host.put("/b/good.png", images.png(64, 64, "live"))
    sandbox.configure(bad_image_fails_call=False)
    found = elements(call(client, pay(client)["token"], [bad, good]))
    assert found[0] == {
        "FaceNumber": 0,
        "ImageURL": bad,
        "Results": [],
        "Code": "InvalidImage.Format",
        "Message": found[0]["Message"],
    }
    assert found[1]["Results"][0]["Label"] == "normal"
    assert _error(call(client, pay(client)["token"], [bad]))[0] == "InvalidImage.Format"


@pytest.mark.parametrize("style", ["429", "400"])
def test_throttled_calls_are_not_billed(
    sandbox: SandboxServer, client: httpx.Client, host: ImageHost, style: str
) -> None:
    url = host.put("/th/a.png", images.png(64, 64, "live"))
    # One call per 1000 s: the second call is throttled, whatever the machine's speed.
    sandbox.configure(rate_limit_per_s=0.001, throttle_style=style)
    assert call(client, pay(client)["token"], [url]).status_code == 200
    payment = pay(client)
    response = call(client, payment["token"], [url])
    if style == "429":
        assert response.status_code == 429
        assert 0 < float(response.headers["Retry-After"]) <= 1000
        assert response.json()["error"]
    else:
        assert _error(response)[0] == "Throttling.User"
    assert payment_state(client, payment)["remainingCalls"] == 1
    counts = ledger(client)
    assert counts["throttled"] == 1 and counts["calls_billed"] == 1 and counts["tokens_consumed"] == 1
    sandbox.configure(rate_limit_per_s=0)
    assert call(client, payment["token"], [url]).status_code == 200


def test_5xx_after_settling_is_billed(sandbox: SandboxServer, client: httpx.Client, host: ImageHost) -> None:
    url = host.put("/f/a.png", images.png(64, 64, "live"))
    sandbox.configure(p_5xx=1.0)
    payment = pay(client)
    response = call(client, payment["token"], [url])
    assert response.status_code in (500, 503)
    assert response.json()["Code"] in ("InternalError", "ServiceUnavailable")
    assert payment_state(client, payment)["status"] == "exhausted"
    counts = ledger(client)
    assert counts["errors_5xx"] == 1 and counts["calls_billed"] == 1 and counts["images_billed"] == 1


def test_injected_timeout_spends_the_token(sandbox: SandboxServer, client: httpx.Client, host: ImageHost) -> None:
    url = host.put("/to/a.png", images.png(64, 64, "live"))
    sandbox.configure(p_timeout=1.0, timeout_sleep_s=0.0)
    assert len(elements(call(client, pay(client)["token"], [url]))) == 1
    sandbox.configure(timeout_sleep_s=60.0)
    payment = pay(client)
    with pytest.raises(httpx.ReadTimeout):
        client.post(TOOL, json={"Tasks": [{"ImageURL": url}]}, headers={"X-Payment-Token": payment["token"]},
                    timeout=0.5)  # fmt: skip
    # The outcome is unknown to the caller, but the read-back shows the token was spent.
    assert payment_state(client, payment)["status"] == "exhausted"
    assert ledger(client)["timeouts"] == 2


def test_ledger_counts_and_reset(client: httpx.Client, host: ImageHost) -> None:
    urls = [host.put(f"/l/{i}.png", images.png(64, 64, "live", seed=i)) for i in range(10)]
    elements(call(client, pay(client)["token"], urls))
    elements(call(client, pay(client)["token"], urls[:3]))
    call(client, None, urls)
    counts = ledger(client)
    assert counts["calls_total"] == 3 and counts["calls_billed"] == 2 and counts["images_billed"] == 13
    assert counts["payments_created"] == 2 and counts["rejected_402"] == 1 and counts["succeeded"] == 2
    paths = counts["billed_image_urls_path_counts"]
    assert paths["/l/0.png"] == 2 and paths["/l/9.png"] == 1 and len(paths) == 10
    assert client.post("/_sandbox/reset").status_code == 200
    assert ledger(client)["calls_total"] == 0 and ledger(client)["billed_image_urls_path_counts"] == {}


def test_api_key_is_required_when_set(sandbox: SandboxServer, client: httpx.Client, host: ImageHost) -> None:
    url = host.put("/k/a.png", images.png(64, 64, "live"))
    sandbox.configure(api_key="s3cret")
    assert client.post("/api/payments", json={"serviceId": SERVICE}).status_code == 401
    wrong = {"X-API-Key": "nope"}
    assert client.post("/api/payments", json={"serviceId": SERVICE}, headers=wrong).status_code == 401
    key = {"X-API-Key": "s3cret"}
    payment = client.post("/api/payments", json={"serviceId": SERVICE}, headers=key).json()
    body = {"Tasks": [{"ImageURL": url}]}
    assert client.post(TOOL, json=body, headers={"X-Payment-Token": payment["token"]}).status_code == 401
    paid = client.post(TOOL, json=body, headers={**key, "X-Payment-Token": payment["token"]})
    assert paid.status_code == 200
    assert ledger(client)["rejected_401"] == 3


def test_config_endpoint_validates_partial_updates(client: httpx.Client) -> None:
    response = client.post("/_sandbox/config", json={"rate_limit_per_s": 2, "latency_ms": 5, "api_key": "k"})
    assert response.status_code == 200
    doc = response.json()
    assert doc["rate_limit_per_s"] == 2.0 and doc["latency_ms"] == 5 and doc["api_key"] == "***"
    assert doc["price_cents"] == 20
    for bad in ({"nope": 1}, {"latency_ms": "5"}, {"failed_calls_consume_token": 1}, {"throttle_style": "503"}):
        assert client.post("/_sandbox/config", json=bad).status_code == 400
    assert client.get("/_sandbox/config").json()["latency_ms"] == 5


def test_cli_serves_until_sigterm(host: ImageHost) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "sandbox", "--port", "0", "--rate-limit-per-s", "3",
               "--failed-calls-consume-token", "false"]  # fmt: skip
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("sandbox listening on http://127.0.0.1:")
            url = line.rsplit(" ", 1)[1]
            config = httpx.get(url + "/_sandbox/config").json()
            assert config["rate_limit_per_s"] == 3.0 and config["failed_calls_consume_token"] is False
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_cli_refuses_a_bad_flag() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "sandbox", "--throttle-style", "503"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "throttle_style" in done.stderr


def _answer_result(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    result = response.json()["data"]["Result"]
    doc: dict[str, Any] = json.loads(result) if isinstance(result, str) else result
    return doc


def _spent_once(client: httpx.Client, payment: dict[str, Any], images: int) -> None:
    """Every answer_mode settles its token like a real answer: exhausted, one call and its images billed."""
    assert payment_state(client, payment)["status"] == "exhausted"
    counts = ledger(client)
    assert counts["calls_billed"] == counts["tokens_consumed"] == 1 and counts["tokens_restored"] == 0
    assert counts["images_billed"] == images


@pytest.fixture
def judged_pair(host: ImageHost) -> list[str]:
    live = host.put("/am/live.png", images.png(64, 64, "live"))
    return [live, host.put("/am/spoof.png", images.png(64, 64, "spoof"))]


def test_answer_mode_not_json_is_a_paid_200_that_is_not_json(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="not_json")
    payment = pay(client)
    response = call(client, payment["token"], judged_pair)
    assert response.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.content)
    _spent_once(client, payment, 2)


def test_answer_mode_result_not_json_cuts_the_result_string(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="result_not_json", result_as_string=False)
    payment = pay(client)
    response = call(client, payment["token"], judged_pair)
    assert response.status_code == 200 and response.json()["code"] == "200"
    result = response.json()["data"]["Result"]
    assert isinstance(result, str) and result.startswith('{"RequestId"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(result)
    _spent_once(client, payment, 2)


def test_answer_mode_fewer_elements_drops_the_last_image(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="fewer_elements")
    payment = pay(client)
    found = elements(call(client, payment["token"], judged_pair))
    assert [e["ImageURL"] for e in found] == judged_pair[:1]
    assert found[0]["Results"][0]["Label"] == "normal"
    _spent_once(client, payment, 2)
    assert elements(call(client, pay(client)["token"], judged_pair[:1])) == []


def test_answer_mode_more_elements_adds_a_contradicting_element_for_the_first_image(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="more_elements")
    payment = pay(client)
    found = elements(call(client, payment["token"], judged_pair))
    assert [e["ImageURL"] for e in found] == [judged_pair[0], judged_pair[1], judged_pair[0]]
    assert [r["Label"] for r in found[0]["Results"]] == ["normal"]
    assert [r["Label"] for r in found[2]["Results"]] == ["liveness"]
    _spent_once(client, payment, 2)
    spoof_first = elements(call(client, pay(client)["token"], judged_pair[::-1]))
    assert [r["Label"] for r in spoof_first[0]["Results"]] == ["liveness"]
    assert [r["Label"] for r in spoof_first[2]["Results"]] == ["normal"]


def test_answer_mode_unknown_url_names_images_not_in_the_call(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="unknown_url")
    payment = pay(client)
    found = elements(call(client, payment["token"], judged_pair))
    assert len(found) == 2 and not {e["ImageURL"] for e in found} & set(judged_pair)
    assert [e["Results"][0]["Label"] for e in found] == ["normal", "liveness"]
    _spent_once(client, payment, 2)


def test_answer_mode_missing_fields_keeps_only_image_urls(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="missing_fields")
    payment = pay(client)
    assert elements(call(client, payment["token"], judged_pair)) == [{"ImageURL": url} for url in judged_pair]
    _spent_once(client, payment, 2)


def test_answer_mode_huge_body_is_valid_json_of_about_50_mb(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="huge_body")
    payment = pay(client)
    response = call(client, payment["token"], judged_pair)
    assert response.status_code == 200
    assert len(response.content) == int(response.headers["Content-Length"]) == 50 * 1024 * 1024
    assert [e["ImageURL"] for e in elements(response)] == judged_pair
    _spent_once(client, payment, 2)


def test_answer_mode_huge_body_survives_a_caller_hanging_up(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="huge_body")
    payment = pay(client)
    body = {"Tasks": [{"ImageURL": url} for url in judged_pair]}
    with client.stream("POST", TOOL, json=body, headers={"X-Payment-Token": payment["token"]}) as response:
        assert response.status_code == 200
        next(response.iter_bytes())
    _spent_once(client, payment, 2)
    sandbox.configure(answer_mode="normal")
    assert len(elements(call(client, pay(client)["token"], judged_pair))) == 2


def test_answer_mode_is_validated_and_a_cli_flag(client: httpx.Client) -> None:
    assert client.get("/_sandbox/config").json()["answer_mode"] == "normal"
    refused = client.post("/_sandbox/config", json={"answer_mode": "sometimes"})
    assert refused.status_code == 400 and "answer_mode" in refused.json()["error"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "sandbox", "--answer-mode", "sometimes"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2 and "answer_mode" in done.stderr


# --- hostile answer values: each a valid-looking 200 that a careless reader raises on -------------------------


def test_answer_mode_nested_json_is_a_result_string_no_recursive_parser_reads(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="nested_json", result_as_string=False)
    payment = pay(client)
    response = call(client, payment["token"], judged_pair)
    assert response.status_code == 200 and response.json()["code"] == "200"
    result = response.json()["data"]["Result"]
    assert isinstance(result, str) and result == "[" * 100_000 + "]" * 100_000
    with pytest.raises(RecursionError):
        json.loads(result)
    _spent_once(client, payment, 2)


@pytest.mark.parametrize("as_string", [True, False])
def test_answer_mode_nan_rect_writes_bare_nan_and_infinity_in_every_rect(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str], as_string: bool
) -> None:
    sandbox.configure(answer_mode="nan_rect", result_as_string=as_string)
    payment = pay(client)
    response = call(client, payment["token"], judged_pair)
    text = response.json()["data"]["Result"] if as_string else response.text
    assert '"Left": NaN' in text and '"Top": Infinity' in text and '"Width": -Infinity' in text
    found = elements(response)
    assert [e["ImageURL"] for e in found] == judged_pair
    assert [e["Results"][0]["Label"] for e in found] == ["normal", "liveness"]
    for rect in (r["Rect"] for e in found for r in e["Results"]):
        assert math.isnan(rect["Left"]) and rect["Top"] == math.inf and rect["Width"] == -math.inf
        assert math.isfinite(rect["Height"])
    _spent_once(client, payment, 2)


@pytest.mark.parametrize("as_string", [True, False])
def test_answer_mode_huge_rect_writes_1e999_which_parses_as_inf(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str], as_string: bool
) -> None:
    sandbox.configure(answer_mode="huge_rect", result_as_string=as_string)
    payment = pay(client)
    response = call(client, payment["token"], judged_pair)
    text = response.json()["data"]["Result"] if as_string else response.text
    assert '"Width": 1e999, "Height": 1e999' in text and "Infinity" not in text
    for rect in (r["Rect"] for e in elements(response) for r in e["Results"]):
        assert rect["Width"] == rect["Height"] == math.inf
        assert math.isfinite(rect["Left"]) and math.isfinite(rect["Top"])
    _spent_once(client, payment, 2)


def test_answer_mode_bad_image_url_names_a_url_urlsplit_raises_on(
    sandbox: SandboxServer, client: httpx.Client, judged_pair: list[str]
) -> None:
    sandbox.configure(answer_mode="bad_image_url")
    payment = pay(client)
    found = elements(call(client, payment["token"], judged_pair))
    assert [e["Results"][0]["Label"] for e in found] == ["normal", "liveness"], "in input order"
    for element in found:
        with pytest.raises(ValueError):
            urlsplit(element["ImageURL"])
    _spent_once(client, payment, 2)


@pytest.mark.parametrize("as_string", [True, False])
def test_answer_mode_lone_surrogate_escapes_one_in_every_message_tips(
    sandbox: SandboxServer, client: httpx.Client, host: ImageHost, as_string: bool
) -> None:
    urls = [host.put("/ls/live.png", images.png(64, 64, "live")), host.put("/ls/none.png", images.png(64, 64, None))]
    urls.append(host.put("/ls/empty.png", images.png(64, 64, "no_face")))
    sandbox.configure(answer_mode="lone_surrogate", result_as_string=as_string)
    payment = pay(client)
    response = call(client, payment["token"], urls)
    # The body itself is ASCII JSON: the surrogate travels as an escape and appears only once parsed.
    assert response.content.isascii() and "udc80" in response.text
    found = elements(response)
    assert found[2]["FaceNumber"] == 0
    for result in (r for e in found for r in e["Results"]):
        assert result["MessageTips"] == "blurred face \udc80 please check"
        with pytest.raises(UnicodeEncodeError):
            result["MessageTips"].encode()
    _spent_once(client, payment, 3)


# --- knobs: a hostile Retry-After, a slow purchase, a window between settling and fetching --------------------


@pytest.mark.parametrize("value", ["100000000", "1e400", "Wed, 21 Oct 2099 07:28:00 GMT", "soon, maybe"])
def test_retry_after_is_sent_verbatim_on_every_429(
    sandbox: SandboxServer, client: httpx.Client, host: ImageHost, value: str
) -> None:
    url = host.put("/ra/a.png", images.png(64, 64, "live"))
    sandbox.configure(rate_limit_per_s=0.001, retry_after=value)
    assert call(client, pay(client)["token"], [url]).status_code == 200
    for _ in range(2):
        response = call(client, pay(client)["token"], [url])
        assert response.status_code == 429 and response.headers.get_list("Retry-After") == [value]
        # The body keeps the real wait.
        assert 0 < response.json()["retryAfter"] <= 1000
    sandbox.configure(retry_after="")
    assert 0 < float(call(client, pay(client)["token"], [url]).headers["Retry-After"]) <= 1000
    assert ledger(client)["throttled"] == 3


def test_retry_after_is_validated_as_a_header_value(client: httpx.Client) -> None:
    for bad in ("1\r\nX-Injected: yes", "tab\there", "é", "9" * 201, 5):
        refused = client.post("/_sandbox/config", json={"retry_after": bad})
        assert refused.status_code == 400 and "retry_after" in refused.json()["error"], bad
    assert client.post("/_sandbox/config", json={"retry_after": "9" * 200}).status_code == 200


def test_payment_latency_delays_the_purchase(sandbox: SandboxServer, client: httpx.Client) -> None:
    sandbox.configure(payment_latency_ms=400)
    started = time.monotonic()
    payment = pay(client)
    assert time.monotonic() - started >= 0.4
    assert payment_state(client, payment)["status"] == "paid"
    # Only the purchase is slow: reading it back is not.
    started = time.monotonic()
    payment_state(client, payment)
    assert time.monotonic() - started < 0.4


def test_payment_latency_is_interrupted_by_stop_and_then_creates_nothing() -> None:
    server = SandboxServer(SandboxConfig(payment_latency_ms=600_000)).start()
    answers: list[httpx.Response] = []
    http = httpx.Client(base_url=server.url, timeout=30)

    def buy() -> None:
        answers.append(http.post("/api/payments", json={"serviceId": SERVICE}))

    buyer = threading.Thread(target=buy)
    try:
        buyer.start()
        time.sleep(1.0)  # the purchase is asleep inside the sandbox by now
    finally:
        started = time.monotonic()
        server.stop()
    buyer.join(timeout=10)
    http.close()
    assert time.monotonic() - started < 5, "stop() waited out the purchase"
    assert [a.status_code for a in answers] == [503]
    assert server.ledger()["payments_created"] == 0


def test_fetch_delay_opens_a_window_after_the_token_is_spent_and_before_the_fetch(
    sandbox: SandboxServer, client: httpx.Client, host: ImageHost
) -> None:
    url = host.put("/fd/swapped.png", images.png(64, 64, "live"))
    sandbox.configure(fetch_delay_ms=2000)
    payment = pay(client)
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(call(client, payment["token"], [url])))
    started = time.monotonic()
    caller.start()
    deadline = started + 1.5
    while ledger(client)["tokens_consumed"] == 0:
        assert time.monotonic() < deadline, "the token was not consumed before the delay"
        time.sleep(0.02)
    # Settled, not yet fetched: the object changes under the seller, which judges the new content.
    host.put("/fd/swapped.png", images.png(64, 64, "spoof"))
    caller.join(timeout=30)
    assert time.monotonic() - started >= 2.0
    [found] = elements(answers[0])
    assert [r["Label"] for r in found["Results"]] == ["liveness"]
    _spent_once(client, payment, 1)


def test_new_knobs_are_cli_flags_with_their_ranges() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shown = subprocess.run([sys.executable, "-m", "sandbox", "--help"], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=30)  # fmt: skip
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "--retry-after" in text and "--payment-latency-ms" in text and "--fetch-delay-ms" in text
    assert text.count("(0 to 600000)") == 3 and "at most 200 characters" in text
    for flag, value in (("--fetch-delay-ms", "-1"), ("--payment-latency-ms", "600001"), ("--retry-after", "a\tb")):
        done = subprocess.run([sys.executable, "-m", "sandbox", flag, value], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=30)  # fmt: skip
        assert done.returncode == 2 and flag.removeprefix("--").replace("-", "_") in done.stderr, done.stderr


def test_a_legacy_only_deployment_sells_the_main_service_on_the_legacy_path(
    sandbox: SandboxServer, client: httpx.Client, host: ImageHost
) -> None:
    sandbox.configure(tool_paths="legacy")
    url = host.put("/legacy-only.png", images.png(64, 64, "live"))
    assert call(client, None, [url], path=TOOL).status_code == 404
    assert client.post("/api/payments", json={"serviceId": LEGACY_SERVICE}).status_code == 404
    offer = call(client, None, [url], path=LEGACY)
    assert offer.status_code == 402 and offer.json()["serviceId"] == SERVICE
    assert len(elements(call(client, pay(client, SERVICE)["token"], [url], path=LEGACY))) == 1
    assert ledger(client)["calls_billed"] == 1
