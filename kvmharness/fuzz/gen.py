"""Seeded, grammar-based random guests (64-bit long mode, CPL0).

A guest is a prologue (every GPR set from the seed, the two base registers fixed), a
list of *ops* -- each a few lines of AT&T assembly that do one thing the host can see
or check -- and an epilogue (``out`` to :data:`END_PORT`).  The grammar below picks the
ops; each op is self-contained (it sets up the registers it uses), so any sub-list of
the ops is again a valid guest: that is what lets ``shrink`` delta-debug a mismatch.

Register conventions inside a guest:
  %r15  the MMIO device's base (:data:`MMIO_BASE`: unbacked, every access exits)
  %r14  a RAM scratch page (:data:`RAM_BASE`), the source/target of string IO and MOVS
  %rsp  the stack (top of RAM)

Flags an instruction leaves architecturally undefined (AF after AND/OR/XOR/TEST,
OF/SF/ZF/AF/PF after BT*) are not compared at the exits of that op, and the op ends
with a ``cmp`` that defines every flag again (each CPU -- the host's, QEMU's -- may
leave different values there; that is not a bug in either).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .. import protocol as P

MMIO_BASE = P.MMIO_TEST_ADDR          # unbacked: the RAM-like MMIO device (devices.MmioRam)
MMIO_SIZE = 0x1000
RAM_BASE = 0x100000                   # scratch page in guest RAM (seeded contents)
RAM_SIZE = 0x1000
MEMORY_SIZE = 2 << 20
END_PORT = 0xF4                       # out here: the guest is done
CPUID_PORTS = (0xE0, 0xE1, 0xE2, 0xE3)  # CPUID's EAX, EBX, ECX, EDX, out in that order
PORTS = (0x60, 0x61, 0x70, 0x71, 0x3F8, 0x2F8, 0x1234, 0xCF8)
USER_MSRS = (0xC0010F00, 0xC0010F01, 0xC0010F02, 0xC0010F03)  # denied by the MSR filter
REFUSED_MSR = 0xC0010F03              # userspace refuses accesses to this one (-> #GP)
UNKNOWN_MSR = 0x12345678              # nobody knows it: #GP or the UNKNOWN user exit
KERNEL_MSR_RW = (0x277, 0x2FF, 0x200, 0x201, 0x20E, 0x250, 0x258, 0x268, 0xC0000100,
                 0xC0000101, 0xC0000102, 0xC0000081, 0xC0000082, 0xC0000084, 0x174, 0x175)
KERNEL_MSR_RO = (0x1B, 0x1A0, 0xFE, 0x179, 0x17A, 0xC0000080)
CPUID_LEAVES = ((0, 0), (1, 0), (7, 0), (7, 1), (0xD, 0), (0xD, 1), (0xD, 2), (0x80000000, 0),
                (0x80000001, 0), (0x80000008, 0), (0x40000000, 0), (0x40000001, 0),
                (0x12345678, 0), (0x8000001F, 0), (0x80000021, 0), (2, 0), (0xB, 0))

FL_CF, FL_PF, FL_AF, FL_ZF, FL_SF, FL_OF = 1, 4, 0x10, 0x40, 0x80, 0x800
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13")
_R8 = {"rax": "al", "rbx": "bl", "rcx": "cl", "rdx": "dl", "rsi": "sil", "rdi": "dil", "rbp": "bpl"}
_R16 = {"rax": "ax", "rbx": "bx", "rcx": "cx", "rdx": "dx", "rsi": "si", "rdi": "di", "rbp": "bp"}
_R32 = {"rax": "eax", "rbx": "ebx", "rcx": "ecx", "rdx": "edx", "rsi": "esi", "rdi": "edi",
        "rbp": "ebp"}
SUFFIX = {1: "b", 2: "w", 4: "l", 8: "q"}


def reg(name: str, size: int) -> str:
    """%name of a GPR's low ``size`` bytes."""
    if size == 8:
        return f"%{name}"
    if name.startswith("r") and name[1:].isdigit():
        return f"%{name}{ {1: 'b', 2: 'w', 4: 'd'}[size] }"
    return "%" + {1: _R8, 2: _R16, 4: _R32}[size][name]


