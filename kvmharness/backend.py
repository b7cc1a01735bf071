"""The one interface, and how a backend is chosen.

A backend is a :class:`System` (``/dev/kvm`` or the simulator) that makes
:class:`Vm` objects, which make :class:`Vcpu` objects: one object per kernel
file descriptor, each a context manager that owns its fd, mmap or model state.
Both backends -- ``kvm`` (``kvmharness.kvm``) and ``sim`` (``kvmharness.sim``) --
implement exactly these calls and return the same values (``x86.Regs``,
``exits.*``), so guests, the Machine loop and the tests run unchanged on
either.  ``tests/test_contract.py`` holds them to it.

This module is the interface only: it imports neither backend.  Choosing and
opening one (``open_backend``) is ``kvmharness.factory``'s job, the layer above
both; ``kvmharness.backend.open_backend`` stays importable as an alias of it.
The kernel's numbers (VM types, exit reasons) live in ``kvmharness.abi``.
"""

from __future__ import annotations

import abc
import importlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

# VM types (the KVM_CREATE_VM argument) are ABI; re-exported here for existing callers
from .abi import (
    KVM_X86_DEFAULT_VM,
    KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM,
    KVM_X86_SNP_VM,
    KVM_X86_SW_PROTECTED_VM,
    VM_TYPE_NAMES,
)
from .errors import DeviceMissing, FeatureUnavailable, PermissionDenied, UsageError
from .x86 import CPUID_EXT_FEATURES, CPUID_SEV, EXT_ECX_SVM, CpuidEntry, CpuidTable, Regs, Sregs

if TYPE_CHECKING:
    from collections.abc import Callable
    from contextlib import AbstractContextManager

    from .abi import NestedState
    from .exits import Exit

BACKENDS = ("kvm", "sim")
KVM_DEVICE = os.environ.get("KVMHARNESS_KVM_DEVICE", "/dev/kvm")  # override for tests and odd hosts
SEV_DEVICE = os.environ.get("KVMHARNESS_SEV_DEVICE", "/dev/sev")


@dataclass(frozen=True)
class Capabilities:
    """What a backend offers, as one value (read once when the System opens)."""

    backend: str
    api_version: int
    extensions: dict[str, int] = field(default_factory=dict)  # KVM_CAP_* name -> check_extension value
    vm_types: frozenset[int] = frozenset({KVM_X86_DEFAULT_VM})
    supported_cpuid: CpuidTable = field(default_factory=CpuidTable)
    msr_index_list: tuple[int, ...] = ()
    feature_msr_index_list: tuple[int, ...] = ()

    def has(self, cap: str) -> bool:
        return bool(self.extensions.get(cap, 0))

    @property
    def svm(self) -> bool:
        """Whether a guest can be offered SVM (CPUID 0x80000001 ECX bit 2)."""
        e = self.supported_cpuid.lookup(CPUID_EXT_FEATURES)
        return bool(e and e.ecx & EXT_ECX_SVM)

    @property
    def sev_leaf(self) -> CpuidEntry | None:
        """CPUID 0x8000001F as the backend offers it to guests (None if absent)."""
        return self.supported_cpuid.lookup(CPUID_SEV)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "api_version": self.api_version,
            "extensions": dict(self.extensions),
            "vm_types": sorted(self.vm_types),
            "vm_type_names": [VM_TYPE_NAMES.get(t, str(t)) for t in sorted(self.vm_types)],
            "svm": self.svm,
            "supported_cpuid_entries": len(self.supported_cpuid),
            "msr_index_list": [hex(m) for m in self.msr_index_list],
        }


class MemoryRegion:
    """Guest RAM backed by host memory: ``view`` is a writable memoryview of it."""

    __slots__ = ("slot", "gpa", "size", "view", "readonly", "_owner")

    def __init__(self, slot: int, gpa: int, size: int, view: memoryview, readonly: bool,
                 owner: Any = None):
        self.slot, self.gpa, self.size, self.view, self.readonly = slot, gpa, size, view, readonly
        self._owner = owner  # keeps the mmap alive

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.gpa + self.size

    def __repr__(self) -> str:
        return f"MemoryRegion(slot={self.slot}, gpa={self.gpa:#x}, size={self.size:#x})"


