"""Page-state changes as KVM's sev.c handles them, then the RMP update, end to end on the model."""

from __future__ import annotations

import struct

import pytest

from kvmharness.images import load_manifest
from kvmharness.snp import psc as P
from kvmharness.snp.launch import guest_launch_plan, launch_plan
from kvmharness.snp.policy import DEFAULT_POLICY
from kvmharness.snp.psc import MapGpaRange, PscEntry, PscRequest
from kvmharness.snp.rmp import (
    PFERR_RMP,
    GuestContext,
    HostRmpFault,
    NestedPageFault,
    VcException,
)

SHARED, PRIVATE = P.VMGEXIT_PSC_OP_SHARED, P.VMGEXIT_PSC_OP_PRIVATE
FULL_SA = P.GHCB_SHARED_BUFFER_END - P.GHCB_SHARED_BUFFER  # 0x7F0: scratch at the buffer start


def _request(entries, sa_len=FULL_SA, **hdr) -> PscRequest:
    raw = P.psc_descriptor(entries, **hdr)
    return PscRequest(bytearray(raw + bytes(sa_len - len(raw))))


def _cur_entry(req):
    return struct.unpack_from("<H", req.buf)[0]


def _entry(req, i):
    return PscEntry.unpack(struct.unpack_from("<Q", req.buf, 8 + 8 * i)[0])


# -- the MSR protocol --------------------------------------------------------------------

def test_msr_request_encoding_matches_the_kernel_macro():
    # GHCB_MSR_PSC_REQ_GFN(0x12345, SNP_PAGE_STATE_SHARED)
    assert P.psc_msr_request(0x12345, 2) == (2 << 52) | (0x12345 << 12) | 0x014


@pytest.mark.parametrize("op, attrs", [(1, P.KVM_MAP_GPA_RANGE_ENCRYPTED), (2, 0)])
def test_msr_psc_exits_to_userspace_then_answers(op, attrs):
    step = P.begin_psc_msr(P.psc_msr_request(0x77, op))
    assert step == MapGpaRange(0x77000, 1, attrs | P.KVM_MAP_GPA_RANGE_PAGE_SZ_4K)
    assert step.nr == 12 and step.args == (0x77000, 1, attrs)
    assert P.complete_psc_msr(0) == 0x015
    assert P.complete_psc_msr(1) == (1 << 63) | 0x015


def test_msr_psc_errors():
    for op in (0, 3, 4, 15):  # only private/shared over the MSR protocol
        assert P.begin_psc_msr(P.psc_msr_request(1, op)) == P.GHCB_MSR_PSC_RESP_ERROR
    assert P.begin_psc_msr(P.psc_msr_request(1, 1), exit_on_map_gpa_range=False) \
        == P.GHCB_MSR_PSC_RESP_ERROR  # the VMM did not enable KVM_CAP_EXIT_HYPERCALL
    msr = P.psc_msr_request(1, 1)
    assert P.begin_psc_msr(msr, snp_guest=False) == P.SevTerminate(msr)


# -- the descriptor ------------------------------------------------------------------------

def test_entry_bitfields_round_trip():
    e = PscEntry(gfn=0xABCDE, op=2, huge=True, cur_page=7)
    raw = e.pack()
    assert raw == 7 | 0xABCDE << 12 | 2 << 52 | 1 << 56
    assert PscEntry.unpack(raw) == e


def test_adjacent_entries_merge_into_one_exit_and_complete():
    req = _request([PscEntry(0x10, SHARED), PscEntry(0x11, SHARED), PscEntry(0x12, SHARED)])
    step = req.begin()
    assert step == MapGpaRange(0x10000, 3, P.KVM_MAP_GPA_RANGE_DECRYPTED)
    done = req.complete(0)
    assert done == P.GhcbResult(0, 0)
    assert _cur_entry(req) == 3 and [_entry(req, i).cur_page for i in range(3)] == [1, 1, 1]


