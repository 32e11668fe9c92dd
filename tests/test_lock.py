"""The lock holds: the venv the tests run in has exactly what uv.lock pins, the container image installs from the
same lock with the same uv, and dev.sh, .ci/run and the README install nothing else."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
DEV_SH = (ROOT / "dev.sh").read_text()
DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()
PROJECT = "irlive"


def _dev_sh_value(name: str) -> str:
    found = re.search(rf"^{name}=([^\s#]+)", DEV_SH, re.M)
    assert found, f"dev.sh sets no {name}="
    return found.group(1).strip("'\"")


def _by_name() -> dict[str, list[dict[str, Any]]]:
    by_name: dict[str, list[dict[str, Any]]] = {}
    for pkg in LOCK["package"]:
        by_name.setdefault(pkg["name"], []).append(pkg)
    return by_name


PACKAGES = _by_name()


def _applies(marker: str | None, env: dict[str, str]) -> bool:
    return marker is None or Marker(marker).evaluate(env)


def expected_here(extras: tuple[str, ...]) -> dict[str, str]:
    """What `uv sync` installs from the lock on this interpreter and platform: name -> version (irlive itself too)."""
    env: dict[str, str] = dict(default_environment())
    wanted: dict[str, str] = {}
    todo: list[tuple[str, str | None, tuple[str, ...]]] = [(PROJECT, None, extras)]
    seen: set[tuple[str, str, tuple[str, ...]]] = set()
    while todo:
        name, version, with_extras = todo.pop()
        candidates = [p for p in PACKAGES[name] if version is None or p["version"] == version]
        assert len(candidates) == 1, f"the lock names {name} {version or ''} {len(candidates)} times"
        pkg = candidates[0]
        key = (name, pkg["version"], with_extras)
        if key in seen:
            continue
        seen.add(key)
        wanted[name] = pkg["version"]
        deps = list(pkg.get("dependencies", []))
        for extra in with_extras:
            deps += pkg.get("optional-dependencies", {}).get(extra, [])
        for dep in deps:
            if _applies(dep.get("marker"), env):
                todo.append((dep["name"], dep.get("version"), tuple(dep.get("extra", ()))))
    return wanted


def installed_here() -> dict[str, str]:
    return {canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}


def test_the_lock_is_the_one_pyproject_asks_for() -> None:
    """Every range in pyproject.toml holds for the version the lock pins: the lock was made from this pyproject."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {name: pkgs[0]["version"] for name, pkgs in PACKAGES.items() if len(pkgs) == 1}
    requirements = list(project["dependencies"])
    for reqs in project["optional-dependencies"].values():
        requirements += reqs
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in PACKAGES, f"{text!r} is not in uv.lock: run ./dev.sh lock"
        if name in pins:
            assert SpecifierSet(str(req.specifier)).contains(Version(pins[name]), prereleases=True), (
                f"uv.lock pins {name} {pins[name]}, outside {text!r}: run ./dev.sh lock")


@pytest.mark.skipif(os.environ.get("IRLIVE_UNLOCKED") == "1",
                    reason="./dev.sh test --latest runs in a venv of the newest releases on purpose")
def test_the_venv_holds_exactly_what_the_lock_pins() -> None:
    """A release published tomorrow changes nothing here until someone runs `./dev.sh lock`."""
    extras = tuple(_dev_sh_value("EXTRAS").split(","))
    expected, installed = expected_here(extras), installed_here()
    assert expected.pop(PROJECT) == installed.pop(PROJECT)
    differ = {n: (installed.get(n), v) for n, v in expected.items() if installed.get(n) != v}
    extra = {n: v for n, v in installed.items() if n not in expected}
    assert not differ, f"installed ≠ uv.lock (installed, locked): {differ}; run ./dev.sh setup"
    assert not extra, f"installed but not in the lock for extras {extras}: {extra}"
    assert len(expected) > 50, "the walk of the lock found the dependencies"


