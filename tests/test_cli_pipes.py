"""`irlive … | head`: a reader that leaves early ends the command quietly, with no traceback and nothing undone."""

from __future__ import annotations

import os
import subprocess

from sandbox.stack import Stack
from tests.conftest import IRLIVE_BIN
from tests.e2e import IN_BUCKET


def test_a_dry_run_piped_into_a_reader_that_left_ends_quietly(clean_stack: Stack) -> None:
    s3 = clean_stack.s3_client()
    for i in range(3):
        s3.put_object(Bucket=IN_BUCKET, Key=f"piped/img_{i}.png", Body=b"\x89PNG\r\n\x1a\n")
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -n 0`: the reader is gone before the first line
    try:
        done = subprocess.run([str(IRLIVE_BIN), "scan", f"s3://{IN_BUCKET}/piped", "--dry-run"],
                              env={**os.environ, **clean_stack.env}, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
    assert done.returncode == 141, done.stderr
    assert clean_stack.redis_client().keys("irlive:run:*") == [], "a dry run creates nothing, piped or not"