def test_a_gap_an_operation_change_or_a_size_change_splits_the_exits():
    entries = [PscEntry(0x10, SHARED), PscEntry(0x12, SHARED), PscEntry(0x13, PRIVATE),
               PscEntry(0x200, PRIVATE, huge=True)]
    seen = []
    result = P.handle_psc(_request(entries), lambda r: seen.append(r) or 0)
    assert result == P.GhcbResult(0, 0)
    assert seen == [MapGpaRange(0x10000, 1, 0), MapGpaRange(0x12000, 1, 0),
                    MapGpaRange(0x13000, 1, P.KVM_MAP_GPA_RANGE_ENCRYPTED),
                    MapGpaRange(0x200000, 512, P.KVM_MAP_GPA_RANGE_ENCRYPTED
                                | P.KVM_MAP_GPA_RANGE_PAGE_SZ_2M)]


def test_a_partly_done_2m_entry_continues_as_4k_pages():
    req = _request([PscEntry(0x400, SHARED, huge=True, cur_page=100)])
    step = req.begin()
    # KVM passes the entry's page-size bit through even for the 4 KiB remainder
    assert step == MapGpaRange((0x400 + 100) << 12, 412, P.KVM_MAP_GPA_RANGE_PAGE_SZ_2M)
    assert req.complete(0) == P.GhcbResult(0, 0)
    assert _entry(req, 0).cur_page == 512


def test_completed_entries_are_skipped_and_cur_entry_advances():
    req = _request([PscEntry(0x10, SHARED, cur_page=1), PscEntry(0x11, SHARED, cur_page=1),
                    PscEntry(0x30, PRIVATE)])
    assert req.begin() == MapGpaRange(0x30000, 1, P.KVM_MAP_GPA_RANGE_ENCRYPTED)
    assert _cur_entry(req) == 2


def test_smash_and_unsmash_operations_complete_without_an_exit():
    seen = []
    req = _request([PscEntry(0x200, 3, huge=True), PscEntry(0x400, 4, huge=True),
                    PscEntry(0x10, SHARED)])
    assert P.handle_psc(req, lambda r: seen.append(r) or 0) == P.GhcbResult(0, 0)
    assert seen == [MapGpaRange(0x10000, 1, 0)]
    assert [_entry(req, i).cur_page for i in range(3)] == [512, 512, 1]


@pytest.mark.parametrize("entries, hdr, sa_len, ret", [
    ([PscEntry(0x201, SHARED, huge=True)], {}, FULL_SA, P.VMGEXIT_PSC_ERROR_INVALID_ENTRY),
    ([PscEntry(0x10, SHARED, cur_page=2)], {}, FULL_SA, P.VMGEXIT_PSC_ERROR_INVALID_ENTRY),
    ([PscEntry(0x200, SHARED, huge=True, cur_page=513)], {}, FULL_SA,
     P.VMGEXIT_PSC_ERROR_INVALID_ENTRY),
    ([PscEntry(0x10, SHARED)], {"end_entry": 253}, FULL_SA, P.VMGEXIT_PSC_ERROR_INVALID_HDR),
    ([PscEntry(0x10, SHARED)], {"end_entry": 5}, 8 + 5 * 8, P.VMGEXIT_PSC_ERROR_INVALID_HDR),
    ([PscEntry(0x10, SHARED)], {"end_entry": 0xFFFF}, FULL_SA, P.VMGEXIT_PSC_ERROR_INVALID_HDR),
])
def test_bad_descriptors_get_kvms_error_returns(entries, hdr, sa_len, ret):
    seen = []
    assert P.handle_psc(_request(entries, sa_len, **hdr), lambda r: seen.append(r) or 0) \
        == P.GhcbResult(0, ret)
    assert not seen


def test_end_entry_252_is_the_last_one_allowed():
    entries = [PscEntry(0x1000 + 2 * i, SHARED) for i in range(253)]
    seen = []
    assert P.handle_psc(_request(entries, end_entry=252), lambda r: seen.append(r) or 0) \
        == P.GhcbResult(0, 0)
    assert len(seen) == 253


