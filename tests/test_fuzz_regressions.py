"""Regression guests: minimal instruction lists for the classes ``kvmharness fuzz`` found.

Each was a kvm != sim mismatch on a kvm_pvm host (issue 12), shrunk by hand from the
fuzzer's report to one op.  Each runs
* on the simulator with the kvm_pvm profile, asserting what real KVM was measured doing
  (the ``check``; the measurement is the fuzz run of 2026-12-01 on this project's hosts), and
* on kvm and the simulator together where /dev/kvm works: equal at every exit.
"""

import shutil

import pytest

from kvmharness.backend import kvm_usable
from kvmharness.exits import KVM_MSR_EXIT_REASON_FILTER as FILTER, KVM_MSR_EXIT_REASON_INVAL as INVAL
from kvmharness.exits import KVM_MSR_EXIT_REASON_UNKNOWN as UNKNOWN
from kvmharness.fuzz import gen as G
from kvmharness.fuzz import gen_real as GR
from kvmharness.fuzz import runner as R
from kvmharness.sim.system import SimSystem

KVM_OK, KVM_WHY = kvm_usable()
pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "objcopy", "nm")),
                                reason="assembling fuzz guests needs binutils (as, objcopy, nm)")
RF = 1 << 16
START = 0x8000


def _exits(rec, kind):
    return [(e, r) for e, r in rec.steps if e["exit"] == kind]


def _check_rmw(rec):
    (e1, r1), (e2, r2) = rec.steps[0], rec.steps[1]
    assert e1["exit"] == "MmioRead" and e2["exit"] == "MmioWrite" and e2["addr"] == e1["addr"]
    assert r2["rip"] > r1["rip"]  # the write exit comes with the instruction complete


def _check_store_rip(rec):
    (e, r), = _exits(rec, "MmioWrite")
    assert r["rip"] == R.op_ranges(_guest("store-rip-past"))[0][1]  # past the store


def _check_pop(rec):
    (e, r), = _exits(rec, "MmioWrite")
    assert r["rsp"] == G.MEMORY_SIZE  # the POP's RSP update is done at the write exit


def _check_in_rax(rec):
    (e, r), = _exits(rec, "IoIn")
    assert r["rax"] == 0x1122334455667788  # the old RAX until the IN is completed
    assert e["size"] == 2


def _check_rep_outs_rf(rec):
    outs = [(e, r) for e, r in _exits(rec, "IoOut") if e["port"] == 0x60]
    assert len(outs) == 3 and all(r["rflags"] & RF for _e, r in outs)  # the last one's too
    assert not rec.steps[-1][1]["rflags"] & RF


def _check_rep_insw_down(rec):
    (e, _r), = _exits(rec, "IoIn")
    assert e["count"] == 3
    # element i of the answer lands at RDI - 2*i: the first element at the highest address
    data = R.Devices(0).port_in(_FakeIn(e))
    base = 0x200
    got = [rec.ram[base - 2 * i:base - 2 * i + 2] for i in range(3)]
    assert got == [data[2 * i:2 * i + 2] for i in range(3)]


class _FakeIn:
    def __init__(self, e):
        self.port, self.size, self.count = e["port"], e["size"], e["count"]


def _check_stos_down(rec):
    w = _exits(rec, "MmioWrite")
    assert [e["addr"] for e, _r in w] == [G.MMIO_BASE + 0x40, G.MMIO_BASE + 0x3E]
    assert all(r["rflags"] & RF for _e, r in w)


def _check_lstar(rec):
    (e, _r), = _exits(rec, "MsrWrite")
    assert e["index"] == 0xC0000082 and e["msr_reason"] == INVAL


def _check_mtrr_gp(rec):
    assert rec.outcome == "exception" and rec.detail.startswith("vector 13")


def _check_mtrrcap(rec):
    (e, _r), = _exits(rec, "MsrWrite")
    assert e["index"] == 0xFE and e["msr_reason"] == UNKNOWN


