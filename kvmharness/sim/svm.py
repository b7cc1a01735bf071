"""The SVM model: one VMCB per vCPU, an ASID, KVM's intercept vectors, IOPM/MSRPM, #VMEXIT.

Intercepts are set the way KVM's ``init_vmcb`` (arch/x86/kvm/svm/svm.c) sets them
for a non-SEV guest with NPT enabled: CR0/CR3/CR4 read+write and CR8 write (the
CR3 pair and INVLPG are then cleared because NPT is on), all DR0-7 read/write
(``set_dr_intercepts``), exceptions #UD, #MC, #AC (#PF only without NPT; #DB is
no longer set by current kernels), and INTR, NMI, SMI, SELECTIVE_CR0, RDPMC,
CPUID, INVD, HLT, INVLPGA, IOIO_PROT, MSR_PROT, TASK_SWITCH, SHUTDOWN, VMRUN,
VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT, WBINVD, MONITOR, MWAIT, XSETBV,
RDPRU, RSM.  The IOPM intercepts every port (KVM allocates it all-ones); the
MSRPM intercepts every MSR except the ones passed through (below).

The emulated VMRUN in the core reads these bytes: what is intercepted here is
what reaches the model as a #VMEXIT.
"""

from __future__ import annotations

import struct

from ..abi import (  # the exit codes are ABI: both backends and the GHCB code name them
    EXIT_NAMES,
    INTERCEPT_WORD3_NAMES,
    INTERCEPT_WORD4_NAMES,
    SVM_EXIT_CLGI,
    SVM_EXIT_CPUID,
    SVM_EXIT_CR0_SEL_WRITE,
    SVM_EXIT_ERR,
    SVM_EXIT_EXCP_BASE,
    SVM_EXIT_HLT,
    SVM_EXIT_INTR,
    SVM_EXIT_INVD,
    SVM_EXIT_INVLPG,
    SVM_EXIT_INVLPGA,
    SVM_EXIT_IOIO,
    SVM_EXIT_MONITOR,
    SVM_EXIT_MSR,
    SVM_EXIT_MWAIT,
    SVM_EXIT_NPF,
    SVM_EXIT_RDPMC,
    SVM_EXIT_RDPRU,
    SVM_EXIT_RDTSCP,
    SVM_EXIT_READ_CR0,
    SVM_EXIT_READ_DR0,
    SVM_EXIT_RSM,
    SVM_EXIT_SHUTDOWN,
    SVM_EXIT_SKINIT,
    SVM_EXIT_STGI,
    SVM_EXIT_TASK_SWITCH,
    SVM_EXIT_VMGEXIT,
    SVM_EXIT_VMLOAD,
    SVM_EXIT_VMMCALL,
    SVM_EXIT_VMRUN,
    SVM_EXIT_VMSAVE,
    SVM_EXIT_WBINVD,
    SVM_EXIT_WRITE_CR0,
    SVM_EXIT_WRITE_DR0,
    SVM_EXIT_XSETBV,
    exit_name,
)
from .trace import HwTrace
from .vmcb import Vmcb


# -- intercept bit numbers (kernel enum: 32 * word + bit) ------------------
def _w3(bit):
    return 3 * 32 + bit


def _w4(bit):
    return 4 * 32 + bit


KVM_INIT_INTERCEPTS = tuple(_w3(INTERCEPT_WORD3_NAMES.index(n)) for n in (
    "INTR", "NMI", "SMI", "CR0_SEL_WRITE", "RDPMC", "CPUID", "INVD", "HLT", "INVLPGA", "IOIO", "MSR",
    "TASK_SWITCH", "SHUTDOWN", "RSM")) + tuple(_w4(INTERCEPT_WORD4_NAMES.index(n)) for n in (
    "VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "WBINVD", "MONITOR", "MWAIT",
    "XSETBV", "RDPRU"))
