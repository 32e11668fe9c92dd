"""The `irlive` command line: scan, status, sandbox, demo; settings are read here, once."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from producer.estimate import Estimate, usd
from producer.filters import parse_suffixes, parse_time
from producer.status import Samples, follow, pace, render, status_dict, status_samples
from worker.config import PAYMENT_METHODS, S3Location, Settings, missing_extra
from worker.errors import ConfigError, IrliveError, StoreUnavailable, UnknownRun
from worker.flow.claims import Claims
from worker.flow.runs import Runs, RunStatus
from worker.flow.states import ACTIVE, HELD
from worker.flow.watermarks import Watermarks
from worker.judge.manifest import VERDICTS
from worker.keys import Keys
from worker.messages import PRIORITIES, Chunk
from worker.ops.durability import require_durable
from worker.ops.recovery import Reconciled, Recovery
from worker.ops.redact import redact
from worker.seams.store import Store

if TYPE_CHECKING:
    from celery import Celery

    from producer.scan import ScanResult
    from worker.seams.storage import Storage

# Celery (the broker's client), boto3 (S3) and rich (progress) are imported by the commands that use them: most
# commands read Redis only, and each CLI call paid ~0.3 s importing the others (docs/TESTING.md).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PAUSED, EXIT_HELD = 0, 1, 2, 3, 4
# A source held by a run with no record yet is being created by a scan (claim, then create): not stale.
_YOUNG_CLAIM_S = 120
# A source's run that still holds it: judging, or paused and able to resume.
_ACTIVE_STATES = ACTIVE | HELD
EXIT_CANCELLED = 5
# A run done, but some of its images ended `error` (not judged: listed in failed.jsonl, `irlive redrive`).
EXIT_DONE_WITH_ERRORS = 6
# A followed run still going when --timeout ran out (as GNU timeout(1) exits).
EXIT_TIMED_OUT = 124
# Whoever read our stdout left (`| head`): what a shell reports for a tool SIGPIPE ended, 128 + 13.
EXIT_BROKEN_PIPE = 141
_RUN_HELP = "the run id (printed by `irlive scan`)"
_JSON_HELP = "print the result as JSON (schema in docs/schemas/)"
_STATE_EXIT = {"done": EXIT_OK, "failed": EXIT_FAILED, "paused_budget": EXIT_PAUSED, "paused": EXIT_PAUSED,
               "cancelled": EXIT_CANCELLED}


def _run_exit(status: RunStatus) -> int:
    """How a command that followed a run to its end exits (the table under "Exit codes" in the README)."""
    if status.state == "done" and status.counts.get("error", 0):
        return EXIT_DONE_WITH_ERRORS
    if status.state in ACTIVE:
        return EXIT_TIMED_OUT  # the wait's --timeout ran out first
    return _STATE_EXIT.get(status.state, EXIT_OK)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["sandbox"]:
        missing = missing_demo_modules()
        if missing:
            print(f"irlive: error: {demo_extra_message('sandbox', missing)}", file=sys.stderr)
            return EXIT_USAGE
        # The sandbox has its own flags (one per fault knob); hand them over untouched.
        from sandbox.server import main as sandbox_main

        return sandbox_main(args[1:])
    parser = _parser()
    ns = parser.parse_args(args)
    if not getattr(ns, "command", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code = int(ns.handler(ns))
        return code
    except StoreUnavailable as exc:
        print(f"irlive: error: {redact(str(exc))} (IRLIVE_REDIS_URL)", file=sys.stderr)
        return EXIT_FAILED
    except IrliveError as exc:
        print(f"irlive: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError | UnknownRun) else EXIT_FAILED
    except KeyboardInterrupt:
        print("irlive: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `irlive scan … --dry-run | head`: the reader left. Quiet, as a tool killed by SIGPIPE; stdout goes to
        # /dev/null so the interpreter's last flush cannot raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irlive", description="Judge infrared face captures in S3 for liveness.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "scan", help="list a bucket prefix (or an inventory, or a list file) and enqueue every image for judging",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 started (or done with --wait), 1 failed, 2 bad usage or configuration, 3 paused (by "
               "its owner or its budget),\n  4 with --since last: another run of the same source is still active "
               "(it is named; no run is created), 5 cancelled,\n  6 done but some images ended `error` (with "
               "--wait; failed.jsonl lists them). The README's \"Exit codes\" has the table for every command.")
    p.add_argument("source", help="s3://bucket/prefix; inventory://bucket/path/manifest.json (S3 Inventory, CSV); "
                                  "file:PATH (.csv bucket,key[,etag] / .jsonl {\"bucket\",\"key\",\"etag\"} / "
                                  "s3://bucket/key lines) or file:- for standard input")
    p.add_argument("--since", default=None, metavar="TIME|last",
                   help="only objects modified since TIME (2026-11-29, ISO-8601, or 24h/7d back from now), listed "
                        "from IRLIVE_SINCE_OVERLAP_S earlier; 'last': since the source's last run that ended done "
                        "(everything the first time), one such run per source at a time")
    p.add_argument("--until", default=None, metavar="TIME", help="only objects modified before TIME")
    p.add_argument("--suffix", default=None, help="comma list of suffixes (default .png,.jpg,.jpeg,.bmp,.gif,.webp)")
    p.add_argument("--limit", type=_positive_int, default=None, help="judge at most N images")
    p.add_argument("--output", default=None, help="s3://bucket/prefix for manifests (default IRLIVE_OUTPUT)")
    p.add_argument("--force", action="store_true", help="judge again images already judged")
    p.add_argument("--priority", choices=PRIORITIES, default="nightly",
                   help="which queue the run's chunks go to; workers take events first, backfill last "
                        "(default nightly)")
    p.add_argument("--budget", type=_usd, default=None, metavar="USD", help="spend at most this on the run")
    p.add_argument("--dry-run", action="store_true", help="count and estimate the cost; enqueue and spend nothing")
    p.add_argument("--confirm-above", type=_usd, default=None, metavar="USD",
                   help="ask before starting a run estimated above this (refused without a terminal)")
    p.add_argument("--wait", action="store_true", help="follow the run to its end")
    p.add_argument("--notify", default=None, metavar="URL",
                   help="POST the run's end (done, failed, cancelled, paused for budget) here, signed with "
                        "IRLIVE_NOTIFY_SECRET (default IRLIVE_NOTIFY_URL)")
    p.add_argument("--max-error-rate", type=_share, default=None, metavar="SHARE",
                   help="stop paying and end the run failed when more than this share of its paid calls bought "
                        "no verdict, once --min-calls have ended: 0.5 or 50%% (default IRLIVE_MAX_ERROR_RATE, "
                        "0.5; 1 = never)")
    p.add_argument("--min-calls", type=_positive_int, default=None, metavar="N",
                   help="paid calls that must end before --max-error-rate applies (default IRLIVE_MIN_CALLS, 20)")
    p.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE",
                   help="label the run (repeatable): kept in its manifest, webhook and report; `irlive runs --tag` "
                        "finds it")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_scan)

    p = sub.add_parser("listen", help="judge images as S3 event notifications announce them (SQS)")
    p.add_argument("queue", help="sqs://QUEUE-NAME, or the queue's URL (endpoint: IRLIVE_SQS_ENDPOINT_URL)")
    p.add_argument("--suffix", default=None, help="comma list of suffixes (default .png,.jpg,.jpeg,.bmp,.gif,.webp)")
    p.add_argument("--output", default=None, help="s3://bucket/prefix for manifests (default IRLIVE_OUTPUT)")
    p.add_argument("--wait", type=int, default=5, metavar="S",
                   help="long-poll wait in seconds (1-20; SIGTERM stops within about this long)")
    p.add_argument("--json", action="store_true", help="one JSON line per batch of messages on stdout")
    p.set_defaults(handler=_cmd_listen)

    p = sub.add_parser("pause", help="pause a run: nothing is paid for it once this returns; calls in flight "
                                     "finish and are recorded; `irlive resume` continues it")
    p.add_argument("run_id", help=_RUN_HELP)
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(handler=_cmd_pause)

    p = sub.add_parser("cancel", help="cancel a run: nothing is paid for it once this returns; calls in flight "
                                      "finish and are recorded, the rest is recorded not_judged, and the run "
                                      "finalises as cancelled")
    p.add_argument("run_id", help=_RUN_HELP)
    p.add_argument("--wait", action="store_true", help="follow the run until its manifest is written")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(handler=_cmd_cancel)

    p = sub.add_parser("resume", help="continue a paused run (by `irlive pause` or by its budget), optionally "
                                      "with a higher budget")
    p.add_argument("run_id", help=_RUN_HELP)
    p.add_argument("--budget", type=_usd, default=None, metavar="USD", help="the run's new total budget")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(handler=_cmd_resume)

    p = sub.add_parser("reconcile", help="re-enqueue a run's chunks that nobody is working on; finalise if due")
    p.add_argument("run_id", help=_RUN_HELP)
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(handler=_cmd_reconcile)

    p = sub.add_parser("dlq", help="list dead-lettered chunks")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(handler=_cmd_dlq)

    p = sub.add_parser("redrive", help="judge again a run's failed (error) and dead-lettered images, nothing else")
    p.add_argument("run_id", help=_RUN_HELP)
    p.add_argument("--include-rejected", action="store_true", help="also images refused before paying")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(handler=_cmd_redrive)

    p = sub.add_parser("reindex", help="rebuild the done-set from the run manifests under an output prefix")
    p.add_argument("output", nargs="?", default=None,
                   help="s3://bucket/prefix where manifests are (default IRLIVE_OUTPUT)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_reindex)

    p = sub.add_parser("wallet", help="token pool, ledger totals, today's spend")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.add_argument("--reconcile", action="store_true",
                   help="reconcile tokens whose lease expired (with --all: every open token; only when no worker runs)")
    p.add_argument("--all", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--release-held", action="store_true",
                   help="put tokens held for costing more than a price cap back into the pool (a worker whose "
                        "IRLIVE_MAX_PRICE_CENTS is still lower holds them again)")
    p.set_defaults(handler=_cmd_wallet)

    p = sub.add_parser("status", help="show a run's progress")
    p.add_argument("run_id", help=_RUN_HELP)
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.add_argument("--wait", action="store_true", help="follow the run to its end with a progress bar")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("demo", help="run the whole pipeline on a local stack with synthetic captures "
                                    "(needs `pip install 'irlive[demo]'`)")
    p.add_argument("--images", type=_positive_int, default=200, metavar="N",
                   help="synthetic captures to upload and judge, some deliberately invalid (default 200)")
    p.add_argument("--workers", type=_positive_int, default=2, metavar="N",
                   help="celery worker processes to start (default 2)")
    p.add_argument("--out-dir", default="irlive-demo-output", help="where to copy the manifests")
    p.add_argument("--payment-method", choices=PAYMENT_METHODS, default="token",
                   help="how the workers pay the sandbox (x402 signs with a throwaway key made for the demo)")
    p.add_argument("--json", action="store_true",
                   help="progress on stderr, then one JSON document summarising the run on stdout")
    p.set_defaults(handler=_cmd_demo)

    p = sub.add_parser("stack", help="keep a local stack up (Redis, S3 stand-in, sandbox, workers) and print the "
                                     "`export` lines to use it from another shell; Ctrl-C stops it (needs the "
                                     "demo extra)")
    p.add_argument("--workers", type=_positive_int, default=2, metavar="N", help="worker processes (default 2)")
    p.add_argument("--env-file", default=None, metavar="FILE", help="also write the export lines here")
    p.set_defaults(handler=_cmd_stack)

    p = sub.add_parser("smoke", help="make exactly one paid call on one image and print what the seller did")
    p.add_argument("image", help="s3://bucket/key of one capture")
    p.add_argument("--json", action="store_true",
                   help="print the report as one line of JSON (the default prints the same document indented)")
    p.set_defaults(handler=_cmd_smoke)

    p = sub.add_parser("config", help="print the effective settings (secrets masked), where each came from, the "
                                      "visibility timeout, and run the checks a worker runs at start",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="exit codes: 0 a worker would start with these settings, 1 problems (listed), 2 the "
                              "configured way to pay lacks its extra (irlive[mcp], irlive[x402])")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.add_argument("--no-redis", action="store_true",
                   help="do not contact IRLIVE_REDIS_URL (skips the Redis durability check)")
    p.set_defaults(handler=_cmd_config)

    p = sub.add_parser("report", help="write a run's report.html (what its records say, the captures to review) "
                                      "from what it left in S3")
    p.add_argument("run_id", help=_RUN_HELP)
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the page (default irlive-report-RUN.html here; - for stdout)")
    p.add_argument("--open", action="store_true", help="open the page in a browser once written")
    p.add_argument("--thumbnails", action="store_true",
                   help="show each capture to review, small, with the seller's face boxes (reads each object; off "
                        "by default: these are biometric images and a report may outlive them)")
    p.add_argument("--output", default=None, help="s3://bucket/prefix of the run's manifests when its record is "
                                                  "gone from Redis (default IRLIVE_OUTPUT)")
    p.set_defaults(handler=_cmd_report)

    p = sub.add_parser("export", help="one row per image of a run (key, ETag, verdict, confidence, cost share…)")
    p.add_argument("run_id", help=_RUN_HELP)
    p.add_argument("--format", choices=("csv", "jsonl", "parquet"), default="csv", help="default csv")
    p.add_argument("--verdict", choices=VERDICTS, default=None, help="only images with this verdict")
    p.add_argument("--out", default="-", metavar="FILE", help="default - (stdout; parquet needs a file)")
    p.add_argument("--output", default=None, help="s3://bucket/prefix of the run's manifests when its record is "
                                                  "gone from Redis (default IRLIVE_OUTPUT)")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("runs", help="list runs, newest first")
    p.add_argument("--state", action="append", default=[], metavar="STATE",
                   help="only runs in this state (repeatable): listing, running, paused, paused_budget, done, "
                        "failed, cancelled…")
    p.add_argument("--source", default=None, metavar="PREFIX", help="only runs whose source starts with this")
    p.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE",
                   help="only runs with this tag (repeatable: all must match)")
    p.add_argument("--since", default=None, metavar="TIME", help="only runs created since TIME (date, ISO, 24h, 7d)")
    p.add_argument("--limit", type=_positive_int, default=50, help="at most N runs (default 50)")
    p.add_argument("--json", action="store_true", help=_JSON_HELP)
    p.set_defaults(handler=_cmd_runs)

    sub.add_parser("sandbox", help="serve the local stand-in marketplace (see `irlive sandbox --help`)")
    return parser


def _tag(text: str) -> tuple[str, str]:
    from producer.reports import parse_tag

    try:
        return parse_tag(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _usd(text: str) -> int:
    """'12.5' or '$12.50' -> 1250 cents."""
    try:
        cents = round(float(text.strip().lstrip("$")) * 100)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount in US dollars") from None
    if cents < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return cents


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


class _Clients:
    """The producer's clients, built from settings read once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self.store = Store.from_url(settings.redis_url)
        self.runs = Runs(self.store, self.keys)
        self.claims = Claims(self.store, self.keys)

    def storage(self) -> Storage:
        from worker.seams.storage import Storage

        return Storage(self.settings.s3_endpoint_url, self.settings.s3_region)

    def require_durable_redis(self) -> None:
        """Refuse a Redis that would forget money (exit 2 naming what to set); say so when it is allowed."""
        found = require_durable(self.store, allow_volatile=self.settings.allow_volatile_redis,
                                where=self.store.where)
        if not found.checked:
            print(f"irlive: warning: Redis durability not checked: {found.why_unchecked}", file=sys.stderr)
        elif found.problems():
            print(f"irlive: warning: Redis at {self.store.where} is volatile ({'; '.join(found.problems())}); "
                  "going on because IRLIVE_ALLOW_VOLATILE_REDIS=true", file=sys.stderr)


