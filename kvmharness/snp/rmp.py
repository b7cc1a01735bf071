"""The Reverse Map Table (RMP) of SEV-SNP, as a model.

Sources: AMD64 APM vol. 2 §15.36.3-15.36.11 (Table 15-34 the fields of an RMP
entry, Table 15-35 page owners, Table 15-36 VMPL permission masks, Table 15-39
the RMP access checks and their faults, Table 15-40 the PVALIDATE/RMPADJUST
size-mismatch combinations, §15.36.11 PSMASH), APM vol. 3 PVALIDATE, RMPADJUST,
RMPUPDATE, PSMASH (return codes as the kernel defines them:
``PVALIDATE_FAIL_INPUT`` 1, ``PVALIDATE_FAIL_SIZEMISMATCH`` 6,
``RMPUPDATE_FAIL_OVERLAP`` 4, ``PSMASH_FAIL_INUSE`` 3, and
``struct rmp_state``), and how KVM uses RMPUPDATE/PSMASH
(``rmp_make_private``, ``rmp_make_shared``, ``snp_rmptable_psmash`` in
arch/x86/kvm/svm/sev.c and arch/x86/virt/svm/sev.c).

One :class:`RmpEntry` per 4 KiB system-physical page.  A 2 MiB RMP entry lives
in the 2 MiB-aligned page's entry (``page_size`` 1) and is authoritative for
the 511 pages after it while it is assigned; :meth:`Rmp.effective` resolves it.

Guest-side instructions (:meth:`Rmp.pvalidate`, :meth:`Rmp.rmpadjust`) take
the GPA the guest's page tables produced and the SPA the nested page tables
map it to, the way the CPU sees them after both walks; their faults are
exceptions (:class:`NestedPageFault` = #VMEXIT(NPF) with EXITINFO1,
:class:`VcException` = #VC with its error code, :class:`GuestGP`/
:class:`GuestUD`), their results :class:`InstrResult` (rAX and rFLAGS.CF).

Choices the sources we hold do not settle are marked "(model)".
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from ..abi import SVM_EXIT_NPF

PAGE_SIZE = 4096
PAGES_PER_2M = 512
SIZE_2M = PAGE_SIZE * PAGES_PER_2M


class RmpPageSize(enum.IntEnum):
    SIZE_4K = 0
    SIZE_2M = 1


class Perm(enum.IntFlag):
    """VMPL permission mask bits (APM Table 15-36)."""

    READ = 1 << 0
    WRITE = 1 << 1
    EXEC_USER = 1 << 2
    EXEC_SUPER = 1 << 3
    SSS = 1 << 4  # supervisor shadow stack (VmplSSS)


PERM_RESERVED = 0xE0  # bits 7:5, SBZ
# "RMPUPDATE ... enables full permissions for VMPL0 and disables all other VMPLs"
VMPL0_FULL = int(Perm.READ | Perm.WRITE | Perm.EXEC_USER | Perm.EXEC_SUPER | Perm.SSS)
NUM_VMPLS = 4

# Return codes in rAX.
SUCCESS = 0
FAIL_INPUT = 1
FAIL_PERMISSION = 2
FAIL_INUSE = 3
FAIL_OVERLAP = 4  # RMPUPDATE
FAIL_BADADDR = 4  # PSMASH (model: the entry is not a 2 MiB entry)
FAIL_SIZEMISMATCH = 6

RMPADJUST_VMSA_PAGE_BIT = 1 << 16

# #VMEXIT(NPF) EXITINFO1 bits (docs/facts.md#facts-1i; APM §15.36.10)
PFERR_PRESENT = 1 << 0
PFERR_WRITE = 1 << 1
PFERR_USER = 1 << 2
PFERR_FETCH = 1 << 4
PFERR_RMP = 1 << 31
PFERR_GUEST_FINAL = 1 << 32
PFERR_GUEST_PAGE = 1 << 33
PFERR_GUEST_ENC = 1 << 34
PFERR_GUEST_SIZEM = 1 << 35
PFERR_GUEST_VMPL = 1 << 36

SVM_EXIT_PAGE_NOT_VALIDATED = 0x404  # the #VC error code (APM §15.36.10)


class RmpFault(Exception):
    """Base of the faults an RMP check raises."""


class NestedPageFault(RmpFault):
    """#VMEXIT(NPF): ``error_code`` is EXITINFO1, ``gpa`` EXITINFO2."""

    exit_code = SVM_EXIT_NPF

    def __init__(self, gpa: int, error_code: int, reason: str):
        self.gpa = gpa
        self.error_code = error_code
        self.reason = reason
        super().__init__(f"#NPF at GPA {gpa:#x}, EXITINFO1 {error_code:#x}: {reason}")


