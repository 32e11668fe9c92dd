"""What a redis-py release costs irlive's processes: import time and client CPU per command, for each interpreter
given (each a venv holding the release to compare), against the first one, measured in the same run on one
private redis-server. Every CLI call and worker start pays the import; every ledger, limiter and lease step pays
the per-command CPU.

    python -m bench.redis_client /tmp/rv7/bin/python /tmp/rv8/bin/python [--ops 5000]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from sandbox import procs

# Run by each interpreter: it prints one JSON line of its figures (best of three imports, CPU per op).
_CHILD = r"""
import json, subprocess, sys, time
port, ops = int(sys.argv[1]), int(sys.argv[2])
imports = []
for _ in range(3):
    out = subprocess.run([sys.executable, "-c",
                          "import time; t = time.process_time(); import redis; print(time.process_time() - t)"],
                         capture_output=True, text=True, check=True)
    imports.append(float(out.stdout))
import redis
r = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
r.set("k", "v")
sha = r.script_load("return redis.call('get', KEYS[1])")
figures = {"version": redis.__version__, "import_s": min(imports)}
for name, op in (("get", lambda: r.get("k")), ("evalsha", lambda: r.evalsha(sha, 1, "k")),
                 ("pipeline_2", lambda: r.pipeline().get("k").hget("h", "f").execute())):
    for _ in range(200):
        op()
    t = time.process_time()
    for _ in range(ops):
        op()
    figures[name + "_us"] = 1e6 * (time.process_time() - t) / ops
print(json.dumps(figures))
"""


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pythons", nargs="+", help="interpreters, each with the redis-py release to measure")
    parser.add_argument("--ops", type=int, default=5000, help="commands timed per kind (default 5000)")
    ns = parser.parse_args(argv)
    port = procs.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = procs.spawn([procs.find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], Path(tmp) / "redis.log")
        try:
            procs.wait_until(lambda: _listening(port), 30, "redis-server", log=Path(tmp) / "redis.log", proc=server)
            rows = [json.loads(subprocess.run([python, "-c", _CHILD, str(port), str(ns.ops)], capture_output=True,
                                              text=True, check=True).stdout) for python in ns.pythons]
        finally:
            procs.kill_group(server)
    base = rows[0]
    print(f"{'redis-py':10} {'import s':>9} {'get µs':>8} {'evalsha µs':>11} {'pipeline µs':>12}   ratio to "
          f"{base['version']} (import / get / evalsha / pipeline)")
    for row in rows:
        ratios = " / ".join(f"{row[k] / base[k]:.2f}" for k in ("import_s", "get_us", "evalsha_us", "pipeline_2_us"))
        print(f"{row['version']:10} {row['import_s']:9.3f} {row['get_us']:8.1f} {row['evalsha_us']:11.1f} "
              f"{row['pipeline_2_us']:12.1f}   {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
