"""The RMP model against the APM's semantics.

AMD64 APM vol. 2 §15.36 (Tables 15-34 to 15-40) and vol. 3 (PVALIDATE,
RMPADJUST, RMPUPDATE, PSMASH): each test names the rule it checks.
"""

from __future__ import annotations

import pytest

from kvmharness.snp import rmp as R
from kvmharness.snp.rmp import (
    GuestContext,
    GuestGP,
    GuestUD,
    HostRmpFault,
    NestedPageFault,
    Perm,
    Rmp,
    RmpState,
    VcException,
)

ASID = 5
G = GuestContext(asid=ASID)
PFN = 0x1000  # 2 MiB aligned (0x1000 % 512 == 0)
GPA = 0x200000


def _rmp():
    return Rmp(1 << 14)


def _private(rmp, pfn=PFN + 3, gpa=GPA + 0x3000, *, size_2m=False, validated=False):
    rmp.make_private(pfn, gpa, size_2m, ASID, False)
    if validated:
        assert rmp.pvalidate(G, gpa, pfn << 12, size_2m=size_2m).rax == R.SUCCESS
    return pfn << 12, gpa


# -- RMPUPDATE (§15.36.5, §15.36.7) ----------------------------------------------------------

def test_rmpupdate_assigns_with_vmpl0_full_permissions_and_unvalidated():
    rmp = _rmp()
    assert rmp.rmpupdate(PFN << 12, RmpState(GPA, True, 0, False, ASID)) == R.SUCCESS
    e = rmp.raw(PFN)
    assert (e.assigned, e.asid, e.gpa, e.validated, e.owner) == (True, ASID, GPA, False, "guest")
    assert e.perms == [R.VMPL0_FULL, 0, 0, 0]


def test_rmpupdate_clears_validated_so_a_remap_is_visible_to_the_guest():
    rmp = _rmp()
    spa, gpa = _private(rmp, validated=True)
    assert rmp.raw(spa >> 12).validated
    rmp.make_shared(spa >> 12)
    rmp.make_private(spa >> 12, gpa, False, ASID, False)  # hypervisor re-assigns it
    with pytest.raises(VcException) as ei:
        rmp.check_guest_access(G, gpa, spa, "read", gva=0x7000)
    assert ei.value.error_code == 0x404 and ei.value.cr2 == 0x7000


def test_rmpupdate_input_permission_overlap():
    rmp = _rmp()
    assert rmp.rmpupdate((PFN << 12) | 8, RmpState(GPA, True, 0, False, ASID)) == R.FAIL_INPUT
    assert rmp.rmpupdate(1 << 40, RmpState(GPA, True, 0, False, ASID)) == R.FAIL_INPUT
    assert rmp.rmpupdate((PFN + 1) << 12, RmpState(GPA, True, 1, False, ASID)) == R.FAIL_INPUT
    rmp.make_private(PFN + 7, GPA + 0x7000, False, ASID, False)
    assert rmp.rmpupdate(PFN << 12, RmpState(GPA, True, 1, False, ASID)) == R.FAIL_OVERLAP
    rmp.make_private(PFN + 9, 0, False, 0, True)  # a firmware page: immutable
    assert rmp.rmpupdate((PFN + 9) << 12, RmpState()) == R.FAIL_PERMISSION
    big = PFN + 512
    rmp.make_private(big, GPA + 0x200000, True, ASID, False)
    assert rmp.rmpupdate((big + 1) << 12, RmpState()) == R.FAIL_OVERLAP  # PSMASH first
    assert rmp.rmpupdate(big << 12, RmpState(0, False, 1, False, 0)) == R.SUCCESS


def test_rmp_state_is_the_kernels_16_byte_struct():
    st = RmpState(0x1234000, True, 1, True, 7)
    raw = st.pack()
    assert len(raw) == 16 and raw[8:12] == bytes([1, 1, 1, 0]) and raw[12:] == (7).to_bytes(4, "little")
    assert RmpState.unpack(raw) == st


def test_kvm_helpers_raise_on_failure():
    rmp = _rmp()
    rmp.make_private(PFN, 0, False, 0, True)
    with pytest.raises(R.RmpUpdateError):
        rmp.make_shared(PFN)


# -- PSMASH (§15.36.11) -------------------------------------------------------------------

