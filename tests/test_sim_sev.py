"""SEV and SEV-ES guests on the simulator (kvmharness/sim/sev.py, seves.py), end to end.

Launches go through Machine.for_guest(..., sev=...), i.e. the same launch code the
kvm backend runs: KVM_SEV_INIT*, UPDATE_DATA over boot tables + image, (UPDATE_VMSA),
MEASURE verified with the owner's TIK where an owner is given, FINISH.
"""

from __future__ import annotations

import errno

import pytest

from kvmharness import exits as X
from kvmharness import protocol as P
from kvmharness.boot import long_mode_tables
from kvmharness.errors import KvmError, SevError
from kvmharness.images import get_guest
from kvmharness.machine import Machine, run_guest
from kvmharness.sev.launch import expected_vmsa_pages
from kvmharness.sev.policy import GuestPolicy
from kvmharness.sev.session import GuestOwner
from kvmharness.sev.status import SevStatus

from kvmharness.sim.kvmlayer import cpuid_lookup  # noqa: E402
from kvmharness.sim.sev import SevVcpu  # noqa: E402
from kvmharness.sim.seves import SevEsVcpu  # noqa: E402
from kvmharness.sim.svm import SVM_EXIT_CPUID, SVM_EXIT_VMGEXIT  # noqa: E402

SHARED_PAGE, PRIVATE_PAGE = 0x16000, 0x17000
SECRET = (0x2D7665732D706F74).to_bytes(8, "little") + (0x2174657263657321).to_bytes(8, "little")
LEAVES = (0x0, 0x1, 0x7, 0x80000000, 0x80000001, 0x80000008, 0x8000000A, 0x8000001F, 0x40000000)


def owner(policy="nodbg"):
    return GuestOwner(GuestPolicy.parse(policy))


# -- SEV ------------------------------------------------------------------------------------------

def test_hello64_sev_launch_verified_and_memory_is_ciphertext_to_the_host():
    image = get_guest("hello64").load()
    with Machine.for_guest("hello64", "sim", sev="sev", owner=owner()) as m:
        assert isinstance(m.vcpu, SevVcpu)
        assert m.launch_result.verified  # the firmware's measurement matched the owner's
        r = m.run(10)
        assert r.outcome == "done", r.describe()
        assert r.console == "Hello from a 64-bit long-mode guest\n"
        # the host sees ciphertext where it wrote the image and the boot tables
        host_image = m.vm.read(P.GUEST_LOAD_ADDR, len(image))
        assert host_image != image and image[:16] not in host_image
        gdt = long_mode_tables(51)[P.BOOT_GDT]
        assert m.vm.read(P.BOOT_GDT, len(gdt)) != gdt
        # ... which is the image encrypted with this guest's key at its address
        key = m.vm.sev_interface().key
        assert key.decrypt(P.GUEST_LOAD_ADDR, m.vm.read(P.GUEST_LOAD_ADDR, 256))[:len(image)] == \
            image[:256]


def test_dbg_decrypt_only_without_nodbg():
    image = get_guest("hello64").load()
    with Machine.for_guest("hello64", "sim", sev="sev", owner=owner("none")) as m:
        assert m.run(10).outcome == "done"
        assert m.launch_result.dbg_decrypt(P.GUEST_LOAD_ADDR, 32) == image[:32]
    with Machine.for_guest("hello64", "sim", sev="sev", owner=owner("nodbg")) as m:
        assert m.run(10).outcome == "done"
        with pytest.raises(SevError) as e:
            m.launch_result.dbg_decrypt(P.GUEST_LOAD_ADDR, 32)
        assert e.value.errno == errno.EIO and e.value.fw_error == SevStatus.POLICY_FAILURE


def test_sev_hello_private_page_is_ciphertext_shared_page_is_plaintext():
    with Machine.for_guest("sev-hello", "sim", sev="sev", owner=owner("none")) as m:
        r = m.run(10)
        assert r.outcome == "done", r.describe()
        v = r.values
        assert v[1] == 51  # the C-bit from CPUID 0x8000001F EBX
        assert v[2] == 1  # SEV_STATUS: SEV
        # the guest read its own secret back
        assert v[3].to_bytes(8, "little") + v[4].to_bytes(8, "little") == SECRET
        private = m.vm.read(PRIVATE_PAGE, 16)
        shared = m.vm.read(SHARED_PAGE, 16)
        assert shared == b"ev-hello shared\n"
        assert private != SECRET and private != bytes(16)
        assert m.launch_result.dbg_decrypt(PRIVATE_PAGE, 16) == SECRET
        assert m.vcpu.private_read(PRIVATE_PAGE, 16) == SECRET
        # address tweak: the same plaintext decrypted as if it lived elsewhere is garbage
        key = m.vm.sev_interface().key
        assert key.decrypt(PRIVATE_PAGE + 0x1000, private) != SECRET