def test_the_walk_of_the_lock_follows_extras_and_markers() -> None:
    base, dev = expected_here(()), expected_here(("dev",))
    assert {"celery", "kombu", "redis", "boto3", "httpx"} <= set(base)
    assert "pytest" not in base and "pytest" in dev
    assert "pywin32" not in dev or sys.platform == "win32"  # sys_platform == 'win32' markers are honoured


def _dockerfile_runs() -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line[len("RUN "):] for line in joined.splitlines() if line.startswith("RUN ")]


def test_the_image_installs_from_the_lock_with_the_uv_dev_sh_uses() -> None:
    uv_image = re.search(r"^COPY --from=ghcr\.io/astral-sh/uv:(\S+) /uv ", DOCKERFILE, re.M)
    assert uv_image, "the Dockerfile takes uv from its official image"
    assert uv_image.group(1) == _dev_sh_value("UV_VERSION"), "the image and dev.sh use one uv version"
    assert re.search(r"^COPY [^\n]*\buv\.lock\b", DOCKERFILE, re.M), "the lock goes into the build"
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "!uv.lock" in ignore, "the build context keeps the lock"
    base = re.search(r"^FROM python:(\d+\.\d+)", DOCKERFILE, re.M)
    assert base and SpecifierSet(LOCK["requires-python"]).contains(Version(base.group(1))), (
        "the image's Python is one the lock was resolved for")
    runs = _dockerfile_runs()
    syncs = [r for r in runs if re.search(r"\buv sync\b", r)]
    assert syncs and all("--locked" in r.split() for r in syncs), "every uv sync in the image is --locked"
    for run in runs:
        words = run.replace("&&", " ").split()
        assert not ({"pip", "pip3"} & set(words) and "install" in words), f"an install outside the lock: {run}"
        assert "uv pip" not in run and "uv add" not in run, f"an install outside the lock: {run}"


@pytest.mark.skipif(not os.environ.get("IRLIVE_UV"), reason="needs the uv dev.sh runs (IRLIVE_UV)")
def test_the_images_sync_command_is_satisfiable_from_the_lock(tmp_path: Path) -> None:
    """The image's own uv sync line, dry-run against this checkout's lock: a flag or extra the lock lacks fails."""
    uv = os.environ["IRLIVE_UV"]
    version = subprocess.run([uv, "--version"], capture_output=True, text=True, check=True, timeout=30).stdout
    assert version.split()[1] == _dev_sh_value("UV_VERSION"), "dev.sh ran the uv it pins"
    check = subprocess.run([uv, "lock", "--check", "--offline"], cwd=ROOT, capture_output=True, text=True,
                           check=False, timeout=120)
    assert check.returncode == 0, f"uv.lock is out of date with pyproject.toml: {check.stderr}"
    for run in _dockerfile_runs():
        for part in run.split("&&"):
            words = shlex.split(part)
            if words[:2] != ["uv", "sync"]:
                continue
            if "--python" in words:  # the image's interpreter path: this machine's instead
                at = words.index("--python")
                del words[at:at + 2]
            env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(tmp_path / "venv"), "UV_PYTHON_DOWNLOADS": "never"}
            dry = subprocess.run([uv, *words[1:], "--dry-run", "--offline", "--python", sys.executable], cwd=ROOT,
                                 env=env, capture_output=True, text=True, check=False, timeout=120)
            assert dry.returncode == 0, f"{part.strip()!r} fails against uv.lock: {dry.stderr}"


def test_dev_sh_ci_and_readme_install_only_from_the_lock() -> None:
    assert "uv sync --locked" in DEV_SH.replace('"$UV"', "uv")
    for found in re.finditer(r'(?<!"\$UV" )\bpip install\b', DEV_SH):  # uv's own pip installs only into --latest's venv
        assert '"uv==$UV_VERSION"' in DEV_SH[found.end():found.end() + 200], "dev.sh pip-installs nothing but uv"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./dev.sh test" in ci and "pip install" not in ci
    readme = (ROOT / "README.md").read_text()
    assert "./dev.sh test" in readme and "uv sync --locked" in readme
    assert not re.search(r"^pip install \.", readme, re.M), "the README's production install takes the lock"
