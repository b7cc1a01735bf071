"""KVM's policy, modelled once: hypercalls, in-kernel MSRs, the MSR filter, CPUID.

Both of the simulator's ways into KVM call this module -- the plain #VMEXIT path
(sim/kvmlayer.py) and the SEV-ES GHCB path (sev/vmgexit.py) -- so they cannot
disagree about what the kernel does.  Each rule names the kernel function it follows
(Linux arch/x86/kvm/, checked against upstream source; include/uapi/linux/kvm_para.h
for the hypercall numbers and results).
"""

from __future__ import annotations

import time

from .. import exits
from ..abi import (  # noqa: F401 - the hypercall numbers and results (kvm_para.h), re-exported
    KVM_E2BIG,
    KVM_EFAULT,
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EOPNOTSUPP,
    KVM_EPERM,
    KVM_HC_CLOCK_PAIRING,
    KVM_HC_KICK_CPU,
    KVM_HC_MAP_GPA_RANGE,
    KVM_HC_SCHED_YIELD,
    KVM_HC_SEND_IPI,
    KVM_HC_VAPIC_POLL_IRQ,
)

_M64 = 2**64 - 1

# -- hypercalls ---------------------------------------------------------------------------

#: x86.c ``____kvm_emulate_hypercall`` (KVM_CAP_ENFORCE_PV_FEATURE_CPUID off, so
#: guest_pv_has() is true for every feature; no in-kernel APIC):
#:   VAPIC_POLL_IRQ -> 0; KICK_CPU -> 0 (kvm_pv_kick_cpu_op finds no target);
#:   CLOCK_PAIRING -> kvm_pv_clock_pairing: -KVM_EOPNOTSUPP (no TSC-based host clock);
#:   SEND_IPI -> kvm_pv_send_ipi: 0 IPIs sent (no APIC map); SCHED_YIELD -> 0;
#:   MAP_GPA_RANGE without KVM_CAP_EXIT_HYPERCALL, and every other number -> -KVM_ENOSYS.
HYPERCALL_RESULTS = {KVM_HC_VAPIC_POLL_IRQ: 0, KVM_HC_KICK_CPU: 0,
                     KVM_HC_CLOCK_PAIRING: -KVM_EOPNOTSUPP, KVM_HC_SEND_IPI: 0,
                     KVM_HC_SCHED_YIELD: 0}


def hypercall_result(nr: int, cpl: int, long64: bool = True) -> int:
    """RAX after VMMCALL (x86.c ``kvm_emulate_hypercall``), as an unsigned register value.

    CPL > 0: -KVM_EPERM.  Outside 64-bit mode (``is_64_bit_hypercall`` false) the number is
    the low 32 bits of RAX and the result is truncated to 32 bits.
    """
    if not long64:
        nr &= 0xFFFFFFFF
    ret = -KVM_EPERM if cpl else HYPERCALL_RESULTS.get(nr, -KVM_ENOSYS)
    return ret & (_M64 if long64 else 0xFFFFFFFF)


# -- in-kernel MSRs -----------------------------------------------------------------------
MSR_MTRRCAP, MSR_MTRR_DEF_TYPE, MSR_PAT, MSR_UCODE_REV = 0xFE, 0x2FF, 0x277, 0x8B
FIXED_MTRRS = frozenset((0x250, 0x258, 0x259, *range(0x268, 0x270)))
VAR_MTRRS = range(0x200, 0x210)
#: MSRs whose 64-bit address value ``__kvm_set_msr`` refuses when non-canonical
#: (``is_noncanonical_msr_address``): FS/GS base, KERNEL_GS_BASE, LSTAR, CSTAR.
CANONICAL_MSRS = frozenset((0xC0000100, 0xC0000101, 0xC0000102, 0xC0000082, 0xC0000083))