def _check_fetch(rec):
    e, r = rec.steps[-1]
    assert e["exit"] == "InternalError" and e["data"][0] == 0 and r["rip"] == G.MEMORY_SIZE


def _check_int3(rec):
    e, r = rec.steps[-1]
    assert e["exit"] == "InternalError" and e["data"][1] & 0xFF == 15 and (e["data"][1] >> 8) & 0xFF == 0xCC


def _check_cmpxchg_miss(rec):
    (e1, _), (e2, r2) = rec.steps[0], rec.steps[1]
    assert e1["exit"] == "MmioRead" and e2["exit"] == "MmioWrite"  # written even though it failed
    assert r2["rflags"] & 0x40 == 0


def _readback(rec):
    lo, hi = (int.from_bytes(bytes.fromhex(e["data"]), "little") for e, _r in rec.steps
              if e["exit"] == "IoOut" and e["port"] in (0x70, 0x71))
    return hi << 32 | lo


def _check_sysenter_esp(rec):
    v, got = 0x62643D8EC3A8D666, _readback(rec)
    # canonical for the host's virtual-address width (57 with LA57, else 48), low bits kept
    assert got != v and got & (2**48 - 1) == v & (2**48 - 1)
    assert got in (v & (2**57 - 1), v & (2**48 - 1))


def _check_sysenter_cs(rec):
    assert _readback(rec) == 0x8100000012345678  # KVM's copy, whole (the CPU keeps 16 bits)


_READBACK = ["xor %eax, %eax", "xor %edx, %edx", "rdmsr", "out %eax, $0x70", "mov %edx, %eax", "out %eax, $0x71"]
REGRESSIONS = {
    "wrmsr-sysenter-esp-canonical": (["mov $0x175, %ecx", "mov $0xc3a8d666, %eax", "mov $0x62643d8e, %edx",
                                      "wrmsr", *_READBACK], 0, _check_sysenter_esp),
    "wrmsr-sysenter-cs-whole": (["mov $0x174, %ecx", "mov $0x12345678, %eax", "mov $0x81000000, %edx", "wrmsr",
                                 *_READBACK], 0, _check_sysenter_cs),
    # name: (lines, MSR user-exit reasons, check)
    "rmw-add-mmio": (["addl $5, 0x10(%r15)"], 0, _check_rmw),
    "xchg-mmio": (["xchgq %rbx, 0x18(%r15)"], 0, _check_rmw),
    "cmpxchg-miss-mmio": (["mov $-1, %rax", "lock cmpxchgl %ebx, 0x20(%r15)"], 0, _check_cmpxchg_miss),
    "bts-mmio": (["btsq $33, 0x28(%r15)"], 0, _check_rmw),
    "store-rip-past": (["movl %ebx, 0x20(%r15)"], 0, _check_store_rip),
    "pop-to-mmio": (["push %rbx", "popq 0x30(%r15)"], 0, _check_pop),
    "in-old-rax": (["mov $0x1122334455667788, %rax", "mov $0x1234, %edx", "in %dx, %ax"], 0, _check_in_rax),
    "rep-outsb-rf": (["mov $0x60, %edx", "lea 0x100(%r14), %rsi", "mov $3, %ecx", "rep outsb"], 0,
                     _check_rep_outs_rf),
    "rep-insw-df1": (["mov $0x1234, %edx", "lea 0x200(%r14), %rdi", "mov $3, %ecx", "std", "rep insw", "cld"],
                     0, _check_rep_insw_down),
    "rep-stosw-df1-mmio": (["lea 0x40(%r15), %rdi", "mov $2, %ecx", "std", "rep stosw", "cld"], 0,
                           _check_stos_down),
    "wrmsr-lstar-noncanonical": (["mov $0xc0000082, %ecx", "mov $0x87e414f8, %eax", "mov $0xeaded544, %edx",
                                  "wrmsr"], INVAL | FILTER, _check_lstar),
    "wrmsr-mtrr-reserved": (["mov $0x200, %ecx", "mov $0x37e23206, %eax", "mov $0x6e, %edx", "wrmsr"], 0,
                            _check_mtrr_gp),
    "wrmsr-mtrrcap": (["mov $0xfe, %ecx", "xor %eax, %eax", "xor %edx, %edx", "wrmsr"], UNKNOWN | INVAL,
                      _check_mtrrcap),
    "fetch-off-ram": ([f"mov ${G.MEMORY_SIZE - 2:#x}, %rax", "movw $0x9090, (%rax)", "jmp *%rax"], 0,
                      _check_fetch),
    "int3-cpl0": (["int3"], 0, _check_int3),
}


