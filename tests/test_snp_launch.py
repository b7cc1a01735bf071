"""SEV-SNP firmware and launch: the digest against sev-snp-measure, the firmware's states and errors.

The outside truth for the launch digest is virtee/sev-snp-measure's ``gctx.py``
(a test dependency): the same pages fed to its GCTX must give the same 48
bytes, for several guests and vCPU counts, both computed offline and produced
by the simulated firmware through the modelled KVM ioctls.  Its ``vmsa.py``
(QEMU's reset state) and ``id_block.py`` (the ID block and ID_AUTH layout,
SNP-format signatures) check the VMSA pages and LAUNCH_FINISH's ID block.
"""

from __future__ import annotations

import errno
import random
import struct

import pytest

from kvmharness.errors import SevError
from kvmharness.images import load_manifest
from kvmharness.sev.status import SevStatus
from kvmharness.snp.firmware import (
    CpuidEntry,
    SimulatedSnpFirmware,
    SnpGuestState,
    SnpPlatformState,
    cpuid_page,
    parse_cpuid_page,
)
from kvmharness.snp.launch import (
    SNP_CPUID_GPA,
    SNP_SECRETS_GPA,
    KvmSnpVm,
    default_cpuid_entries,
    expected_digest,
    guest_launch_plan,
    launch_plan,
)
from kvmharness.snp.measure import INITIAL_VMSA_GPA, LaunchDigest, PageType, replay
from kvmharness.snp.policy import DEFAULT_POLICY, PlatformFeatures, SnpPolicy

gctx = pytest.importorskip("sevsnpmeasure.gctx", reason="sev-snp-measure (the [test] extra) "
                           "is the outside truth for the SNP launch digest")

PAGE = 4096
MILAN_SIG = 0x00A00F11


def _gctx_digest(plan) -> bytes:
    """sev-snp-measure's GCTX fed the plan's pages through its own page-type methods."""
    g = gctx.GCTX()
    for p in plan.pages:
        if p.page_type == PageType.NORMAL:
            g.update_normal_pages(p.gpa, p.data)
        elif p.page_type == PageType.VMSA:
            assert p.gpa == g.VMSA_GPA
            g.update_vmsa_page(p.data)
        elif p.page_type == PageType.ZERO:
            g.update_zero_pages(p.gpa, PAGE)
        elif p.page_type == PageType.UNMEASURED:
            g.update_unmeasured_pages(p.gpa, PAGE)
        elif p.page_type == PageType.SECRETS:
            g.update_secrets_page(p.gpa)
        elif p.page_type == PageType.CPUID:
            g.update_cpuid_page(p.gpa)
    return g.ld()


def _guests():
    return [g for g in load_manifest().values() if g.mode in ("real", "long64")]


GUEST_NAMES = ["hello", "hello64", "cpuid", "sev-hello", "es-cpuid-ghcb", "mmio"]


@pytest.mark.parametrize("name", GUEST_NAMES)
@pytest.mark.parametrize("vcpus", [1, 2, 4, 8])
def test_launch_digest_equals_sev_snp_measure(name, vcpus):
    g = load_manifest()[name]
    plan = guest_launch_plan(g.load(), g.mode, g.memory, vcpus=vcpus, source=name)
    offline = expected_digest(plan)
    truth = _gctx_digest(plan)
    assert offline.digest == truth
    launched = launch_plan(plan, g.memory, DEFAULT_POLICY)
    assert launched.digest == truth  # the firmware measured the same pages at the same GPAs
    assert replay(offline.log) == truth


def test_every_manifest_guest_measures_like_sev_snp_measure():
    seen = 0
    for g in _guests():
        plan = guest_launch_plan(g.load(), g.mode, g.memory, vcpus=2, source=g.name)
        assert expected_digest(plan).digest == _gctx_digest(plan), g.name
        seen += 1
    assert seen >= 10


def test_plan_order_and_gpas():
    g = load_manifest()["hello64"]
    plan = guest_launch_plan(g.load(), g.mode, g.memory, vcpus=3)
    types = [p.page_type for p in plan.pages]
    n_normal = types.count(PageType.NORMAL)
    assert types == [PageType.NORMAL] * n_normal + [PageType.SECRETS, PageType.CPUID] \
        + [PageType.VMSA] * 3
    assert plan.pages[0].gpa == 0x1000  # the boot PML4, first of the long-mode tables
    assert [p.gpa for p in plan.pages[n_normal:n_normal + 2]] == [SNP_SECRETS_GPA, SNP_CPUID_GPA]
    assert all(p.gpa == INITIAL_VMSA_GPA for p in plan.vmsa_pages())


