"""The kernel ABI both backends speak, as named constants and one value type.

This is the bottom layer: it imports nothing from kvmharness but the leaf
``errors`` module, and both
``kvmharness.kvm`` (the cffi bindings) and ``kvmharness.sim`` (the simulator)
import it, so the simulator never has to load the cffi module for a number.
The numbers are the kernel's UAPI (``include/uapi/linux/kvm.h``,
``arch/x86/include/uapi/asm/kvm.h``, ``include/uapi/linux/kvm_para.h``); where
the cdefs declare the same name, ``tests/test_layers.py`` pins the value here to
the one cffi reads from ``cdefs/`` (which ``tests/test_cdefs_layout.py`` pins to
the installed kernel headers).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from .errors import UsageError

# -- VM types: the KVM_CREATE_VM argument (arch/x86/include/uapi/asm/kvm.h) ------------
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_X86_SEV_VM = 2
KVM_X86_SEV_ES_VM = 3
KVM_X86_SNP_VM = 4
KVM_X86_TDX_VM = 5
VM_TYPE_NAMES: dict[int, str] = {
    KVM_X86_DEFAULT_VM: "default", KVM_X86_SW_PROTECTED_VM: "sw-protected",
    KVM_X86_SEV_VM: "sev", KVM_X86_SEV_ES_VM: "sev-es", KVM_X86_SNP_VM: "sev-snp",
    KVM_X86_TDX_VM: "tdx",
}
#: the VM type an encrypted mode runs in
MODE_VM_TYPE: dict[str, int] = {"sev": KVM_X86_SEV_VM, "sev-es": KVM_X86_SEV_ES_VM}

# -- KVM_CAP_* numbers (include/uapi/linux/kvm.h) of the capabilities the simulator offers ----
KVM_CAP_NUMBERS = {
    "KVM_CAP_HLT": 1,
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_EXT_CPUID": 7,
    "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_SET_GUEST_DEBUG": 23,
    "KVM_CAP_MAX_VCPUS": 66,
    "KVM_CAP_READONLY_MEM": 81,
    "KVM_CAP_IMMEDIATE_EXIT": 136,
    "KVM_CAP_X86_USER_SPACE_MSR": 188,
    "KVM_CAP_X86_MSR_FILTER": 189,
    "KVM_CAP_DISABLE_QUIRKS2": 213,
    "KVM_CAP_VM_TYPES": 235,
}

# -- exit reasons: kvm_run.exit_reason (include/uapi/linux/kvm.h) -------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_MEMORY_FAULT = 39  # KVM_RUN fails with EFAULT and this reason (6.8+)
#: kvm_run.memory_fault.flags: the access was to private memory
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3

#: kvm_run.io.direction
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

#: kvm_run.system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

#: kvm_run.msr.reason: why an MSR access went to userspace
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2

# -- KVM's own hypercalls (include/uapi/linux/kvm_para.h) ---------------------------------
KVM_HC_VAPIC_POLL_IRQ = 1
KVM_HC_KICK_CPU = 5
KVM_HC_CLOCK_PAIRING = 9
KVM_HC_SEND_IPI = 10
KVM_HC_SCHED_YIELD = 11
KVM_HC_MAP_GPA_RANGE = 12
#: the hypercall error numbers KVM returns in RAX (negated); not the host's errno values
KVM_ENOSYS = 1000
KVM_EFAULT = 14
KVM_EINVAL = 22
KVM_E2BIG = 7
KVM_EPERM = 1
KVM_EOPNOTSUPP = 95

# -- SVM exit codes: VMCB EXITCODE (arch/x86/include/uapi/asm/svm.h; AMD APM vol. 2,
#    appendix C; docs/facts.md#facts-6) ---------------------------------------
SVM_EXIT_READ_CR0 = 0x000
SVM_EXIT_WRITE_CR0 = 0x010
SVM_EXIT_READ_DR0 = 0x020
SVM_EXIT_WRITE_DR0 = 0x030
SVM_EXIT_EXCP_BASE = 0x040
SVM_EXIT_INTR = 0x060
SVM_EXIT_CR0_SEL_WRITE = 0x065
SVM_EXIT_RDPMC = 0x06F
SVM_EXIT_CPUID = 0x072
SVM_EXIT_RSM = 0x073
SVM_EXIT_INVD = 0x076
SVM_EXIT_HLT = 0x078
SVM_EXIT_INVLPG = 0x079
SVM_EXIT_INVLPGA = 0x07A
SVM_EXIT_IOIO = 0x07B
SVM_EXIT_MSR = 0x07C
SVM_EXIT_TASK_SWITCH = 0x07D
SVM_EXIT_SHUTDOWN = 0x07F
SVM_EXIT_VMRUN = 0x080
SVM_EXIT_VMMCALL = 0x081
SVM_EXIT_VMLOAD = 0x082
SVM_EXIT_VMSAVE = 0x083
SVM_EXIT_STGI = 0x084
SVM_EXIT_CLGI = 0x085
SVM_EXIT_SKINIT = 0x086
SVM_EXIT_RDTSCP = 0x087
SVM_EXIT_WBINVD = 0x089
SVM_EXIT_MONITOR = 0x08A
SVM_EXIT_MWAIT = 0x08B
SVM_EXIT_XSETBV = 0x08D
SVM_EXIT_RDPRU = 0x08E
SVM_EXIT_NPF = 0x400
SVM_EXIT_VMGEXIT = 0x403
SVM_EXIT_ERR = -1 & 0xFFFFFFFFFFFFFFFF

INTERCEPT_WORD3_NAMES = (
    "INTR", "NMI", "SMI", "INIT", "VINTR", "CR0_SEL_WRITE", "READ_IDTR", "READ_GDTR", "READ_LDTR",
    "READ_TR", "WRITE_IDTR", "WRITE_GDTR", "WRITE_LDTR", "WRITE_TR", "RDTSC", "RDPMC", "PUSHF", "POPF",
    "CPUID", "RSM", "IRET", "SWINT", "INVD", "PAUSE", "HLT", "INVLPG", "INVLPGA", "IOIO", "MSR",
    "TASK_SWITCH", "FERR_FREEZE", "SHUTDOWN",
)
INTERCEPT_WORD4_NAMES = (
    "VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "RDTSCP", "ICEBP", "WBINVD",
    "MONITOR", "MWAIT", "MWAIT_COND", "XSETBV", "RDPRU", "EFER_WRITE_TRAP",
)
EXCEPTION_NAMES = (
    "DE", "DB", "NMI", "BP", "OF", "BR", "UD", "NM", "DF", "09", "TS", "NP", "SS", "GP", "PF", "15",
    "MF", "AC", "MC", "XM", "VE", "CP", "22", "23", "24", "25", "26", "27", "HV", "VC", "SX", "31",
)

EXIT_NAMES: dict[int, str] = {}
for _n in range(16):
    EXIT_NAMES[SVM_EXIT_READ_CR0 + _n] = f"READ_CR{_n}"
    EXIT_NAMES[SVM_EXIT_WRITE_CR0 + _n] = f"WRITE_CR{_n}"
    EXIT_NAMES[SVM_EXIT_READ_DR0 + _n] = f"READ_DR{_n}"
    EXIT_NAMES[SVM_EXIT_WRITE_DR0 + _n] = f"WRITE_DR{_n}"
    EXIT_NAMES[0x090 + _n] = f"CR{_n}_WRITE_TRAP"
for _n, _name in enumerate(EXCEPTION_NAMES):
    EXIT_NAMES[SVM_EXIT_EXCP_BASE + _n] = f"EXCP_{_name}"
for _n, _name in enumerate(INTERCEPT_WORD3_NAMES):
    EXIT_NAMES[0x060 + _n] = _name
for _n, _name in enumerate(INTERCEPT_WORD4_NAMES):
    EXIT_NAMES[0x080 + _n] = _name
EXIT_NAMES.update({0x0A2: "INVPCID", 0x0A5: "BUS_LOCK", 0x0A6: "IDLE_HLT", SVM_EXIT_NPF: "NPF",
                   0x401: "AVIC_INCOMPLETE_IPI", 0x402: "AVIC_UNACCELERATED_ACCESS",
                   SVM_EXIT_VMGEXIT: "VMGEXIT", SVM_EXIT_ERR: "ERR"})


def exit_name(code: int) -> str:
    return EXIT_NAMES.get(code, f"UNKNOWN_{code:#x}")


# -- nested state: struct kvm_nested_state (arch/x86/include/uapi/asm/kvm.h) --------------
KVM_STATE_NESTED_FORMAT_VMX = 0
KVM_STATE_NESTED_FORMAT_SVM = 1
KVM_STATE_NESTED_GUEST_MODE = 0x1
KVM_STATE_NESTED_RUN_PENDING = 0x2
KVM_STATE_NESTED_EVMCS = 0x4
KVM_STATE_NESTED_MTF_PENDING = 0x8
KVM_STATE_NESTED_GIF_SET = 0x100
KVM_STATE_NESTED_SVM_VMCB_SIZE = 0x1000
KVM_STATE_NESTED_VMX_VMCS_SIZE = 0x1000

#: sizeof(struct kvm_nested_state) without its data: flags u16, format u16, size u32, hdr[120]
NESTED_STATE_HEADER_SIZE = 128
_NESTED_HEAD = struct.Struct("<HHI")
_NESTED_FLAG_NAMES = ((KVM_STATE_NESTED_GUEST_MODE, "guest-mode"),
                      (KVM_STATE_NESTED_RUN_PENDING, "run-pending"),
                      (KVM_STATE_NESTED_EVMCS, "evmcs"),
                      (KVM_STATE_NESTED_MTF_PENDING, "mtf-pending"),
                      (KVM_STATE_NESTED_GIF_SET, "gif-set"))


@dataclass(frozen=True)
class NestedState:
    """One ``struct kvm_nested_state``: the header and the raw data, backend-neutral.

    ``header`` is the 120-byte format-specific union (for SVM: ``vmcb_pa``);
    ``data`` the payload after the 128-byte struct (for SVM in guest mode: a 4 KiB
    VMCB image whose control area is L1's cached vmcb12 controls and whose save
    area is L1's own state).  KVM_GET_NESTED_STATE returns one on the kvm backend;
    the simulator builds the same bytes from its model (svm_get_nested_state's
    layout, arch/x86/kvm/svm/nested.c).
    """

    flags: int
    format: int
    size: int
    header: bytes
    data: bytes

    @property
    def guest_mode(self) -> bool:
        """The vCPU was running L2 (KVM_STATE_NESTED_GUEST_MODE)."""
        return bool(self.flags & KVM_STATE_NESTED_GUEST_MODE)

    @property
    def run_pending(self) -> bool:
        """A VMRUN was emulated but L2 has not run yet (KVM_STATE_NESTED_RUN_PENDING)."""
        return bool(self.flags & KVM_STATE_NESTED_RUN_PENDING)

    @property
    def gif_set(self) -> bool:
        """SVM's global interrupt flag (KVM_STATE_NESTED_GIF_SET)."""
        return bool(self.flags & KVM_STATE_NESTED_GIF_SET)

    @property
    def flag_names(self) -> list[str]:
        return [name for bit, name in _NESTED_FLAG_NAMES if self.flags & bit]

    @property
    def vmcb_pa(self) -> int:
        """SVM: guest-physical address of L1's VMCB (vmcb12); 0 outside guest mode."""
        self._need_svm("vmcb_pa")
        value: int = struct.unpack_from("<Q", self.header)[0]
        return value

    @property
    def vmcb(self) -> bytes:
        """SVM in guest mode: the 4 KiB VMCB image (L1's controls + L1's save area)."""
        self._need_svm("vmcb")
        return self.data[:KVM_STATE_NESTED_SVM_VMCB_SIZE]

    def _need_svm(self, what: str) -> None:
        if self.format != KVM_STATE_NESTED_FORMAT_SVM:
            raise UsageError(
                f"NestedState.{what} is SVM-only; this state has format {self.format} (VMX)")

    def to_bytes(self) -> bytes:
        """The whole ``struct kvm_nested_state`` (header + data), as KVM_SET_NESTED_STATE takes it."""
        return _NESTED_HEAD.pack(self.flags, self.format, self.size) + self.header + self.data

    @classmethod
    def from_bytes(cls, raw: bytes) -> NestedState:
        """Parse a ``struct kvm_nested_state``; ``size`` says how much of ``raw`` is data."""
        if len(raw) < NESTED_STATE_HEADER_SIZE:
            raise UsageError(
                f"a kvm_nested_state is at least {NESTED_STATE_HEADER_SIZE} bytes, got {len(raw)}")
        flags, fmt, size = _NESTED_HEAD.unpack_from(raw)
        if size < NESTED_STATE_HEADER_SIZE or size > len(raw):
            raise UsageError(
                f"kvm_nested_state.size is {size}, but {len(raw)} bytes were given "
                f"(it must be between {NESTED_STATE_HEADER_SIZE} and the buffer's length)")
        return cls(flags, fmt, size, bytes(raw[8:NESTED_STATE_HEADER_SIZE]),
                   bytes(raw[NESTED_STATE_HEADER_SIZE:size]))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"flags": self.flags, "flag_names": self.flag_names,
                             "format": self.format, "size": self.size, "data_len": len(self.data)}
        if self.format == KVM_STATE_NESTED_FORMAT_SVM:
            d["vmcb_pa"] = self.vmcb_pa
        return d
