"""`irlive stack`: a local stack kept up to try the commands by hand (Redis, the S3 stand-in, the sandbox
marketplace and workers), with the `export` lines that point a shell at it; Ctrl-C stops everything."""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from sandbox.stack import Stack

IN_BUCKET, OUT_BUCKET = "irlive-captures", "irlive-results"


def exports(env: Mapping[str, str]) -> str:
    """`export NAME=value` lines, quoted for a POSIX shell, sorted."""
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items()))


def serve(workers: int, env_file: str | None, stop: threading.Event,
          say: Callable[[str], None] = print) -> int:
    """Start the stack, print (and write) its environment, wait for `stop`, then stop every process."""
    output = f"s3://{OUT_BUCKET}/irlive"
    with Stack(workers=workers, settings_env={"IRLIVE_OUTPUT": output}) as stack:
        s3 = stack.s3_client()
        for bucket in (IN_BUCKET, OUT_BUCKET):
            s3.create_bucket(Bucket=bucket)
        lines = exports(stack.env)
        if env_file:
            Path(env_file).write_text(lines + "\n")
        say("# irlive stack: Redis, S3 (moto_server), the sandbox marketplace and "
            f"{workers} worker(s); logs in {stack.workdir}")
        say(f"# buckets: s3://{IN_BUCKET} for captures, {output} for results. In another shell:")
        say(lines)
        if env_file:
            say(f"# (also in {env_file}: `. {shlex.quote(env_file)}`)")
        say(f"# then e.g.: aws --endpoint-url \"$IRLIVE_S3_ENDPOINT_URL\" s3 cp img.png s3://{IN_BUCKET}/cam1/ ; "
            f"irlive scan s3://{IN_BUCKET}/cam1 --wait")
        say("# Ctrl-C stops everything.")
        stop.wait()
        say("# stopping")
    return 0
