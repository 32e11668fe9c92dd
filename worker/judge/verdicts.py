"""Upstream answer -> one verdict per image (pure: no I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from worker.ops.redact import redact

# Worst first: an image's Suggestion is the worst of its faces'.
_SUGGESTION_RANK = {"block": 0, "review": 1, "pass": 2}


class AnswerError(ValueError):
    """The seller's answer does not have the documented shape."""


class ElementError(AnswerError):
    """The seller refused this one image inside an answered call (an element carrying an error Code)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


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
            result = json.loads(result)
        except ValueError as exc:
            raise AnswerError(f"data.Result is a string but not JSON: {exc}") from None
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
        raise ElementError(f"{code}: {redact(str(element.get('Message', '')))}", code)
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
        bad = sorted({f.label for f in faces} - {"normal", "liveness"})
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
    no ImageURL takes the input at its own position. An element naming no input is ignored, and an input named
    by two elements is ambiguous: both leave it unanswered rather than guess.
    """
    matched: list[dict[str, Any] | None] = [None] * len(urls)
    by_url: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        by_url.setdefault(url, []).append(i)
        by_url.setdefault(_plain(url), []).append(i)
    claims: dict[int, int] = {}
    for j, element in enumerate(elements):
        named = element.get("ImageURL")
        if isinstance(named, str) and named:
            slots = by_url.get(named) or by_url.get(_plain(named)) or []
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


def _plain(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{unquote(parts.path)}"


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
    label = str(r.get("Label", "")).strip().lower()
    rect = r.get("Rect")
    return Face(
        label=label,
        live=label == "normal",
        rate=_number(r.get("Rate")),
        suggestion=_text(r.get("Suggestion")),
        rect={k: int(v) for k, v in rect.items() if isinstance(v, int | float)} if isinstance(rect, dict) else None,
        message_tips=_text(r.get("MessageTips")),
    )


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
