"""The SEV-ES save area (VMSA): byte layout, the builder KVM's launch path mirrors, a parser.

Under SEV-ES the guest's register state lives in its own page, the VMSA
(``struct sev_es_save_area``, 1648 bytes at the start of a zeroed 4 KiB page;
docs/facts.md#facts-3), encrypted by LAUNCH_UPDATE_VMSA and covered by the launch digest.
To predict that digest offline (``kvmharness measure --mode sev-es``) the
harness must build, byte for byte, the page KVM hands the firmware.

:func:`build_vmsa` models ``sev_es_sync_vmsa()`` (arch/x86/kvm/svm/sev.c) on
top of the state KVM_SET_REGS / KVM_SET_SREGS leave in the VMCB save area
(``svm_set_segment``, ``svm_set_efer``, ``svm_set_cr0``, ``svm_set_cr4``,
``svm_post_set_cr3``, ``init_vmcb``; docs/facts.md#facts-3b):

1. the legacy save area's first 744 bytes land at identical offsets:
   segments (``attrib`` from the kvm_segment bits, P cleared when unusable),
   CPL = SS.DPL, EFER | SVME, CR0 without CD/NW (``KVM_X86_QUIRK_CD_NW_CLEARED``),
   CR4 | MCE (the host's CR4.MCE, set on every EPYC host), CR3, DR7, RFLAGS
   (bit 1 forced), G_PAT = the reset PAT.  CR2 stays 0: the VMCB's CR2 is
   only written at VMRUN.  The syscall/sysenter MSRs stay 0 (the harness does
   not set them before launch).
2. then GPRs and RIP from the register cache, XCR0, PKRU, XSS, DR6 and
   SEV_FEATURES;
3. x87/SSE/AVX state only for VMs of a type other than KVM_X86_DEFAULT_VM
   (``init2=True``), X87_DS = X87_CS = 0, st(i) split into 8-byte and
   2-byte parts;
4. DR7 with any bit beyond DR7_FIXED_1 (0x400) makes KVM refuse (EINVAL):
   :func:`build_vmsa` raises ``ValueError`` the same way.

Everything is driven by the one offset table :data:`VMSA_FIELDS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..x86 import CR0_ET, EFER_SVME, DTable, Regs, Segment, Sregs

VMSA_SIZE = 0x670  # 1648: sizeof(struct sev_es_save_area)
VMSA_PAGE_SIZE = 4096
LEGACY_SAVE_AREA_SIZE = 0x2E8  # 744: sizeof(struct vmcb_save_area), copied first

SEGMENT_ORDER = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")

#: (name, offset, size) of every VMSA field (docs/facts.md#facts-3).  Segments are 16-byte
#: ``vmcb_seg`` records: selector u16, attrib u16, limit u32, base u64.
VMSA_FIELDS: tuple[tuple[str, int, int], ...] = (
    *((name, 16 * i, 16) for i, name in enumerate(SEGMENT_ORDER)),
    ("pl0_ssp", 0x0A0, 8), ("pl1_ssp", 0x0A8, 8), ("pl2_ssp", 0x0B0, 8), ("pl3_ssp", 0x0B8, 8),
    ("u_cet", 0x0C0, 8), ("vmpl", 0x0CA, 1), ("cpl", 0x0CB, 1), ("efer", 0x0D0, 8),
    ("xss", 0x140, 8), ("cr4", 0x148, 8), ("cr3", 0x150, 8), ("cr0", 0x158, 8),
    ("dr7", 0x160, 8), ("dr6", 0x168, 8), ("rflags", 0x170, 8), ("rip", 0x178, 8),
    ("dr0", 0x180, 8), ("dr1", 0x188, 8), ("dr2", 0x190, 8), ("dr3", 0x198, 8),
    ("dr0_addr_mask", 0x1A0, 8), ("dr1_addr_mask", 0x1A8, 8), ("dr2_addr_mask", 0x1B0, 8),
    ("dr3_addr_mask", 0x1B8, 8),
    ("rsp", 0x1D8, 8), ("s_cet", 0x1E0, 8), ("ssp", 0x1E8, 8), ("isst_addr", 0x1F0, 8),
    ("rax", 0x1F8, 8), ("star", 0x200, 8), ("lstar", 0x208, 8), ("cstar", 0x210, 8),
    ("sfmask", 0x218, 8), ("kernel_gs_base", 0x220, 8), ("sysenter_cs", 0x228, 8),
    ("sysenter_esp", 0x230, 8), ("sysenter_eip", 0x238, 8), ("cr2", 0x240, 8),
    ("g_pat", 0x268, 8), ("dbgctl", 0x270, 8), ("br_from", 0x278, 8), ("br_to", 0x280, 8),
    ("last_excp_from", 0x288, 8), ("last_excp_to", 0x290, 8),
    ("pkru", 0x2E8, 4), ("tsc_aux", 0x2EC, 4), ("tsc_scale", 0x2F0, 8), ("tsc_offset", 0x2F8, 8),
    ("rcx", 0x308, 8), ("rdx", 0x310, 8), ("rbx", 0x318, 8), ("rbp", 0x328, 8),
    ("rsi", 0x330, 8), ("rdi", 0x338, 8), ("r8", 0x340, 8), ("r9", 0x348, 8),
    ("r10", 0x350, 8), ("r11", 0x358, 8), ("r12", 0x360, 8), ("r13", 0x368, 8),
    ("r14", 0x370, 8), ("r15", 0x378, 8),
    ("guest_exit_info_1", 0x390, 8), ("guest_exit_info_2", 0x398, 8),
    ("guest_exit_int_info", 0x3A0, 8), ("guest_nrip", 0x3A8, 8), ("sev_features", 0x3B0, 8),
    ("vintr_ctrl", 0x3B8, 8), ("guest_exit_code", 0x3C0, 8), ("virtual_tom", 0x3C8, 8),
    ("tlb_id", 0x3D0, 8), ("pcpu_id", 0x3D8, 8), ("event_inj", 0x3E0, 8), ("xcr0", 0x3E8, 8),
    ("x87_dp", 0x400, 8), ("mxcsr", 0x408, 4), ("x87_ftw", 0x40C, 2), ("x87_fsw", 0x40E, 2),
    ("x87_fcw", 0x410, 2), ("x87_fop", 0x412, 2), ("x87_ds", 0x414, 2), ("x87_cs", 0x416, 2),
    ("x87_rip", 0x418, 8), ("fpreg_x87", 0x420, 80), ("fpreg_xmm", 0x470, 256),
    ("fpreg_ymm", 0x570, 256),
)
OFFSETS: dict[str, tuple[int, int]] = {n: (o, s) for n, o, s in VMSA_FIELDS}
SEGMENT_FIELDS = frozenset(SEGMENT_ORDER)
BYTES_FIELDS = frozenset({"fpreg_x87", "fpreg_xmm", "fpreg_ymm"})

# kvm_sregs segment name -> VMSA segment name
_SREGS_SEGMENTS = {"es": "es", "cs": "cs", "ss": "ss", "ds": "ds", "fs": "fs", "gs": "gs",
                   "ldt": "ldtr", "tr": "tr"}

MSR_IA32_CR_PAT_DEFAULT = 0x0007040600070406
DR6_FIXED_1 = 0xFFFF0FF0  # DR6_ACTIVE_LOW: the reset DR6
DR7_FIXED_1 = 0x400
CR0_CD = 1 << 30
CR0_NW = 1 << 29
CR4_MCE = 1 << 6
XFEATURE_MASK_FP = 0x1
MXCSR_DEFAULT = 0x1F80
FCW_DEFAULT = 0x37F

# SEV_FEATURES bits (docs/facts.md#facts-3a)
SVM_SEV_FEAT_SNP_ACTIVE = 1 << 0
SVM_SEV_FEAT_DEBUG_SWAP = 1 << 5


@dataclass(frozen=True)
class FpuState:
    """The x87/SSE/AVX state KVM copies into an INIT2 VM's VMSA (from the guest fpstate's
    FXSAVE image and the YMM xsave component).

    ``st`` is the FXSAVE ``st_space``: 8 registers x 16 bytes, of which bytes
    0-9 are the 80-bit value.  ``ftw`` is the FXSAVE abridged tag byte.  The
    defaults are the state of a freshly created vCPU (FCW 0x37F, MXCSR 0x1F80).
    """

    fcw: int = FCW_DEFAULT
    fsw: int = 0
    ftw: int = 0
    fop: int = 0
    rip: int = 0
    dp: int = 0
    mxcsr: int = MXCSR_DEFAULT
    st: bytes = bytes(128)
    xmm: bytes = bytes(256)
    ymm: bytes | None = bytes(256)  # None: the YMM component is absent (KVM writes zeros)


def _u(value: int, size: int) -> bytes:
    return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _segment_record(selector: int, attrib: int, limit: int, base: int) -> bytes:
    return (_u(selector, 2) + _u(attrib, 2) + _u(limit, 4) + _u(base, 8))


def vmcb_attrib(seg: Segment) -> int:
    """``svm_set_segment``'s attrib: the kvm_segment bits, P cleared for an unusable segment."""
    present = 1 if (seg.present and not seg.unusable) else 0
    return ((seg.type & 0xF) | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | present << 7
            | (seg.avl & 1) << 8 | (seg.l & 1) << 9 | (seg.db & 1) << 10 | (seg.g & 1) << 11)


