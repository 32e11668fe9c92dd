"""The imitated upstream (DetectInfraredLivingFace): input schema, image fetching, verdicts, answer shapes."""

from __future__ import annotations

import hashlib
import io
import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from PIL import Image

from sandbox.truth import UNDECODABLE, fallback_truth, image_truth_text, parse_truth

HOST_ID = "facebody.cn-shanghai.aliyuncs.com"
ACTION = "DetectInfraredLivingFace"
MAX_TASKS = 10
NO_FACE_TIP = "no face detected, try again please."
# The formats the upstream documents, by Pillow's names for them.
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
# answer_mode "huge_body": the whole answer's size, and the piece size it is written in.
HUGE_BODY_BYTES = 50 * 1024 * 1024
_PIECE_BYTES = 1024 * 1024
# answer_mode "unknown_url": what every element names instead of the image it was asked about.
FOREIGN_URL = "https://images.example.invalid/not-in-this-call/{n}.png"
NOT_JSON_BODY = b"<html><body><h1>502 Bad Gateway</h1><p>upstream answered garbage</p></body></html>\n"
# answer_mode "nested_json": how deep data.Result's arrays go (far past any recursive parser's limit).
NESTED_DEPTH = 100_000
# answer_mode "bad_image_url": an unclosed IPv6 host, on which urllib.parse.urlsplit raises ValueError.
BAD_IMAGE_URL = "http://[::1"
# answer_mode "lone_surrogate": MessageTips with an unpaired low surrogate (json.dumps writes it as \udc80).
SURROGATE_TIPS = "blurred face \udc80 please check"
# answer_mode "huge_rect": json.dumps writes inf as Infinity, so this marker is swapped for the token 1e999 in
# the text. A NUL cannot appear unescaped in a URL, so no other string of the answer can hold it.
_HUGE_MARKER = "\x00irlive-huge-number\x00"
HUGE_NUMBER = "1e999"


class UpstreamError(Exception):
    """An upstream refusal, carried as Alibaba's error body with its HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def body(self) -> dict[str, Any]:
        return {"RequestId": new_request_id(), "HostId": HOST_ID, "Code": self.code, "Message": self.message}


def new_request_id() -> str:
    return str(uuid.uuid4()).upper()


def url_path(url: str) -> str:
    """The part of an image URL that is safe to count and log: presigned queries are credentials."""
    try:
        return urlsplit(url).path
    except ValueError:
        return ""


def parse_tasks(body: Any) -> list[str]:
    """The ImageURLs of a call body, validated like the marketplace's input schema; ValueError says why."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    if "Tasks" not in body:
        raise ValueError("Tasks is required")
    tasks = body["Tasks"]
    if isinstance(tasks, str):
        # The marketplace forwards a string-encoded array as is, and the upstream accepts it.
        try:
            tasks = json.loads(tasks)
        except json.JSONDecodeError as exc:
            raise ValueError("Tasks is a string but not a JSON array") from exc
    if not isinstance(tasks, list):
        raise ValueError("Tasks must be an array")
    if not 1 <= len(tasks) <= MAX_TASKS:
        raise ValueError(f"Tasks must hold 1 to {MAX_TASKS} items, got {len(tasks)}")
    urls: list[str] = []
    for i, task in enumerate(tasks):
        if not isinstance(task, dict) or not isinstance(task.get("ImageURL"), str) or not task["ImageURL"]:
            raise ValueError(f"Tasks[{i}] must be an object with a string ImageURL")
        urls.append(task["ImageURL"])
    return urls


def check_url(url: str, now: float) -> None:
    """Refuse, before any download, URLs the upstream cannot use, including presigned ones past expiry."""
    if not url.isascii():
        raise UpstreamError("IllegalUrlParameter", "The image URL contains non-ASCII characters.")
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise UpstreamError("InvalidImage.URL", "The image URL is malformed.") from exc
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UpstreamError("InvalidImage.URL", "The image URL must be a public http(s) URL.")
    query = parse_qs(parts.query)
    # moto never checks presigned expiry; the real storage would refuse the download, so we do.
    if "X-Amz-Date" in query and "X-Amz-Expires" in query:
        try:
            signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
            expires = signed.timestamp() + int(query["X-Amz-Expires"][0])
        except ValueError as exc:
            raise UpstreamError("InvalidImage.Download", "The image URL has a malformed signature.") from exc
    elif "Expires" in query and "Signature" in query:
        # SigV2 presigning carries the expiry as epoch seconds.
        try:
            expires = int(query["Expires"][0])
        except ValueError as exc:
            raise UpstreamError("InvalidImage.Download", "The image URL has a malformed signature.") from exc
    else:
        return
    if now > expires:
        raise UpstreamError("InvalidImage.Download", "Failed to download the image: the presigned URL has expired.")


