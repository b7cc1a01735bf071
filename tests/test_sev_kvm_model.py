"""kvmharness.sev.kvm_model: KVM's SEV command handling over the simulated firmware.

Each negative path asserts both channels: the errno KVM returns and the
firmware status (``None`` where KVM refuses before reaching the firmware),
as arch/x86/kvm/svm/sev.c and the firmware model define them.  No CPU is
needed: memory is a plain MemoryRegion.
"""

from __future__ import annotations

import errno

import pytest
from sev_fakes import MemoryOnlyVm

from kvmharness.backend import (
    KVM_X86_DEFAULT_VM,
    KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM,
)
from kvmharness.errors import SevError, UsageError
from kvmharness.sev.firmware import SimulatedSevFirmware
from kvmharness.sev.kvm_model import (
    VMSA_SPA_BASE,
    KvmSevModel,
    SimulatedSevDevice,
    firmware_from_cpuid,
)
from kvmharness.sev.launch import SevKvmInterface, vmsa_page_for_vcpu
from kvmharness.sev.policy import GuestPolicy, PolicyFlag
from kvmharness.sev.session import GuestOwner
from kvmharness.sev.status import GuestState, PlatformState, SevStatus
from kvmharness.x86 import sev_cpuid_leaf

MiB = 1 << 20


@pytest.fixture
def fw():
    return SimulatedSevFirmware()


def model(fw, vm_type=KVM_X86_DEFAULT_VM, **kw):
    vm = MemoryOnlyVm(vm_type)
    return vm, KvmSevModel(vm, fw, **kw)


def started(fw, policy=0, vm_type=KVM_X86_SEV_VM, mode="sev"):
    vm, m = model(fw, vm_type)
    m.init(mode)
    m.register_region(0, MiB)
    m.launch_start(policy)
    return vm, m


def fails(fn, *args, err, fw_error, **kw) -> SevError:
    with pytest.raises(SevError) as info:
        fn(*args, **kw)
    e = info.value
    assert (e.errno, e.fw_error) == (err, fw_error), str(e)
    return e


def test_is_the_interface(fw):
    _, m = model(fw)
    assert isinstance(m, SevKvmInterface)
    assert m.vm_types == {KVM_X86_DEFAULT_VM, KVM_X86_SEV_VM, KVM_X86_SEV_ES_VM}


# -- init ---------------------------------------------------------------------------

def test_init_paths_and_asid_ranges(fw):
    _, m = model(fw)
    assert m.init("sev") == "KVM_SEV_INIT"
    assert m.asid in range(fw.asids.min_sev_asid, fw.asids.num_asids + 1)
    assert fw.state == PlatformState.INIT  # sev_platform_init on first use
    _, es = model(fw, KVM_X86_SEV_ES_VM)
    assert es.init("sev-es") == "KVM_SEV_INIT2"
    assert 1 <= es.asid < fw.asids.min_sev_asid
    assert es.ghcb_version == 2  # INIT2 with 0 -> GHCB v2 for ES
    _, les = model(fw)
    assert les.command("KVM_SEV_ES_INIT") == "KVM_SEV_ES_INIT"
    assert les.ghcb_version == 1  # legacy ES_INIT: minimal protocol


def test_command_before_init_is_enotty(fw):
    _, m = model(fw)
    fails(m.launch_start, 0, err=errno.ENOTTY, fw_error=None)
    fails(m.guest_status, err=errno.ENOTTY, fw_error=None)
    fails(m.register_region, 0, 4096, err=errno.ENOTTY, fw_error=None)
    e = fails(m.command, "KVM_SEV_LAUNCH_FINISH", err=errno.ENOTTY, fw_error=None)
    assert "KVM_SEV_LAUNCH_FINISH" in str(e) and "INIT" in e.detail


def test_double_init_is_einval(fw):
    _, m = model(fw)
    m.init("sev")
    fails(m.init, "sev", err=errno.EINVAL, fw_error=None)
    _, m2 = model(fw, KVM_X86_SEV_VM)
    m2.init("sev")
    fails(m2.init, "sev", err=errno.EINVAL, fw_error=None)  # need_init cleared


