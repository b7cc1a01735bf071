"""``/dev/kvm``: the system fd, and the capability report read from it."""

from __future__ import annotations

import errno
import os
from typing import Any

from ..abi import KVM_X86_DEFAULT_VM, VM_TYPE_NAMES
from ..backend import KVM_DEVICE, Capabilities, System
from ..errors import DeviceMissing, FeatureUnavailable, HostError, KvmError, PermissionDenied
from ..watchdog import KICK_SIGNAL as KICK_SIGNAL  # re-exported: it lived here first
from ..watchdog import ensure_kick_signal
from ..x86 import CpuidEntry, CpuidTable
from . import _ffi as K
from ._ffi import ffi, ioctl, ioctl_raw
from .vm import KvmVm

KVM_API_VERSION = 12
_KVM_CREATE_VM = K.KVM_CREATE_VM

#: capabilities reported by ``info`` and kept in Capabilities.extensions
REPORTED_CAPS = (
    "KVM_CAP_IRQCHIP", "KVM_CAP_HLT", "KVM_CAP_USER_MEMORY", "KVM_CAP_NR_VCPUS",
    "KVM_CAP_MAX_VCPUS", "KVM_CAP_NR_MEMSLOTS", "KVM_CAP_SET_GUEST_DEBUG", "KVM_CAP_SYNC_REGS",
    "KVM_CAP_X86_USER_SPACE_MSR", "KVM_CAP_X86_MSR_FILTER", "KVM_CAP_DISABLE_QUIRKS2",
    "KVM_CAP_EXIT_HYPERCALL", "KVM_CAP_NESTED_STATE", "KVM_CAP_VM_TYPES", "KVM_CAP_SYS_ATTRIBUTES",
    "KVM_CAP_VM_COPY_ENC_CONTEXT_FROM", "KVM_CAP_VM_MOVE_ENC_CONTEXT_FROM",
    "KVM_CAP_EXIT_ON_EMULATION_FAILURE", "KVM_CAP_X86_TRIPLE_FAULT_EVENT", "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_USER_MEMORY2", "KVM_CAP_MEMORY_FAULT_INFO",
)

