"""The CI definition itself: actionlint over the GitHub workflow (GitHub Actions cannot
run here), the copy GitHub reads equals ci/'s, and .ci/run runs the README's test command."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "ci" / "workflows" / "ci.yml"
GITHUB_COPY = ROOT / ".github" / "workflows" / "ci.yml"


def actionlint() -> str:
    """The venv's actionlint (beside this interpreter: `.venv/bin` need not be on PATH),
    else one on PATH; skips when neither exists."""
    beside = Path(sys.executable).parent / "actionlint"
    exe = str(beside) if beside.is_file() else shutil.which("actionlint")
    if exe is None:
        pytest.skip("actionlint not installed (pip install -e '.[test]' installs it)")
    return exe


def test_github_reads_the_same_workflow_as_ci_holds():
    assert GITHUB_COPY.read_bytes() == WORKFLOW.read_bytes(), \
        "copy ci/workflows/ci.yml to .github/workflows/ci.yml"


def test_actionlint_accepts_the_workflow():
    exe = actionlint()
    r = subprocess.run([exe, "-no-color", str(GITHUB_COPY)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_actionlint_really_checks(tmp_path):
    exe = actionlint()
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(WORKFLOW.read_text().replace("runs-on: ubuntu-24.04", "runs-on: [ubuntu-24.04", 1))
    r = subprocess.run([exe, "-no-color", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0


def readme_command(word: str) -> str:
    """The first line of a shell block in the README's "Set up" section containing word."""
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", setup, re.S)
    commands = [line.strip() for b in blocks for line in b.splitlines() if word in line]
    assert commands, f"README's Set up has no command with {word!r}"
    return commands[0]


def test_ci_run_is_the_readme_test_command():
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert readme_command("pytest") in ci_run.splitlines()


def test_github_workflow_runs_the_readme_test_command():
    runs = [line.strip().removeprefix("run:").strip() for line in WORKFLOW.read_text().splitlines()
            if line.strip().startswith("run:")]
    assert readme_command("pytest") in runs


def test_readme_commands_install_nothing_outside_the_venv():
    """PEP 668: the set-up scripts never pip-install into the system interpreter; pip
    runs only as .venv/bin/pip in the README's commands."""
    for name in ("install-deps.sh", "apt-missing.sh", "rig/install-test-deps.sh"):
        text = (ROOT / "ci" / name).read_text()
        code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
        assert not re.search(r"\bpip3?\b.*\binstall\b", code), name
    for word in ("kvmharness suite", "pytest"):
        cmd = readme_command(word)
        assert re.findall(r"\S*pip3?(?= install)", cmd) == [".venv/bin/pip"], cmd