def fetch(client: httpx.Client, url: str, max_bytes: int, timeout_s: float) -> bytes:
    """Download an image like the upstream: no redirects, a size cap, a cut-off for the whole body."""
    deadline = time.monotonic() + timeout_s
    try:
        with client.stream("GET", url, follow_redirects=False, timeout=timeout_s) as response:
            if response.status_code != 200:
                raise UpstreamError(
                    "InvalidImage.Download", f"Failed to download the image: HTTP {response.status_code}."
                )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise _too_big(max_bytes)
            data = bytearray()
            for chunk in response.iter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise _too_big(max_bytes)
                if time.monotonic() > deadline:
                    raise UpstreamError("InvalidImage.Download", "Failed to download the image: timed out.")
            return bytes(data)
    except httpx.HTTPError as exc:
        # The exception text names the URL, which may carry a signature: keep only the kind of failure.
        raise UpstreamError("InvalidImage.Download", f"Failed to download the image: {type(exc).__name__}.") from None


def _too_big(max_bytes: int) -> UpstreamError:
    return UpstreamError("InvalidImage.Size", f"The image is larger than {max_bytes} bytes.")


@dataclass(frozen=True)
class Decoded:
    """What decoding an image told: its size in pixels and the truth stored in it (None if there is none)."""

    width: int
    height: int
    truth: str | None


def inspect(data: bytes, max_pixels: int) -> Decoded:
    """Decode the whole image like a real upstream would; UpstreamError says why it cannot be judged."""
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        # Pillow's own limit, checked from the header when it is far above ours (or ours is set higher).
        raise UpstreamError("InvalidImage.Size", "The image has too many pixels to decode safely.") from None
    except Exception:
        # Pillow raises many kinds of errors for a bad header (and WEBP decodes the whole file while opening);
        # what tells the two refusals apart is whether the data claims to be one of the accepted formats.
        if _looks_like_an_image(data):
            raise _undecodable() from None
        raise UpstreamError("InvalidImage.Format", "The image format is not supported.") from None
    with image:
        width, height = image.size
        # Checked before load(): the header alone says how much memory the pixels would take.
        if width * height > max_pixels:
            raise UpstreamError("InvalidImage.Size", f"The image has {width}x{height} pixels, more than {max_pixels}.")
        try:
            image.load()
        except Exception:
            # Truncated or corrupt data fails inside the codecs as OSError, SyntaxError, ValueError, EOFError,
            # zlib or struct errors, and more: every one of them is an image the upstream cannot decode.
            raise _undecodable() from None
        truth = image_truth_text(image)
    if truth == UNDECODABLE:
        raise UpstreamError("InvalidImage.Decode", "The image content cannot be decoded.")
    return Decoded(width, height, truth)


def _looks_like_an_image(data: bytes) -> bool:
    """Whether the first bytes claim one of the accepted formats, by Pillow's own signature checks."""
    Image.init()
    head = data[:16]
    return any((accept := Image.OPEN[name][1]) is not None and bool(accept(head)) for name in FORMATS)


def _undecodable() -> UpstreamError:
    return UpstreamError("InvalidImage.Decode", "The image cannot be decoded: the file is incomplete or corrupt.")


