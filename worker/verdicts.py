"""Upstream answer -> one verdict per image (pure: no I/O)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Worst first: an image's Suggestion is the worst of its faces'.
_SUGGESTION_RANK = {"block": 0, "review": 1, "pass": 2}


class AnswerError(ValueError):
    """The seller's answer does not have the documented shape."""


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
    raw_results = element.get("Results")
    results = [r for r in raw_results if isinstance(r, dict)] if isinstance(raw_results, list) else []
    face_number = element.get("FaceNumber")
    if not isinstance(face_number, int) or isinstance(face_number, bool):
        face_number = len(results)
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
    """Pair each input URL with its element: by ImageURL first, then by position among the rest."""
    matched: list[dict[str, Any] | None] = [None] * len(urls)
    unclaimed = list(range(len(elements)))
    wanted: dict[str, list[int]] = {}
    for i, url in enumerate(urls):
        wanted.setdefault(url, []).append(i)
    for j, element in enumerate(elements):
        slots = wanted.get(str(element.get("ImageURL", "")))
        if slots:
            matched[slots.pop(0)] = element
            unclaimed.remove(j)
    # Elements whose ImageURL names no input (rewritten or missing) fill the gaps in order, but only
    # when their position is the one left open: a misplaced guess would swap two images' verdicts.
    for j in list(unclaimed):
        if j < len(urls) and matched[j] is None and not elements[j].get("ImageURL"):
            matched[j] = elements[j]
            unclaimed.remove(j)
    if unclaimed and all(m is None for m in matched) and len(elements) == len(urls):
        # Every URL was rewritten (e.g. re-encoded by a proxy): trust the documented order.
        return list(elements)
    return matched


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