def _cmd_scan(ns: argparse.Namespace) -> int:
    from producer.progress import display_for
    from producer.scan import ScanRequest, estimate, new_run_id, scan, watermark_name
    from producer.sources import parse_source
    from worker.ops import logs

    settings = Settings.from_env()
    logs.configure(settings.log_format, logging.INFO)
    clients = _Clients(settings)
    output = S3Location.parse(ns.output, "--output") if ns.output else settings.require_output()
    source = parse_source(ns.source, settings.list_workers)
    suffixes = parse_suffixes(ns.suffix)
    now = datetime.now(UTC)
    until = parse_time(ns.until, now, "--until") if ns.until else None
    held_as = watermark_name(source, suffixes) if ns.since == "last" else None
    since: datetime | None = None
    if ns.since == "last":
        if held_as is None:
            raise ConfigError("--since last needs a source that says when objects were written "
                              "(s3:// or inventory://); list files do not")
        since = Watermarks(clients.store, clients.keys).get(held_as)
        if since is None and not ns.json:
            print(f"irlive: no earlier run of {held_as} ended done: listing everything", file=sys.stderr)
    elif ns.since:
        since = parse_time(ns.since, now)
    if since is not None and until is not None and since >= until:
        raise ConfigError(f"--since {since.isoformat()} is not before --until {until.isoformat()}")
    request = ScanRequest(source, suffixes, ns.limit, ns.force, ns.budget, ns.priority, since=since, until=until,
                          max_error_rate=settings.max_error_rate if ns.max_error_rate is None else ns.max_error_rate,
                          min_calls=settings.min_calls if ns.min_calls is None else ns.min_calls,
                          notify_url=_webhook(ns.notify) if ns.notify else None, tags=tuple(ns.tag))
    if ns.dry_run or ns.confirm_above is not None:
        price, quoted_by = _price(settings)
        est = estimate(settings, clients.storage(), clients.claims, request, output, price, quoted_by)
        if price > settings.max_price_cents:
            est.warnings.append(f"the seller asks {price} cents per call but IRLIVE_MAX_PRICE_CENTS is "
                                f"{settings.max_price_cents}: workers with that setting will refuse to pay and "
                                "stop the run")
        if ns.dry_run:
            print(json.dumps(est.as_dict()) if ns.json else est.render())
            return EXIT_OK
        if est.cost_cents > ns.confirm_above and not _confirm(est):
            print(f"irlive: not started: estimate ${usd(est.cost_cents)} is above --confirm-above "
                  f"${usd(ns.confirm_above)}", file=sys.stderr)
            return EXIT_USAGE
    clients.require_durable_redis()
    app = _app(settings)

    latest: list[ScanResult] = []

    def progress(r: ScanResult) -> None:
        latest[:] = [r]
        if not ns.json and r.chunks and r.chunks % 100 == 0:
            print(f"listed {r.found} images, enqueued {r.enqueued} in {r.chunks} chunks", file=sys.stderr)

    if settings.metrics_port:
        # A long listing (and --wait) is watched like the workers: its own counts and the fleet's gauges.
        from worker.ops.metrics import CountsCollector, FleetCollector, serve

        serve(settings.metrics_port, None, FleetCollector(clients.store, clients.keys, settings.daily_budget_cents,
                                                           settings.pool_listing),
              CountsCollector("irlive_scan_images", "What this scan listed: found, skipped (judged before), "
                              "enqueued, and chunks", lambda: {name: getattr(latest[0], name) if latest else 0
                                                               for name in ("found", "skipped", "enqueued",
                                                                            "chunks")}))
    run_id = new_run_id()
    marks = Watermarks(clients.store, clients.keys)
    if held_as is not None:
        holder = marks.claim(held_as, run_id, lambda rid: _run_active(clients.runs, rid))
        if holder is not None:
            print(f"irlive: {held_as} is still being scanned by run {holder} (irlive status {holder}); "
                  "not starting another", file=sys.stderr)
            return EXIT_HELD
    try:
        result = scan(settings, clients.storage(), clients.runs, clients.claims, app, request, output, progress,
                      run_id=run_id)
    except BaseException:
        if held_as is not None:
            marks.release(held_as, run_id)
        raise
    for warning in result.warnings:
        print(f"irlive: warning: {warning}", file=sys.stderr)
    doc = result.as_dict()
    if ns.json:
        print(json.dumps(doc))
    else:
        print(result.run_id)
        print(f"found {result.found} images: {result.enqueued} enqueued in {result.chunks} chunks, "
              f"{result.skipped} already judged", file=sys.stderr)
    if ns.wait:
        samples = Samples()
        final = follow(clients.runs, result.run_id, samples=samples, display=display_for(ns.json))
        report = _report_link(clients.runs, result.run_id)
        if ns.json:
            # The started document above, then the end state, as `status --json` prints it: one per line.
            print(json.dumps({**status_dict(final, pace(final, samples)), "report": report}))
        elif report:
            print(f"report: {report}")
        return _run_exit(final)
    return EXIT_OK