class VcException(RmpFault):
    """#VC in the guest; ``error_code`` 0x404 = PAGE_NOT_VALIDATED, CR2 = the guest VA."""

    def __init__(self, error_code: int, cr2: int | None, reason: str):
        self.error_code = error_code
        self.cr2 = cr2
        self.reason = reason
        super().__init__(f"#VC({error_code:#x}) CR2={cr2 if cr2 is None else hex(cr2)}: {reason}")


class HostRmpFault(RmpFault):
    """#PF in the host with the RMP bit (bit 31) in the error code."""

    def __init__(self, spa: int, error_code: int, reason: str):
        self.spa = spa
        self.error_code = error_code
        self.reason = reason
        super().__init__(f"host #PF at SPA {spa:#x}, error code {error_code:#x}: {reason}")


class GuestGP(RmpFault):
    """#GP(0) in the guest (PVALIDATE/RMPADJUST at CPL > 0)."""


class GuestUD(RmpFault):
    """#UD in the guest (PVALIDATE/RMPADJUST outside an SNP-active guest)."""


class RmpUpdateError(RuntimeError):
    """RMPUPDATE/PSMASH returned non-zero where KVM treats that as a bug."""

    def __init__(self, what: str, code: int):
        self.code = code
        super().__init__(f"{what} failed with {code}")


@dataclasses.dataclass
class RmpEntry:
    """APM Table 15-34."""

    assigned: bool = False
    page_size: int = RmpPageSize.SIZE_4K
    immutable: bool = False
    gpa: int = 0
    asid: int = 0
    vmsa: bool = False
    validated: bool = False
    perms: list = dataclasses.field(default_factory=lambda: [0] * NUM_VMPLS)

    def copy(self) -> "RmpEntry":
        return dataclasses.replace(self, perms=list(self.perms))

    @property
    def owner(self) -> str:
        """Table 15-35: hypervisor, guest or firmware (AMD-SP)."""
        if not self.assigned:
            return "hypervisor"
        return "guest" if self.asid else "firmware"


@dataclasses.dataclass(frozen=True)
class RmpState:
    """RMPUPDATE's input (``struct rmp_state``, 16 bytes packed)."""

    gpa: int = 0
    assigned: bool = False
    page_size: int = RmpPageSize.SIZE_4K
    immutable: bool = False
    asid: int = 0

    FORMAT = "<QBBBBI"

    def pack(self) -> bytes:
        return struct.pack(self.FORMAT, self.gpa, int(self.assigned), int(self.page_size),
                           int(self.immutable), 0, self.asid)

    @classmethod
    def unpack(cls, raw: bytes) -> "RmpState":
        gpa, assigned, size, immutable, _, asid = struct.unpack(cls.FORMAT, raw)
        return cls(gpa, bool(assigned), size, bool(immutable), asid)


@dataclasses.dataclass(frozen=True)
class GuestContext:
    """Who executes: the guest's ASID, whether it is SNP-active, its VMPL and CPL."""

    asid: int
    snp_active: bool = True
    vmpl: int = 0
    cpl: int = 0


@dataclasses.dataclass(frozen=True)
class InstrResult:
    """rAX and rFLAGS.CF after PVALIDATE/RMPADJUST."""

    rax: int
    cf: bool = False

    @property
    def no_change(self) -> bool:
        """PVALIDATE's "validated bit not updated" case (rAX 0, CF 1)."""
        return self.rax == SUCCESS and self.cf


