"""The GHCB: its page layout, the valid bitmap, the MSR protocol and the exit codes.

The Guest-Hypervisor Communication Block (GHCB spec 56421; docs/facts.md#facts-4, #facts-5, #facts-6a)
is how an SEV-ES guest tells the hypervisor what it chooses to, since the
hypervisor can no longer read its registers.  Two channels:

* the **MSR protocol** (docs/facts.md#facts-5): the guest writes a request into the GHCB MSR
  (0xC0010130) with non-zero low 12 bits (GHCBInfo) and executes VMGEXIT; the
  hypervisor answers in the same MSR.  :class:`GhcbMsr` encodes and decodes
  every request and response by name.
* the **GHCB page** (docs/facts.md#facts-4): a shared (unencrypted) 4 KiB page whose GPA the
  guest writes into the GHCB MSR.  Inputs are marked in a 128-bit valid
  bitmap (bit index = field offset // 8); :class:`Ghcb` is a view with named
  fields over a 4096-byte buffer.

Everything here is pure data layout: no I/O, no KVM.  The KVM side of the
exchange is modelled in :mod:`kvmharness.sev.vmgexit`.  Names follow the
kernel's ``arch/x86/include/asm/sev-common.h`` and ``asm/svm.h``.
"""

from __future__ import annotations

from typing import NamedTuple

from ..abi import (  # noqa: F401 - the exit codes the GHCB names too, defined once in abi
    SVM_EXIT_CPUID,
    SVM_EXIT_INVD,
    SVM_EXIT_IOIO,
    SVM_EXIT_MONITOR,
    SVM_EXIT_MSR,
    SVM_EXIT_MWAIT,
    SVM_EXIT_NPF,
    SVM_EXIT_RDPMC,
    SVM_EXIT_RDTSCP,
    SVM_EXIT_VMGEXIT,
    SVM_EXIT_VMMCALL,
    SVM_EXIT_WBINVD,
)
from ..x86 import MSR_SEV_ES_GHCB  # noqa: F401

GHCB_SIZE = 4096

# ---------------------------------------------------------------------------
# Page layout (struct ghcb / struct ghcb_save_area; docs/facts.md#facts-4, #facts-4a)
# ---------------------------------------------------------------------------

#: field name -> (offset, size) of every named GHCB field.  The save-area
#: fields sit at the same offsets as in the VMSA (docs/facts.md#facts-3).
FIELDS: dict[str, tuple[int, int]] = {
    "cpl": (0x0CB, 1),
    "xss": (0x140, 8),
    "dr7": (0x160, 8),
    "rip": (0x178, 8),
    "rsp": (0x1D8, 8),
    "rax": (0x1F8, 8),
    "rcx": (0x308, 8),
    "rdx": (0x310, 8),
    "rbx": (0x318, 8),
    "rbp": (0x328, 8),
    "rsi": (0x330, 8),
    "rdi": (0x338, 8),
    "r8": (0x340, 8),
    "r9": (0x348, 8),
    "r10": (0x350, 8),
    "r11": (0x358, 8),
    "r12": (0x360, 8),
    "r13": (0x368, 8),
    "r14": (0x370, 8),
    "r15": (0x378, 8),
    "sw_exit_code": (0x390, 8),
    "sw_exit_info_1": (0x398, 8),
    "sw_exit_info_2": (0x3A0, 8),
    "sw_scratch": (0x3A8, 8),
    "xcr0": (0x3E8, 8),
    "x87_state_gpa": (0x400, 8),  # newer kernels; outside the 128-bit bitmap
    "protocol_version": (0xFFA, 2),
    "ghcb_usage": (0xFFC, 4),
}

VALID_BITMAP_OFFSET = 0x3F0
VALID_BITMAP_SIZE = 16
SHARED_BUFFER_OFFSET = 0x800
SHARED_BUFFER_SIZE = 0x7F0  # GHCB_SHARED_BUF_SIZE: 0x800 .. 0xFEF
SHARED_BUFFER_END = SHARED_BUFFER_OFFSET + SHARED_BUFFER_SIZE  # 0xFF0 (reserved_0xff0)

