"""Nested SVM on both backends: a guest hypervisor (L1) runs its own guest (L2).

Each test runs on every selected backend (the ``backend`` parameter).  On kvm they
need KVM with SVM offered to guests (kvm_amd nested=1): the module is marked
``requires_svm``, which the plugin applies to the ``[kvm]`` items only, so there they
skip on these machines' kvm_pvm and run on the SVM rig in a box through ``kvmharness
rig run`` (test_nested_rig.py does that and checks what comes back); the ``[sim]``
items run the same bodies on the simulator's nested SVM (kvmharness/sim/nested.py).
What only the simulator can show (the rig's recorded runs, VMRUN's checks one by
one) is in test_nested_sim.py.  Each ``[kvm]`` test also writes what it saw to
``$KVMHARNESS_TRACE_DIR/nested-*.json`` when that is set (``rig run`` fetches that
folder home), so the numbers and sequences reach the host.

This module imports nothing of the simulator at module level: the rig has no unicorn.

The guests' report protocol (guests/include/svm.h): after its n-th #VMEXIT
L1 reports key ``(n << 8) | field`` for the fields exit code, EXITINFO1,
EXITINFO2, next_rip, L2's RIP, EXITINTINFO (64 bits: its error code above),
EVENTINJ as L1 finds it; 0xF003 is L2's entry point.
:func:`exit_sequence` rebuilds the list; :func:`expected_sequence` derives
what it must be from the image's own bytes and the NRIPS bit L1 saw.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from collections import Counter
from pathlib import Path

import pytest

from kvmharness import protocol as P
from kvmharness.errors import KvmError
from kvmharness.exits import IoOut, MmioRead, MmioWrite
from kvmharness.images import get_guest
from kvmharness.machine import Machine, run_guest
from kvmharness.x86 import CpuidEntry

pytestmark = pytest.mark.requires_svm

FIELDS = ("exit_code", "exit_info_1", "exit_info_2", "next_rip", "rip", "exit_int_info", "event_inj")
KEY_SVM_FEATURES, KEY_NRIPS_USED, KEY_EXITS, KEY_L2_ENTRY = 0xF000, 0xF001, 0xF002, 0xF003
SVM_EDX_NRIPS = 1 << 3
VMCB_PA, IOPM_PA, NESTED_PARAMS_PA = 0x101000, 0x104000, 0x107000
MSR_VM_HSAVE_PA = 0xC0010117
# The address-size bits of an IOIO EXITINFO1 (7-9): real CPUs set them for
# every IN/OUT; QEMU's TCG (the rig's "hardware") leaves them clear for
# non-string IO, and KVM passes EXITINFO1 through unchanged.
IOIO_ASIZE_MASK = 0x380

# L2's instructions that exit to L1, found in the image by their opcode bytes
# (scanning forward from L2's entry), so the expected RIPs follow the source.
UD2, CPUID, VMMCALL, HLT = b"\x0f\x0b", b"\x0f\xa2", b"\x0f\x01\xd9", b"\xf4"
LOAD_NONCANONICAL = b"\x48\x8b\x03"  # mov (%rbx), %rax
OUT_7A = b"\xe6\x7a"
# #NP while delivering vector 0x21 through a not-present IDT gate: the error
# code names the gate.  Architecturally (0x21 << 3) | IDT | EXT = 0x10B; QEMU's
# TCG, the rig's "hardware", reports 0x21 * 16 + 2 = 0x212 (its 64-bit IDT code
# scales by the gate size and sets no EXT bit).  KVM passes it through.
NP_ERROR_CODES = (0x10B, 0x212)
# CPUID 0x8000000A as the rig's kvm_amd offers it: revision 1, 8 ASIDs, NP | VmcbClean |
# SVME_ADDR_CHK, no NRIPS (docs/facts.md#rig-nested-svm).  The [sim] items of the state and
# VMRUN tests run the simulator with it, as the rig's kvm_amd runs L1.
RIG_SVM_LEAF = CpuidEntry(0x8000000A, 0, 0, 0x1, 0x8, 0, 0x10000021)


def rig_cpuid():
    """The simulator's CPUID table with the rig's SVM leaf (imported here: the rig has no unicorn)."""
    from kvmharness.sim.cpumodel import SUPPORTED_CPUID

    return SUPPORTED_CPUID.with_entry(RIG_SVM_LEAF)


def nested_machine(backend: str, guest: str = "nested-cpuid") -> Machine:
    """A Machine for a nested guest: /dev/kvm, or the simulator with the rig's SVM leaf."""
    if backend == "kvm":
        return Machine.for_guest(guest, "kvm")
    from kvmharness.sim.system import SimSystem

    return Machine.for_guest(guest, SimSystem(supported_cpuid=rig_cpuid()))


