"""--trace on the kvm backend: the kernel's own KVM tracepoints, read through tracefs."""

import pytest

from kvmharness.exits import IoOut, MsrRead, MsrWrite
from kvmharness.kvm.tracepoints import parse_trace
from kvmharness.machine import run_guest

pytestmark = pytest.mark.requires_kvm


def traced(guest):
    r = run_guest(guest, "kvm", trace=True)
    if r.kernel_trace_error:
        pytest.skip(f"kernel tracepoints unavailable: {r.kernel_trace_error}")
    return r


def test_kernel_saw_every_cpuid_the_guest_reported():
    r = traced("cpuid")
    cpuids = [e.fields for e in r.kernel_trace if e.event == "kvm_cpuid"]
    assert len(cpuids) == 9
    regs = ("rax", "rbx", "rcx", "rdx")
    for key, value in r.reports:
        fn, reg = key >> 32, key & 0xFF
        hit = next(c for c in cpuids if c["func"] == fn)
        assert hit[regs[reg]] & 0xFFFFFFFF == value


def test_one_kernel_userspace_exit_per_exit_the_harness_saw():
    r = traced("msr")
    user_exits = [e.fields["reason"] for e in r.kernel_trace if e.event == "kvm_userspace_exit"]
    names = {IoOut: "KVM_EXIT_IO", MsrRead: "KVM_EXIT_X86_RDMSR", MsrWrite: "KVM_EXIT_X86_WRMSR"}
    assert user_exits == [names[type(t.exit)] for t in r.exits]
    assert all(t.rip is not None for t in r.exits)


def test_parse_kvm_exit_line_from_an_svm_host():
    line = ("  qemu-1234  [001] d..1.  99.5: kvm_exit: vcpu 0 reason io rip 0x8002 "
            "info1 0x0000000000800210 info2 0x0000000000008004 intr_info 0x00000000 error_code 0x00000000")
    (ev,) = parse_trace(line)
    assert ev.exit_code == 0x7B and ev.fields["info1"] == 0x800210 and ev.fields["rip"] == 0x8002
