"""The rig tier inside the test run: the SVM rig in a box (QEMU TCG, EPYC with SVM, a
Debian kernel's kvm_amd) is built if needed, booted, and the kvm backend's tests that
need SVM or KVM run there through `kvmharness rig run` (ci/rig/run-rig-tier.sh).

Skips, with the script's own reason, where this host cannot build or boot the rig
(not root, no QEMU, not x86_64, the host has kvm_amd itself), or with
KVMHARNESS_RIG_TESTS=0."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIER = ROOT / "ci" / "rig" / "run-rig-tier.sh"


def test_rig_tier_runs_the_svm_tests_on_real_kvm_amd(tmp_path):
    if os.environ.get("KVMHARNESS_RIG_TESTS", "1") == "0":
        pytest.skip("KVMHARNESS_RIG_TESTS=0")
    env = dict(os.environ, KVMHARNESS_RIG_STATE=str(tmp_path / "rig-state"))
    r = subprocess.run(["bash", str(TIER)], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=900)
    out = r.stdout + r.stderr
    for line in out.splitlines():
        if line.startswith("rig tier: SKIPPED"):
            pytest.skip(line.removeprefix("rig tier: SKIPPED:").strip())
    assert r.returncode == 0 and "rig tier: PASSED" in out, out[-4000:]
    # the rig really was an SVM host: svm, npt and kvm_amd in the capability matrix, and the
    # requires_svm tests ran there rather than skipping
    assert "kvm_amd" in out
    summary = [l for l in out.splitlines() if " passed" in l and "[svm-rig]" in l]
    assert summary and "failed" not in summary[-1], summary