def _check_real_int(rec):
    (e, r), = [(e, r) for e, r in _exits(rec, "IoOut") if e["port"] == GR.SOFT_INT_PORT]
    assert e["data"] == "41" and not r["rflags"] & (1 << 9)  # the handler ran, IF cleared
    assert rec.outcome == "end"


def _check_real_les(size):
    def check(rec):
        e, _r = rec.steps[0]
        assert (e["exit"], e["addr"], e["size"]) == ("MmioRead", 0xD0010, size)  # one read
        assert rec.outcome == "end" and rec.regs["rcx"] & 0xFFFF == int.from_bytes(
            R.Devices(0).mmio[0x10:0x12], "little")
    return check


def _check_real_ivt_limit(rec):
    # kvm_pvm's emulator reads the IVT entry whatever the limit: the #UD handler runs
    assert rec.outcome == "exception" and rec.detail.startswith("vector 6 ")


def _check_real_rep_insw_cx(rec):
    (e, _r), = _exits(rec, "IoIn")
    assert e["count"] == 3  # CX counts in 16-bit addressing, not ECX
    assert rec.regs["rcx"] == 0xABCD0000 and rec.regs["rdi"] & 0xFFFF == 0x106
    data = R.Devices(0).port_in(_FakeIn(e))
    assert rec.ram[0x100:0x106] == data  # at ES:DI, ES = the scratch segment


def _check_real_rep_insb_df1_wrap(rec):
    ins = _exits(rec, "IoIn")
    # in_page is offset_in_page(DI) bytes: 1 element, then DI=0 -> at least 1, then DI wraps
    assert [e["count"] for e, _r in ins] == [1, 1, 1]
    assert rec.regs["rdi"] & 0xFFFF == 0xFFFE and rec.regs["rcx"] & 0xFFFF == 0


REAL_REGRESSIONS = {
    "real-int-n-ivt": (["int $0x41"], _check_real_int),
    "real-lesl-6-bytes": (["lesl %fs:0x10, %ecx"], _check_real_les(6)),
    "real-lesw-4-bytes": (["les %fs:0x10, %cx"], _check_real_les(4)),
    "real-ivt-limit-0": (["xor %ax, %ax", "mov %ax, %ds", "push $0", "push $0", "push $0", "mov %sp, %bx",
                          "lidt (%bx)", "ud2"], _check_real_ivt_limit),
    "real-rep-insw-cx": ([f"mov ${GR.RAM_SEG:#x}, %ax", "mov %ax, %es", "mov $0x1234, %dx", "mov $0x100, %di",
                          "mov $0xabcd0003, %ecx", "cld", "rep insw"], _check_real_rep_insw_cx),
    "real-rep-insb-df1-wrap": ([f"mov ${GR.RAM_SEG:#x}, %ax", "mov %ax, %es", "mov $0x60, %dx", "mov $1, %di",
                                "mov $3, %cx", "std", "rep insb", "cld"], _check_real_rep_insb_df1_wrap),
}


def _real_guest(name):
    lines, _check = REAL_REGRESSIONS[name]
    return G.Guest(0, [G.Op(name, list(lines))], GR.base_prologue() + ["mov $0x01234567, %ebx"], 0,
                   mode="real")


@pytest.mark.parametrize("name", sorted(REAL_REGRESSIONS))
def test_real_mode_sim_kvm_pvm_profile_does_what_kvm_did(name):
    with SimSystem(profile="kvm_pvm") as system:
        rec = R.run(R.Target("sim", system, system.capabilities.supported_cpuid), _real_guest(name))
    REAL_REGRESSIONS[name][1](rec)