def test_run_guest_launches_a_guest_that_needs_sev_in_that_mode():
    r = run_guest("sev-hello", "sim")
    assert r.outcome == "done" and r.values[2] == 1
    r = run_guest("es-terminate", "sim")
    assert r.outcome == "sev-terminated"


# -- SEV-ES ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["es-cpuid-msr", "es-cpuid-ghcb"])
def test_es_cpuid_guests_report_exactly_the_cpuid_table(name):
    with Machine.for_guest(name, "sim", sev="sev-es") as m:
        assert isinstance(m.vcpu, SevEsVcpu)
        r = m.run(10)
        assert r.outcome == "done", r.describe()
        values = r.values
        for f in LEAVES:
            expect = cpuid_lookup(m.cpuid, f, 0)
            got = tuple(values[(f << 32) | reg] for reg in range(4))
            assert got == expect, hex(f)
        # every CPUID was a #VC inside the guest, answered over VMGEXITs: no CPUID #VMEXIT
        assert m.vcpu.vc_count == len(LEAVES)
        assert not [x for x in r.hw_trace if x.exit_code == SVM_EXIT_CPUID]
        gexits = [x for x in r.hw_trace if x.exit_code == SVM_EXIT_VMGEXIT]
        assert len(gexits) == len(m.vcpu.vmgexit_trace)
        decoded = m.vcpu.vmgexit_trace
        assert decoded[0].protocol == "msr" and decoded[0].msr_request == "SEV_INFO_REQ"
        if name == "es-cpuid-msr":
            assert sum(t.msr_request == "CPUID_REQ" for t in decoded) == 4 * len(LEAVES)
        else:
            assert sum(t.sw_exit_name == "CPUID" for t in decoded) == len(LEAVES)
            assert values[0x6863620000000000] == 2  # the negotiated GHCB version


def test_es_io_guest():
    r = run_guest("es-io", "sim")
    assert r.outcome == "done", r.describe()
    assert r.console == "AES string OUT\n"
    assert r.values[0x7B01] == 0x1122334455667700
    assert r.values[0x7B04] == 0
    assert r.values[0x7C00] == 0xFEDCBA9876543210


def test_es_terminate_is_a_sev_termination():
    r = run_guest("es-terminate", "sim")
    assert r.outcome == "sev-terminated" and r.ok
    e = r.final_exit
    assert isinstance(e, X.SevTermination)
    assert e.ghcb_msr == 0x31100
    assert r.values[1] == 2


def test_es_vmsa_is_encrypted_and_state_protected():
    with Machine.for_guest("es-terminate", "sim", sev="sev-es") as m:
        v = m.vcpu
        spa, _ = m.vm.sev_interface().vmsa_pages[0]
        cipher = v.vmsa_ciphertext()
        key = m.vm.sev_interface().key
        # the state is protected now: decrypt the host's copy and check it is this vCPU's VMSA
        plain = key.decrypt(spa, cipher)
        assert cipher != plain
        assert int.from_bytes(plain[0x178:0x180], "little") == P.GUEST_LOAD_ADDR  # VMSA RIP
        assert v.vmcb.save.rip == 0 and v.vmcb.save.cr3 == 0  # nothing in the save area
        with pytest.raises(KvmError):
            v.set_regs(v.get_regs())


def test_es_expected_vmsa_matches_the_launch():
    """The owner's expected VMSA (built before UPDATE_VMSA) decrypts from the host's page."""
    m = Machine("sim", vm_type=3, create_vcpu=False)
    try:
        iface = m.vm.sev_interface()
        iface.init("sev-es")
        m.vcpu = m.vm.create_vcpu(0)
        m.load(get_guest("hello64"), c_bit=51)
        expected = expected_vmsa_pages(m.vm)[0]
        iface.launch_start(int(GuestPolicy.parse("nodbg,es")))
        iface.launch_update_vmsa()
        spa, page = iface.vmsa_pages[0]
        assert bytes(page) != expected
        assert iface.key.decrypt(spa, bytes(page)) == expected
    finally:
        m.close()


# -- what the host sees at an exit (issue 5 item 5) ----------------------------------------------

def _state_at_first_report(name, sev, **kw):
    """The vCPU state the host can read at the guest's first REPORT ucall."""
    seen = {}

    def hook(machine, e):
        if not seen and type(e) is X.IoOut and e.port == P.UCALL_PORT and e.data[:1] == b"\x01":
            s = machine.vcpu.vmcb.save
            seen.update(regs=machine.vcpu.get_regs(), rip=s.rip, rsp=s.rsp, cr3=s.cr3, rax=s.rax,
                        profile=machine.system.profile,
                        trace=list(machine.vcpu.hw_trace), sregs=machine.vcpu.get_sregs())
        return False

    with Machine.for_guest(name, "sim", sev=sev, **kw) as m:
        m.on_exit(hook)
        m.run(10)
    return seen


