"""SNP page-state changes as KVM handles them: the GHCB MSR protocol and the PSC descriptor.

Following arch/x86/kvm/svm/sev.c (``snp_begin_psc_msr``/``snp_complete_psc_msr``,
``snp_begin_psc``/``snp_complete_one_psc``/``__snp_complete_one_psc``,
``setup_vmgexit_scratch``, ``sev_es_validate_vmgexit``) and the constants of
``arch/x86/include/asm/sev-common.h`` and ``include/uapi/linux/kvm_para.h``:

* the guest asks through the GHCB MSR (0x014: GFN in bits 51:12, operation in
  55:52, 1 private / 2 shared) or through NAE event 0x80000010 with a PSC
  descriptor in the GHCB's shared buffer (header cur_entry/end_entry, entries
  of cur_page:12, gfn:40, operation:4, pagesize:1);
* KVM checks the request and turns it into ``KVM_EXIT_HYPERCALL`` with
  ``nr = KVM_HC_MAP_GPA_RANGE`` (args: GPA, pages, ENCRYPTED/DECRYPTED | page
  size), merging adjacent entries with the same operation into one exit;
* the VMM flips ``KVM_SET_MEMORY_ATTRIBUTES``, KVM updates the RMP
  (``kvm_gmem`` invalidation makes the pages shared, the next fault makes
  them private -- :func:`apply_map_gpa_range` does both at once), and the
  guest's next step completes with the result: MSR 0x015 (bit 63 set on
  error), or SW_EXITINFO2 = 0, ``VMGEXIT_PSC_ERROR_INVALID_HDR``
  ((1 << 32) | 1), ``..._INVALID_ENTRY`` ((1 << 32) | 2) or ``..._GENERIC``
  (0x100 << 32), with the descriptor's cur_entry / cur_page advanced.
"""

from __future__ import annotations

import dataclasses
import struct

from ..abi import KVM_HC_MAP_GPA_RANGE
from ..sev.ghcb import (  # the GHCB's own numbers, defined once there
    GHCB_ERR_INVALID_SCRATCH_AREA,
    GHCB_ERR_MISSING_INPUT,
    GHCB_MSR_INFO_MASK,
)
from ..sev.ghcb import SHARED_BUFFER_END as GHCB_SHARED_BUFFER_END
from ..sev.ghcb import SHARED_BUFFER_OFFSET as GHCB_SHARED_BUFFER

# GHCB MSR protocol (sev-common.h)
GHCB_MSR_PSC_REQ = 0x014
GHCB_MSR_PSC_RESP = 0x015
GHCB_MSR_PSC_RESP_ERROR = (1 << 63) | GHCB_MSR_PSC_RESP
SNP_PAGE_STATE_PRIVATE = 1
SNP_PAGE_STATE_SHARED = 2

# The NAE event (sev-common.h; its exit code is sev.ghcb.SVM_VMGEXIT_PSC)
VMGEXIT_PSC_MAX_COUNT = 253
VMGEXIT_PSC_ERROR_GENERIC = 0x100 << 32
VMGEXIT_PSC_ERROR_INVALID_HDR = (1 << 32) | 1
VMGEXIT_PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2
VMGEXIT_PSC_OP_PRIVATE = 1
VMGEXIT_PSC_OP_SHARED = 2
PSC_HDR = struct.Struct("<HHI")
PSC_ENTRY_SIZE = 8

# KVM_HC_MAP_GPA_RANGE's attributes (kvm_para.h; the number is abi.KVM_HC_MAP_GPA_RANGE)
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1 << 0
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 1 << 1
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0 << 4


@dataclasses.dataclass(frozen=True)
class MapGpaRange:
    """``KVM_EXIT_HYPERCALL``, ``nr = KVM_HC_MAP_GPA_RANGE``: args[0..2]."""

    gpa: int
    npages: int
    attrs: int

    nr = KVM_HC_MAP_GPA_RANGE

    @property
    def private(self) -> bool:
        return bool(self.attrs & KVM_MAP_GPA_RANGE_ENCRYPTED)

    @property
    def args(self) -> tuple[int, int, int]:
        return self.gpa, self.npages, self.attrs


@dataclasses.dataclass(frozen=True)
class SevTerminate:
    """``KVM_EXIT_SYSTEM_EVENT`` type ``KVM_SYSTEM_EVENT_SEV_TERM``, data[0] = the GHCB MSR."""

    ghcb_msr: int


@dataclasses.dataclass(frozen=True)
class GhcbResult:
    """What the guest finds when it resumes: SW_EXITINFO1/2 (NAE) or the GHCB MSR."""

    sw_exit_info_1: int = 0
    sw_exit_info_2: int = 0


