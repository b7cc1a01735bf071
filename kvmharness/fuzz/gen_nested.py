"""Seeded random nested-SVM guests: L1's view of random intercepts and VMCB12 fields
(issue 12 item 5, in the manner of kvm-unit-tests' x86/svm_tests.c).

L1 is the project's own nested hypervisor library (guests/include/svm.h,
``SVM_L1_LIBRARY``: EFER.SVME, VM_HSAVE_PA, a VMCB whose save area is L1's own flat
64-bit state, ASID 1, the IOPM).  The seed then picks:

* intercepts: CPUID, HLT, IOIO (with random IOPM bits for L2's ports), PAUSE, PUSHF,
  POPF, SIDT, SGDT, INVD, INVLPG, INT n, SHUTDOWN (word 3), VMMCALL and WBINVD (word 4),
  and an exception bitmap over #DE #BP #UD #DF #GP #PF;
* VMCB12 fields: TSC_OFFSET, and sometimes an EVENTINJ for the first VMRUN (an
  exception with or without an error code, an external interrupt, an NMI) or a VMRUN
  KVM must refuse (ASID 0, EFER.SVME clear: VMEXIT_INVALID);
* L2's instructions, one exiting instruction per op (the op's last line).

After every #VMEXIT L1 reports exit code, EXITINFO1/2, next_rip, L2's RIP, EXITINTINFO
and EVENTINJ (the library's ``l1_report_exit``: ucall REPORTs the runner compares at
every exit), then resumes L2 past the instruction at L2's RIP when it is one of the
ops' (a table the generator emits), else stops.  L2 ends with an OUT to the end port,
which no IOPM bit covers: a host exit.  Not intercepted, an instruction runs in L2 or
reaches the host (IO, HLT) or L2's IDT (L1's, whose default handlers report the
exception: the run ends there).

Assembled with the C preprocessor and ``ld`` (guests/include, guests/flat.ld), so it
needs the source tree's guests/ directory.
"""

from __future__ import annotations

from . import gen as G
from .gen import Guest, Op

LAYOUT = G.LAYOUTS["nested"]
PORTS = (0x60, 0x7A, 0x1234)
W3 = {"cpuid": 18, "hlt": 24, "ioio": 27, "pause": 23, "pushf": 16, "popf": 17, "sidt": 6, "sgdt": 7,
      "invd": 22, "invlpg": 25, "intn": 21, "shutdown": 31}
W4 = {"vmmcall": 1, "wbinvd": 9}
EXC = (0, 3, 6, 8, 13, 14)
MAX_EXITS = 48


def source_nested(g: Guest) -> str:
    out = [f"/* kvmharness fuzz guest (nested SVM), seed {g.seed} */", "#define GUEST_MODE_LONG64",
           '#include "guest.h"', '#include "svm.h"', "GUEST_ENTRY",
           "        call    l1_enable_svm", "        lea     l2_entry(%rip), %rdi", "        call    l1_init_vmcb"]
    out += ["        " + line for line in g.prologue]
    out += ["l1_loop:", "        call    l1_run_l2", "        call    l1_report_exit",
            f"        cmpq    ${MAX_EXITS}, exit_count(%rip)", "        jae     l1_stop",
            "        movl    $0, VMCB(VMCB_EVENT_INJ)",
            "        mov     VMCB(VMCB_RIP), %rax", "        lea     fz_skip(%rip), %rsi",
            "1:      mov     (%rsi), %rdx", "        test    %rdx, %rdx", "        jz      l1_stop",
            "        cmp     %rdx, %rax", "        je      2f", "        add     $16, %rsi", "        jmp     1b",
            "2:      mov     8(%rsi), %rax", "        mov     %rax, VMCB(VMCB_RIP)", "        jmp     l1_loop",
            "l1_stop:", "        movb    $0x5a, %al", f"        outb    %al, ${G.END_PORT:#x}",
            "        hlt", "        jmp     l1_stop",
            "l2_entry:"]
    for i, op in enumerate(g.ops):
        out.append(f"op{i}_start:   /* {op.kind} */")
        out += ["        " + line for line in op.lines[:-1]]
        out += [f"op{i}_x:", "        " + op.lines[-1], f"op{i}_end:"]
    out += ["fz_end:", "        movb    $0x5a, %al", f"        outb    %al, ${G.END_PORT:#x}", "        hlt",
            "        jmp     fz_end", "        .balign 8", "fz_skip:"]
    out += [f"        .quad   op{i}_x, op{i}_end" for i in range(len(g.ops))]
    out += ["        .quad   0, 0", "        SVM_L1_LIBRARY", ""]
    return "\n".join(out)


