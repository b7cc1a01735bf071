"""Seeded random guests in 16-bit real mode (the ``real`` entry of boot.py: CS=0, IP=0x8000,
flat 64 KiB segments, SP=0x7C00).

The same idea as gen.py's long-mode grammar, with real mode's own forms: 16-bit
addressing (``disp``, ``(%bx)``, ``(%si)``, ``(%bx,%si)``, ``(%bp)`` ... with a segment
override), 8/16/32-bit operands (the 32-bit ones with the operand-size prefix), string
instructions counting in CX (ECX's upper half kept), IN/OUT and string IO, MMIO through
every form KVM's emulator handles (plus LES/LDS of a far pointer on the device), CPUID,
HLT, RDMSR/WRMSR, software interrupts through the real-mode IVT (a handler that reports
the vector and IRETs), and exceptions (#UD, #DE, #BP, a triple fault, a fetch from an
unbacked address) delivered through the IVT to handlers that report them with the
exception ucall (BX = vector, CX = the IP pushed).

Segments: FS = :data:`MMIO_SEG` (the device), GS = :data:`RAM_SEG` (the scratch page);
DS/ES are set by each op that uses them (string instructions), SS stays 0.
"""

from __future__ import annotations

from .. import protocol as P
from . import gen as G
from .gen import FL_AF, FL_OF, FL_PF, FL_SF, FL_ZF, SUFFIX, Guest, Op

LAYOUT = G.LAYOUTS["real"]
MMIO_SEG = LAYOUT.mmio_base >> 4
RAM_SEG = LAYOUT.ram_base >> 4
SOFT_VECTORS = (0x40, 0x41, 0x42, 0x43)   # int $n: the handler reports n on SOFT_INT_PORT, IRETs
SOFT_INT_PORT = 0xE8
N_VECTORS = 0x44                          # the IVT the prologue installs
GPR32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")
_R16 = {"eax": "ax", "ebx": "bx", "ecx": "cx", "edx": "dx", "esi": "si", "edi": "di", "ebp": "bp"}
_R8 = {"eax": "al", "ebx": "bl", "ecx": "cl", "edx": "dl"}
_R8H = {"eax": "ah", "ebx": "bh", "ecx": "ch", "edx": "dh"}
# kernel MSRs that make sense to touch from real mode (no long-mode state)
KERNEL_MSR_RW = (0x277, 0x2FF, 0x200, 0x201, 0x250, 0x258, 0xC0000100, 0xC0000101, 0xC0000102,
                 0x174, 0x175)


def _abs(label: str) -> str:
    """The absolute (CS=0) address of a label, as an assembler expression."""
    return f"({label} - _start + {P.GUEST_LOAD_ADDR:#x})"


def source_real(g: Guest) -> str:
    out = g.body_lines("# kvmharness fuzz guest (real mode)", ".code16")
    # the IVT's handlers: exceptions report (BX = vector, CX = pushed IP) and stop; the
    # software-interrupt vectors report on a port and return
    for v in range(N_VECTORS):
        out.append(f"fz_v{v}:")
        if v in SOFT_VECTORS:
            out += ["    push %ax", f"    movb ${v:#x}, %al", f"    outb %al, ${SOFT_INT_PORT:#x}",
                    "    pop %ax", "    iret"]
        else:
            out += [f"    mov ${v:#x}, %bx", "    pop %cx", f"    movb ${P.UCALL_EXCEPTION}, %al",
                    f"    outb %al, ${P.UCALL_PORT:#x}", "    hlt", f"    jmp fz_v{v}"]
    out += ["    .balign 4", "fz_ivt:"]
    out += [f"    .word {_abs(f'fz_v{v}')}, 0" for v in range(N_VECTORS)]
    return "\n".join(out) + "\n"


def prologue(r) -> list:
    """The IVT and segments (:func:`base_prologue`), then every GPR from the seed."""
    lines = base_prologue()
    for name in GPR32:
        lines.append(f"mov ${r.getrandbits(32):#x}, %{name}")
    if r.random() < 0.5:
        lines.append(f"cmp %{r.choice(GPR32)}, %{r.choice(GPR32)}")
    return lines


def base_prologue() -> list:
    """DS = ES = 0, the IVT copied from ``fz_ivt`` to 0:0, FS = the device, GS = scratch."""
    return ["xor %ax, %ax", "mov %ax, %ds", "mov %ax, %es",
             # install the IVT: copy fz_ivt to 0:0
             f"mov ${_abs('fz_ivt')}, %si", "xor %di, %di", f"mov ${N_VECTORS * 2}, %cx", "cld",
             "rep movsw",
            f"mov ${MMIO_SEG:#x}, %ax", "mov %ax, %fs", f"mov ${RAM_SEG:#x}, %ax", "mov %ax, %gs"]


def reg(name: str, size: int, high: bool = False) -> str:
    if size == 4:
        return f"%{name}"
    if size == 2:
        return f"%{_R16[name]}"
    return f"%{(_R8H if high else _R8)[name]}"


