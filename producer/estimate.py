"""What a scan would cost, before it runs (pure)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """Counts and cost of a scan; calls are packed per chunk exactly as the workers pack them."""

    found: int
    already_judged: int
    to_judge: int
    chunks: int
    calls: int
    price_cents: int
    price_source: str
    max_attempts: int
    warnings: list[str] = field(default_factory=list)

    @property
    def cost_cents(self) -> int:
        return self.calls * self.price_cents

    @property
    def worst_case_cents(self) -> int:
        """Every call failing after payment until its attempts run out."""
        return self.cost_cents * self.max_attempts

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.update(cost_cents=self.cost_cents, cost_usd=usd(self.cost_cents),
                   worst_case_cents=self.worst_case_cents, worst_case_usd=usd(self.worst_case_cents))
        return doc

    def render(self) -> str:
        return "\n".join([
            f"images found        {self.found}",
            f"already judged      {self.already_judged}",
            f"to judge            {self.to_judge} in {self.chunks} chunks",
            f"calls needed        {self.calls}",
            f"price per call      ${usd(self.price_cents)} ({self.price_source})",
            f"estimated cost      ${usd(self.cost_cents)}",
            f"worst case          ${usd(self.worst_case_cents)} (every call retried {self.max_attempts}x after paying)",
            *(f"WARNING             {w}" for w in self.warnings),
        ])


def calls_for(chunk_sizes: Iterable[int], per_call: int) -> int:
    """Calls for chunks of these sizes: each chunk is split into calls of at most `per_call` images."""
    return sum(math.ceil(n / per_call) for n in chunk_sizes)


def usd(cents: int) -> str:
    return f"{cents / 100:.2f}"
