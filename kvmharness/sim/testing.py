"""Tiny inline guests for the simulator's own tests and ``bench_sim()``.

``assemble()`` runs GNU as/ld (binutils) on Intel-syntax source; ``long_mode_vm()``
and ``real_mode_vm()`` build the minimal machine state (identity page tables,
a flat GDT, an IDT) the way ``boot.py`` does for the harness guests, without
depending on it.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile

from ..x86 import DTable, Regs, Segment, Sregs

LOAD = 0x8000
PML4, PDPT, PD0, PD3, GDT, IDT, STUBS = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000, 0x6000, 0x7000
STACK_TOP = 0x80000


def have_binutils() -> bool:
    return bool(shutil.which("as") and shutil.which("ld"))


def assemble(src: str, bits: int = 64, org: int = LOAD) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "g.S"), "w") as f:
            f.write(f".intel_syntax noprefix\n.code{bits}\n.globl _start\n_start:\n{src}\n")
        subprocess.run(["as", "-o", f"{d}/g.o", f"{d}/g.S"], check=True, capture_output=True)
        subprocess.run(["ld", "-Ttext", hex(org), "--oformat", "binary", "-o", f"{d}/g.bin", f"{d}/g.o"],
                       check=True, capture_output=True)
        with open(f"{d}/g.bin", "rb") as f:
            return f.read()


def long_mode_setup(vm, vcpu, code: bytes, *, mem: int = 0x200000, handlers: bool = True):
    """Identity-map 1 GiB (and GiB 3), flat GDT, IDT whose vectors 0-31 report and halt."""
    region = vm.add_memory(0, mem)
    w = vm.write
    w(PML4, struct.pack("<Q", PDPT | 3))
    w(PDPT, struct.pack("<QQQQ", PD0 | 3, 0, 0, PD3 | 3))
    w(PD0, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))
    w(PD3, b"".join(struct.pack("<Q", (3 << 30) + (i << 21) | 0x83) for i in range(512)))
    w(GDT, struct.pack("<QQQ", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF))
    if handlers:
        for v in range(32):
            # stub: mov bl, v ; mov al, 4 ; out 0xeb, al ; hlt  (reports vector, then halts)
            stub = bytes((0xB3, v, 0xB0, 4, 0xE6, 0xEB, 0xF4))
            w(STUBS + 16 * v, stub)
            off = STUBS + 16 * v
            lo = (off & 0xFFFF) | (0x08 << 16) | (0x8E << 40) | ((off >> 16) & 0xFFFF) << 48
            w(IDT + 16 * v, struct.pack("<QQ", lo, off >> 32))
    w(LOAD, code)
    cs = Segment(base=0, limit=0xFFFFFFFF, selector=0x08, type=11, present=1, s=1, l=1, g=1)
    ds = Segment(base=0, limit=0xFFFFFFFF, selector=0x10, type=3, present=1, s=1, db=1, g=1)
    sregs = Sregs(cs=cs, ds=ds, es=ds, fs=ds, gs=ds, ss=ds, gdt=DTable(GDT, 23), idt=DTable(IDT, 16 * 32 - 1),
                  cr0=0x80000033, cr3=PML4, cr4=0x620, efer=0x500,
                  tr=Segment(limit=0x67, type=11, present=1, s=0), ldt=Segment(type=2, s=0, present=1))
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=LOAD, rsp=STACK_TOP, rflags=2))
    return region


def real_mode_setup(vm, vcpu, code: bytes, *, cs: int = 0x0700, ip: int = 0x100, mem: int = 0x100000):
    region = vm.add_memory(0, mem)
    vm.write((cs << 4) + ip, code)
    seg = dict(limit=0xFFFF, present=1, s=1)
    sregs = Sregs(cs=Segment(base=cs << 4, selector=cs, type=11, **seg),
                  ds=Segment(type=3, **seg), es=Segment(type=3, **seg), fs=Segment(type=3, **seg),
                  gs=Segment(type=3, **seg), ss=Segment(type=3, **seg),
                  gdt=DTable(0, 0xFFFF), idt=DTable(0, 0x3FF), cr0=0x10, efer=0)
    vcpu.set_sregs(sregs)
    vcpu.set_regs(Regs(rip=ip, rsp=0x7000, rflags=2))
    return region
