"""The rig tier inside the test run: the SVM rig in a box (QEMU TCG, EPYC with SVM, a
Debian kernel's kvm_amd), booted once for the session (tests/rig_fixtures.py), checked
and given the kvm backend's tests that need SVM or KVM through `kvmharness rig run`
(ci/rig/run-rig-tier.sh on the shared rig; its lines stream to the terminal).

Skips, with the reason, where this host cannot boot the rig (not root, no QEMU, not
x86_64, the host has kvm_amd itself), or with KVMHARNESS_RIG_TESTS=0."""

import pytest


def test_rig_tier_runs_the_svm_tests_on_real_kvm_amd(rig_tier):
    out = rig_tier.proc.output
    if rig_tier.skipped:
        pytest.skip(rig_tier.skipped)
    assert rig_tier.proc.returncode == 0 and "rig tier: PASSED" in out, out[-4000:]
    # the rig really was an SVM host: svm, npt and kvm_amd in the capability matrix, and the
    # requires_svm tests ran there rather than skipping
    assert "kvm_amd" in out
    summary = [l for l in out.splitlines() if " passed" in l and "[svm-rig]" in l]
    assert summary and "failed" not in summary[-1], summary