#: the fields that have a bit in the valid bitmap (everything in the save area
#: below the bitmap itself)
BITMAP_FIELDS = tuple(n for n, (off, _) in FIELDS.items() if off < VALID_BITMAP_OFFSET)

GHCB_USAGE_STANDARD = 0  # the only ghcb_usage KVM accepts

# Protocol versions KVM implements (sev.c GHCB_VERSION_MIN / _MAX)
GHCB_VERSION_MIN = 1
GHCB_VERSION_MAX = 2


def valid_bit(field: str) -> int:
    """The valid-bitmap bit index of a named field: its offset // 8 (kernel ``GHCB_BITMAP_IDX``)."""
    return FIELDS[field][0] // 8


#: bit index -> field name, for decoding a bitmap
BIT_NAMES: dict[int, str] = {valid_bit(n): n for n in BITMAP_FIELDS}
_BIT_OF: dict[str, int] = {n: valid_bit(n) for n in BITMAP_FIELDS}


def bitmap_of(*fields: str) -> bytes:
    """The 16-byte valid bitmap with exactly these fields marked."""
    bits = 0
    for f in fields:
        bits |= 1 << valid_bit(f)
    return bits.to_bytes(VALID_BITMAP_SIZE, "little")


def bitmap_fields(bitmap: bytes | int) -> tuple[str, ...]:
    """Names of the fields a bitmap marks valid, in bit order; unnamed bits as ``bit<N>``."""
    bits = int.from_bytes(bitmap, "little") if not isinstance(bitmap, int) else bitmap
    out = []
    while bits:
        low = bits & -bits
        n = low.bit_length() - 1
        out.append(BIT_NAMES.get(n, f"bit{n}"))
        bits ^= low
    return tuple(out)