KVM_INIT_EXCEPTIONS = (6, 18, 17)  # #UD, #MC, #AC (svm.c init_vmcb; #PF only without NPT)
# CR0/CR4 read+write, CR8 write (CR3 pair cleared under NPT); DR0-7 read+write
KVM_INIT_CR_INTERCEPTS = (1 << 0) | (1 << 4) | (1 << 16) | (1 << 20) | (1 << 24)
KVM_INIT_DR_INTERCEPTS = 0x00FF00FF

NESTED_CTL_NP_ENABLE = 1 << 0
NESTED_CTL_SEV_ENABLE = 1 << 1
NESTED_CTL_SEV_ES_ENABLE = 1 << 2

IOPM_SIZE = 3 * 4096
MSRPM_SIZE = 2 * 4096

# MSRs the emulated CPU executes itself: KVM's pass-through set (svm.c direct_access_msrs:
# STAR/LSTAR/CSTAR/SFMASK, FS/GS/KERNEL_GS base, SYSENTER_*) plus EFER, whose *reads*
# are passed through here while writes stay intercepted as on KVM (svm_set_efer checks
# the value against the guest's CPUID, then the model applies it to the CPU).
PASSTHROUGH_MSRS = (0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000100,
                    0xC0000101, 0xC0000102, 0x174, 0x175, 0x176)
WRITE_INTERCEPTED_PASSTHROUGH = (0xC0000080,)

# -- IOIO EXITINFO1 (docs/facts.md#facts-1h) -------------------------------------------
IOIO_TYPE_IN = 1 << 0
IOIO_STR = 1 << 2
IOIO_REP = 1 << 3
IOIO_SIZE_SHIFT = 4  # one-hot 8/16/32
IOIO_ADDR_SHIFT = 7  # one-hot 16/32/64
IOIO_SEG_SHIFT = 10


def ioio_exit_info1(port: int, size: int, is_in: bool, *, string: bool = False, rep: bool = False,
                    addr_size: int = 64, segment: int = 3) -> int:
    """EXITINFO1 of an IOIO intercept: port in 31:16, one-hot sizes, type/str/rep bits."""
    info = (port & 0xFFFF) << 16
    info |= IOIO_TYPE_IN if is_in else 0
    info |= IOIO_STR if string else 0
    info |= IOIO_REP if rep else 0
    info |= {1: 1, 2: 2, 4: 4}[size] << IOIO_SIZE_SHIFT
    info |= {16: 1, 32: 2, 64: 4}[addr_size] << IOIO_ADDR_SHIFT
    if string:
        info |= (segment & 7) << IOIO_SEG_SHIFT
    return info


def decode_ioio_exit_info1(info: int) -> dict:
    size = {1: 1, 2: 2, 4: 4}[(info >> IOIO_SIZE_SHIFT) & 7]
    return {"port": info >> 16, "in": bool(info & IOIO_TYPE_IN), "string": bool(info & IOIO_STR),
            "rep": bool(info & IOIO_REP), "size": size,
            "addr_size": {1: 16, 2: 32, 4: 64}.get((info >> IOIO_ADDR_SHIFT) & 7, 0),
            "segment": (info >> IOIO_SEG_SHIFT) & 7}


def msrpm_position(msr: int) -> tuple[int, int] | None:
    """(byte offset, bit of the read intercept) of an MSR in the MSRPM; None outside its ranges."""
    for base, start in ((0x0, 0x0000), (0xC0000000, 0x0800), (0xC0010000, 0x1000)):
        if base <= msr < base + 0x2000:
            n = msr - base
            return start + n // 4, (n % 4) * 2
    return None


_EXIT3 = struct.Struct("<QQQ")
_Q = struct.Struct("<Q")
_M64 = 2**64 - 1


