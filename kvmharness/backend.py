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
from .errors import DeviceMissing, PermissionDenied, UsageError
from .x86 import CPUID_EXT_FEATURES, CPUID_SEV, EXT_ECX_SVM, CpuidEntry, CpuidTable, Regs, Sregs

if TYPE_CHECKING:
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


class Vm(_Closable):
    """One virtual machine: memory slots, vCPUs, VM-wide capabilities."""

    system: System
    vm_type: int
    regions: list[MemoryRegion]

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