_Self = TypeVar("_Self", bound="_Closable")


class _Closable(abc.ABC):
    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abc.abstractmethod
    def close(self) -> None: ...


class Vcpu(_Closable):
    """One virtual CPU.  Methods mirror the vCPU ioctls of the same name."""

    vcpu_id: int

    @abc.abstractmethod
    def run(self) -> Exit:
        """KVM_RUN: run until the next exit userspace must see; returns an ``exits.Exit``."""

    @abc.abstractmethod
    def complete(self, value: int | bytes = 0, *, error: bool = False) -> None:
        """Supply the data an IoIn / MmioRead / MsrRead exit asked for (or refuse an MSR access)."""

    @abc.abstractmethod
    def kick(self) -> None:
        """Make a running (or the next) ``run()`` return promptly; safe from any thread."""

    @abc.abstractmethod
    def get_regs(self) -> Regs: ...

    @abc.abstractmethod
    def set_regs(self, regs: Regs) -> None: ...

    @abc.abstractmethod
    def get_sregs(self) -> Sregs: ...

    @abc.abstractmethod
    def set_sregs(self, sregs: Sregs) -> None: ...

    @abc.abstractmethod
    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]: ...

    @abc.abstractmethod
    def set_msrs(self, values: Mapping[int, int]) -> int: ...

    @abc.abstractmethod
    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None: ...

    @abc.abstractmethod
    def set_single_step(self, enabled: bool) -> None: ...

    # -- optional capabilities ---------------------------------------------------------
    # Every capability only one backend (or one kind of vCPU) has is a method here whose
    # default raises FeatureUnavailable, as cloud-hypervisor's ``trait Vcpu`` does: a caller
    # calls it and handles the error, never asks whether the object has it.  Which backend
    # offers which is pinned by tests/test_backend_contract.py.

    #: DR7 as KVM_SET_DEBUGREGS / KVM_SET_GUEST_DEBUG left it (the reset value: the
    #: harness sets no hardware breakpoint); the SEV-ES VMSA records it.
    dr7: int = 0x400
    #: KVM_SET_GUEST_DEBUG's control word (KVM refuses LAUNCH_UPDATE_VMSA while it is set)
    guest_debug: int = 0

    def _unavailable(self, what: str) -> FeatureUnavailable:
        return FeatureUnavailable(f"{what} is not offered by the {type(self).__name__} vCPU")

    def runner(self) -> Callable[[], Exit]:
        """``run`` as a plain callable for a tight loop (KVM binds the kick thread once)."""
        return self.run

    def fast_loop(self) -> Any:
        """The compiled exit loop (kvm/fastpath.py), or None where it cannot load."""
        raise self._unavailable("a compiled exit loop")

    def decode_exit(self) -> Exit:
        """The exit the compiled loop stopped at (only after :meth:`fast_loop`)."""
        raise self._unavailable("a compiled exit loop")

    def run_failure_hint(self, err: int) -> str:
        """One line on what a failed KVM_RUN's errno usually means here ('' if nothing)."""
        return ""

    def enable_sync_regs(self, enabled: bool = True) -> None:
        """KVM_SYNC_X86_REGS: GPRs copied out at every exit (then :meth:`synced_rip` works)."""
        raise self._unavailable("KVM_CAP_SYNC_REGS")

    def synced_rip(self) -> int:
        """RIP as synced at the last exit (after ``enable_sync_regs(True)``)."""
        raise self._unavailable("KVM_CAP_SYNC_REGS")

    def kernel_tracer(self) -> AbstractContextManager[Any]:
        """A context manager recording the kernel's KVM tracepoints for this vCPU; the
        object it returns has ``events`` and ``error`` once closed."""
        raise self._unavailable("a kernel tracer (KVM tracepoints)")

    def hardware_trace(self) -> list[Any]:
        """Every SVM #VMEXIT as the hardware took it (VMCB exit code and infos), oldest first."""
        raise self._unavailable("a hardware #VMEXIT trace")

    def add_vmexit_hook(self, callback: Callable[[Any], object]) -> None:
        """Call ``callback(record)`` at every hardware #VMEXIT, including the ones the kernel
        handles itself (the hypervisor's-eye view of kvmharness.lab)."""
        raise self._unavailable("a #VMEXIT hook")

    def remove_vmexit_hook(self, callback: Callable[[Any], object]) -> None:
        raise self._unavailable("a #VMEXIT hook")

    def add_rmp_fault_hook(self, callback: Callable[[str, int, int, int, str], object]) -> None:
        """Call ``callback(kind, error_code, gpa, rip, why)`` at every RMP fault of an SEV-SNP
        guest (#NPF with the RMP bit, #VC 0x404) as the hypervisor sees it."""
        raise self._unavailable("an RMP fault hook (SEV-SNP)")

    @property
    def vmcb(self) -> Any:
        """The VMCB as the hardware left it at the last #VMEXIT (``sim/vmcb.py``'s view)."""
        raise self._unavailable("a VMCB view (KVM keeps the VMCB in kernel memory)")

    def vmsa_ciphertext(self) -> bytes:
        """The SEV-ES vCPU's encrypted VMSA page, as the host can read it."""
        raise self._unavailable("a host view of the SEV-ES VMSA (KVM keeps it in kernel memory)")

    def save_vmsa_at_exit(self) -> None:
        """From now on every #VMEXIT writes the guest state into the encrypted VMSA, as
        SEV-ES hardware does, so :meth:`vmsa_ciphertext` follows the guest."""
        raise self._unavailable("writing the SEV-ES VMSA at each #VMEXIT")

    def inject_exception(self, vector: int, error_code: int | None = None) -> None:
        """Deliver an exception to the guest before it runs again."""
        raise self._unavailable("exception injection")

    def get_nested_state(self) -> NestedState:
        """KVM_GET_NESTED_STATE."""
        raise self._unavailable("KVM_CAP_NESTED_STATE")

    def set_nested_state(self, state: NestedState) -> None:
        """KVM_SET_NESTED_STATE (set CPUID, SREGS with EFER.SVME and REGS first)."""
        raise self._unavailable("KVM_CAP_NESTED_STATE")

    def complete_pending_exit(self) -> None:
        """Finish the last exit's instruction without entering the guest (KVM_RUN with
        ``immediate_exit``), so registers and nested state are at an instruction boundary."""
        raise self._unavailable("KVM_CAP_IMMEDIATE_EXIT")


