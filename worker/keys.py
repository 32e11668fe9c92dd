"""Every Redis key irlive uses, in one place, under one prefix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    """Key names; `prefix` comes from IRLIVE_KEY_PREFIX so two deployments can share a Redis."""

    prefix: str = "irlive"

    def run(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}"

    def runs(self) -> str:
        return f"{self.prefix}:runs"

    def chunk_progress(self, run_id: str, seq: int) -> str:
        return f"{self.prefix}:run:{run_id}:chunk:{seq}"

    def chunks_done(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:chunks-done"

    def chunk_items(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:items"

    def done(self) -> str:
        return f"{self.prefix}:done"

    def payment(self, payment_id: str) -> str:
        return f"{self.prefix}:pay:{payment_id}"

    def payment_prefix(self) -> str:
        return f"{self.prefix}:pay:"

    def pool(self) -> str:
        return f"{self.prefix}:wallet:pool"

    def leases(self) -> str:
        return f"{self.prefix}:wallet:leases"

    def requests(self) -> str:
        return f"{self.prefix}:wallet:requests"

    def wallet_totals(self) -> str:
        return f"{self.prefix}:wallet:totals"

    def day(self, day: str) -> str:
        return f"{self.prefix}:day:{day}"

    def parked(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:parked"

    def deliveries(self, run_id: str) -> str:
        return f"{self.prefix}:run:{run_id}:deliveries"

    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def ratelimit(self) -> str:
        return f"{self.prefix}:ratelimit"
