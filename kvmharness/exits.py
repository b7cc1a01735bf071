"""Exits as a closed set of typed values.

Every return from ``Vcpu.run()`` is exactly one of the classes below, on every
backend.  Userspace sees on the simulator what it sees on real KVM, so these
mirror ``struct kvm_run``'s exit union (``KVM_EXIT_*``), decoded in one place per
backend (``kvm/vcpu.py:decode_exit``, ``sim/kvmlayer.py``).  An exit reason this
version does not know becomes :class:`Unsupported` rather than an exception, so
a newer kernel never crashes the caller.

Exits that ask userspace for data (:class:`IoIn`, :class:`MmioRead`,
:class:`MsrRead`) are completed with ``Vcpu.complete(value)`` before the next
``run()``; :class:`MsrWrite` may be refused with ``Vcpu.complete(error=True)``
(the guest then gets #GP, as KVM injects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The KVM_EXIT_* numbers and the values of their fields are ABI: kvmharness.abi holds them
# (the cdefs test pins them to the kernel headers); they stay importable from here.
from .abi import (
    KVM_EXIT_DEBUG,
    KVM_EXIT_EXCEPTION,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_HYPERCALL,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_UNKNOWN,
    KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR,
    KVM_MEMORY_EXIT_FLAG_PRIVATE,
    KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_INVAL,
    KVM_MSR_EXIT_REASON_UNKNOWN,
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SEV_TERM,
    KVM_SYSTEM_EVENT_SHUTDOWN,
    KVM_SYSTEM_EVENT_SUSPEND,
    KVM_SYSTEM_EVENT_WAKEUP,
)


class Exit:
    """Base class of every exit value (for isinstance checks and typing)."""

    __slots__ = ()
    reason: int = -1  # the KVM_EXIT_* number this exit kind corresponds to

    def __str__(self) -> str:
        parts = []
        name: str
        for name in self.__slots__:
            v = getattr(self, name)
            if isinstance(v, (bytes, bytearray)):
                parts.append(f"{name}={v.hex() or '-'}")
            elif isinstance(v, int) and v > 9:
                parts.append(f"{name}={v:#x}")
            else:
                parts.append(f"{name}={v}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict: ``{"exit": "IoOut", "port": 233, ...}``."""
        d: dict[str, Any] = {"exit": type(self).__name__}
        name: str
        for name in self.__slots__:
            v = getattr(self, name)
            d[name] = v.hex() if isinstance(v, (bytes, bytearray)) else v
        return d


@dataclass(frozen=True, slots=True)
class IoOut(Exit):
    """``KVM_EXIT_IO`` direction out: the guest wrote ``data`` (size*count bytes)."""

    port: int
    size: int
    count: int
    data: bytes
    reason = KVM_EXIT_IO

    @property
    def value(self) -> int:
        """The first element written, as an unsigned integer."""
        return int.from_bytes(self.data[: self.size], "little")


@dataclass(frozen=True, slots=True)
class IoIn(Exit):
    """``KVM_EXIT_IO`` direction in: complete with ``Vcpu.complete(value)``."""

    port: int
    size: int
    count: int
    reason = KVM_EXIT_IO


@dataclass(frozen=True, slots=True)
class MmioWrite(Exit):
    """``KVM_EXIT_MMIO`` write of ``size`` bytes to an unbacked guest-physical address."""

    addr: int
    size: int
    data: bytes
    reason = KVM_EXIT_MMIO

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")


@dataclass(frozen=True, slots=True)
class MmioRead(Exit):
    """``KVM_EXIT_MMIO`` read: complete with ``Vcpu.complete(value)``."""

    addr: int
    size: int
    reason = KVM_EXIT_MMIO


@dataclass(frozen=True, slots=True)
class Hlt(Exit):
    """``KVM_EXIT_HLT``: the guest executed HLT with no interrupt to wake it."""

    reason = KVM_EXIT_HLT


@dataclass(frozen=True, slots=True)
class Shutdown(Exit):
    """``KVM_EXIT_SHUTDOWN``: triple fault (or a state KVM cannot enter)."""

    reason = KVM_EXIT_SHUTDOWN


@dataclass(frozen=True, slots=True)
class MsrRead(Exit):
    """``KVM_EXIT_X86_RDMSR``: complete with ``Vcpu.complete(value)`` or ``(error=True)``."""

    index: int
    msr_reason: int  # KVM_MSR_EXIT_REASON_* bits
    reason = KVM_EXIT_X86_RDMSR


@dataclass(frozen=True, slots=True)
class MsrWrite(Exit):
    """``KVM_EXIT_X86_WRMSR``: accept with ``Vcpu.complete()``, refuse with ``(error=True)``."""

    index: int
    value: int
    msr_reason: int
    reason = KVM_EXIT_X86_WRMSR


@dataclass(frozen=True, slots=True)
class Hypercall(Exit):
    """``KVM_EXIT_HYPERCALL`` (KVM_CAP_EXIT_HYPERCALL): ``nr`` and up to 6 args."""

    nr: int
    args: tuple[int, ...]
    reason = KVM_EXIT_HYPERCALL