def _share(text: str) -> float:
    """0.5, or 50%: a share between 0 and 1."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share (0.5 or 50%)") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1 (0 % and 100 %)")
    return value


def _webhook(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError("--notify: expected an http(s):// URL")
    return url.strip()


def _run_active(runs: Runs, run_id: str) -> bool:
    run = runs.get(run_id)
    if run is None:
        try:
            created = datetime.strptime(run_id[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return False
        return (datetime.now(UTC) - created).total_seconds() < _YOUNG_CLAIM_S
    return str(run.get("state")) in _ACTIVE_STATES


def _price(settings: Settings) -> tuple[int, str]:
    """The seller's price from its free 402 answer; the configured maximum if it cannot be read."""
    from worker.seams.marketplace import Marketplace

    market = Marketplace.for_settings(settings, timeout_s=min(settings.call_timeout_s, 10))
    try:
        return market.quote().price_cents, "quoted by the marketplace"
    except IrliveError:
        return settings.max_price_cents, "IRLIVE_MAX_PRICE_CENTS; the marketplace did not quote"
    finally:
        market.close()


def _confirm(est: Estimate) -> bool:
    if not sys.stdin.isatty():
        return False
    print(est.render(), file=sys.stderr)
    answer = input(f"Start this run, estimated at ${usd(est.cost_cents)}? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _cmd_resume(ns: argparse.Namespace) -> int:
    settings = Settings.from_env()
    clients = _Clients(settings)
    _require_run(clients.runs, ns.run_id)
    parked = clients.runs.resume(ns.run_id, ns.budget)
    if parked is None:
        # Not paused: nothing resumed and no cap changed (only a paused run takes a new --budget). Said, not
        # "0 parked chunks sent again" with exit 0.
        now = clients.runs.status(ns.run_id)
        assert now is not None
        what = "is not paused" if now.state in ACTIVE else "has ended"
        doc = {"run_id": ns.run_id, "state": now.state, "changed": False, "chunks_resent": 0,
               "budget_cents": now.budget_cents}
        if ns.json:
            print(json.dumps(doc))
        else:
            print(f"irlive: run {ns.run_id} {what} ({now.state}): nothing to resume"
                  + ("; a budget can be raised once it pauses" if ns.budget is not None else ""), file=sys.stderr)
        return EXIT_USAGE
    _send_parked(_app(settings), clients.runs, ns.run_id, parked)
    status = clients.runs.status(ns.run_id)
    assert status is not None
    doc = {"run_id": ns.run_id, "state": status.state, "changed": True, "chunks_resent": len(parked),
           "budget_cents": status.budget_cents}
    print(json.dumps(doc) if ns.json else f"run {ns.run_id}: {status.state}, {len(parked)} parked chunks sent again")
    return EXIT_OK


def _require_run(runs: Runs, run_id: str) -> None:
    if runs.get(run_id) is None:
        raise UnknownRun(run_id)


def _app(settings: Settings) -> Celery:
    from worker.app import make_app

    return make_app(settings)


def _send_parked(app: Celery, runs: Runs, run_id: str, parked: list[dict[str, Any]]) -> None:
    """Send a run's parked chunks again, then drop them from the parking list (a crash between re-sends them;
    a chunk delivered twice is recorded once)."""
    from worker.app import send_chunk

    for message in parked:
        send_chunk(app, Chunk.from_message(message))
    runs.unpark(run_id, len(parked))


def _cmd_pause(ns: argparse.Namespace) -> int:
    clients = _Clients(Settings.from_env())
    _require_run(clients.runs, ns.run_id)
    paused, state = clients.runs.owner_pause(ns.run_id)
    doc = {"run_id": ns.run_id, "state": state, "changed": paused}
    print(json.dumps(doc) if ns.json else f"run {ns.run_id}: {state}" + ("" if paused else " (nothing to pause)"))
    return EXIT_OK if paused or state in ("paused", "paused_budget") else EXIT_USAGE


def _cmd_cancel(ns: argparse.Namespace) -> int:
    settings = Settings.from_env()
    clients = _Clients(settings)
    _require_run(clients.runs, ns.run_id)
    from worker.app import send_finalize

    cancelled, state, parked = clients.runs.cancel(ns.run_id)
    app = _app(settings)
    # Parked chunks wind down like the others: sent again, recorded not_judged, then the run finalises.
    _send_parked(app, clients.runs, ns.run_id, parked)
    status = clients.runs.status(ns.run_id)
    assert status is not None
    if cancelled and status.pending == 0:
        send_finalize(app, ns.run_id)
    doc = {"run_id": ns.run_id, "state": state, "changed": cancelled, "chunks_resent": len(parked)}
    print(json.dumps(doc) if ns.json else f"run {ns.run_id}: {state}" + ("" if cancelled else " (already ended)"))
    if ns.wait and cancelled:
        final = follow(clients.runs, ns.run_id)
        # Cancelled is what was asked for: success here (5 is for a followed run someone else cancelled).
        return EXIT_OK if final.state == "cancelled" else _run_exit(final)
    return EXIT_OK if cancelled or state == "cancelled" else EXIT_USAGE


def _recovery(clients: _Clients) -> Recovery:
    return Recovery(clients.store, clients.keys, clients.runs)


def _cmd_reconcile(ns: argparse.Namespace) -> int:
    settings = Settings.from_env()
    clients = _Clients(settings)
    from worker.app import send_chunk, send_finalize

    lost = _recovery(clients).orphans(ns.run_id)
    app = _app(settings)
    for chunk in lost:
        send_chunk(app, chunk)
    status = clients.runs.status(ns.run_id)
    assert status is not None
    finalize = status.pending == 0 and not status.finalised and status.state not in ("paused", "paused_budget")
    if finalize:
        send_finalize(app, ns.run_id)
    result = Reconciled(ns.run_id, [c.seq for c in lost], finalize)
    print(json.dumps(result.as_dict()) if ns.json else
          f"run {ns.run_id}: {len(lost)} chunks enqueued again" + ("; finalisation enqueued" if finalize else ""))
    return EXIT_OK


def _cmd_dlq(ns: argparse.Namespace) -> int:
    clients = _Clients(Settings.from_env())
    entries = _recovery(clients).dead_letters()
    if ns.json:
        print(json.dumps(entries))
    elif not entries:
        print("no dead-lettered chunks")
    for e in [] if ns.json else entries:
        print(f"{e['run_id']} chunk {e['seq']}: {e['images']} images, {e['deliveries']} deliveries, "
              f"{e['at']}: {e['last_error']}")
    return EXIT_OK


def _cmd_redrive(ns: argparse.Namespace) -> int:
    settings = Settings.from_env()
    clients = _Clients(settings)
    chunks = _recovery(clients).reopen_failed(ns.run_id, include_rejected=ns.include_rejected,
                                              storage=clients.storage())
    from worker.app import send_chunk

    app = _app(settings)
    for chunk in chunks:
        send_chunk(app, chunk)
    doc = {"run_id": ns.run_id, "chunks_redriven": [c.seq for c in chunks]}
    print(json.dumps(doc) if ns.json else f"run {ns.run_id}: {len(chunks)} chunks sent to be judged again")
    return EXIT_OK


def _cmd_listen(ns: argparse.Namespace) -> int:
    import threading

    from producer.listen import Listener
    from worker.flow.intake import Intake
    from worker.ops import logs
    from worker.seams.sqs import EventQueue

    settings = Settings.from_env()
    logs.configure(settings.log_format, logging.INFO)
    clients = _Clients(settings)
    output = S3Location.parse(ns.output, "--output") if ns.output else settings.require_output()
    if not 1 <= ns.wait <= 20:
        raise ConfigError("--wait must be 1 to 20 seconds (SQS long polling)")
    name = ns.queue.removeprefix("sqs://")
    if not name:
        raise ConfigError("give the queue: sqs://QUEUE-NAME or its URL")
    clients.require_durable_redis()
    queue = EventQueue(name, endpoint_url=settings.sqs_endpoint_url or settings.s3_endpoint_url,
                       region=settings.s3_region)
    stop = threading.Event()
    # SIGTERM finishes the messages in hand (buffered, deleted), then stops.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    listener = Listener(queue, Intake(clients.store, clients.keys, settings), _app(settings),
                        source=f"sqs://{name}", output=output, suffixes=parse_suffixes(ns.suffix),
                        buckets=settings.event_buckets, json_lines=ns.json)
    print(f"irlive listen: {queue.url} -> {output} (events queue; Ctrl-C or SIGTERM to stop)", file=sys.stderr)
    if settings.metrics_port:
        from dataclasses import asdict

        from worker.ops.metrics import CountsCollector, FleetCollector, serve

        serve(settings.metrics_port, None, FleetCollector(clients.store, clients.keys, settings.daily_budget_cents,
                                                           settings.pool_listing),
              CountsCollector("irlive_listener_events", "What the listener did with the S3 events it received",
                              lambda: asdict(listener.stats)))
    stats = listener.run(stop, wait_s=ns.wait)
    print(f"\nirlive listen: stopped; {stats.line()}", file=sys.stderr)
    return EXIT_OK