#: MSRs kvm_get/set_msr_common and svm_get/set_msr emulate for a plain (non-SEV) guest,
#: with their reset values (None: computed).  The pass-through MSRs (svm.PASSTHROUGH_MSRS)
#: are executed by the emulated CPU itself and are not listed.
KERNEL_MSRS = {
    0x10: None,                  # IA32_TSC: computed
    0x1B: 0xFEE00900,            # IA32_APIC_BASE (BSP, enabled)
    MSR_UCODE_REV: 0,            # IA32_UCODE_REV
    MSR_MTRRCAP: 0x508,          # MTRRcap: WC | FIX | 8 variable ranges
    0x179: 0x20,                 # MCG_CAP: KVM_MAX_MCE_BANKS
    0x17A: 0,                    # MCG_STATUS
    0x1A0: 0x1,                  # MISC_ENABLE: fast strings
    MSR_PAT: 0x0007040600070406,  # PAT
    MSR_MTRR_DEF_TYPE: 0,        # MTRRdefType
    0xC0010010: 0,               # SYSCFG
    0xC0010015: 0,               # HWCR
    0xC0010114: 0,               # VM_CR
    0xC0010117: 0,               # VM_HSAVE_PA
}
KERNEL_MSRS.update({m: 0 for m in VAR_MTRRS})
KERNEL_MSRS.update({m: 0 for m in FIXED_MTRRS})
#: written by the guest: refused as an MSR KVM does not handle for writes (the UNKNOWN
#: user-exit reason: kvm_set_msr_common's default -> KVM_MSR_RET_UNSUPPORTED; measured on
#: kvm_pvm: WRMSR 0xFE gave KVM_EXIT_X86_WRMSR with reason UNKNOWN)
READ_ONLY_MSRS = frozenset({MSR_MTRRCAP})
#: written by the guest: accepted and ignored (kvm_set_msr_common: MSR_IA32_UCODE_REV is
#: stored only when host_initiated)
WRITE_IGNORED_MSRS = frozenset({MSR_UCODE_REV})


def initial_kernel_msrs() -> dict:
    """A fresh vCPU's in-kernel MSR values (what KVM holds after kvm_vcpu_reset)."""
    return {k: v for k, v in KERNEL_MSRS.items() if v is not None}


def _mtrr_type_ok(t: int) -> bool:
    """mtrr.c valid_mtrr_type: UC(0) WC(1) WT(4) WP(5) WB(6)."""
    return t < 8 and bool((1 << t) & 0x73)


def _pat_ok(data: int) -> bool:
    """x86.h kvm_pat_valid: every byte UC/WC/WT/WP/WB/UC-(7), reserved bits clear."""
    return all(((data >> (8 * i)) & 0xFF) in (0, 1, 4, 5, 6, 7) for i in range(8))


def mtrr_valid(index: int, data: int, maxphyaddr: int) -> bool:
    """mtrr.c ``kvm_mtrr_valid``."""
    if index == MSR_MTRR_DEF_TYPE:
        return not data & ~0xCFF and _mtrr_type_ok(data & 0xFF)
    if index in FIXED_MTRRS:
        return all(_mtrr_type_ok((data >> (8 * i)) & 0xFF) for i in range(8))
    mask = (_M64 >> maxphyaddr) << maxphyaddr  # kvm_vcpu_reserved_gpa_bits_raw
    if index % 2 == 0:  # PhysBase
        if not _mtrr_type_ok(data & 0xFF):
            return False
        mask |= 0xF00
    else:               # PhysMask
        mask |= 0x7FF
    return not data & mask


def is_canonical(value: int, va_bits: int = 48) -> bool:
    top = value >> (va_bits - 1)
    return top == 0 or top == (_M64 >> (va_bits - 1))


def msr_write_ok(index: int, value: int, *, maxphyaddr: int = 48, va_bits: int = 48) -> bool:
    """Whether ``kvm_set_msr_common`` / ``__kvm_set_msr`` accept a guest write of a known MSR
    (False: KVM_MSR_RET_INVALID -> #GP, or the INVAL user exit)."""
    if index == MSR_PAT:
        return _pat_ok(value)
    if index == MSR_MTRR_DEF_TYPE or index in FIXED_MTRRS or index in VAR_MTRRS:
        return mtrr_valid(index, value, maxphyaddr)
    if index in CANONICAL_MSRS:
        return is_canonical(value, va_bits)
    if index == 0xC0010117:
        return not value & 0xFFF  # VM_HSAVE_PA must be page aligned (svm_set_msr)
    return True