@pytest.mark.parametrize("sev", [None, "sev"])
def test_svm_and_sev_expose_guest_registers_at_exits(sev):
    # sev-hello: CPUID 0x8000001F, then REPORT(1, %r12) with R12 = the C-bit
    s = _state_at_first_report("sev-hello", sev)
    assert [x for x in s["trace"] if x.exit_code == SVM_EXIT_CPUID]  # the CPUID was a #VMEXIT
    assert s["regs"].r12 == 51 and s["regs"].rcx == 51 and s["regs"].rbx == 1
    # the VMCB's RIP is past the ucall's OUT (2 bytes); KVM_GET_REGS shows it there only on
    # kvm_pvm, kvm_amd shows the OUT itself until the next KVM_RUN completes it
    assert s["rip"] == s["regs"].rip + (0 if s["profile"].io_rip_past else 2)
    assert P.GUEST_LOAD_ADDR < s["rip"] < 0x9000
    assert s["rsp"] == s["regs"].rsp == 2 << 20
    assert s["cr3"] == s["sregs"].cr3 == P.BOOT_PML4


def test_sev_es_exposes_only_what_the_ghcb_holds():
    # es-cpuid-ghcb: CPUID of leaf 0 (a #VC), then ES_REPORT(key, EAX) with R8..R11 = the result.
    # A legacy KVM_SEV_ES_INIT VM (type 0): KVM still answers KVM_GET_REGS from its register
    # cache there; on the SEV-ES VM type it refuses (tests/test_sev_truth_protected_regs.py)
    s = _state_at_first_report("es-cpuid-ghcb", "sev-es", vm_type=0)
    assert not [x for x in s["trace"] if x.exit_code == SVM_EXIT_CPUID]
    assert [x for x in s["trace"] if x.exit_code == SVM_EXIT_VMGEXIT]
    regs = s["regs"]
    assert (regs.rax, regs.rbx, regs.rcx) == (1, 0, 0x10)  # op, key, value: the GHCB's RAX/RBX/RCX
    # everything else the guest holds is invisible: R8 = EAX of leaf 0, R12 = the key, RSP, RIP
    assert regs.r8 == regs.r12 == regs.rdx == regs.rsp == regs.rip == 0
    assert s["rip"] == s["rsp"] == s["cr3"] == s["rax"] == 0
    # KVM_GET_SREGS gives KVM's stale pre-launch copy: the guest runs on its own tables by now
    assert s["sregs"].cr3 == P.BOOT_PML4


# -- a hand-launched SEV-ES guest: the MSRs the CPU answers, and KVM's verdict on REG_GPA -------

# mov $0xC0010131,%ecx; rdmsr; mov %rax,%r12        (SEV_STATUS)
# mov $0xC0010130,%ecx; rdmsr; mov %rax,%r13        (EAX of the GHCB MSR KVM preloaded)
# mov $0x15012,%eax; xor %edx,%edx; wrmsr; VMGEXIT  (GHCB GPA registration: SNP only)
# hlt
REG_GPA_GUEST = bytes.fromhex("b9310101c00f324989c4b9300101c00f324989c5b81250010031d20f30"
                              "f30f01d9f4")


def test_es_msrs_are_native_and_ghcb_gpa_registration_terminates_a_non_snp_guest():
    from kvmharness.boot import load_image

    m = Machine("sim", vm_type=3, create_vcpu=False)
    try:
        iface = m.vm.sev_interface()
        iface.init("sev-es")
        m.vcpu = v = m.vm.create_vcpu(0)
        load_image(m.vm, v, REG_GPA_GUEST, "long64", m.memory,
                   m.system.capabilities.supported_cpuid, c_bit=51)
        iface.register_region(0, m.memory)
        iface.launch_start(int(GuestPolicy.parse("nodbg,es")))
        end = (P.GUEST_LOAD_ADDR + len(REG_GPA_GUEST) + 15) & ~15
        iface.launch_update_data(P.BOOT_PML4, end - P.BOOT_PML4)
        iface.launch_update_vmsa()
        iface.launch_measure(4096)
        iface.launch_finish()
        e = v.run()
        assert isinstance(e, X.SevTermination) and e.ghcb_msr == 0x15012
        from unicorn import x86_const as U

        assert v.core.reg(U.UC_X86_REG_R12) == 3  # SEV_STATUS: SEV | SEV-ES, no #VC
        # EAX of the GHCB MSR KVM preloaded: the SEV information response, C-bit in 31:24
        assert v.core.reg(U.UC_X86_REG_R13) == v.ghcb.reset_ghcb_msr() & 0xFFFFFFFF == 0x33000001
        assert v.vc_count == 0
        t = v.vmgexit_trace[-1]
        assert t.protocol == "msr" and t.outcome == "exit"
        gexit = [x for x in v.hw_trace if x.exit_code == SVM_EXIT_VMGEXIT]
        assert len(gexit) == 1 and gexit[0].exit_info_1 == 0x15012
        assert gexit[0].handled == "SevTermination"
    finally:
        m.close()
