"""`irlive reindex`: rebuild the done-set from the chunk manifests in S3, so a rescan after Redis lost it pays $0."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from worker.config import S3Location
from worker.flow.claims import Claims, DoneEntry
from worker.judge.manifest import JUDGED, Item, iso_ms
from worker.seams.storage import Storage

BATCH = 1000


@dataclass
class Reindexed:
    """What a reindex found and wrote."""

    manifests: int = 0
    judged: int = 0
    restored: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def reindex(storage: Storage, claims: Claims, output: S3Location) -> Reindexed:
    """Every judged record (not a duplicate) of every chunk manifest under `<output>/runs/` enters the done-set."""
    result = Reindexed()
    pending: list[tuple[str, DoneEntry]] = []
    # Copies found later under other keys reuse a judgment through its content key (manifest.content_key);
    # restored alongside, not counted: `restored` counts images.
    contents: list[tuple[str, DoneEntry]] = []
    for obj in storage.iter_objects(output.bucket, output.key("runs") + "/"):
        if "/chunks/" not in obj.key or not obj.key.endswith(".json"):
            continue
        doc, _ = storage.get_json(output.bucket, obj.key)
        result.manifests += 1
        for record in doc.get("images", ()):
            if record.get("verdict") not in JUDGED or record.get("duplicate_of"):
                continue
            identity = Item(record["bucket"], record["key"], record.get("etag") or "").identity
            entry = DoneEntry(record["verdict"], iso_ms(record.get("judged_at")), str(doc["run_id"]), int(doc["seq"]))
            pending.append((identity, entry))
            if record.get("content_key"):
                contents.append((str(record["content_key"]), entry))
            result.judged += 1
        if len(pending) >= BATCH:
            result.restored += claims.restore_judged(pending)
            claims.restore_judged(contents, contents=True)
            pending.clear()
            contents.clear()
    result.restored += claims.restore_judged(pending)
    claims.restore_judged(contents, contents=True)
    return result

