"""The kvm backend on this machine's real /dev/kvm: one object per fd, state round trips,
completion of reads, single step, and errors that name the ioctl and the errno."""

import errno
import os

import pytest

from kvmharness import exits as X
from kvmharness import protocol as P
from kvmharness.backend import open_backend
from kvmharness.boot import long_mode_state, long_mode_tables, real_mode_state
from kvmharness.errors import DeviceMissing, FeatureUnavailable, KvmError, UsageError
from kvmharness.x86 import CpuidEntry, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_STAR

pytestmark = pytest.mark.requires_kvm


@pytest.fixture
def kvm():
    system = open_backend("kvm")
    yield system
    system.close()


def real_mode_vm(system, code: bytes):
    vm = system.create_vm()
    vm.add_memory(0, 1 << 20)
    vcpu = vm.create_vcpu(0)
    vm.write(P.GUEST_LOAD_ADDR, code)
    regs, sregs = real_mode_state()
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
    return vm, vcpu


def test_capabilities_are_one_value_read_from_the_device(kvm):
    caps = kvm.capabilities
    assert caps.backend == "kvm" and caps.api_version == 12
    assert caps.has("KVM_CAP_X86_USER_SPACE_MSR") and caps.has("KVM_CAP_SET_GUEST_DEBUG")
    assert 0 in caps.vm_types
    assert caps.supported_cpuid.lookup(0) is not None
    assert caps.msr_index_list  # KVM_GET_MSR_INDEX_LIST is never empty on x86
    assert caps is kvm.capabilities  # read once


def test_regs_and_sregs_round_trip_exactly(kvm):
    vm, vcpu = real_mode_vm(kvm, b"\xf4")
    try:
        regs = vcpu.get_regs()
        regs.rax, regs.r15, regs.rdi = 0x1122334455667788, 0xFFFFFFFFFFFFFFFF, 42
        vcpu.set_regs(regs)
        assert vcpu.get_regs() == regs
        vm.write(0x1000, b"".join(long_mode_tables()[a] for a in [P.BOOT_PML4])[:8])
        for gpa, blob in long_mode_tables().items():
            vm.write(gpa, blob)
        vcpu.set_cpuid(kvm.capabilities.supported_cpuid)
        _, sregs = long_mode_state(1 << 20)
        vcpu.set_sregs(sregs)
        got = vcpu.get_sregs()
        assert (got.cr0, got.cr3, got.cr4, got.efer) == (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer)
        assert got.cs == sregs.cs and got.gdt == sregs.gdt and got.idt == sregs.idt
    finally:
        vm.close()


def test_msrs_set_and_get(kvm):
    vm, vcpu = real_mode_vm(kvm, b"\xf4")
    try:
        vcpu.set_cpuid(kvm.capabilities.supported_cpuid)
        assert vcpu.set_msrs({MSR_STAR: 0x0023001000000000, MSR_KERNEL_GS_BASE: 0xFFFF800000001000}) == 2
        got = vcpu.get_msrs([MSR_STAR, MSR_KERNEL_GS_BASE, MSR_LSTAR])
        assert got[MSR_STAR] == 0x0023001000000000 and got[MSR_KERNEL_GS_BASE] == 0xFFFF800000001000
    finally:
        vm.close()


def test_cpuid_set_then_get(kvm):
    vm, vcpu = real_mode_vm(kvm, b"\xf4")
    try:
        entries = [CpuidEntry(0, 0, 0, 0x8000001F, 0x68747541, 0x444D4163, 0x69746E65),
                   CpuidEntry(0x8000001F, 0, 0, 0x1B, 0x73, 509, 100)]
        vcpu.set_cpuid(entries)
        got = {(e.function, e.index): e for e in vcpu.get_cpuid()}
        assert got[(0x8000001F, 0)] == entries[1]
    finally:
        vm.close()


