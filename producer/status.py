"""Run status: one snapshot, or following a run to its end with a progress bar."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TextIO

from worker.errors import UnknownRun
from worker.flow.runs import Runs, RunStatus
from worker.flow.states import ACTIVE

# The rate `status --wait` shows is over this much of the recent past: long enough to smooth over calls
# landing ten images at a time, short enough to follow a rate limit being raised or lowered.
RATE_WINDOW_S = 300.0
# Below this span a rate is mostly noise (one call's ten images at once): show none yet.
MIN_SPAN_S = 5.0
# Off a terminal, `follow` writes a line at most this often (and the last one).
PLAIN_EVERY_S = 5.0
# States in which images are still being judged.
_MOVING = ACTIVE


@dataclass(frozen=True)
class Sample:
    """One look at a run: when (seconds, on any one clock), images recorded, cents spent."""

    at_s: float
    done: int
    spend_cents: int = 0


@dataclass(frozen=True)
class Pace:
    """How fast a run goes and where its money is heading; None where there is not enough to tell."""

    rate_per_min: float | None
    eta_s: float | None
    cents_per_image: float | None
    projected_spend_cents: int | None
    # 'recent' (samples taken while following), 'average' (since the run was created), or 'none'.
    basis: str = "none"
    # Capped by the run's budget: the run pauses there rather than spend more.
    capped: bool = False


class Samples:
    """The rolling samples a follower keeps: those within the window, plus the newest one before it (so
    the window is always spanned once the run has been followed that long)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._items: deque[Sample] = deque()

    def add(self, sample: Sample) -> None:
        self._items.append(sample)
        horizon = sample.at_s - self.window_s
        while len(self._items) > 2 and self._items[1].at_s <= horizon:
            self._items.popleft()

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def rate_per_min(samples: Iterable[Sample], window_s: float | None = RATE_WINDOW_S) -> float | None:
    """Images per minute between the oldest sample within the window (or the newest before it) and the
    newest; None over less than MIN_SPAN_S."""
    items = list(samples)
    if len(items) < 2:
        return None
    newest = items[-1]
    first = items[0]
    if window_s is not None:
        horizon = newest.at_s - window_s
        for sample in items:
            if sample.at_s > horizon:
                break
            first = sample
    span = newest.at_s - first.at_s
    if span < MIN_SPAN_S:
        return None
    return max(0.0, (newest.done - first.done) * 60.0 / span)


def run_samples(run: Mapping[str, Any], now_s: float) -> list[Sample]:
    """Samples from a run record alone (one-shot `status`): none done at `created_ms`, `done` at the last
    record (`progress_ms`), and, while it still moves, `done` now (a stalled run's rate falls)."""
    try:
        created = int(run.get("created_ms") or 0) / 1000
        last = int(run.get("progress_ms") or 0) / 1000
        done, spend = int(run.get("done") or 0), int(run.get("spend_cents") or 0)
    except (TypeError, ValueError):
        return []
    if not created or not last or last <= created:
        return []
    samples = [Sample(created, 0, 0), Sample(last, done, spend)]
    if run.get("state") in _MOVING and now_s > last:
        samples.append(Sample(now_s, done, spend))
    return samples


def status_samples(status: RunStatus, now_s: float) -> list[Sample]:
    """run_samples of a status (it carries the record's created_ms and progress_ms)."""
    return run_samples(asdict(status), now_s)


def pace(status: RunStatus, samples: Iterable[Sample], *, window_s: float | None = RATE_WINDOW_S,
         basis: str = "recent") -> Pace:
    """Rate over the samples, time left at that rate (only while the run moves), what an image has cost so
    far, and the spend projected for the images left (bounded by the budget)."""
    rate = rate_per_min(samples, window_s)
    left = max(0, status.total - status.done)
    moving = status.state in _MOVING
    eta: float | None = None
    if moving and rate:
        eta = left * 60.0 / rate
    elif moving and left == 0:
        eta = 0.0
    # Per recorded image, free ones included: the mix of rejections and duplicates so far is the best guess
    # of the mix still to come.
    per_image = status.spend_cents / status.done if status.done else None
    projected: int | None
    capped = False
    if not moving or left == 0:
        projected = status.spend_cents
    elif per_image is None:
        projected = None
    else:
        projected = status.spend_cents + round(per_image * left)
    if projected is not None and status.budget_cents is not None and projected > status.budget_cents:
        projected, capped = max(status.budget_cents, status.spend_cents), True
    return Pace(rate, eta, per_image, projected, basis if rate is not None else "none", capped)