# -- the MSR protocol -------------------------------------------------------------------

def psc_msr_request(gfn: int, op: int) -> int:
    """``GHCB_MSR_PSC_REQ_GFN(gfn, op)``."""
    return ((op & 0xF) << 52) | ((gfn & ((1 << 40) - 1)) << 12) | GHCB_MSR_PSC_REQ


def begin_psc_msr(ghcb_msr: int, *, snp_guest: bool = True,
                  exit_on_map_gpa_range: bool = True) -> MapGpaRange | SevTerminate | int:
    """``GHCB_MSR_PSC_REQ`` in ``sev_handle_vmgexit_msr_protocol``: the exit to userspace,
    a termination (not an SNP guest), or the new MSR value when KVM answers at once."""
    if not snp_guest:
        return SevTerminate(ghcb_msr)
    gfn = (ghcb_msr & ((1 << 52) - 1)) >> 12
    op = (ghcb_msr >> 52) & 0xF
    if op not in (SNP_PAGE_STATE_PRIVATE, SNP_PAGE_STATE_SHARED) or not exit_on_map_gpa_range:
        return GHCB_MSR_PSC_RESP_ERROR
    attrs = (KVM_MAP_GPA_RANGE_ENCRYPTED if op == SNP_PAGE_STATE_PRIVATE
             else KVM_MAP_GPA_RANGE_DECRYPTED) | KVM_MAP_GPA_RANGE_PAGE_SZ_4K
    return MapGpaRange(gfn << 12, 1, attrs)


def complete_psc_msr(hypercall_ret: int) -> int:
    """``snp_complete_psc_msr``: the GHCB MSR the guest reads back."""
    return GHCB_MSR_PSC_RESP_ERROR if hypercall_ret else GHCB_MSR_PSC_RESP


# -- the other SNP requests of the MSR protocol (sev_handle_vmgexit_msr_protocol) -----------

GHCB_MSR_PREF_GPA_REQ = 0x010
GHCB_MSR_PREF_GPA_RESP = 0x011
GHCB_MSR_PREF_GPA_NONE = 0xFFFFFFFFFFFFF  # GHCBData[63:12]: no preference
GHCB_MSR_REG_GPA_REQ = 0x012
GHCB_MSR_REG_GPA_RESP = 0x013
_GPA_VALUE_MASK = (1 << 52) - 1  # GENMASK_ULL(51, 0) at bit 12


@dataclasses.dataclass
class SnpGhcbState:
    """Per-vCPU: the GHCB GPA the guest registered (``ghcb_registered_gpa``)."""

    registered_gpa: int | None = None

    def check_registered(self, ghcb_gpa: int) -> None:
        """``sev_handle_vmgexit``: an SNP guest's GHCB must be the registered one, else
        KVM_RUN fails with EINVAL (raised here as a SevError naming KVM_RUN)."""
        if self.registered_gpa != ghcb_gpa:
            import errno

            from ..errors import SevError

            raise SevError("KVM_RUN", errno.EINVAL, None,
                           f"vmgexit: GHCB GPA {ghcb_gpa:#x} is not registered"
                           + (f" (registered: {self.registered_gpa:#x})"
                              if self.registered_gpa is not None else ""))


def snp_msr_protocol(ghcb_msr: int, state: SnpGhcbState, *, snp_guest: bool = True,
                     exit_on_map_gpa_range: bool = True) -> int | MapGpaRange | SevTerminate:
    """KVM's answer to the SNP requests of the GHCB MSR protocol (0x010, 0x012, 0x014):
    the new MSR value, a KVM_HC_MAP_GPA_RANGE exit, or a termination for a non-SNP
    guest.  Other codes are not SNP requests: the MSR is returned unchanged."""
    info = ghcb_msr & GHCB_MSR_INFO_MASK
    if info not in (GHCB_MSR_PREF_GPA_REQ, GHCB_MSR_REG_GPA_REQ, GHCB_MSR_PSC_REQ):
        return ghcb_msr
    if not snp_guest:
        return SevTerminate(ghcb_msr)
    if info == GHCB_MSR_PREF_GPA_REQ:
        return (GHCB_MSR_PREF_GPA_NONE << 12) | GHCB_MSR_PREF_GPA_RESP
    if info == GHCB_MSR_REG_GPA_REQ:
        gfn = (ghcb_msr >> 12) & _GPA_VALUE_MASK
        state.registered_gpa = gfn << 12
        return (gfn << 12) | GHCB_MSR_REG_GPA_RESP
    return begin_psc_msr(ghcb_msr, exit_on_map_gpa_range=exit_on_map_gpa_range)


