"""Nested SVM on a host that cannot run it, and the pieces that need no SVM.

These machines' /dev/kvm is kvm_pvm: no SVM for guests, no KVM_CAP_NESTED_STATE.
There the nested guests must be refused with the reason before any VM is
made (not run into a #GP at WRMSR EFER.SVME or a #UD at VMRUN), and the
nested-state calls must say what is missing.  The value object and the
``info`` report are checked without any device.  What needs real kvm_amd is
in test_nested_kvm.py (and runs on the SVM rig through test_nested_rig.py).
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmharness.errors import FeatureUnavailable, UsageError
from kvmharness.images import load_manifest

ROOT = Path(__file__).resolve().parent.parent
NESTED_GUESTS = ("nested-cpuid", "nested-ud")


def _kvm_without_svm():
    """The kvm System when /dev/kvm works here but offers no SVM; else skip."""
    from kvmharness.backend import kvm_usable, open_backend

    ok, why = kvm_usable()
    if not ok:
        pytest.skip(f"needs a usable /dev/kvm: {why}")
    system = open_backend("kvm")
    if system.capabilities.svm:
        system.close()
        pytest.skip("this host's KVM offers SVM to guests: the nested guests run here "
                    "(test_nested_kvm.py covers that)")
    return system


# --- manifest ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NESTED_GUESTS)
def test_nested_guests_need_svm_in_the_manifest(name):
    g = load_manifest()[name]
    assert g.needs == ("svm",) and g.mode == "long64" and g.expect == "done"
    assert g.memory >= 4 << 20  # VMCB, HSAVE, IOPM and L2's stack live between 1 and 3 MiB


# --- refused before any VM ----------------------------------------------------------

@pytest.mark.parametrize("name", NESTED_GUESTS)
def test_nested_guest_is_refused_without_svm_before_any_vm(name, monkeypatch):
    from kvmharness.kvm.system import KvmSystem
    from kvmharness.machine import Machine

    system = _kvm_without_svm()
    made = []
    monkeypatch.setattr(KvmSystem, "create_vm", lambda self, *a, **k: made.append(a) or 1 / 0)
    try:
        with pytest.raises(FeatureUnavailable) as err:
            Machine.for_guest(name, system)
    finally:
        system.close()
    assert made == []
    msg = str(err.value)
    assert name in msg and "SVM is not offered to guests" in msg
    assert "0x80000001 ECX bit 2" in msg and "nested=0" in msg


def test_cli_run_refuses_nested_cpuid_with_the_reason():
    _kvm_without_svm().close()
    p = subprocess.run([sys.executable, "-m", "kvmharness", "run", "nested-cpuid", "--backend", "kvm"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert p.returncode == 3, (p.returncode, p.stderr)  # EXIT_HOST: the host lacks a feature
    assert "nested-cpuid" in p.stderr and "SVM is not offered to guests" in p.stderr
    assert "exception" not in p.stdout.lower()  # refused, not run into a fault


# --- KVM_GET/SET_NESTED_STATE -------------------------------------------------------

def test_nested_state_calls_say_what_is_missing_without_the_capability():
    from kvmharness.kvm.nested import NestedState, get_nested_state, max_nested_state_size, set_nested_state

    system = _kvm_without_svm()
    try:
        vm = system.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            if max_nested_state_size(vcpu):
                pytest.skip("this KVM has KVM_CAP_NESTED_STATE")
            with pytest.raises(FeatureUnavailable, match="KVM_CAP_NESTED_STATE.*nested=1"):
                get_nested_state(vcpu)
            with pytest.raises(FeatureUnavailable, match="KVM_CAP_NESTED_STATE"):
                set_nested_state(vcpu, NestedState(0, 1, 128, bytes(120), b""))
        finally:
            vm.close()
    finally:
        system.close()


def _svm_state(flags=0x101, vmcb_pa=0x101000, data=b"\xab" * 4096) -> bytes:
    return (struct.pack("<HHI", flags, 1, 128 + len(data)) + struct.pack("<Q", vmcb_pa) + bytes(112)
            + data)


def test_nested_state_value_round_trips_the_kernel_struct():
    from kvmharness.kvm.nested import NestedState

    raw = _svm_state()
    st = NestedState.from_bytes(raw)
    assert (st.flags, st.format, st.size) == (0x101, 1, 128 + 4096)
    assert st.guest_mode and st.gif_set and not st.run_pending
    assert st.flag_names == ["guest-mode", "gif-set"]
    assert st.vmcb_pa == 0x101000 and st.vmcb == b"\xab" * 4096
    assert st.to_bytes() == raw
    assert st.to_dict()["vmcb_pa"] == 0x101000
    # bytes after `size` (KVM's buffer is as large as the capability says) are not state
    assert NestedState.from_bytes(raw + bytes(64)).to_bytes() == raw
    outside = NestedState.from_bytes(_svm_state(flags=0x100, vmcb_pa=0, data=b""))
    assert not outside.guest_mode and outside.size == 128 and outside.vmcb == b""


def test_nested_state_rejects_malformed_buffers_and_vmx_fields():
    from kvmharness.kvm.nested import NestedState

    with pytest.raises(UsageError, match="at least 128"):
        NestedState.from_bytes(bytes(100))
    with pytest.raises(UsageError, match="size is 8192"):
        NestedState.from_bytes(struct.pack("<HHI", 0, 1, 8192) + bytes(120))
    vmx = NestedState.from_bytes(struct.pack("<HHI", 0, 0, 128) + bytes(120))
    with pytest.raises(UsageError, match="SVM-only"):
        _ = vmx.vmcb_pa


def test_kvm_nested_state_ioctl_numbers_match_the_kernel():
    from kvmharness.kvm import _ffi as K

    # _IOWR(KVMIO, 0xbe, struct kvm_nested_state) / _IOW(KVMIO, 0xbf, ...), sizeof = 128
    assert K.ffi.sizeof("struct kvm_nested_state") == 128
    assert K.KVM_GET_NESTED_STATE == 0xC080AEBE and K.KVM_SET_NESTED_STATE == 0x4080AEBF


# --- `kvmharness info` reports nested support ---------------------------------------------

def test_info_reports_kvm_amd_nested_parameter(tmp_path, monkeypatch):
    from kvmharness import hostinfo

    params = tmp_path / "parameters"
    params.mkdir()
    for name, value in {"nested": "1", "npt": "Y", "nrips": "0", "sev": "N", "sev_es": "N", "avic": "N"}.items():
        (params / name).write_text(value + "\n")
    monkeypatch.setattr(hostinfo, "KVM_AMD_PARAMS", params)
    report = hostinfo.host_report()
    assert report["nested"] is True and report["kvm_amd"]["nrips"] == "0"
    assert "nested=1" in hostinfo.format_report(report)
    (params / "nested").write_text("0\n")
    assert hostinfo.host_report()["nested"] is False
    monkeypatch.setattr(hostinfo, "KVM_AMD_PARAMS", tmp_path / "absent")
    assert hostinfo.host_report()["nested"] is None  # no kvm_amd: unknown, not "no"