def test_an_entry_after_a_bad_one_is_not_processed_but_earlier_ones_are():
    req = _request([PscEntry(0x10, SHARED), PscEntry(0x21, PRIVATE, huge=True)])
    seen = []
    assert P.handle_psc(req, lambda r: seen.append(r) or 0) == \
        P.GhcbResult(0, P.VMGEXIT_PSC_ERROR_INVALID_ENTRY)
    assert seen == [MapGpaRange(0x10000, 1, 0)] and _cur_entry(req) == 1


def test_userspace_failure_and_no_exit_capability_are_generic_errors():
    req = _request([PscEntry(0x10, SHARED), PscEntry(0x30, SHARED)])
    assert P.handle_psc(req, lambda r: 22) == P.GhcbResult(0, P.VMGEXIT_PSC_ERROR_GENERIC)
    assert _cur_entry(req) == 0
    raw = bytearray(P.psc_descriptor([PscEntry(0x10, SHARED)]).ljust(FULL_SA, b"\0"))
    assert PscRequest(raw, exit_on_map_gpa_range=False).begin() == \
        P.GhcbResult(0, P.VMGEXIT_PSC_ERROR_GENERIC)


def test_scratch_area_rules_for_ghcb_v2():
    ghcb = 0x5000
    assert P.scratch_area(ghcb, ghcb + 0x800) == (0x800, 0x7F0)
    assert P.scratch_area(ghcb, ghcb + 0xFE8) == (0xFE8, 8)
    for bad in (ghcb + 0x7F8, ghcb + 0xFEC, 0x9800):
        assert P.scratch_area(ghcb, bad) == P.GhcbResult(2, P.GHCB_ERR_INVALID_SCRATCH_AREA)
    assert P.scratch_area(ghcb, 0) == P.GhcbResult(2, P.GHCB_ERR_MISSING_INPUT)


def test_random_descriptors_never_crash():
    import random

    rng = random.Random(16)
    results = set()
    for _ in range(300):
        n = rng.randrange(1, 20)
        raw = bytearray(rng.randbytes(8 + 8 * n))
        struct.pack_into("<HH", raw, 0, rng.randrange(0, n + 2), rng.randrange(0, n + 2))
        req = PscRequest(bytearray(raw))
        results.add(P.handle_psc(req, lambda r: rng.choice([0, 0, 0, 1])).sw_exit_info_2)
    assert results <= {0, P.VMGEXIT_PSC_ERROR_GENERIC, P.VMGEXIT_PSC_ERROR_INVALID_HDR,
                       P.VMGEXIT_PSC_ERROR_INVALID_ENTRY}
    assert len(results) >= 3


# -- end to end: a launched guest turns a page shared and back ---------------------------------

def _launched():
    g = load_manifest()["hello64"]
    res = launch_plan(guest_launch_plan(g.load(), g.mode, g.memory), g.memory, DEFAULT_POLICY)
    vm = res.vm
    return vm, GuestContext(asid=vm.asid)


def test_private_to_shared_and_back_through_the_rmp():
    vm, guest = _launched()
    rmp = vm.fw.rmp
    gpa = 0x1000  # a launched page: private and validated
    rmp.check_guest_access(guest, gpa, vm.spa_of(gpa), "read")
    with pytest.raises(HostRmpFault):  # the host cannot write it
        rmp.check_host_access(vm.gmem_pfn(1) << 12, write=True)
    # guest: invalidate, then ask for shared through the MSR protocol
    assert rmp.pvalidate(guest, gpa, vm.spa_of(gpa), validate=False).rax == 0
    step = P.begin_psc_msr(P.psc_msr_request(gpa >> 12, P.SNP_PAGE_STATE_SHARED))
    assert P.complete_psc_msr(P.apply_map_gpa_range(vm, step)) == P.GHCB_MSR_PSC_RESP
    assert rmp.lookup(vm.gmem_pfn(1)) == (False, 0)
    shared_spa = vm.spa_of(gpa)
    assert shared_spa >> 12 == vm.shared_pfn(1)
    rmp.check_guest_access(guest, gpa, shared_spa, "write", c_bit=False)
    rmp.check_host_access(shared_spa, write=True)
    # back to private with a descriptor: assigned, not validated -> #VC until PVALIDATE
    req = _request([PscEntry(gpa >> 12, PRIVATE)])
    assert P.handle_psc(req, lambda r: P.apply_map_gpa_range(vm, r)) == P.GhcbResult(0, 0)
    spa = vm.spa_of(gpa)
    with pytest.raises(VcException):
        rmp.check_guest_access(guest, gpa, spa, "read", gva=gpa)
    assert rmp.pvalidate(guest, gpa, spa).rax == 0
    rmp.check_guest_access(guest, gpa, spa, "read")