def test_psmash_splits_keeping_validated_with_consecutive_gpas():
    rmp = _rmp()
    spa, gpa = _private(rmp, PFN, GPA, size_2m=True, validated=True)
    assert rmp.lookup(PFN + 5) == (True, 1)
    assert rmp.psmash(spa) == R.SUCCESS
    for i in (0, 1, 511):
        e = rmp.raw(PFN + i)
        assert (e.page_size, e.gpa, e.validated, e.asid) == (0, GPA + i * 4096, True, ASID)
    rmp.check_guest_access(G, GPA + 511 * 4096, (PFN + 511) << 12, "write")  # no fault


def test_psmash_errors():
    rmp = _rmp()
    assert rmp.psmash((PFN + 1) << 12) == R.FAIL_INPUT
    assert rmp.psmash(PFN << 12) == R.FAIL_BADADDR  # not a 2 MiB entry
    assert rmp.psmash(1 << 40) == R.FAIL_INPUT


# -- PVALIDATE (§15.36.6, Table 15-40) --------------------------------------------------------

def test_pvalidate_sets_then_reports_no_change_with_cf():
    rmp = _rmp()
    spa, gpa = _private(rmp)
    r1 = rmp.pvalidate(G, gpa, spa)
    assert (r1.rax, r1.cf, r1.no_change) == (0, False, False)
    r2 = rmp.pvalidate(G, gpa, spa)
    assert (r2.rax, r2.cf, r2.no_change) == (0, True, True)
    r3 = rmp.pvalidate(G, gpa, spa, validate=False)
    assert (r3.rax, r3.cf) == (0, False) and not rmp.raw(spa >> 12).validated
    assert rmp.pvalidate(G, gpa, spa, validate=False).no_change


def test_pvalidate_size_rules():
    rmp = _rmp()
    spa, gpa = _private(rmp, PFN, GPA)  # 4 KiB RMP entry
    assert rmp.pvalidate(G, gpa, spa, size_2m=True).rax == R.FAIL_SIZEMISMATCH
    assert rmp.pvalidate(G, gpa + 0x1000, spa + 0x1000, size_2m=True).rax == R.FAIL_INPUT
    big = PFN + 512
    rmp.make_private(big, GPA + 0x200000, True, ASID, False)
    with pytest.raises(NestedPageFault) as ei:  # 4 KiB request on a 2 MiB entry
        rmp.pvalidate(G, GPA + 0x201000, (big + 1) << 12)
    assert ei.value.error_code & R.PFERR_GUEST_SIZEM and ei.value.error_code & R.PFERR_RMP
    assert rmp.pvalidate(G, GPA + 0x200000, big << 12, size_2m=True).rax == R.SUCCESS
    with pytest.raises(NestedPageFault):  # 4 KiB request where the NPT maps 2 MiB
        rmp.pvalidate(G, gpa, spa, npt_2m=True)


@pytest.mark.parametrize("case", ["unassigned", "other-asid", "remapped", "immutable"])
def test_pvalidate_of_a_page_not_the_guests_faults_with_the_rmp_bit(case):
    rmp = _rmp()
    spa, gpa = PFN << 12, GPA
    if case == "other-asid":
        rmp.make_private(PFN, GPA, False, ASID + 1, False)
    elif case == "remapped":
        rmp.make_private(PFN, GPA + 0x5000, False, ASID, False)
    elif case == "immutable":
        rmp.make_private(PFN, GPA, False, ASID, True)
    with pytest.raises(NestedPageFault) as ei:
        rmp.pvalidate(G, gpa, spa)
    code = ei.value.error_code
    assert code & R.PFERR_RMP and code & R.PFERR_GUEST_ENC and code & R.PFERR_GUEST_FINAL
    assert not code & R.PFERR_GUEST_SIZEM
    assert ei.value.gpa == gpa


def test_pvalidate_context_rules():
    rmp = _rmp()
    spa, gpa = _private(rmp)
    with pytest.raises(GuestUD):
        rmp.pvalidate(GuestContext(ASID, snp_active=False), gpa, spa)
    with pytest.raises(GuestGP):
        rmp.pvalidate(GuestContext(ASID, cpl=3), gpa, spa)
    assert rmp.pvalidate(GuestContext(ASID, vmpl=1), gpa, spa).rax == R.FAIL_PERMISSION


# -- RMPADJUST (§15.36.7) -------------------------------------------------------------------------

def _attrs(perms, vmpl, vmsa=False):
    """RMPADJUST's RDX: [7:0] target VMPL, [15:8] permission mask, bit 16 VMSA."""
    return vmpl | perms << 8 | (R.RMPADJUST_VMSA_PAGE_BIT if vmsa else 0)


