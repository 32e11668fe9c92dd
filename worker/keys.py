"""Every Redis key irlive uses, in one place, under one prefix; nothing else builds a key."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# The done-set is split over 16**DONE_SHARD_HEX hashes: few enough that a key's own overhead is shared by many
# entries (a small run costs little), each small enough for Redis's compact encoding up to ~30k images.
DONE_SHARD_HEX = 2
# Hex digits of an identity's digest kept as its field: with the shard's, 96 bits, so collisions never happen.
DONE_FIELD_HEX = 22


@dataclass(frozen=True)
class DoneRef:
    """Where one image identity's judgment lives in the done-set: a shard hash and a field in it."""

    shard: str
    field: str


@dataclass(frozen=True)
class Keys:
    """Key names; `prefix` comes from IRLIVE_KEY_PREFIX so two deployments can share a Redis."""

    prefix: str = "irlive"

    # ---- runs and chunks (flow) ----
    def run(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def no_run(self) -> str:
        """A placeholder passed to scripts for 'no run' (never written)."""
        return f"{self.prefix}:run:-"

    def runs(self) -> str:
        return f"{self.prefix}:runs"

    def chunk_progress(self, run_id: str, seq: int) -> str:
        return f"{self.prefix}:run:{run_id}:chunk:{seq}"

    def chunks_done(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:chunks-done"

    def chunk_summaries(self, run_id: str) -> str:
        """Hash: chunk number -> its manifest's ETag and counts (JSON), so finalisation need not read it back."""
        return f"{self.prefix}:run:{run_id}:chunk-summaries"

    def chunk_checked(self, run_id: str, seq: int) -> str:
        """Hash: image index -> its validation (JSON), so a deferred chunk's next delivery does not read it again."""
        return f"{self.prefix}:run:{run_id}:chunk:{seq}:checked"

    def chunk_items(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:items"

    def parked(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:parked"

    def deliveries(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:deliveries"

    def run_payments(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:payments"

    def watermark(self, source: str) -> str:
        """The LastModified up to which a source was fully judged (`scan --since last`); advanced only by a
        run that ends done."""
        return f"{self.prefix}:watermark:{_digest(source)}"

    def source_run(self, source: str) -> str:
        """The run a scheduled scan of a source started and may still be going (one at a time per source)."""
        return f"{self.prefix}:source-run:{_digest(source)}"

    def run_seen(self, run_id: str) -> str:
        """The identities an event run has taken (replayed events add nothing)."""
        return f"{self.prefix}:run:{run_id}:seen"

    def run_keys(self, run_id: str) -> list[str]:
        """The per-run keys (besides each chunk's progress) dropped once the run is finalised and archived."""
        return [self.chunks_done(run_id), self.chunk_items(run_id), self.parked(run_id), self.deliveries(run_id),
                self.run_seen(run_id), self.chunk_summaries(run_id)]

    # ---- event intake ----
    def event_buffer(self, run_id: str, bucket: str) -> str:
        return f"{self.prefix}:events:buf:{run_id}:{bucket}"

    def event_buffers(self) -> str:
        """The zset of non-empty buffers, member "run|bucket", score the oldest waiting arrival (ms)."""
        return f"{self.prefix}:events:pending"

    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def dlq_members(self) -> str:
        return f"{self.prefix}:dlq:members"

    # ---- leases and claims ----
    def chunk_lease(self, run_id: str, seq: int) -> str:
        return f"{self.chunk_lease_prefix()}{run_id}:{seq}"

    def chunk_lease_prefix(self) -> str:
        """What every chunk lease key starts with (claim.lua finds a claim's lease from it)."""
        return f"{self.prefix}:lease:chunk:"

    def job_lease(self, name: str) -> str:
        return f"{self.prefix}:lease:job:{name}"

    def holding(self, process: str) -> str:
        """The delivery tags a worker process holds (worker/ops/holding.py), expiring unless said again."""
        return f"{self.prefix}:holding:{process}"

    def holders(self) -> str:
        return f"{self.prefix}:holders"

    def claim(self, identity: str) -> str:
        return f"{self.prefix}:claim:{identity}"

    def done(self, identity: str) -> DoneRef:
        digest = hashlib.blake2b(identity.encode(), digest_size=12).hexdigest()
        return DoneRef(f"{self.prefix}:done:{digest[:DONE_SHARD_HEX]}",
                       digest[DONE_SHARD_HEX:DONE_SHARD_HEX + DONE_FIELD_HEX])

    def image(self, identity: str, content: str | None) -> tuple[list[str], str, str]:
        """([done shard, claim key, content's done shard, content's claim key], identity field, content field):
        what claim.lua and record.lua take per image (the identity's own keys again without a content key).

        The claim key is the content's own where the content key follows from the identity (see claim_keys):
        the scripts then take one claim for the image, not two."""
        ref = self.done(identity)
        cref = self.done(content) if content else ref
        cclaim = self.claim(content or identity)
        keys = [ref.shard, cclaim if identity_bound(content) else self.claim(identity), cref.shard, cclaim]
        return keys, ref.field, cref.field if content else ""

    def claim_keys(self, identity: str, content: str | None) -> list[str]:
        """The claims an image is held by while it is judged: its content's, and its identity's unless the
        content key follows from the identity (every delivery of that identity then claims the same content)."""
        if identity_bound(content):
            return [self.claim(content or identity)]
        return [self.claim(identity), *([self.claim(content)] if content else [])]

    def done_pattern(self) -> str:
        return f"{self.prefix}:done:*"

    # ---- money ----
    def payment(self, payment_id: str) -> str:
        return f"{self.prefix}:pay:{payment_id}"

    def payment_pattern(self) -> str:
        return f"{self.prefix}:pay:*"

    def pool(self, listing: str = "") -> str:
        """Prepaid tokens waiting for calls, one list per listing they were bought for (another listing refuses
        them); '' is the default listing, whose list keeps the key it had before listings had one each."""
        if not listing:
            return f"{self.prefix}:wallet:pool"
        return f"{self.prefix}:wallet:pool:{hashlib.sha256(listing.encode()).hexdigest()[:16]}"

    def pools_pattern(self) -> str:
        """Every listing's pool but the default's (SCAN MATCH)."""
        return f"{self.prefix}:wallet:pool:*"

    def held(self) -> str:
        """Tokens bought above the price cap: never lent until a person releases them (`irlive wallet`)."""
        return f"{self.prefix}:wallet:held"

    def leases(self) -> str:
        return f"{self.prefix}:wallet:leases"

    def requests(self) -> str:
        return f"{self.prefix}:wallet:requests"

    def unrecorded(self) -> str:
        return f"{self.prefix}:wallet:unrecorded"

    def wallet_totals(self) -> str:
        return f"{self.prefix}:wallet:totals"

    def fleet_enforced(self) -> str:
        """Each running worker's enforced money settings (host:pid -> JSON), for `irlive wallet`."""
        return f"{self.prefix}:fleet:enforced"

    def day(self, day: str) -> str:
        return f"{self.prefix}:day:{day}"

    # ---- the limiter ----
    def ratelimit(self) -> str:
        return f"{self.prefix}:ratelimit"

    def ratelimit_state(self) -> str:
        return f"{self.prefix}:ratelimit:state"

    def ratelimit_slots(self) -> str:
        return f"{self.prefix}:ratelimit:in-flight"

    def ratelimit_returns(self) -> str:
        """The limiter's waiting room: the next return time given to a caller with no place yet (us)."""
        return f"{self.prefix}:ratelimit:returns"

    def ratelimit_waiting(self) -> str:
        """Callers waiting for an in-flight slot (member -> registration expiry): a slot given back wakes one."""
        return f"{self.prefix}:ratelimit:waiting"

    def ratelimit_freed(self) -> str:
        """The list callers waiting for an in-flight slot block on (BLPOP) instead of asking again and again."""
        return f"{self.prefix}:ratelimit:freed"


def _digest(text: str) -> str:
    """A short, fixed-length name for text of any length (a source URI) inside a key."""
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def identity_bound(content: str | None) -> bool:
    """Whether a content key is a function of the identity (an MD5 ETag and the size, which every delivery of
    `bucket/key@etag` computes without reading), as a hash of bytes read (a multipart upload's) is not: a delivery
    whose read failed has no content key, and must still meet the others on the identity's claim."""
    return bool(content) and str(content).startswith("md5:")