def _cmd_reindex(ns: argparse.Namespace) -> int:
    from producer.reindex import reindex

    settings = Settings.from_env()
    clients = _Clients(settings)
    output = S3Location.parse(ns.output, "output") if ns.output else settings.require_output()
    result = reindex(clients.storage(), clients.claims, output)
    print(json.dumps(result.as_dict()) if ns.json else
          f"{result.manifests} chunk manifests read under {output}: {result.judged} judged images, "
          f"{result.restored} put back into the done-set (the rest were there)")
    return EXIT_OK


def _cap_source(workers: list[dict[str, Any]], caps: set[int | None], shell_cents: int | None) -> str:
    """Where the daily cap wallet prints comes from, and what disagrees with it."""
    def show(cents: int | None) -> str:
        return f"${usd(cents)}" if cents is not None else "none"

    if not workers:
        return ", from this shell's IRLIVE_DAILY_BUDGET_USD (no worker has said what it enforces)"
    if len(caps) > 1:
        each = ", ".join(f"{w['worker']}: {show(w.get('daily_budget_cents'))}" for w in workers)
        return f" from this shell; the workers DISAGREE ({each}): restart them with one IRLIVE_DAILY_BUDGET_USD"
    said = f", enforced by the {len(workers)} worker(s) that said so at start"
    if shell_cents != next(iter(caps)):
        said += f" (this shell's IRLIVE_DAILY_BUDGET_USD says {show(shell_cents)}: the workers' is what applies)"
    return said


