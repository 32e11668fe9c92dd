"""worker.judge.verdicts: the seller's answer -> one verdict per image (pure, no servers)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from worker.judge.verdicts import AnswerError, ElementError, Judgement, judge_answer, judge_element, parse_result

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
