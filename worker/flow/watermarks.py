"""Per-source watermarks of `scan --since last` and the single-flight hold of scheduled scans of a source."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from worker.errors import ConfigError, TransientError
from worker.keys import Keys
from worker.seams.store import Store

# Holders that turn out inactive are replaced by compare-and-set; a few rounds cover racing schedulers.
_CLAIM_ROUNDS = 8


class Watermarks:
    """The LastModified up to which each source was judged, and which run is scanning it now."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys
        self._advance = store.script("flow", "watermark_advance")
        self._claim = store.script("flow", "source_claim")
        self._release = store.script("flow", "source_release")

    def get(self, source: str) -> datetime | None:
        iso = self._store.hget(self._keys.watermark(source), "iso")
        return parse_utc(str(iso)) if iso else None

    def advance(self, source: str, to_iso: str) -> bool:
        """Move the watermark to `to_iso` if that is later than where it is; True if it moved."""
        to = parse_utc(to_iso)
        ms = int(to.timestamp() * 1000)
        return bool(int(self._advance([self._keys.watermark(source)], [ms, to.isoformat()])))

    def claim(self, source: str, run_id: str, active: Callable[[str], bool]) -> str | None:
        """Hold `source` for `run_id`; returns the still-active run that holds it instead (nothing changed)."""
        seen = ""
        for _ in range(_CLAIM_ROUNDS):
            holder = str(self._claim([self._keys.source_run(source)], [run_id, seen]) or "")
            if not holder or holder == run_id:
                return None
            if active(holder):
                return holder
            seen = holder  # ended without letting go: replace exactly that one, unless another scan did first
        raise TransientError(f"{source}: the hold on the source kept changing hands; try again")

    def holder(self, source: str) -> str | None:
        value = self._store.get(self._keys.source_run(source))
        return str(value) if value else None

    def release(self, source: str, run_id: str) -> bool:
        """Let go of `source` if `run_id` holds it; True if it did."""
        return bool(int(self._release([self._keys.source_run(source)], [run_id])))


def parse_utc(text: str) -> datetime:
    """ISO-8601 to an aware UTC datetime; a time without a zone is taken as UTC."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r} is not an ISO-8601 time (e.g. 2026-11-29 or 2026-11-29T10:00:00Z)") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