# -- the descriptor ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PscEntry:
    gfn: int
    op: int
    huge: bool = False
    cur_page: int = 0

    def pack(self) -> int:
        return ((self.cur_page & 0xFFF) | (self.gfn & ((1 << 40) - 1)) << 12
                | (self.op & 0xF) << 52 | int(self.huge) << 56)

    @classmethod
    def unpack(cls, raw: int) -> PscEntry:
        return cls(gfn=(raw >> 12) & ((1 << 40) - 1), op=(raw >> 52) & 0xF,
                   huge=bool(raw >> 56 & 1), cur_page=raw & 0xFFF)


def psc_descriptor(entries, cur_entry: int = 0, end_entry: int | None = None) -> bytes:
    """The bytes a guest puts in the scratch area."""
    entries = list(entries)
    end = len(entries) - 1 if end_entry is None else end_entry
    return PSC_HDR.pack(cur_entry, end, 0) + b"".join(
        struct.pack("<Q", e.pack() if isinstance(e, PscEntry) else e) for e in entries)


def scratch_area(ghcb_gpa: int, sw_scratch: int | None, min_len: int = PSC_HDR.size,
                 ghcb_version: int = 2) -> tuple[int, int] | GhcbResult:
    """``setup_vmgexit_scratch`` for a GHCB v2 guest: (offset in the GHCB page, length) of the
    scratch area, or the bad-input result."""
    bad = GhcbResult(2, GHCB_ERR_INVALID_SCRATCH_AREA)
    if not sw_scratch:
        return GhcbResult(2, GHCB_ERR_MISSING_INPUT)  # sev_es_validate_vmgexit
    end = sw_scratch + min_len
    if (sw_scratch & ~0xFFF) != ghcb_gpa:
        return bad  # GHCB v2: the scratch area must be inside the GHCB
    begin, limit = ghcb_gpa + GHCB_SHARED_BUFFER, ghcb_gpa + GHCB_SHARED_BUFFER_END
    if sw_scratch < begin or end > limit:
        return bad
    return sw_scratch - ghcb_gpa, limit - sw_scratch


class PscRequest:
    """One NAE PSC event in flight on a vCPU (``svm->sev_es.psc`` plus the guest's buffer).

    ``buffer`` is the guest's scratch area (a bytearray KVM reads and writes
    back: cur_entry and each entry's cur_page advance as ranges complete).
    """

    def __init__(self, buffer: bytearray, *, exit_on_map_gpa_range: bool = True):
        self.buf = buffer
        self.sa_len = len(buffer)
        self.exit_ok = exit_on_map_gpa_range
        self.cur_idx = 0
        self.batch_size = 0
        self.result: int | None = None  # SW_EXITINFO2 once complete
        self.exits = 0

    # buffer access, as READ_ONCE of the guest's copy
    def _hdr(self) -> tuple[int, int]:
        cur, end, _ = PSC_HDR.unpack_from(self.buf)
        return cur, end

    def _entry(self, idx: int) -> PscEntry:
        off = PSC_HDR.size + idx * PSC_ENTRY_SIZE
        return PscEntry.unpack(struct.unpack_from("<Q", self.buf, off)[0])

    def _set_entry_cur_page(self, idx: int, cur_page: int) -> None:
        off = PSC_HDR.size + idx * PSC_ENTRY_SIZE
        raw = struct.unpack_from("<Q", self.buf, off)[0]
        struct.pack_into("<Q", self.buf, off, (raw & ~0xFFF) | cur_page)

    def _set_cur_entry(self, value: int) -> None:
        struct.pack_into("<H", self.buf, 0, value & 0xFFFF)

    def _finish(self, ret: int) -> GhcbResult:
        self.batch_size = 0
        self.result = ret
        return GhcbResult(0, ret)  # "no action" in EXITINFO1, the PSC status in EXITINFO2

    def begin(self) -> MapGpaRange | GhcbResult:
        """``snp_begin_psc``: the next KVM_HC_MAP_GPA_RANGE exit, or the final result."""
        if not self.exit_ok:
            return self._finish(VMGEXIT_PSC_ERROR_GENERIC)
        max_nr = (self.sa_len - PSC_HDR.size) // PSC_ENTRY_SIZE
        if max_nr > VMGEXIT_PSC_MAX_COUNT:
            return self._finish(VMGEXIT_PSC_ERROR_GENERIC)
        while True:  # next_range
            idx_start, idx_end = self._hdr()
            if idx_end >= max_nr:
                return self._finish(VMGEXIT_PSC_ERROR_INVALID_HDR)
            idx = idx_start
            while idx <= idx_end:
                start = self._entry(idx)
                gfn, huge = start.gfn, start.huge
                npages = 512 if huge else 1
                if start.cur_page > npages or gfn % npages:
                    return self._finish(VMGEXIT_PSC_ERROR_INVALID_ENTRY)
                if start.cur_page:  # a partly done 2 MiB entry continues as 4 KiB pages
                    npages -= start.cur_page
                    gfn += start.cur_page
                    huge = False
                if npages:
                    break
                cur, _ = self._hdr()
                self._set_cur_entry(cur + 1)
                idx += 1
            if idx > idx_end:
                return self._finish(0)
            self.cur_idx, self.batch_size = idx, 1
            while idx + 1 <= idx_end:  # merge adjacent ranges with the same operation
                idx += 1
                e = self._entry(idx)
                # sev.c compares with the entry's own GFN plus the pages so far
                if (e.op != start.op or e.gfn != start.gfn + npages or e.cur_page
                        or e.huge != huge):
                    break
                self.batch_size += 1
                npages += 512 if huge else 1
            if start.op in (VMGEXIT_PSC_OP_PRIVATE, VMGEXIT_PSC_OP_SHARED):
                attrs = (KVM_MAP_GPA_RANGE_ENCRYPTED if start.op == VMGEXIT_PSC_OP_PRIVATE
                         else KVM_MAP_GPA_RANGE_DECRYPTED)
                attrs |= KVM_MAP_GPA_RANGE_PAGE_SZ_2M if start.huge else KVM_MAP_GPA_RANGE_PAGE_SZ_4K
                self.exits += 1
                return MapGpaRange(gfn << 12, npages, attrs)
            # other operations (PSMASH/UNSMASH) count as done without an exit
            self._complete_batch()

    def _complete_batch(self) -> None:
        """``__snp_complete_one_psc``."""
        idx = self.cur_idx
        while self.batch_size:
            self._set_entry_cur_page(idx, 512 if self._entry(idx).huge else 1)
            self.batch_size -= 1
            idx += 1
        self._set_cur_entry(idx)

    def complete(self, hypercall_ret: int) -> MapGpaRange | GhcbResult:
        """``snp_complete_one_psc``: after the VMM answered the exit."""
        if hypercall_ret:
            return self._finish(VMGEXIT_PSC_ERROR_GENERIC)
        self._complete_batch()
        return self.begin()