def exit_sequence(reports) -> list[dict]:
    """The #VMEXITs L1 reported, in order, as dicts of FIELDS."""
    values = dict(reports)
    out = []
    for n in range(values.get(KEY_EXITS, 0)):
        out.append({f: values[(n << 8) | i] for i, f in enumerate(FIELDS)})
    return out


def _locate(image: bytes, start: int, opcodes) -> list[tuple[int, int]]:
    """(guest address, length) of each opcode, each searched after the previous one."""
    out, offset = [], start - P.GUEST_LOAD_ADDR
    for opcode in opcodes:
        offset = image.index(opcode, offset)
        out.append((P.GUEST_LOAD_ADDR + offset, len(opcode)))
        offset += len(opcode)
    return out


def _exit(code, rip, length=0, nrips=False, info1=0, info2=0, int_info=0) -> dict:
    return {"exit_code": code, "exit_info_1": info1, "exit_info_2": info2,
            "next_rip": rip + length if nrips and code >= 0x60 else 0,
            "rip": rip, "exit_int_info": int_info, "event_inj": 0}


def expected_sequence(guest: str, reports) -> list[dict]:
    """What L1 must see on KVM's nested SVM, from the image bytes and L1's NRIPS bit.

    RIP: the intercepted instruction (for exception intercepts the faulting
    one; for an exception while delivering an event, the instruction the event
    interrupted).  next_rip: the following instruction for an instruction
    intercept when the vCPU offers NRIPS, else 0 (KVM copies next_rip into
    L1's VMCB only for a vCPU with NRIPS; L1 leaves the field 0).  EXITINFO1:
    IOIO's port/size/direction bits, an exception's error code, else 0;
    EXITINFO2: the next RIP for IOIO, else 0.  EVENTINJ: 0 after every exit
    (an injected event is either delivered or moved to EXITINTINFO).
    """
    values = dict(reports)
    image = get_guest(guest).load()
    entry = values[KEY_L2_ENTRY]
    nrips = bool(values[KEY_SVM_FEATURES] & SVM_EDX_NRIPS)
    if guest == "nested-cpuid":
        # skip the benchmark prologue: the sequence starts at the leaf-0 CPUID
        start = P.GUEST_LOAD_ADDR + image.index(b"\x31\xc0\x31\xc9\x0f\xa2", entry - P.GUEST_LOAD_ADDR)
        (c0, n), (c1, _), (out, lo), (vm, lv), (hlt, _) = _locate(
            image, start, (CPUID, CPUID, OUT_7A, VMMCALL, HLT))
        return [_exit(0x72, c0, n, nrips), _exit(0x72, c1, n, nrips),
                _exit(0x7B, out, lo, nrips, info1=0x7A << 16 | 0x10, info2=out + lo),  # OUT, 8-bit
                _exit(0x81, vm, lv, nrips), _exit(0x78, hlt, 1, nrips)]
    if guest == "nested-ud":
        (ud, _), (gp, _), (vm1, lv), (vm2, _), (hlt, _), (isr_vm, _) = _locate(
            image, entry, (UD2, LOAD_NONCANONICAL, VMMCALL, VMMCALL, HLT, VMMCALL))
        return [_exit(0x46, ud), _exit(0x4D, gp),
                _exit(0x81, vm1, lv, nrips), _exit(0x81, isr_vm, lv, nrips),
                _exit(0x81, vm2, lv, nrips),
                _exit(0x4B, hlt, info1=NP_ERROR_CODES[0], int_info=0x80000021),
                _exit(0x78, hlt, 1, nrips)]
    raise ValueError(f"no expected sequence for {guest!r}")


