"""The CI definition itself: actionlint over the GitHub workflow (GitHub Actions cannot
run here), the copy GitHub reads equals ci/'s, and .ci/run runs the README's test command."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "ci" / "workflows" / "ci.yml"
GITHUB_COPY = ROOT / ".github" / "workflows" / "ci.yml"


def test_github_reads_the_same_workflow_as_ci_holds():
    assert GITHUB_COPY.read_bytes() == WORKFLOW.read_bytes(), \
        "copy ci/workflows/ci.yml to .github/workflows/ci.yml"


def test_actionlint_accepts_the_workflow():
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint not installed (pip install -e '.[test]' installs it)")
    r = subprocess.run([exe, "-no-color", str(GITHUB_COPY)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_really_checks(tmp_path):
    exe = shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint not installed (pip install -e '.[test]' installs it)")
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs-on: [ubuntu-24.04", 1))
    r = subprocess.run([exe, "-no-color", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0


def test_ci_run_is_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", readme, re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if "pytest" in line]
    assert commands, "README has no test command"
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert commands[0] in ci_run.splitlines()