class Rmp:
    """The RMP over system-physical pages [0, covered_pages)."""

    def __init__(self, covered_pages: int):
        if covered_pages <= 0:
            raise ValueError("the RMP covers at least one page")
        self.covered_pages = covered_pages
        self._entries: dict[int, RmpEntry] = {}

    # -- lookup ----------------------------------------------------------------
    def covered(self, pfn: int) -> bool:
        return 0 <= pfn < self.covered_pages

    def raw(self, pfn: int) -> RmpEntry:
        """The 4 KiB entry itself (created hypervisor-owned on first use)."""
        if not self.covered(pfn):
            raise IndexError(f"PFN {pfn:#x} is beyond the RMP")
        e = self._entries.get(pfn)
        if e is None:
            e = self._entries[pfn] = RmpEntry()
        return e

    def effective(self, pfn: int) -> tuple[RmpEntry, int]:
        """(the authoritative entry for ``pfn``, its PFN): the 2 MiB entry when one covers it."""
        head = pfn & ~(PAGES_PER_2M - 1)
        h = self._entries.get(head)
        if h is not None and h.assigned and h.page_size == RmpPageSize.SIZE_2M:
            return h, head
        return self.raw(pfn), pfn

    def entry_gpa(self, pfn: int) -> int:
        """The GPA the RMP records for this 4 KiB page (a 2 MiB entry's GPA plus the offset)."""
        e, head = self.effective(pfn)
        return e.gpa + (pfn - head) * PAGE_SIZE

    def lookup(self, pfn: int) -> tuple[bool, int]:
        """KVM's ``snp_lookup_rmpentry``: (assigned, RMP page size)."""
        e, _ = self.effective(pfn)
        return e.assigned, e.page_size

    def hypervisor_owned(self, pfn: int, size_2m: bool = False) -> bool:
        """The Hypervisor-Owned check (§15.36.10): not covered, or every 4 KiB entry unassigned."""
        pfns = range(pfn & ~(PAGES_PER_2M - 1), (pfn & ~(PAGES_PER_2M - 1)) + PAGES_PER_2M) \
            if size_2m else (pfn,)
        for p in pfns:
            if self.covered(p) and self.effective(p)[0].assigned:
                return False
        return True

    # -- host instructions ------------------------------------------------------
    def rmpupdate(self, spa: int, state: RmpState) -> int:
        """RMPUPDATE: rAX = SPA, the new state; returns rAX (0 or FAIL_*).

        Clears Validated and VMSA; VMPL0 gets full permissions on an assigned
        page, the other VMPLs none (§15.36.7).  Immutable entries belong to the
        AMD-SP (FAIL_PERMISSION); a 2 MiB update over assigned 4 KiB entries,
        or a 4 KiB update inside an assigned 2 MiB entry, overlaps.
        """
        pfn = spa >> 12
        big = state.page_size == RmpPageSize.SIZE_2M
        if spa & 0xFFF or not self.covered(pfn) or state.page_size not in (0, 1):
            return FAIL_INPUT
        if big and (pfn % PAGES_PER_2M or not self.covered(pfn + PAGES_PER_2M - 1)):
            return FAIL_INPUT
        cur, head = self.effective(pfn)
        if cur.immutable:
            return FAIL_PERMISSION
        if head != pfn or (cur.page_size == RmpPageSize.SIZE_2M and cur.assigned and not big):
            return FAIL_OVERLAP  # a 4 KiB change inside a 2 MiB guest page: PSMASH first
        if big:
            for p in range(pfn + 1, pfn + PAGES_PER_2M):
                sub = self._entries.get(p)
                if sub is not None and sub.immutable:
                    return FAIL_PERMISSION
                if sub is not None and sub.assigned:
                    return FAIL_OVERLAP
        new = RmpEntry(assigned=state.assigned, page_size=state.page_size,
                       immutable=state.immutable, gpa=state.gpa & ~0xFFF, asid=state.asid)
        if state.assigned:
            new.perms[0] = VMPL0_FULL
        self._entries[pfn] = new
        return SUCCESS

    def psmash(self, spa: int) -> int:
        """PSMASH: split a 2 MiB entry into 512 4 KiB ones, keeping Validated (§15.36.11)."""
        pfn = spa >> 12
        if spa & (SIZE_2M - 1) or not self.covered(pfn):
            return FAIL_INPUT
        head = self._entries.get(pfn)
        if head is None or head.page_size != RmpPageSize.SIZE_2M:
            return FAIL_BADADDR  # (model) the code for "not a 2 MiB entry"
        if head.immutable:
            return FAIL_PERMISSION  # (model)
        for i in range(PAGES_PER_2M):
            sub = head.copy()
            sub.page_size = RmpPageSize.SIZE_4K
            sub.gpa = head.gpa + i * PAGE_SIZE if head.assigned else head.gpa
            self._entries[pfn + i] = sub
        return SUCCESS

    # KVM's wrappers (arch/x86/virt/svm/sev.c): non-zero is a bug there.
    def make_private(self, pfn: int, gpa: int, size_2m: bool, asid: int, immutable: bool) -> None:
        """``rmp_make_private``."""
        rc = self.rmpupdate(pfn << 12, RmpState(gpa, True, int(size_2m), immutable, asid))
        if rc:
            raise RmpUpdateError(f"rmp_make_private(PFN {pfn:#x})", rc)

    def make_shared(self, pfn: int, size_2m: bool = False) -> None:
        """``rmp_make_shared``: back to the hypervisor (Assigned 0, ASID 0)."""
        rc = self.rmpupdate(pfn << 12, RmpState(0, False, int(size_2m), False, 0))
        if rc:
            raise RmpUpdateError(f"rmp_make_shared(PFN {pfn:#x})", rc)

    # -- the AMD-SP writes entries directly -------------------------------------
    def firmware_set(self, pfn: int, **fields) -> RmpEntry:
        """The firmware's own RMP writes (it is not bound by RMPUPDATE's checks)."""
        e, head = self.effective(pfn)
        for k, v in fields.items():
            setattr(e, k, v)
        return e

    # -- guest instructions -------------------------------------------------------
    def _guest_checks(self, ctx: GuestContext, gpa: int, spa: int, error: int) -> RmpEntry:
        """RMP-Covered, Guest-Owned, Reverse-Map, Mutable (Table 15-39), as #NPF."""
        pfn = spa >> 12
        error |= PFERR_RMP | PFERR_PRESENT | PFERR_GUEST_ENC
        if not self.covered(pfn):
            raise NestedPageFault(gpa, error, "the page is not covered by the RMP")
        e, head = self.effective(pfn)
        if not e.assigned or e.asid != ctx.asid:
            raise NestedPageFault(gpa, error, f"the page is {e.owner}-owned"
                                  + (f" (ASID {e.asid})" if e.assigned else "")
                                  + f", not assigned to ASID {ctx.asid}")
        want = e.gpa + (pfn - head) * PAGE_SIZE
        if want != gpa & ~0xFFF:
            raise NestedPageFault(gpa, error, f"the RMP maps this page to GPA {want:#x}, "
                                  f"not {gpa & ~0xFFF:#x}")
        if e.immutable:
            raise NestedPageFault(gpa, error, "the page is immutable")
        return e

    @staticmethod
    def _instr_prologue(ctx: GuestContext, what: str) -> None:
        if not ctx.snp_active:
            raise GuestUD(f"{what} outside an SNP-active guest: #UD")
        if ctx.cpl:
            raise GuestGP(f"{what} at CPL {ctx.cpl}: #GP(0)")

    def _size_checks(self, e: RmpEntry, gpa: int, want_2m: bool, npt_2m: bool) -> int | None:
        """Table 15-40: 4K request on a 2M page -> #NPF(SIZEM); 2M on 4K -> FAIL_SIZEMISMATCH."""
        rmp_2m = e.page_size == RmpPageSize.SIZE_2M
        if not want_2m and (rmp_2m or npt_2m):
            raise NestedPageFault(gpa, PFERR_RMP | PFERR_PRESENT | PFERR_GUEST_FINAL
                                  | PFERR_GUEST_ENC | PFERR_GUEST_SIZEM,
                                  "4 KiB request on a page the "
                                  + ("RMP" if rmp_2m else "nested page table")
                                  + " maps as 2 MiB (PSMASH it)")
        if want_2m and not (rmp_2m and npt_2m):
            return FAIL_SIZEMISMATCH
        return None

    def pvalidate(self, ctx: GuestContext, gpa: int, spa: int, *, size_2m: bool = False,
                  validate: bool = True, npt_2m: bool | None = None) -> InstrResult:
        """PVALIDATE (F2 0F 01 FF): set or clear Validated.

        ``npt_2m``: the nested page table maps the page as 2 MiB (default: as
        the request).  Returns rAX 0 with CF=1 when Validated already had the
        requested value ("no change"); FAIL_INPUT for a misaligned 2 MiB
        request; FAIL_SIZEMISMATCH for a 2 MiB request on 4 KiB pages.
        PVALIDATE belongs to VMPL0 (an SVSM does it for lower VMPLs): from a
        higher VMPL it answers FAIL_PERMISSION (model).
        """
        self._instr_prologue(ctx, "PVALIDATE")
        if size_2m and gpa & (SIZE_2M - 1):
            return InstrResult(FAIL_INPUT)
        if ctx.vmpl:
            return InstrResult(FAIL_PERMISSION)
        e = self._guest_checks(ctx, gpa, spa, PFERR_WRITE | PFERR_GUEST_FINAL)
        rc = self._size_checks(e, gpa, size_2m, size_2m if npt_2m is None else npt_2m)
        if rc is not None:
            return InstrResult(rc)
        if e.validated == bool(validate):
            return InstrResult(SUCCESS, cf=True)
        e.validated = bool(validate)
        return InstrResult(SUCCESS, cf=False)

    def rmpadjust(self, ctx: GuestContext, gpa: int, spa: int, attrs: int, *,
                  size_2m: bool = False, npt_2m: bool | None = None) -> InstrResult:
        """RMPADJUST (F3 0F 01 FE): set a higher VMPL's permissions (and the VMSA bit).

        ``attrs`` is RDX: [7:0] target VMPL, [15:8] permission mask, bit 16 VMSA (APM
        vol 3 RMPADJUST; Linux's snp_set_vmsa passes ``1 | RMPADJUST_VMSA_PAGE_BIT``:
        target VMPL1, no permissions, the VMSA bit).
        FAIL_INPUT: misaligned 2 MiB request, target VMPL beyond 3, reserved
        permission bits.  FAIL_PERMISSION: target VMPL not numerically higher
        than the current one, permissions the current VMPL lacks, the VMSA bit
        from a VMPL other than 0 (§15.36.7, §15.36.12).
        """
        self._instr_prologue(ctx, "RMPADJUST")
        target, perms, vmsa = attrs & 0xFF, (attrs >> 8) & 0xFF, bool(attrs & RMPADJUST_VMSA_PAGE_BIT)
        if (size_2m and gpa & (SIZE_2M - 1)) or target >= NUM_VMPLS or perms & PERM_RESERVED:
            return InstrResult(FAIL_INPUT)
        if target <= ctx.vmpl:
            return InstrResult(FAIL_PERMISSION)
        e = self._guest_checks(ctx, gpa, spa, PFERR_WRITE | PFERR_GUEST_FINAL)
        rc = self._size_checks(e, gpa, size_2m, size_2m if npt_2m is None else npt_2m)
        if rc is not None:
            return InstrResult(rc)
        if perms & ~e.perms[ctx.vmpl] or (vmsa and ctx.vmpl):
            return InstrResult(FAIL_PERMISSION)
        e.perms[target] = perms
        e.vmsa = vmsa
        return InstrResult(SUCCESS)

    # -- access checks -------------------------------------------------------------
    def check_guest_access(self, ctx: GuestContext, gpa: int, spa: int, access: str, *,
                           c_bit: bool = True, npt_2m: bool = False,
                           gva: int | None = None) -> None:
        """The RMP checks of one guest access (Table 15-39); raises the fault, else returns.

        ``access``: "read", "write", "fetch" or "walk" (a guest page-table
        access).  Fetches and walks are private (C=1) whatever ``c_bit`` says.
        """
        if access not in ("read", "write", "fetch", "walk"):
            raise ValueError(f"unknown access {access!r}")
        pfn = spa >> 12
        error = PFERR_PRESENT | (PFERR_WRITE if access == "write" else 0) \
            | (PFERR_FETCH if access == "fetch" else 0) | (PFERR_USER if ctx.cpl == 3 else 0) \
            | (PFERR_GUEST_PAGE if access == "walk" else PFERR_GUEST_FINAL)
        private = ctx.snp_active and (c_bit or access in ("fetch", "walk"))
        if not private:
            # non-SNP guests: writes and walks; SNP guests: C=0 data writes
            checked = access in ("write", "walk") if not ctx.snp_active else access == "write"
            if checked and not self.hypervisor_owned(pfn, npt_2m):
                raise NestedPageFault(gpa, error | PFERR_RMP,
                                      "a shared (C=0) write to a page that is not hypervisor-owned")
            return
        base = error & ~PFERR_PRESENT
        e = self._guest_checks(ctx, gpa, spa, base)
        if npt_2m != (e.page_size == RmpPageSize.SIZE_2M):
            raise NestedPageFault(gpa, base | PFERR_RMP | PFERR_PRESENT | PFERR_GUEST_ENC,
                                  f"the nested page table maps {'2 MiB' if npt_2m else '4 KiB'}, "
                                  f"the RMP entry is {'2 MiB' if e.page_size else '4 KiB'}")
        if not e.validated:
            raise VcException(SVM_EXIT_PAGE_NOT_VALIDATED, gva,
                              f"GPA {gpa:#x} is private and not validated")
        need = {"read": Perm.READ, "walk": Perm.READ, "write": Perm.WRITE,
                "fetch": Perm.EXEC_USER if ctx.cpl == 3 else Perm.EXEC_SUPER}[access]
        have = e.perms[ctx.vmpl]
        if not have & need or (access in ("read", "write") and have & Perm.WRITE
                               and not have & Perm.READ):
            raise NestedPageFault(gpa, base | PFERR_RMP | PFERR_PRESENT | PFERR_GUEST_ENC
                                  | PFERR_GUEST_VMPL,
                                  f"VMPL{ctx.vmpl} permissions {have:#x} do not allow a {access}")

    def check_host_access(self, spa: int, write: bool, *, size_2m: bool = False) -> None:
        """Host accesses (Table 15-39): data writes and page-table accesses need a
        hypervisor-owned page, else #PF with the RMP bit; reads are not checked."""
        if write and not self.hypervisor_owned(spa >> 12, size_2m):
            e, _ = self.effective(spa >> 12)
            raise HostRmpFault(spa, PFERR_PRESENT | PFERR_WRITE | PFERR_RMP,
                               f"host write to a {e.owner}-owned page")


__all__ = [
    "FAIL_BADADDR", "FAIL_INPUT", "FAIL_INUSE", "FAIL_OVERLAP", "FAIL_PERMISSION",
    "FAIL_SIZEMISMATCH", "GuestContext", "GuestGP", "GuestUD", "HostRmpFault", "InstrResult",
    "NestedPageFault", "Perm", "Rmp", "RmpEntry", "RmpFault", "RmpPageSize", "RmpState",
    "RmpUpdateError", "SUCCESS", "VMPL0_FULL", "VcException",
]
