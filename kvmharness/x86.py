"""Backend-neutral x86 vCPU state: registers, segments, CPUID entries, MSR numbers.

These are the Python faces of ``struct kvm_regs``, ``kvm_sregs``, ``kvm_segment``,
``kvm_dtable`` and ``kvm_cpuid_entry2``; both backends take and return them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

GPR_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# CR0 / CR4 / EFER bits
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
EFER_SVME = 1 << 12

# MSRs used by the harness and its guests
MSR_EFER = 0xC0000080
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_FS_BASE = 0xC0000100
MSR_GS_BASE = 0xC0000101
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_VM_CR = 0xC0010114
MSR_VM_HSAVE_PA = 0xC0010117
MSR_SEV_ES_GHCB = 0xC0010130
MSR_SEV_STATUS = 0xC0010131

# CPUID leaves of interest
CPUID_SVM_FEATURES = 0x8000000A
CPUID_SEV = 0x8000001F
CPUID_EXT_FEATURES = 0x80000001
EXT_ECX_SVM = 1 << 2

# kvm_cpuid_entry2.flags
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1


@dataclass(slots=True)
class Regs:
    """General-purpose registers, RIP and RFLAGS (``struct kvm_regs``)."""

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Segment:
    """A segment register as KVM describes it (``struct kvm_segment``)."""

    base: int = 0
    limit: int = 0xFFFF
    selector: int = 0
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @property
    def attrib(self) -> int:
        """The VMCB's compressed attribute word (APM vol. 2, 15.5.1; docs/facts.md#facts-2a)."""
        return ((self.type & 0xF) | (self.s & 1) << 4 | (self.dpl & 3) << 5 | (self.present & 1) << 7
                | (self.avl & 1) << 8 | (self.l & 1) << 9 | (self.db & 1) << 10 | (self.g & 1) << 11)

    @classmethod
    def from_attrib(cls, selector: int, attrib: int, limit: int, base: int) -> Segment:
        return cls(base=base, limit=limit, selector=selector, type=attrib & 0xF,
                   s=(attrib >> 4) & 1, dpl=(attrib >> 5) & 3, present=(attrib >> 7) & 1,
                   avl=(attrib >> 8) & 1, l=(attrib >> 9) & 1, db=(attrib >> 10) & 1,
                   g=(attrib >> 11) & 1, unusable=0 if (attrib >> 7) & 1 else 1)


@dataclass(slots=True)
class DTable:
    """GDTR / IDTR (``struct kvm_dtable``)."""

    base: int = 0
    limit: int = 0xFFFF


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


@dataclass(slots=True)
class Sregs:
    """Segment and control registers (``struct kvm_sregs``); interrupt_bitmap omitted."""

    cs: Segment = field(default_factory=lambda: Segment(type=11))
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: Segment(type=11, s=0))
    ldt: Segment = field(default_factory=lambda: Segment(type=2, s=0))
    gdt: DTable = field(default_factory=DTable)
    idt: DTable = field(default_factory=DTable)
    cr0: int = CR0_ET
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = 0xFEE00900

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

# -- shared, immutable states --------------------------------------------------------------
# The harness's entry states (boot.py) are built once and given to every vCPU; they are
# frozen copies, so no one can change them under another VM, and a backend may cache what
# it derives from one (the kvm backend keeps the packed kvm_sregs/kvm_regs bytes).
class _Frozen:
    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}: a shared, immutable state")

    def __delattr__(self, name: str) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}: a shared, immutable state")


class FrozenRegs(_Frozen, Regs):
    __slots__ = ()


class FrozenSegment(_Frozen, Segment):
    __slots__ = ()


class FrozenDTable(_Frozen, DTable):
    __slots__ = ()


class FrozenSregs(_Frozen, Sregs):
    __slots__ = ()


_FROZEN: dict[type, type] = {Regs: FrozenRegs, Segment: FrozenSegment, DTable: FrozenDTable,
                             Sregs: FrozenSregs}

_S = TypeVar("_S")


def frozen(state: _S) -> _S:
    """An immutable copy of a Regs or Sregs (its Segments and DTables frozen too)."""
    cls = _FROZEN.get(type(state))
    if cls is None:
        return state  # already frozen (or not a state type)
    new: Any = object.__new__(cls)
    for f in fields(state):  # type: ignore[arg-type]
        value = getattr(state, f.name)
        object.__setattr__(new, f.name, frozen(value) if type(value) in _FROZEN else value)
    return new  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    """One CPUID leaf/subleaf and its four output registers (``kvm_cpuid_entry2``)."""

    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @property
    def significant_index(self) -> bool:
        return bool(self.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CpuidTable:
    """An ordered set of CPUID entries with KVM's lookup rule.

    KVM (``kvm_find_cpuid_entry_index``) matches ``function`` and, only when the
    entry's SIGNIFCANT_INDEX flag is set, ``index``.  A leaf absent from the
    table reads as all zeros in the guest on both backends (what these
    machines' KVM does for leaves it was not given; measured).
    """

    __slots__ = ("entries", "_map")

    def __init__(self, entries: Iterable[CpuidEntry] = ()) -> None:
        self.entries: tuple[CpuidEntry, ...] = tuple(entries)
        self._map: dict[tuple[int, int | None], CpuidEntry] = {}
        for e in self.entries:
            key = (e.function, e.index if e.significant_index else None)
            self._map.setdefault(key, e)

    def lookup(self, function: int, index: int = 0) -> CpuidEntry | None:
        m = self._map
        return m.get((function, index)) or m.get((function, None))

    def with_entry(self, entry: CpuidEntry) -> CpuidTable:
        """A copy with ``entry`` replacing any entry for the same leaf/subleaf."""
        kept = [e for e in self.entries
                if not (e.function == entry.function
                        and (not e.significant_index or e.index == entry.index))]
        return CpuidTable(kept + [entry])

    def __iter__(self) -> Iterator[CpuidEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def with_vcpu_apic_id(table: CpuidTable, apic_id: int) -> CpuidTable:
    """``table`` with the initial APIC ID of vCPU ``apic_id`` in CPUID 1 EBX[31:24].

    KVM_GET_SUPPORTED_CPUID runs CPUID on whichever host CPU the ioctl happened to
    run on, so that byte is the *host's* APIC ID of that CPU (arch/x86/kvm/cpuid.c
    do_host_cpuid); a VMM puts the vCPU's own ID there (QEMU's cpu_x86_cpuid, leaf
    1).  Without this two tables read on different host CPUs differ.
    """
    leaf = table.lookup(1)
    if leaf is None:
        return table
    ebx = (leaf.ebx & 0x00FFFFFF) | ((apic_id & 0xFF) << 24)
    return table.with_entry(dataclasses.replace(leaf, ebx=ebx))


def sev_cpuid_leaf(c_bit: int = 51, phys_reduction: int = 1, num_guests: int = 509,
                   min_sev_asid: int = 100, sev: bool = True, sev_es: bool = True) -> CpuidEntry:
    """CPUID 0x8000001F as an SEV-capable EPYC describes it (docs/facts.md#facts-10a)."""
    eax = (1 << 1 if sev else 0) | (1 << 3 if sev_es else 0)
    ebx = (c_bit & 0x3F) | (phys_reduction & 0x3F) << 6
    return CpuidEntry(CPUID_SEV, 0, 0, eax, ebx, num_guests, min_sev_asid)


def regs_field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Regs))
