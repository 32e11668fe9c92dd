"""Run status: one snapshot, or following a run to its end with a progress bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TextIO

from worker.errors import UnknownRun
from worker.flow.runs import STOPPED_STATES, Runs, RunStatus


def status_dict(status: RunStatus) -> dict[str, Any]:
    doc = asdict(status)
    doc["spend_usd"] = f"{status.spend_cents / 100:.2f}"
    doc["judged"] = {v: status.counts[v] for v in ("live", "spoof", "no_face")}
    doc["rejected"] = status.counts["rejected"]
    doc["error"] = status.error
    doc["errors"] = status.counts["error"]
    return doc


def render(status: RunStatus) -> str:
    c = status.counts
    lines = [
        f"run       {status.run_id}",
        f"state     {status.state}" + (f": {status.error}" if status.error else ""),
        f"images    {status.done}/{status.total} recorded ({status.skipped} skipped as already judged)",
        f"verdicts  live {c['live']}  spoof {c['spoof']}  no_face {c['no_face']}",
        f"failed    rejected {c['rejected']}  error {c['error']}",
        f"calls     {status.calls}  spend ${status.spend_cents / 100:.2f}"
        + (f" of budget ${status.budget_cents / 100:.2f}" if status.budget_cents is not None else ""),
        f"paid once {status.duplicates} images recorded from another run's judgment; "
        f"{status.answers_lost} calls' answers lost ({status.answers_lost_images} images judged again)",
        f"chunks    {status.chunks} ({status.pending} pending)",
    ]
    return "\n".join(lines)


def bar(status: RunStatus, width: int = 30) -> str:
    total = max(status.total, 1)
    filled = min(width, width * status.done // total)
    c = status.counts
    return (f"[{'#' * filled}{'.' * (width - filled)}] {status.done}/{status.total} "
            f"live {c['live']} spoof {c['spoof']} no_face {c['no_face']} rejected {c['rejected']} "
            f"error {c['error']} | {status.calls} calls ${status.spend_cents / 100:.2f} | {status.state}")


def follow(runs: Runs, run_id: str, *, interval_s: float = 0.5, timeout_s: float | None = None,
           out: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep) -> RunStatus:
    """Poll until the run is done, failed or paused (or timeout_s passes); draw progress on `out`."""
    deadline = None if timeout_s is None else clock() + timeout_s
    tty = out.isatty()
    last_line_at = -1e9
    while True:
        status = runs.status(run_id)
        if status is None:
            raise UnknownRun(run_id)
        if tty:
            out.write("\r" + bar(status))
            out.flush()
        elif clock() - last_line_at >= 5.0 or status.state in STOPPED_STATES:
            out.write(bar(status) + "\n")
            last_line_at = clock()
        if status.state in STOPPED_STATES:
            if tty:
                out.write("\n")
            return status
        if deadline is not None and clock() >= deadline:
            if tty:
                out.write("\n")
            return status
        sleep(interval_s)
