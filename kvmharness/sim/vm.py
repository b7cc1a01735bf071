"""A simulated VM: guest memory slots, vCPUs and the VM-wide KVM state (caps, MSR filter)."""

from __future__ import annotations

import ctypes
import mmap

from ..backend import MemoryRegion, Vm
from ..errors import UsageError
from . import kvmlayer as K
from .system import KVM_CAP_NUMBERS


class SimVm(Vm):
    def __init__(self, system, vm_type: int, asid: int):
        self.system = system
        self.vm_type = vm_type
        self.asid = asid
        self.regions = []
        self._map_list = []  # (gpa, size, host address, readonly): what every core maps
        self._buffers = []
        self.vcpus = []
        self.msr_policy = K.MsrPolicy()
        self.enabled_caps = {}
        self._closed = False

    def add_memory(self, gpa: int, size: int, *, readonly: bool = False) -> MemoryRegion:
        """KVM_SET_USER_MEMORY_REGION: anonymous host memory the emulator maps directly."""
        if gpa & 0xFFF or size & 0xFFF or size <= 0:
            raise UsageError(f"memory region {gpa:#x}+{size:#x} must be page aligned and non-empty")
        for r in self.regions:
            if gpa < r.gpa + r.size and r.gpa < gpa + size:
                raise UsageError(f"memory region {gpa:#x}+{size:#x} overlaps {r}")
        mm = mmap.mmap(-1, size)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        region = MemoryRegion(len(self.regions), gpa, size, memoryview(mm), readonly, owner=mm)
        self.regions.append(region)
        self._map_list.append((gpa, size, addr, readonly))
        for v in self.vcpus:
            v.core.map_region(gpa, size, addr, readonly)
        return region

    def create_vcpu(self, vcpu_id: int = 0):
        from .vcpu import SimVcpu

        if any(v.vcpu_id == vcpu_id for v in self.vcpus):
            raise UsageError(f"vCPU {vcpu_id} already exists")
        v = SimVcpu(self, vcpu_id, self.asid)
        self.vcpus.append(v)
        return v

    def check_extension(self, cap: int) -> int:
        return self.system.check_extension(cap)

    def enable_cap(self, cap: int, *args: int) -> None:
        if not self.system.check_extension(cap):
            raise UsageError(f"KVM_ENABLE_CAP({cap}): not supported by the simulator")
        self.enabled_caps[cap] = args
        if cap == KVM_CAP_NUMBERS["KVM_CAP_X86_USER_SPACE_MSR"] and args:
            self.enable_user_msr_exits(args[0])

    def disable_fix_hypercall_quirk(self) -> None:
        """KVM_CAP_DISABLE_QUIRKS2(FIX_HYPERCALL_INSN): the model always behaves with it disabled
        (VMMCALL/VMGEXIT -> #UD); with it enabled these hosts' KVM spins inside KVM_RUN, which
        is not worth reproducing."""
        self.enabled_caps[KVM_CAP_NUMBERS["KVM_CAP_DISABLE_QUIRKS2"]] = (1 << 7,)

    def enable_user_msr_exits(self, reasons: int) -> None:
        self.msr_policy.user_exit_reasons = reasons

    def set_msr_filter(self, ranges, *, default_allow: bool = True) -> None:
        """KVM_X86_SET_MSR_FILTER; MSRs the guest would reach natively get their MSRPM bits set."""
        from .svm import PASSTHROUGH_MSRS, WRITE_INTERCEPTED_PASSTHROUGH

        p = self.msr_policy
        p.filter_ranges = tuple((b, n, bool(r), bool(w)) for b, n, r, w in ranges)
        p.default_allow = default_allow
        p.filter_set = True
        for v in self.vcpus:
            for msr in PASSTHROUGH_MSRS:
                v.svm.set_msr_intercept(msr, not p.allowed(msr, False),
                                        not p.allowed(msr, True) or msr in WRITE_INTERCEPTED_PASSTHROUGH)
            v.core.sync_msrpm()

    def write(self, gpa: int, data: bytes) -> None:
        super().write(gpa, data)
        self.flush_code(gpa, len(data))

    def flush_code(self, gpa: int, size: int) -> None:
        """Drop translated code over a range the host rewrote (unicorn keeps stale blocks)."""
        for v in self.vcpus:
            v.core.flush_code(gpa, size)
            v.code_changed()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
