"""The rig share of the differential fuzzing (issue 12): guests on the rig's kvm_amd == the
simulator with the kvm_amd profile, at every exit.

On the session's shared SVM rig in a box (tests/rig_fixtures.py: QEMU TCG with an EPYC
CPU, Debian's kernel with kvm_amd), in one trip (fuzz/rigpair.py: the wheel installed in
a fresh venv there, the guests' images uploaded, ``python -m kvmharness.fuzz.remote``
on the rig's /dev/kvm, the recordings fetched): a fixed seed set in both entry modes, and
one-op guests for each behaviour where kvm_amd and the project's kvm_pvm hosts differ
(sim/profile.py), each asserting what the real kvm_amd did and that the simulator agrees.

Skips, with the reason, where this host cannot boot the rig (not root, no QEMU, not
x86_64, the host has kvm_amd itself), with KVMHARNESS_RIG_TESTS=0, or without binutils.
"""

from __future__ import annotations

import shutil
import time

import pytest

from kvmharness.fuzz import gen as G
from kvmharness.fuzz import gen_real as GR
from kvmharness.fuzz import runner as R

pytestmark = pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "objcopy", "nm")),
                                reason="assembling fuzz guests needs binutils (as, objcopy, nm)")

#: the CI share: each seed in both modes (about 30 s on the TCG rig with the install)
RIG_SEEDS = range(0, 12)
#: nested SVM (L1's view of random intercepts and VMCB12 fields), compared with the profile of
#: the rig's CPU (fuzz/rigpair.py rig_profile: kvm_amd@qemu-tcg on the TCG rig).  The second
#: row are the seeds of the two classes that profile declares (sim/profile.py): IOIO
#: EXITINFO1 without the address size (QEMU TCG), a #BP EVENTINJ lost (kvm_amd, nrips=0).
NESTED_SEEDS = (0, 1, 2, 3, 4, 5, 6, 10,
                7, 8, 9, 14, 15, 16, 17, 35, 38, 40, 41, 44, 45, 48, 52, 69, 71, 81, 94, 99)
RF, IF = 1 << 16, 1 << 9


def _long(name, lines):
    return G.Guest(0, [G.Op(name, list(lines))], [f"mov ${G.MMIO_BASE:#x}, %r15", f"mov ${G.RAM_BASE:#x}, %r14",
                                                   "mov $0x0123456789abcdef, %rbx"], 0)


def _real(name, lines):
    return G.Guest(0, [G.Op(name, list(lines))], GR.base_prologue() + ["mov $0x01234567, %ebx"], 0, mode="real")


def _nested(name, lines, prologue=()):
    return G.Guest(0, [G.Op(name, list(lines))], list(prologue), 0, mode="nested")


def _l1_reports(rec):
    """L1's reports of each #VMEXIT (guests/include/svm.h l1_report_exit): [{field: value}]."""
    out: list = []
    for e, r in rec.steps:
        if e["exit"] == "IoOut" and e["port"] == 0xEB and e["data"] == "01" and r["rbx"] < 0xF000:
            n, f = divmod(r["rbx"], 256)
            while len(out) <= n:
                out.append({})
            out[n][f] = r["rcx"]
    return out


def _io_out(rec, port):
    return [(e, r) for e, r in rec.steps if e["exit"] == "IoOut" and e["port"] == port]


def _check_lone_outs(g, rec, cpuid):
    (e, r), = _io_out(rec, 0x60)
    assert r["rip"] == R.op_ranges(g)[0][1] and not r["rflags"] & RF  # complete: past it


def _check_rep_outs(g, rec, cpuid):
    outs = _io_out(rec, 0x60)
    assert len(outs) == 3 and all(r["rflags"] & RF for _e, r in outs)  # the last one's too
    rep_outsb = R.op_ranges(g)[0][1] - 2  # f3 6e, the op's last instruction
    assert all(r["rip"] == rep_outsb for _e, r in outs)  # on it, the last element's too


