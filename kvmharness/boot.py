"""Entry state for guest images: the same bytes and registers on every backend.

For ``long64`` guests the harness builds, in guest RAM (addresses from
``guests/include/ucall.h``): 4-level page tables identity-mapping GiB 0 and
GiB 3 with 2 MiB pages, a GDT (64-bit code, data, 32/16-bit code, a TSS), an
IDT whose 256 gates lead to 16-byte default handlers, and the vCPU state of a
64-bit CPL0 kernel.  The default handlers report the vector and faulting RIP
through the ucall port, so an unexpected fault in a guest is a readable
failure instead of a silent triple fault.

For ``real`` guests: CS=0, IP=GUEST_LOAD_ADDR, flat 64 KiB segments.

Order matters on KVM: CPUID must be set before long-mode SREGS (KVM validates
EFER bits against the guest's CPUID: without SCE/NX in 0x80000001 it refuses).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING

from . import protocol as P
from .x86 import (
    CR0_ET,
    CR0_MP,
    CR0_NE,
    CR0_PE,
    CR0_PG,
    CR0_WP,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    EFER_LMA,
    EFER_LME,
    EFER_NXE,
    EFER_SCE,
    CpuidEntry,
    DTable,
    Regs,
    Segment,
    Sregs,
    frozen,
)

if TYPE_CHECKING:
    from .backend import Vcpu, Vm

LONG_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
LONG_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
LONG_EFER = EFER_LME | EFER_LMA | EFER_SCE | EFER_NXE
REAL_SP = 0x7C00

PTE_P, PTE_RW, PTE_PS = 0x1, 0x2, 0x80
TSS_SELECTOR = 0x30
TSS_BASE = P.BOOT_GDT + 0x100
TSS_LIMIT = 0x67

# GDT descriptors (flat); index = selector / 8
GDT_ENTRIES = (
    0x0000000000000000,  # 0x00 null
    0x00AF9B000000FFFF,  # 0x08 64-bit code, DPL0
    0x00CF93000000FFFF,  # 0x10 data, 4 GiB
    0x00CF9B000000FFFF,  # 0x18 32-bit code
    0x00009B000000FFFF,  # 0x20 16-bit code
    0x000093000000FFFF,  # 0x28 16-bit data
)


def _tss_descriptor(base: int, limit: int) -> bytes:
    """A 16-byte 64-bit TSS descriptor (type 0xB = busy, present)."""
    lo = ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | 0x8B << 40 | ((limit >> 16) & 0xF) << 48
          | ((base >> 24) & 0xFF) << 56)
    return struct.pack("<QQ", lo, base >> 32)


def _stub(vector: int) -> bytes:
    """16 bytes: mov $vector,%ebx; mov <rip from frame>,%rcx; mov $EXC,%al; out %al,$UCALL; jmp ."""
    if vector in P.ERROR_CODE_VECTORS:
        rip = b"\x48\x8b\x4c\x24\x08"  # mov 8(%rsp),%rcx (skip the error code)
    else:
        rip = b"\x48\x8b\x0c\x24\x90"  # mov (%rsp),%rcx; nop
    code = (b"\xbb" + struct.pack("<I", vector) + rip + bytes([0xB0, P.UCALL_EXCEPTION])
            + bytes([0xE6, P.UCALL_PORT]) + b"\xeb\xfe")
    assert len(code) == 16, len(code)
    return code


def _idt_gate(handler: int, selector: int = P.KERNEL_CS) -> bytes:
    """A 64-bit interrupt gate (type 0xE, present, DPL0)."""
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, 0, 0x8E, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)


def long_mode_tables(c_bit: int | None = None) -> dict[int, bytes]:
    """The boot structures as {guest-physical address: bytes} (a fresh dict; the bytes are
    built once per ``c_bit``).

    ``c_bit``: for SEV/SEV-ES guests, the encryption bit position (CPUID
    0x8000001F EBX[5:0]).  It is set in every entry that maps RAM (GiB 0) and
    in the table pointers, so the GDT, IDT, stack and image are accessed as
    private memory from the first instruction; the MMIO window (GiB 3) stays
    shared (C=0), as MMIO must.
    """
    return dict(_long_mode_tables(c_bit))


@functools.lru_cache(maxsize=16)
def _long_mode_tables(c_bit: int | None) -> tuple[tuple[int, bytes], ...]:
    enc = (1 << c_bit) if c_bit is not None else 0
    pml4 = struct.pack("<Q", P.BOOT_PDPT | PTE_P | PTE_RW | enc) + bytes(4096 - 8)
    pdpt = bytearray(4096)
    struct.pack_into("<Q", pdpt, 0 * 8, P.BOOT_PD0 | PTE_P | PTE_RW | enc)
    struct.pack_into("<Q", pdpt, 3 * 8, P.BOOT_PD3 | PTE_P | PTE_RW | enc)
    pd0 = b"".join(struct.pack("<Q", (i << 21) | PTE_P | PTE_RW | PTE_PS | enc) for i in range(512))
    pd3 = b"".join(struct.pack("<Q", (3 << 30) + (i << 21) | PTE_P | PTE_RW | PTE_PS)
                   for i in range(512))
    gdt = b"".join(struct.pack("<Q", d) for d in GDT_ENTRIES) + _tss_descriptor(TSS_BASE, TSS_LIMIT)
    idt = b"".join(_idt_gate(P.BOOT_STUBS + 16 * v) for v in range(256))
    stubs = b"".join(_stub(v) for v in range(256))
    return ((P.BOOT_PML4, pml4), (P.BOOT_PDPT, bytes(pdpt)), (P.BOOT_PD0, pd0), (P.BOOT_PD3, pd3),
            (P.BOOT_GDT, gdt), (TSS_BASE, bytes(TSS_LIMIT + 1)), (P.BOOT_IDT, idt), (P.BOOT_STUBS, stubs))


def long_mode_state(memory_size: int) -> tuple[Regs, Sregs]:
    code = Segment(base=0, limit=0xFFFFFFFF, selector=P.KERNEL_CS, type=11, present=1, dpl=0,
                   db=0, s=1, l=1, g=1)

    def data() -> Segment:
        return Segment(base=0, limit=0xFFFFFFFF, selector=P.KERNEL_DS, type=3, present=1, dpl=0,
                       db=1, s=1, l=0, g=1)

    sregs = Sregs(cs=code, ds=data(), es=data(), fs=data(), gs=data(), ss=data(),
                  tr=Segment(base=TSS_BASE, limit=TSS_LIMIT, selector=TSS_SELECTOR, type=11,
                             present=1, s=0),
                  ldt=Segment(base=0, limit=0xFFFF, selector=0, type=2, present=1, s=0),
                  gdt=DTable(base=P.BOOT_GDT, limit=len(GDT_ENTRIES) * 8 + 16 - 1),
                  idt=DTable(base=P.BOOT_IDT, limit=256 * 16 - 1),
                  cr0=LONG_CR0, cr3=P.BOOT_PML4, cr4=LONG_CR4, efer=LONG_EFER)
    regs = Regs(rip=P.GUEST_LOAD_ADDR, rsp=memory_size, rflags=0x2)
    return regs, sregs


def real_mode_state() -> tuple[Regs, Sregs]:
    def seg(type_: int) -> Segment:
        return Segment(base=0, limit=0xFFFF, selector=0, type=type_, present=1, s=1)

    sregs = Sregs(cs=seg(11), ds=seg(3), es=seg(3), fs=seg(3), gs=seg(3), ss=seg(3),
                  tr=Segment(base=0, limit=0xFFFF, selector=0, type=11, present=1, s=0),
                  ldt=Segment(base=0, limit=0xFFFF, selector=0, type=2, present=1, s=0),
                  gdt=DTable(0, 0xFFFF), idt=DTable(0, 0x3FF), cr0=CR0_ET, cr3=0, cr4=0, efer=0)
    return Regs(rip=P.GUEST_LOAD_ADDR, rsp=REAL_SP, rflags=0x2), sregs


@functools.lru_cache(maxsize=16)
def entry_state(mode: str, memory_size: int = 0) -> tuple[Regs, Sregs]:
    """The entry state of a ``long64`` or ``real`` guest, built once and shared: frozen
    copies (x86.frozen) of long_mode_state(memory_size) / real_mode_state(), so no caller
    can change another VM's, and a backend may cache what it derives from them (the kvm
    backend packs each once).  For a state to modify, call those two functions instead."""
    if mode == "long64":
        regs, sregs = long_mode_state(memory_size)
    elif mode == "real":
        regs, sregs = real_mode_state()
    else:  # images.py validated this already
        raise ValueError(f"unknown entry mode {mode!r}")
    return frozen(regs), frozen(sregs)


def sev_launch_blob(image: bytes, mode: str, c_bit: int | None) -> tuple[int, bytes]:
    """What an SEV launch measures for a harness guest: (guest-physical start, bytes).

    One contiguous range from the first boot table to the end of the image
    (zero-padded to 16 bytes, LAUNCH_UPDATE_DATA's granule), exactly as the
    harness lays it out in guest RAM -- so ``kvmharness measure GUEST`` and a
    launch of the same guest hash the same bytes.
    """
    padded = bytes(image) + bytes(-len(image) % 16)
    if mode == "real":
        return P.GUEST_LOAD_ADDR, padded
    start = P.BOOT_PML4
    blob = bytearray(P.GUEST_LOAD_ADDR - start + len(padded))
    for gpa, data in long_mode_tables(c_bit).items():
        blob[gpa - start:gpa - start + len(data)] = data
    blob[P.GUEST_LOAD_ADDR - start:] = padded
    return start, bytes(blob)


def load_image(vm: Vm, vcpu: Vcpu, image: bytes, mode: str, memory_size: int,
               cpuid: Iterable[CpuidEntry], *,
               c_bit: int | None = None) -> None:
    """Write the image (and for long mode the boot tables) and set the entry state."""
    vm.write(P.GUEST_LOAD_ADDR, image)
    vcpu.set_cpuid(cpuid)
    regs, sregs = entry_state(mode, memory_size if mode == "long64" else 0)
    if mode == "long64":
        for gpa, blob in _long_mode_tables(c_bit):
            vm.write(gpa, blob)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