@dataclass(frozen=True, slots=True)
class SystemEvent(Exit):
    """``KVM_EXIT_SYSTEM_EVENT`` other than SEV termination."""

    type: int
    data: tuple[int, ...]
    reason = KVM_EXIT_SYSTEM_EVENT


@dataclass(frozen=True, slots=True)
class SevTermination(Exit):
    """``KVM_EXIT_SYSTEM_EVENT`` type ``KVM_SYSTEM_EVENT_SEV_TERM``.

    An SEV-ES guest asked to be terminated (GHCB MSR protocol 0x100 or the NAE
    event 0x8000FFFE), or KVM terminated it for a protocol violation.
    ``ghcb_msr`` is ``data[0]``: the GHCB MSR value KVM saw.
    """

    ghcb_msr: int
    reason = KVM_EXIT_SYSTEM_EVENT

    @property
    def reason_set(self) -> int:
        return (self.ghcb_msr >> 12) & 0xF

    @property
    def reason_code(self) -> int:
        return (self.ghcb_msr >> 16) & 0xFF


@dataclass(frozen=True, slots=True)
class InternalError(Exit):
    """``KVM_EXIT_INTERNAL_ERROR``: suberror 1 is an emulation failure."""

    suberror: int
    data: tuple[int, ...]
    reason = KVM_EXIT_INTERNAL_ERROR

    SUBERROR_NAMES = {1: "emulation failure", 2: "simultaneous exception",
                      3: "delivery event", 4: "unexpected exit reason"}

    @property
    def description(self) -> str:
        return self.SUBERROR_NAMES.get(self.suberror, f"suberror {self.suberror}")


@dataclass(frozen=True, slots=True)
class FailEntry(Exit):
    """``KVM_EXIT_FAIL_ENTRY``: the hardware refused VMRUN (``hardware_entry_failure_reason``)."""

    hardware_reason: int
    cpu: int
    reason = KVM_EXIT_FAIL_ENTRY


@dataclass(frozen=True, slots=True)
class Debug(Exit):
    """``KVM_EXIT_DEBUG``: single step or hardware breakpoint; ``pc`` is the guest RIP."""

    exception: int
    pc: int
    dr6: int
    dr7: int
    reason = KVM_EXIT_DEBUG


@dataclass(frozen=True, slots=True)
class MemoryFault(Exit):
    """``KVM_EXIT_MEMORY_FAULT`` (KVM_RUN failed with EFAULT): the guest accessed ``gpa``..+``size``
    as private (``flags`` KVM_MEMORY_EXIT_FLAG_PRIVATE) or shared while its memory attributes
    say the other; the VMM converts the range (KVM_SET_MEMORY_ATTRIBUTES) and runs again."""

    flags: int
    gpa: int
    size: int
    reason = KVM_EXIT_MEMORY_FAULT

    @property
    def private(self) -> bool:
        return bool(self.flags & KVM_MEMORY_EXIT_FLAG_PRIVATE)


@dataclass(frozen=True, slots=True)
class Unsupported(Exit):
    """An exit reason this version of kvmharness does not decode."""

    raw_reason: int


ALL_EXITS = (IoOut, IoIn, MmioWrite, MmioRead, Hlt, Shutdown, MsrRead, MsrWrite,
             Hypercall, SystemEvent, SevTermination, InternalError, FailEntry, Debug,
             MemoryFault, Unsupported)

#: Exits whose data the guest waits for: ``Vcpu.complete`` must be called.
NEEDS_COMPLETION = (IoIn, MmioRead, MsrRead)

__all__ = [
    "ALL_EXITS", "Debug", "Exit", "FailEntry", "Hlt", "Hypercall", "InternalError", "IoIn", "IoOut",
    "KVM_EXIT_DEBUG", "KVM_EXIT_EXCEPTION", "KVM_EXIT_FAIL_ENTRY", "KVM_EXIT_HLT",
    "KVM_EXIT_HYPERCALL", "KVM_EXIT_INTERNAL_ERROR", "KVM_EXIT_INTR", "KVM_EXIT_IO",
    "KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_MMIO", "KVM_EXIT_SHUTDOWN", "KVM_EXIT_SYSTEM_EVENT", "KVM_EXIT_UNKNOWN",
    "KVM_EXIT_X86_RDMSR", "KVM_EXIT_X86_WRMSR", "KVM_MSR_EXIT_REASON_FILTER",
    "KVM_MSR_EXIT_REASON_INVAL", "KVM_MSR_EXIT_REASON_UNKNOWN", "KVM_SYSTEM_EVENT_CRASH",
    "KVM_SYSTEM_EVENT_RESET", "KVM_SYSTEM_EVENT_SEV_TERM", "KVM_SYSTEM_EVENT_SHUTDOWN",
    "KVM_SYSTEM_EVENT_SUSPEND", "KVM_SYSTEM_EVENT_WAKEUP", "MmioRead", "MmioWrite", "MsrRead",
    "MemoryFault", "MsrWrite", "NEEDS_COMPLETION", "SevTermination", "Shutdown", "SystemEvent", "Unsupported",
]
