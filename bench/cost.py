"""Issue 3 benchmark: the dry-run estimate against the actual spend of a clean run, and cost per image vs the floor."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench import common
from sandbox.stack import Stack

TARGET_PER_IMAGE_USD = 0.0201


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.cost", description=__doc__)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rate", type=float, default=20.0, help="IRLIVE_RATE_LIMIT_PER_S (the sandbox is unlimited)")
    return p.parse_args(argv)


def usd(cents: float) -> str:
    return f"${cents / 100:.2f}"


def measure(stack: Stack, keys: list[str], ns: argparse.Namespace) -> dict[str, Any]:
    env = {"IRLIVE_RATE_LIMIT_PER_S": f"{ns.rate:g}"}
    common.reset(stack)
    dry = common.run_cli(stack, env, "scan", common.source(), "--dry-run", "--json")
    after_dry = stack.sandbox_ledger()
    common.start_workers(stack, ns.workers, ns.concurrency, env)
    run = common.drive_run(stack, env, common.source(), timeout_s=max(120.0, len(keys) / 10 / ns.rate * 4 + 60))
    stack.stop_workers()
    wallet = common.run_cli(stack, env, "wallet", "--json")["totals"]
    manifest, records = common.read_records(stack, run.run_id)
    ledger = stack.sandbox_ledger()
    return {"dry": dry, "after_dry": after_dry, "run": run, "manifest": manifest, "ledger": ledger, "wallet": wallet,
            "problems": common.record_problems(records, keys)}


def report(m: dict[str, Any], n: int) -> str:
    dry, manifest, ledger, wallet = m["dry"], m["manifest"], m["ledger"], m["wallet"]
    price = int(dry["price_cents"])
    floor_cents = price / 10  # ten images per call is the upstream's maximum
    spend = int(manifest["spend_cents"])
    billed_cents = int(ledger["calls_billed"]) * price
    bought_cents = int(ledger["payments_created"]) * price
    per_image = spend / n
    rows = [
        ["images", str(n), f"found {dry['found']}, to judge {dry['to_judge']}"],
        ["dry-run estimate", usd(dry["cost_cents"]), f"{dry['calls']} calls x {usd(price)} ({dry['price_source']}); "
                                                     f"worst case {usd(dry['worst_case_cents'])}"],
        ["dry run itself", usd(int(m["after_dry"]["calls_billed"]) * price),
         f"payments created {m['after_dry']['payments_created']}, queue untouched"],
        ["actual spend (run manifest)", usd(spend), f"{manifest['calls']} calls charged to the run"],
        ["actual spend (sandbox ledger)", usd(billed_cents), f"{ledger['calls_billed']} calls billed, "
                                                           f"{ledger['images_billed']} images billed"],
        ["tokens bought (cash out)", usd(bought_cents),
         f"{ledger['payments_created']} tokens: {wallet.get('spent', 0)} spent, {wallet.get('pool', 0)} prepaid "
         f"in the pool for the next run, {wallet.get('void', 0)} void"],
        ["actual ÷ estimate", f"{spend / dry['cost_cents']:.4f}" if dry["cost_cents"] else "n/a", ""],
        ["cost per image", f"${per_image / 100:.5f}", f"floor ${floor_cents / 100:.4f} (price / 10 images per call)"],
        ["cost per image ÷ floor", f"{per_image / floor_cents:.4f}",
         f"target ≤ {TARGET_PER_IMAGE_USD / (floor_cents / 100):.3f} (${TARGET_PER_IMAGE_USD}/image)"],
        ["cash out per image ÷ floor", f"{bought_cents / n / floor_cents:.4f}",
         "if the prepaid tokens left in the pool expired unused"],
        ["calls ÷ images", f"{int(ledger['calls_billed']) / n:.4f}", "floor 0.1000"],
        ["every image one record", "yes" if not m["problems"] else "NO: " + "; ".join(m["problems"]),
         f"run {m['run'].status.state} in {m['run'].wall_s:.1f} s"],
    ]
    return "\n".join([
        f"bench.cost: clean run of {n} images, default chunking (IRLIVE_CHUNK_SIZE 50, 10 images per call); "
        f"{common.machine()}; {common.today()}",
        "",
        common.table(["figure", "value", "detail"], rows),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    common.keep_bytecode()
    ns = parse(argv)
    started = time.monotonic()
    with Stack(settings_env=common.base_env()) as stack:
        keys = common.upload_images(stack, ns.images)
        print(f"uploaded {len(keys)} images in {time.monotonic() - started:.1f} s", file=sys.stderr)
        measured = measure(stack, keys, ns)
    print(report(measured, ns.images))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