class Vmsa:
    """A view with named fields over a VMSA page (4096 bytes; 1648 are the save area).

    Integer fields read and write as ints; segment fields as
    ``(selector, attrib, limit, base)`` tuples; the FPU register files as bytes.
    """

    __slots__ = ("buf",)

    def __init__(self, buf: bytes | bytearray | None = None):
        if buf is None:
            buf = bytearray(VMSA_PAGE_SIZE)
        elif not isinstance(buf, (bytearray, memoryview)):
            buf = bytearray(buf)
        if len(buf) not in (VMSA_SIZE, VMSA_PAGE_SIZE):
            raise ValueError(f"a VMSA is {VMSA_SIZE} bytes (or a {VMSA_PAGE_SIZE}-byte page), "
                             f"got {len(buf)}")
        self.buf = buf

    def get(self, name: str):
        off, size = OFFSETS[name]
        raw = bytes(self.buf[off:off + size])
        if name in SEGMENT_FIELDS:
            return (int.from_bytes(raw[0:2], "little"), int.from_bytes(raw[2:4], "little"),
                    int.from_bytes(raw[4:8], "little"), int.from_bytes(raw[8:16], "little"))
        if name in BYTES_FIELDS:
            return raw
        return int.from_bytes(raw, "little")

    def put(self, name: str, value) -> None:
        off, size = OFFSETS[name]
        if name in SEGMENT_FIELDS:
            data = _segment_record(*value)
        elif name in BYTES_FIELDS:
            data = bytes(value)
            if len(data) != size:
                raise ValueError(f"{name} is {size} bytes, got {len(data)}")
        else:
            data = _u(int(value), size)
        self.buf[off:off + size] = data

    def __bytes__(self) -> bytes:
        return bytes(self.buf)

    def to_dict(self) -> dict:
        """Every field by name (bytes fields as hex)."""
        out = {}
        for name, _, _ in VMSA_FIELDS:
            v = self.get(name)
            out[name] = v.hex() if isinstance(v, bytes) else v
        return out

    # -- back to the harness's register types ------------------------------
    def segment(self, name: str) -> Segment:
        selector, attrib, limit, base = self.get(name)
        return Segment.from_attrib(selector, attrib, limit, base)

    def regs(self) -> Regs:
        return Regs(**{n: self.get(n) for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp",
                                                "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                                                "r14", "r15", "rip", "rflags")})

    def sregs(self) -> Sregs:
        """The segment/control state as KVM_GET_SREGS would have reported it before launch
        (EFER without the SVME bit KVM adds)."""
        kw = {k: self.segment(v) for k, v in _SREGS_SEGMENTS.items()}
        _, _, glimit, gbase = self.get("gdtr")
        _, _, ilimit, ibase = self.get("idtr")
        return Sregs(**kw, gdt=DTable(gbase, glimit), idt=DTable(ibase, ilimit),
                     cr0=self.get("cr0"), cr2=self.get("cr2"), cr3=self.get("cr3"),
                     cr4=self.get("cr4"), efer=self.get("efer") & ~EFER_SVME)


def parse_vmsa(page: bytes) -> dict:
    """Every field of a VMSA page by name (see :class:`Vmsa` for typed access)."""
    return Vmsa(bytes(page)).to_dict()


def build_vmsa(regs: Regs, sregs: Sregs, *, sev_features: int = 0, xcr0: int = XFEATURE_MASK_FP,
               pkru: int = 0, xss: int = 0, dr6: int = DR6_FIXED_1, dr7: int = DR7_FIXED_1,
               fpu: FpuState | None = None, init2: bool = False,
               g_pat: int = MSR_IA32_CR_PAT_DEFAULT, host_cr4_mce: bool = True) -> bytes:
    """The 4096-byte VMSA page KVM encrypts at LAUNCH_UPDATE_VMSA for this vCPU state.

    ``init2``: the VM was created with a non-default type and KVM_SEV_INIT2
    (Linux 6.10+), so the FPU state is included; with legacy
    KVM_SEV_ES_INIT it stays zero.  ``fpu`` defaults to a new vCPU's FPU
    state.  ``sev_features`` is the VM's ``vmsa_features`` (0 for
    KVM_SEV_ES_INIT; an SNP VM also has bit 0).  ``xcr0``/``pkru``/``xss``/``dr6``
    are the vCPU's values (reset defaults: 1, 0, 0, 0xFFFF0FF0).

    Raises ``ValueError`` where KVM's ``sev_es_sync_vmsa`` returns -EINVAL
    (DR7 bits beyond 0x400).
    """
    if dr7 & ~DR7_FIXED_1 & 0xFFFFFFFFFFFFFFFF:
        raise ValueError(f"DR7 {dr7:#x} has bits beyond DR7_FIXED_1 (0x400): KVM refuses "
                         "LAUNCH_UPDATE_VMSA with EINVAL (sev_es_sync_vmsa)")
    v = Vmsa()
    # -- 1. the legacy VMCB save area as KVM_SET_SREGS/SET_REGS left it --------
    for kname, vname in _SREGS_SEGMENTS.items():
        s = getattr(sregs, kname)
        v.put(vname, (s.selector, vmcb_attrib(s), s.limit, s.base))
    # GDTR/IDTR: init_vmcb leaves selector and attrib 0; svm_set_gdt/idt set limit/base
    v.put("gdtr", (0, 0, sregs.gdt.limit, sregs.gdt.base))
    v.put("idtr", (0, 0, sregs.idt.limit, sregs.idt.base))
    v.put("cpl", sregs.ss.dpl & 3)                    # svm_set_segment(SS)
    v.put("efer", sregs.efer | EFER_SVME)              # svm_set_efer
    v.put("cr0", sregs.cr0 & ~(CR0_CD | CR0_NW))        # svm_set_cr0, CD_NW_CLEARED quirk
    v.put("cr4", sregs.cr4 | (CR4_MCE if host_cr4_mce else 0))  # svm_set_cr4
    v.put("cr3", sregs.cr3)                            # svm_post_set_cr3 (SEV-ES)
    v.put("dr7", dr7)                                  # svm_set_dr7 via kvm_update_dr7
    v.put("rflags", regs.rflags | 0x2)                 # kvm_set_rflags | X86_EFLAGS_FIXED
    v.put("g_pat", g_pat)                              # init_vmcb: vcpu->arch.pat
    # -- 2. sev_es_sync_vmsa: the register cache and a few non-GPR registers ----
    for name in ("rax", "rbx", "rcx", "rdx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10",
                 "r11", "r12", "r13", "r14", "r15", "rip"):
        v.put(name, getattr(regs, name))
    v.put("xcr0", xcr0)
    v.put("pkru", pkru)
    v.put("xss", xss)
    v.put("dr6", dr6)
    v.put("sev_features", sev_features)
    # -- 3. FPU only for INIT2 VM types ------------------------------------------
    if init2:
        f = fpu if fpu is not None else FpuState()
        v.put("x87_dp", f.dp)
        v.put("mxcsr", f.mxcsr)
        v.put("x87_ftw", f.ftw)
        v.put("x87_fsw", f.fsw)
        v.put("x87_fcw", f.fcw)
        v.put("x87_fop", f.fop)
        v.put("x87_ds", 0)
        v.put("x87_cs", 0)
        v.put("x87_rip", f.rip)
        st = bytes(f.st).ljust(128, b"\0")
        x87 = bytearray(80)
        for i in range(8):  # bytes 0-7 of each register first, then bytes 8-9 of each
            x87[i * 8:i * 8 + 8] = st[i * 16:i * 16 + 8]
            x87[64 + i * 2:64 + i * 2 + 2] = st[i * 16 + 8:i * 16 + 10]
        v.put("fpreg_x87", bytes(x87))
        v.put("fpreg_xmm", bytes(f.xmm).ljust(256, b"\0")[:256])
        v.put("fpreg_ymm", bytes(f.ymm).ljust(256, b"\0")[:256] if f.ymm is not None else bytes(256))
    return bytes(v)


def reset_state(vcpu_signature: int = 0, eip: int = 0xFFFFFFF0) -> tuple[Regs, Sregs]:
    """The x86 RESET state a VMM (QEMU) gives a vCPU before launch, as KVM_SET_REGS/SREGS values.

    CS = F000:(eip & 0xFFFF0000) with IP = eip & 0xFFFF, flat 64 KiB data
    segments, CR0 = CD|NW|ET, RDX = the CPUID signature.  This is the state
    sev-snp-measure models for QEMU (docs/facts.md#facts-3c), for the fidelity check.
    """
    def data():
        return Segment(base=0, limit=0xFFFF, selector=0, type=3, present=1, s=1)

    sregs = Sregs(cs=Segment(base=eip & 0xFFFF0000, limit=0xFFFF, selector=0xF000, type=11,
                             present=1, s=1),
                  ds=data(), es=data(), fs=data(), gs=data(), ss=data(),
                  tr=Segment(base=0, limit=0xFFFF, selector=0, type=11, present=1, s=0),
                  ldt=Segment(base=0, limit=0xFFFF, selector=0, type=2, present=1, s=0),
                  gdt=DTable(0, 0xFFFF), idt=DTable(0, 0xFFFF),
                  cr0=CR0_CD | CR0_NW | CR0_ET, cr3=0, cr4=0, efer=0)
    return Regs(rip=eip & 0xFFFF, rdx=vcpu_signature, rflags=0x2), sregs


__all__ = [
    "VMSA_FIELDS",
    "VMSA_PAGE_SIZE",
    "VMSA_SIZE",
    "FpuState",
    "Vmsa",
    "build_vmsa",
    "parse_vmsa",
    "reset_state",
    "vmcb_attrib",
]