class Svm:
    """The SVM state of one vCPU: its VMCB, ASID, IOPM, MSRPM and exit trace."""

    def __init__(self, asid: int, *, npt: bool = True):
        self.vmcb = Vmcb()
        self.asid = asid
        self.iopm = bytearray(b"\xff" * IOPM_SIZE)
        self.msrpm = bytearray(b"\xff" * MSRPM_SIZE)
        self.trace = HwTrace()
        self.npt = npt
        # at-exit callbacks (hypervisor's-eye hooks): called with each HwExit as it is taken
        self.on_vmexit: list = []
        for msr in PASSTHROUGH_MSRS:
            self.set_msr_intercept(msr, False, msr in WRITE_INTERCEPTED_PASSTHROUGH)
        self.init_vmcb()

    def init_vmcb(self) -> None:
        c = self.vmcb.control
        words = [0] * 6
        for bit in KVM_INIT_INTERCEPTS:
            words[bit // 32] |= 1 << (bit % 32)
        c.intercept_cr = KVM_INIT_CR_INTERCEPTS if self.npt else KVM_INIT_CR_INTERCEPTS | (1 << 3) | (1 << 19)
        c.intercept_dr = KVM_INIT_DR_INTERCEPTS
        exc = 0
        for v in KVM_INIT_EXCEPTIONS + (() if self.npt else (14,)):
            exc |= 1 << v
        c.intercept_exceptions = exc
        c.intercept_word3 = words[3] | (0 if self.npt else 1 << 25)  # INVLPG only without NPT
        c.intercept_word4 = words[4]
        c.intercept_word5 = words[5]
        c.asid = self.asid
        c.nested_ctl = NESTED_CTL_NP_ENABLE if self.npt else 0
        c.tsc_offset = 0
        c.int_ctl = 1 << 24  # V_INTR_MASKING
        self.vmcb.save.g_pat = 0x0007040600070406
        self.vmcb.save.dr6 = 0xFFFF0FF0  # DR6_ACTIVE_LOW (kvm_vcpu_reset)
        self.vmcb.save.dr7 = 0x400  # DR7_FIXED_1

    def update_cr0_intercepts(self, guest_cr0: int) -> None:
        """svm_set_cr0: with NPT the CR0 read/write intercepts are dropped while the CR0 the
        hardware runs with equals the guest's (i.e. CD/NW clear: KVM clears them in the
        hardware CR0 by its CD_NW_CLEARED quirk); SELECTIVE_CR0 stays on."""
        hcr0 = guest_cr0 & ~((1 << 30) | (1 << 29))
        if not self.npt:
            return
        if hcr0 == guest_cr0:
            self.vmcb.control.intercept_cr &= ~((1 << 0) | (1 << 16))
        else:
            self.vmcb.control.intercept_cr |= (1 << 0) | (1 << 16)

    # -- intercept queries (what the hardware consults) ---------------------
    def intercepted(self, exit_code: int) -> bool:
        c = self.vmcb.control
        if exit_code < 0x20:
            return bool(c.intercept_cr >> exit_code & 1)
        if exit_code < 0x40:
            return bool(c.intercept_dr >> (exit_code - 0x20) & 1)
        if exit_code < 0x60:
            return bool(c.intercept_exceptions >> (exit_code - 0x40) & 1)
        if exit_code < 0x80:
            return bool(c.intercept_word3 >> (exit_code - 0x60) & 1)
        if exit_code < 0xA0:
            return bool(c.intercept_word4 >> (exit_code - 0x80) & 1)
        if exit_code < 0xC0:
            return bool(c.intercept_word5 >> (exit_code - 0xA0) & 1)
        return True  # NPF, VMGEXIT: not maskable

    def io_intercepted(self, port: int, size: int) -> bool:
        if not self.intercepted(SVM_EXIT_IOIO):
            return False
        return any(self.iopm[(p & 0xFFFF) // 8] >> ((p & 0xFFFF) % 8) & 1 for p in range(port, port + size))

    def msr_intercepted(self, msr: int, write: bool) -> bool:
        if not self.intercepted(SVM_EXIT_MSR):
            return False
        pos = msrpm_position(msr)
        if pos is None:
            return True
        off, bit = pos
        return bool(self.msrpm[off] >> (bit + (1 if write else 0)) & 1)

    def set_msr_intercept(self, msr: int, read: bool, write: bool) -> None:
        pos = msrpm_position(msr)
        if pos is None:
            return
        off, bit = pos
        v = self.msrpm[off] & ~(3 << bit)
        self.msrpm[off] = v | (int(read) << bit) | (int(write) << (bit + 1))

    # -- #VMEXIT ------------------------------------------------------------
    def vmexit(self, code: int, info1: int, info2: int, rip: int, next_rip: int = 0,
               handled: str = "kernel", insn: bytes = b""):
        """Write the exit into the control area (as the CPU does at #VMEXIT) and trace it."""
        raw = self.vmcb.raw
        _EXIT3.pack_into(raw, 0x70, code & _M64, info1 & _M64, info2 & _M64)
        _Q.pack_into(raw, 0xC8, next_rip & _M64)
        if insn:
            raw[0xD0] = len(insn[:15])
            raw[0xD1:0xD1 + len(insn[:15])] = insn[:15]
        trace = self.trace
        trace.total += 1
        rows = trace._rows
        if len(rows) >= trace.limit:
            trace.record_overflow()
        rows.append((trace.total, code, info1, info2, rip, next_rip, handled))
        if self.on_vmexit:
            rec = self.trace[-1]
            for callback in self.on_vmexit:
                callback(rec)

__all__ = [
    "EXIT_NAMES", "INTERCEPT_WORD3_NAMES", "INTERCEPT_WORD4_NAMES", "IOIO_ADDR_SHIFT", "IOIO_REP",
    "IOIO_SEG_SHIFT", "IOIO_SIZE_SHIFT", "IOIO_STR", "IOIO_TYPE_IN", "IOPM_SIZE",
    "KVM_INIT_CR_INTERCEPTS", "KVM_INIT_DR_INTERCEPTS", "KVM_INIT_EXCEPTIONS",
    "KVM_INIT_INTERCEPTS", "MSRPM_SIZE", "NESTED_CTL_NP_ENABLE", "NESTED_CTL_SEV_ENABLE",
    "NESTED_CTL_SEV_ES_ENABLE", "PASSTHROUGH_MSRS", "SVM_EXIT_CLGI", "SVM_EXIT_CPUID",
    "SVM_EXIT_CR0_SEL_WRITE", "SVM_EXIT_ERR", "SVM_EXIT_EXCP_BASE", "SVM_EXIT_HLT", "SVM_EXIT_INTR",
    "SVM_EXIT_INVD", "SVM_EXIT_INVLPG", "SVM_EXIT_INVLPGA", "SVM_EXIT_IOIO", "SVM_EXIT_MONITOR",
    "SVM_EXIT_MSR", "SVM_EXIT_MWAIT", "SVM_EXIT_NPF", "SVM_EXIT_RDPMC", "SVM_EXIT_RDPRU",
    "SVM_EXIT_RDTSCP", "SVM_EXIT_READ_CR0", "SVM_EXIT_READ_DR0", "SVM_EXIT_RSM",
    "SVM_EXIT_SHUTDOWN", "SVM_EXIT_SKINIT", "SVM_EXIT_STGI", "SVM_EXIT_TASK_SWITCH",
    "SVM_EXIT_VMGEXIT", "SVM_EXIT_VMLOAD", "SVM_EXIT_VMMCALL", "SVM_EXIT_VMRUN", "SVM_EXIT_VMSAVE",
    "SVM_EXIT_WBINVD", "SVM_EXIT_WRITE_CR0", "SVM_EXIT_WRITE_DR0", "SVM_EXIT_XSETBV", "Svm",
    "WRITE_INTERCEPTED_PASSTHROUGH", "decode_ioio_exit_info1", "exit_name", "ioio_exit_info1",
    "msrpm_position",
]