def test_ap_vmsas_equal_sev_snp_measures_snp_reset_vmsa():
    """APs wait in the RESET state: their SNP VMSA (SEV_FEATURES = SNPActive) is
    byte for byte sev-snp-measure's QEMU VMSA for the reset vector."""
    vmsa_mod = pytest.importorskip("sevsnpmeasure.vmsa")
    from sevsnpmeasure.sev_mode import SevMode

    g = load_manifest()["hello64"]
    plan = guest_launch_plan(g.load(), g.mode, g.memory, vcpus=3, vcpu_sig=MILAN_SIG)
    theirs = list(vmsa_mod.VMSA(SevMode.SEV_SNP, 0xFFFFFFF0, MILAN_SIG, 0x1).pages(3))
    ours = [p.data for p in plan.vmsa_pages()]
    assert ours[1] == ours[2] == theirs[1]
    assert ours[0] != ours[1]  # the BSP starts at the guest's entry state
    assert struct.unpack_from("<Q", ours[0], 0x3B0)[0] == 1


def test_zero_and_unmeasured_pages_measure_like_sev_snp_measure():
    fw = SimulatedSnpFirmware(host_pages=1 << 12)
    vm = KvmSnpVm(fw, 0x40000)
    vm.sev_init2()
    vm.create_vcpu()
    vm.launch_start(DEFAULT_POLICY)
    vm.set_memory_attributes(0x10000, 4 * PAGE, True)
    vm.fw.memory.write_page(vm.gmem_pfn(0x10), b"\xAA" * PAGE)  # stale data
    vm.launch_update(0x10, None, PAGE, PageType.ZERO)
    vm.launch_update(0x11, b"\x55" * 2 * PAGE, 2 * PAGE, PageType.UNMEASURED)
    vm.launch_update(0x13, b"data".ljust(PAGE, b"\0"), PAGE, PageType.NORMAL)
    assert fw.memory.read_page(vm.gmem_pfn(0x10)) == bytes(PAGE)  # ZERO pages are zeroed
    g = gctx.GCTX()
    g.update_zero_pages(0x10000, PAGE)
    g.update_unmeasured_pages(0x11000, 2 * PAGE)
    g.update_normal_pages(0x13000, b"data".ljust(PAGE, b"\0"))
    assert vm.launch_digest == g.ld()


def test_secrets_page_is_filled_and_measured_as_zeros():
    g = load_manifest()["hello64"]
    plan = guest_launch_plan(g.load(), g.mode, g.memory)
    res = launch_plan(plan, g.memory, DEFAULT_POLICY)
    page = res.vm.fw.memory.read_page(res.vm.gmem_pfn(SNP_SECRETS_GPA >> 12))
    version, imi, fms = struct.unpack_from("<III", page)
    assert (version, imi, fms) == (2, 0, MILAN_SIG)
    assert page[0x20:0xA0] != bytes(0x80)  # four VMPCKs
    entry = next(e for e in expected_digest(plan).log if e.page_type == PageType.SECRETS)
    assert entry.contents_sha384 is None


def test_launch_pages_end_guest_valid_and_vmsas_carry_the_vmsa_bit():
    g = load_manifest()["hello64"]
    res = launch_plan(guest_launch_plan(g.load(), g.mode, g.memory, vcpus=2), g.memory,
                      DEFAULT_POLICY)
    vm = res.vm
    e, _ = vm.fw.rmp.effective(vm.gmem_pfn(1))
    assert (e.assigned, e.asid, e.gpa, e.validated, e.immutable, e.vmsa) == \
        (True, vm.asid, 0x1000, True, False, False)
    for pfn in vm.vcpu_vmsas:
        e, _ = vm.fw.rmp.effective(pfn)
        assert (e.gpa, e.validated, e.vmsa) == (INITIAL_VMSA_GPA, True, True)
    st = vm.fw.guest_status(vm.gctx_spa)
    assert (st.state, st.asid, st.policy) == (SnpGuestState.RUNNING, vm.asid, DEFAULT_POLICY)


# -- platform and guest states -------------------------------------------------------

def _fw_ready():
    fw = SimulatedSnpFirmware(host_pages=1 << 12)
    fw.snp_init()
    fw.alloc_firmware_page(0x100)
    fw.gctx_create(0x100 << 12)
    return fw, 0x100 << 12


def _status(excinfo) -> SevStatus:
    return SevStatus(excinfo.value.fw_error)