def judge(url: str, data: bytes, image: Decoded) -> dict[str, Any]:
    """One answer element, from the truth stored in the image (or a stable hash-based stand-in)."""
    faces = None if image.truth is None else parse_truth(image.truth)
    if faces is None:
        faces = fallback_truth(data)
    if not faces:
        return {
            "FaceNumber": 0,
            "ImageURL": url,
            "Results": [
                {
                    "Label": "liveness",
                    "Rate": 100,
                    "Rect": {"Left": 0, "Top": 0, "Width": 0, "Height": 0},
                    "Suggestion": "block",
                    "MessageTips": NO_FACE_TIP,
                }
            ],
        }
    digest = hashlib.sha256(data).digest()
    width, height = image.width, image.height
    results: list[dict[str, Any]] = []
    for i, face in enumerate(faces):
        # Stable per image and face, so a repeated call answers the same.
        jitter = int.from_bytes(digest[(2 * i) % 30 : (2 * i) % 30 + 2], "big")
        slot = width // len(faces)
        rect = {"Left": i * slot + slot // 4, "Top": height // 4, "Width": slot // 2, "Height": height // 2}
        if face == "live":
            rate = round(90 + (jitter % 1000) / 100, 2)
            results.append(_result("normal", rate, rect, "pass"))
        else:
            rate = round(80 + (jitter % 2000) / 100, 2)
            results.append(_result("liveness", rate, rect, "block" if rate >= 90 else "review"))
    return {"FaceNumber": len(faces), "ImageURL": url, "Results": results}


def _result(label: str, rate: float, rect: dict[str, int], suggestion: str) -> dict[str, Any]:
    return {"Label": label, "Rate": rate, "Rect": rect, "Suggestion": suggestion, "MessageTips": ""}


def failed_element(url: str, error: UpstreamError) -> dict[str, Any]:
    """The element of an image that failed in a call that otherwise succeeded (bad_image_fails_call off)."""
    return {"FaceNumber": 0, "ImageURL": url, "Results": [], "Code": error.code, "Message": error.message}


def envelope(elements: list[dict[str, Any]], result_as_string: bool) -> dict[str, Any]:
    """The marketplace's success answer around the upstream body."""
    result = {"RequestId": new_request_id(), "Data": {"Elements": elements}}
    return {
        "code": "200",
        "message": "success",
        "requestId": new_request_id(),
        "content": "",
        "data": {"Action": ACTION, "Result": _dumps(result) if result_as_string else result},
    }


def _dumps(doc: Any) -> str:
    """json.dumps, NaN and Infinity written bare as Python does, and each huge_rect marker as the token 1e999."""
    return json.dumps(doc).replace(json.dumps(_HUGE_MARKER), HUGE_NUMBER)


@dataclass(frozen=True)
class Body:
    """An answer's bytes in pieces, so a huge one is written without being held in memory."""

    length: int
    pieces: Iterable[bytes]
    content_type: str = "application/json"


def json_body(doc: Any) -> Body:
    payload = _dumps(doc).encode()
    return Body(len(payload), (payload,))


def answer(mode: str, elements: list[dict[str, Any]], result_as_string: bool) -> Body:
    """The 200 answer to a judged call, shaped by answer_mode (see sandbox.config.ANSWER_MODES)."""
    if mode == "not_json":
        return Body(len(NOT_JSON_BODY), (NOT_JSON_BODY,))
    doc = envelope(_reshape(mode, elements), result_as_string)
    if mode == "result_not_json":
        text = json.dumps({"RequestId": new_request_id(), "Data": {"Elements": elements}})
        doc["data"]["Result"] = text[: len(text) // 2]
    if mode == "nested_json":
        # Valid JSON, but only a parser without a recursion limit reads it; always a string, as the mode says.
        doc["data"]["Result"] = "[" * NESTED_DEPTH + "]" * NESTED_DEPTH
    if mode == "huge_body":
        return _padded(doc, HUGE_BODY_BYTES)
    return json_body(doc)


def _reshape(mode: str, elements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if mode == "fewer_elements":
        return elements[:-1]
    if mode == "more_elements" and elements:
        return [*elements, _contradiction(elements[0])]
    if mode == "unknown_url":
        return [{**e, "ImageURL": FOREIGN_URL.format(n=i)} for i, e in enumerate(elements)]
    if mode == "missing_fields":
        return [{"ImageURL": e["ImageURL"]} for e in elements]
    if mode == "bad_image_url":
        return [{**e, "ImageURL": BAD_IMAGE_URL} for e in elements]
    if mode in _FACE_CHANGES:
        change = _FACE_CHANGES[mode]
        return [{**e, "Results": [change(r) for r in e.get("Results") or []]} for e in elements]
    return elements


def _nan_rect(face: dict[str, Any]) -> dict[str, Any]:
    # Height stays finite: a reader should drop only the values it cannot use.
    rect = {**face.get("Rect", {}), "Left": math.nan, "Top": math.inf, "Width": -math.inf}
    return {**face, "Rect": rect}


def _huge_rect(face: dict[str, Any]) -> dict[str, Any]:
    return {**face, "Rect": {**face.get("Rect", {}), "Width": _HUGE_MARKER, "Height": _HUGE_MARKER}}


def _lone_surrogate(face: dict[str, Any]) -> dict[str, Any]:
    return {**face, "MessageTips": SURROGATE_TIPS}


# The modes that change every face (every Results entry, the no-face one included) and keep the rest valid.
_FACE_CHANGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "nan_rect": _nan_rect,
    "huge_rect": _huge_rect,
    "lone_surrogate": _lone_surrogate,
}


def _contradiction(element: dict[str, Any]) -> dict[str, Any]:
    """A second element for the same image, with the opposite verdict: live for a spoof or no face, else spoof."""
    rect = {"Left": 0, "Top": 0, "Width": 64, "Height": 64}
    results = element.get("Results") or []
    was_live = element.get("FaceNumber", 0) > 0 and all(r.get("Label") == "normal" for r in results)
    face = _result("liveness", 99.0, rect, "block") if was_live else _result("normal", 99.0, rect, "pass")
    return {"FaceNumber": 1, "ImageURL": element["ImageURL"], "Results": [face]}


def _padded(doc: dict[str, Any], total: int) -> Body:
    """`doc` with a `padding` string member that brings the JSON text to `total` bytes: valid, but huge."""
    head = json.dumps(doc)[:-1].encode() + b', "padding": "'
    tail = b'"}'
    fill = max(0, total - len(head) - len(tail))

    def pieces() -> Iterator[bytes]:
        yield head
        piece = b"x" * _PIECE_BYTES
        left = fill
        while left > 0:
            yield piece[:left]
            left -= _PIECE_BYTES
        yield tail

    return Body(len(head) + fill + len(tail), pieces())