class KvmMsrs:
    """One vCPU's in-kernel MSR values (kvm_get_msr_common / kvm_set_msr_common)."""

    def __init__(self, profile=None):
        self.values = initial_kernel_msrs()
        if profile is not None:  # the module's own reset values (sim/profile.py)
            self.values[0x1A0] = profile.misc_enable_reset
        self._tsc_base = time.perf_counter_ns()
        self._tsc_offset = 0

    def known(self, index: int) -> bool:
        return index in KERNEL_MSRS

    def read(self, index: int) -> int:
        if index == 0x10:
            return (time.perf_counter_ns() - self._tsc_base) * 3 + self._tsc_offset & _M64
        return self.values[index]

    def write_reason(self, index: int, value: int, *, maxphyaddr: int = 48) -> int:
        """0 when KVM accepts the write, else the KVM_MSR_EXIT_REASON_* it is refused with."""
        if index in READ_ONLY_MSRS:
            return exits.KVM_MSR_EXIT_REASON_UNKNOWN
        if index in WRITE_IGNORED_MSRS:
            return 0
        if index == 0x10:
            self._tsc_offset = value - (time.perf_counter_ns() - self._tsc_base) * 3
            return 0
        if not msr_write_ok(index, value, maxphyaddr=maxphyaddr):
            return exits.KVM_MSR_EXIT_REASON_INVAL
        self.values[index] = value & _M64
        return 0

    def write(self, index: int, value: int) -> bool:
        """False when KVM would refuse the value (#GP / a user exit)."""
        return self.write_reason(index, value) == 0


class MsrPolicy:
    """VM-wide MSR rules: KVM_X86_SET_MSR_FILTER and KVM_CAP_X86_USER_SPACE_MSR."""

    def __init__(self):
        self.user_exit_reasons = 0
        self.filter_ranges: tuple = ()
        self.default_allow = True
        self.filter_set = False

    def allowed(self, index: int, write: bool) -> bool:
        """x86.c kvm_msr_allowed: the first range containing the MSR decides, else the default."""
        if not self.filter_set:
            return True
        for base, nmsrs, read_ok, write_ok in self.filter_ranges:
            if base <= index < base + nmsrs:
                return bool(write_ok if write else read_ok)
        return self.default_allow

    def user_exit(self, reason: int) -> bool:
        """x86.c kvm_msr_user_space: the reason was enabled with KVM_CAP_X86_USER_SPACE_MSR."""
        return bool(self.user_exit_reasons & reason)


# -- CPUID --------------------------------------------------------------------------------
def cpuid_lookup(table, function: int, index: int) -> tuple[int, int, int, int]:
    """cpuid.c kvm_cpuid: exactly the entry set for (function, index), or all zeros.

    Hosts whose module forces some registers whatever is set (kvm_pvm) declare them in
    their profile (sim/profile.py ``cpuid_unhonoured``) and in hostinfo; the model keeps
    KVM's documented behaviour: the table, verbatim.
    """
    e = table.lookup(function, index)
    if e is None:
        return 0, 0, 0, 0
    return e.eax, e.ebx, e.ecx, e.edx


def xstate_required_size(table, xstate_bv: int, compacted: bool = False) -> int:
    """cpuid.c xstate_required_size: the XSAVE area for the features in ``xstate_bv`` --
    the legacy area and header (576 bytes), then each extended feature's end from its
    CPUID 0xD.i (EBX offset, or in the compacted form 64-byte aligned when ECX[1])."""
    ret = 512 + 64
    bv, bit = xstate_bv & ~3, 0
    while bv:
        if bv & 1:
            e = table.lookup(0xD, bit)
            eax, ebx, ecx = (e.eax, e.ebx, e.ecx) if e is not None else (0, 0, 0)
            offset = ((ret + 63) & ~63 if ecx & 2 else ret) if compacted else ebx
            ret = max(ret, offset + eax)
        bv >>= 1
        bit += 1
    return ret


def maxphyaddr(table) -> int:
    """cpuid.c cpuid_query_maxphyaddr: CPUID 0x80000008 EAX[7:0], else 36."""
    e = table.lookup(0x80000008)
    return (e.eax & 0xFF) if e is not None and e.eax & 0xFF else 36