def test_platform_states():
    fw = SimulatedSnpFirmware(host_pages=1 << 12)
    assert fw.platform_status().state == SnpPlatformState.UNINIT
    fw.alloc_firmware_page(0x100)
    with pytest.raises(SevError) as ei:
        fw.gctx_create(0x100 << 12)
    assert _status(ei) == SevStatus.INVALID_PLATFORM_STATE
    fw.snp_init()
    st = fw.platform_status()
    assert (st.state, st.is_rmp_initialized) == (SnpPlatformState.INIT, True)
    assert len(st.to_bytes()) == 32
    with pytest.raises(SevError) as ei:
        fw.snp_init()
    assert _status(ei) == SevStatus.INVALID_PLATFORM_STATE and ei.value.errno == errno.EIO
    fw.gctx_create(0x100 << 12)
    with pytest.raises(SevError) as ei:
        fw.snp_shutdown()
    assert _status(ei) == SevStatus.INVALID_PLATFORM_STATE
    fw.decommission(0x100 << 12)
    fw.snp_shutdown()
    assert fw.platform_status().state == SnpPlatformState.UNINIT


def test_snp_init_after_legacy_sev_init_is_refused():
    fw = SimulatedSnpFirmware(host_pages=1 << 12)
    fw.sev_legacy_initialized = True
    with pytest.raises(SevError) as ei:
        fw.snp_init()
    assert _status(ei) == SevStatus.INVALID_PLATFORM_STATE


def test_context_page_must_be_firmware_owned():
    fw = SimulatedSnpFirmware(host_pages=1 << 12)
    fw.snp_init()
    with pytest.raises(SevError) as ei:
        fw.gctx_create(0x200 << 12)  # a hypervisor page
    assert _status(ei) == SevStatus.INVALID_PAGE_STATE
    with pytest.raises(SevError) as ei:
        fw.gctx_create(0x200 << 12 | 8)
    assert _status(ei) == SevStatus.INVALID_ADDRESS


def test_launch_start_twice_and_unknown_context():
    fw, ctx = _fw_ready()
    fw.launch_start(ctx, DEFAULT_POLICY)
    with pytest.raises(SevError) as ei:
        fw.launch_start(ctx, DEFAULT_POLICY)
    assert _status(ei) == SevStatus.INVALID_GUEST_STATE
    with pytest.raises(SevError) as ei:
        fw.launch_start(0x300 << 12, DEFAULT_POLICY)
    assert _status(ei) == SevStatus.INVALID_GUEST


def test_activate_asid_rules():
    fw, ctx = _fw_ready()
    fw.alloc_firmware_page(0x101)
    fw.gctx_create(0x101 << 12)
    with pytest.raises(SevError) as ei:
        fw.activate(ctx, 0)
    assert _status(ei) == SevStatus.INVALID_ASID
    with pytest.raises(SevError) as ei:
        fw.activate(ctx, fw.max_snp_asid + 1)
    assert _status(ei) == SevStatus.INVALID_ASID
    fw.activate(ctx, 5)
    with pytest.raises(SevError) as ei:
        fw.activate(0x101 << 12, 5)
    assert _status(ei) == SevStatus.ASID_OWNED


# -- policy ----------------------------------------------------------------------------

@pytest.mark.parametrize("policy, why", [
    (0x10000, "bit 17"),                       # RSVD_MBO clear
    (0x30000 | 1 << 18, "not supported"),      # MIGRATE_MA: not in KVM_SNP_POLICY_MASK_VALID
    (0x30000 | 1 << 40, "not supported"),      # reserved bit
])
def test_kvm_refuses_bad_policies_with_einval_before_the_firmware(policy, why):
    fw = SimulatedSnpFirmware(host_pages=1 << 12)
    vm = KvmSnpVm(fw, 0x40000)
    vm.sev_init2()
    with pytest.raises(SevError) as ei:
        vm.launch_start(policy)
    assert ei.value.errno == errno.EINVAL and ei.value.fw_error is None
    assert why in str(ei.value)
    assert not fw.guests  # never reached SNP_GCTX_CREATE


@pytest.mark.parametrize("policy, platform, reason", [
    (0x30000 | 1 << 8 | 56, PlatformFeatures(abi_major=1, abi_minor=55), "ABI 1.56"),
    (0x30000 | 2 << 8, PlatformFeatures(abi_major=1, abi_minor=55), "ABI 2.0"),
    (0x20000, PlatformFeatures(smt_enabled=True), "SMT"),
    (0x30000 | 1 << 22, PlatformFeatures(aes_256_xts=False), "AES-256"),
    (0x30000 | 1 << 23, PlatformFeatures(rapl_disabled=False), "RAPL"),
    (0x30000 | 1 << 24, PlatformFeatures(ciphertext_hiding=False), "ciphertext"),
])
def test_firmware_policy_failures(policy, platform, reason):
    fw = SimulatedSnpFirmware(host_pages=1 << 12, platform=platform)
    vm = KvmSnpVm(fw, 0x40000)
    vm.sev_init2()
    with pytest.raises(SevError) as ei:
        vm.launch_start(policy)
    assert ei.value.errno == errno.EIO and _status(ei) == SevStatus.POLICY_FAILURE
    assert reason in str(ei.value)
    assert not fw.guests  # KVM decommissioned the context


