"""The VMCB: one 4 KiB page, control area at 0x000 and save area at 0x400.

Every offset comes from ONE table per area (``CONTROL_FIELDS``, ``SAVE_FIELDS``;
docs/facts.md#facts-1 and #facts-2, the kernel's ``struct vmcb_control_area`` /
``vmcb_save_area``).  Named accessors are generated from those tables, so
``vmcb.control.exit_code`` and ``vmcb.raw[0x70:0x78]`` are the same bytes.

The page is a ``bytearray`` whose buffer the CPU core maps into the emulated
machine's physical address space: the emulated VMRUN reads the intercept
vectors and the guest state from exactly these bytes.
"""

from __future__ import annotations

import struct

from ..x86 import Segment

VMCB_SIZE = 4096
SAVE_AREA_OFFSET = 0x400

# (name, offset, size) -- docs/facts.md#facts-1 (control area)
CONTROL_FIELDS = (
    ("intercept_cr", 0x000, 4),
    ("intercept_dr", 0x004, 4),
    ("intercept_exceptions", 0x008, 4),
    ("intercept_word3", 0x00C, 4),
    ("intercept_word4", 0x010, 4),
    ("intercept_word5", 0x014, 4),
    ("pause_filter_thresh", 0x03C, 2),
    ("pause_filter_count", 0x03E, 2),
    ("iopm_base_pa", 0x040, 8),
    ("msrpm_base_pa", 0x048, 8),
    ("tsc_offset", 0x050, 8),
    ("asid", 0x058, 4),
    ("tlb_ctl", 0x05C, 1),
    ("int_ctl", 0x060, 4),
    ("int_vector", 0x064, 4),
    ("int_state", 0x068, 4),
    ("exit_code", 0x070, 8),
    ("exit_info_1", 0x078, 8),
    ("exit_info_2", 0x080, 8),
    ("exit_int_info", 0x088, 4),
    ("exit_int_info_err", 0x08C, 4),
    ("nested_ctl", 0x090, 8),
    ("avic_vapic_bar", 0x098, 8),
    ("ghcb_gpa", 0x0A0, 8),
    ("event_inj", 0x0A8, 4),
    ("event_inj_err", 0x0AC, 4),
    ("nested_cr3", 0x0B0, 8),
    ("virt_ext", 0x0B8, 8),
    ("clean", 0x0C0, 4),
    ("next_rip", 0x0C8, 8),
    ("insn_len", 0x0D0, 1),
    ("insn_bytes", 0x0D1, 15),
    ("avic_backing_page", 0x0E0, 8),
    ("avic_logical_id", 0x0F0, 8),
    ("avic_physical_id", 0x0F8, 8),
    ("vmsa_pa", 0x108, 8),
    ("bus_lock_counter", 0x120, 2),
    ("allowed_sev_features", 0x138, 8),
    ("guest_sev_features", 0x140, 8),
    ("reserved_sw", 0x3E0, 32),
)

SEGMENT_FIELDS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")

# (name, offset within the save area, size) -- docs/facts.md#facts-2; segments are 16-byte records
SAVE_FIELDS = tuple((n, 0x10 * i, 16) for i, n in enumerate(SEGMENT_FIELDS)) + (
    ("vmpl", 0x0CA, 1),
    ("cpl", 0x0CB, 1),
    ("efer", 0x0D0, 8),
    ("cr4", 0x148, 8),
    ("cr3", 0x150, 8),
    ("cr0", 0x158, 8),
    ("dr7", 0x160, 8),
    ("dr6", 0x168, 8),
    ("rflags", 0x170, 8),
    ("rip", 0x178, 8),
    ("rsp", 0x1D8, 8),
    ("s_cet", 0x1E0, 8),
    ("ssp", 0x1E8, 8),
    ("isst_addr", 0x1F0, 8),
    ("rax", 0x1F8, 8),
    ("star", 0x200, 8),
    ("lstar", 0x208, 8),
    ("cstar", 0x210, 8),
    ("sfmask", 0x218, 8),
    ("kernel_gs_base", 0x220, 8),
    ("sysenter_cs", 0x228, 8),
    ("sysenter_esp", 0x230, 8),
    ("sysenter_eip", 0x238, 8),
    ("cr2", 0x240, 8),
    ("g_pat", 0x268, 8),
    ("dbgctl", 0x270, 8),
    ("br_from", 0x278, 8),
    ("br_to", 0x280, 8),
    ("last_excp_from", 0x288, 8),
    ("last_excp_to", 0x290, 8),
    ("spec_ctrl", 0x2E0, 8),
)
SAVE_AREA_SIZE = 0x2E8  # 744 bytes (docs/facts.md#facts-2)

