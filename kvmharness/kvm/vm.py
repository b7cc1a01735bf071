"""A KVM VM fd: memory slots, VM capabilities, the MSR filter, vCPUs."""

from __future__ import annotations

import errno
import mmap
import os
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..backend import KVM_X86_SNP_VM, MemoryRegion, Vm
from ..errors import KvmError, UsageError
from . import _ffi as K
from ._ffi import ffi, ioctl, ioctl_raw
from .vcpu import KvmVcpu

if TYPE_CHECKING:
    from .sev import KvmSev
    from .system import KvmSystem

PAGE = 4096
_UNKNOWN = object()
_KVM_ENABLE_CAP = K.KVM_ENABLE_CAP
_KVM_CREATE_VCPU = K.KVM_CREATE_VCPU
_KVM_SET_USER_MEMORY_REGION = K.KVM_SET_USER_MEMORY_REGION
_MAP_ANON = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value
_REGION = ffi.typeof("struct kvm_userspace_memory_region *")
_REGION_S = struct.Struct("=IIQQQ")  # slot, flags, guest_phys_addr, memory_size, userspace_addr
assert _REGION_S.size == ffi.sizeof("struct kvm_userspace_memory_region")
assert ffi.offsetof("struct kvm_userspace_memory_region", "userspace_addr") == 24
_KVM_MEM_READONLY = K.KVM_MEM_READONLY
_UINTPTR = ffi.typeof("uintptr_t")
_VOIDP = ffi.typeof("void *")
_VCPU_ID_ARGS = tuple(ffi.cast(_VOIDP, i) for i in range(64))  # KVM_CREATE_VCPU's argument, cast once