def test_policy_that_passes_and_the_abi_minimum_boundary():
    fw = SimulatedSnpFirmware(host_pages=1 << 12, platform=PlatformFeatures(smt_enabled=False))
    vm = KvmSnpVm(fw, 0x40000)
    vm.sev_init2()
    vm.launch_start(0x20000 | 1 << 8 | 55)  # exactly the firmware's 1.55, no SMT needed
    assert fw.guest_status(vm.gctx_spa).state == SnpGuestState.LAUNCH


def test_firmware_rejects_reserved_bits_it_is_handed_directly():
    fw, ctx = _fw_ready()
    for policy in (0x10000, 0x30000 | 1 << 26):
        with pytest.raises(SevError) as ei:
            fw.launch_start(ctx, policy)
        assert _status(ei) == SevStatus.POLICY_FAILURE


def test_policy_parse_and_text():
    p = SnpPolicy.parse("smt,rsvd-mbo,debug,abi=1.51")
    assert p.value == 0x30000 | 1 << 19 | 1 << 8 | 51
    assert SnpPolicy.parse(str(p)) == p
    assert SnpPolicy.parse("0x30000").smt


# -- LAUNCH_UPDATE errors ----------------------------------------------------------------

def _vm_started(memory=0x40000):
    fw = SimulatedSnpFirmware(host_pages=1 << 12)
    vm = KvmSnpVm(fw, memory)
    vm.sev_init2()
    vm.create_vcpu()
    vm.launch_start(DEFAULT_POLICY)
    return vm


def test_launch_update_after_finish():
    vm = _vm_started()
    vm.set_memory_attributes(0x10000, 2 * PAGE, True)
    vm.launch_update(0x10, bytes(PAGE), PAGE, PageType.NORMAL)
    g = load_manifest()["hello64"]
    vmsa = guest_launch_plan(g.load(), g.mode, g.memory).vmsa_pages()[0].data
    vm.launch_finish([vmsa])
    with pytest.raises(SevError) as ei:  # a fresh private page: the firmware says why
        vm.launch_update(0x11, bytes(PAGE), PAGE, PageType.NORMAL)
    assert ei.value.errno == errno.EIO and _status(ei) == SevStatus.INVALID_GUEST_STATE
    with pytest.raises(SevError) as ei:  # an already-launched page: KVM's RMP check (EEXIST
        vm.launch_update(0x10, bytes(PAGE), PAGE, PageType.NORMAL)  # inside, EIO outside)
    assert ei.value.errno == errno.EIO and ei.value.fw_error is None and "EEXIST" in str(ei.value)
    with pytest.raises(SevError) as ei:
        vm.fw.launch_finish(vm.gctx_spa)
    assert _status(ei) == SevStatus.INVALID_GUEST_STATE


@pytest.mark.parametrize("args, err", [
    ((0x10, bytes(PAGE), 0, PageType.NORMAL), errno.EINVAL),        # len 0
    ((0x10, bytes(PAGE), 100, PageType.NORMAL), errno.EINVAL),      # not page aligned
    ((0x10, bytes(PAGE), PAGE, PageType.VMSA), errno.EINVAL),       # VMSA only via FINISH
    ((0x10, bytes(PAGE), PAGE, 7), errno.EINVAL),                   # no such type
    ((0x10, bytes(10), PAGE, PageType.NORMAL), errno.EFAULT),       # short source
    ((0x1000, bytes(PAGE), PAGE, PageType.NORMAL), errno.EINVAL),   # no memslot there
])
def test_kvm_launch_update_argument_errors(args, err):
    vm = _vm_started()
    vm.set_memory_attributes(0x10000, PAGE, True)
    with pytest.raises(SevError) as ei:
        vm.launch_update(*args)
    assert ei.value.errno == err and ei.value.fw_error is None


def test_a_page_that_is_not_private_fails_the_first_page_with_eio():
    vm = _vm_started()
    with pytest.raises(SevError) as ei:
        vm.launch_update(0x20, bytes(PAGE), PAGE, PageType.NORMAL)
    assert ei.value.errno == errno.EIO and ei.value.fw_error is None
    assert "KVM_SET_MEMORY_ATTRIBUTES" in str(ei.value)