class Vm(_Closable):
    """One virtual machine: memory slots, vCPUs, VM-wide capabilities."""

    system: System
    vm_type: int
    regions: list[MemoryRegion]
    vcpus: list[Any]  # the Vcpu objects create_vcpu made, in order
    #: the SEV interface made by :meth:`sev_interface` (one per VM: it holds the launch state)
    _sev_interface_of_vm: Any = None

    @abc.abstractmethod
    def add_memory(self, gpa: int, size: int, *, readonly: bool = False) -> MemoryRegion:
        """KVM_SET_USER_MEMORY_REGION: back ``size`` bytes at ``gpa`` with fresh host memory."""

    @abc.abstractmethod
    def create_vcpu(self, vcpu_id: int = 0) -> Vcpu: ...

    @abc.abstractmethod
    def check_extension(self, cap: int) -> int: ...

    @abc.abstractmethod
    def enable_cap(self, cap: int, *args: int) -> None: ...

    @abc.abstractmethod
    def enable_user_msr_exits(self, reasons: int) -> None:
        """KVM_CAP_X86_USER_SPACE_MSR: which refused MSR accesses go to userspace."""

    @abc.abstractmethod
    def set_msr_filter(self, ranges: Iterable[tuple[int, int, bool, bool]], *,
                       default_allow: bool = True) -> None:
        """KVM_X86_SET_MSR_FILTER.  ``ranges``: iterable of (base, nmsrs, read, write);
        listed MSRs with read/write False are refused (and go to userspace with the
        FILTER reason when user MSR exits are on)."""

    # -- optional capabilities (defaults raise FeatureUnavailable; see Vcpu) ---------------
    def sev_interface(self) -> Any:
        """The VM's SEV interface (``sev.launch.SevKvmInterface``: KVM_MEMORY_ENCRYPT_OP or
        the simulator's model), made on first use by :meth:`open_sev_interface` and kept."""
        if self._sev_interface_of_vm is None:
            self._sev_interface_of_vm = self.open_sev_interface()
        return self._sev_interface_of_vm

    def open_sev_interface(self) -> Any:
        """The backend's part of :meth:`sev_interface`: make the interface."""
        raise FeatureUnavailable(f"{type(self).__name__} offers no SEV interface (its backend has "
                                 "neither KVM_MEMORY_ENCRYPT_OP nor a simulated SEV firmware)")

    def remap_page(self, gpa: int, target: int) -> None:
        """Point guest-physical page ``gpa`` at the memory behind page ``target`` (one nested
        page table entry rewritten, as a hypervisor can; ``remap_page(gpa, gpa)`` restores)."""
        raise FeatureUnavailable(f"{type(self).__name__} cannot rewrite a nested page table "
                                 "entry: KVM offers userspace no call for it")

    def flush_code(self, gpa: int, size: int) -> None:
        """Forget translated code over a range the host rewrote.  Hardware keeps no stale
        translations, so only an emulator has anything to do."""

    # -- guest memory access (host view) ---------------------------------
    def region_for(self, gpa: int, length: int = 1) -> MemoryRegion:
        for r in self.regions:
            if r.contains(gpa, length):
                return r
        raise UsageError(f"guest-physical range {gpa:#x}+{length:#x} is not backed by a memory slot")

    def read(self, gpa: int, length: int) -> bytes:
        """Bytes of guest RAM as the host sees them (ciphertext for encrypted pages)."""
        r = self.region_for(gpa, length)
        off = gpa - r.gpa
        return bytes(r.view[off:off + length])

    def write(self, gpa: int, data: bytes) -> None:
        r = self.region_for(gpa, len(data))
        off = gpa - r.gpa
        r.view[off:off + len(data)] = data