def test_a_shared_page_is_not_private_to_the_guest():
    vm, guest = _launched()
    gpa = 0x30000  # never launched: shared
    with pytest.raises(NestedPageFault) as ei:
        vm.fw.rmp.check_guest_access(guest, gpa, vm.spa_of(gpa), "read")
    assert ei.value.error_code & PFERR_RMP


def test_a_range_beyond_memory_fails_in_userspace_and_reports_generic():
    vm, _ = _launched()
    req = _request([PscEntry(vm.npages + 5, SHARED)])
    assert P.handle_psc(req, lambda r: P.apply_map_gpa_range(vm, r)) == \
        P.GhcbResult(0, P.VMGEXIT_PSC_ERROR_GENERIC)


def test_the_models_numbers_are_the_bindings_numbers():
    """psc.py's kernel numbers equal the cdefs/ ones the layout test pins to the headers."""
    from kvmharness.kvm import _ffi

    for name in ("KVM_HC_MAP_GPA_RANGE", "KVM_MAP_GPA_RANGE_PAGE_SZ_4K",
                 "KVM_MAP_GPA_RANGE_PAGE_SZ_2M", "KVM_MAP_GPA_RANGE_PAGE_SZ_1G",
                 "KVM_MAP_GPA_RANGE_ENCRYPTED", "KVM_MAP_GPA_RANGE_DECRYPTED"):
        assert getattr(P, name) == _ffi.CONSTANTS[name], name
    assert _ffi.ffi.sizeof("struct kvm_memory_attributes") == 32
    assert _ffi.KVM_SET_MEMORY_ATTRIBUTES == 0x4020AED2
    assert _ffi.KVM_CREATE_GUEST_MEMFD == 0xC040AED4


# -- GHCB GPA registration and the preferred GPA (MSR 0x010-0x013) ------------------------

def test_preferred_gpa_is_none_and_registration_echoes_the_gfn():
    st = P.SnpGhcbState()
    assert P.snp_msr_protocol(0x010, st) == 0xFFFFFFFFFFFFF011
    assert P.snp_msr_protocol(0x1234 << 12 | 0x012, st) == 0x1234 << 12 | 0x013
    assert st.registered_gpa == 0x1234000
    st.check_registered(0x1234000)


def test_an_unregistered_ghcb_fails_kvm_run_with_einval():
    import errno

    from kvmharness.errors import SevError

    st = P.SnpGhcbState()
    with pytest.raises(SevError) as ei:
        st.check_registered(0x5000)
    assert ei.value.errno == errno.EINVAL and "not registered" in str(ei.value)
    P.snp_msr_protocol(0x6 << 12 | 0x012, st)
    with pytest.raises(SevError):
        st.check_registered(0x5000)


def test_snp_requests_from_a_non_snp_guest_terminate_it():
    st = P.SnpGhcbState()
    for msr in (0x010, 0x7 << 12 | 0x012, P.psc_msr_request(7, 2)):
        assert P.snp_msr_protocol(msr, st, snp_guest=False) == P.SevTerminate(msr)
    assert st.registered_gpa is None


def test_other_msr_codes_pass_through_and_psc_is_dispatched():
    st = P.SnpGhcbState()
    assert P.snp_msr_protocol(0x8000001F_40000004, st) == 0x8000001F_40000004
    assert P.snp_msr_protocol(P.psc_msr_request(9, 1), st) == \
        MapGpaRange(0x9000, 1, P.KVM_MAP_GPA_RANGE_ENCRYPTED)