class Ghcb:
    """A view with named fields over one 4096-byte GHCB page.

    ``Ghcb(buf)`` wraps a writable buffer (bytearray or memoryview) without
    copying; ``Ghcb()`` makes a zeroed page.  Reading a field returns an int,
    assigning one writes it *and* marks it valid, like the kernel's
    ``ghcb_set_<field>()`` accessors; :meth:`put` writes without touching
    the bitmap.

        g = Ghcb()
        g.sw_exit_code = 0x72          # also sets its valid bit
        g.rax = 0x8000001F
        g.is_valid("rax")  -> True
        bytes(g)                       # the 4096-byte page
    """

    __slots__ = ("buf",)

    def __init__(self, buf: bytearray | memoryview | None = None):
        if buf is None:
            buf = bytearray(GHCB_SIZE)
        if len(buf) != GHCB_SIZE:
            raise ValueError(f"a GHCB page is {GHCB_SIZE} bytes, got {len(buf)}")
        object.__setattr__(self, "buf", buf)

    # -- raw fields -----------------------------------------------------------
    def get(self, field: str) -> int:
        off, size = FIELDS[field]
        return int.from_bytes(self.buf[off:off + size], "little")

    def put(self, field: str, value: int) -> None:
        """Write a field without marking it valid."""
        off, size = FIELDS[field]
        self.buf[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def set(self, field: str, value: int) -> None:
        """Write a field and mark it valid (``ghcb_set_<field>``)."""
        self.put(field, value)
        bit = _BIT_OF.get(field)
        if bit is not None:
            self.buf[VALID_BITMAP_OFFSET + bit // 8] |= 1 << (bit % 8)

    def __getattr__(self, name: str) -> int:
        if name in FIELDS:
            return self.get(name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        if name in FIELDS:
            self.set(name, value)
        else:  # properties (valid_bitmap); anything else fails: __slots__
            object.__setattr__(self, name, value)

    # -- valid bitmap ---------------------------------------------------------
    @property
    def valid_bitmap(self) -> bytes:
        return bytes(self.buf[VALID_BITMAP_OFFSET:VALID_BITMAP_OFFSET + VALID_BITMAP_SIZE])

    @valid_bitmap.setter
    def valid_bitmap(self, value: bytes) -> None:
        if len(value) != VALID_BITMAP_SIZE:
            raise ValueError("the valid bitmap is 16 bytes")
        self.buf[VALID_BITMAP_OFFSET:VALID_BITMAP_OFFSET + VALID_BITMAP_SIZE] = value

    def is_valid(self, field: str) -> bool:
        bit = valid_bit(field)
        return bool(self.buf[VALID_BITMAP_OFFSET + bit // 8] >> (bit % 8) & 1)

    def mark_valid(self, field: str) -> None:
        bit = valid_bit(field)
        self.buf[VALID_BITMAP_OFFSET + bit // 8] |= 1 << (bit % 8)

    def clear_valid(self) -> None:
        """Zero the bitmap (what KVM does after reading the inputs)."""
        self.buf[VALID_BITMAP_OFFSET:VALID_BITMAP_OFFSET + VALID_BITMAP_SIZE] = bytes(VALID_BITMAP_SIZE)

    def valid_fields(self) -> tuple[str, ...]:
        return bitmap_fields(self.valid_bitmap)

    # -- shared buffer ----------------------------------------------------------
    def shared_buffer(self) -> memoryview:
        return memoryview(self.buf)[SHARED_BUFFER_OFFSET:SHARED_BUFFER_END]

    def __bytes__(self) -> bytes:
        return bytes(self.buf)

    def to_dict(self) -> dict:
        """Every named field, the valid fields, and the first bytes of the shared buffer."""
        d = {n: self.get(n) for n in FIELDS}
        d["valid"] = list(self.valid_fields())
        return d


# ---------------------------------------------------------------------------
# SW_EXIT_CODE values (docs/facts.md#facts-6, #facts-6a; asm/svm.h SVM_EXIT_* / SVM_VMGEXIT_*)
# ---------------------------------------------------------------------------

# (the codes abi.py also names -- RDPMC, CPUID, INVD, IOIO, MSR, VMMCALL, RDTSCP, WBINVD,
# MONITOR, MWAIT, NPF, VMGEXIT -- are imported from there, above)
SVM_EXIT_READ_DR7 = 0x027
SVM_EXIT_WRITE_DR7 = 0x037
SVM_EXIT_EXCP_AC = 0x051
SVM_EXIT_RDTSC = 0x06E

SVM_VMGEXIT_MMIO_READ = 0x80000001
SVM_VMGEXIT_MMIO_WRITE = 0x80000002
SVM_VMGEXIT_NMI_COMPLETE = 0x80000003
SVM_VMGEXIT_AP_HLT_LOOP = 0x80000004
SVM_VMGEXIT_AP_JUMP_TABLE = 0x80000005
SVM_VMGEXIT_PSC = 0x80000010
SVM_VMGEXIT_GUEST_REQUEST = 0x80000011
SVM_VMGEXIT_EXT_GUEST_REQUEST = 0x80000012
SVM_VMGEXIT_AP_CREATION = 0x80000013
SVM_VMGEXIT_GET_APIC_IDS = 0x80000017
SVM_VMGEXIT_SNP_RUN_VMPL = 0x80000018
SVM_VMGEXIT_SAVIC = 0x8000001A
SVM_VMGEXIT_HV_FEATURES = 0x8000FFFD
SVM_VMGEXIT_TERM_REQUEST = 0x8000FFFE
SVM_VMGEXIT_UNSUPPORTED_EVENT = 0x8000FFFF

SVM_VMGEXIT_AP_CREATE_ON_INIT = 0
SVM_VMGEXIT_AP_CREATE = 1
SVM_VMGEXIT_AP_DESTROY = 2

SW_EXIT_CODE_NAMES: dict[int, str] = {
    SVM_EXIT_READ_DR7: "READ_DR7", SVM_EXIT_WRITE_DR7: "WRITE_DR7", SVM_EXIT_EXCP_AC: "EXCP_AC",
    SVM_EXIT_RDTSC: "RDTSC", SVM_EXIT_RDPMC: "RDPMC", SVM_EXIT_CPUID: "CPUID",
    SVM_EXIT_INVD: "INVD", SVM_EXIT_IOIO: "IOIO", SVM_EXIT_MSR: "MSR",
    SVM_EXIT_VMMCALL: "VMMCALL", SVM_EXIT_RDTSCP: "RDTSCP", SVM_EXIT_WBINVD: "WBINVD",
    SVM_EXIT_MONITOR: "MONITOR", SVM_EXIT_MWAIT: "MWAIT", SVM_EXIT_NPF: "NPF",
    SVM_VMGEXIT_MMIO_READ: "MMIO_READ", SVM_VMGEXIT_MMIO_WRITE: "MMIO_WRITE",
    SVM_VMGEXIT_NMI_COMPLETE: "NMI_COMPLETE", SVM_VMGEXIT_AP_HLT_LOOP: "AP_HLT_LOOP",
    SVM_VMGEXIT_AP_JUMP_TABLE: "AP_JUMP_TABLE", SVM_VMGEXIT_PSC: "PSC",
    SVM_VMGEXIT_GUEST_REQUEST: "GUEST_REQUEST", SVM_VMGEXIT_EXT_GUEST_REQUEST: "EXT_GUEST_REQUEST",
    SVM_VMGEXIT_AP_CREATION: "AP_CREATION", SVM_VMGEXIT_GET_APIC_IDS: "GET_APIC_IDS",
    SVM_VMGEXIT_SNP_RUN_VMPL: "SNP_RUN_VMPL", SVM_VMGEXIT_SAVIC: "SAVIC",
    SVM_VMGEXIT_HV_FEATURES: "HV_FEATURES", SVM_VMGEXIT_TERM_REQUEST: "TERM_REQUEST",
    SVM_VMGEXIT_UNSUPPORTED_EVENT: "UNSUPPORTED_EVENT",
}


_WORD3 = ("INTR", "NMI", "SMI", "INIT", "VINTR", "CR0_SEL_WRITE", "IDTR_READ", "GDTR_READ",
          "LDTR_READ", "TR_READ", "IDTR_WRITE", "GDTR_WRITE", "LDTR_WRITE", "TR_WRITE", "RDTSC",
          "RDPMC", "PUSHF", "POPF", "CPUID", "RSM", "IRET", "SWINT", "INVD", "PAUSE", "HLT",
          "INVLPG", "INVLPGA", "IOIO", "MSR", "TASK_SWITCH", "FERR_FREEZE", "SHUTDOWN")
_WORD4 = ("VMRUN", "VMMCALL", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "RDTSCP", "ICEBP",
          "WBINVD", "MONITOR", "MWAIT", "MWAIT_COND", "XSETBV", "RDPRU", "EFER_WRITE_TRAP")

#: every SVM exit code of docs/facts.md#facts-6 by name (asm/svm.h SVM_EXIT_*)
SVM_EXIT_NAMES: dict[int, str] = {
    **{n: f"READ_CR{n}" for n in range(16)}, **{0x10 + n: f"WRITE_CR{n}" for n in range(16)},
    **{0x20 + n: f"READ_DR{n}" for n in range(16)}, **{0x30 + n: f"WRITE_DR{n}" for n in range(16)},
    **{0x40 + v: f"EXCP_{v}" for v in range(32)},
    **{0x60 + i: name for i, name in enumerate(_WORD3)},
    **{0x80 + i: name for i, name in enumerate(_WORD4)},
    **{0x90 + n: f"CR{n}_WRITE_TRAP" for n in range(16)},
    0xA0: "INVLPGB", 0xA1: "INVLPGB_ILLEGAL", 0xA2: "INVPCID", 0xA3: "MCOMMIT", 0xA4: "TLBSYNC",
    0xA5: "BUS_LOCK", 0xA6: "IDLE_HLT", 0x400: "NPF", 0x401: "AVIC_INCOMPLETE_IPI",
    0x402: "AVIC_UNACCELERATED_ACCESS", 0x403: "VMGEXIT", 0x407: "PML_FULL",
    0xF0000000: "SW", (1 << 64) - 1: "ERR",
}
_EXCP = {1: "DB", 3: "BP", 6: "UD", 7: "NM", 8: "DF", 13: "GP", 14: "PF", 17: "AC", 18: "MC",
         29: "VC", 0: "DE", 16: "MF", 19: "XM", 10: "TS", 11: "NP", 12: "SS"}
SVM_EXIT_NAMES.update({0x40 + v: f"EXCP_{n}" for v, n in _EXCP.items()})


def sw_exit_code_name(code: int) -> str:
    """``"CPUID"`` for 0x72, ``"MMIO_READ"`` for 0x80000001 etc. (docs/facts.md#facts-6, #facts-6a); unknown
    codes as ``"UNKNOWN(0x..)"``."""
    return (SW_EXIT_CODE_NAMES.get(code) or SVM_EXIT_NAMES.get(code)
            or f"UNKNOWN({code:#x})")


# ---------------------------------------------------------------------------
# Hypervisor responses in SW_EXIT_INFO_1 / _2 (docs/facts.md#facts-4c; GHCB_HV_RESP_* / GHCB_ERR_*)
# ---------------------------------------------------------------------------

GHCB_HV_RESP_NO_ACTION = 0
GHCB_HV_RESP_ISSUE_EXCEPTION = 1
GHCB_HV_RESP_MALFORMED_INPUT = 2

GHCB_ERR_NOT_REGISTERED = 1
GHCB_ERR_INVALID_USAGE = 2
GHCB_ERR_INVALID_SCRATCH_AREA = 3
GHCB_ERR_MISSING_INPUT = 4
GHCB_ERR_INVALID_INPUT = 5
GHCB_ERR_INVALID_EVENT = 6

GHCB_ERR_NAMES = {GHCB_ERR_NOT_REGISTERED: "NOT_REGISTERED", GHCB_ERR_INVALID_USAGE: "INVALID_USAGE",
                  GHCB_ERR_INVALID_SCRATCH_AREA: "INVALID_SCRATCH_AREA",
                  GHCB_ERR_MISSING_INPUT: "MISSING_INPUT", GHCB_ERR_INVALID_INPUT: "INVALID_INPUT",
                  GHCB_ERR_INVALID_EVENT: "INVALID_EVENT"}

# EVENTINJ encoding KVM puts in SW_EXIT_INFO_2 with ISSUE_EXCEPTION (docs/facts.md#facts-1f)
SVM_EVTINJ_VALID = 1 << 31
SVM_EVTINJ_TYPE_EXEPT = 3 << 8

#: hypervisor feature bits KVM advertises (GHCB_HV_FT_SNP | GHCB_HV_FT_SNP_AP_CREATION)
GHCB_HV_FT_SNP = 1 << 0
GHCB_HV_FT_SNP_AP_CREATION = 1 << 1
GHCB_HV_FT_SUPPORTED = GHCB_HV_FT_SNP | GHCB_HV_FT_SNP_AP_CREATION

# ---------------------------------------------------------------------------
# IOIO EXITINFO1 (docs/facts.md#facts-1h)
# ---------------------------------------------------------------------------

SVM_IOIO_TYPE_MASK = 1 << 0   # 1 = IN
SVM_IOIO_STR_MASK = 1 << 2
SVM_IOIO_REP_MASK = 1 << 3
SVM_IOIO_SIZE_SHIFT = 4
SVM_IOIO_SIZE_MASK = 0x7 << SVM_IOIO_SIZE_SHIFT
SVM_IOIO_ASIZE_SHIFT = 7
SVM_IOIO_ASIZE_MASK = 0x7 << SVM_IOIO_ASIZE_SHIFT
SVM_IOIO_SEG_SHIFT = 10
SVM_IOIO_SEG_MASK = 0x7 << SVM_IOIO_SEG_SHIFT
SEG_ES, SEG_DS = 0, 3


class IoioInfo(NamedTuple):
    """A decoded IOIO EXITINFO1.  ``size`` is the byte count KVM computes,
    ``(info & 0x70) >> 4``, which is 1, 2 or 4 for a well-formed value."""

    port: int
    size: int
    is_in: bool
    string: bool
    rep: bool
    address_size: int  # 16, 32, 64 or 0 when no/several bits are set
    segment: int


def ioio_exit_info_1(port: int, size: int, *, is_in: bool = False, string: bool = False,
                     rep: bool = False, address_size: int = 64, segment: int = SEG_ES) -> int:
    """Encode an IOIO EXITINFO1 as the hardware (and a #VC handler) builds it."""
    if size not in (1, 2, 4):
        raise ValueError(f"IO operand size must be 1, 2 or 4 bytes, not {size}")
    if address_size not in (16, 32, 64):
        raise ValueError(f"address size must be 16, 32 or 64, not {address_size}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port:#x} is not a 16-bit port")
    asz = {16: 1, 32: 2, 64: 4}[address_size]
    return ((port << 16) | (int(is_in) * SVM_IOIO_TYPE_MASK) | (int(string) * SVM_IOIO_STR_MASK)
            | (int(rep) * SVM_IOIO_REP_MASK) | (size << SVM_IOIO_SIZE_SHIFT)
            | (asz << SVM_IOIO_ASIZE_SHIFT) | ((segment & 7) << SVM_IOIO_SEG_SHIFT))


def decode_ioio(info: int) -> IoioInfo:
    """Decode an IOIO EXITINFO1 the way ``io_interception`` (svm.c) reads it (low 32 bits)."""
    info &= 0xFFFFFFFF
    asz = {1: 16, 2: 32, 4: 64}.get((info & SVM_IOIO_ASIZE_MASK) >> SVM_IOIO_ASIZE_SHIFT, 0)
    return IoioInfo(port=info >> 16, size=(info & SVM_IOIO_SIZE_MASK) >> SVM_IOIO_SIZE_SHIFT,
                    is_in=bool(info & SVM_IOIO_TYPE_MASK), string=bool(info & SVM_IOIO_STR_MASK),
                    rep=bool(info & SVM_IOIO_REP_MASK), address_size=asz,
                    segment=(info & SVM_IOIO_SEG_MASK) >> SVM_IOIO_SEG_SHIFT)


# ---------------------------------------------------------------------------
# The GHCB MSR protocol (docs/facts.md#facts-5; sev-common.h GHCB_MSR_*)
# ---------------------------------------------------------------------------

GHCB_MSR_INFO_MASK = 0xFFF
GHCB_DATA_SHIFT = 12

MSR_CODES: dict[int, str] = {
    0x001: "SEV_INFO_RESP",
    0x002: "SEV_INFO_REQ",
    0x004: "CPUID_REQ",
    0x005: "CPUID_RESP",
    0x006: "AP_RESET_HOLD_REQ",
    0x007: "AP_RESET_HOLD_RESP",
    0x010: "PREF_GPA_REQ",
    0x011: "PREF_GPA_RESP",
    0x012: "REG_GPA_REQ",
    0x013: "REG_GPA_RESP",
    0x014: "PSC_REQ",
    0x015: "PSC_RESP",
    0x016: "VMPL_REQ",
    0x017: "VMPL_RESP",
    0x080: "HV_FT_REQ",
    0x081: "HV_FT_RESP",
    0x100: "TERM_REQ",
}
MSR_CODE_OF = {v: k for k, v in MSR_CODES.items()}

CPUID_REGS = ("eax", "ebx", "ecx", "edx")
GHCB_MSR_PREF_GPA_NONE = (1 << 52) - 1          # GFN all ones: "no preference"
GHCB_MSR_PSC_RESP_ERROR = (1 << 63) | 0x015    # KVM's generic PSC failure
PSC_OP_PRIVATE, PSC_OP_SHARED = 1, 2

# Termination reason sets/codes (docs/facts.md#facts-5)
TERM_SET_GENERAL = 0
TERM_SET_LINUX = 1
TERM_REASON_NAMES = {
    (0, 0): "general request", (0, 1): "protocol range not supported",
    (0, 2): "SNP features not supported",
    (1, 0): "GHCB registration", (1, 1): "page state change", (1, 2): "PVALIDATE",
    (1, 3): "not running at VMPL0", (1, 4): "CPUID", (1, 5): "CPUID hypervisor range",
    (1, 6): "secrets page", (1, 7): "no SVSM", (1, 8): "SVSM VMPL0", (1, 9): "SVSM CAA",
}


class GhcbMsrMessage(NamedTuple):
    """One decoded GHCB MSR value: protocol name, GHCBInfo, raw value and named fields."""

    name: str
    info: int
    value: int
    fields: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "info": self.info, "value": self.value, **self.fields}


def _reg_index(reg) -> int:
    if isinstance(reg, str):
        try:
            return CPUID_REGS.index(reg.lower())
        except ValueError:
            raise ValueError(f"CPUID register must be one of {CPUID_REGS}, not {reg!r}") from None
    if reg not in (0, 1, 2, 3):
        raise ValueError(f"CPUID register index must be 0..3, not {reg!r}")
    return reg


class GhcbMsr:
    """Encoders and the decoder of GHCB MSR protocol values (GHCB spec §2.3.1; docs/facts.md#facts-5).

    Every encoder returns the 64-bit value the sender writes into MSR
    0xC0010130; :meth:`decode` turns any 64-bit value back into a
    :class:`GhcbMsrMessage` (never raising: unknown codes decode as
    ``"UNKNOWN"``, a page-aligned non-zero value as ``"GHCB_GPA"``).
    """

    # -- guest -> hypervisor ----------------------------------------------
    @staticmethod
    def sev_info_request() -> int:
        return 0x002

    @staticmethod
    def cpuid_request(function: int, reg: int | str) -> int:
        """CPUID request for one register (0 EAX, 1 EBX, 2 ECX, 3 EDX; ECX input is 0)."""
        return ((function & 0xFFFFFFFF) << 32) | (_reg_index(reg) << 30) | 0x004

    @staticmethod
    def ap_reset_hold_request() -> int:
        return 0x006

    @staticmethod
    def pref_gpa_request() -> int:
        return 0x010

    @staticmethod
    def reg_gpa_request(gfn: int) -> int:
        return ((gfn & ((1 << 52) - 1)) << 12) | 0x012

    @staticmethod
    def psc_request(gfn: int, op: int) -> int:
        return ((op & 0xF) << 52) | ((gfn & ((1 << 40) - 1)) << 12) | 0x014

    @staticmethod
    def vmpl_request(vmpl: int) -> int:
        return ((vmpl & 0xFF) << 32) | 0x016

    @staticmethod
    def hv_features_request() -> int:
        return 0x080

    @staticmethod
    def term_request(reason_set: int, reason_code: int) -> int:
        """Termination request: GHCBData[3:0] = reason set, [11:4] = reason code."""
        return ((reason_code & 0xFF) << 16) | ((reason_set & 0xF) << 12) | 0x100

    @staticmethod
    def ghcb_gpa(gpa: int) -> int:
        """The value that selects the full GHCB page protocol: the page's GPA."""
        if gpa & GHCB_MSR_INFO_MASK:
            raise ValueError(f"a GHCB GPA must be page aligned, not {gpa:#x}")
        return gpa

    # -- hypervisor -> guest ----------------------------------------------
    @staticmethod
    def sev_info_response(max_version: int, min_version: int, c_bit: int) -> int:
        """``GHCB_MSR_SEV_INFO(max, min, cbit)``."""
        return (((max_version & 0xFFFF) << 48) | ((min_version & 0xFFFF) << 32)
                | ((c_bit & 0xFF) << 24) | 0x001)

    @staticmethod
    def cpuid_response(value: int, reg: int | str) -> int:
        """KVM's response: value in [63:32], the request's [31:12] kept (so the register echoes)."""
        return ((value & 0xFFFFFFFF) << 32) | (_reg_index(reg) << 30) | 0x005

    @staticmethod
    def ap_reset_hold_response(result: int) -> int:
        return ((result & ((1 << 52) - 1)) << 12) | 0x007

    @staticmethod
    def pref_gpa_response(gfn: int = GHCB_MSR_PREF_GPA_NONE) -> int:
        return ((gfn & ((1 << 52) - 1)) << 12) | 0x011

    @staticmethod
    def reg_gpa_response(gfn: int) -> int:
        return ((gfn & ((1 << 52) - 1)) << 12) | 0x013

    @staticmethod
    def psc_response(error: int = 0) -> int:
        return ((error & 0xFFFFFFFF) << 32) | 0x015

    @staticmethod
    def hv_features_response(features: int) -> int:
        return ((features & ((1 << 52) - 1)) << 12) | 0x081

    # -- decoding -----------------------------------------------------------
    @staticmethod
    def decode(value: int) -> GhcbMsrMessage:
        """Name and fields of any 64-bit GHCB MSR value."""
        value &= (1 << 64) - 1
        info = value & GHCB_MSR_INFO_MASK
        data = value >> GHCB_DATA_SHIFT
        if info == 0:
            if value == 0:
                return GhcbMsrMessage("NONE", 0, 0, {})
            return GhcbMsrMessage("GHCB_GPA", 0, value, {"gpa": value})
        name = MSR_CODES.get(info, "UNKNOWN")
        f: dict = {}
        if name == "SEV_INFO_RESP":
            f = {"max_version": value >> 48, "min_version": (value >> 32) & 0xFFFF,
                 "c_bit": (value >> 24) & 0xFF}
        elif name in ("CPUID_REQ", "CPUID_RESP"):
            reg = (value >> 30) & 3
            f = {"reg": reg, "reg_name": CPUID_REGS[reg]}
            f["function" if name == "CPUID_REQ" else "cpuid_value"] = value >> 32
        elif name == "AP_RESET_HOLD_RESP":
            f = {"result": data}
        elif name in ("PREF_GPA_RESP", "REG_GPA_REQ", "REG_GPA_RESP"):
            f = {"gfn": data}
        elif name == "PSC_REQ":
            f = {"gfn": (value >> 12) & ((1 << 40) - 1), "op": (value >> 52) & 0xF}
        elif name in ("PSC_RESP", "VMPL_RESP"):
            f = {"error": value >> 32}
        elif name == "VMPL_REQ":
            f = {"vmpl": (value >> 32) & 0xFF}
        elif name == "HV_FT_RESP":
            f = {"features": data}
        elif name == "TERM_REQ":
            rs, rc = (value >> 12) & 0xF, (value >> 16) & 0xFF
            f = {"reason_set": rs, "reason_code": rc,
                 "reason": TERM_REASON_NAMES.get((rs, rc), "unknown reason")}
        return GhcbMsrMessage(name, info, value, f)