class System(_Closable):
    """A backend's root object: ``/dev/kvm`` or the simulator."""

    name: str
    #: one line saying why ``open_backend`` picked this backend ("" when made directly)
    chosen_because: str = ""

    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @abc.abstractmethod
    def create_vm(self, vm_type: int = KVM_X86_DEFAULT_VM) -> Vm: ...


def kvm_usable(path: str = KVM_DEVICE) -> tuple[bool, str]:
    """(usable, why) without raising: used by ``auto`` and by ``info``."""
    if not os.path.exists(path):
        return False, f"{path} does not exist (no KVM module loaded, or not a Linux host)"
    if not os.access(path, os.R_OK | os.W_OK):
        return False, (f"{path} exists but this user cannot open it read-write: "
                       "join the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root")
    return True, f"{path} is present and accessible"


def __getattr__(name: str) -> Any:
    # ``kvmharness.backend.open_backend`` predates kvmharness.factory; resolve it on first
    # use so that this interface module never imports a backend (the import graph and
    # import-linter see no edge from here to the factory).
    if name == "open_backend":
        return importlib.import_module("kvmharness.factory").open_backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "KVM_DEVICE", "KVM_X86_DEFAULT_VM", "KVM_X86_SEV_ES_VM", "KVM_X86_SEV_VM",
           "KVM_X86_SNP_VM", "KVM_X86_SW_PROTECTED_VM", "SEV_DEVICE", "VM_TYPE_NAMES", "Capabilities",
           "DeviceMissing", "MemoryRegion", "PermissionDenied", "System", "Vcpu", "Vm", "kvm_usable"]