def duration(seconds: float) -> str:
    """3h05m, 4m10s, 12s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def pace_dict(p: Pace | None) -> dict[str, Any]:
    """The pace fields of `status --json`; every key present, null where unknown."""
    projected = p.projected_spend_cents if p else None
    return {
        "rate_per_min": round(p.rate_per_min, 1) if p and p.rate_per_min is not None else None,
        "rate_basis": p.basis if p else "none",
        "eta_s": round(p.eta_s) if p and p.eta_s is not None else None,
        "cents_per_image": round(p.cents_per_image, 3) if p and p.cents_per_image is not None else None,
        "projected_spend_cents": projected,
        "projected_spend_usd": f"{projected / 100:.2f}" if projected is not None else None,
        "projected_capped_by_budget": bool(p and p.capped),
    }


def status_dict(status: RunStatus, pace: Pace | None = None) -> dict[str, Any]:
    doc = asdict(status)
    doc.update(pace_dict(pace))
    doc["spend_usd"] = f"{status.spend_cents / 100:.2f}"
    doc["judged"] = {v: status.counts[v] for v in ("live", "spoof", "no_face")}
    doc["rejected"] = status.counts["rejected"]
    doc["error"] = status.error
    doc["errors"] = status.counts["error"]
    doc["not_judged"] = status.counts.get("not_judged", 0)
    return doc


def pace_line(status: RunStatus, p: Pace | None) -> str | None:
    """'120.0 images/min (last 5 min), about 3m20s left; ~$4.20 projected' or None when nothing is known."""
    if p is None:
        return None
    parts = []
    if p.rate_per_min is not None:
        since = "last 5 min" if p.basis == "recent" else "since the run started"
        parts.append(f"{p.rate_per_min:.1f} images/min ({since})")
    if p.eta_s is not None:
        more = "; more may be listed" if status.state == "listing" else ""
        parts.append(f"about {duration(p.eta_s)} left{more}")
    if p.projected_spend_cents is not None:
        cap = " (capped by the budget)" if p.capped else ""
        parts.append(f"~${p.projected_spend_cents / 100:.2f} projected{cap}")
    return ", ".join(parts) or None


def render(status: RunStatus, pace: Pace | None = None) -> str:
    c = status.counts
    pace_text = pace_line(status, pace)
    lines = [
        f"run       {status.run_id}",
        f"state     {status.state}" + (f": {status.error}" if status.error else ""),
        f"images    {status.done}/{status.total} recorded ({status.skipped} skipped as already judged)",
        f"verdicts  live {c['live']}  spoof {c['spoof']}  no_face {c['no_face']}",
        f"failed    rejected {c['rejected']}  error {c['error']}"
        + (f"  not judged {c['not_judged']}" if c.get("not_judged") else ""),
        f"calls     {status.calls}  spend ${status.spend_cents / 100:.2f}"
        + (f" of budget ${status.budget_cents / 100:.2f}" if status.budget_cents is not None else ""),
        f"paid once {status.duplicates} images recorded from another run's judgment; "
        f"{status.answers_lost} calls' answers lost ({status.answers_lost_images} images judged again)",
        f"chunks    {status.chunks} ({status.pending} pending)",
        *([f"pace      {pace_text}"] if pace_text else []),
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class Shown:
    """The pace as a progress display words it; None where nothing is known yet."""

    rate: str | None  # '100/min'
    eta: str | None  # '8m00s', only with a rate
    spend: str  # '$4.00' spent so far
    projected: str | None  # '~$20.00', only while the run moves


def shown(status: RunStatus, pace: Pace | None) -> Shown:
    rate = eta = projected = None
    if pace is not None and pace.rate_per_min is not None:
        rate = f"{pace.rate_per_min:.0f}/min"
        if pace.eta_s is not None:
            eta = duration(pace.eta_s)
    if pace is not None and pace.projected_spend_cents is not None and status.state in _MOVING:
        projected = f"~${pace.projected_spend_cents / 100:.2f}"
    return Shown(rate, eta, f"${status.spend_cents / 100:.2f}", projected)


def bar(status: RunStatus, width: int = 30, pace: Pace | None = None) -> str:
    total = max(status.total, 1)
    filled = min(width, width * status.done // total)
    c = status.counts
    words = shown(status, pace)
    tail = ""
    if words.rate is not None:
        tail += f" | {words.rate}" + (f" eta {words.eta}" if words.eta is not None else "")
    if words.projected is not None:
        tail += f" {words.projected}"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {status.done}/{status.total} "
            f"live {c['live']} spoof {c['spoof']} no_face {c['no_face']} rejected {c['rejected']} "
            f"error {c['error']}" + (f" not_judged {c['not_judged']}" if c.get("not_judged") else "")
            + f" | {status.calls} calls {words.spend}{tail} | {status.state}")


class Display(Protocol):
    """Where `follow` shows each poll: `update` once per poll (at `now_s` on follow's clock), `close` once
    when following ends."""

    def update(self, status: RunStatus, pace: Pace, now_s: float) -> None: ...

    def close(self) -> None: ...


class PlainLines:
    """`bar` lines: redrawn in place on a terminal; otherwise one every PLAIN_EVERY_S and the last, so a log
    file gets a readable history rather than one line per poll."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last_line_at = -1e9

    def update(self, status: RunStatus, pace: Pace, now_s: float) -> None:
        line = bar(status, pace=pace)
        if self._tty:
            self._out.write("\r" + line)
            self._out.flush()
        elif now_s - self._last_line_at >= PLAIN_EVERY_S or status.stopped:
            self._out.write(line + "\n")
            self._out.flush()
            self._last_line_at = now_s

    def close(self) -> None:
        if self._tty:
            self._out.write("\n")
            self._out.flush()


# How long a followed run may show no sign of a worker before `--wait` says so (once).
IDLE_HINT_S = 30.0


def _untouched(status: RunStatus) -> bool:
    """No image recorded, no call made, no token bought: no worker has done anything for this run yet."""
    return (status.state in ("listing", "running") and status.done == 0 and status.calls == 0
            and status.tokens_bought == 0 and status.progress_ms == 0)


def follow(runs: Runs, run_id: str, *, interval_s: float = 0.5, timeout_s: float | None = None,
           out: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep, samples: Samples | None = None,
           display: Display | None = None) -> RunStatus:
    """Poll until the run is done, failed or paused (or timeout_s passes); show progress on `display`
    (PlainLines on `out` unless given). `samples` (kept across polls, one per poll) give the rate; pass one
    to read the pace after."""
    started = clock()
    deadline = None if timeout_s is None else started + timeout_s
    seen = samples if samples is not None else Samples()
    shown_on = display if display is not None else PlainLines(out)
    hinted = False
    try:
        while True:
            status = runs.status(run_id)
            if status is None:
                raise UnknownRun(run_id)
            now = clock()
            seen.add(Sample(now, status.done, status.spend_cents))
            shown_on.update(status, pace(status, seen), now)
            if status.stopped or (deadline is not None and clock() >= deadline):
                return status
            if not hinted and now - started >= IDLE_HINT_S and _untouched(status):
                # `0/min | running` for ever says nothing: the likeliest cause is that no worker is running.
                hinted = True
                print(f"irlive: nothing of run {run_id} recorded and no call made in {IDLE_HINT_S:.0f}s: is a worker "
                      "running against this Redis? Start one: celery -A worker worker --pool threads "
                      "--without-gossip --without-mingle (README: Using it for real)", file=out, flush=True)
            sleep(interval_s)
    finally:
        # Also on Ctrl-C or a lost store: a live display must give the terminal back.
        shown_on.close()