class KvmVm(Vm):
    """Owns the VM fd and the host memory of its slots."""

    def __init__(self, system: KvmSystem, fd: int, vm_type: int, *,
                 disable_hypercall_patching: bool = True) -> None:
        self.system: KvmSystem = system
        self.fd = fd
        self.vm_type = vm_type
        self.regions: list[MemoryRegion] = []
        self.vcpus: list[KvmVcpu] = []
        if disable_hypercall_patching:
            self.disable_fix_hypercall_quirk()

    # State with its initial value on the class, set on the instance when it first changes
    # (a VM lifecycle's Python work is part of what issue 15 measures).
    _next_slot = 0
    _pins: tuple[Any, ...] = ()  # cffi buffers that must stay alive while KVM uses them
    _gmem_fds: tuple[int, ...] = ()  # guest_memfd of each private slot (SNP VM type)

    # -- capabilities and quirks ---------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        ret, _ = ioctl_raw(self.fd, K.KVM_CHECK_EXTENSION, ffi.cast("void *", cap))
        return ret if ret >= 0 else 0

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP on the VM fd with up to four u64 arguments."""
        c = ffi.new("struct kvm_enable_cap *")
        c.cap = cap
        for i, a in enumerate(args):
            c.args[i] = a
        ioctl(self.fd, K.KVM_ENABLE_CAP, c)

    def disable_fix_hypercall_quirk(self) -> None:
        """KVM_CAP_DISABLE_QUIRKS2(KVM_X86_QUIRK_FIX_HYPERCALL_INSN).

        With the quirk on, KVM rewrites VMMCALL/VMCALL in guest memory to the
        host vendor's instruction; on these machines that makes VMMCALL spin
        inside KVM_RUN forever and corrupts VMGEXIT (F3 0F 01 D9 -> 0F 01 C1 D9).
        Off, both raise a clean #UD in the guest, as on SVM hardware without
        an intercept (measured on kvm_pvm; docs/facts.md#kvm-pvm-cpl0).

        The kernel's answer is asked on the first VM of each type and kept on the System
        with the kvm_enable_cap it calls for (both hold for every VM of a type).
        """
        caps = self.system.quirk_caps
        c = caps.get(self.vm_type, _UNKNOWN)
        if c is _UNKNOWN:
            c = caps[self.vm_type] = self._fix_hypercall_quirk_cap()
        if c is not None:
            ioctl(self.fd, _KVM_ENABLE_CAP, c)

    def _fix_hypercall_quirk_cap(self) -> Any:
        """The kvm_enable_cap disabling the quirk on this VM type, or None where none exists."""
        quirk = K.KVM_X86_QUIRK_FIX_HYPERCALL_INSN
        if self.check_extension(K.KVM_CAP_DISABLE_QUIRKS2) & quirk:
            cap = K.KVM_CAP_DISABLE_QUIRKS2
        elif self.check_extension(K.KVM_CAP_DISABLE_QUIRKS):
            cap = K.KVM_CAP_DISABLE_QUIRKS
        else:
            return None
        c = ffi.new("struct kvm_enable_cap *")
        c.cap = cap
        c.args[0] = quirk
        return c

    def open_sev_interface(self) -> KvmSev:
        """KVM_MEMORY_ENCRYPT_OP on this VM (kvm/sev.py; /dev/sev is opened for its fd)."""
        from .sev import KvmSev

        return KvmSev(self)

    def enable_user_msr_exits(self, reasons: int) -> None:
        """KVM_CAP_X86_USER_SPACE_MSR: send refused MSR accesses (these reasons) to userspace."""
        self.enable_cap(K.KVM_CAP_X86_USER_SPACE_MSR, reasons)

    def set_msr_filter(self, ranges: Iterable[tuple[int, int, bool, bool]], *,
                       default_allow: bool = True) -> None:
        """KVM_X86_SET_MSR_FILTER.

        ``ranges``: (base, nmsrs, read_allowed, write_allowed) tuples.  Each
        becomes two kernel ranges (one per access type) because a kernel range's
        bitmap applies to every access type named in its flags.
        """
        f = ffi.new("struct kvm_msr_filter *")
        f.flags = K.KVM_MSR_FILTER_DEFAULT_ALLOW if default_allow else K.KVM_MSR_FILTER_DEFAULT_DENY
        i = 0
        nranges = len(f.ranges)
        for base, nmsrs, read, write in ranges:
            for flag, allowed in ((K.KVM_MSR_FILTER_READ, read), (K.KVM_MSR_FILTER_WRITE, write)):
                if i >= nranges:
                    raise UsageError(f"at most {nranges // 2} MSR filter ranges")
                bitmap = ffi.new("__u8[]", (nmsrs + 7) // 8)
                if allowed:
                    ffi.memmove(bitmap, b"\xff" * len(bitmap), len(bitmap))
                self._pins += (bitmap,)
                r = f.ranges[i]
                r.flags, r.nmsrs, r.base, r.bitmap = flag, nmsrs, base, bitmap
                i += 1
        ioctl(self.fd, K.KVM_X86_SET_MSR_FILTER, f)

    # -- memory ---------------------------------------------------------------------
    def add_memory(self, gpa: int, size: int, *, readonly: bool = False) -> MemoryRegion:
        """KVM_SET_USER_MEMORY_REGION backed by a fresh anonymous mapping.

        On a ``KVM_X86_SNP_VM`` the slot also gets private memory: a guest_memfd
        (``KVM_CREATE_GUEST_MEMFD``) given with ``KVM_SET_USER_MEMORY_REGION2``, and the
        range made private (``KVM_SET_MEMORY_ATTRIBUTES``) as QEMU's ``kvm_set_phys_mem``
        does for guest_memfd RAM; the mapping stays the shared half (and the launch's
        source buffers)."""
        if gpa % PAGE or size % PAGE or size <= 0:
            raise UsageError(f"memory slot {gpa:#x}+{size:#x} must be page-aligned and non-empty")
        for r in self.regions:
            if gpa < r.gpa + r.size and r.gpa < gpa + size:
                raise UsageError(f"memory slot {gpa:#x}+{size:#x} overlaps {r}")
        slot = self._next_slot
        mm = mmap.mmap(-1, size, flags=_MAP_ANON)
        ptr = ffi.from_buffer(mm)
        private = self.vm_type == KVM_X86_SNP_VM and not readonly
        # struct kvm_userspace_memory_region packed in one call (layout: the asserts at the
        # top of this module and tests/test_cdefs_layout.py)
        region = ffi.from_buffer(_REGION, _REGION_S.pack(slot, _KVM_MEM_READONLY if readonly else 0, gpa, size,
                                                int(ffi.cast(_UINTPTR, ptr))))
        if private:
            ret, err, name = self._set_private_slot(region)
        else:
            ret, err = ioctl_raw(self.fd, _KVM_SET_USER_MEMORY_REGION, region)
        if ret < 0:
            ffi.release(ptr)
            mm.close()
            raise KvmError(name if private else "KVM_SET_USER_MEMORY_REGION", err,
                           f"slot {slot} at {gpa:#x}+{size:#x}")
        mr = MemoryRegion(slot, gpa, size, memoryview(mm), readonly, (mm, ptr))
        self._next_slot = slot + 1
        self.regions.append(mr)
        if private:
            self.set_memory_attributes(gpa, size, private=True)
        return mr

    # -- private memory (SEV-SNP: guest_memfd and memory attributes) ---------------------
    def _set_private_slot(self, region: Any) -> tuple[int, int, str]:
        """KVM_CREATE_GUEST_MEMFD of the slot's size, then KVM_SET_USER_MEMORY_REGION2 with
        KVM_MEM_GUEST_MEMFD (guest_memfd offset 0): (ret, errno, the ioctl that answered)."""
        gmem = ffi.new("struct kvm_create_guest_memfd *")
        gmem.size = region.memory_size
        fd, err = ioctl_raw(self.fd, K.KVM_CREATE_GUEST_MEMFD, gmem)
        if fd < 0:
            return fd, err, "KVM_CREATE_GUEST_MEMFD"
        r2 = ffi.new("struct kvm_userspace_memory_region2 *")
        r2.slot, r2.flags = region.slot, region.flags | K.KVM_MEM_GUEST_MEMFD
        r2.guest_phys_addr, r2.memory_size = region.guest_phys_addr, region.memory_size
        r2.userspace_addr = region.userspace_addr
        r2.guest_memfd, r2.guest_memfd_offset = fd, 0
        ret, err = ioctl_raw(self.fd, K.KVM_SET_USER_MEMORY_REGION2, r2)
        if ret < 0:
            os.close(fd)
            return ret, err, "KVM_SET_USER_MEMORY_REGION2"
        self._gmem_fds += (fd,)
        return ret, 0, "KVM_SET_USER_MEMORY_REGION2"

    def set_memory_attributes(self, gpa: int, size: int, *, private: bool) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES: the range private (KVM_MEMORY_ATTRIBUTE_PRIVATE: the
        guest_memfd backs it) or shared (the userspace mapping does)."""
        attrs = ffi.new("struct kvm_memory_attributes *")
        attrs.address, attrs.size = gpa, size
        attrs.attributes = K.KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        ret, err = ioctl_raw(self.fd, K.KVM_SET_MEMORY_ATTRIBUTES, attrs)
        if ret < 0:
            raise KvmError("KVM_SET_MEMORY_ATTRIBUTES", err,
                           f"{gpa:#x}+{size:#x} to {'private' if private else 'shared'}")

    def host_address(self, region: MemoryRegion) -> int:
        """The userspace address KVM was given for a slot (SEV commands take these)."""
        return int(ffi.cast("uintptr_t", region._owner[1]))

    # -- vCPUs --------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int = 0) -> KvmVcpu:
        """KVM_CREATE_VCPU(id) and mmap of its kvm_run."""
        arg = _VCPU_ID_ARGS[vcpu_id] if 0 <= vcpu_id < len(_VCPU_ID_ARGS) else ffi.cast(_VOIDP, vcpu_id)
        ret, err = ioctl_raw(self.fd, _KVM_CREATE_VCPU, arg)
        if ret < 0:
            raise KvmError("KVM_CREATE_VCPU", err, f"vcpu id {vcpu_id}")
        vcpu = KvmVcpu(self, ret, vcpu_id, self.system.vcpu_mmap_size)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._gmem_fds:
            for fd in self._gmem_fds:
                os.close(fd)
            self._gmem_fds = ()
        for r in self.regions:
            mm, ptr = r._owner
            r.view.release()
            ffi.release(ptr)
            try:  # noqa: SIM105 (not contextlib.suppress: an object and two calls per close, issue 15)
                mm.close()
            except BufferError:  # the caller still holds a slice of the memory; GC frees it
                pass
        self.regions.clear()
        self._pins = ()

    def __repr__(self) -> str:
        return f"KvmVm(fd={self.fd}, type={self.vm_type}, slots={len(self.regions)})"


def errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))
