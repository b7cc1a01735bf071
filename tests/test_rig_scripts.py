"""The SVM rig in a box scripts (ci/rig/), the parts that need no QEMU: which
Debian mirror the build uses, and that stopping a rig only ever signals the
QEMU it started.  Booting the rig itself is ci/rig/run-rig-tier.sh's job.  And the
README's set-up on a fresh Debian 12 (ci/check-fresh-debian.sh)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RIG = Path(__file__).resolve().parent.parent / "ci" / "rig"


def mirror(etc: Path, **env) -> str:
    out = subprocess.run(["bash", "-c", f". {RIG}/common.sh; rig_mirror"], capture_output=True, text=True,
                         check=True, env={"PATH": os.environ["PATH"], "KVMHARNESS_APT_ETC": str(etc), **env})
    return out.stdout.strip()


def test_mirror_from_deb822_sources_skips_security_and_third_party(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a-node.sources").write_text("Types: deb\nURIs: https://deb.nodesource.com/node_20.x\n")
    (d / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n")
    assert mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_one_line_sources_with_options(tmp_path):
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [signed-by=/k.gpg arch=amd64] http://ftp.example.org/debian bookworm main\n")
    assert mirror(tmp_path) == "http://ftp.example.org/debian"


def test_mirror_default_and_override(tmp_path):
    assert mirror(tmp_path) == "http://deb.debian.org/debian"
    assert mirror(tmp_path, KVMHARNESS_RIG_MIRROR="http://x/debian") == "http://x/debian"


def test_stop_rig_signals_only_its_own_qemu(tmp_path):
    """A stale pid file naming some other process must not get it killed."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "qemu.pid").write_text(f"{bystander.pid}\n")
        (tmp_path / "console.log").write_text("boot log\n")
        subprocess.run(["bash", str(RIG / "stop-rig.sh")], check=True, capture_output=True,
                       env={**os.environ, "KVMHARNESS_RIG_STATE": str(tmp_path)})
        assert bystander.poll() is None
        assert not (tmp_path / "qemu.pid").exists() and not (tmp_path / "console.log").exists()
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("script", sorted(p.name for p in RIG.glob("*.sh")))
def test_rig_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(RIG / script)]).returncode == 0


def test_readme_main_job_on_a_fresh_debian_12(request):
    """ci/check-fresh-debian.sh: the README's main-job command on a fresh bookworm root
    with Debian's own python3 (EXTERNALLY-MANAGED, no python3-venv), as a sudo user and
    as root; it checks nothing was pip-installed outside the venvs.  It clones HEAD, so
    it checks what is committed.  Its lines stream to the terminal (about 1.5 min)."""
    from rig_fixtures import run_streaming

    root = RIG.parent.parent
    if os.environ.get("KVMHARNESS_FRESH_DEBIAN", "1") == "0":
        pytest.skip("KVMHARNESS_FRESH_DEBIAN=0")
    if os.geteuid() != 0:
        pytest.skip("building a Debian root needs root (mmdebstrap, chroot)")
    if not shutil.which("mmdebstrap"):
        pytest.skip("mmdebstrap is not installed (bash ci/install-deps.sh --test installs it)")
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: the check clones HEAD")
    r = run_streaming(["bash", str(root / "ci" / "check-fresh-debian.sh")], config=request.config,
                      label="fresh debian", timeout=900, cwd=root,
                      echo=lambda line: "fresh-debian:" in line)
    if r.returncode == 77:
        pytest.skip(r.output.strip().splitlines()[-1])
    assert r.returncode == 0 and "fresh-debian: PASSED" in r.output, r.output[-4000:]
    # both runs ran the whole suite: no guest failed or was skipped on a fresh machine
    summaries = re.findall(r"^\s*(\d+) passed, (\d+) failed, (\d+) skipped \(ran on kvm: (\d+), on sim: (\d+)\)",
                           r.output, re.M)
    assert len(summaries) == 2, r.output[-4000:]
    for passed, failed, skipped, on_kvm, on_sim in summaries:
        assert int(passed) > 0 and failed == skipped == "0" and int(on_kvm) + int(on_sim) == int(passed)
    assert summaries[0][3] == "0"  # the sudo user's run had no /dev/kvm: all on the simulator
