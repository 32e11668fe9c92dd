"""`irlive demo` and `irlive sandbox` after a plain `pip install .`: the missing [demo] extra is named, exit 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Runs the CLI in a fresh interpreter where `moto` (and its submodules) cannot be imported, as after a plain
# `pip install .`: a meta path finder ahead of the others refuses it.
BLOCKED = textwrap.dedent("""
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name == "moto" or name.startswith("moto."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    from producer.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("args", [["demo"], ["demo", "--json", "--images", "5"], ["sandbox", "--port", "0"]])
def test_missing_moto_says_what_to_install_and_exits_2(args: list[str], tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", BLOCKED, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install 'irlive[demo]'" in done.stderr and "moto" in done.stderr
    assert "Traceback" not in done.stderr
    # Nothing was started or written before the check.
    assert list(tmp_path.iterdir()) == []


def test_the_check_passes_with_the_extra_installed() -> None:
    from producer.cli import missing_demo_modules

    assert missing_demo_modules() == []