def _cmd_wallet(ns: argparse.Namespace) -> int:
    from worker.ops import fleet
    from worker.ops.runtime import build_deps

    settings = Settings.from_env()
    deps = build_deps(settings)
    # Which Redis holds this ledger matters most when acting on it: say it, and whether it was chosen.
    chosen = "IRLIVE_REDIS_URL" if os.environ.get("IRLIVE_REDIS_URL") else "the default: IRLIVE_REDIS_URL is not set"
    where = f"{deps.store.where} ({chosen}), key prefix {settings.key_prefix!r}"
    if ns.reconcile and not ns.json:
        print(f"reconciling the ledger in Redis at {where}", file=sys.stderr)
    reconciled = deps.ledger.sweep(everything=ns.all) if ns.reconcile else None
    released = deps.ledger.release_held() if ns.release_held else None
    other_pools = deps.ledger.other_pools()
    totals = deps.ledger.totals(other_pools)
    # The caps the running workers enforce (each wrote its own at start), not this shell's environment.
    workers = fleet.enforced(deps.store, Keys(settings.key_prefix))
    fleet_caps = {w.get("daily_budget_cents") for w in workers}
    cap_cents = next(iter(fleet_caps)) if len(fleet_caps) == 1 else settings.daily_budget_cents
    over = max(0, totals["spent_today_cents"] - cap_cents) if cap_cents is not None else 0
    doc: dict[str, Any] = {"totals": totals, "reconciled_now": reconciled, "released_now": released, "redis": where,
                           "other_pools": other_pools,
                           "daily_budget_cents": cap_cents, "daily_cap_crossed_by_cents": over,
                           "daily_budget_source": "workers" if len(fleet_caps) == 1 else "this shell",
                           "workers": workers}
    if settings.payment_method == "x402":
        # The payer's address (public), never its key; what is committed today is what was signed and not
        # released (a signature the seller did not settle gives its commitment back).
        payer = getattr(deps.method, "signer", None)
        doc["x402"] = {"payer": getattr(payer, "address", None), "network": settings.x402_network,
                       "signed_today_cents": totals["spent_today_cents"], "unsettled": totals.get("unsettled", 0)}
    if ns.json:
        print(json.dumps(doc, sort_keys=True))
        return EXIT_OK
    last = totals.get("last_reconciled_ms")
    when = datetime.fromtimestamp(last / 1000, UTC).isoformat(timespec="seconds") if last else "never"
    cap = f"${usd(cap_cents)}" if cap_cents is not None else "none"
    if over:
        cap += f" (CROSSED by ${usd(over)}: the seller charged more than it quoted)"
    cap += _cap_source(workers, fleet_caps, settings.daily_budget_cents)
    print("\n".join([
        f"redis           {where}",
        f"pool            {totals['pool']} prepaid tokens waiting, {totals['in_flight']} reserved or in flight",
        *([f"other listings  {n} tokens kept for {listing} (spent only where IRLIVE_SERVICE_ID and IRLIVE_TOOL_PATH "
           "name that listing again)" for listing, n in sorted(other_pools.items())]),
        f"held            {totals['held']} tokens bought above the price cap, never spent until released "
        "(--release-held)" + (f"; {released} released now" if released is not None else ""),
        f"bought          {totals.get('bought', 0)} tokens, ${usd(totals.get('bought_cents', 0))}",
        f"spent           {totals.get('spent', 0)} calls, ${usd(totals.get('spent_cents', 0))}",
        f"void            {totals.get('void', 0)} refused or expired, "
        f"{totals.get('expired_in_pool', 0)} expired in the pool",
        f"unknown         {totals.get('unknown_purchases', 0)} purchases whose answer was lost (counted as bought)",
        f"answers lost    {totals.get('answers_lost', 0)} calls paid whose answer never reached the ledger",
        f"reconciled      {totals.get('reconciled_unspent', 0)} unspent returned, "
        f"{totals.get('reconciled_spent', 0)} found spent; last {when}",
        f"today           ${usd(totals['spent_today_cents'])} bought of daily cap {cap}",
        *([f"x402            payer {doc['x402']['payer']} on {settings.x402_network}: "
           f"${usd(totals['spent_today_cents'])} signed today; {doc['x402']['unsettled']} signatures the seller "
           "did not settle (released, not charged)"] if "x402" in doc else []),
    ]))
    return EXIT_OK