@dataclass
class Op:
    kind: str
    lines: list
    undef_flags: int = 0      # RFLAGS bits left undefined at this op's exits
    terminal: bool = False    # the guest ends here (exception, triple fault, ...)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "lines": list(self.lines), "undef_flags": self.undef_flags,
                "terminal": self.terminal}

    @classmethod
    def from_dict(cls, d) -> "Op":
        return cls(d["kind"], list(d["lines"]), d.get("undef_flags", 0), d.get("terminal", False))


@dataclass(frozen=True)
class Layout:
    """Where a guest's devices and memory are, per entry mode."""
    mode: str            # boot.load_image's entry mode: long64 | real
    mmio_base: int       # the RAM-like MMIO device (unbacked: every access exits)
    ram_base: int        # the scratch page (seeded contents)
    memory_size: int     # guest RAM is [0, memory_size)
    cpuid_regs: tuple    # the registers holding CPUID's leaf and subleaf at op_cpuid's exits


LAYOUTS = {
    "long64": Layout("long64", MMIO_BASE, RAM_BASE, MEMORY_SIZE, ("r8", "r9")),
    # real mode: everything below 1 MiB; RAM ends at 768 KiB, the device sits at segment
    # 0xD000 (FS), the scratch page at segment 0x2000 (GS) -- see gen_real.py
    "real": Layout("real", 0xD0000, 0x20000, 0xC0000, ("rsi", "rdi")),
    # nested SVM (gen_nested.py): guests/include/svm.h's layout in 4 MiB (VMCB, IOPM,
    # host save area at 1 MiB, L2's stack at 3 MiB); scratch page above them
    "nested": Layout("long64", MMIO_BASE, 0x380000, 4 << 20, ("r8", "r9")),
}


@dataclass
class Guest:
    seed: int
    ops: list
    prologue: list = field(default_factory=list)
    msr_user_reasons: int = 0  # KVM_MSR_EXIT_REASON_* bits sent to userspace
    mode: str = "long64"       # LAYOUTS key

    @property
    def layout(self) -> Layout:
        return LAYOUTS[self.mode]

    def source(self) -> str:
        if self.mode != "long64":
            return SOURCES[self.mode](self)
        return "\n".join(self.body_lines("# kvmharness fuzz guest", ".code64")) + "\n"

    def body_lines(self, title: str, code: str) -> list:
        """The source's lines up to the end port's loop (``fz_end``): a header (``title``,
        the seed; the ``code`` directive), the prologue, each op between its labels."""
        out = [f"{title}, seed {self.seed}", code, ".text", ".globl _start", "_start:"]
        out += ["    " + line for line in self.prologue]
        for i, op in enumerate(self.ops):
            out.append(f"op{i}_start:   # {op.kind}")
            out += ["    " + line for line in op.lines]
            out.append(f"op{i}_end:")
        out += ["fz_end:", "    movb $0x5a, %al", f"    outb %al, ${END_PORT:#x}", "    hlt",
                "    jmp fz_end"]
        return out

    def with_ops(self, ops) -> "Guest":
        return Guest(self.seed, list(ops), list(self.prologue), self.msr_user_reasons, self.mode)

    def to_dict(self) -> dict:
        return {"seed": self.seed, "mode": self.mode, "msr_user_reasons": self.msr_user_reasons,
                "prologue": list(self.prologue), "ops": [o.to_dict() for o in self.ops]}

    @classmethod
    def from_dict(cls, d) -> "Guest":
        return cls(d["seed"], [Op.from_dict(o) for o in d["ops"]], list(d["prologue"]),
                   d.get("msr_user_reasons", 0), d.get("mode", "long64"))


def ram_init(seed: int) -> bytes:
    return random.Random(seed * 7919 + 1).randbytes(RAM_SIZE)


