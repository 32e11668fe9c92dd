"""`scan --wait` / `status --wait` progress: a rich bar on a terminal, plain `bar` lines otherwise; both
worded from producer.status's pace (clocks passed, nothing sleeps)."""

from __future__ import annotations

import io
import re
from dataclasses import replace
from typing import Any

import pytest
from rich.console import Console

from producer.progress import RichBar, display_for
from producer.status import PLAIN_EVERY_S, PlainLines, Samples, follow
from worker.errors import UnknownRun
from worker.flow.runs import RunStatus

T0 = 1_800_000_000.0
# Every test drives a fake clock; a loop that never stops should fail fast, not hang the run.
pytestmark = pytest.mark.timeout(30)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def a_status(**fields: Any) -> RunStatus:
    base = RunStatus(
        run_id="r1", state="running", total=1000, done=0,
        counts={"live": 0, "spoof": 0, "no_face": 0, "rejected": 0, "error": 0, "not_judged": 0},
        skipped=0, chunks=20, pending=16, calls=0, spend_cents=0, error=None,
    )  # fmt: skip
    return replace(base, **fields)


class FakeRuns:
    """Runs.status over a script of snapshots, one per poll; the last repeats."""

    def __init__(self, statuses: list[RunStatus | None]) -> None:
        self._statuses = statuses

    def status(self, run_id: str) -> RunStatus | None:
        return self._statuses.pop(0) if len(self._statuses) > 1 else self._statuses[0]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _script() -> list[RunStatus | None]:
    # 100 images every 30 s, 2 cents each: 200/min, then done.
    running = [a_status(done=d, calls=d // 10, spend_cents=2 * d) for d in (0, 100, 200)]
    return [*running, a_status(state="done", done=1000, calls=100, spend_cents=2000, finalised=True)]


def _follow(statuses: list[RunStatus | None], display: Any, interval_s: float = 30.0) -> RunStatus:
    clock = Clock()
    return follow(FakeRuns(statuses), "r1", interval_s=interval_s, clock=clock,  # type: ignore[arg-type]
                  sleep=clock.sleep, samples=Samples(), display=display)  # fmt: skip


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_rich_bar_shows_done_total_rate_eta_and_spend() -> None:
    out = io.StringIO()
    final = _follow(_script(), RichBar(Console(file=out, force_terminal=True, width=100)))
    assert final.state == "done"
    drawn = out.getvalue()
    assert "\x1b[" in drawn  # drawn for a terminal: redrawn in place, in colour
    # Each redraw starts on a cleared line; the last two polls' pictures, escapes removed.
    frames = [ANSI.sub("", frame).strip() for frame in re.split(r"\r|\n", drawn) if ANSI.sub("", frame).strip()]
    running = next(frame for frame in frames if "200/1000" in frame)
    assert running.startswith("running")
    assert "200/min" in running and "eta 4m00s" in running, running
    assert "$4.00 spent" in running and "~$20.00 projected" in running, running
    assert frames[-1].startswith("done") and "1000/1000" in frames[-1] and "$20.00 spent" in frames[-1]
    # Once stopped, nothing is projected and no time is left to show.
    assert "projected" not in frames[-1] and "eta -" in frames[-1]
    assert drawn.endswith("\x1b[?25h")  # the cursor is given back


def test_before_a_rate_is_known_the_bar_says_so() -> None:
    out = io.StringIO()
    bar = RichBar(Console(file=out, force_terminal=True, width=100))
    _follow([a_status(state="paused", done=10, spend_cents=20)], bar)
    frame = ANSI.sub("", out.getvalue())
    assert "10/1000" in frame and "-/min" in frame and "eta -" in frame and "$0.20 spent" in frame


def test_without_a_terminal_plain_lines_are_printed_every_few_seconds() -> None:
    stdout, stderr = io.StringIO(), io.StringIO()
    display = display_for(json_out=False, stdout=stdout, stderr=stderr)
    assert isinstance(display, PlainLines)
    # One poll a second for 20 s, then done: a line every PLAIN_EVERY_S and the last one.
    script = [a_status(done=10 * i, spend_cents=20 * i) for i in range(21)]
    script.append(a_status(state="done", done=1000, spend_cents=2000, finalised=True))
    _follow(script, display, interval_s=1.0)
    lines = stderr.getvalue().splitlines()
    assert stdout.getvalue() == ""
    assert "\x1b" not in stderr.getvalue() and "\r" not in stderr.getvalue()
    assert len(lines) == int(21 // PLAIN_EVERY_S) + 1 + 1
    # Today's `bar` format, which scripts reading a log may parse.
    assert all(re.match(r"\[[#.]{30}\] \d+/1000 live 0 spoof 0 ", line) for line in lines), lines
    assert "| 600/min eta 1m20s ~$20.00 | running" in lines[-2]
    assert lines[-1].startswith("[" + "#" * 30 + "] 1000/1000") and lines[-1].endswith("| done")


@pytest.mark.parametrize(
    ("json_out", "stdout_tty", "stderr_tty", "rich"),
    [
        (False, True, True, True),
        (True, True, True, False),  # --json: output meant for a program
        (False, False, True, False),  # stdout piped or redirected
        (False, True, False, False),  # stderr to a log file: no cursor moves in it
    ],
)
def test_the_rich_bar_only_when_a_person_watches(json_out: bool, stdout_tty: bool, stderr_tty: bool,
                                                 rich: bool) -> None:  # fmt: skip
    stdout = FakeTerminal() if stdout_tty else io.StringIO()
    stderr = FakeTerminal() if stderr_tty else io.StringIO()
    display = display_for(json_out, stdout=stdout, stderr=stderr)
    assert isinstance(display, RichBar) is rich and isinstance(display, PlainLines) is not rich


def test_the_bar_is_closed_when_following_fails() -> None:
    out = io.StringIO()
    with pytest.raises(UnknownRun):
        _follow([a_status(done=5), None], RichBar(Console(file=out, force_terminal=True, width=100)))
    assert out.getvalue().endswith("\x1b[?25h")