def test_real_mode_ivt_limit_is_the_cpus_on_kvm_amd():
    """kvm_amd guests get their events from the CPU (EVENTINJ), which checks the IVT limit:
    #UD beyond it -> #GP -> #DF -> shutdown (APM vol 2, 8.2 / 16.x; checked on the rig by
    tests/test_fuzz_rig.py)."""
    with SimSystem(profile="kvm_amd") as system:
        rec = R.run(R.Target("sim", system, system.capabilities.supported_cpuid), _real_guest("real-ivt-limit-0"))
    assert rec.outcome == "shutdown"


@pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")
@pytest.mark.parametrize("name", sorted(REAL_REGRESSIONS))
def test_real_mode_kvm_and_sim_agree(name):
    _assert_kvm_and_sim_agree(name, _real_guest(name), REAL_REGRESSIONS[name][1])


def _assert_kvm_and_sim_agree(name, g, check):
    """``g`` on this host's KVM and on the simulator: the same exits; on kvm_pvm the real
    KVM also passes ``check`` (the regression's recorded behaviour)."""
    targets = R.open_targets(("kvm", "sim"))
    try:
        a, b = R.run(targets[0], g), R.run(targets[1], g)
        if targets[1].profile.name == "kvm_pvm":
            check(a)  # the real KVM does what the check says
        m = R.compare(g, a, b, R.cpuid_deviations(targets))
        assert m is None, f"{name}: {m.kind} at exit {m.step}: {m.detail}"
    finally:
        for t in targets:
            t.close()


def _guest(name):
    lines, reasons, _check = REGRESSIONS[name]
    g = G.Guest(0, [G.Op(name, list(lines))], [f"mov ${G.MMIO_BASE:#x}, %r15", f"mov ${G.RAM_BASE:#x}, %r14",
                                                "mov $0x0123456789abcdef, %rbx"], reasons)
    return g


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_sim_kvm_pvm_profile_does_what_kvm_did(name):
    with SimSystem(profile="kvm_pvm") as system:
        rec = R.run(R.Target("sim", system, system.capabilities.supported_cpuid), _guest(name))
    REGRESSIONS[name][2](rec)


@pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")
@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_kvm_and_sim_agree(name):
    _assert_kvm_and_sim_agree(name, _guest(name), REGRESSIONS[name][2])


def test_l2_vmmcall_not_intercepted_by_l1_is_ud_in_l2():
    """Nested: L1 leaves VMMCALL unintercepted, so KVM's vmcb02 does too (svm/nested.c
    recalc_intercepts) and the CPU raises #UD in L2 -- measured on the rig's kvm_amd by
    kvmharness fuzz --mode nested (and asserted there by tests/test_fuzz_rig.py)."""
    if not all(shutil.which(t) for t in ("cpp", "ld")):
        pytest.skip("nested fuzz guests are preprocessed and linked: cpp and ld needed")
    g = G.Guest(0, [G.Op("l2_vmmcall", ["mov $0xc, %eax", "vmmcall"])], [], 0, mode="nested")
    with SimSystem(profile="kvm_amd") as system:
        rec = R.run(R.Target("sim", system, system.capabilities.supported_cpuid), g)
    vmmcall = R.op_ranges(g)[0][1] - 3
    assert rec.outcome == "exception" and rec.detail == f"vector 6 at {vmmcall:#x}", rec.detail
    with SimSystem(profile="kvm_amd") as system:  # intercepted by L1: its #VMEXIT 0x81
        g2 = G.Guest(0, g.ops, ["orl $INTERCEPT_VMMCALL, VMCB(VMCB_INTERCEPT_W4)"], 0, mode="nested")
        rec = R.run(R.Target("sim", system, system.capabilities.supported_cpuid), g2)
    codes = [r["rcx"] for e, r in rec.steps if e.get("port") == 0xEB and e["data"] == "01" and r["rbx"] == 0]
    assert rec.outcome == "end" and codes == [0x81]