class _GenNested(G._Gen):
    def l2_op(self):
        r = self.r
        kind = r.choices(("cpuid", "out", "in", "hlt", "pause", "pushf", "popf", "sidt", "sgdt", "invd",
                          "wbinvd", "invlpg", "intn", "vmmcall", "ud2", "int3", "de"),
                         (8, 6, 5, 4, 3, 2, 2, 2, 2, 2, 2, 2, 1, 3, 2, 1, 1))[0]
        if kind == "cpuid":
            leaf = r.choice((0, 1, 0x80000001, 0x8000000A, 0x4C310000))
            return Op("l2_cpuid", [f"mov ${leaf:#x}, %eax", "xor %ecx, %ecx", "cpuid"])
        if kind in ("out", "in"):
            port = r.choice(PORTS)
            v = f"mov ${r.getrandbits(8):#x}, %al"
            if port < 0x100:
                return Op(f"l2_{kind}", [v, f"outb %al, ${port:#x}" if kind == "out" else f"inb ${port:#x}, %al"])
            return Op(f"l2_{kind}", [v, f"mov ${port:#x}, %edx", "outb %al, %dx" if kind == "out" else "inb %dx, %al"])
        if kind == "popf":
            return Op("l2_popf", ["pushfq", "popfq"])
        if kind == "pushf":
            return Op("l2_pushf", ["pushfq"])
        if kind in ("sidt", "sgdt"):
            return Op(f"l2_{kind}", ["sub $16, %rsp", f"{kind} (%rsp)"])
        if kind == "invlpg":
            return Op("l2_invlpg", [f"mov ${r.randrange(0, 1 << 21, 4096):#x}, %rax", "invlpg (%rax)"])
        if kind == "intn":
            return Op("l2_intn", ["int $0x21"])
        if kind == "vmmcall":
            return Op("l2_vmmcall", [f"mov ${r.choice((0, 1, 5, 9, 12)):#x}, %eax", "vmmcall"])
        if kind == "de":
            return Op("l2_de", ["xor %ecx, %ecx", "xor %edx, %edx", "mov $1, %eax", "div %ecx"])
        return Op("l2_" + kind, [kind])

    def l1_config(self) -> list:
        r = self.r
        w3 = [b for name, b in W3.items() if r.random() < (0.6 if name in ("cpuid", "hlt", "ioio") else 0.3)]
        w4 = [b for b in W4.values() if r.random() < 0.4]
        exc = [v for v in EXC if r.random() < 0.4]
        lines = []
        if w3:
            lines.append(f"orl ${sum(1 << b for b in w3):#x}, VMCB(VMCB_INTERCEPT_W3)")
        if w4:
            lines.append(f"orl ${sum(1 << b for b in w4):#x}, VMCB(VMCB_INTERCEPT_W4)")
        if exc:
            lines.append(f"movl ${sum(1 << v for v in exc):#x}, VMCB(VMCB_INTERCEPT_EXC)")
        for port in PORTS:
            if r.random() < 0.5:
                lines.append(f"orb ${1 << (port % 8):#x}, IOPM_PA + {port // 8:#x}")
        if r.random() < 0.5:
            lines.append(f"movabs ${r.getrandbits(40):#x}, %rax")
            lines.append("mov %rax, VMCB(VMCB_TSC_OFFSET)")
        x = r.random()
        if x < 0.25:  # an event for the first VMRUN
            vec, typ, err = r.choice(((6, 3, None), (13, 3, 0x18), (3, 3, None), (0x21, 0, None),
                                      (2, 2, None), (14, 3, 2), (0, 3, None)))
            ev = 0x80000000 | (typ << 8) | vec | (0x800 if err is not None else 0)
            lines.append(f"movl ${ev:#x}, VMCB(VMCB_EVENT_INJ)")
            if err is not None:
                lines.append(f"movl ${err:#x}, VMCB(VMCB_EVENT_INJ_ERR)")
        elif x < 0.32:  # a VMRUN KVM refuses: VMEXIT_INVALID, then L1 stops
            lines.append(r.choice(("movl $0, VMCB(VMCB_ASID)", "andl $~EFER_SVME, VMCB(VMCB_EFER)")))
        return lines


def generate_nested(seed: int, n_ops: int | None = None) -> Guest:
    g = _GenNested(seed)
    r = g.r
    n = n_ops if n_ops is not None else r.randint(3, 14)
    config = g.l1_config()
    ops = [g.l2_op() for _ in range(n)]
    return Guest(seed, ops, config, 0, mode="nested")


G.SOURCES["nested"] = source_nested
G.GENERATORS["nested"] = generate_nested
