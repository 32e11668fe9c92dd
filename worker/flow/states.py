"""Run states and the moves between them (the scripts that change a run's state follow this table)."""

from __future__ import annotations

from enum import StrEnum


class RunState(StrEnum):
    """The life of a run."""

    LISTING = "listing"  # the producer is still enqueueing chunks
    RUNNING = "running"  # every chunk is enqueued; workers are judging
    PAUSED = "paused"  # paused by its owner (`irlive pause`); chunks are parked until `irlive resume`
    PAUSED_BUDGET = "paused_budget"  # the next call would cross the run's or the day's cap; chunks are parked
    # Cancelled by its owner: nothing more is paid; calls in flight are recorded, the rest `not_judged`.
    CANCELLED = "cancelled"
    # Stopped for a reason a person must fix (credentials, price, too many failed calls); ends like a cancel.
    FAILED = "failed"
    DONE = "done"  # every image has a record and the run manifest is written


MOVES: dict[RunState, frozenset[RunState]] = {
    RunState.LISTING: frozenset({RunState.RUNNING, RunState.PAUSED, RunState.PAUSED_BUDGET, RunState.CANCELLED,
                                 RunState.FAILED}),
    RunState.RUNNING: frozenset({RunState.PAUSED, RunState.PAUSED_BUDGET, RunState.CANCELLED, RunState.DONE,
                                 RunState.FAILED}),
    RunState.PAUSED: frozenset({RunState.RUNNING, RunState.LISTING, RunState.CANCELLED, RunState.FAILED}),
    RunState.PAUSED_BUDGET: frozenset({RunState.RUNNING, RunState.LISTING, RunState.PAUSED, RunState.CANCELLED,
                                       RunState.FAILED}),
    # A redrive reopens a finished run.
    RunState.DONE: frozenset({RunState.RUNNING}),
    RunState.FAILED: frozenset({RunState.RUNNING}),
    RunState.CANCELLED: frozenset({RunState.RUNNING}),
}
# A run in these is being judged: it buys and sends tokens (a budget pause still sends what it committed).
ACTIVE = frozenset({RunState.LISTING, RunState.RUNNING})
# Chunks of a run in these are parked until it resumes.
HELD = frozenset({RunState.PAUSED, RunState.PAUSED_BUDGET})
# Chunks of a run in these are recorded `not_judged` as they come; the run finalises once they are all in.
ENDING = frozenset({RunState.CANCELLED, RunState.FAILED})


def stopped(state: str, finalised: bool) -> bool:
    """Where `status --wait` stops following: paused, or ended with its manifest written."""
    return state in HELD or state == RunState.DONE or (state in ENDING and finalised)


def can_move(current: str, to: RunState) -> bool:
    try:
        return to in MOVES[RunState(current)]
    except ValueError:
        return False