def mmio_init(seed: int) -> bytes:
    return random.Random(seed * 7919 + 2).randbytes(MMIO_SIZE)


class _Gen:
    #: the mode's general registers (the 64-bit names; gen_real.py's 32-bit ones), the
    #: accumulator's name and the width of a random register value
    GPRS = GPRS
    ACC = "rax"
    WIDTH = 64
    KERNEL_MSR_RW = KERNEL_MSR_RW   # the kernel MSRs op_rdmsr reads (with KERNEL_MSR_RO)
    PORT_REG = "%edx"               # where op_out/op_in load a port number above 0xFF

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    # -- helpers ------------------------------------------------------------------
    def size(self, sizes=(1, 2, 4, 8)):
        return self.r.choice(sizes)

    def imm(self, size):
        v = self.r.getrandbits(8 * min(size, 4))
        if self.r.random() < 0.2:
            v = self.r.choice((0, 1, (1 << (8 * min(size, 4))) - 1, 0x80))
        return v

    def mmio_off(self, size, span=1):
        # mostly aligned, sometimes not (a split access is still one instruction's exits)
        top = MMIO_SIZE - size * span - 16
        off = self.r.randrange(0, top)
        return off & ~(size - 1) if self.r.random() < 0.8 else off

    def scratch_reg(self, avoid=()):
        return self.r.choice([g for g in GPRS if g not in avoid and g not in ("rsp",)])

    # the mode's operand helpers (gen_real.py has its own): registers, a device operand
    reg = staticmethod(reg)

    def data_reg(self, size, avoid=()):
        """(name, %register of ``size`` bytes) for data, not one of ``avoid``."""
        name = self.scratch_reg(avoid)
        return name, reg(name, size)

    def mem(self, size, span=1):
        """(setup lines, operand, registers the address uses) of a device operand."""
        return [], f"{self.mmio_off(size, span):#x}(%r15)", ()

    def rmw_imm_size(self, size):
        """The immediate op_mmio_rmw draws for a ``size``-byte operand (32 bits for a word)."""
        return 1 if size == 1 else 4

    def out_value(self):
        """The accumulator's value before an OUT (when op_out sets one)."""
        return self.imm(8)

    def normalize(self):
        a, b = self.r.sample(self.GPRS, 2)
        return f"cmp %{a}, %{b}"

    def guest(self, seed: int, n: int, prologue: list, weights, mode: str = "long64") -> Guest:
        """After the prologue: ``n`` ops drawn by ``weights`` ((method name, weight), ...),
        sometimes a terminal exception, then the MSR exit reasons sent to userspace."""
        r = self.r
        names = [w[0] for w in weights]
        ops = [getattr(self, r.choices(names, [w[1] for w in weights])[0])() for _ in range(n)]
        if r.random() < 0.15:
            ops.append(self.op_exception())
        reasons = r.choice((0, 4, 4 | 2, 4 | 2 | 1, 1 | 2, 4 | 1))
        return Guest(seed, ops, prologue, reasons, mode)

    # -- ops --------------------------------------------------------------------
    def op_out(self):
        s = self.size((1, 2, 4))
        port = self.r.choice(PORTS)
        acc = self.reg(self.ACC, s)
        lines = [f"mov ${self.out_value():#x}, %{self.ACC}" if self.r.random() < 0.5 else "nop"]
        if port < 0x100 and self.r.random() < 0.5:
            lines.append(f"out{SUFFIX[s]} {acc}, ${port:#x}")
        else:
            lines += [f"mov ${port:#x}, {self.PORT_REG}", f"out{SUFFIX[s]} {acc}, %dx"]
        return Op("out", lines)

    def op_in(self):
        s = self.size((1, 2, 4))
        port = self.r.choice(PORTS)
        acc = self.reg(self.ACC, s)
        lines = [f"mov ${self.r.getrandbits(self.WIDTH):#x}, %{self.ACC}"]
        if port < 0x100 and self.r.random() < 0.5:
            lines.append(f"in{SUFFIX[s]} ${port:#x}, {acc}")
        else:
            lines += [f"mov ${port:#x}, {self.PORT_REG}", f"in{SUFFIX[s]} %dx, {acc}"]
        return Op("in", lines)

    def op_string_io(self):
        s = self.size((1, 2, 4))
        out = self.r.random() < 0.5
        rep = self.r.random() < 0.7
        down = self.r.random() < 0.4
        n = self.r.randint(1, 6) if rep else 1
        port = self.r.choice(PORTS)
        ptr = "rsi" if out else "rdi"
        off = self.r.randrange(64, RAM_SIZE - 64) & ~(s - 1)
        lines = [f"mov ${port:#x}, %edx", f"lea {off:#x}(%r14), %{ptr}", f"mov ${n}, %ecx",
                 "std" if down else "cld",
                 f"{'rep ' if rep else ''}{'outs' if out else 'ins'}{SUFFIX[s]}", "cld"]
        return Op("outs" if out else "ins", lines)

    def op_mmio_load(self):
        s = self.size()
        r = self.scratch_reg()
        off = self.mmio_off(s)
        form = self.r.random()
        if form < 0.6 or s == 8:
            return Op("mmio_load", [f"mov{SUFFIX[s]} {off:#x}(%r15), {reg(r, s)}"])
        # movzx / movsx from a 1/2/4-byte operand into a wider register
        dst = self.r.choice([d for d in (2, 4, 8) if d > s])
        if s == 4:
            return Op("mmio_movsx", [f"movslq {off:#x}(%r15), {reg(r, 8)}"])
        kind = self.r.choice(("z", "s"))
        return Op(f"mmio_mov{kind}x", [f"mov{kind}{SUFFIX[s]}{SUFFIX[dst]} {off:#x}(%r15), {reg(r, dst)}"])

    def op_mmio_store(self):
        s = self.size()
        off = self.mmio_off(s)
        if self.r.random() < 0.5:
            r = self.scratch_reg()
            return Op("mmio_store", [f"mov{SUFFIX[s]} {reg(r, s)}, {off:#x}(%r15)"])
        v = self.imm(s)
        if s == 8:
            v = v & 0x7FFFFFFF
        return Op("mmio_store_imm", [f"mov{SUFFIX[s]} ${v:#x}, {off:#x}(%r15)"])

    def op_mmio_rmw(self):
        s = self.size()
        setup, m, used = self.mem(s)
        mn = self.r.choice(("add", "sub", "and", "or", "xor", "adc", "sbb", "inc", "dec", "neg",
                            "not", "shl1", "shr1", "sar1", "rol1", "ror1"))
        undef = FL_AF if mn in ("and", "or", "xor") else 0
        if mn in ("inc", "dec", "neg", "not"):
            lines = [f"{mn}{SUFFIX[s]} {m}"]
        elif mn.endswith("1"):
            lines = [f"{mn[:-1]}{SUFFIX[s]} $1, {m}"]
            undef = FL_AF if mn in ("shl1", "shr1", "sar1") else 0
        elif self.r.random() < 0.5:
            _n, r = self.data_reg(s)
            lines = [f"{mn}{SUFFIX[s]} {r}, {m}"]
        else:
            v = self.imm(self.rmw_imm_size(s)) & (0x7F if self.r.random() < 0.5 else 0xFFFFFFFF)
            if s in (2,):
                v &= 0xFFFF
            if s == 8:
                v &= 0x7FFFFFFF
            lines = [f"{mn}{SUFFIX[s]} ${v:#x}, {m}"]
        if undef:
            lines.append(self.normalize())
        return Op("mmio_rmw_" + mn, setup + lines, undef_flags=undef)

    def op_mmio_test_cmp(self):
        s = self.size()
        setup, m, used = self.mem(s)
        _n, r = self.data_reg(s)
        mn = self.r.choice(("cmp", "test"))
        undef = FL_AF if mn == "test" else 0
        lines = setup + [f"{mn}{SUFFIX[s]} {r}, {m}"]
        if undef:
            lines.append(self.normalize())
        return Op("mmio_" + mn, lines, undef_flags=undef)

    def op_mmio_xchg(self):
        s = self.size()
        setup, m, used = self.mem(s)
        _n, r = self.data_reg(s, avoid=(self.ACC,) + used)
        kind = self.r.choice(("xchg", "cmpxchg", "cmpxchg_hit", "xadd"))
        if kind in ("xchg", "xadd"):
            return Op("mmio_" + kind, setup + [f"{kind}{SUFFIX[s]} {r}, {m}"])
        lines = list(setup)
        if kind == "cmpxchg_hit":  # make the comparison succeed: the accumulator = the current value
            lines.append(f"mov{SUFFIX[s]} {m}, {self.reg(self.ACC, s)}")
        lock = "lock " if self.r.random() < 0.5 else ""
        lines.append(f"{lock}cmpxchg{SUFFIX[s]} {r}, {m}")
        return Op("mmio_" + kind, lines)

    def op_mmio_bit(self):
        s = self.size((2, 4, 8))
        off = self.mmio_off(s)
        mn = self.r.choice(("bt", "bts", "btr", "btc"))
        bit = self.r.randrange(8 * s)
        undef = FL_OF | FL_SF | FL_ZF | FL_AF | FL_PF
        return Op("mmio_" + mn, [f"{mn}{SUFFIX[s]} ${bit}, {off:#x}(%r15)", self.normalize()],
                  undef_flags=undef)

    def op_mmio_pushpop(self):
        off = self.mmio_off(8)
        if self.r.random() < 0.5:
            r = self.scratch_reg()
            return Op("mmio_push", [f"pushq {off:#x}(%r15)", f"pop %{r}"])
        r = self.scratch_reg()
        return Op("mmio_pop", [f"push %{r}", f"popq {off:#x}(%r15)"])

    def op_mmio_string(self):
        s = self.size()
        kind = self.r.choice(("movs_to", "movs_from", "stos", "lods"))
        rep = self.r.random() < 0.6 and kind != "lods"
        down = self.r.random() < 0.3
        n = self.r.randint(1, 4) if rep else 1
        moff = self.mmio_off(s, span=n) + (s * n if down else 0)
        roff = self.r.randrange(128, RAM_SIZE - 128) & ~(s - 1)
        setup = self.string_setup(kind, moff, roff)
        insn = {"movs_to": "movs", "movs_from": "movs", "stos": "stos", "lods": "lods"}[kind]
        lines = setup + [self._count(n), "std" if down else "cld",
                         f"{'rep ' if rep else ''}{insn}{SUFFIX[s]}", "cld"]
        return Op("mmio_" + kind, lines)

    def string_setup(self, kind, moff, roff):
        """op_mmio_string's pointers (and STOS's value): the device at ``moff``, the scratch
        page at ``roff``."""
        if kind == "movs_to":
            return [f"lea {roff:#x}(%r14), %rsi", f"lea {moff:#x}(%r15), %rdi"]
        if kind == "movs_from":
            return [f"lea {moff:#x}(%r15), %rsi", f"lea {roff:#x}(%r14), %rdi"]
        if kind == "stos":
            return [f"lea {moff:#x}(%r15), %rdi", f"mov ${self.r.getrandbits(64):#x}, %rax"]
        return [f"lea {moff:#x}(%r15), %rsi"]

    def _count(self, n):
        """The element count's register (ECX) loaded with ``n``."""
        return f"mov ${n}, %ecx"

    def op_alu(self):
        a, b = self.r.sample(self.GPRS, 2)
        mn = self.r.choice(("add", "sub", "cmp", "adc", "sbb", "imul", "mov"))
        if mn == "mov":
            return Op("alu_mov", [f"mov ${self.r.getrandbits(self.WIDTH):#x}, %{a}"])
        if mn == "imul":
            return Op("alu_imul", [f"imul %{b}, %{a}", self.normalize()],
                      undef_flags=FL_SF | FL_ZF | FL_AF | FL_PF)
        return Op("alu_" + mn, [f"{mn} %{b}, %{a}"])

    def op_flags_branch(self):
        """A flag-dependent path: a conditional jump over an exit."""
        cc = self.r.choice(("z", "nz", "c", "nc", "s", "ns", "o", "no", "p", "np", "a", "be",
                            "l", "ge"))
        inner = self.r.choice((self.op_out, self.op_mmio_store, self.op_in))()
        label = f"fzb{self.r.getrandbits(32):08x}"
        return Op("branch_" + inner.kind, [f"j{cc} {label}", *inner.lines, f"{label}:"])

    def op_pushf_out(self):
        """The flags themselves, out through a port (a flag result the host sees)."""
        return Op("pushf_out", ["pushfq", "pop %rax", "and $0x8d5, %eax", "outl %eax, $0x70"],
                  undef_flags=0)

    def op_rdmsr(self):
        kind = self.r.random()
        if kind < 0.35:
            msr = self.r.choice(USER_MSRS)
        elif kind < 0.45:
            msr = UNKNOWN_MSR
        else:
            msr = self.r.choice(self.KERNEL_MSR_RW + KERNEL_MSR_RO)
        return Op("rdmsr", [f"mov ${msr:#x}, %ecx", f"mov ${self.r.getrandbits(self.WIDTH):#x}, %{self.ACC}",
                            "rdmsr"], terminal=False)

    def op_wrmsr(self):
        kind = self.r.random()
        lo, hi = self.r.getrandbits(32), self.r.getrandbits(32)
        if kind < 0.35:
            msr = self.r.choice(USER_MSRS)
        elif kind < 0.45:
            msr = UNKNOWN_MSR
        else:
            msr = self.r.choice(KERNEL_MSR_RW)
            if msr == 0x277:  # PAT: valid memory types (0, 1, 4, 5, 6, 7) in each byte
                v = 0
                for i in range(8):
                    v |= self.r.choice((0, 1, 4, 5, 6, 7)) << (8 * i)
                if self.r.random() < 0.2:
                    v |= 2 << 8  # one invalid type: refused
                lo, hi = v & 0xFFFFFFFF, v >> 32
            elif msr in (0xC0000100, 0xC0000101, 0xC0000102, 0xC0000082, 0x175, 0x176):
                hi = 0 if self.r.random() < 0.8 else hi  # canonical mostly
            elif msr == 0x2FF:
                lo, hi = self.r.choice((0, 0x6, 0xC06, 0x806)), 0
            elif msr in (0x200, 0x201, 0x20E):
                lo &= ~0xFFF if msr % 2 else ~0xF8
                lo |= 6 if msr % 2 == 0 else 0x800
                hi &= 0xFF
            elif msr in (0x250, 0x258, 0x268):
                v = 0
                for i in range(8):
                    v |= self.r.choice((0, 1, 4, 5, 6)) << (8 * i)
                lo, hi = v & 0xFFFFFFFF, v >> 32
            elif msr == 0xC0000081:
                hi &= 0xFFFF
            elif msr == 0xC0000084:
                hi = 0
            elif msr == 0x174:
                lo &= 0xFFFF
                hi = 0
        return Op("wrmsr", [f"mov ${msr:#x}, %ecx", f"mov ${lo:#x}, %eax", f"mov ${hi:#x}, %edx",
                            "wrmsr"])

    def op_cpuid(self):
        """CPUID, its four results out through CPUID_PORTS (R8/R9 = leaf/subleaf at those
        exits, so the comparison knows which register of which leaf each one is)."""
        leaf, sub = self.r.choice(CPUID_LEAVES)
        lines = [f"mov ${leaf:#x}, %r8d", f"mov ${sub:#x}, %r9d", "mov %r8d, %eax", "mov %r9d, %ecx",
                 "cpuid", f"out %eax, ${CPUID_PORTS[0]:#x}"]
        for r, port in (("ebx", CPUID_PORTS[1]), ("ecx", CPUID_PORTS[2]), ("edx", CPUID_PORTS[3])):
            lines += [f"mov %{r}, %eax", f"out %eax, ${port:#x}"]
        lines += ["xor %eax, %eax", "xor %ebx, %ebx", "xor %ecx, %ecx", "xor %edx, %edx"]
        return Op("cpuid", lines)

    def op_hlt(self):
        return Op("hlt", ["hlt"])

    # -- terminal ops (end the guest) ---------------------------------------------
    def op_exception(self):
        kind = self.r.choice(("ud2", "gp_noncanon", "pf", "de", "triple", "gp_wrmsr", "fetch_unbacked",
                              "int3"))
        if kind == "ud2":
            return Op("exc_ud", ["ud2"], terminal=True)
        if kind == "gp_noncanon":
            return Op("exc_gp", ["mov $0x8000000000000000, %rax", "mov (%rax), %rbx"], terminal=True)
        if kind == "pf":
            return Op("exc_pf", ["mov $0x80001000, %rax", "mov (%rax), %rbx"], terminal=True)
        if kind == "de":
            return Op("exc_de", ["xor %ecx, %ecx", "xor %edx, %edx", "div %ecx"], terminal=True)
        if kind == "gp_wrmsr":  # a read-only kernel MSR: refused (#GP or the INVAL user exit)
            return Op("exc_wrmsr_ro", ["mov $0xfe, %ecx", "xor %eax, %eax", "xor %edx, %edx",
                                       "wrmsr"], terminal=False)
        if kind == "fetch_unbacked":  # run off the end of RAM: the fetch has no memslot
            return Op("fetch_unbacked", [f"mov ${MEMORY_SIZE - 2:#x}, %rax", "movw $0x9090, (%rax)",
                                         "jmp *%rax"], terminal=True)
        if kind == "int3":
            return Op("exc_int3", ["int3"], terminal=True)
        # triple fault: an IDT with limit 0, then any fault
        return Op("triple_fault", ["push $0", "push $0", "lidt 6(%rsp)", "ud2"], terminal=True)