def test_a_failure_after_the_first_page_ends_the_ioctl_early_without_error():
    """kvm_gmem_populate returns the pages done; snp_launch_update writes the rest back."""
    vm = _vm_started()
    vm.set_memory_attributes(0x10000, 2 * PAGE, True)  # 0x12 stays shared
    data = bytes([1]) * PAGE + bytes([2]) * PAGE + bytes([3]) * PAGE
    res = vm.launch_update(0x10, data, 3 * PAGE, PageType.NORMAL)
    assert (res.gfn_start, res.len, res.uaddr_advance) == (0x12, PAGE, 2 * PAGE)
    g = gctx.GCTX()
    g.update_normal_pages(0x10000, data[:2 * PAGE])
    assert vm.launch_digest == g.ld()


def test_firmware_page_state_errors():
    fw, ctx = _fw_ready()
    fw.launch_start(ctx, DEFAULT_POLICY)
    with pytest.raises(SevError) as ei:  # not activated yet
        fw.launch_update(ctx, 0x400 << 12, PageType.NORMAL)
    assert _status(ei) == SevStatus.INACTIVE
    fw.activate(ctx, 3)
    with pytest.raises(SevError) as ei:  # hypervisor-owned page
        fw.launch_update(ctx, 0x400 << 12, PageType.NORMAL)
    assert _status(ei) == SevStatus.INVALID_PAGE_STATE
    fw.rmp.make_private(0x401, 0x1000, False, 4, True)  # another guest's ASID
    with pytest.raises(SevError) as ei:
        fw.launch_update(ctx, 0x401 << 12, PageType.NORMAL)
    assert _status(ei) == SevStatus.INVALID_PAGE_OWNER
    fw.rmp.make_private(0x402, 0x2000, False, 3, False)  # mutable: Guest-Invalid, not Pre-Guest
    with pytest.raises(SevError) as ei:
        fw.launch_update(ctx, 0x402 << 12, PageType.NORMAL)
    assert _status(ei) == SevStatus.INVALID_PAGE_STATE
    fw.rmp.make_private(0x600, 0x200000, True, 3, True)  # a 2 MiB RMP entry
    with pytest.raises(SevError) as ei:
        fw.launch_update(ctx, 0x600 << 12, PageType.NORMAL)
    assert _status(ei) == SevStatus.INVALID_PAGE_SIZE
    for bad in (0x403 << 12 | 0x10, (1 << 12) << 12 * 2):
        with pytest.raises(SevError) as ei:
            fw.launch_update(ctx, bad, PageType.NORMAL)
        assert _status(ei) == SevStatus.INVALID_ADDRESS
    with pytest.raises(SevError) as ei:
        fw.launch_update(ctx, 0x403 << 12, 9)
    assert _status(ei) == SevStatus.INVALID_PARAM


def test_vmsa_page_at_a_bad_gpa_or_without_snp_active():
    fw, ctx = _fw_ready()
    fw.launch_start(ctx, DEFAULT_POLICY)
    fw.activate(ctx, 3)
    vmsa = bytearray(PAGE)
    vmsa[0x3B0] = 1
    fw.memory.write_page(0x410, bytes(vmsa))
    fw.rmp.make_private(0x410, 1 << 52, False, 3, True)  # GPA beyond 52 bits
    with pytest.raises(SevError) as ei:
        fw.launch_update(ctx, 0x410 << 12, PageType.VMSA)
    assert _status(ei) == SevStatus.INVALID_ADDRESS
    fw.memory.write_page(0x411, bytes(PAGE))  # SEV_FEATURES without SNPActive
    fw.rmp.make_private(0x411, INITIAL_VMSA_GPA, False, 3, True)
    with pytest.raises(SevError) as ei:
        fw.launch_update(ctx, 0x411 << 12, PageType.VMSA)
    assert _status(ei) == SevStatus.INVALID_PARAM
    before = fw.launch_digest(ctx)
    fw.memory.write_page(0x412, bytes(vmsa))
    fw.rmp.make_private(0x412, INITIAL_VMSA_GPA, False, 3, True)
    fw.launch_update(ctx, 0x412 << 12, PageType.VMSA)
    assert fw.launch_digest(ctx) != before


def test_kvm_finish_with_a_bad_vmsa_reports_the_firmware_error():
    vm = _vm_started()
    with pytest.raises(SevError) as ei:
        vm.launch_finish([bytes(PAGE)])  # SEV_FEATURES 0: not an SNP VMSA
    assert ei.value.errno == errno.EIO and _status(ei) == SevStatus.INVALID_PARAM
    assert "KVM_SEV_SNP_LAUNCH_FINISH" in str(ei.value)


# -- the CPUID page ---------------------------------------------------------------------

