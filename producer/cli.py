"""The `irlive` command line: scan, status, sandbox, demo; settings are read here, once."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

import redis

from producer.filters import parse_suffixes
from producer.scan import ScanRequest, ScanResult, scan
from producer.status import follow, render, status_dict
from worker.celeryapp import create_app
from worker.config import S3Location, Settings
from worker.errors import ConfigError, IrliveError
from worker.keys import Keys
from worker.redact import redact
from worker.runs import Runs
from worker.storage import Storage

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["sandbox"]:
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
    except IrliveError as exc:
        print(f"irlive: error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except redis.exceptions.ConnectionError as exc:
        print(f"irlive: error: cannot reach Redis (IRLIVE_REDIS_URL): {redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("irlive: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="irlive", description="Judge infrared face captures in S3 for liveness.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("scan", help="list a bucket prefix and enqueue every image for judging")
    p.add_argument("source", help="s3://bucket/prefix of the captures")
    p.add_argument("--suffix", default=None, help="comma list of suffixes (default .png,.jpg,.jpeg,.bmp,.gif,.webp)")
    p.add_argument("--limit", type=_positive_int, default=None, help="judge at most N images")
    p.add_argument("--output", default=None, help="s3://bucket/prefix for manifests (default IRLIVE_OUTPUT)")
    p.add_argument("--force", action="store_true", help="judge again images already judged")
    p.add_argument("--wait", action="store_true", help="follow the run to its end")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=_cmd_scan)

    p = sub.add_parser("status", help="show a run's progress")
    p.add_argument("run_id")
    p.add_argument("--json", action="store_true")
    p.add_argument("--wait", action="store_true", help="follow the run to its end with a progress bar")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.set_defaults(handler=_cmd_status)

    p = sub.add_parser("demo", help="run the whole pipeline on a local stack with synthetic captures")
    p.add_argument("--images", type=_positive_int, default=200)
    p.add_argument("--workers", type=_positive_int, default=2)
    p.add_argument("--out-dir", default="irlive-demo-output", help="where to copy the manifests")
    p.set_defaults(handler=_cmd_demo)

    sub.add_parser("sandbox", help="serve the local stand-in marketplace (see `irlive sandbox --help`)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


class _Clients:
    """The producer's clients, built from settings read once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.runs = Runs(self.redis, Keys(settings.key_prefix))

    def storage(self) -> Storage:
        return Storage(self.settings.s3_endpoint_url, self.settings.s3_region)


def _cmd_scan(ns: argparse.Namespace) -> int:
    settings = Settings.from_env()
    clients = _Clients(settings)
    output = S3Location.parse(ns.output, "--output") if ns.output else settings.require_output()
    request = ScanRequest(S3Location.parse(ns.source, "source"), parse_suffixes(ns.suffix), ns.limit, ns.force)
    app = create_app(settings)

    def progress(r: ScanResult) -> None:
        if not ns.json and r.chunks and r.chunks % 100 == 0:
            print(f"listed {r.found} images, enqueued {r.enqueued} in {r.chunks} chunks", file=sys.stderr)

    result = scan(settings, clients.storage(), clients.runs, app, request, output, progress)
    assert result.run_id is not None
    doc = result.as_dict()
    if ns.json:
        print(json.dumps(doc))
    else:
        print(result.run_id)
        print(f"found {result.found} images: {result.enqueued} enqueued in {result.chunks} chunks, "
              f"{result.skipped} already judged", file=sys.stderr)
    if ns.wait:
        final = follow(clients.runs, result.run_id)
        return EXIT_OK if final.state == "done" else EXIT_FAILED
    return EXIT_OK


def _cmd_status(ns: argparse.Namespace) -> int:
    clients = _Clients(Settings.from_env())
    if ns.wait:
        try:
            status = follow(clients.runs, ns.run_id, timeout_s=ns.timeout)
        except LookupError:
            status = None
    else:
        status = clients.runs.status(ns.run_id)
    if status is None:
        print(f"irlive: error: no run {ns.run_id!r} in {redact(clients.settings.redis_url)}", file=sys.stderr)
        return EXIT_USAGE
    doc: dict[str, Any] = status_dict(status)
    print(json.dumps(doc) if ns.json else render(status))
    return EXIT_FAILED if status.state == "failed" else EXIT_OK


def _cmd_demo(ns: argparse.Namespace) -> int:
    from producer.demo import run_demo

    return run_demo(images=ns.images, workers=ns.workers, out_dir=ns.out_dir)
