"""Nested SVM on real kvm_amd: the SVM rig in a box, driven from here.

The session's shared rig (tests/rig_fixtures.py: booted once, QEMU TCG with an EPYC
CPU, Debian's kernel with kvm_amd nested=1) runs every requires_svm test through
``kvmharness rig run`` once (the rig tier), tests/test_nested_kvm.py among them, on the
kvm backend.  The tests below check that run's JUnit result for test_nested_kvm.py and
the sequences the rig-side tests saved (``traces/nested-*.json``, fetched home by
``rig run``), so what real kvm_amd did is asserted here too, with the rig's own values
(no NRIPS; QEMU's IOIO EXITINFO1 without address-size bits).

Skips with the reason when this host cannot boot the rig (not root, no QEMU and no way
to install it, not x86_64), when it is itself an SVM host (test_nested_kvm.py runs
directly there), or when KVMHARNESS_RIG_TESTS=0.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class RigRun:
    output: str
    rig_dir: Path
    console: str

    def artifact(self, name: str) -> dict:
        path = self.rig_dir / "traces" / f"nested-{name}.json"
        assert path.is_file(), f"the rig-side test did not save {path.name}: {self.output[-2000:]}"
        return json.loads(path.read_text())


@pytest.fixture(scope="module")
def rig_run(rig_tier) -> RigRun:
    if rig_tier.skipped:
        pytest.skip(rig_tier.skipped)
    assert rig_tier.rig_dir is not None, f"the rig tier brought no results home:\n{rig_tier.proc.output[-3000:]}"
    return RigRun(rig_tier.proc.output, rig_tier.rig_dir, rig_tier.rig.console())


def test_nested_tests_pass_on_the_rigs_kvm_amd(rig_run):
    root = ET.parse(rig_run.rig_dir / "junit.xml").getroot()
    cases = [c for c in root.iter("testcase") if c.get("classname", "").endswith("test_nested_kvm")]
    counts = {"tests": len(cases)}
    for kind in ("failure", "error", "skipped"):
        counts[kind] = sum(1 for c in cases if c.find(kind) is not None)
    # nothing skipped: the rig really offered SVM to guests and KVM_CAP_NESTED_STATE
    assert counts == {"tests": 7, "failure": 0, "error": 0, "skipped": 0}, (counts, rig_run.output[-3000:])
    for bad in ("Oops", "BUG:", "soft lockup", "Call Trace"):
        assert bad not in rig_run.console, f"kernel trouble in the rig:\n{rig_run.console[-3000:]}"


def test_nested_cpuid_sequence_from_the_rig(rig_run):
    d = rig_run.artifact("cpuid")
    seq = d["sequence"]
    assert [e["exit_code"] for e in seq] == [0x72, 0x72, 0x7B, 0x81, 0x78]
    assert d["svm_features_edx"] & (1 << 3) == 0  # TCG has no NRIPS: L1 must know lengths
    assert all(e["next_rip"] == 0 and e["exit_int_info"] == 0 for e in seq)
    cpuid0, cpuid1, io, vmmcall, hlt = seq
    assert cpuid0["exit_info_1"] == cpuid0["exit_info_2"] == cpuid1["exit_info_1"] == cpuid1["exit_info_2"] == 0
    assert io["exit_info_1"] == 0x7A << 16 | 0x10        # OUT, port 0x7A, 8-bit (QEMU: no A64 bit)
    assert io["exit_info_2"] == io["rip"] + 2             # IOIO: EXITINFO2 = next RIP, even without NRIPS
    assert vmmcall["rip"] == io["rip"] + 2 + 4 + 5        # OUT imm8, mov $0xA5,%al + OUT, mov $0x1234,%eax
    assert hlt["rip"] == vmmcall["rip"] + 3 + 7           # VMMCALL, mov %rax,disp(%rip)
    assert seq == d["expected"]
    events = d["kernel_events"]
    assert events["kvm_nested_vmenter"] == 5 and events["kvm_nested_vmexit_inject"] == 5
    assert events["kvm_nested_vmexit"] >= 6  # + L2 exits KVM handled itself (L2's OUT to 0x80, NPFs)
    assert any("reason io" in line and "info1 0x0000000000800010" in line for line in d["nested_trace"])


def test_nested_ud_sequence_from_the_rig(rig_run):
    d = rig_run.artifact("ud")
    seq = d["sequence"]
    assert [(e["exit_code"], e["exit_info_1"], e["exit_info_2"], e["exit_int_info"]) for e in seq] == [
        (0x46, 0, 0, 0), (0x4D, 0, 0, 0), (0x81, 0, 0, 0), (0x81, 0, 0, 0), (0x81, 0, 0, 0),
        (0x4B, 0x212, 0, 0x80000021),  # QEMU's #NP error code; EXITINTINFO = the interrupt
        (0x78, 0, 0, 0)]
    assert all(e["event_inj"] == 0 and e["next_rip"] == 0 for e in seq)
    assert seq[1]["rip"] == seq[0]["rip"] + 2 + 11 + 10    # ud2, movq $1 (rip-rel), movabs
    assert seq[5]["rip"] == seq[6]["rip"] == seq[4]["rip"] + 3  # #NP: at the interrupted HLT
    assert seq[3]["rip"] > seq[6]["rip"]                    # exit 3 came from L2's interrupt handler


def test_vmexit_invalid_on_the_rig(rig_run):
    seq = rig_run.artifact("invalid")["sequence"]
    assert seq[0]["exit_code"] == 2**64 - 1 and seq[0]["exit_info_1"] == seq[0]["exit_info_2"] == 0
    assert [e["exit_code"] for e in seq[1:]] == [0x72, 0x72, 0x7B, 0x81, 0x78]


def test_nested_state_restore_on_the_rig(rig_run):
    d = rig_run.artifact("state")
    st = d["nested_state"]
    assert st["format"] == 1 and st["flag_names"] == ["guest-mode", "gif-set"]
    assert st["size"] == 128 + 4096 and st["vmcb_pa"] == 0x101000
    assert [k for k, _ in d["reports_after_restore"]][:7] == [0x300 + i for i in range(7)]


def test_plain_guests_kvm_exit_codes_on_the_rig(rig_run):
    codes = {g: {int(k, 16): n for k, n in c.items()} for g, c in
             rig_run.artifact("plain-kvm-exit-codes").items()}
    assert codes["cpuid"][0x72] == 9 and codes["msr"][0x7C] == 4
    assert 0x72 not in codes["hello64"] and 0x7C not in codes["mmio"]
    assert codes["mmio"][0x400] >= 8  # 4 writes + 4 reads of the MMIO window, each an NPF
    assert all(set(c) <= {0x72, 0x7B, 0x7C, 0x400, 0x60} for c in codes.values()), codes


def test_nested_exit_rate_on_the_rig(rig_run):
    d = rig_run.artifact("bench")
    assert d["loops"] > 0 and d["seconds"] > 0
    print(f"\nSVM rig in a box: {d['line']}")