def test_cpuid_page_passes_and_is_measured_as_zeros():
    vm = _vm_started()
    vm.set_memory_attributes(SNP_CPUID_GPA, PAGE, True)
    page = cpuid_page(default_cpuid_entries(MILAN_SIG))
    res = vm.launch_update(SNP_CPUID_GPA >> 12, page, PAGE, PageType.CPUID)
    assert (res.data, res.len) == (page, 0)
    g = gctx.GCTX()
    g.update_cpuid_page(SNP_CPUID_GPA)
    assert vm.launch_digest == g.ld()


def test_cpuid_page_with_features_the_part_lacks_returns_corrected_entries():
    vm = _vm_started()
    vm.set_memory_attributes(SNP_CPUID_GPA, PAGE, True)
    entries = default_cpuid_entries(MILAN_SIG)
    lie = CpuidEntry(0x7, 0, 0, entries[2].ebx | 1 << 1, entries[2].ecx | 1 << 31, entries[2].edx)
    entries[2] = lie
    before = vm.fw.launch_digest(vm.gctx_spa)
    with pytest.raises(SevError) as ei:
        vm.launch_update(SNP_CPUID_GPA >> 12, cpuid_page(entries), PAGE, PageType.CPUID)
    assert ei.value.errno == errno.EIO and _status(ei) == SevStatus.INVALID_PARAM
    count, fixed = parse_cpuid_page(vm.cpuid_copyback)
    assert count == len(entries)
    hw = vm.fw.hw_cpuid[(0x7, 0)]
    assert fixed[2].ebx == lie.ebx & hw[1] and not fixed[2].ecx & 1 << 31
    assert fixed[1] == entries[1]  # the entries that passed come back unchanged
    assert vm.fw.launch_digest(vm.gctx_spa) == before  # nothing measured
    assert vm.fw.rmp.lookup(vm.gmem_pfn(SNP_CPUID_GPA >> 12)) == (False, 0)  # reclaimed, shared
    # the VMM retries with the firmware's table, as QEMU does
    vm.launch_update(SNP_CPUID_GPA >> 12, vm.cpuid_copyback, PAGE, PageType.CPUID)


def test_cpuid_page_with_too_many_entries():
    fw, ctx = _fw_ready()
    fw.launch_start(ctx, DEFAULT_POLICY)
    fw.activate(ctx, 3)
    page = bytearray(cpuid_page(default_cpuid_entries(MILAN_SIG)))
    page[0:4] = struct.pack("<I", 65)
    fw.memory.write_page(0x420, bytes(page))
    fw.rmp.make_private(0x420, SNP_CPUID_GPA, False, 3, True)
    with pytest.raises(SevError) as ei:
        fw.launch_update(ctx, 0x420 << 12, PageType.CPUID)
    assert _status(ei) == SevStatus.INVALID_PARAM


# -- LAUNCH_FINISH with an ID block -------------------------------------------------------

def _id_block(ld: bytes, policy: int, id_key, author_key=None, *, tamper=False):
    idb = pytest.importorskip("sevsnpmeasure.id_block")
    block = bytes(idb.IdBlock(launch_digest=idb.LaunchDigest.from_buffer_copy(ld),
                              ids=bytes(32), version=1, guest_svn=bytes(4), policy=policy))
    sig = bytearray(idb.sign_in_snp_format(id_key, block))
    if tamper:
        sig[0] ^= 1
    auth = idb.IdAuth(id_key_algo=1, auth_key_algo=1 if author_key else 0,
                      block_sig=idb.ECSignature.from_buffer_copy(bytes(sig)),
                      id_key=idb.ECPubKey.from_buffer_copy(idb.marshal_ec_public_key(id_key)))
    if author_key:
        auth.id_key_sig = idb.ECSignature.from_buffer_copy(
            idb.sign_in_snp_format(author_key, idb.marshal_ec_public_key(id_key)))
        auth.author_key = idb.ECPubKey.from_buffer_copy(idb.marshal_ec_public_key(author_key))
    return block, bytes(auth), idb


def _keys():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())


def _vm_ready_to_finish():
    g = load_manifest()["hello64"]
    plan = guest_launch_plan(g.load(), g.mode, g.memory)
    fw = SimulatedSnpFirmware(host_pages=1 << 12)
    vm = KvmSnpVm(fw, g.memory)
    vm.sev_init2()
    vm.create_vcpu()
    vm.launch_start(DEFAULT_POLICY)
    for p in plan.memory_pages():
        vm.set_memory_attributes(p.gpa, PAGE, True)
        vm.launch_update(p.gpa >> 12, p.data, PAGE, p.page_type)
    return vm, plan, expected_digest(plan).digest