WEIGHTS = (("op_out", 10), ("op_in", 10), ("op_string_io", 10), ("op_mmio_load", 12),
           ("op_mmio_store", 12), ("op_mmio_rmw", 12), ("op_mmio_test_cmp", 3), ("op_mmio_xchg", 6),
           ("op_mmio_bit", 4), ("op_mmio_pushpop", 4), ("op_mmio_string", 8), ("op_alu", 4),
           ("op_flags_branch", 4), ("op_pushf_out", 2), ("op_rdmsr", 6), ("op_wrmsr", 6),
           ("op_cpuid", 6), ("op_hlt", 2))


MODES = ("long64", "real", "nested")
#: the other modes' grammars register themselves here (gen_real.py, gen_nested.py, which the
#: package imports), so this module imports neither
SOURCES: dict = {}
GENERATORS: dict = {}


def generate(seed: int, n_ops: int | None = None, mode: str = "long64") -> Guest:
    """The guest for ``seed`` (in ``mode``): the same seed always gives the same guest."""
    if mode in GENERATORS:
        return GENERATORS[mode](seed, n_ops)
    if mode != "long64":
        raise ValueError(f"unknown fuzz guest mode {mode!r}: {', '.join(MODES)}")
    g = _Gen(seed)
    r = g.r
    n = n_ops if n_ops is not None else r.randint(4, 24)
    prologue = [f"mov ${MMIO_BASE:#x}, %r15", f"mov ${RAM_BASE:#x}, %r14"]
    for name in GPRS:
        prologue.append(f"mov ${r.getrandbits(64):#x}, %{name}")
    if r.random() < 0.5:
        prologue.append(f"cmp %{r.choice(GPRS)}, %{r.choice(GPRS)}")
    return g.guest(seed, n, prologue, WEIGHTS)