class KvmSystem(System):
    """KVM_GET_API_VERSION etc. on ``/dev/kvm``; makes :class:`KvmVm` objects."""

    name = "kvm"

    def __init__(self, path: str = KVM_DEVICE):
        self.path = path
        self.chosen_because = ""
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise DeviceMissing(
                f"{path} does not exist: this host has no KVM (load kvm_amd/kvm_intel, enable "
                "virtualization in the firmware, or use --backend sim)") from None
        except PermissionError as e:
            raise PermissionDenied(
                f"cannot open {path}: {e.strerror}. Join the 'kvm' group "
                "(sudo usermod -aG kvm $USER, then log in again) or run as root") from None
        except OSError as e:
            raise HostError(f"cannot open {path}: {e.strerror}") from None
        try:
            self.api_version = ioctl(self.fd, K.KVM_GET_API_VERSION)
            if self.api_version != KVM_API_VERSION:
                raise HostError(f"{path} speaks KVM API {self.api_version}, kvmharness needs "
                                f"{KVM_API_VERSION}")
            self.vcpu_mmap_size = ioctl(self.fd, K.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            os.close(self.fd)
            raise
        self._caps: Capabilities | None = None
        #: per VM type: the kvm_enable_cap that turns the hypercall-patching quirk off there
        #: (None: this kernel offers no way), found on the first VM of that type (kvm/vm.py)
        self.quirk_caps: dict[int, Any] = {}
        self._vm_type_args: dict[int, Any] = {}  # VM type -> KVM_CREATE_VM's argument, cast once
        self._supported_cpuid: CpuidTable | None = None
        if not ensure_kick_signal():
            os.close(self.fd)
            raise HostError(
                "cannot bound guest runs: the signal that interrupts KVM_RUN has no handler, and "
                "Python installs one only from the main thread; import kvmharness from the main "
                "thread first")

    # -- capabilities --------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm (0 for an unknown capability)."""
        ret, err = ioctl_raw(self.fd, K.KVM_CHECK_EXTENSION, ffi.cast("void *", cap))
        return ret if ret >= 0 else 0

    def supported_cpuid(self) -> CpuidTable:
        """KVM_GET_SUPPORTED_CPUID (read once per System)."""
        if self._supported_cpuid is None:
            self._supported_cpuid = CpuidTable(self._get_cpuid(K.KVM_GET_SUPPORTED_CPUID))
        return self._supported_cpuid

    def emulated_cpuid(self) -> CpuidTable:
        """KVM_GET_EMULATED_CPUID."""
        return CpuidTable(self._get_cpuid(K.KVM_GET_EMULATED_CPUID))

    def _get_cpuid(self, request: int) -> list[CpuidEntry]:
        nent = 128
        while True:
            buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + nent * ffi.sizeof("struct kvm_cpuid_entry2"))
            c = ffi.cast("struct kvm_cpuid2 *", buf)
            c.nent = nent
            ret, err = ioctl_raw(self.fd, request, c)
            if ret < 0 and err == errno.E2BIG and nent < 4096:
                nent *= 2
                continue
            if ret < 0:
                raise KvmError(K.IOCTL_NAMES.get(request, hex(request)), err)
            return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                    for e in (c.entries[i] for i in range(c.nent))]

    def _msr_list(self, request: int) -> tuple[int, ...]:
        n = 64
        while True:
            buf = ffi.new("char[]", ffi.sizeof("struct kvm_msr_list") + 4 * n)
            lst = ffi.cast("struct kvm_msr_list *", buf)
            lst.nmsrs = n
            ret, err = ioctl_raw(self.fd, request, lst)
            if ret < 0 and err == errno.E2BIG and n < 65536:
                n = max(n * 2, lst.nmsrs)
                continue
            if ret < 0:
                return ()
            return tuple(lst.indices[i] for i in range(lst.nmsrs))

    @property
    def capabilities(self) -> Capabilities:
        if self._caps is None:
            exts = {}
            for name in REPORTED_CAPS:
                num = getattr(K, name, None)
                if num is not None:
                    exts[name] = self.check_extension(num)
            mask = exts.get("KVM_CAP_VM_TYPES", 0)
            vm_types = frozenset(t for t in range(32) if mask >> t & 1) or frozenset({KVM_X86_DEFAULT_VM})
            self._caps = Capabilities(
                backend="kvm", api_version=self.api_version, extensions=exts, vm_types=vm_types,
                supported_cpuid=self.supported_cpuid(),
                msr_index_list=self._msr_list(K.KVM_GET_MSR_INDEX_LIST),
                feature_msr_index_list=self._msr_list(K.KVM_GET_MSR_FEATURE_INDEX_LIST))
        return self._caps

    # -- VMs --------------------------------------------------------------------
    def create_vm(self, vm_type: int = KVM_X86_DEFAULT_VM) -> KvmVm:
        """KVM_CREATE_VM(type)."""
        arg = self._vm_type_args.get(vm_type)
        if arg is None:
            arg = self._vm_type_args[vm_type] = ffi.cast("void *", vm_type)
        ret, err = ioctl_raw(self.fd, _KVM_CREATE_VM, arg)
        if ret < 0:
            if err == errno.EINVAL and vm_type != KVM_X86_DEFAULT_VM:
                mask = self.check_extension(K.KVM_CAP_VM_TYPES)
                offered = ", ".join(VM_TYPE_NAMES.get(t, str(t)) for t in range(32) if mask >> t & 1)
                raise FeatureUnavailable(
                    f"KVM_CREATE_VM refused VM type {vm_type} ({VM_TYPE_NAMES.get(vm_type, '?')}): "
                    f"EINVAL. This kernel offers VM types: {offered or 'default only'} "
                    f"(KVM_CAP_VM_TYPES={mask:#x})")
            raise KvmError("KVM_CREATE_VM", err)
        return KvmVm(self, ret, vm_type)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"KvmSystem({self.path!r}, api={self.api_version})"
