"""Upstream answer -> one verdict per image (pure: no I/O).

A paid answer is read so that nothing the seller can put in it makes this module raise anything but the two
exceptions below, and each of them decides whether the images' groups are paid for again:

- `AnswerError`: the answer lacks a usable element for an image (no element, missing fields, an unknown Label,
  data.Result that is not JSON). A seller fault of shape: the pipeline retries those images with a new payment,
  up to max attempts.
- `UnreadableResult`: data.Result is valid JSON our parser cannot read (nested deeper than it recurses). The
  paid call ends recorded (`error`, code `unreadable_answer`, the answer kept in the ledger), never paid again.
  (The marketplace client usually meets such a body first and raises UnreadableAnswer: the same outcome.)
  Any other exception escaping `judge_answer` (a bug of ours) gets the same treatment from the pipeline.

Hostile *values* inside a well-shaped element are readable, so the images get their verdicts, and nothing is
paid again:

- a Rect value that is NaN, +-Infinity (or 1e999, which parses as inf), beyond +-2**53, a bool or not a
  number is dropped from `rect`; the other values stay;
- a Rate that is not a finite number is None;
- MessageTips, Suggestion, Label, Code and Message have lone surrogates replaced by U+FFFD, since the record is
  written as UTF-8 (Redis, S3) and a lone surrogate cannot be encoded;
- an ImageURL that urllib cannot split (e.g. "http://[::1") names nothing: the element is matched by position,
  like an element with no ImageURL;
- an integer literal longer than Python's int conversion limit parses as a float (inf when too big), instead
  of failing the whole data.Result.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from worker.ops.redact import redact

# Worst first: an image's Suggestion is the worst of its faces'.
_SUGGESTION_RANK = {"block": 0, "review": 1, "pass": 2}
# Seller text quoted inside our error messages is cut to this many characters: a reason is not an archive.
_QUOTE_CHARS = 200
_SURROGATE = re.compile("[\ud800-\udfff]")
# Python refuses to convert longer digit strings to int (sys.get_int_max_str_digits, 4300 by default) and json
# would raise; a lower limit set for the process is honoured, "unlimited" is not (long conversions are slow).
_MAX_INT_DIGITS = min(4300, sys.get_int_max_str_digits() or 4300)
# Rect values beyond JSON's exactly representable integers (IEEE doubles) are not coordinates of any image.
_MAX_RECT = 2**53


class AnswerError(ValueError):
    """The seller's answer does not have the documented shape."""


class ElementError(AnswerError):
    """The seller refused this one image inside an answered call (an element carrying an error Code)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class UnreadableResult(Exception):
    """data.Result is valid JSON that our parser cannot read (too deeply nested): not a seller's missing element.

    Deliberately not an AnswerError (nor a ValueError): the pipeline records the paid images as unreadable
    instead of retrying them with a new payment.
    """


@dataclass(frozen=True)
class Face:
    """One face as the upstream judged it; `live` is the un-inverted reading of `Label`."""

    label: str
    live: bool
    rate: float | None
    suggestion: str | None
    rect: dict[str, int] | None
    message_tips: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "live": self.live,
            "rate": self.rate,
            "suggestion": self.suggestion,
            "rect": self.rect,
            "message_tips": self.message_tips,
        }


@dataclass(frozen=True)
class Judgement:
    """The verdict of one image: live, spoof or no_face, with what the upstream said."""

    verdict: str
    faces: int
    suggestion: str | None
    rate: float | None
    message_tips: str | None
    face_results: list[Face] = field(default_factory=list)


def parse_result(result: Any) -> dict[str, Any]:
    """`data.Result` arrives as an object or as a JSON-encoded string; return the object."""
    if isinstance(result, str):
        try:
            result = json.loads(result, parse_int=parse_json_int)
        except RecursionError:
            raise UnreadableResult("data.Result is nested too deeply to be read") from None
        except ValueError as exc:
            raise AnswerError(f"data.Result is a string but not JSON: {_quote(str(exc))}") from None
    if not isinstance(result, dict):
        raise AnswerError(f"data.Result is {type(result).__name__}, expected an object")
    return result


def elements_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    data = result.get("Data")
    elements = data.get("Elements") if isinstance(data, dict) else None
    if not isinstance(elements, list):
        raise AnswerError("answer has no Data.Elements list")
    return [e for e in elements if isinstance(e, dict)]


def judge_element(element: dict[str, Any]) -> Judgement:
    """Per face: Label 'normal' is live, 'liveness' is spoof (inverted names); no face is not spoof."""
    code = element.get("Code")
    if isinstance(code, str) and code:
        code = _quote(code)
        raise ElementError(f"{code}: {_quote(redact(_as_text(element.get('Message', ''))))}", code)
    raw_results = element.get("Results")
    results = [r for r in raw_results if isinstance(r, dict)] if isinstance(raw_results, list) else []
    face_number = element.get("FaceNumber")
    if not isinstance(face_number, int) or isinstance(face_number, bool) or face_number < 0:
        raise AnswerError("element has no valid FaceNumber")
    if face_number > 0 and not isinstance(raw_results, list):
        raise AnswerError("element has faces but no Results list")
    if face_number == 0:
        tips = results[0].get("MessageTips") if results else None
        return Judgement("no_face", 0, _text(results[0].get("Suggestion")) if results else None,
                         None, _text(tips))
    faces = [_face(r) for r in results]
    if not faces:
        raise AnswerError(f"element says {face_number} face(s) but carries no Results")
    if any(f.label not in ("normal", "liveness") for f in faces):
        bad = sorted({_quote(f.label) for f in faces} - {"normal", "liveness"})
        raise AnswerError(f"unknown Label {bad}")
    spoofs = [f for f in faces if not f.live]
    verdict = "spoof" if spoofs else "live"
    # The rate reported is the confidence of the face that decided the verdict.
    deciding = spoofs or faces
    rate = max((f.rate for f in deciding if f.rate is not None), default=None)
    suggestion = min((f.suggestion for f in faces if f.suggestion in _SUGGESTION_RANK),
                     key=_SUGGESTION_RANK.__getitem__, default=None)
    tips = "; ".join(sorted({f.message_tips for f in faces if f.message_tips})) or None
    return Judgement(verdict, face_number, suggestion, rate, tips, faces)


def match_elements(urls: list[str], elements: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Pair each input URL with its element: by ImageURL first, then by position among the rest.

    An element may carry the URL as sent or re-encoded (query dropped, path percent-decoded); an element with
    no ImageURL, or with one urllib cannot split, takes the input at its own position. An element naming no
    input is ignored, and an input named by two elements is ambiguous: both leave it unanswered rather than guess.
    """
    matched: list[dict[str, Any] | None] = [None] * len(urls)
    by_url: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        by_url.setdefault(url, []).append(i)
        plain = plain_url(url)
        if plain is not None:
            by_url.setdefault(plain, []).append(i)
    claims: dict[int, int] = {}
    for j, element in enumerate(elements):
        named = element.get("ImageURL")
        plain = plain_url(named) if isinstance(named, str) and named else None
        if isinstance(named, str) and (named in by_url or plain is not None):
            slots = by_url.get(named) or by_url.get(plain or "") or []
            free = [i for i in dict.fromkeys(slots) if matched[i] is None and i not in claims]
            if not free and slots:
                claims[slots[0]] = claims.get(slots[0], 0) + 1  # named twice
                continue
            if free:
                matched[free[0]] = element
                claims[free[0]] = 1
        elif j < len(urls) and matched[j] is None:
            matched[j] = element
            claims[j] = 1
    return [m if claims.get(i, 0) <= 1 else None for i, m in enumerate(matched)]


