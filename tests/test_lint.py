"""The project's own lint configuration holds: ruff and mypy as pyproject.toml configures them.

The tools come with the test extra (``pip install -e '.[test]'``); where one is missing the
test skips and names it.  import-linter's layer contracts run in tests/test_layers.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    exe = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not os.path.exists(exe):
        pytest.skip(f"{name} is not installed (pip install -e '.[test]' installs it)")
    return exe


def test_ruff_is_clean_under_the_project_configuration():
    out = subprocess.run([_tool("ruff"), "check", "--no-cache", "--output-format", "concise", "."],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]


def test_mypy_is_clean_on_the_strict_core():
    out = subprocess.run([_tool("mypy"), "--no-incremental", "--cache-dir", os.devnull],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "Success: no issues found" in out.stdout


def test_the_configuration_really_applies(tmp_path):
    """A planted violation fails both tools: the configuration is read, not silently absent."""
    bad = tmp_path / "kvmharness_lint_probe.py"
    bad.write_text("import os\n\n\ndef f(x):\n    return x\n")
    ruff = subprocess.run([_tool("ruff"), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"),
                           str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert ruff.returncode == 1 and "F401" in ruff.stdout
    mypy = subprocess.run([_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--no-incremental",
                           "--cache-dir", os.devnull, str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert mypy.returncode == 1 and "no-untyped-def" in mypy.stdout