def test_id_block_with_author_key_is_accepted_and_its_digests_kept():
    vm, plan, ld = _vm_ready_to_finish()
    id_key, author = _keys()
    block, auth, idb = _id_block(ld, DEFAULT_POLICY, id_key, author)
    vm.launch_finish([p.data for p in plan.vmsa_pages()], id_block=block, id_auth=auth,
                     auth_key_en=True)
    guest = vm.fw.guests[vm.gctx_spa >> 12]
    assert guest.id_key_digest == idb.pub_to_digest(id_key)
    assert guest.author_key_digest == idb.pub_to_digest(author)
    assert guest.state == SnpGuestState.RUNNING


@pytest.mark.parametrize("case, status", [
    ("wrong-digest", SevStatus.BAD_MEASUREMENT),
    ("wrong-policy", SevStatus.POLICY_FAILURE),
    ("bad-signature", SevStatus.BAD_SIGNATURE),
    ("bad-author-signature", SevStatus.BAD_SIGNATURE),
])
def test_id_block_failures(case, status):
    vm, plan, ld = _vm_ready_to_finish()
    id_key, author = _keys()
    if case == "wrong-digest":
        block, auth, _ = _id_block(bytes(48), DEFAULT_POLICY, id_key)
    elif case == "wrong-policy":
        block, auth, _ = _id_block(ld, DEFAULT_POLICY | 1 << 19, id_key)
    elif case == "bad-signature":
        block, auth, _ = _id_block(ld, DEFAULT_POLICY, id_key, tamper=True)
    else:
        block, auth, _ = _id_block(ld, DEFAULT_POLICY, id_key, author)
        auth = auth[:0x680] + bytes([auth[0x680] ^ 1]) + auth[0x681:]
    with pytest.raises(SevError) as ei:
        vm.launch_finish([p.data for p in plan.vmsa_pages()], id_block=block, id_auth=auth,
                         auth_key_en=case == "bad-author-signature")
    assert ei.value.errno == errno.EIO and _status(ei) == status


# -- KVM_SEV_INIT2 ------------------------------------------------------------------------

def test_sev_init2_rules():
    fw = SimulatedSnpFirmware(host_pages=1 << 12)
    vm = KvmSnpVm(fw, 0x40000)
    for kwargs in ({"flags": 1}, {"ghcb_version": 1}, {"ghcb_version": 3},
                   {"vmsa_features": 1 << 5}):
        with pytest.raises(SevError) as ei:
            vm.sev_init2(**kwargs)
        assert ei.value.errno == errno.EINVAL
    vm.sev_init2()
    assert (vm.ghcb_version, vm.vmsa_features) == (2, 1)
    assert fw.state == SnpPlatformState.INIT
    with pytest.raises(SevError):
        vm.sev_init2()
    with pytest.raises(SevError) as ei:
        KvmSnpVm(fw, 0x40000).launch_start(DEFAULT_POLICY)
    assert ei.value.errno == errno.ENOTTY


# -- bad input never crashes ---------------------------------------------------------------

def test_random_firmware_inputs_give_a_status_or_succeed():
    rng = random.Random(1605)
    fw, ctx = _fw_ready()
    fw.launch_start(ctx, DEFAULT_POLICY)
    fw.activate(ctx, 3)
    outcomes = set()
    for _ in range(400):
        pfn = rng.choice([rng.randrange(0x400, 0x480), rng.randrange(1 << 13)])
        if rng.random() < 0.6 and fw.rmp.covered(pfn):
            try:
                fw.rmp.make_private(pfn, rng.randrange(1 << 20) << 12, False,
                                    rng.choice([3, 3, 4]), rng.random() < 0.8)
            except Exception:
                pass
        try:
            fw.launch_update(rng.choice([ctx, ctx, 0x999 << 12]),
                             pfn << 12 | rng.choice([0, 0, 0, 8]),
                             rng.choice([1, 2, 3, 4, 5, 6, 0, 7]),
                             vmpl1_perms=rng.choice([0, 0, 0xFF]))
            outcomes.add("ok")
        except SevError as e:
            outcomes.add(SevStatus(e.fw_error).name)
    assert "ok" in outcomes and len(outcomes) >= 5