_INT = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}
_SEG = struct.Struct("<HHIQ")  # selector, attrib, limit, base (struct vmcb_seg)


class VmcbSegment:
    """A 16-byte ``vmcb_seg`` record inside the page (a live view, not a copy)."""

    __slots__ = ("_buf", "_off")

    def __init__(self, buf: bytearray, off: int):
        self._buf, self._off = buf, off

    def _get(self):
        return _SEG.unpack_from(self._buf, self._off)

    def _set(self, i, v):
        f = list(self._get())
        f[i] = v
        _SEG.pack_into(self._buf, self._off, *f)

    selector = property(lambda s: s._get()[0], lambda s, v: s._set(0, v & 0xFFFF))
    attrib = property(lambda s: s._get()[1], lambda s, v: s._set(1, v & 0xFFFF))
    limit = property(lambda s: s._get()[2], lambda s, v: s._set(2, v & 0xFFFFFFFF))
    base = property(lambda s: s._get()[3], lambda s, v: s._set(3, v & (2**64 - 1)))

    def load(self, seg: Segment) -> None:
        """Store a ``kvm_segment`` the way ``svm_set_segment`` does (attrib compressed)."""
        _SEG.pack_into(self._buf, self._off, seg.selector & 0xFFFF, seg.attrib, seg.limit & 0xFFFFFFFF,
                       seg.base & (2**64 - 1))

    def to_segment(self) -> Segment:
        sel, attrib, limit, base = self._get()
        return Segment.from_attrib(sel, attrib, limit, base)

    def __repr__(self):
        sel, attrib, limit, base = self._get()
        return f"VmcbSegment(selector={sel:#x}, attrib={attrib:#x}, limit={limit:#x}, base={base:#x})"


def _make_area(name: str, fields, base: int):
    """Build an accessor class whose properties read/write the page at ``base + offset``."""
    ns = {"__slots__": ("_buf",), "FIELDS": fields, "BASE": base}

    def init(self, buf):
        self._buf = buf

    ns["__init__"] = init
    for fname, off, size in fields:
        absoff = base + off
        if fname in SEGMENT_FIELDS and size == 16:
            ns[fname] = property(lambda self, o=absoff: VmcbSegment(self._buf, o))
        elif size in _INT:
            st = _INT[size]
            mask = (1 << (8 * size)) - 1
            ns[fname] = property(lambda self, o=absoff, st=st: st.unpack_from(self._buf, o)[0],
                                 lambda self, v, o=absoff, st=st, m=mask: st.pack_into(self._buf, o, v & m))
        else:
            ns[fname] = property(lambda self, o=absoff, n=size: bytes(self._buf[o:o + n]),
                                 lambda self, v, o=absoff, n=size: self._buf.__setitem__(
                                     slice(o, o + n), bytes(v).ljust(n, b"\0")[:n]))

    def to_dict(self):
        out = {}
        for fname, _off, _size in fields:
            v = getattr(self, fname)
            if isinstance(v, VmcbSegment):
                v = {"selector": v.selector, "attrib": v.attrib, "limit": v.limit, "base": v.base}
            elif isinstance(v, bytes):
                v = v.hex()
            out[fname] = v
        return out

    ns["to_dict"] = to_dict
    return type(name, (), ns)


VmcbControl = _make_area("VmcbControl", CONTROL_FIELDS, 0)
VmcbSave = _make_area("VmcbSave", SAVE_FIELDS, SAVE_AREA_OFFSET)


def field_offset(area: str, name: str) -> int:
    """Absolute offset of a named field in the page (``area`` is 'control' or 'save')."""
    fields, base = (CONTROL_FIELDS, 0) if area == "control" else (SAVE_FIELDS, SAVE_AREA_OFFSET)
    for fname, off, _size in fields:
        if fname == name:
            return base + off
    raise KeyError(f"no VMCB {area} field {name!r}")


class Vmcb:
    """One VMCB page: ``raw`` is the 4 KiB bytearray, ``control``/``save`` name its fields."""

    __slots__ = ("raw", "control", "save")

    def __init__(self):
        self.raw = bytearray(VMCB_SIZE)
        self.control = VmcbControl(self.raw)
        self.save = VmcbSave(self.raw)

    def to_dict(self) -> dict:
        return {"control": self.control.to_dict(), "save": self.save.to_dict()}
