"""The rich progress bar `scan --wait` and `status --wait` draw on a terminal (plain lines otherwise)."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from producer.status import Display, Pace, PlainLines, shown
from worker.flow.runs import RunStatus


class RichBar:
    """A `Display` drawing one rich bar: images done/total, then the rate, time left and spend that
    producer.status computes (rich's own speed estimate would disagree with `status`'s pace line)."""

    def __init__(self, console: Console) -> None:
        # Redrawn on each poll rather than by rich's refresh thread: the picture only changes when a poll
        # brings news, and a test can render it without timing.
        self._progress = Progress(
            # As wide as the longest state, so the bar does not jump when the state changes.
            TextColumn("{task.description:<13}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("images"),
            TextColumn("{task.fields[pace]}"),
            console=console,
            auto_refresh=False,
        )
        self._task: TaskID | None = None

    def update(self, status: RunStatus, pace: Pace, now_s: float) -> None:
        words = shown(status, pace)
        parts = [words.rate or "-/min", f"eta {words.eta or '-'}", f"{words.spend} spent"]
        if words.projected is not None:
            parts.append(f"{words.projected} projected")
        first = self._task is None
        if self._task is None:
            self._task = self._progress.add_task(status.state, total=status.total, pace="")
        self._progress.update(self._task, completed=status.done, total=status.total, description=status.state,
                              pace=" ".join(parts))
        if first:
            self._progress.start()  # draws it
        else:
            self._progress.refresh()

    def close(self) -> None:
        if self._task is not None:
            self._progress.stop()


def display_for(json_out: bool, stdout: TextIO = sys.stdout, stderr: TextIO = sys.stderr) -> Display:
    """The rich bar, on stderr, when a person is watching: stdout is a terminal and no --json asked for
    output to parse. stderr must be one too, or the bar's cursor moves would land in a log file."""
    if not json_out and stdout.isatty() and stderr.isatty():
        return RichBar(Console(file=stderr))
    return PlainLines(stderr)
