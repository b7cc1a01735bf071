"""The SVM rig in a box, booted once per test session and shared by every rig test.

``svm_rig`` (session): ci/rig/boot-rig.sh (QEMU TCG with an EPYC CPU, Debian's kernel
with kvm_amd nested=1; built first if the cache is empty), stopped at the end of the
session.  ``rig_tier`` (session): ci/rig/run-rig-tier.sh on that rig, once: a KVM guest
to HLT inside it, ``kvmharness rig check`` (kvm, svm, npt, kvm_amd) and one
``kvmharness rig run`` of every requires_svm / requires_kvm test there, which includes
tests/test_nested_kvm.py and the traces it saves.  tests/test_rig_tier.py and
tests/test_nested_rig.py both assert on that one run.

Both stream what the scripts print to the terminal as they go (the boot, the rig run's
progress lines), since together they take minutes.  They skip, with the reason, where
this host cannot boot the rig (not root, no QEMU and no way to install it, not x86_64),
where it is itself an SVM host (the tests run directly there), or with
KVMHARNESS_RIG_TESTS=0.  Registered in tests/conftest.py (session fixtures must be
defined once, not imported into each module, to be shared).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RIG = ROOT / "ci" / "rig"
BOOT_TIMEOUT = 900  # seconds: a first build downloads and packs a Debian root
TIER_TIMEOUT = 900  # seconds for run-rig-tier.sh on a booted rig (its own budget is 540)


def progress(config, line: str) -> None:
    """One line to the terminal now, through pytest's terminal reporter (past capture)."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if tr is None:
        return
    if capman is not None:
        with capman.global_and_fixture_disabled():
            tr.write_line(line)
    else:
        tr.write_line(line)


@dataclass
class Streamed:
    returncode: int
    output: str
    timed_out: bool


def run_streaming(argv, *, config, label: str, timeout: float, echo=lambda line: True,
                  **popen) -> Streamed:
    """Run argv (stdout and stderr merged), show each line that ``echo`` accepts as
    ``[label mm:ss] line`` while it runs, and return everything it printed."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1, stdin=subprocess.DEVNULL, **popen)
    timed_out = threading.Event()

    def expire():
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, expire)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo(line):
                m, s = divmod(int(time.monotonic() - t0), 60)
                progress(config, f"  [{label} {m}:{s:02d}] {line.rstrip()}")
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Streamed(proc.returncode, "".join(lines), timed_out.is_set())


def cannot_boot() -> str | None:
    """Why this host cannot boot the SVM rig in a box (None: it can)."""
    if os.environ.get("KVMHARNESS_RIG_TESTS", "1") == "0":
        return "KVMHARNESS_RIG_TESTS=0"
    if Path("/sys/module/kvm_amd").is_dir():
        return "this host has kvm_amd itself: the requires_svm tests run here directly"
    if platform.machine() != "x86_64":
        return "the SVM rig in a box needs an x86_64 host"
    if os.geteuid() != 0:
        return "booting the SVM rig needs root (mmdebstrap, apt for QEMU)"
    try:
        import paramiko  # noqa: F401
    except ImportError:
        return "paramiko is not installed (pip install -e '.[test]' installs it)"
    if shutil.which("qemu-system-x86_64") is None or shutil.which("mmdebstrap") is None:
        p = subprocess.run(["bash", str(RIG / "install-test-deps.sh")], capture_output=True, text=True,
                           timeout=600, check=False)
        if p.returncode != 0 or shutil.which("qemu-system-x86_64") is None:
            return f"cannot install QEMU for the SVM rig: {(p.stderr or p.stdout).strip()[-300:]}"
    return None


@dataclass
class BootedRig:
    inventory: Path
    state: Path
    env: dict  # the environment the rig scripts and `kvmharness rig` need for this rig
    boot_seconds: float

    def console(self) -> str:
        log = self.state / "console.log"
        return log.read_text(errors="replace") if log.exists() else ""


@pytest.fixture(scope="session")
def svm_rig(request, tmp_path_factory) -> BootedRig:
    why = cannot_boot()
    if why:
        pytest.skip(f"SVM rig in a box not booted: {why}")
    config = request.config
    state = tmp_path_factory.mktemp("svm-rig-state")
    # PYTHON: run-rig-tier.sh runs `kvmharness rig ...` with this interpreter (the venv's,
    # which has paramiko), not whatever python3 is first on PATH.
    env = {**os.environ, "KVMHARNESS_RIG_STATE": str(state), "PYTHON": sys.executable}
    progress(config, "")
    progress(config, "SVM rig in a box: booting, once for the whole session (ci/rig/boot-rig.sh; "
                     "a first build takes minutes)")
    t0 = time.monotonic()
    try:
        boot = run_streaming(["bash", str(RIG / "boot-rig.sh")], config=config, label="rig boot",
                             timeout=BOOT_TIMEOUT, env=env,
                             echo=lambda line: " rig: " in line or "error" in line.lower())
        if boot.returncode != 0:
            console = (state / "console.log").read_text(errors="replace")[-2000:] \
                if (state / "console.log").exists() else ""
            pytest.fail(f"ci/rig/boot-rig.sh failed{' (timed out)' if boot.timed_out else ''}: "
                        f"{boot.output[-1500:]}\nconsole:\n{console}")
        inventory = Path(boot.output.strip().splitlines()[-1])
        rig = BootedRig(inventory, state, {**env, "KVMHARNESS_RIG_INVENTORY": str(inventory)},
                        time.monotonic() - t0)
        progress(config, f"SVM rig in a box: up in {rig.boot_seconds:.0f} s")
        yield rig
    finally:
        subprocess.run(["bash", str(RIG / "stop-rig.sh")], capture_output=True, timeout=60, env=env,
                       check=False)


@dataclass
class RigTier:
    proc: Streamed
    results: Path
    rig: BootedRig

    @property
    def rig_dir(self) -> Path | None:
        dirs = sorted(self.results.glob("*/svm-rig"))
        return dirs[-1] if dirs else None

    @property
    def skipped(self) -> str | None:
        for line in self.proc.output.splitlines():
            if line.startswith("rig tier: SKIPPED"):
                return line.removeprefix("rig tier: SKIPPED:").strip()
        return None


@pytest.fixture(scope="session")
def rig_tier(request, svm_rig, tmp_path_factory) -> RigTier:
    """ci/rig/run-rig-tier.sh once on the shared rig (every requires_svm/requires_kvm test)."""
    results = tmp_path_factory.mktemp("svm-rig-results")
    progress(request.config, "SVM rig in a box: the rig tier (kvm-smoke, rig check, rig run of "
                             "the requires_svm/requires_kvm tests) on the shared rig")
    proc = run_streaming(["bash", str(RIG / "run-rig-tier.sh")], config=request.config, label="rig tier",
                         timeout=TIER_TIMEOUT, cwd=ROOT,
                         env={**svm_rig.env, "KVMHARNESS_RIG_RESULTS": str(results)})
    return RigTier(proc, results, svm_rig)
