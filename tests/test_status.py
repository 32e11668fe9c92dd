"""producer.status: rate, time left and projected spend, in the text, the bar and the JSON (pure: clocks passed)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from typing import Any

import pytest

from producer.status import (
    Sample,
    Samples,
    bar,
    duration,
    follow,
    pace,
    rate_per_min,
    render,
    run_samples,
    status_dict,
    status_samples,
)
from tests.e2e import validator
from worker.flow.runs import RunStatus

T0 = 1_800_000_000.0


def a_status(**fields: Any) -> RunStatus:
    base = RunStatus(
        run_id="r1", state="running", total=1000, done=200,
        counts={"live": 180, "spoof": 10, "no_face": 5, "rejected": 5, "error": 0, "not_judged": 0},
        skipped=0, chunks=20, pending=16, calls=20, spend_cents=400, error=None,
    )
    return replace(base, **fields)


def test_rate_is_over_the_window_not_since_the_beginning() -> None:
    # Slow for ten minutes (10/min), then fast for the last five (100/min).
    samples = [Sample(T0, 0), Sample(T0 + 600, 100), Sample(T0 + 900, 600)]
    assert rate_per_min(samples, 300) == pytest.approx(100.0)
    assert rate_per_min(samples, None) == pytest.approx(40.0)


def test_no_rate_from_one_sample_or_a_span_too_short_to_mean_anything() -> None:
    assert rate_per_min([Sample(T0, 0)]) is None
    assert rate_per_min([Sample(T0, 0), Sample(T0 + 1, 10)]) is None


def test_samples_keep_the_window_and_one_before_it() -> None:
    kept = Samples(window_s=60)
    for i in range(20):
        kept.add(Sample(T0 + 10 * i, 5 * i))
    times = [s.at_s for s in kept]
    assert times[0] <= times[-1] - 60 < times[1]
    assert len(kept) <= 8
    assert rate_per_min(kept, 60) == pytest.approx(30.0)


def test_eta_and_projection_while_running() -> None:
    p = pace(a_status(), [Sample(T0, 100, 200), Sample(T0 + 60, 200, 400)])
    assert p.rate_per_min == pytest.approx(100.0)
    assert p.eta_s == pytest.approx(800 * 60 / 100)
    assert p.cents_per_image == pytest.approx(2.0)
    assert p.projected_spend_cents == 400 + 800 * 2 and not p.capped


def test_projection_is_bounded_by_the_budget() -> None:
    p = pace(a_status(budget_cents=1000), [])
    assert (p.projected_spend_cents, p.capped) == (1000, True)
    assert p.rate_per_min is None and p.eta_s is None and p.basis == "none"


def test_a_stopped_run_has_no_eta_and_projects_what_it_spent() -> None:
    for state in ("done", "failed", "cancelled", "paused", "paused_budget"):
        p = pace(a_status(state=state), [Sample(T0, 0), Sample(T0 + 60, 200)])
        assert p.eta_s is None and p.projected_spend_cents == 400, state


def test_nothing_recorded_yet_projects_nothing() -> None:
    p = pace(a_status(done=0, spend_cents=0, counts=dict.fromkeys(a_status().counts, 0)), [])
    assert p.cents_per_image is None and p.projected_spend_cents is None


def test_one_shot_samples_come_from_the_run_record() -> None:
    status = a_status(created_ms=int(T0 * 1000), progress_ms=int((T0 + 120) * 1000))
    # Still running: the time since the last record counts, so a stalled run's rate falls.
    samples = status_samples(status, T0 + 240)
    assert [s.done for s in samples] == [0, 200, 200]
    assert rate_per_min(samples, None) == pytest.approx(50.0)
    # Done: the rate is up to the last record.
    assert rate_per_min(status_samples(replace(status, state="done"), T0 + 999), None) == pytest.approx(100.0)
    assert run_samples({"created_ms": "0", "progress_ms": "5"}, T0) == []
    assert run_samples({"created_ms": "x"}, T0) == []


def test_render_bar_and_json_show_the_pace() -> None:
    status = a_status(budget_cents=5000)
    p = pace(status, [Sample(T0, 100, 200), Sample(T0 + 60, 200, 400)])
    text = render(status, p)
    assert "100.0 images/min (last 5 min)" in text and "about 8m00s left" in text and "~$20.00 projected" in text
    line = bar(status, pace=p)
    assert "100/min eta 8m00s ~$20.00" in line
    doc = status_dict(status, p)
    assert (doc["rate_per_min"], doc["eta_s"], doc["projected_spend_cents"], doc["projected_spend_usd"]) == (
        100.0, 480, 2000, "20.00")
    assert doc["rate_basis"] == "recent" and doc["cents_per_image"] == 2.0
    json.dumps(doc)
    validator("status").validate(doc)


def test_json_without_a_pace_keeps_every_key_as_null() -> None:
    doc = status_dict(a_status())
    assert doc["rate_per_min"] is None and doc["eta_s"] is None and doc["projected_spend_cents"] is None
    validator("status").validate(doc)
    assert "pace" not in render(a_status())


def test_duration_reads_like_a_person_would_say_it() -> None:
    assert [duration(s) for s in (12, 250, 11_100)] == ["12s", "4m10s", "3h05m"]


class FakeRuns:
    """Runs.status over a script of snapshots, one per poll."""

    def __init__(self, statuses: list[RunStatus]) -> None:
        self._statuses = statuses

    def status(self, run_id: str) -> RunStatus:
        return self._statuses.pop(0) if len(self._statuses) > 1 else self._statuses[0]


def test_follow_keeps_samples_and_draws_the_rate_in_its_bar() -> None:
    snapshots = [a_status(done=d, spend_cents=2 * d) for d in (0, 100, 200)] + [
        a_status(state="done", done=1000, spend_cents=2000, finalised=True)]
    now = [T0]

    def tick(seconds: float) -> None:
        now[0] += seconds

    out = io.StringIO()
    kept = Samples()
    final = follow(FakeRuns(snapshots), "r1", interval_s=30, out=out,  # type: ignore[arg-type]
                   clock=lambda: now[0], sleep=tick, samples=kept)
    assert final.state == "done"
    assert [s.done for s in kept] == [0, 100, 200, 1000]
    assert "200/min eta 4m30s" in out.getvalue().splitlines()[1]
    assert rate_per_min(kept) == pytest.approx(1000 / 1.5)


@pytest.mark.parametrize(("touched", "hinted"), [({}, True), ({"calls": 1}, False), ({"done": 3}, False),
                                                  ({"tokens_bought": 1}, False)])
def test_follow_says_once_when_no_worker_has_touched_the_run(touched: dict[str, int], hinted: bool) -> None:
    untouched = a_status(done=0, calls=0, spend_cents=0, counts=dict.fromkeys(a_status().counts, 0))
    snapshots = [replace(untouched, **touched)] * 5 + [a_status(state="done", finalised=True)]
    now = [T0]

    def tick(seconds: float) -> None:
        now[0] += seconds

    out = io.StringIO()
    follow(FakeRuns(snapshots), "r1", interval_s=10, out=out,  # type: ignore[arg-type]
           clock=lambda: now[0], sleep=tick)
    hints = [line for line in out.getvalue().splitlines() if "is a worker running" in line]
    assert len(hints) == (1 if hinted else 0), out.getvalue()
    if hinted:
        assert "nothing of run r1 recorded and no call made in 30s" in hints[0]
        assert "celery -A worker worker --pool threads" in hints[0]