def test_init2_rules(fw):
    _, legacy = model(fw, KVM_X86_DEFAULT_VM)
    with pytest.raises(UsageError):  # INIT2-only knobs on the legacy path
        legacy.init("sev-es", vmsa_features=0x20)
    vm, m = model(fw, KVM_X86_SEV_ES_VM)
    vm.create_vcpu()
    fails(m.init, "sev-es", err=errno.EINVAL, fw_error=None)  # vCPUs exist
    _, m = model(fw, KVM_X86_SEV_ES_VM)
    fails(m.init, "sev-es", vmsa_features=1 << 9, err=errno.EINVAL, fw_error=None)
    fails(m.init, "sev-es", ghcb_version=3, err=errno.EINVAL, fw_error=None)
    _, sev = model(fw, KVM_X86_SEV_VM)
    fails(sev.init, "sev", vmsa_features=0x20, err=errno.EINVAL, fw_error=None)
    fails(sev.init, "sev", ghcb_version=1, err=errno.EINVAL, fw_error=None)
    assert m.init("sev-es", vmsa_features=0x20) == "KVM_SEV_INIT2"
    assert m.vmsa_features == 0x20


def test_no_sev_or_no_es_asids_is_enotty(fw):
    fw_small = SimulatedSevFirmware(num_asids=4, min_sev_asid=1)  # no SEV-ES ASIDs
    _, no_es = model(fw_small)
    fails(no_es.init, "sev-es", err=errno.ENOTTY, fw_error=None)
    _, no_sev = model(fw, sev_enabled=False)
    fails(no_sev.init, "sev", err=errno.ENOTTY, fw_error=None)


def test_asid_exhaustion_is_ebusy_and_recycles(fw):
    small = firmware_from_cpuid(sev_cpuid_leaf(num_guests=3, min_sev_asid=2))  # ES: 1; SEV: 2, 3
    assert small.asids.range_for(True) == range(1, 2)
    models = []
    for _ in range(2):
        _, m = model(small)
        m.init("sev")
        models.append(m)
    assert sorted(m.asid for m in models) == [2, 3]
    _, third = model(small)
    fails(third.init, "sev", err=errno.EBUSY, fw_error=None)
    assert not third.active
    models[0].close()  # ASID parked; the next allocation flushes and reuses it
    assert third.init("sev") == "KVM_SEV_INIT" and third.asid == 2


# -- launch ----------------------------------------------------------------------------

def test_full_launch_states_and_memory(fw):
    vm, m = started(fw)
    image = bytes(range(256)) * 16
    vm.write(0x2000, image)
    assert m.guest_status().state == GuestState.LUPDATE
    m.launch_update_data(0x2000, len(image))
    assert vm.read(0x2000, len(image)) != image  # the host now sees ciphertext
    assert m.key.decrypt(0x2000, vm.read(0x2000, len(image))) == image
    assert m.launch_measure(0) == (48, b"")  # length query
    n, raw = m.launch_measure(256)
    assert n == 48 and len(raw) == 48
    assert m.guest_status().state == GuestState.LSECRET
    m.launch_finish()
    st = m.guest_status()
    assert (st.state, st.handle, st.policy) == (GuestState.RUNNING, m.handle, 0)
    assert m.dbg_decrypt(0x2000 + 3, 21) == image[3:24]  # unaligned: widened to granules


def test_wrong_order(fw):
    _, m = started(fw)
    fails(m.launch_finish, err=errno.EIO, fw_error=SevStatus.INVALID_GUEST_STATE)
    fails(m.launch_secret, bytes(52), bytes(16), 0x1000,
          err=errno.EIO, fw_error=SevStatus.INVALID_GUEST_STATE)
    _, m2 = model(fw)
    m2.init("sev")  # INIT but no LAUNCH_START: KVM passes handle 0
    fails(m2.launch_update_data, 0, 16, err=errno.EIO, fw_error=SevStatus.INVALID_GUEST)
    fails(m2.launch_measure, 48, err=errno.EIO, fw_error=SevStatus.INVALID_GUEST)


def test_update_after_finish(fw):
    _, m = started(fw)
    m.launch_update_data(0, 4096)
    m.launch_measure(48)
    m.launch_finish()
    fails(m.launch_update_data, 0x1000, 4096, err=errno.EIO,
          fw_error=SevStatus.INVALID_GUEST_STATE)
    fails(m.launch_measure, 48, err=errno.EIO, fw_error=SevStatus.INVALID_GUEST_STATE)


def test_bad_policy(fw):
    _, m = model(fw)
    m.init("sev")
    # the firmware checks the policy only with an owner's session (sev_guest_verify_policy)
    for policy in (1 << 6, GuestPolicy(0, api_major=2, api_minor=0).value):  # reserved, too new
        start = GuestOwner(policy).start(*fw.pdh_cert_export())
        fails(m.launch_start, policy, dh_cert=start.dh_cert, session=start.session,
              err=errno.EIO, fw_error=SevStatus.POLICY_FAILURE)
    assert m.handle == 0 and not fw._guests