def _cmd_status(ns: argparse.Namespace) -> int:
    clients = _Clients(Settings.from_env())
    _say_if_writes_are_held(clients.store)
    samples = Samples()
    status: RunStatus | None
    if ns.wait:
        from producer.progress import display_for

        status = follow(clients.runs, ns.run_id, timeout_s=ns.timeout, samples=samples, display=display_for(ns.json))
    else:
        status = clients.runs.status(ns.run_id)
    if status is None:
        raise UnknownRun(ns.run_id)
    how = pace(status, samples)
    if how.rate_per_min is None:
        # Not followed long enough for a recent rate: the average since the run was created.
        how = pace(status, status_samples(status, datetime.now(UTC).timestamp()), window_s=None, basis="average")
    doc: dict[str, Any] = {**status_dict(status, how), "report": _report_link(clients.runs, ns.run_id)}
    print(json.dumps(doc) if ns.json else render(status, how))
    if not ns.json and doc["report"]:
        print(f"report: {doc['report']}")
    return _run_exit(status) if ns.wait or status.state == "failed" else EXIT_OK


def _say_if_writes_are_held(store: Store) -> None:
    """With Sentinel and wait_replicas, a master with too few replicas online holds every write: runs stand
    still, and nothing else would say why."""
    replicas = store.replicas_online()
    if replicas is not None and replicas[0] < replicas[1]:
        print(f"irlive: warning: Redis at {store.where} has {replicas[0]} replica(s) online and every write waits "
              f"for {replicas[1]} (wait_replicas in IRLIVE_REDIS_URL): writes are held and runs stand still until "
              "a replica is back (docs/OPERATIONS.md, 'Redis high availability')", file=sys.stderr)