class _Gen16(G._Gen):
    GPRS = GPR32
    ACC = "eax"
    WIDTH = 32
    KERNEL_MSR_RW = KERNEL_MSR_RW
    PORT_REG = "%dx"
    reg = staticmethod(reg)

    def rmw_imm_size(self, size):
        return size

    def out_value(self):
        return self.r.getrandbits(32)

    # -- helpers ------------------------------------------------------------------
    def size(self, sizes=(1, 2, 4)):
        return self.r.choice(sizes)

    def data_reg(self, size, avoid=()):
        """A register for ``size``-byte data, not one of ``avoid`` (32-bit names)."""
        pool = [g for g in GPR32 if g not in avoid and (size > 1 or g in _R8)]
        name = self.r.choice(pool)
        return name, reg(name, size, high=size == 1 and self.r.random() < 0.3)

    def mem(self, size, span=1, seg="%fs"):
        """(setup lines, operand, 32-bit registers used for the address) of a device operand."""
        off = self.mmio_off(size, span)
        form = self.r.random()
        if form < 0.4:
            return [], f"{seg}:{off:#x}", ()
        if form < 0.7:
            base = self.r.choice(("bx", "si", "di", "bp"))
            b = self.r.randrange(0, off + 1)
            return [f"mov ${b:#x}, %{base}"], f"{seg}:{off - b:#x}(%{base})", ("e" + base,)
        b1, b2 = self.r.choice((("bx", "si"), ("bx", "di"), ("bp", "si"), ("bp", "di")))
        x = self.r.randrange(0, off + 1)
        y = self.r.randrange(0, off - x + 1)
        return ([f"mov ${x:#x}, %{b1}", f"mov ${y:#x}, %{b2}"], f"{seg}:{off - x - y:#x}(%{b1},%{b2})",
                ("e" + b1, "e" + b2))

    # -- ops --------------------------------------------------------------------
    def _count(self, n):
        """Load CX with ``n``; sometimes with ECX's upper half set (real mode counts in CX)."""
        if self.r.random() < 0.3:
            return f"mov ${(self.r.getrandbits(16) << 16) | n:#x}, %ecx"
        return f"mov ${n}, %cx"

    def op_string_io(self):
        s = self.size()
        out = self.r.random() < 0.5
        rep = self.r.random() < 0.7
        down = self.r.random() < 0.4
        n = self.r.randint(1, 6) if rep else 1
        port = self.r.choice(G.PORTS)
        off = self.r.randrange(64, G.RAM_SIZE - 64) & ~(s - 1)
        if self.r.random() < 0.3:
            # at an edge: a page's (KVM's INS read-ahead stops there) or the segment's (the
            # 16-bit index wraps); more elements than one exit takes
            n = self.r.randint(1, 40) if rep else 1
            off = self.r.choice((self.r.randrange(0, 12), 0x1000 - self.r.randrange(1, 12),
                                 0x10000 - self.r.randrange(1, 12))) & ~(s - 1)
        sreg, ptr = ("%ds", "si") if out else ("%es", "di")
        lines = [f"mov ${RAM_SEG:#x}, %ax", f"mov %ax, {sreg}", f"mov ${port:#x}, %dx",
                 f"mov ${off:#x}, %{ptr}", self._count(n), "std" if down else "cld",
                 f"{'rep ' if rep else ''}{'outs' if out else 'ins'}{SUFFIX[s]}", "cld"]
        return Op("outs" if out else "ins", lines)

    def op_mmio_load(self):
        s = self.size()
        setup, m, used = self.mem(s)
        form = self.r.random()
        if form < 0.6 or s == 4:
            _n, r = self.data_reg(s)
            return Op("mmio_load", setup + [f"mov{SUFFIX[s]} {m}, {r}"])
        dst = self.r.choice([d for d in (2, 4) if d > s])
        _n, r = self.data_reg(dst)
        kind = self.r.choice(("z", "s"))
        return Op(f"mmio_mov{kind}x", setup + [f"mov{kind}{SUFFIX[s]}{SUFFIX[dst]} {m}, {r}"])

    def op_mmio_store(self):
        s = self.size()
        setup, m, used = self.mem(s)
        if self.r.random() < 0.5:
            _n, r = self.data_reg(s)
            return Op("mmio_store", setup + [f"mov{SUFFIX[s]} {r}, {m}"])
        return Op("mmio_store_imm", setup + [f"mov{SUFFIX[s]} ${self.imm(s):#x}, {m}"])

    def op_mmio_bit(self):
        s = self.size((2, 4))
        setup, m, used = self.mem(s)
        mn = self.r.choice(("bt", "bts", "btr", "btc"))
        return Op("mmio_" + mn, setup + [f"{mn}{SUFFIX[s]} ${self.r.randrange(8 * s)}, {m}",
                                         self.normalize()],
                  undef_flags=FL_OF | FL_SF | FL_ZF | FL_AF | FL_PF)

    def op_mmio_pushpop(self):
        s = self.size((2, 4))
        setup, m, used = self.mem(s)
        _n, r = self.data_reg(s, avoid=used)
        if self.r.random() < 0.5:
            return Op("mmio_push", setup + [f"push{SUFFIX[s]} {m}", f"pop{SUFFIX[s]} {r}"])
        return Op("mmio_pop", setup + [f"push{SUFFIX[s]} {r}", f"pop{SUFFIX[s]} {m}"])

    def op_mmio_far_ptr(self):
        """LES/LDS of a far pointer on the device: one 4-byte (or 6-byte) read."""
        s = self.size((2, 4))
        setup, m, used = self.mem(s + 2, seg="%fs")
        mn = self.r.choice(("les", "lds"))
        _n, r = self.data_reg(s, avoid=used)
        return Op("mmio_" + mn, setup + [f"{mn}{SUFFIX[s]} {m}, {r}"])

    def string_setup(self, kind, moff, roff):
        def seg(sreg, value):
            return [f"mov ${value:#x}, %ax", f"mov %ax, %{sreg}"]
        if kind == "movs_to":
            return seg("ds", RAM_SEG) + seg("es", MMIO_SEG) + [f"mov ${roff:#x}, %si", f"mov ${moff:#x}, %di"]
        if kind == "movs_from":
            return seg("ds", MMIO_SEG) + seg("es", RAM_SEG) + [f"mov ${moff:#x}, %si", f"mov ${roff:#x}, %di"]
        if kind == "stos":
            return seg("es", MMIO_SEG) + [f"mov ${moff:#x}, %di", f"mov ${self.r.getrandbits(32):#x}, %eax"]
        return seg("ds", MMIO_SEG) + [f"mov ${moff:#x}, %si"]

    def op_pushf_out(self):
        return Op("pushf_out", ["pushfl", "pop %eax", "and $0x8d5, %eax", "outl %eax, $0x70"])

    def op_wrmsr(self):
        op = super().op_wrmsr()
        msr = int(op.lines[0].split("$")[1].split(",")[0], 16)
        if msr not in KERNEL_MSR_RW + G.USER_MSRS + (G.UNKNOWN_MSR,):
            return self.op_rdmsr()
        return op

    def op_cpuid(self):
        leaf, sub = self.r.choice(G.CPUID_LEAVES)
        lines = [f"mov ${leaf:#x}, %esi", f"mov ${sub:#x}, %edi", "mov %esi, %eax", "mov %edi, %ecx",
                 "cpuid", f"outl %eax, ${G.CPUID_PORTS[0]:#x}"]
        for r, port in (("ebx", G.CPUID_PORTS[1]), ("ecx", G.CPUID_PORTS[2]), ("edx", G.CPUID_PORTS[3])):
            lines += [f"mov %{r}, %eax", f"outl %eax, ${port:#x}"]
        lines += ["xor %eax, %eax", "xor %ebx, %ebx", "xor %ecx, %ecx", "xor %edx, %edx"]
        return Op("cpuid", lines)

    def op_soft_int(self):
        return Op("soft_int", [f"int ${self.r.choice(SOFT_VECTORS):#x}"])

    # -- terminal ops -------------------------------------------------------------
    def op_exception(self):
        kind = self.r.choice(("ud2", "de", "int3", "triple", "fetch_unbacked"))
        if kind == "ud2":
            return Op("exc_ud", ["ud2"], terminal=True)
        if kind == "de":
            return Op("exc_de", ["xor %cx, %cx", "xor %dx, %dx", "div %cx"], terminal=True)
        if kind == "int3":
            return Op("exc_int3", ["int3"], terminal=True)
        if kind == "fetch_unbacked":
            # two NOPs at the last two bytes of RAM, then a far jump there: the fetch after
            # them has no memslot
            seg = (LAYOUT.memory_size - 0x1000) >> 4
            return Op("fetch_unbacked", [f"mov ${seg:#x}, %ax", "mov %ax, %ds", "movw $0x9090, 0xffe",
                                         f"ljmp ${seg:#x}, $0xffe"], terminal=True)
        # an IVT with limit 0: the #UD cannot be delivered -> shutdown
        return Op("triple_fault", ["xor %ax, %ax", "mov %ax, %ds", "push $0", "push $0", "push $0",
                                   "mov %sp, %bx", "lidt (%bx)", "ud2"], terminal=True)


WEIGHTS = (("op_out", 10), ("op_in", 10), ("op_string_io", 10), ("op_mmio_load", 12),
           ("op_mmio_store", 12), ("op_mmio_rmw", 12), ("op_mmio_test_cmp", 3), ("op_mmio_xchg", 6),
           ("op_mmio_bit", 4), ("op_mmio_pushpop", 4), ("op_mmio_far_ptr", 3), ("op_mmio_string", 8),
           ("op_alu", 4), ("op_flags_branch", 4), ("op_pushf_out", 2), ("op_rdmsr", 4),
           ("op_wrmsr", 4), ("op_cpuid", 6), ("op_hlt", 2), ("op_soft_int", 4))


def generate_real(seed: int, n_ops: int | None = None) -> Guest:
    g = _Gen16(seed)
    r = g.r
    n = n_ops if n_ops is not None else r.randint(4, 24)
    return g.guest(seed, n, prologue(r), WEIGHTS, mode="real")


G.SOURCES["real"] = source_real
G.GENERATORS["real"] = generate_real
