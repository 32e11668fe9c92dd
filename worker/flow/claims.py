"""Image claims across runs and the done-set: an identity is paid for by one delivery, judged once, reused after.

Before an image is packed into a paid call, its identity (`bucket/key@etag`) is claimed for the chunk delivery
that holds the chunk's lease (the claim carries the lease's token and holds while that lease does). Another
run's delivery that meets a claimed identity waits for its judgment and records it as a duplicate, at no cost;
one that meets a judged identity records it straight away. The done-set keeps one short entry per judged identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.errors import ChunkBusy
from worker.flow.leases import ChunkLease
from worker.keys import Keys
from worker.seams.store import Store

_VERDICT_CODES = {"live": "L", "spoof": "S", "no_face": "N"}
_CODE_VERDICTS = {v: k for k, v in _VERDICT_CODES.items()}
MINE, JUDGED, BUSY, SAME = 1, 2, 3, 4


@dataclass(frozen=True)
class DoneEntry:
    """One judged identity: its verdict, when it was judged, and the run and chunk whose record holds it."""

    verdict: str
    judged_ms: int
    run_id: str
    seq: int

    def encode(self) -> str:
        return f"{_VERDICT_CODES[self.verdict]}|{self.judged_ms}|{self.run_id}|{self.seq}"

    def encode_content(self) -> str:
        """A content's entry, without the time (a --force run ignores content entries): ~14 bytes less on every
        judged image, which keeps the done-set within its 200 bytes per image."""
        return f"{_VERDICT_CODES[self.verdict]}|{self.run_id}|{self.seq}"

    @classmethod
    def decode(cls, raw: str) -> DoneEntry | None:
        parts = raw.split("|")
        if len(parts) == 3:
            parts = [parts[0], "0", parts[1], parts[2]]
        if len(parts) != 4 or parts[0] not in _CODE_VERDICTS:
            return None
        try:
            return cls(_CODE_VERDICTS[parts[0]], int(parts[1]), parts[2], int(parts[3]))
        except ValueError:
            return None


@dataclass
class ClaimResult:
    """Per position of the identities asked about: claimed for the caller, judged already, or held elsewhere."""

    mine: list[int] = field(default_factory=list)
    judged: dict[int, DoneEntry] = field(default_factory=dict)
    busy: dict[int, tuple[str, int]] = field(default_factory=dict)
    # Another object with the same content was judged: that judgment, at no cost.
    same: dict[int, DoneEntry] = field(default_factory=dict)


class Claims:
    """The claim and done-set operations; every write is one script (see flow/scripts/claim.lua)."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self._keys = keys
        self._claim = store.script("flow", "claim")

    def claim_keys(self, identities: Sequence[str], contents: Sequence[str | None]) -> list[str]:
        """The claim keys of these images (their content keys in the same order, None where unknown)."""
        return [k for i, c in zip(identities, contents, strict=True) for k in self._keys.claim_keys(i, c)]

    def claim(self, lease: ChunkLease, run_id: str, seq: int, identities: Sequence[str],
              not_before_ms: int = 0, contents: Sequence[str | None] | None = None) -> ClaimResult:
        """Claim every identity not judged and not held elsewhere; ChunkBusy if the caller's lease is lost.

        not_before_ms > 0 ignores judgments older than that (a --force run judges those again). `contents`
        are the images' content keys (None where unknown): a copy of judged content is reported in `same`,
        and copies of one content are judged one at a time.
        """
        result = ClaimResult()
        if not identities:
            return result
        contents = list(contents) if contents is not None else [None] * len(identities)
        keys = [lease.key]
        fields: list[str] = []
        for identity, content in zip(identities, contents, strict=True):
            image_keys, field_, cfield = self._keys.image(identity, content)
            keys += image_keys
            fields += [field_, cfield]
        answer = self._claim(keys, [lease.token, lease.claim_ttl_ms, f"{run_id} {seq}", not_before_ms,
                                    self._keys.chunk_lease_prefix(), *fields])
        if answer and int(answer[0]) == -1:
            raise ChunkBusy(f"chunk {run_id}/{seq}: lease lost before its images could be claimed")
        mine_keys: list[str] = []
        for pos in range(len(identities)):
            status, detail = int(answer[2 * pos]), str(answer[2 * pos + 1])
            entry = DoneEntry.decode(detail) if status in (JUDGED, SAME) else None
            if status == MINE:
                result.mine.append(pos)
                mine_keys += self._keys.claim_keys(identities[pos], contents[pos])
            elif entry is not None:
                (result.judged if status == JUDGED else result.same)[pos] = entry
            else:
                result.busy[pos] = _holder(detail)
        lease.hold_claims(mine_keys)
        return result

    def judged(self, identities: Sequence[str]) -> list[DoneEntry | None]:
        """The done-set entries of these identities (None where not judged), in one round trip."""
        if not identities:
            return []
        pipe = self._store.pipeline(transaction=False)
        for identity in identities:
            ref = self._keys.done(identity)
            pipe.hget(ref.shard, ref.field)
        return [DoneEntry.decode(raw) if raw else None for raw in pipe.execute()]

    def restore_judged(self, judged: Sequence[tuple[str, DoneEntry]], *, contents: bool = False) -> int:
        """Put judgments back into the done-set (from manifests, after Redis lost them); returns how many were
        missing. An entry already there is left as it is. `contents`: the names are content keys."""
        if not judged:
            return 0
        pipe = self._store.pipeline(transaction=False)
        for identity, entry in judged:
            ref = self._keys.done(identity)
            pipe.hsetnx(ref.shard, ref.field, entry.encode_content() if contents else entry.encode())
        return sum(int(n) for n in pipe.execute())


def _holder(claim_value: str) -> tuple[str, int]:
    """A claim's "token run seq" -> (run, seq) of the delivery holding it."""
    parts = claim_value.split(" ")
    try:
        return parts[1], int(parts[2])
    except (IndexError, ValueError):
        return "?", -1
