"""KVM's #NPF handling for an SNP guest (KVM_EXIT_MEMORY_FAULT, gmem prepare, PSMASH) and
the page-remapping attack stopped by the RMP."""

from __future__ import annotations

import pytest

from kvmharness.images import load_manifest
from kvmharness.kvm import _ffi
from kvmharness.snp import rmp as R
from kvmharness.snp.firmware import SimulatedSnpFirmware
from kvmharness.snp.launch import KvmSnpVm, MemoryFaultExit, guest_launch_plan, launch_plan
from kvmharness.snp.policy import DEFAULT_POLICY
from kvmharness.snp.rmp import GuestContext, NestedPageFault, VcException


def _launched():
    g = load_manifest()["hello64"]
    res = launch_plan(guest_launch_plan(g.load(), g.mode, g.memory), g.memory, DEFAULT_POLICY)
    return res.vm, GuestContext(asid=res.vm.asid)


def _access(vm, guest, gpa, access="read", *, c_bit=True, max_tries=4):
    """Run one guest access the way the CPU and KVM take turns: the RMP check, KVM's #NPF
    handling, the VMM's answer to KVM_EXIT_MEMORY_FAULT, retry.  Returns the fault chain."""
    chain = []
    for _ in range(max_tries):
        try:
            vm.fw.rmp.check_guest_access(guest, gpa, vm.spa_of(gpa), access, c_bit=c_bit, gva=gpa)
            chain.append("ok")
            return chain
        except NestedPageFault as f:
            chain.append(f)
            ex = vm.handle_npf(f.gpa, f.error_code)
            if ex is not None:  # the VMM converts the range, as QEMU does
                chain.append(ex)
                vm.set_memory_attributes(ex.gpa, ex.size, ex.private)
        except VcException as vc:
            chain.append(vc)
            return chain
    return chain


def test_memory_fault_exit_flags_are_the_uapi_ones():
    assert MemoryFaultExit(0, 4096, True).flags == _ffi.CONSTANTS["KVM_MEMORY_EXIT_FLAG_PRIVATE"]
    assert MemoryFaultExit(0, 4096, False).flags == 0


def test_implicit_conversion_to_private_then_vc_until_validated():
    vm, guest = _launched()
    gpa = 0x40000  # shared (never launched)
    chain = _access(vm, guest, gpa)
    assert isinstance(chain[0], NestedPageFault)
    assert chain[1] == MemoryFaultExit(gpa, 4096, True)
    assert isinstance(chain[-1], VcException) and chain[-1].error_code == 0x404
    assert vm.fw.rmp.lookup(vm.gmem_pfn(gpa >> 12)) == (True, 0)  # sev_gmem_prepare
    assert vm.fw.rmp.pvalidate(guest, gpa, vm.spa_of(gpa)).rax == 0
    assert _access(vm, guest, gpa) == ["ok"]


def test_a_shared_access_to_private_memory_exits_to_userspace_to_make_it_shared():
    vm, guest = _launched()
    gpa = 0x1000  # launched: private
    chain = _access(vm, guest, gpa, "write", c_bit=False)
    assert chain[1] == MemoryFaultExit(gpa, 4096, False)
    assert chain[-1] == "ok"


def test_kvm_psmashes_a_2m_rmp_entry_on_a_4k_rmp_fault():
    fw = SimulatedSnpFirmware(host_pages=1 << 13)
    vm = KvmSnpVm(fw, 4 << 20)
    guest = GuestContext(asid=vm.asid)
    base = 0x200000
    vm.set_memory_attributes(base, 0x200000, True)
    pfn = vm.gmem_pfn(base >> 12)
    vm.fw.rmp.make_private(pfn, base, True, vm.asid, False)  # sev_gmem_prepare's 2 MiB case
    gpa = base + 0x3000
    f = pytest.raises(NestedPageFault, vm.fw.rmp.pvalidate, guest, gpa, vm.spa_of(gpa)).value
    assert f.error_code & R.PFERR_GUEST_SIZEM
    assert vm.handle_npf(f.gpa, f.error_code) is None
    assert vm.fw.rmp.lookup(pfn + 3) == (True, 0) and vm.fw.rmp.entry_gpa(pfn + 3) == gpa
    assert vm.fw.rmp.pvalidate(guest, gpa, vm.spa_of(gpa)).rax == 0


def test_the_remap_attack_is_stopped_by_the_rmp():
    """The hypervisor points GPA A at the page holding GPA B's secret: every access to A
    faults (reverse-map check), KVM cannot fix it, the guest never reads B's page through A."""
    vm, guest = _launched()
    secret_gpa, victim_gpa = 0x1000, 0x2000  # both launched, private, validated
    vm.remap(victim_gpa, secret_gpa)
    chain = _access(vm, guest, victim_gpa)
    assert "ok" not in chain and all(isinstance(f, NestedPageFault) for f in chain)
    assert all(f.error_code & R.PFERR_RMP for f in chain)
    assert "0x1000" in chain[0].reason and "not 0x2000" in chain[0].reason
    # and the guest cannot "fix" it by validating the page at the wrong GPA
    with pytest.raises(NestedPageFault):
        vm.fw.rmp.pvalidate(guest, victim_gpa, vm.spa_of(victim_gpa))
