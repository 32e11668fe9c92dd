"""The layout keeps its promises: pure modules import no I/O, the producer no worker machinery, money's keys
come from Keys, Lua lives in .lua files that say what they take and return."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "worker"
IO_LIBRARIES = ("boto3", "botocore", "httpx", "redis", "celery", "kombu")


def _loaded_after(imports: str, candidates: tuple[str, ...]) -> list[str]:
    code = f"import sys; import {imports}; print(' '.join(m for m in {candidates!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return done.stdout.split()


def test_pure_modules_import_no_io_library() -> None:
    pure = ("worker.judge.verdicts, worker.judge.manifest, worker.judge.imageinfo, worker.messages, "
            "worker.flow.states, producer.chunking, producer.estimate")
    assert _loaded_after(pure, IO_LIBRARIES) == []


def test_the_producer_does_not_load_the_worker_machinery() -> None:
    machinery = ("httpx", "worker.money.ledger", "worker.money.purchaser", "worker.ops.watchdog",
                 "worker.flow.pipeline", "worker.flow.tasks", "worker.seams.marketplace")
    assert _loaded_after("producer.cli, producer.scan, producer.status", machinery) == []


def test_importing_the_worker_package_reads_no_setting_and_builds_nothing() -> None:
    # `celery -A worker` finds the app lazily: importing must not read IRLIVE_* or open connections.
    assert _loaded_after("worker", ("celery", "redis", "worker.app")) == []


def _python_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_lua_outside_lua_files() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in _python_files(WORKER)
                 if re.search(r"redis\.call\(|register_script\(", p.read_text())
                 and p.relative_to(ROOT).as_posix() != "worker/seams/store.py"]
    assert offenders == [], "Lua (or its loading) belongs in .lua files loaded by worker/seams/store.py"


def test_money_builds_no_key_of_its_own() -> None:
    # A key is a string with the prefix's separator in it; in money only Keys' methods may make one.
    offenders = []
    for path in _python_files(WORKER / "money"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.JoinedStr) and any(
                    isinstance(v, ast.Constant) and isinstance(v.value, str) and ":" in v.value and " " not in v.value
                    for v in node.values):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                    r"[a-z]+:[a-z:-]+:?", node.value):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], f"keys built outside worker/keys.py: {offenders}"


def test_no_module_outside_the_store_seam_catches_redis_errors() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in _python_files(WORKER)
                 if re.search(r"redis\.exceptions|redis_errors|RedisError", p.read_text())
                 and p.relative_to(ROOT).as_posix() != "worker/seams/store.py"]
    assert offenders == []


LUA_FILES = sorted(WORKER.rglob("scripts/*.lua"))


@pytest.mark.parametrize("path", LUA_FILES, ids=lambda p: p.name)
def test_every_lua_script_states_its_keys_argv_and_return(path: Path) -> None:
    header = [line for line in path.read_text().splitlines() if line.startswith("--")]
    text = "\n".join(header)
    assert header and header[0].startswith(f"-- {path.name}:"), "first line names the script and what it does"
    assert "KEYS[1]" in text and "Returns" in text
    body = path.read_text()
    if re.search(r"ARGV\[\d", body):
        assert "ARGV[" in text, "every ARGV the script reads is described in its header"


def test_every_module_says_what_it_owns_in_a_docstring() -> None:
    missing = [str(p.relative_to(ROOT)) for root in ("worker", "producer", "sandbox")
               for p in _python_files(ROOT / root) if not ast.get_docstring(ast.parse(p.read_text()))]
    assert missing == []
