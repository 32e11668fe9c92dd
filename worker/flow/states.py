"""Run states and the moves between them (the scripts that change a run's state follow this table)."""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    """The life of a run."""

    LISTING = "listing"  # the producer is still enqueueing chunks
    RUNNING = "running"  # every chunk is enqueued; workers are judging
    PAUSED_BUDGET = "paused_budget"  # the next call would cross the run's or the day's cap; chunks are parked
    DONE = "done"  # every image has a record and the run manifest is written
    FAILED = "failed"  # stopped for a reason a person must fix (credentials, price); later chunks are dropped


MOVES: dict[RunState, frozenset[RunState]] = {
    RunState.LISTING: frozenset({RunState.RUNNING, RunState.PAUSED_BUDGET, RunState.FAILED}),
    RunState.RUNNING: frozenset({RunState.PAUSED_BUDGET, RunState.DONE, RunState.FAILED}),
    RunState.PAUSED_BUDGET: frozenset({RunState.RUNNING, RunState.LISTING, RunState.FAILED}),
    # A redrive reopens a finished run.
    RunState.DONE: frozenset({RunState.RUNNING}),
    RunState.FAILED: frozenset({RunState.RUNNING}),
}
# Where `status --wait` stops following.
STOPPED = frozenset({RunState.DONE, RunState.FAILED, RunState.PAUSED_BUDGET})
TERMINAL = frozenset({RunState.DONE, RunState.FAILED})


def can_move(current: str, to: RunState) -> bool:
    try:
        return to in MOVES[RunState(current)]
    except ValueError:
        return False