def comparable(seq: list[dict]) -> list[dict]:
    """A sequence with the values CPUs may differ in made equal: IOIO's
    address-size bits (see IOIO_ASIZE_MASK) and #NP's error-code encoding."""
    out = []
    for e in seq:
        if e["exit_code"] == 0x7B:
            e = dict(e, exit_info_1=e["exit_info_1"] & ~IOIO_ASIZE_MASK)
        elif e["exit_code"] == 0x4B and e["exit_info_1"] in NP_ERROR_CODES:
            e = dict(e, exit_info_1=NP_ERROR_CODES[0])
        out.append(e)
    return out


def save_artifact(name: str, data: dict) -> None:
    """Write data as JSON into $KVMHARNESS_TRACE_DIR (fetched home by `rig run`)."""
    folder = os.environ.get("KVMHARNESS_TRACE_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"nested-{name}.json").write_text(json.dumps(data, indent=2) + "\n")


def _hex_seq(seq):
    return [{k: hex(v) for k, v in e.items()} for e in seq]


# --- the exit sequences ----------------------------------------------------------

def test_nested_cpuid_l1_sees_each_l2_exit_as_kvm_amd_reflects_it(backend):
    r = run_guest("nested-cpuid", backend, trace=True)
    assert r.ok, r.describe()
    seq = exit_sequence(r.reports)
    want = expected_sequence("nested-cpuid", r.reports)
    assert [e["exit_code"] for e in seq] == [0x72, 0x72, 0x7B, 0x81, 0x78]
    assert comparable(seq) == want, (_hex_seq(seq), _hex_seq(want))
    values = r.values
    assert values[KEY_NRIPS_USED] == int(bool(values[KEY_SVM_FEATURES] & SVM_EDX_NRIPS))
    # L2's OUT to a port L1 does not intercept went past L1 to the host, once
    l2_outs = [t.exit for t in r.exits if isinstance(t.exit, IoOut) and t.exit.port == P.BENCH_PORT]
    assert [(e.size, e.data) for e in l2_outs] == [(1, b"\xa5")]
    if backend == "sim":
        # the model's hardware view: one VMRUN (exit 0x80, handled in the "kernel") per L2 entry,
        # and each of the five reported exits reflected to L1
        handled = [(t.exit_code, t.handled) for t in r.hw_trace if t.handled == "L1" or t.exit_code == 0x80]
        assert handled == [(0x80, "kernel"), (0x72, "L1")] * 2 + [
            (0x80, "kernel"), (0x7B, "L1"), (0x80, "kernel"), (0x81, "L1"), (0x80, "kernel"), (0x78, "L1")]
        return
    # the kernel's own view: one VMRUN emulation per L2 entry, one reflected exit per L1 report
    events = Counter(e.event for e in r.kernel_trace)
    assert r.kernel_trace_error is None, r.kernel_trace_error
    injected = [e for e in r.kernel_trace if e.event == "kvm_nested_vmexit_inject"]
    assert [e.text.split()[1] for e in injected] == ["cpuid", "cpuid", "io", "hypercall", "hlt"]
    assert events["kvm_nested_vmenter"] + events["kvm_nested_vmrun"] >= 5
    vmenters = [e for e in r.kernel_trace if e.event in ("kvm_nested_vmenter", "kvm_nested_vmrun")]
    assert all(f"vmcb: 0x{VMCB_PA:016x}" in e.text or f"vmcb: {VMCB_PA:#x}" in e.text for e in vmenters)
    save_artifact("cpuid", {
        "guest": "nested-cpuid", "svm_features_edx": values[KEY_SVM_FEATURES],
        "l2_entry": values[KEY_L2_ENTRY], "sequence": seq, "expected": want,
        "reports": [[k, v] for k, v in r.reports], "userspace_exits": r.exit_count,
        "kernel_events": dict(events),
        "nested_trace": [e.event + ": " + e.text for e in r.kernel_trace if e.event.startswith("kvm_nested")],
        "final_vmcb_hex": None})


def test_nested_cpuid_final_vmcb_as_l1_left_it(backend):
    """The whole VMCB after the last #VMEXIT (HLT); on kvm saved for the simulator to match
    byte for byte (test_nested_sim.py holds the rig's copy)."""
    m = Machine.for_guest("nested-cpuid", backend)
    try:
        r = m.run(60)
        assert r.ok, r.describe()
        vmcb = m.vm.read(VMCB_PA, 4096)
    finally:
        m.close()

    def u32(off):
        return struct.unpack_from("<I", vmcb, off)[0]

    def u64(off):
        return struct.unpack_from("<Q", vmcb, off)[0]

    assert u64(0x70) == 0x78 and u64(0x78) == 0 and u64(0x80) == 0       # exit code HLT
    assert u32(0x0C) == (1 << 18) | (1 << 24) | (1 << 27) | (1 << 31)     # L1's intercepts, unchanged
    assert u32(0x10) == 0b11 and u32(0x58) == 1 and u64(0x40) == IOPM_PA
    assert u64(0x88) == 0 and u32(0xA8) == 0                              # no EXITINTINFO, no EVENTINJ
    assert u64(0x578) == dict(r.reports)[(4 << 8) | FIELDS.index("rip")]  # save.RIP = the HLT
    assert u64(0x5F8) == 0x1235                                          # save.RAX: VMMCALL's answer
    assert u64(0x4D0) & 0x1500 == 0x1500                                  # EFER: SVME, LMA, LME
    if backend == "kvm":
        nonzero = {f"{off:#05x}": u64(off) for off in range(0, 4096, 8) if u64(off)}
        save_artifact("final-vmcb", {"guest": "nested-cpuid", "vmcb_pa": VMCB_PA,
                                     "nonzero_qwords": {k: hex(v) for k, v in nonzero.items()},
                                     "vmcb_hex": vmcb.hex()})


def test_nested_ud_exception_intercepts_and_event_injection(backend):
    r = run_guest("nested-ud", backend, trace=True)
    assert r.ok, r.describe()
    seq = exit_sequence(r.reports)
    want = expected_sequence("nested-ud", r.reports)
    assert [e["exit_code"] for e in seq] == [0x46, 0x4D, 0x81, 0x81, 0x81, 0x4B, 0x78]
    assert comparable(seq) == want, (_hex_seq(seq), _hex_seq(want))
    if backend == "sim":
        return  # the kernel tracepoints below are KVM's own
    injected = [e.text.split()[1] for e in r.kernel_trace if e.event == "kvm_nested_vmexit_inject"]
    assert injected == ["UD", "GP", "hypercall", "hypercall", "hypercall", "NP", "hlt"]
    # KVM entered L2 with L1's EVENTINJ: the interrupts L1 asked for, once each
    vmenter_inj = [e.text.split("event_inj: ")[1].split()[0] for e in r.kernel_trace
                   if e.event == "kvm_nested_vmenter"]
    assert [int(v, 16) for v in vmenter_inj] == [0, 0, 0, 0x80000020, 0, 0x80000021, 0]
    save_artifact("ud", {"guest": "nested-ud", "sequence": seq, "expected": want,
                         "reports": [[k, v] for k, v in r.reports],
                         "nested_trace": [e.event + ": " + e.text for e in r.kernel_trace
                                          if e.event.startswith("kvm_nested")]})


def test_vmrun_with_asid_0_is_vmexit_invalid_and_l1_recovers(backend):
    """KVM's VMRUN consistency check (nested_vmcb_check_controls: ASID 0) fails the
    VMRUN with exit code -1 and EXITINFO 0, L2 never runs; the next VMRUN works."""
    m = nested_machine(backend)
    try:
        normal = m.run(60)
    finally:
        m.close()
    m = nested_machine(backend)
    try:
        m.vm.write(NESTED_PARAMS_PA + 8, struct.pack("<Q", 1))  # PARAM_INVALID_FIRST
        r = m.run(60)
    finally:
        m.close()
    assert normal.ok and r.ok, (normal.describe(), r.describe())
    seq = exit_sequence(r.reports)
    entry = dict(r.reports)[KEY_L2_ENTRY]
    assert seq[0] == {"exit_code": 2**64 - 1, "exit_info_1": 0, "exit_info_2": 0, "next_rip": 0,
                      "rip": entry, "exit_int_info": 0, "event_inj": 0}
    assert seq[1:] == exit_sequence(normal.reports)
    if backend == "kvm":
        save_artifact("invalid", {"sequence": seq})


# --- nested state: snapshot in the middle of L2 ---------------------------------------

def test_nested_state_snapshot_mid_l2_restores_in_place_and_in_a_fresh_vm(backend):
    from kvmharness.kvm.nested import FORMAT_SVM, HEADER_SIZE, VMCB_SIZE

    # the backend contract's nested-state methods (kvm/nested.py, sim/nested.py under them)
    m = nested_machine(backend)
    try:
        baseline = m.run(60)
    finally:
        m.close()
    assert baseline.ok, baseline.describe()
    snap: dict = {}

    def at_l2_out(machine, e):
        # L2's OUT to BENCH_PORT reaches the host while the vCPU is in guest mode
        if snap or not (isinstance(e, IoOut) and e.port == P.BENCH_PORT):
            return False
        vcpu = machine.vcpu
        vcpu.complete_pending_exit()  # finish the OUT: registers at an instruction boundary
        state = vcpu.get_nested_state()
        snap.update(state=state, regs=vcpu.get_regs(), sregs=vcpu.get_sregs(),
                    msrs=vcpu.get_msrs([MSR_VM_HSAVE_PA]), ram=machine.vm.read(0, machine.memory),
                    reports=len(machine._reports))
        vcpu.set_nested_state(state)  # and back into the same vCPU
        return backend == "kvm"  # kvm: the OUT is complete already, the machine must not answer it

    m = nested_machine(backend)
    try:
        m.on_exit(at_l2_out)
        r = m.run(60)
        io_rip_past = backend == "kvm" or m.system.profile.io_rip_past
    finally:
        m.close()
    assert r.ok, r.describe()
    assert r.reports == baseline.reports
    st = snap["state"]
    assert st.format == FORMAT_SVM and st.guest_mode and st.gif_set and not st.run_pending
    assert st.flag_names == ["guest-mode", "gif-set"]
    assert st.size == HEADER_SIZE + VMCB_SIZE and st.vmcb_pa == VMCB_PA
    ctl = st.vmcb
    assert struct.unpack_from("<I", ctl, 0x0C)[0] == (1 << 18) | (1 << 24) | (1 << 27) | (1 << 31)
    assert struct.unpack_from("<I", ctl, 0x10)[0] == 0b11
    assert struct.unpack_from("<Q", ctl, 0x40)[0] == IOPM_PA
    l1_efer, l1_cr3 = struct.unpack_from("<Q", ctl, 0x4D0)[0], struct.unpack_from("<Q", ctl, 0x550)[0]
    assert l1_efer & 0x1000 and l1_cr3 == P.BOOT_PML4        # the save area is L1's own state
    values = dict(baseline.reports)
    vmmcall_rip = values[(3 << 8) | FIELDS.index("rip")]
    # L2's `out $0xa5, %al` (2 bytes) then `mov $0x1234, %eax` (5): RIP past the OUT once it is
    # complete (kvm after complete_pending_exit; the sim's kvm_pvm profile), else at the OUT
    assert snap["regs"].rip == (vmmcall_rip - 5 if io_rip_past else vmmcall_rip - 7)
    assert snap["msrs"] == {MSR_VM_HSAVE_PA: 0x100000}

    # A fresh VM with the same memory, L2's registers and the nested state continues in L2.
    m2 = nested_machine(backend)
    try:
        m2.vm.write(0, snap["ram"])
        m2.vcpu.set_sregs(snap["sregs"])
        m2.vcpu.set_regs(snap["regs"])
        m2.vcpu.set_msrs(snap["msrs"])
        m2.vcpu.set_nested_state(st)
        assert m2.vcpu.get_nested_state().guest_mode
        r2 = m2.run(60)
    finally:
        m2.close()
    assert r2.ok, r2.describe()
    assert r2.reports == baseline.reports[snap["reports"]:]  # the rest: exits 3 (VMMCALL) and 4 (HLT)
    assert [k for k, _ in r2.reports][:len(FIELDS)] == [0x300 + i for i in range(len(FIELDS))]

    # Guest mode needs EFER.SVME in the vCPU first: a fresh vCPU still in the boot
    # state (no SVME) is refused, with the order spelled out.
    m4 = nested_machine(backend)
    try:
        with pytest.raises(KvmError, match="KVM_SET_NESTED_STATE.*EINVAL.*SVME") as refused:
            m4.vcpu.set_nested_state(st)
        assert refused.value.errno == errno.EINVAL
    finally:
        m4.close()

    # Control: the same registers and memory without the nested state run L2's code as
    # L1: VMMCALL is then KVM's own hypercall (unknown number: RAX = -KVM_ENOSYS) and
    # the HLT stops the vCPU instead of exiting to L1.
    m3 = nested_machine(backend)
    try:
        m3.vm.write(0, snap["ram"])
        m3.vcpu.set_sregs(snap["sregs"])
        m3.vcpu.set_regs(snap["regs"])
        r3 = m3.run(60)
        vmmcall_ud = backend == "sim" and m3.system.profile.vmmcall_ud
    finally:
        m3.close()
    if vmmcall_ud:  # the sim's kvm_pvm profile: VMMCALL is #UD there, as on kvm_pvm
        assert r3.outcome == "exception" and r3.exception_vector == 6 and r3.reports == []
    else:
        assert r3.outcome == "hlt" and r3.reports == []
        assert r3.regs.rax == (-1000) & (2**64 - 1)
        assert r3.regs.rip == values[(4 << 8) | FIELDS.index("rip")] + 1
    if backend == "kvm":
        save_artifact("state", {"nested_state": st.to_dict(), "l2_rip": snap["regs"].rip,
                                "reports_after_restore": [[k, v] for k, v in r2.reports]})


# --- the kernel's exit codes for the plain guests -------------------------------------

def _kvm_exit_codes(r) -> Counter:
    return Counter(e.exit_code for e in r.kernel_trace if e.event == "kvm_exit")


def test_kvm_exit_codes_of_the_plain_guests_are_the_svm_codes():
    """kvm_exit on kvm_amd prints the SVM exit code of every exit of the guest.

    Exactly: CPUID 0x72 per CPUID, MSR 0x7C per RDMSR/WRMSR, IOIO 0x7B for
    port IO, NPF 0x400 for each MMIO access (and for the first touch of a
    page, which KVM maps lazily).  Anything else is only a host interrupt
    (0x60) arriving while the guest ran.
    """
    seen = {}
    lazy = {0x400, 0x60, 0x61, 0x64, 0x77}  # NPF, INTR, NMI, VINTR, PAUSE: the host's business
    for guest in ("cpuid", "hello64", "msr", "mmio"):
        r = run_guest(guest, "kvm", trace=True)
        assert r.ok, r.describe()
        assert r.kernel_trace_error is None, r.kernel_trace_error
        codes = _kvm_exit_codes(r)
        assert None not in codes, [e.text for e in r.kernel_trace if e.event == "kvm_exit"][:5]
        io_outs = sum(1 for t in r.exits if isinstance(t.exit, IoOut))
        mmio = sum(1 for t in r.exits if isinstance(t.exit, (MmioRead, MmioWrite)))
        if guest == "cpuid":
            assert codes[0x72] == 9 and codes[0x7B] == io_outs
        elif guest == "hello64":
            # rep outsb: KVM's emulator runs the iterations, so IOIO kvm_exits and
            # userspace exits need not pair up one to one
            assert codes[0x72] == 0 and codes[0x7C] == 0 and codes[0x7B] >= 1
        elif guest == "msr":
            assert codes[0x7C] == 4 and codes[0x7B] == io_outs
        elif guest == "mmio":
            mmio_npf = [e for e in r.kernel_trace if e.event == "kvm_exit" and e.exit_code == 0x400
                        and P.MMIO_TEST_ADDR <= e.fields["info2"] < P.MMIO_TEST_ADDR + 0x1000]
            assert len(mmio_npf) == mmio and codes[0x7B] == io_outs
        assert set(codes) - lazy <= {0x72, 0x7B, 0x7C}
        seen[guest] = {hex(k): v for k, v in sorted(codes.items())}
    save_artifact("plain-kvm-exit-codes", seen)


# --- how fast ----------------------------------------------------------------------

def test_nested_exit_rate_benchmark(backend):
    """Nested #VMEXITs per second: L2 runs N intercepted CPUIDs that L1 emulates silently.

    Checks only that the run is correct; the rate is printed and, on kvm, saved for the
    rig (never asserted: a timing is a benchmark's number, not a test's verdict).
    """
    loops = int(os.environ.get("KVMHARNESS_NESTED_BENCH_LOOPS", "2000" if backend == "kvm" else "500"))

    def timed(n: int) -> tuple[float, object]:
        m = nested_machine(backend)
        try:
            m.vm.write(NESTED_PARAMS_PA, struct.pack("<Q", n))
            t0 = time.perf_counter()
            r = m.run(120)
            return time.perf_counter() - t0, r
        finally:
            m.close()

    timed(0)  # warm: the image, imports, a first engine
    base_t, base = timed(0)
    t, r = timed(loops)
    assert base.ok and r.ok, (base.describe(), r.describe())
    assert r.reports == base.reports  # the benchmark's exits are not reported
    extra = t - base_t
    if extra > 0:
        per_exit = extra / loops
        rate = (f"{1 / per_exit:,.0f} nested exits/s ({per_exit * 1e6:.1f} us per exit round trip)")
    else:  # the loop ran within the noise of the baseline run: no rate to report
        per_exit = None
        rate = "too fast to time against the baseline run"
    line = (f"{backend} nested exits: {loops} L2 CPUID #VMEXITs to L1 in {extra:.3f} s -> {rate}; "
            f"whole nested-cpuid run {base_t * 1e3:.1f} ms for 5 reported exits")
    print(line)
    if backend == "kvm":
        save_artifact("bench", {"loops": loops, "seconds": extra, "baseline_run_s": base_t,
                                "nested_exits_per_s": 1 / per_exit if per_exit else None,
                                "us_per_nested_exit": per_exit * 1e6 if per_exit else None,
                                "line": line})
