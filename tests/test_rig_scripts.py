"""The SVM rig in a box scripts (ci/rig/), the parts that need no QEMU: which
Debian mirror the build uses, and that stopping a rig only ever signals the
QEMU it started.  Booting the rig itself is ci/rig/run-rig-tier.sh's job."""

from __future__ import annotations

import os
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
