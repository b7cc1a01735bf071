"""Nested SVM on the simulator (kvmharness/sim/nested.py) against real kvm_amd on the SVM rig.

The contract: the sequence of #VMEXITs the guest hypervisor (L1) of ``nested-cpuid``
and ``nested-ud`` reports -- exit code, EXITINFO1/2, next RIP, L2's RIP,
EXITINTINFO, EVENTINJ -- is the one kvm_amd gives it.  The rig's side of it is
``expected_sequence`` of tests/test_nested_kvm.py (derived from the image bytes;
test_nested_rig.py asserts that the rig's run equals it) and the rig's recorded
run of 2026-11-26 (RIG_* below: Debian 6.1 kvm_amd nested=1 under QEMU TCG EPYC,
fetched by ``kvmharness rig run``); ``KVMHARNESS_RIG_TRACES=<dir>`` compares with a
fresh rig run's ``traces/`` folder instead.

The simulator gives the silicon values where QEMU's TCG (the rig's "hardware")
differs, and ``comparable()`` equates them: an IOIO EXITINFO1 with the
address-size bits (0x7A0210; rig 0x7A0010), the #NP error code of a not-present
IDT gate reached by an external interrupt (0x10B; rig 0x212).

The rig's vCPU has no NRIPS (TCG lacks it); the model's CPU offers NRIPS, so the
rig comparisons run the simulator with the rig's SVM leaf (``RIG_SVM_LEAF``), and
one test checks the NRIPS variant (next_rip filled in, L1 using it).  The tests that
run unchanged on both backends (the exit sequences, the final VMCB, VMEXIT_INVALID,
nested state, the exit rate) are in test_nested_kvm.py, parametrized over the backend.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path

import pytest
from test_nested_kvm import (
    FIELDS,
    KEY_EXITS,
    KEY_L2_ENTRY,
    KEY_NRIPS_USED,
    KEY_SVM_FEATURES,
    NESTED_PARAMS_PA,
    RIG_SVM_LEAF,
    VMCB_PA,
    comparable,
    exit_sequence,
    expected_sequence,
)

from kvmharness import protocol as P
from kvmharness.errors import FeatureUnavailable
from kvmharness.exits import IoOut, MmioRead, MmioWrite
from kvmharness.machine import Machine
from kvmharness.sim.cpumodel import SUPPORTED_CPUID
from kvmharness.sim.nested import NestedSvm
from kvmharness.sim.system import SimSystem
from kvmharness.x86 import CpuidEntry

pytestmark = pytest.mark.requires_sim

# CPUID with the rig's SVM leaf (RIG_SVM_LEAF: no NRIPS), as the rig's kvm_amd offers it
RIG_CPUID = SUPPORTED_CPUID.with_entry(RIG_SVM_LEAF)

# The rig's recorded sequences (2026-11-26): (exit code, EXITINFO1, EXITINFO2 - L2 entry if an
# address else 0, next_rip, L2 RIP - L2 entry, EXITINTINFO, EVENTINJ)
RIG_L2_ENTRY = {"nested-cpuid": 0x8305, "nested-ud": 0x81AE}
RIG = {
    "nested-cpuid": [(0x72, 0, 0, 0, 0x1F, 0, 0), (0x72, 0, 0, 0, 0x40, 0, 0),
                     (0x7B, 0x7A0010, 0x5E, 0, 0x5C, 0, 0), (0x81, 0, 0, 0, 0x67, 0, 0),
                     (0x78, 0, 0, 0, 0x71, 0, 0)],
    "nested-ud": [(0x46, 0, 0, 0, 0x0, 0, 0), (0x4D, 0, 0, 0, 0x17, 0, 0), (0x81, 0, 0, 0, 0x2A, 0, 0),
                  (0x81, 0, 0, 0, 0x54, 0, 0), (0x81, 0, 0, 0, 0x32, 0, 0),
                  (0x4B, 0x212, 0, 0, 0x35, 0x80000021, 0), (0x78, 0, 0, 0, 0x35, 0, 0)],
}
# vmcb12 after L2's HLT on the rig, every nonzero qword (test_nested_cpuid_final_vmcb_as_l1_left_it)
RIG_FINAL_VMCB = {
    0x008: 0x8904000000006140, 0x010: 0x3, 0x040: 0x104000, 0x058: 0x1, 0x070: 0x78,
    0x400: 0xFFFFFFFF0C930010, 0x410: 0xFFFFFFFF0A9B0008, 0x420: 0xFFFFFFFF0C930010,
    0x430: 0xFFFFFFFF0C930010, 0x440: 0xFFFFFFFF0C930010, 0x450: 0xFFFFFFFF0C930010,
    0x460: 0x3F00000000, 0x468: 0x5000, 0x480: 0xFFF00000000, 0x488: 0x6000, 0x4D0: 0x1D01,
    0x548: 0x620, 0x550: 0x1000, 0x558: 0x80010033, 0x560: 0x400, 0x568: 0xFFFF0FF0, 0x570: 0x46,
    0x578: 0x8376, 0x5D8: 0x300000, 0x5F8: 0x1235, 0x668: 0x0007040600070406,
}
# kvm_exit codes of the plain guests on the rig (test_kvm_exit_codes_of_the_plain_guests_are_the_svm_codes)
RIG_KVM_EXITS = {"cpuid": {0x72: 9, 0x7B: 37, 0x400: 4}, "hello64": {0x7B: 38, 0x400: 4},
                 "msr": {0x7B: 3, 0x7C: 4, 0x400: 4}, "mmio": {0x7B: 5, 0x400: 14}}
LAZY_NPF = 4  # the rig's KVM maps guest pages lazily: one NPF per page first touched, not modelled


def _run(guest, cpuid=RIG_CPUID, *, params=(0, 0)):
    """Run a nested guest on the simulator; (result, vmcb12 bytes at the end)."""
    m = Machine.for_guest(guest, SimSystem(supported_cpuid=cpuid))
    try:
        m.vm.write(NESTED_PARAMS_PA, struct.pack("<QQ", *params))
        r = m.run(60)
        vmcb = m.vm.read(VMCB_PA, 4096)
    finally:
        m.close()
    return r, vmcb


def _relative(seq, entry):
    out = []
    for e in seq:
        info2 = e["exit_info_2"] - entry if e["exit_code"] == 0x7B else e["exit_info_2"]
        out.append((e["exit_code"], e["exit_info_1"], info2, e["next_rip"], e["rip"] - entry,
                    e["exit_int_info"], e["event_inj"]))
    return out


def _rig_sequence(guest):
    """The rig's sequence: a fresh rig run's artifact if KVMHARNESS_RIG_TRACES names one, else
    the recording above, rebuilt at the L2 entry of this build of the image."""
    folder = os.environ.get("KVMHARNESS_RIG_TRACES")
    if folder:
        name = {"nested-cpuid": "cpuid", "nested-ud": "ud"}[guest]
        return json.loads((Path(folder) / f"nested-{name}.json").read_text())["sequence"], None
    return None, RIG[guest]


@pytest.mark.parametrize("guest", ["nested-cpuid", "nested-ud"])
def test_sim_reports_the_rigs_exit_sequence(guest):
    r, _ = _run(guest)
    assert r.ok, r.describe()
    seq = exit_sequence(r.reports)
    values = r.values
    assert values[KEY_SVM_FEATURES] == RIG_SVM_LEAF.edx and values[KEY_NRIPS_USED] == 0
    assert values[KEY_EXITS] == len(seq) == (5 if guest == "nested-cpuid" else 7)
    # what kvm_amd must give L1 (the same function the rig-side test checks the rig with)
    assert comparable(seq) == expected_sequence(guest, r.reports)
    rig_seq, recorded = _rig_sequence(guest)
    if rig_seq is not None:
        assert comparable(seq) == comparable(rig_seq)
    else:
        entry = values[KEY_L2_ENTRY]
        rig = [dict(zip(FIELDS, (c, i1, i2 + entry if c == 0x7B else i2, n, rip + entry, ii, ev), strict=True))
               for c, i1, i2, n, rip, ii, ev in recorded]
        assert comparable(seq) == comparable(rig), (_relative(seq, entry), recorded)


def test_silicon_values_where_the_rigs_tcg_differs():
    """Documented choice: the model reports what AMD silicon reports."""
    cpuid_seq = exit_sequence(_run("nested-cpuid")[0].reports)
    ud_seq = exit_sequence(_run("nested-ud")[0].reports)
    assert cpuid_seq[2]["exit_info_1"] == 0x7A0210      # OUT imm8, 8-bit, 64-bit address size
    assert ud_seq[5]["exit_info_1"] == 0x21 << 3 | 2 | 1  # #NP: gate 0x21, IDT, EXT


def test_nrips_offered_fills_next_rip_and_l1_uses_it():
    """The model's own CPU offers NRIPS: KVM then copies next_rip into vmcb12 for
    instruction intercepts (never for exceptions), and L1 advances L2 from it."""
    for guest in ("nested-cpuid", "nested-ud"):
        r, _ = _run(guest, SUPPORTED_CPUID)
        assert r.ok, r.describe()
        assert r.values[KEY_NRIPS_USED] == 1
        seq = exit_sequence(r.reports)
        assert comparable(seq) == expected_sequence(guest, r.reports)
        assert all((e["next_rip"] > e["rip"]) == (e["exit_code"] >= 0x60) for e in seq)


def test_final_vmcb12_is_byte_for_byte_the_rigs():
    r, vmcb = _run("nested-cpuid")
    assert r.ok, r.describe()
    nonzero = {off: struct.unpack_from("<Q", vmcb, off)[0] for off in range(0, 4096, 8)
               if struct.unpack_from("<Q", vmcb, off)[0]}
    entry_shift = r.values[KEY_L2_ENTRY] - RIG_L2_ENTRY["nested-cpuid"]
    want = {**RIG_FINAL_VMCB, 0x578: RIG_FINAL_VMCB[0x578] + entry_shift}  # save.RIP: L2's HLT
    assert {hex(k): hex(v) for k, v in nonzero.items()} == {hex(k): hex(v) for k, v in want.items()}


def _vmcb12(**over):
    """A vmcb12 KVM accepts (nested-cpuid's), with fields overridden: name -> (offset, fmt, value)."""
    raw = bytearray(4096)
    for off, value in RIG_FINAL_VMCB.items():
        struct.pack_into("<Q", raw, off, value)
    struct.pack_into("<Q", raw, 0x70, 0)
    for off, fmt, value in over.values():
        struct.pack_into(fmt, raw, off, value)
    return raw


@pytest.mark.parametrize("field, ok", [
    ({}, True),
    ({"asid": (0x58, "<I", 0)}, False),
    ({"no_vmrun_intercept": (0x10, "<I", 0b10)}, False),
    ({"nested_npt": (0x90, "<Q", 1)}, False),                 # not modelled: refused
    ({"efer_no_svme": (0x4D0, "<Q", 0xD01)}, False),
    ({"cs_l_and_d": (0x412, "<H", 0xE9B)}, False),
    ({"cr0_nw_without_cd": (0x558, "<Q", 0xA0010033)}, False),
    ({"cr0_upper": (0x558, "<Q", 0x1_80010033)}, False),
    ({"dr7_upper": (0x560, "<Q", 0x1_00000400)}, False),
    ({"long_mode_without_pae": (0x548, "<Q", 0x600)}, False),
])
def test_vmrun_consistency_checks(field, ok):
    raw = _vmcb12(**field)
    assert (NestedSvm._check_controls(raw) and NestedSvm._check_save(raw)) is ok


def test_l2_io_l1_does_not_intercept_is_a_host_exit_in_guest_mode():
    """L2's OUT to BENCH_PORT is not in L1's IOPM: KVM takes it to userspace while the vCPU
    is in guest mode, and the registers userspace reads are L2's."""
    seen = []

    def at_l2_out(machine, e):
        if isinstance(e, IoOut) and e.port == P.BENCH_PORT:
            vcpu = machine.vcpu
            seen.append((e.data, vcpu.nested.guest_mode, vcpu.get_regs(), vcpu.get_sregs().efer))
        return False

    m = Machine.for_guest("nested-cpuid", SimSystem(supported_cpuid=RIG_CPUID))
    try:
        m.on_exit(at_l2_out)
        r = m.run(60)
        trace = list(m.vcpu.hw_trace)
        nested = m.vcpu.nested
    finally:
        m.close()
    assert r.ok, r.describe()
    (data, guest_mode, regs, _efer), = seen
    values = dict(r.reports)
    vmmcall_rip = values[(3 << 8) | FIELDS.index("rip")]
    assert data == b"\xa5" and guest_mode
    # L2's `out $0xa5, %al` (2 bytes) then `mov $.., %eax` (5): RIP at the OUT on kvm_amd
    out_rip = vmmcall_rip - 7 if not m.system.profile.io_rip_past else vmmcall_rip - 5
    assert regs.rip == out_rip and regs.rsp == 0x300000 and regs.rax & 0xFF == 0xA5
    # the hardware view: each L1 VMRUN is KVM's exit 0x80; the five reported exits went to L1
    handled = [(t.exit_code, t.handled) for t in trace if t.handled == "L1" or t.exit_code == 0x80]
    assert handled == [(0x80, "kernel"), (0x72, "L1")] * 2 + [(0x80, "kernel"), (0x7B, "L1"),
                                                               (0x80, "kernel"), (0x81, "L1"),
                                                               (0x80, "kernel"), (0x78, "L1")]
    assert nested.vmruns == 5 and nested.reflected == 5 and not nested.guest_mode and not nested.gif


def test_nested_guests_refused_where_the_cpu_offers_no_svm():
    ext = SUPPORTED_CPUID.lookup(0x80000001)
    no_svm = SUPPORTED_CPUID.with_entry(CpuidEntry(0x80000001, 0, 0, ext.eax, ext.ebx, ext.ecx & ~4, ext.edx))
    assert SimSystem().capabilities.svm
    with pytest.raises(FeatureUnavailable, match="SVM is not offered to guests"):
        Machine.for_guest("nested-cpuid", SimSystem(supported_cpuid=no_svm))


def test_plain_guests_sim_exit_codes_match_the_rigs_kvm_exit_codes():
    """The bonus comparison: the SVM exit codes the sim's VMCB records for the plain guests
    against the rig's ``kvm_exit`` tracepoint counts (minus the NPFs of KVM's lazy mapping)."""
    for guest, rig in RIG_KVM_EXITS.items():
        m = Machine.for_guest(guest, SimSystem())
        try:
            r = m.run(20)
            codes = Counter(t.exit_code for t in m.vcpu.hw_trace)
            trace = list(m.vcpu.hw_trace)
        finally:
            m.close()
        assert r.ok, r.describe()
        mmio = sum(1 for t in r.exits if isinstance(t.exit, (MmioRead, MmioWrite)))
        if guest in ("cpuid", "msr"):
            assert dict(codes) == {k: v for k, v in rig.items() if k != 0x400}
            assert rig[0x400] == LAZY_NPF
        elif guest == "hello64":
            # rep outsb: KVM's emulator batches iterations (the rig: 38 IOIO exits for 37 OUTs)
            assert set(codes) == {0x7B} and codes[0x7B] == sum(1 for t in r.exits if isinstance(t.exit, IoOut))
        else:
            npf = [t for t in trace if t.exit_code == 0x400]
            assert codes[0x7B] == rig[0x7B] and set(codes) == {0x7B, 0x400}
            assert len(npf) == mmio and all(P.MMIO_TEST_ADDR <= t.exit_info_2 < P.MMIO_TEST_ADDR + 0x1000
                                            for t in npf)


def _inline(src, cpuid=SUPPORTED_CPUID):
    from kvmharness.sim import testing as T

    if not T.have_binutils():
        pytest.skip("GNU as/ld (binutils) not installed")
    system = SimSystem()
    vm = system.create_vm()
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid(cpuid)
    T.long_mode_setup(vm, vcpu, T.assemble(src))
    return vm, vcpu


SET_SVME = "mov ecx, 0xC0000080\nrdmsr\nor eax, 0x1000\nwrmsr\n"


def test_l1_vmsave_vmload_stgi_clgi():
    """KVM's VMSAVE/VMLOAD (FS/GS/TR/LDTR and the syscall MSRs through a VMCB page) and
    STGI/CLGI (GIF) for a guest with EFER.SVME; without SVME they are #UD."""
    from kvmharness import exits

    src = SET_SVME + """
        clgi
        mov eax, 0x90000
        vmsave rax
        mov r8, [0x90000 + 0x600]          # STAR as VMSAVE stored it
        mov qword ptr [0x90000 + 0x600], 0x1234
        mov qword ptr [0x90000 + 0x448], 0x5678   # FS.base
        vmload rax
        mov ecx, 0xC0000081
        rdmsr
        mov r9, rax                        # STAR after VMLOAD
        mov ecx, 0xC0000100
        rdmsr
        mov r10, rax                       # FS base after VMLOAD
        stgi
        hlt
    """
    _vm, v = _inline(src)
    v.set_msrs({0xC0000081: 0x23001000_00000000})
    assert v.run() == exits.Hlt()
    r = v.get_regs()
    assert (r.r8, r.r9, r.r10) == (0x23001000_00000000, 0x1234, 0x5678)
    assert v.nested.gif and not v.nested.guest_mode
    assert [t.exit_code for t in v.hw_trace if 0x82 <= t.exit_code <= 0x85] == [0x85, 0x83, 0x82, 0x84]
    _vm, v = _inline("clgi\nhlt")  # no EFER.SVME: #UD, reported by the vector-6 stub
    e = v.run()
    assert e == exits.IoOut(0xEB, 1, 1, b"\x04") and v.get_regs().rbx == 6


# An inline L1 for intercepts the nested guests do not use: the host writes vmcb12 (at
# 0x90000) itself; L1 loops on VMRUN and logs (exit code, EXITINFO1/2, RIP, RAX) of each
# #VMEXIT at 0x98008 + 40 * n, skipping L2's instruction by next_rip (NRIPS) or, after an
# exception, by L2's R15 (L2's GPRs are L1's after #VMEXIT).
INLINE_L1 = SET_SVME + """
        mov ecx, 0xC0010117
        mov eax, 0x91000
        xor edx, edx
        wrmsr
    l1_loop:
        mov eax, 0x90000
        vmrun rax
        mov rbx, [0x98000]
        imul rbx, rbx, 40
        mov rcx, [0x90070]
        mov [0x98008 + rbx], rcx
        mov rcx, [0x90078]
        mov [0x98010 + rbx], rcx
        mov rcx, [0x90080]
        mov [0x98018 + rbx], rcx
        mov rcx, [0x90578]
        mov [0x98020 + rbx], rcx
        mov rcx, [0x905F8]
        mov [0x98028 + rbx], rcx
        inc qword ptr [0x98000]
        mov rcx, [0x90070]
        cmp rcx, 0x78
        je l1_done
        cmp rcx, 0x60
        jb l1_exception
        mov rcx, [0x900C8]
        mov [0x90578], rcx
        jmp l1_loop
    l1_exception:
        add [0x90578], r15
        jmp l1_loop
    l1_done:
        hlt
        .org 0x200
    l2:
        rdtsc
        mov eax, 0xAAAAAAAA
        in al, 0x7A
        mov ecx, 0x10
        rdmsr
        mov ecx, 0x1B
        rdmsr
        mov r15, 8
        mov rax, qword ptr [0x40000000]
        xor edx, edx
        xor ecx, ecx
        div ecx
        hlt
"""


def _inline_vmcb12(l2_rip):
    from kvmharness.sim import testing as T

    raw = bytearray(4096)
    def q(off, v):
        struct.pack_into("<Q", raw, off, v)

    struct.pack_into("<I", raw, 0x08, 1 << 14)                                   # #PF
    struct.pack_into("<I", raw, 0x0C, (1 << 14) | (1 << 24) | (1 << 27) | (1 << 28))  # RDTSC HLT IOIO MSR
    struct.pack_into("<I", raw, 0x10, 1)                                         # VMRUN
    q(0x40, 0xA0000)
    q(0x48, 0xA3000)
    struct.pack_into("<I", raw, 0x58, 1)
    for off, sel, attrib in ((0x400, 0x10, 0xC93), (0x410, 0x08, 0xA9B), (0x420, 0x10, 0xC93),
                             (0x430, 0x10, 0xC93)):
        struct.pack_into("<HHIQ", raw, off, sel, attrib, 0xFFFFFFFF, 0)
    struct.pack_into("<HHIQ", raw, 0x460, 0, 0, 23, T.GDT)
    struct.pack_into("<HHIQ", raw, 0x480, 0, 0, 16 * 32 - 1, T.IDT)
    for off, v in ((0x4D0, 0x1500), (0x548, 0x620), (0x550, T.PML4), (0x558, 0x80000033), (0x560, 0x400),
                   (0x568, 0xFFFF0FF0), (0x570, 2), (0x578, l2_rip), (0x5D8, 0x70000)):
        q(off, v)
    return bytes(raw)


def test_inline_l1_intercepts_beyond_kvms_own():
    """RDTSC (not intercepted by KVM itself: only the merged vmcb02 makes it exit), IN
    through L1's IOPM (vmcb12 RAX = L2's RAX before the IN), RDMSR through L1's MSRPM (an
    MSR outside it stays KVM's), #PF through L1's exception bitmap (EXITINFO1 = error code,
    EXITINFO2 = address), #DE that L1 does not intercept (delivered through L2's IDT: the
    harness stub there reports vector 0 to the host from L2), then HLT."""
    from kvmharness import exits
    from kvmharness.sim import testing as T

    image = T.assemble(INLINE_L1)
    vm, v = _inline(INLINE_L1)
    l2 = T.LOAD + 0x200
    vm.write(0x90000, _inline_vmcb12(l2))
    vm.write(0xA0000 + 0x7A // 8, bytes([1 << (0x7A % 8)]))  # IOPM: port 0x7A
    vm.write(0xA3000 + 0x10 // 4, bytes([1]))                # MSRPM: read of MSR 0x10
    e = v.run()
    assert e == exits.IoOut(0xEB, 1, 1, b"\x04") and v.get_regs().rbx == 0  # #DE in L2's IDT stub
    assert v.nested.guest_mode
    assert v.run() == exits.Hlt() and not v.nested.guest_mode
    n = struct.unpack("<Q", vm.read(0x98000, 8))[0]
    log = [struct.unpack_from("<5Q", vm.read(0x98008 + 40 * i, 40)) for i in range(n)]
    code = image[0x200:]
    def at(op, start=0):
        return l2 + code.index(op, start)

    rdtsc, inp, rdmsr, load = at(b"\x0f\x31"), at(b"\xe4\x7a"), at(b"\x0f\x32"), at(b"\x48\x8b\x04\x25")
    hlt = T.STUBS + 6  # the HLT of the vector-0 stub L2 ran after the #DE
    assert [(c, i1, i2, rip) for c, i1, i2, rip, _rax in log] == [
        (0x6E, 0, 0, rdtsc),
        (0x7B, 0x7A << 16 | 0x200 | 0x10 | 1, inp + 2, inp),
        (0x7C, 0, 0, rdmsr),
        (0x4E, 0, 0x40000000, load),
        (0x78, 0, 0, hlt)]
    assert log[1][4] & 0xFFFFFFFF == 0xAAAAAAAA
    kvm_msr = [t for t in v.hw_trace if t.exit_code == 0x7C]
    assert [t.handled for t in kvm_msr] == ["kernel", "kernel", "L1", "kernel"]  # SVME, HSAVE, 0x10, 0x1B