def test_bad_handle_and_second_start(fw):
    _, m = model(fw)
    m.init("sev")
    fails(m.launch_start, 0, handle=77, err=errno.EIO, fw_error=SevStatus.INVALID_GUEST)
    m.launch_start(0)
    # a second LAUNCH_START makes a new context that cannot ACTIVATE the VM's ASID
    fails(m.launch_start, 0, err=errno.EIO, fw_error=SevStatus.ASID_OWNED)
    assert len(fw._guests) == 1  # sev_decommission dropped the new context


def test_blob_and_range_checks(fw):
    _, m = started(fw)
    fails(m.launch_update_data, 0, 0, err=errno.EINVAL, fw_error=None)
    fails(m.launch_update_data, 8, 16, err=errno.EIO, fw_error=SevStatus.INVALID_ADDRESS)
    fails(m.launch_update_data, 0, 24, err=errno.EIO, fw_error=SevStatus.INVALID_LEN)
    fails(m.launch_update_data, 2 * MiB, 4096, err=errno.ENOMEM, fw_error=None)  # no slot
    fails(m.launch_measure, 0x4001, err=errno.EINVAL, fw_error=None)
    fails(m.unregister_region, 0, 4096, err=errno.EINVAL, fw_error=None)
    m.unregister_region(0, MiB)
    _, m2 = model(fw)
    m2.init("sev")
    fails(m2.launch_start, 0, dh_cert=b"", session=bytes(128), err=errno.EINVAL, fw_error=None)


def test_sev_es_vmsa(fw):
    vm, m = model(fw, KVM_X86_SEV_ES_VM)
    m.init("sev-es")
    vcpu = vm.create_vcpu()
    m.launch_start(PolicyFlag.ES)
    m.launch_update_vmsa()
    spa, page = m.vmsa_pages[0]
    assert spa == VMSA_SPA_BASE
    expected = vmsa_page_for_vcpu(vcpu, vmsa_features=0, fpu=True)
    assert bytes(page) != expected and m.key.decrypt(spa, page) == expected
    _, plain = started(fw)
    fails(plain.launch_update_vmsa, err=errno.ENOTTY, fw_error=None)


def test_sev_es_vmsa_refuses_debug_state(fw):
    vm, m = model(fw, KVM_X86_SEV_ES_VM)
    m.init("sev-es")
    vcpu = vm.create_vcpu()
    m.launch_start(PolicyFlag.ES)
    vcpu.dr7 = 0x401
    fails(m.launch_update_vmsa, err=errno.EINVAL, fw_error=None)
    vcpu.dr7, vcpu.guest_debug = 0x400, 1
    fails(m.launch_update_vmsa, err=errno.EINVAL, fw_error=None)


def test_dbg_needs_policy_without_nodbg(fw):
    vm, m = started(fw, policy=PolicyFlag.NODBG)
    vm.write(0, b"A" * 32)
    m.launch_update_data(0, 32)
    fails(m.dbg_decrypt, 0, 32, err=errno.EIO, fw_error=SevStatus.POLICY_FAILURE)
    fails(m.dbg_encrypt, 0, b"B" * 16, err=errno.EIO, fw_error=SevStatus.POLICY_FAILURE)
    vm2, dbg = started(fw, policy=0)
    vm2.write(0, b"A" * 48)
    dbg.launch_update_data(0, 48)
    dbg.dbg_encrypt(5, b"hello")  # unaligned: read-modify-write through DBG_DECRYPT
    assert dbg.dbg_decrypt(0, 16) == b"AAAAAhelloAAAAAA"
    assert b"hello" not in vm2.read(0, 48)


def test_close_frees_asid_and_context(fw):
    _, m = started(fw)
    asid = m.asid
    m.close()
    assert not fw._guests and asid not in fw.asids.in_use
    assert fw.state == PlatformState.INIT


def test_simulated_dev_sev(fw):
    dev = SimulatedSevDevice(fw)
    assert dev.status().state == PlatformState.UNINIT
    assert len(dev.get_id()) == 64
    pdh, chain = dev.pdh_cert_export()
    assert len(pdh) == 0x824 and len(chain) == 3 * 0x824
    with pytest.raises(UsageError):
        dev.pdh_gen()  # destructive without the opt-in
    dev.pdh_gen(allow_destructive=True)
    assert dev.pdh_cert_export()[0] != pdh
    ro = SimulatedSevDevice(fw, writable=False)
    fails(ro.pek_csr, err=errno.EPERM, fw_error=None)
    fails(ro.factory_reset, allow_destructive=True, err=errno.EPERM, fw_error=None)
    started(fw)  # a guest makes the platform WORKING
    fails(dev.factory_reset, allow_destructive=True, err=errno.EBUSY, fw_error=None)
    fails(dev.pek_gen, allow_destructive=True, err=errno.EIO,
          fw_error=SevStatus.INVALID_PLATFORM_STATE)