def test_rmpadjust_takes_rdx_as_linux_passes_it():
    """RDX [7:0] is the target VMPL, [15:8] the permissions: Linux's snp_set_vmsa marks a
    VMSA page from VMPL0 with RDX = 1 | RMPADJUST_VMSA_PAGE_BIT (VMPL1, no permissions)."""
    rmp = _rmp()
    spa, gpa = _private(rmp, validated=True)
    assert rmp.rmpadjust(G, gpa, spa, 1 | R.RMPADJUST_VMSA_PAGE_BIT).rax == R.SUCCESS
    entry = rmp.raw(spa >> 12)
    assert entry.vmsa and entry.perms[1] == 0
    assert rmp.rmpadjust(G, gpa, spa, 0x03 << 8 | 1).rax == R.SUCCESS  # read+write to VMPL1
    assert rmp.raw(spa >> 12).perms[1] == 0x03


def test_rmpadjust_grants_a_higher_vmpl():
    rmp = _rmp()
    spa, gpa = _private(rmp, validated=True)
    rw = int(Perm.READ | Perm.WRITE)
    assert rmp.rmpadjust(G, gpa, spa, _attrs(rw, 1)).rax == R.SUCCESS
    assert rmp.raw(spa >> 12).perms[1] == rw
    vmpl1 = GuestContext(ASID, vmpl=1)
    rmp.check_guest_access(vmpl1, gpa, spa, "write")
    with pytest.raises(NestedPageFault) as ei:
        rmp.check_guest_access(vmpl1, gpa, spa, "fetch")
    assert ei.value.error_code & R.PFERR_GUEST_VMPL and ei.value.error_code & R.PFERR_FETCH
    # VMPL1 may pass on what it has to VMPL2, not more
    assert rmp.rmpadjust(vmpl1, gpa, spa, _attrs(int(Perm.READ), 2)).rax == R.SUCCESS
    assert rmp.rmpadjust(vmpl1, gpa, spa, _attrs(int(Perm.EXEC_SUPER), 2)).rax == R.FAIL_PERMISSION


@pytest.mark.parametrize("ctx_vmpl, attrs, rc", [
    (0, _attrs(1, 0), R.FAIL_PERMISSION),        # its own VMPL
    (1, _attrs(1, 0), R.FAIL_PERMISSION),        # a more privileged VMPL
    (1, _attrs(1, 1), R.FAIL_PERMISSION),
    (0, _attrs(1, 4), R.FAIL_INPUT),             # no VMPL 4
    (0, _attrs(0x20, 1), R.FAIL_INPUT),          # reserved permission bit
    (1, _attrs(0, 2, vmsa=True), R.FAIL_PERMISSION),  # only VMPL0 sets the VMSA bit
])
def test_rmpadjust_failures(ctx_vmpl, attrs, rc):
    rmp = _rmp()
    spa, gpa = _private(rmp, validated=True)
    rmp.raw(spa >> 12).perms[1] = R.VMPL0_FULL
    assert rmp.rmpadjust(GuestContext(ASID, vmpl=ctx_vmpl), gpa, spa, attrs).rax == rc


def test_rmpadjust_sizes_and_vmsa_bit():
    rmp = _rmp()
    spa, gpa = _private(rmp, PFN, GPA, validated=True)
    assert rmp.rmpadjust(G, gpa, spa, _attrs(1, 1), size_2m=True).rax == R.FAIL_SIZEMISMATCH
    assert rmp.rmpadjust(G, gpa + 0x1000, spa, _attrs(1, 1), size_2m=True).rax == R.FAIL_INPUT
    assert rmp.rmpadjust(G, gpa, spa, _attrs(0, 1, vmsa=True)).rax == R.SUCCESS
    assert rmp.raw(PFN).vmsa
    big = PFN + 512
    rmp.make_private(big, GPA + 0x200000, True, ASID, False)
    with pytest.raises(NestedPageFault) as ei:
        rmp.rmpadjust(G, GPA + 0x201000, (big + 1) << 12, _attrs(1, 1))
    assert ei.value.error_code & R.PFERR_GUEST_SIZEM


# -- access checks (Table 15-39) -------------------------------------------------------------------