def _cmd_report(ns: argparse.Namespace) -> int:
    from producer.reports import build_report, report_uri, run_output

    settings = Settings.from_env()
    clients = _Clients(settings)
    fallback = S3Location.parse(ns.output, "--output") if ns.output else settings.output
    output = run_output(clients.runs, ns.run_id, fallback)
    page = build_report(clients.storage(), output, ns.run_id, live_below=settings.review_live_below,
                        thumbnails=ns.thumbnails)
    if ns.out == "-":
        sys.stdout.write(page)
        return EXIT_OK
    path = os.path.abspath(ns.out or f"irlive-report-{ns.run_id}.html")
    with open(path, "w", encoding="utf-8") as out:
        out.write(page)
    print(f"report: {path}  (the copy written at the run's end: {report_uri(output, ns.run_id)})")
    if ns.open:
        import webbrowser

        webbrowser.open(f"file://{path}")
    return EXIT_OK


def _cmd_export(ns: argparse.Namespace) -> int:
    from producer.reports import export, run_output
    from worker.report.publish import load_run

    settings = Settings.from_env()
    clients = _Clients(settings)
    fallback = S3Location.parse(ns.output, "--output") if ns.output else settings.output
    output = run_output(clients.runs, ns.run_id, fallback)
    if ns.format == "parquet" and ns.out == "-" and sys.stdout.isatty():
        raise ConfigError("parquet is binary: give --out FILE, or pipe it")
    body = export(load_run(clients.storage(), output, ns.run_id), ns.format, ns.verdict)
    if ns.out == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(body)
        sys.stdout.buffer.flush()
    else:
        with open(ns.out, "wb") as out:
            out.write(body)
    return EXIT_OK


