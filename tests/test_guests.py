"""Every manifest guest on every backend usable here (the `backend` fixture:
kvm where /dev/kvm works, and always sim), checked against what the harness set up; on
kvm once per exit path (compiled and pure Python)."""

import pytest

from kvmharness import protocol as P
from kvmharness.errors import GuestTimeout
from kvmharness.exits import IoOut, MmioRead, MmioWrite, MsrRead, MsrWrite, Shutdown
from kvmharness.hostinfo import cpuid_deviations
from kvmharness.images import load_manifest
from kvmharness.machine import Machine, run_guest
from kvmharness.x86 import CpuidEntry

REG_NAMES = ("eax", "ebx", "ecx", "edx")


@pytest.fixture(autouse=True)
def _on_each_exit_path(exit_path):
    """Every kvm item here runs twice, on the compiled and on the pure-Python exit path
    (kvm-compiled, kvm-python; the plugin's ``exit_path`` fixture), so one test run covers
    both; the simulator's items run once."""
    return exit_path


def test_each_kvm_item_runs_on_its_exit_path(backend, exit_path, machine_factory):
    m = machine_factory("hello")
    assert m.run().ok
    assert m.exit_path == (exit_path or "python")  # the simulator's loop is the Python one


def test_hello_prints_through_the_console_port(backend):
    r = run_guest("hello", backend)
    assert r.outcome == "done" and r.ok
    assert r.console == "Hello from a 16-bit real-mode guest\n"
    assert all(isinstance(t.exit, IoOut) for t in r.exits)
    assert sum(1 for t in r.exits if t.exit.port == P.CONSOLE_PORT) == len(r.console)


def test_hello64_runs_in_long_mode(backend, machine_factory):
    m = machine_factory("hello64")
    r = m.run()
    assert r.ok and r.console == "Hello from a 64-bit long-mode guest\n"
    s = m.vcpu.get_sregs()
    assert s.efer & 0x500 == 0x500 and s.cr0 & 0x80000001 == 0x80000001 and s.cs.l == 1


def test_cpuid_guest_sees_exactly_the_table_set_with_set_cpuid(backend, machine_factory):
    m = machine_factory("cpuid")
    r = m.run()
    assert r.ok, r.describe()
    exempt = cpuid_deviations(backend)
    checked = 0
    for key, value in r.reports:
        fn, idx, reg = key >> 32, (key >> 8) & 0xFFFFFF, key & 0xFF
        entry = m.cpuid.lookup(fn, idx)
        want = getattr(entry, REG_NAMES[reg]) if entry else 0
        if (fn, idx, REG_NAMES[reg]) in exempt:
            continue
        assert value == want, f"CPUID {fn:#x}.{idx} {REG_NAMES[reg]}: guest saw {value:#x}, table has {want:#x}"
        checked += 1
    assert checked >= 30


def test_a_cpuid_override_reaches_the_guest(backend, machine_factory):
    """A guest's `cpuid` overrides (a manifest key) replace the backend's probed entry: the
    guest sees exactly them.  The values are this test's input, not any host's (the shipped
    manifest holds no host facts: every guest sees the backend's own table)."""
    import dataclasses

    from kvmharness.images import get_guest

    leaf = CpuidEntry(0x8000001F, 0, 0, 0x12345678, 0x9ABCDEF0, 0x0F1E2D3C, 0x4B5A6978)
    image = dataclasses.replace(get_guest("cpuid"), cpuid=(leaf,))
    r = machine_factory(image).run()
    assert r.ok, r.describe()
    seen = {k & 0xFF: v for k, v in r.reports if k >> 32 == 0x8000001F}
    assert seen == {0: leaf.eax, 1: leaf.ebx, 2: leaf.ecx, 3: leaf.edx}


def test_msr_guest_reaches_userspace_through_the_filter(backend):
    r = run_guest("msr", backend)
    assert r.ok, r.describe()
    assert r.reports == [(0x130, 0xFEDCBA9876543210), (0x130, 0x0123456789ABCDEF)]
    msr_exits = [t.exit for t in r.exits if isinstance(t.exit, (MsrRead, MsrWrite))]
    assert [type(e).__name__ for e in msr_exits] == ["MsrWrite", "MsrRead", "MsrWrite", "MsrRead"]
    assert all(e.index == 0xC0010130 for e in msr_exits)
    assert msr_exits[0].value == 0xFEDCBA9876543210