def handle_psc(request: PscRequest, vmm) -> GhcbResult:
    """Drive a request to its end: ``vmm(MapGpaRange) -> hypercall.ret`` answers each exit."""
    step = request.begin()
    while isinstance(step, MapGpaRange):
        step = request.complete(vmm(step))
    return step


def apply_map_gpa_range(vm, req: MapGpaRange) -> int:
    """The VMM's answer plus KVM's RMP work, for a :class:`~kvmharness.snp.launch.KvmSnpVm`.

    The VMM converts the range with KVM_SET_MEMORY_ATTRIBUTES (0 = done,
    else an error for hypercall.ret).  KVM then updates the RMP: pages made
    shared go back to the hypervisor (``rmp_make_shared``, after PSMASH of a
    2 MiB entry), pages made private are assigned to the guest at their GPA,
    not validated (``rmp_make_private(..., immutable=false)`` when the guest
    next touches them; done here at once).
    """
    from ..errors import SevError

    try:
        vm.set_memory_attributes(req.gpa, req.npages * 4096, req.private)
    except SevError:
        return 22  # EINVAL for hypercall.ret
    rmp = vm.fw.rmp
    for i in range(req.npages):
        gfn = (req.gpa >> 12) + i
        pfn = vm.gmem_pfn(gfn)
        assigned, size = rmp.lookup(pfn)
        if req.private:
            if not assigned:
                rmp.make_private(pfn, gfn << 12, False, vm.asid, False)
        elif assigned:
            if size:
                rmp.psmash(pfn << 12 & ~((1 << 21) - 1))
            rmp.make_shared(pfn)
    return 0


__all__ = [
    "GHCB_MSR_PSC_REQ", "GHCB_MSR_PSC_RESP", "GHCB_MSR_PSC_RESP_ERROR", "GhcbResult",
    "KVM_HC_MAP_GPA_RANGE", "KVM_MAP_GPA_RANGE_ENCRYPTED", "MapGpaRange", "PscEntry",
    "PscRequest", "SevTerminate", "VMGEXIT_PSC_ERROR_GENERIC", "VMGEXIT_PSC_ERROR_INVALID_ENTRY",
    "VMGEXIT_PSC_ERROR_INVALID_HDR", "apply_map_gpa_range", "begin_psc_msr", "complete_psc_msr",
    "SnpGhcbState", "handle_psc", "psc_descriptor", "psc_msr_request", "scratch_area",
    "snp_msr_protocol",
]