def _check_shutdown_init(g, rec, cpuid):
    e, r = rec.steps[-1]
    assert e["exit"] == "Shutdown" and r["rip"] == 0xFFF0 and r["rflags"] == 2
    assert r["rdx"] == cpuid.lookup(1).eax and r["rax"] == r["rbx"] == r["rsp"] == 0


def _check_misc_enable(g, rec, cpuid):
    (e, _r), = _io_out(rec, 0x70)
    assert int.from_bytes(bytes.fromhex(e["data"]), "little") == 0x1800  # PEBS/BTS unavailable


def _check_xsave_size(g, rec, cpuid):
    (e, r), = _io_out(rec, G.CPUID_PORTS[1])
    assert r["rbx"] & 0xFFFFFFFF == 576  # XCR0 = x87 only: the legacy area and the header


def _check_ivt_limit(g, rec, cpuid):
    assert rec.outcome == "shutdown"  # the CPU checks the IVT limit: #UD -> #GP -> #DF -> shutdown


def _check_real_int(g, rec, cpuid):
    (e, r), = _io_out(rec, GR.SOFT_INT_PORT)
    assert e["data"] == "41" and not r["rflags"] & IF and rec.outcome == "end"


def _check_fetch_npf(g, rec, cpuid):
    e, _r = rec.steps[-1]
    assert e["exit"] == "InternalError" and e["data"][0] == 0  # no instruction bytes
    assert e["data"][1] == 0x400 and e["data"][2] & 0x10 and e["data"][3] == GR.LAYOUT.memory_size  # #NPF, fetch


def _check_l2_vmmcall_ud(g, rec, cpuid):
    # L1 does not intercept VMMCALL: neither does KVM's vmcb02, so the CPU raises #UD in L2
    vmmcall = R.op_ranges(g)[0][1] - 3
    assert rec.outcome == "exception" and rec.detail == f"vector 6 at {vmmcall:#x}", rec.detail


def _check_ioio_info1_tcg(g, rec, cpuid):
    # QEMU TCG's IOIO EXITINFO1: port, SIZE8, no A64 (bits 7-9 clear), passed to L1 by kvm_amd
    first = _l1_reports(rec)[0]
    assert first[0] == 0x7B and first[1] == 0x7A0010, hex(first[1])


def _check_evtinj_bp_lost(g, rec, cpuid):
    # kvm_amd with nrips=0: the #BP never reaches L2, which runs to its HLT (intercepted)
    first = _l1_reports(rec)[0]
    assert rec.outcome == "end" and first[0] == 0x78 and first[5] == 0, (rec.outcome, first)
    assert first[4] == R.op_ranges(g)[0][1] - 1  # the HLT: the NOP before it ran


def _check_evtinj_ud_delivered(g, rec, cpuid):
    # the control: #UD as an exception reaches L2's IDT (L1's default handler reports it)
    assert rec.outcome == "exception" and rec.detail.startswith("vector 6 at "), rec.detail


