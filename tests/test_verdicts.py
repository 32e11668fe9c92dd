"""worker.judge.verdicts: the seller's answer -> one verdict per image (pure, no servers)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.judge.verdicts import (
    AnswerError,
    ElementError,
    Judgement,
    UnreadableResult,
    judge_answer,
    judge_element,
    match_elements,
    parse_result,
)

A = "https://s3.example.com/in/a.png?X-Amz-Signature=aaa"
B = "https://s3.example.com/in/b.png?X-Amz-Signature=bbb"
C = "https://s3.example.com/in/c.png?X-Amz-Signature=ccc"


def face(label: str, rate: float = 99.0, suggestion: str = "pass", tips: str = "") -> dict[str, Any]:
    return {"Label": label, "Rate": rate, "Suggestion": suggestion, "MessageTips": tips,
            "Rect": {"Left": 10, "Top": 20, "Width": 100, "Height": 120}}


def element(url: str | None, *faces: dict[str, Any]) -> dict[str, Any]:
    e: dict[str, Any] = {"FaceNumber": len(faces), "Results": list(faces)}
    if url is not None:
        e["ImageURL"] = url
    return e


NO_FACE = {"Label": "liveness", "Rate": 100, "Suggestion": "block", "Rect": {"Left": 0, "Top": 0, "Width": 0,
           "Height": 0}, "MessageTips": "no face detected, try again please."}


def result(*elements: dict[str, Any]) -> dict[str, Any]:
    return {"RequestId": "req-1", "Data": {"Elements": list(elements)}}


def judged(out: list[Judgement | AnswerError]) -> list[Judgement]:
    assert all(isinstance(j, Judgement) for j in out), out
    return [j for j in out if isinstance(j, Judgement)]


def test_label_normal_means_live() -> None:
    (j,) = judged(judge_answer([A], result(element(A, face("normal", 97.5)))))
    assert (j.verdict, j.faces, j.rate, j.suggestion) == ("live", 1, 97.5, "pass")
    assert j.face_results[0].live is True
    assert j.face_results[0].rect == {"Left": 10, "Top": 20, "Width": 100, "Height": 120}


def test_label_liveness_means_spoof() -> None:
    (j,) = judged(judge_answer([A], result(element(A, face("liveness", 88, "block")))))
    assert (j.verdict, j.rate, j.suggestion) == ("spoof", 88.0, "block")
    assert j.face_results[0].live is False


def test_label_is_read_case_insensitively() -> None:
    (j,) = judged(judge_answer([A], result(element(A, face(" Normal ")))))
    assert j.verdict == "live"


def test_no_face_with_real_block_shape_is_no_face_never_spoof() -> None:
    el = {"FaceNumber": 0, "ImageURL": A, "Results": [NO_FACE]}
    (j,) = judged(judge_answer([A], result(el)))
    assert j.verdict == "no_face"
    assert j.faces == 0
    assert j.face_results == []
    assert j.message_tips == "no face detected, try again please."
    assert j.suggestion == "block"


def test_no_face_without_results_is_no_face() -> None:
    assert judge_element({"FaceNumber": 0, "ImageURL": A, "Results": []}).verdict == "no_face"
    # Missing fields are not "no face": that verdict would enter the done-set and never be judged again.
    with pytest.raises(AnswerError):
        judge_element({"ImageURL": A})


def test_several_faces_any_spoof_makes_the_image_spoof() -> None:
    el = element(A, face("normal", 99, "pass"), face("liveness", 70, "review"), face("normal", 95, "pass"))
    (j,) = judged(judge_answer([A], result(el)))
    assert j.verdict == "spoof"
    assert j.faces == 3
    assert len(j.face_results) == 3


def test_several_faces_suggestion_is_the_worst_of_the_faces() -> None:
    j = judge_element(element(A, face("normal", 99, "pass"), face("normal", 60, "review")))
    assert (j.verdict, j.suggestion) == ("live", "review")
    j = judge_element(element(A, face("normal", 99, "review"), face("liveness", 60, "block"), face("normal")))
    assert j.suggestion == "block"


def test_several_faces_rate_is_that_of_the_deciding_faces() -> None:
    # Spoof: the rate is the spoof faces' (highest), not the live faces' higher confidence.
    j = judge_element(element(A, face("normal", 99.9), face("liveness", 61), face("liveness", 75)))
    assert (j.verdict, j.rate) == ("spoof", 75.0)
    # Live: every face decided, the highest rate among them.
    j = judge_element(element(A, face("normal", 80), face("normal", 92)))
    assert (j.verdict, j.rate) == ("live", 92.0)


def test_result_as_json_string_equals_result_as_object() -> None:
    res = result(element(A, face("normal", 90)), element(B, face("liveness", 85, "block")))
    from_obj = judge_answer([A, B], res)
    from_str = judge_answer([A, B], json.dumps(res))
    assert [j.verdict for j in judged(from_str)] == ["live", "spoof"]
    assert from_str == from_obj


def test_result_string_that_is_not_json_raises_answer_error() -> None:
    with pytest.raises(AnswerError, match="not JSON"):
        judge_answer([A], "<html>502 Bad Gateway</html>")


def test_result_of_wrong_type_or_without_elements_raises_answer_error() -> None:
    with pytest.raises(AnswerError):
        parse_result([1, 2])
    with pytest.raises(AnswerError, match=r"Data\.Elements"):
        judge_answer([A], {"RequestId": "r", "Data": {}})


def test_missing_element_gives_that_image_an_answer_error() -> None:
    out = judge_answer([A, B, C], result(element(A, face("normal")), element(C, face("liveness"))))
    assert isinstance(out[0], Judgement) and out[0].verdict == "live"
    assert isinstance(out[1], AnswerError)
    assert isinstance(out[2], Judgement) and out[2].verdict == "spoof"


def test_extra_elements_are_ignored() -> None:
    res = result(element(A, face("normal")), element("https://elsewhere/x.png", face("liveness")), element(None))
    out = judge_answer([A], res)
    assert len(out) == 1
    assert isinstance(out[0], Judgement) and out[0].verdict == "live"


def test_elements_out_of_order_are_matched_by_image_url() -> None:
    res = result(element(C, face("normal")), element(A, face("liveness")),
                 {"FaceNumber": 0, "ImageURL": B, "Results": [NO_FACE]})
    assert [j.verdict for j in judged(judge_answer([A, B, C], res))] == ["spoof", "no_face", "live"]


def test_unknown_image_url_is_not_guessed_onto_another_image() -> None:
    res = result(element(A, face("normal")), element("https://rewritten/b.png", face("liveness")))
    out = judge_answer([A, B], res)
    assert isinstance(out[0], Judgement) and out[0].verdict == "live"
    assert isinstance(out[1], AnswerError)


def test_elements_naming_foreign_urls_leave_the_images_unanswered() -> None:
    # A guess by position could swap two images' verdicts; an unanswered image is retried instead.
    res = result(element("https://proxy/1", face("liveness")), element("https://proxy/2", face("normal")))
    assert all(isinstance(j, AnswerError) for j in judge_answer([A, B], res))


def test_elements_naming_a_re_encoded_url_are_matched() -> None:
    plain_b = B.split("?")[0]
    res = result(element(plain_b, face("liveness")), element(A, face("normal")))
    assert [j.verdict for j in judged(judge_answer([A, B], res))] == ["live", "spoof"]


def test_elements_without_image_url_are_matched_by_position() -> None:
    res = result(element(None, face("normal")), element(None, face("liveness")), element(None, NO_FACE))
    res["Data"]["Elements"][2]["FaceNumber"] = 0
    assert [j.verdict for j in judged(judge_answer([A, B, C], res))] == ["live", "spoof", "no_face"]


def test_elements_without_image_url_fill_only_their_own_position() -> None:
    res = result(element(B, face("liveness")), element(None, face("normal")))
    out = judge_answer([A, B], res)
    # Position 1 is B's (claimed by URL); the URL-less element must not be pushed onto A.
    assert isinstance(out[0], AnswerError)
    assert isinstance(out[1], Judgement) and out[1].verdict == "spoof"


def test_duplicate_input_urls_each_get_one_element() -> None:
    res = result(element(A, face("normal")), element(A, face("liveness")))
    assert [j.verdict for j in judged(judge_answer([A, A], res))] == ["live", "spoof"]


def test_unknown_label_is_an_answer_error_for_that_image_only() -> None:
    out = judge_answer([A, B], result(element(A, face("maybe")), element(B, face("normal"))))
    assert isinstance(out[0], AnswerError) and "maybe" in str(out[0])
    assert isinstance(out[1], Judgement) and out[1].verdict == "live"


def test_faces_claimed_without_results_is_an_answer_error() -> None:
    out = judge_answer([A], result({"FaceNumber": 2, "ImageURL": A, "Results": []}))
    assert isinstance(out[0], AnswerError)


def test_rate_given_as_string_and_missing_rect_are_tolerated() -> None:
    j = judge_element({"FaceNumber": 1, "Results": [{"Label": "normal", "Rate": "93.5", "Suggestion": "pass"}]})
    assert (j.verdict, j.rate, j.face_results[0].rect) == ("live", 93.5, None)


def test_an_element_carrying_an_error_code_is_an_element_error() -> None:
    el = {"FaceNumber": 0, "ImageURL": A, "Results": [], "Code": "InvalidImage.Download", "Message": "no"}
    (out,) = judge_answer([A], result(el))
    assert isinstance(out, ElementError) and out.code == "InvalidImage.Download"


# --- hostile values in a paid answer: read, never raised on (a raise would make the call's images unreadable) ---


def _stored(j: Judgement) -> bytes:
    """What the worker writes for a judgement: strict JSON (no NaN), encoded as UTF-8 (Redis and S3)."""
    doc = {"rate": j.rate, "tips": j.message_tips, "suggestion": j.suggestion,
           "faces": [f.as_dict() for f in j.face_results]}
    return json.dumps(doc, allow_nan=False, ensure_ascii=False).encode()


def _rect_face(**rect: Any) -> dict[str, Any]:
    return {**face("normal"), "Rect": rect}


@pytest.mark.parametrize("as_string", [False, True])
def test_nan_and_infinite_rect_values_are_dropped_and_the_rest_kept(as_string: bool) -> None:
    res = result(element(A, _rect_face(Left=float("nan"), Top=float("inf"), Width=float("-inf"), Height=120)))
    # As a string it carries the bare NaN / Infinity tokens, exactly as Python's json.dumps writes them.
    text = json.dumps(res)
    assert "NaN" in text and "-Infinity" in text
    (j,) = judged(judge_answer([A], text if as_string else res))
    assert j.verdict == "live" and j.face_results[0].rect == {"Height": 120}
    _stored(j)


def test_a_1e999_rect_value_parses_as_inf_and_is_dropped() -> None:
    text = json.dumps(result(element(A, _rect_face(Left=3, Top=4, Width=0, Height=0))))
    text = text.replace('"Width": 0', '"Width": 1e999').replace('"Height": 0', '"Height": -1e999')
    (j,) = judged(judge_answer([A], text))
    assert j.face_results[0].rect == {"Left": 3, "Top": 4}
    _stored(j)


def test_rect_values_that_are_not_usable_numbers_are_dropped() -> None:
    rect = {"Left": True, "Top": "12", "Width": None, "Height": [1], "X": 2**60, "Y": 1e300, "Z": 7.9}
    (j,) = judged(judge_answer([A], result(element(A, _rect_face(**rect)))))
    assert j.face_results[0].rect == {"Z": 7}


def test_an_integer_literal_beyond_pythons_digit_limit_does_not_fail_the_answer() -> None:
    # int() refuses more than 4300 digits; json would raise ValueError and the whole answer would read as
    # "not JSON" (a seller fault, paid again), for one Rect value.
    text = json.dumps(result(element(A, _rect_face(Left=1, Width=0))))
    text = text.replace('"Width": 0', '"Width": ' + "9" * 5000)
    (j,) = judged(judge_answer([A], text))
    assert j.face_results[0].rect == {"Left": 1}


@pytest.mark.parametrize(
    "rate",
    [float("nan"), float("inf"), float("-inf"), "nan", "Infinity", "1e999", pytest.param(10**400, id="10**400")],
)
def test_a_rate_that_is_not_a_finite_number_is_none(rate: Any) -> None:
    j = judge_element(element(A, face("liveness", rate), face("liveness", 70)))
    assert j.face_results[0].rate is None
    assert (j.verdict, j.rate) == ("spoof", 70.0), "the deciding rate is the finite one"
    _stored(j)
    j = judge_element(element(A, face("normal", rate)))
    assert (j.verdict, j.rate) == ("live", None)


def test_a_nan_rate_in_answer_text_is_none() -> None:
    (j,) = judged(judge_answer([A], json.dumps(result(element(A, face("normal", float("nan")))))))
    assert j.rate is None and j.face_results[0].rate is None


def test_an_image_url_urllib_cannot_split_is_matched_by_position() -> None:
    bad = "http://[::1"
    res = result(element(bad, face("normal")), element(bad, face("liveness")), element(bad, NO_FACE))
    res["Data"]["Elements"][2]["FaceNumber"] = 0
    assert [j.verdict for j in judged(judge_answer([A, B, C], res))] == ["live", "spoof", "no_face"]
    # Malformed hosts of other kinds too (urlsplit raises ValueError on each).
    for odd in ("https://[fe80::1%eth0/x.png", "http://\uff03@evil/x.png", "http://a\uff03b/x"):
        (m,) = match_elements([A], [element(odd, face("normal"))])
        assert m is not None


def test_a_malformed_image_url_takes_only_its_own_position() -> None:
    # Position 0 is claimed by the element naming A; the malformed one at position 1 is B's.
    res = result(element(A, face("liveness")), element("http://[::1", face("normal")))
    assert [j.verdict for j in judged(judge_answer([A, B], res))] == ["spoof", "live"]
    # A malformed URL beyond the inputs names nothing and is ignored.
    res = result(element(A, face("liveness")), element("http://[::1", face("normal")))
    assert [j.verdict for j in judged(judge_answer([A], res))] == ["spoof"]


def test_an_unparseable_url_is_still_not_guessed_over_a_parseable_foreign_one() -> None:
    # The unknown_url rule stays: a URL naming no input is ignored, the image is unanswered (and retried).
    res = result(element("https://proxy/1", face("liveness")), element("http://[::1", face("normal")))
    out = judge_answer([A, B], res)
    assert isinstance(out[0], AnswerError)
    assert isinstance(out[1], Judgement) and out[1].verdict == "live"


def test_lone_surrogates_in_text_fields_are_replaced_so_the_record_encodes() -> None:
    tips = "blurred face \udc80 please check"
    f = {**face("normal", suggestion="pa\ud800ss", tips=tips), "Rect": {"Le\udfffft": 1}}
    # Written as the JSON escape, like a seller would send it.
    text = json.dumps(result(element(A, f)))
    assert "\\udc80" in text
    (j,) = judged(judge_answer([A], text))
    assert j.message_tips == "blurred face \ufffd please check"
    assert j.face_results[0].message_tips == j.message_tips
    assert j.suggestion is None and j.face_results[0].suggestion == "pa\ufffdss"
    assert j.face_results[0].rect == {"Le\ufffdft": 1}
    _stored(j)


def test_lone_surrogate_in_no_face_tips_is_replaced() -> None:
    el = {"FaceNumber": 0, "ImageURL": A, "Results": [{**NO_FACE, "MessageTips": "\udc80", "Suggestion": "\ud800"}]}
    (j,) = judged(judge_answer([A], json.dumps(result(el))))
    assert (j.verdict, j.message_tips, j.suggestion) == ("no_face", "\ufffd", "\ufffd")
    _stored(j)


def test_error_text_quoting_the_seller_is_safe_to_store() -> None:
    (out,) = judge_answer([A], result(element(A, face("nor\udc80mal"))))
    assert isinstance(out, AnswerError)
    str(out).encode()
    el = {"FaceNumber": 0, "ImageURL": A, "Results": [], "Code": "InvalidImage.\udc80", "Message": "x" * 10_000}
    (err,) = judge_answer([A], result(el))
    assert isinstance(err, ElementError) and err.code == "InvalidImage.\ufffd"
    assert len(str(err)) < 500
    str(err).encode()
    # A Label or Message that is not a string is named by its type, never str()'d.
    (out,) = judge_answer([A], result(element(A, {**face("normal"), "Label": {"deep": [[[1]]]}})))
    assert isinstance(out, AnswerError) and "<dict>" in str(out)


def test_a_result_nested_too_deeply_is_unreadable_not_an_answer_error() -> None:
    # Not an AnswerError: that would retry the images with a new payment; the pipeline records them instead.
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(UnreadableResult) as raised:
        parse_result(deep)
    assert not isinstance(raised.value, AnswerError | RecursionError)
    with pytest.raises(UnreadableResult):
        judge_answer([A, B], deep)
    with pytest.raises(UnreadableResult):
        judge_answer([A], '{"RequestId": "r", "Data": {"Elements": ' + "[" * 50_000 + "]" * 50_000 + "}}")


def test_a_result_cut_off_is_still_an_answer_error() -> None:
    # The seller-fault path (retried with a new payment) is unchanged for text that is not JSON.
    text = json.dumps(result(element(A, face("normal"))))
    with pytest.raises(AnswerError, match="not JSON"):
        parse_result(text[: len(text) // 2])