def test_io_in_is_completed_by_userspace(kvm):
    # in al, 0x61 ; out 0xe9, al ; hlt
    vm, vcpu = real_mode_vm(kvm, bytes([0xE4, 0x61, 0xE6, P.CONSOLE_PORT, 0xF4]))
    try:
        e = vcpu.run()
        assert e == X.IoIn(0x61, 1, 1)
        vcpu.complete(ord("Z"))
        e = vcpu.run()
        assert e == X.IoOut(P.CONSOLE_PORT, 1, 1, b"Z")
        assert vcpu.run() == X.Hlt()
    finally:
        vm.close()


def test_complete_without_a_pending_read_is_refused(kvm):
    vm, vcpu = real_mode_vm(kvm, b"\xf4")
    try:
        assert vcpu.run() == X.Hlt()
        with pytest.raises(UsageError, match="asked for no data"):
            vcpu.complete(1)
    finally:
        vm.close()


def test_single_step_gives_a_debug_exit_per_instruction(kvm):
    # nop ; nop ; hlt
    vm, vcpu = real_mode_vm(kvm, b"\x90\x90\xf4")
    try:
        vcpu.set_single_step(True)
        e1, e2 = vcpu.run(), vcpu.run()
        assert isinstance(e1, X.Debug) and e1.exception == 1 and e1.pc == P.GUEST_LOAD_ADDR + 1
        assert isinstance(e2, X.Debug) and e2.pc == P.GUEST_LOAD_ADDR + 2
    finally:
        vm.close()


def test_kick_makes_run_return_eintr(kvm):
    vm, vcpu = real_mode_vm(kvm, b"\xeb\xfe")  # jmp .
    try:
        vcpu.kick()  # before entry: immediate_exit
        with pytest.raises(InterruptedError):
            vcpu.run()
    finally:
        vm.close()


def test_errors_name_the_ioctl_and_errno(kvm):
    vm = kvm.create_vm()
    try:
        with pytest.raises(KvmError) as e:
            vm.create_vcpu(1 << 20)
        assert e.value.ioctl == "KVM_CREATE_VCPU" and e.value.errno == errno.EINVAL
        assert "KVM_CREATE_VCPU failed: EINVAL" in str(e.value)
        vm.add_memory(0, 1 << 20)
        with pytest.raises(UsageError, match="overlaps"):
            vm.add_memory(0x80000, 1 << 20)
        with pytest.raises(UsageError, match="page-aligned"):
            vm.add_memory(0x200001, 4096)
    finally:
        vm.close()


def test_run_without_memory_fails_with_enospc_and_a_hint(kvm):
    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)
        with pytest.raises(KvmError, match="KVM_RUN failed: ENOSPC.*no memory slot"):
            vcpu.run()
    finally:
        vm.close()


def test_refused_vm_type_says_which_types_this_kernel_offers(kvm):
    if 2 in kvm.capabilities.vm_types:
        pytest.skip("this kernel offers the SEV VM type; the refusal path cannot be shown here")
    with pytest.raises(FeatureUnavailable, match=r"refused VM type 2 \(sev\).*offers VM types: default"):
        kvm.create_vm(2)


def test_missing_device_is_a_clear_error():
    with pytest.raises(DeviceMissing, match="does not exist.*--backend sim"):
        open_backend("kvm", kvm_path="/nonexistent/kvm")


def test_auto_backend_says_what_it_picked():
    s = open_backend("auto")
    try:
        assert s.name == "kvm" and "present" in s.chosen_because
    finally:
        s.close()
    s = open_backend("auto", kvm_path="/nonexistent/kvm")
    try:
        assert s.name == "sim" and "does not exist" in s.chosen_because
    finally:
        s.close()


def test_closing_releases_every_fd(kvm):
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        vm, vcpu = real_mode_vm(kvm, b"\xf4")
        assert vcpu.run() == X.Hlt()
        vm.close()
    assert len(os.listdir("/proc/self/fd")) == before