def test_private_access_of_an_unvalidated_page_is_vc_404():
    rmp = _rmp()
    spa, gpa = _private(rmp)
    for access in ("read", "write", "fetch", "walk"):
        with pytest.raises(VcException) as ei:
            rmp.check_guest_access(G, gpa, spa, access, gva=0x1234)
        assert ei.value.error_code == R.SVM_EXIT_PAGE_NOT_VALIDATED == 0x404
    rmp.pvalidate(G, gpa, spa)
    for access in ("read", "write", "fetch", "walk"):
        rmp.check_guest_access(G, gpa, spa, access)


def test_the_remap_attack_faults_on_the_reverse_map_check():
    """The hypervisor points GPA A's NPT entry at the SPA backing GPA B (both validated)."""
    rmp = _rmp()
    spa_a, gpa_a = _private(rmp, PFN + 1, GPA + 0x1000, validated=True)
    spa_b, gpa_b = _private(rmp, PFN + 2, GPA + 0x2000, validated=True)
    with pytest.raises(NestedPageFault) as ei:
        rmp.check_guest_access(G, gpa_a, spa_b, "read")
    assert ei.value.error_code & R.PFERR_RMP and ei.value.error_code & R.PFERR_GUEST_ENC
    assert "0x202000" in ei.value.reason


def test_size_check_outranks_the_validated_check():
    """A page that fails both the page-size and the validated check gives #NPF, not #VC."""
    rmp = _rmp()
    spa, gpa = _private(rmp)
    with pytest.raises(NestedPageFault):
        rmp.check_guest_access(G, gpa, spa, "read", npt_2m=True)


def test_shared_accesses():
    rmp = _rmp()
    spa, gpa = _private(rmp, validated=True)
    rmp.check_guest_access(G, gpa, spa, "read", c_bit=False)  # C=0 reads are not checked
    with pytest.raises(NestedPageFault) as ei:  # C=0 write to a guest page
        rmp.check_guest_access(G, gpa, spa, "write", c_bit=False)
    assert ei.value.error_code & R.PFERR_RMP and not ei.value.error_code & R.PFERR_GUEST_ENC
    spa2, gpa2 = _private(rmp, PFN + 4, gpa + 0x1000)  # assigned, not validated
    with pytest.raises(VcException):  # a fetch is private whatever the C-bit
        rmp.check_guest_access(G, gpa2, spa2, "fetch", c_bit=False)
    shared = (PFN + 100) << 12
    rmp.check_guest_access(G, 0x9000, shared, "write", c_bit=False)  # hypervisor page: fine
    with pytest.raises(NestedPageFault):  # a private access to a hypervisor page
        rmp.check_guest_access(G, 0x9000, shared, "read")


def test_a_shared_2m_write_needs_every_4k_entry_unassigned():
    rmp = _rmp()
    _private(rmp, PFN + 300, GPA + 0x12C000)
    with pytest.raises(NestedPageFault):
        rmp.check_guest_access(G, GPA, PFN << 12, "write", c_bit=False, npt_2m=True)
    rmp.check_guest_access(G, GPA, PFN << 12, "write", c_bit=False)  # 4 KiB: its page is free


def test_non_snp_guests_may_not_write_guest_pages():
    rmp = _rmp()
    spa, gpa = _private(rmp)
    legacy = GuestContext(asid=9, snp_active=False)
    with pytest.raises(NestedPageFault):
        rmp.check_guest_access(legacy, gpa, spa, "write", c_bit=True)
    rmp.check_guest_access(legacy, gpa, spa, "read", c_bit=True)


def test_write_without_read_is_an_illegal_vmpl_setting():
    rmp = _rmp()
    spa, gpa = _private(rmp, validated=True)
    assert rmp.rmpadjust(G, gpa, spa, _attrs(int(Perm.WRITE), 1)).rax == R.SUCCESS
    with pytest.raises(NestedPageFault) as ei:
        rmp.check_guest_access(GuestContext(ASID, vmpl=1), gpa, spa, "write")
    assert ei.value.error_code & R.PFERR_GUEST_VMPL


def test_host_writes_need_hypervisor_owned_pages_reads_do_not():
    rmp = _rmp()
    spa, _ = _private(rmp)
    rmp.check_host_access(spa, write=False)
    with pytest.raises(HostRmpFault) as ei:
        rmp.check_host_access(spa, write=True)
    assert ei.value.error_code & (1 << 31)
    rmp.check_host_access((PFN + 50) << 12, write=True)
    rmp.check_host_access(1 << 40, write=True)  # beyond the RMP: a hypervisor page
    with pytest.raises(HostRmpFault):
        rmp.check_host_access(PFN << 12, write=True, size_2m=True)
