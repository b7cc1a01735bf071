"""Exception delivery through the guest's IDT (long mode) or IVT (real mode).

unicorn reports an exception but never delivers it (docs/facts.md#unicorn-exceptions), so the model
does what the CPU does: read the gate, switch stacks (IST), push the frame
(SS, RSP, RFLAGS, CS, RIP and the error code for vectors that have one), clear
TF/NT/RF (and IF through an interrupt gate) and continue at the handler.  A
fault while delivering becomes #DF; a fault while delivering #DF is a triple
fault, which the SVM model turns into the SHUTDOWN intercept.
Limits: no privilege-level change of CS's hidden state (the hosts' guests run
at CPL0), no task gates, no 32-bit protected-mode IDT.
"""

from __future__ import annotations

import struct

import unicorn
from unicorn import x86_const as X

from .core import translate

EXC_WITH_ERROR_CODE = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
VEC_DF = 8
VEC_GP = 13
VEC_PF = 14
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17


class DeliveryFault(Exception):
    """Delivering an event faulted (bad gate, unmapped stack): escalate."""

    def __init__(self, vector, error=0):
        super().__init__(vector)
        self.vector, self.error = vector, error


class TripleFault(Exception):
    pass


def read_linear(core, lin, size):
    out = b""
    while size:
        gpa, err = translate(core, lin)
        if gpa is None:
            raise DeliveryFault(VEC_PF, err)
        n = min(size, 0x1000 - (lin & 0xFFF))
        try:
            out += core.read_phys(gpa, n)
        except unicorn.UcError:
            raise DeliveryFault(VEC_PF, 0) from None
        lin, size = lin + n, size - n
    return out


def write_linear(core, lin, data):
    while data:
        gpa, err = translate(core, lin, write=True)
        if gpa is None:
            raise DeliveryFault(VEC_PF, err)
        n = min(len(data), 0x1000 - (lin & 0xFFF))
        try:
            core.write_phys(gpa, data[:n])
        except unicorn.UcError:
            raise DeliveryFault(VEC_PF, 2) from None
        lin, data = lin + n, data[n:]


def deliver_long(core, vector: int, error: int | None, rip: int) -> None:
    """Deliver ``vector`` through a 64-bit IDT; ``rip`` is the return address pushed."""
    _sel, idt_base, idt_limit, _f = core.mmr("idtr")
    if vector * 16 + 15 > idt_limit:
        raise DeliveryFault(VEC_GP, vector * 8 + 2)
    lo, hi = struct.unpack("<QQ", read_linear(core, idt_base + vector * 16, 16))
    present = (lo >> 47) & 1
    gtype = (lo >> 40) & 0xF
    if not present or gtype not in (0xE, 0xF):
        raise DeliveryFault(VEC_GP if present else 11, vector * 8 + 2)
    offset = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFFFFFF) << 32)
    selector = (lo >> 16) & 0xFFFF
    ist = (lo >> 32) & 7
    rsp = core.reg(X.UC_X86_REG_RSP)
    if ist:
        _tsel, tr_base, _tl, _tf = core.mmr("tr")
        (rsp,) = struct.unpack("<Q", read_linear(core, tr_base + 0x24 + 8 * (ist - 1), 8))
    old_rsp = core.reg(X.UC_X86_REG_RSP)
    rsp &= ~0xF
    rflags = core.reg(X.UC_X86_REG_RFLAGS)
    cs = core.selector("cs")
    ss = core.selector("ss")
    frame = [ss, old_rsp, rflags, cs, rip]
    if error is not None:
        frame.append(error & 0xFFFFFFFF)
    data = b"".join(struct.pack("<Q", v & (2**64 - 1)) for v in reversed(frame))
    new_rsp = rsp - len(data)
    write_linear(core, new_rsp, data)
    core.set_reg(X.UC_X86_REG_RSP, new_rsp)
    newflags = rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if gtype == 0xE:
        newflags &= ~RFLAGS_IF
    core.set_reg(X.UC_X86_REG_RFLAGS, newflags)
    if selector != cs:
        core.uc.reg_write(X.UC_X86_REG_CS, selector)
    core.set_reg(X.UC_X86_REG_RIP, offset)


def deliver_real(core, vector: int, rip: int, cs: int, ss: int, ss_base: int) -> tuple[int, int]:
    """Deliver through the real-mode IVT; returns the new (CS, IP) to re-enter at."""
    _sel, ivt_base, ivt_limit, _f = core.mmr("idtr")
    if vector * 4 + 3 > ivt_limit:
        raise DeliveryFault(VEC_GP, 0)
    ip, new_cs = struct.unpack("<HH", core.read_phys(ivt_base + vector * 4, 4))
    sp = core.reg(X.UC_X86_REG_RSP) & 0xFFFF
    flags = core.reg(X.UC_X86_REG_RFLAGS) & 0xFFFF
    for value in (flags, cs, rip & 0xFFFF):
        sp = (sp - 2) & 0xFFFF
        core.write_phys(ss_base + sp, struct.pack("<H", value))
    core.set_reg(X.UC_X86_REG_RSP, (core.reg(X.UC_X86_REG_RSP) & ~0xFFFF) | sp)
    core.set_reg(X.UC_X86_REG_RFLAGS, core.reg(X.UC_X86_REG_RFLAGS) & ~(RFLAGS_TF | RFLAGS_IF | (1 << 18)))
    del ss
    return new_cs, ip