def test_launch_digest_class_matches_gctx_update_for_random_pages():
    rng = random.Random(7)
    ours, theirs = LaunchDigest(), gctx.GCTX()
    for _ in range(50):
        gpa = rng.randrange(1 << 30) & ~0xFFF
        page = rng.randbytes(PAGE)
        kind = rng.choice([PageType.NORMAL, PageType.ZERO, PageType.UNMEASURED,
                           PageType.SECRETS, PageType.CPUID, PageType.VMSA])
        ours.update(INITIAL_VMSA_GPA if kind == PageType.VMSA else gpa, kind, page)
        {PageType.NORMAL: lambda: theirs.update_normal_pages(gpa, page),
         PageType.ZERO: lambda: theirs.update_zero_pages(gpa, PAGE),
         PageType.UNMEASURED: lambda: theirs.update_unmeasured_pages(gpa, PAGE),
         PageType.SECRETS: lambda: theirs.update_secrets_page(gpa),
         PageType.CPUID: lambda: theirs.update_cpuid_page(gpa),
         PageType.VMSA: lambda: theirs.update_vmsa_page(page)}[kind]()
        assert ours.digest == theirs.ld()


def test_page_types_and_vm_type_are_the_bindings_numbers():
    from kvmharness.kvm import _ffi

    for t in (PageType.NORMAL, PageType.ZERO, PageType.UNMEASURED, PageType.SECRETS,
              PageType.CPUID):
        assert _ffi.CONSTANTS[f"KVM_SEV_SNP_PAGE_TYPE_{t.name}"] == t
    assert _ffi.CONSTANTS["KVM_X86_SNP_VM"] == 4
    assert _ffi.CONSTANTS["KVM_SEV_SNP_ID_BLOCK_SIZE"] == 96
    assert _ffi.CONSTANTS["KVM_SEV_SNP_ID_AUTH_SIZE"] == 4096
    # the KVM argument structs carry what the model's ioctls take
    assert _ffi.ffi.sizeof("struct kvm_sev_snp_launch_update") == 64
    assert _ffi.ffi.offsetof("struct kvm_sev_snp_launch_finish", "host_data") == 19


def test_platform_status_bytes_read_back_through_the_bindings_struct():
    from kvmharness.kvm import _ffi

    fw = SimulatedSnpFirmware(host_pages=1 << 12, api_major=1, api_minor=57, build=9)
    fw.snp_init()
    fw.alloc_firmware_page(0x100)
    fw.gctx_create(0x100 << 12)
    raw = fw.platform_status().to_bytes()
    st = _ffi.ffi.new("struct sev_user_data_snp_status *")
    _ffi.ffi.buffer(st)[:] = raw
    assert (st.api_major, st.api_minor, st.state, st.is_rmp_initialized, st.build_id,
            st.guest_count) == (1, 57, 1, 1, 9, 1)


def test_secrets_page_layout_matches_edk2s_snp_secrets_page():
    """edk2 MdePkg/Include/Register/Amd/SnpSecretsPage.h (SNP ABI 1.51 §8.17.2.5):
    Version u32 @0, ImiEn bit @4, Fms u32 @8, Gosvw[16] @0x10, Vmpck0..3[32] @0x20..0x9F."""
    fw, ctx = _fw_ready()
    gosvw = bytes(range(16))
    fw.launch_start(ctx, DEFAULT_POLICY, gosvw=gosvw)
    fw.activate(ctx, 3)
    fw.rmp.make_private(0x430, SNP_SECRETS_GPA, False, 3, True)
    fw.launch_update(ctx, 0x430 << 12, PageType.SECRETS)
    page = fw.memory.read_page(0x430)
    assert page[0x10:0x20] == gosvw
    vmpcks = [page[0x20 + 32 * i:0x40 + 32 * i] for i in range(4)]
    assert len(set(vmpcks)) == 4 and bytes(32) not in vmpcks
    assert page[0xA0:] == bytes(4096 - 0xA0)  # the OS area starts empty


def test_vmpl_permissions_enter_page_info_and_the_log_carries_them():
    """PAGE_INFO bytes 0x64-0x66 are VMPL3/2/1 permissions (sev-snp-measure always 0)."""
    import hashlib

    from kvmharness.snp.measure import LogEntry, page_info

    d = LaunchDigest()
    page = bytes(range(256)) * 16
    entry = d.update(0x5000, PageType.NORMAL, page, vmpl1=0xF, vmpl3=0x1)
    info = page_info(bytes(48), hashlib.sha384(page).digest(), 1, 0x5000, vmpl1=0xF, vmpl3=0x1)
    assert info[0x64:0x67] == bytes([0x1, 0x0, 0xF]) and d.digest == hashlib.sha384(info).digest()
    js = entry.to_json()
    assert js["vmpl_perms"] == [0xF, 0, 0x1]
    assert replay([js]) == d.digest == replay([LogEntry.from_json(js)])
    plain = LaunchDigest()
    assert "vmpl_perms" not in plain.update(0x5000, PageType.NORMAL, page).to_json()
    assert plain.digest != d.digest