def plain_url(url: str) -> str | None:
    """The URL without its query (so without a presigned signature), path percent-decoded; None if urllib
    cannot split it."""
    try:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}{unquote(parts.path)}"
    except ValueError:
        # "http://[::1" and NFKC-invalid hosts raise; a seller's garbage names no input.
        return None


def judge_answer(urls: list[str], result: Any) -> list[Judgement | AnswerError]:
    """One entry per input URL: its Judgement, or the AnswerError that says why it has none."""
    elements = elements_of(parse_result(result))
    out: list[Judgement | AnswerError] = []
    for element in match_elements(urls, elements):
        if element is None:
            out.append(AnswerError("the answer has no element for this image"))
            continue
        try:
            out.append(judge_element(element))
        except AnswerError as exc:
            out.append(exc)
    return out


def _face(r: dict[str, Any]) -> Face:
    label = _as_text(r.get("Label", "")).strip().lower()
    return Face(
        label=label,
        live=label == "normal",
        rate=_number(r.get("Rate")),
        suggestion=_text(r.get("Suggestion")),
        rect=_rect(r.get("Rect")),
        message_tips=_text(r.get("MessageTips")),
    )


def _rect(value: Any) -> dict[str, int] | None:
    """The integer-valued members of a Rect; values that are not finite numbers are dropped, never raised on."""
    if not isinstance(value, dict):
        return None
    rect: dict[str, int] = {}
    for name, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue  # int() raises on NaN (ValueError) and on inf (OverflowError)
        if abs(v) > _MAX_RECT:
            continue
        rect[safe_text(str(name))] = int(v)
    return rect


def _number(value: Any) -> float | None:
    """A finite float, or None: NaN or inf would break the max() of rates and are not JSON."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        # A string that is not a number; an int too large for a float.
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    return safe_text(value) if isinstance(value, str) and value else None


def _as_text(value: Any) -> str:
    """A field quoted as text; a non-string is named by its type (str() of a deep structure can raise)."""
    return safe_text(value) if isinstance(value, str) else f"<{type(value).__name__}>"


def safe_text(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD: it must encode as UTF-8 when the record is written."""
    return _SURROGATE.sub("\ufffd", text)


def _quote(text: str) -> str:
    """Seller text safe to put in an error message: no lone surrogates, at most _QUOTE_CHARS characters."""
    text = safe_text(text)
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "..."


def parse_json_int(digits: str) -> int | float:
    # Beyond the limit int() raises ValueError, which would fail the whole answer as "not JSON" (and pay again).
    return int(digits) if len(digits.lstrip("-")) <= _MAX_INT_DIGITS else float(digits)