def _cmd_runs(ns: argparse.Namespace) -> int:
    from producer.reports import RunQuery, find_runs, render_runs

    clients = _Clients(Settings.from_env())
    since = parse_time(ns.since, datetime.now(UTC)) if ns.since else None
    rows = find_runs(clients.store, clients.keys, RunQuery(tuple(ns.state), ns.source, tuple(ns.tag), since,
                                                           ns.limit))
    if ns.json:
        print(json.dumps({"schema_version": 1, "runs": [{k: v for k, v in r.items() if k != "created_ms"}
                                                          for r in rows]}))
    else:
        print(render_runs(rows))
    return EXIT_OK


def _report_link(runs: Runs, run_id: str) -> str | None:
    """Where the run's report.html is, once its finalisation wrote it (with the manifest)."""
    from producer.reports import report_uri

    run = runs.get(run_id)
    # `done` is set after the manifest (and the report before it) is written; other ends once finalised.
    if not run or not (run.get("finalised_at") or run.get("state") == "done") or not run.get("output"):
        return None
    return report_uri(S3Location.parse(str(run["output"]), "run output"), run_id)


def _cmd_smoke(ns: argparse.Namespace) -> int:
    from producer.smoke import render, smoke

    report = smoke(Settings.from_env(), S3Location.parse(ns.image, "image"))
    print(json.dumps(report, sort_keys=True) if ns.json else render(report))
    return EXIT_OK if "verdict" in report else EXIT_FAILED


def _cmd_config(ns: argparse.Namespace) -> int:
    from producer.config_cmd import inspect_settings

    report = inspect_settings(dict(os.environ), check_redis=not ns.no_redis)
    print(json.dumps(report.as_dict()) if ns.json else report.render())
    if report.missing_extra:
        return EXIT_USAGE
    return EXIT_OK if report.ok else EXIT_FAILED


# What `irlive demo` and `irlive sandbox` import beyond a plain install, by import name: pyproject's [demo]
# extra (moto's server needs flask and flask-cors; the sandbox sells through MCP and checks x402 signatures).
DEMO_MODULES = ("moto", "flask", "flask_cors", "PIL", "mcp", "eth_account")


def missing_demo_modules() -> list[str]:
    """The demo extra's modules that cannot be imported; found without importing them (moto is slow)."""
    import importlib.util

    missing = []
    for name in DEMO_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:
            found = False
        if not found:
            missing.append(name)
    return missing


def demo_extra_message(command: str, missing: list[str]) -> str:
    return (f"`irlive {command}` needs the demo extra ({', '.join(missing)} not installed): "
            "pip install 'irlive[demo]'  (from a clone: pip install '.[demo]')")


def _cmd_stack(ns: argparse.Namespace) -> int:
    missing = missing_demo_modules()
    if missing:
        raise ConfigError(demo_extra_message("stack", missing))
    import threading

    from producer.devstack import serve

    stop = threading.Event()
    # Ctrl-C or SIGTERM: stop waiting, then every process of the stack is stopped on the way out.
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return serve(ns.workers, ns.env_file, stop, lambda line: print(line, flush=True))


def _cmd_demo(ns: argparse.Namespace) -> int:
    missing = missing_demo_modules()
    if missing:
        raise ConfigError(demo_extra_message("demo", missing))
    from producer.demo import run_demo

    # The stack's processes live in their own sessions: turn SIGTERM into an exit that stops them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    missing_pay = missing_extra(ns.payment_method)
    if missing_pay:
        raise ConfigError(missing_pay)
    return run_demo(images=ns.images, workers=ns.workers, out_dir=ns.out_dir, json_out=ns.json,
                    payment_method=ns.payment_method)