def test_mmio_guest_every_size(backend, machine_factory):
    m = machine_factory("mmio")
    r = m.run()
    assert r.ok, r.describe()
    assert r.values == {1: 0xA5, 2: 0xBEEF, 4: 0xCAFEF00D, 8: 0x1122334455667788}
    writes = [t.exit for t in r.exits if isinstance(t.exit, MmioWrite)]
    assert sorted(w.size for w in writes) == [1, 2, 4, 8]
    assert all(P.MMIO_TEST_ADDR <= w.addr < P.MMIO_TEST_ADDR + 0x1000 for w in writes)
    assert any(isinstance(t.exit, MmioRead) and t.exit.size == 8 for t in r.exits)


def test_fault_is_a_shutdown_exit(backend):
    r = run_guest("fault", backend)
    assert r.outcome == "shutdown" and isinstance(r.final_exit, Shutdown)


def test_fail_reports_code_and_line(backend):
    r = run_guest("fail", backend)
    assert r.outcome == "fail" and r.fail_code == 7
    src = load_manifest()["fail"].source.read_text().splitlines()
    assert "FAIL(7)" in src[r.fail_line - 1]


def test_spin_times_out_and_the_vm_is_torn_down(backend):
    m = Machine.for_guest("spin", backend)
    with pytest.raises(GuestTimeout, match="did not finish within 0.3 s"):
        m.run(0.3)
    assert m.vcpu is None and m.vm is None  # torn down
    r = run_guest("spin", backend, timeout=0.2)
    assert r.outcome == "timeout" and r.ok


def test_unexpected_exception_is_reported_with_vector_and_rip(backend, machine_factory):
    m = machine_factory("hello64")
    ud2_at = P.GUEST_LOAD_ADDR
    m.vm.write(ud2_at, b"\x0f\x0b")  # ud2 at the entry point
    r = m.run(5)
    assert r.outcome == "exception" and r.exception_vector == 6 and r.exception_rip == ud2_at
    assert "#UD" in r.describe()


def test_vmmcall_with_the_hypercall_quirk_disabled(backend, machine_factory):
    """kvm_pvm (these machines) raises #UD for VMMCALL at CPL0 (measured), as does the
    simulator's kvm_pvm profile; kvm_amd (and the simulator's default profile) treats it as
    KVM's own hypercall: unknown nr -> RAX = -KVM_ENOSYS."""
    from kvmharness.hostinfo import kvm_device_info

    m = machine_factory("hello64")
    m.vm.write(P.GUEST_LOAD_ADDR, b"\xb8\xad\xde\x00\x00\x0f\x01\xd9\xf4")  # mov $0xdead,%eax; vmmcall; hlt
    r = m.run(5)
    module = kvm_device_info()["module"] if backend == "kvm" else m.system.profile.name
    if module == "kvm_amd":
        assert r.outcome == "hlt" and r.regs.rax == 2**64 - 1000
    else:
        assert r.outcome == "exception" and r.exception_vector == 6
        assert r.exception_rip == P.GUEST_LOAD_ADDR + 5


@pytest.mark.requires_sim
def test_vmmcall_is_ud_on_the_sims_kvm_pvm_profile():
    """The simulator's kvm_pvm profile (what the contract suite uses on these machines)."""
    from kvmharness.sim.system import SimSystem

    with SimSystem(profile="kvm_pvm") as system:
        m = Machine.for_guest("hello64", system)
        try:
            m.vm.write(P.GUEST_LOAD_ADDR, b"\xb8\xad\xde\x00\x00\x0f\x01\xd9\xf4")
            r = m.run(5)
        finally:
            m.close()
    assert r.outcome == "exception" and r.exception_vector == 6
    assert r.exception_rip == P.GUEST_LOAD_ADDR + 5


def test_complete_without_a_pending_read_is_the_same_error_on_every_backend(backend, machine_factory):
    from kvmharness.errors import UsageError

    m = machine_factory("halt")
    assert m.run().outcome == "hlt"
    with pytest.raises(UsageError, match="asked for no data"):
        m.vcpu.complete(1)