_HLT = ["orl $0x1000000, VMCB(VMCB_INTERCEPT_W3)"]  # L1 intercepts HLT
SEG = (GR.LAYOUT.memory_size - 0x1000) >> 4
PROFILE_GUESTS = {
    "lone-outsb": (_long("lone-outsb", ["mov $0x60, %edx", "lea 0x100(%r14), %rsi", "outsb"]), _check_lone_outs),
    "rep-outsb": (_long("rep-outsb", ["mov $0x60, %edx", "lea 0x100(%r14), %rsi", "mov $3, %ecx", "rep outsb"]),
                  _check_rep_outs),
    "triple-fault": (_long("triple-fault", ["push $0", "push $0", "lidt 6(%rsp)", "ud2"]), _check_shutdown_init),
    "misc-enable": (_long("misc-enable", ["mov $0x1a0, %ecx", "rdmsr", "out %eax, $0x70"]), _check_misc_enable),
    "xsave-size": (_long("xsave-size", ["mov $0xd, %eax", "xor %ecx, %ecx", "cpuid",
                                        f"out %eax, ${G.CPUID_PORTS[1]:#x}"]), _check_xsave_size),
    "real-ivt-limit-0": (_real("real-ivt-limit-0", ["xor %ax, %ax", "mov %ax, %ds", "push $0", "push $0", "push $0",
                                                    "mov %sp, %bx", "lidt (%bx)", "ud2"]), _check_ivt_limit),
    "real-int-n": (_real("real-int-n", ["int $0x41"]), _check_real_int),
    "real-fetch-unbacked": (_real("real-fetch-unbacked", [f"mov ${SEG:#x}, %ax", "mov %ax, %ds",
                                                          "movw $0x9090, 0xffe", f"ljmp ${SEG:#x}, $0xffe"]),
                            _check_fetch_npf),
    "nested-l2-vmmcall": (_nested("nested-l2-vmmcall", ["mov $0xc, %eax", "vmmcall"]), _check_l2_vmmcall_ud),
    "nested-ioio-info1": (_nested("nested-ioio-info1", ["mov $0x5a, %al", "outb %al, $0x7a"],
                                  ["orl $0x8000000, VMCB(VMCB_INTERCEPT_W3)", "orb $0x4, IOPM_PA + 0xf"]),
                          _check_ioio_info1_tcg),
    "nested-evtinj-bp": (_nested("nested-evtinj-bp", ["nop", "hlt"], _HLT + ["movl $0x80000303, VMCB(VMCB_EVENT_INJ)"]),
                         _check_evtinj_bp_lost),
    "nested-evtinj-ud": (_nested("nested-evtinj-ud", ["nop", "hlt"], _HLT + ["movl $0x80000306, VMCB(VMCB_EVENT_INJ)"]),
                         _check_evtinj_ud_delivered),
}
SEED_GUESTS = [(f"{mode}-{seed}", G.generate(seed, mode=mode)) for seed in RIG_SEEDS for mode in ("long64", "real")]
SEED_GUESTS += [(f"nested-{seed}", G.generate(seed, mode="nested")) for seed in NESTED_SEEDS]


@pytest.fixture(scope="module")
def rig_share(svm_rig):
    """The whole share on the shared rig in one trip, then the simulator here on each guest."""
    from kvmharness.fuzz import rigpair as RP
    from kvmharness.remote.inventory import load_inventory

    rig, = load_inventory(svm_rig.inventory)
    named = SEED_GUESTS + [(k, g) for k, (g, _c) in PROFILE_GUESTS.items()]
    t0 = time.monotonic()
    batch = RP.run_on_rig(rig, [g for _k, g in named], timeout=600)
    results = RP.compare_batch([g for _k, g in named], batch, profile=RP.rig_profile(rig))
    by_name = {k: r for (k, _g), r in zip(named, results, strict=True)}
    print(f"rig share: {len(named)} guests, rig round trip {batch.round_trip:.1f} s (guests {batch.seconds:.1f} s), "
          f"total {time.monotonic() - t0:.1f} s")
    return batch, by_name


def test_the_rig_is_kvm_amd(rig_share):
    batch, _ = rig_share
    assert batch.host["module"] == "kvm_amd", batch.host
    errors = [r.detail for r in batch.records if r.outcome == "error"]
    assert not errors, errors


@pytest.mark.parametrize("name", [k for k, _g in SEED_GUESTS])
def test_fixed_seed_same_on_rig_and_sim(rig_share, name):
    _batch, by_name = rig_share
    g, a, b, m = by_name[name]
    assert a.steps and a.outcome in ("end", "exception", "shutdown", "internal"), (a.outcome, a.detail)
    assert m is None, f"{name}: {m.kind} at exit {m.step}, op {m.op}: {m.detail}"


@pytest.mark.parametrize("name", sorted(PROFILE_GUESTS))
def test_kvm_amd_does_what_its_profile_says(rig_share, name):
    batch, by_name = rig_share
    g, a, b, m = by_name[name]
    PROFILE_GUESTS[name][1](g, a, batch.cpuid)  # what the real kvm_amd did
    assert m is None, f"{name}: {m.kind} at exit {m.step}: {m.detail}"
