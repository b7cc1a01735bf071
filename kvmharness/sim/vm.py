"""A simulated VM: guest memory slots, vCPUs and the VM-wide KVM state (caps, MSR filter)."""

from __future__ import annotations

import ctypes
import mmap

from ..abi import KVM_CAP_NUMBERS
from ..backend import MemoryRegion, Vm
from ..errors import UsageError
from . import kvmlayer as K


class SimVm(Vm):
    #: KVM's per-VM SEV state once KVM_SEV_INIT* ran (sev.kvm_model.KvmSevModel, or sim/snp.py's)
    _sev_model = None
    #: the encrypted-memory view SEV vCPUs share (sim/sev.py SevMemory), made by the first
    _sev_memory = None

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
        self.remapped = {}  # guest page -> the guest page whose memory it reaches (remap_page)
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
        if any(v.vcpu_id == vcpu_id for v in self.vcpus):
            raise UsageError(f"vCPU {vcpu_id} already exists")
        v = self._vcpu_class()(self, vcpu_id, self.asid)
        self.vcpus.append(v)
        return v

    def _vcpu_class(self) -> type:
        """The class of a new vCPU: SEV / SEV-ES / SEV-SNP once KVM_SEV_INIT* ran.  Chosen
        here, above sim/sev.py and its subclasses' modules, so none imports another's
        subclass (an SNP model names its own vCPU class: sim/snp.py)."""
        model = self._sev_model
        if model is None or not model.active:
            from .vcpu import SimVcpu

            return SimVcpu
        if model.snp:
            return model.vcpu_class
        if model.es_active:
            from .seves import SevEsVcpu

            return SevEsVcpu
        from .sev import SevVcpu

        return SevVcpu

    def check_extension(self, cap: int) -> int:
        return self.system.check_extension(cap)

    def open_sev_interface(self):
        """KVM_MEMORY_ENCRYPT_OP on this VM: its (cached) SEV model, see sim/sev.py."""
        from .sev import sev_interface

        return sev_interface(self)

    def enable_cap(self, cap: int, *args: int) -> None:
        if not self.system.check_extension(cap):
            raise UsageError(f"KVM_ENABLE_CAP({cap}): not supported by the simulator")
        self.enabled_caps[cap] = args
        if cap == KVM_CAP_NUMBERS["KVM_CAP_X86_USER_SPACE_MSR"] and args:
            self.enable_user_msr_exits(args[0])

    def disable_fix_hypercall_quirk(self) -> None:
        """KVM_CAP_DISABLE_QUIRKS2(FIX_HYPERCALL_INSN): the model always behaves with it disabled
        (VMMCALL/VMGEXIT: KVM's hypercall on the kvm_amd profile, #UD on kvm_pvm); with it
        enabled these hosts' KVM spins inside KVM_RUN, which is not worth reproducing."""
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

    # -- nested page table edits (the hypervisor's-eye lab, kvmharness/lab) -----------
    def remap_page(self, gpa: int, target: int) -> None:
        """Point guest-physical page ``gpa`` at the memory behind guest page ``target``.

        What a hypervisor does by rewriting one nested page table entry (the SEVered
        attack): from the next instruction on, the guest's accesses to ``gpa`` reach
        ``target``'s memory -- for an SEV guest its private accesses too, which then
        read ``target``'s plaintext, as hardware decrypts with the tweak of the
        system-physical page it reaches.  The memory slot, i.e. the host's own view
        (``read``/``write``), is unchanged.  ``remap_page(gpa, gpa)`` restores the
        mapping.  Made for kvmharness.lab; KVM has no userspace call for this.
        How: a plain vCPU's engine maps guest-physical pages directly, so that one
        page is re-mapped there; an SEV vCPU's engine runs on the page-table walk of
        sim/sev.py, so the remap is applied to the GPA the walk ends at.
        """
        for a in (gpa, target):
            if a & 0xFFF or self._host_address(a) is None:
                raise UsageError(f"remap_page: {a:#x} is not a page of guest RAM")
        remaps = self.remapped
        if target == gpa:
            remaps.pop(gpa, None)
        else:
            remaps[gpa] = target
        for v in self.vcpus:
            if self._apply_remaps not in v.core.build_hooks:
                v.core.build_hooks.append(self._apply_remaps)
            self._remap_in(v.core, gpa, target)
            v.core.flush_all_code()
            v.code_changed()

    def _host_address(self, gpa: int):
        """The host address of guest RAM at ``gpa`` (the memory slot), or None."""
        for g, s, a, _ro in self._map_list:
            if g <= gpa < g + s:
                return a + (gpa - g)
        return None

    def _remap_in(self, core, gpa: int, target: int) -> None:
        import unicorn

        uc = unicorn.unicorn_const
        if core.mmu is not None:
            # an SEV guest (sim/sev.py): the engine runs on virtual addresses filled by the
            # MMU's walk, so the remap goes there -- applied to the walk's final GPA, where
            # the nested page table sits
            mmu = core.mmu
            if "walk" not in vars(mmu):
                walk = mmu.walk
                remaps = self.remapped

                def walk_then_npt(linear, write=False):
                    g, private, err = walk(linear, write)
                    if g is not None and (g & ~0xFFF) in remaps:
                        g = remaps[g & ~0xFFF] | (g & 0xFFF)
                    return g, private, err

                mmu.walk = walk_then_npt
        else:
            src = self._host_address(target)
            core.uc.mem_unmap(gpa, 0x1000)
            core.uc.mem_map_ptr(gpa, 0x1000, unicorn.UC_PROT_ALL, src)
        # translations cached before the change would still reach the old memory
        core.uc.ctl(uc.UC_CTL_TLB_FLUSH, uc.UC_CTL_IO_WRITE)

    def _apply_remaps(self, core) -> None:
        """A core build hook: re-apply the remaps to a fresh engine."""
        for gpa, target in self.remapped.items():
            self._remap_in(core, gpa, target)

    def flush_code(self, gpa: int, size: int) -> None:
        """Drop translated code over a range the host rewrote (unicorn keeps stale blocks)."""
        for v in self.vcpus:
            if v.core.mmu is None:
                # Not for an SEV vCPU (sim/sev.py): its engine runs on virtual addresses, so
                # unicorn's TB lookup here would TLB-fill ``gpa`` as an instruction fetch --
                # which that MMU maps private -- and a later data access to a shared page
                # (the GHCB) would reach the plaintext alias.  Its code runs from the alias,
                # which sev.py flushes itself when the host changes memory.
                v.core.flush_code(gpa, size)
            v.code_changed()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        model = self._sev_model
        if model is not None:  # sev_vm_destroy: DEACTIVATE, DECOMMISSION, free the ASID
            model.close()
        # Free the memory now, as KvmVm.close() does (the engines that mapped it are closed):
        # this VM sits in reference cycles (its SEV model, the SEV memory's flush hook), so
        # leaving it to the cyclic GC kept ~10 MiB per SEV-ES machine alive (issue 13).
        mem = self.__dict__.pop("_sev_memory", None)
        if mem is not None:
            mem.close()
        for r in self.regions:
            r.view.release()
            try:
                r._owner.close()
            except BufferError:  # the caller still holds a slice of the memory; GC frees it
                pass
        self.regions.clear()
        self._map_list.clear()
        self._buffers.clear()
        if self in self.system._vms:  # a long-lived SimSystem keeps only open VMs
            self.system._vms.remove(self)
