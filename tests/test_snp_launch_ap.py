"""SNP AP creation (NAE 0x80000013) as KVM's ``sev_snp_ap_creation`` handles it, and VMRUN's
VMSA checks (APM Table 15-41) on the page the guest chose."""

from __future__ import annotations

import errno

import pytest

from kvmharness.errors import SevError
from kvmharness.images import load_manifest
from kvmharness.sev.vmsa import build_vmsa, reset_state
from kvmharness.snp.launch import (
    SVM_VMGEXIT_AP_CREATE,
    SVM_VMGEXIT_AP_CREATE_ON_INIT,
    SVM_VMGEXIT_AP_DESTROY,
    guest_launch_plan,
    launch_plan,
)
from kvmharness.snp.policy import DEFAULT_POLICY
from kvmharness.snp.psc import PscEntry, PscRequest, apply_map_gpa_range, handle_psc, psc_descriptor
from kvmharness.snp.rmp import RMPADJUST_VMSA_PAGE_BIT, GuestContext

VMSA_GPA = 0x21000  # not 2 MiB aligned
BAD_INPUT, MISSING_INPUT = (2, 5), (2, 4)


def _launched(vcpus=2):
    g = load_manifest()["hello64"]
    res = launch_plan(guest_launch_plan(g.load(), g.mode, g.memory, vcpus=vcpus), g.memory,
                      DEFAULT_POLICY)
    return res.vm, GuestContext(asid=res.vm.asid)


def _guest_prepares_vmsa(vm, guest, gpa=VMSA_GPA, *, set_vmsa_bit=True):
    """What a guest kernel does before AP creation: make the page private (PSC), validate it,
    write the AP's VMSA into it, and mark it a VMSA with RMPADJUST from VMPL0."""
    req = PscRequest(bytearray(psc_descriptor([PscEntry(gpa >> 12, 1)]).ljust(0x7F0, b"\0")))
    assert handle_psc(req, lambda r: apply_map_gpa_range(vm, r)).sw_exit_info_2 == 0
    spa = vm.spa_of(gpa)
    assert vm.fw.rmp.pvalidate(guest, gpa, spa).rax == 0
    vm.fw.memory.write_page(spa >> 12, build_vmsa(*reset_state(0x00A00F11), sev_features=1,
                                                  init2=True))
    if set_vmsa_bit:
        assert vm.fw.rmp.rmpadjust(guest, gpa, spa, 1 | RMPADJUST_VMSA_PAGE_BIT).rax == 0
    return spa


def test_ap_create_switches_the_vcpu_to_the_guests_vmsa():
    vm, guest = _launched()
    spa = _guest_prepares_vmsa(vm, guest)
    assert vm.ap_creation(1 << 32 | SVM_VMGEXIT_AP_CREATE, VMSA_GPA, vm.vmsa_features) == (0, 0)
    assert vm.vcpus[1].vmsa_pfn == spa >> 12 and vm.vcpus[1].runnable
    assert vm.vmrun_check(1) is None


def test_vmrun_refuses_a_vmsa_without_the_rmp_vmsa_bit():
    vm, guest = _launched()
    _guest_prepares_vmsa(vm, guest, set_vmsa_bit=False)
    assert vm.ap_creation(1 << 32 | SVM_VMGEXIT_AP_CREATE, VMSA_GPA, vm.vmsa_features) == (0, 0)
    assert "VMSA bit" in vm.vmrun_check(1)


def test_vmrun_refuses_a_shared_page_as_vmsa():
    vm, _ = _launched()
    assert vm.ap_creation(1 << 32 | SVM_VMGEXIT_AP_CREATE, 0x30000, vm.vmsa_features) == (0, 0)
    assert "not the guest's" in vm.vmrun_check(1)


@pytest.mark.parametrize("info1, info2, rax, expect", [
    (1 << 32 | SVM_VMGEXIT_AP_CREATE, 0x200000, "features", BAD_INPUT),   # 2 MiB aligned
    (1 << 32 | SVM_VMGEXIT_AP_CREATE, VMSA_GPA + 8, "features", BAD_INPUT),  # not a page
    (1 << 32 | SVM_VMGEXIT_AP_CREATE, 1 << 48, "features", BAD_INPUT),   # beyond MAXPHYADDR
    (1 << 32 | SVM_VMGEXIT_AP_CREATE, VMSA_GPA, 0x21, BAD_INPUT),        # other SEV_FEATURES
    (9 << 32 | SVM_VMGEXIT_AP_CREATE, VMSA_GPA, "features", BAD_INPUT),  # no such APIC ID
    (1 << 32 | 7, VMSA_GPA, "features", BAD_INPUT),                      # unknown request
    (1 << 32 | SVM_VMGEXIT_AP_CREATE, VMSA_GPA, None, MISSING_INPUT),    # RAX not valid
])
def test_bad_ap_creation_requests(info1, info2, rax, expect):
    vm, _ = _launched()
    before = vm.vcpus[1].vmsa_pfn
    assert vm.ap_creation(info1, info2, vm.vmsa_features if rax == "features" else rax) == expect
    assert vm.vcpus[1].vmsa_pfn == before


def test_destroy_leaves_the_vcpu_without_a_vmsa_and_kvm_run_fails():
    vm, _ = _launched()
    assert vm.ap_creation(1 << 32 | SVM_VMGEXIT_AP_DESTROY, 0, None) == (0, 0)
    assert not vm.vcpus[1].runnable
    with pytest.raises(SevError) as ei:
        vm.vmrun_check(1)
    assert ei.value.errno == errno.EINVAL


def test_create_on_init_waits_for_the_init_event():
    vm, guest = _launched()
    spa = _guest_prepares_vmsa(vm, guest)
    launch_vmsa = vm.vcpus[1].vmsa_pfn
    assert vm.ap_creation(1 << 32 | SVM_VMGEXIT_AP_CREATE_ON_INIT, VMSA_GPA,
                          vm.vmsa_features) == (0, 0)
    assert vm.vcpus[1].vmsa_pfn == launch_vmsa  # not yet
    vm.update_protected_state(1)  # the INIT
    assert vm.vcpus[1].vmsa_pfn == spa >> 12
