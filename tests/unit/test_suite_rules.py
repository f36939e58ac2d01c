"""The suite's own rules: no tests collected fails, and under CI a skip fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def run_pytest(folder: Path, ci: bool) -> int:
    shutil.copy(CONFTEST, folder / "conftest.py")
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)]
    return subprocess.run(args, cwd=folder, env=env, capture_output=True, timeout=120).returncode


def test_no_tests_collected_is_a_failure(tmp_path: Path) -> None:
    assert run_pytest(tmp_path, ci=False) == 1


def test_skip_fails_only_under_ci(tmp_path: Path) -> None:
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\ndef test_needs_server():\n    pytest.skip('no server')\n"
    )
    assert run_pytest(tmp_path, ci=False) == 0
    assert run_pytest(tmp_path, ci=True) == 1
