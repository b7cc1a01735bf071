"""The sim backend's pure logic: the VMCB layout (docs/facts.md#facts-1, #facts-2), IOIO, KVM's intercepts."""

import struct

import pytest

from kvmharness.sim import svm as S
from kvmharness.sim.vmcb import Vmcb, field_offset, SAVE_AREA_SIZE


from kvmharness.sim.system import SimSystem  # noqa: E402


@pytest.mark.parametrize("area,name,offset", [
    ("control", "intercept_cr", 0x000), ("control", "intercept_exceptions", 0x008),
    ("control", "intercept_word3", 0x00C), ("control", "iopm_base_pa", 0x040),
    ("control", "msrpm_base_pa", 0x048), ("control", "asid", 0x058), ("control", "int_ctl", 0x060),
    ("control", "exit_code", 0x070), ("control", "exit_info_1", 0x078), ("control", "exit_info_2", 0x080),
    ("control", "exit_int_info", 0x088), ("control", "nested_ctl", 0x090), ("control", "ghcb_gpa", 0x0A0),
    ("control", "event_inj", 0x0A8), ("control", "nested_cr3", 0x0B0), ("control", "next_rip", 0x0C8),
    ("control", "insn_len", 0x0D0), ("control", "vmsa_pa", 0x108),
    ("save", "es", 0x400), ("save", "cs", 0x410), ("save", "tr", 0x490), ("save", "cpl", 0x4CB),
    ("save", "efer", 0x4D0), ("save", "cr4", 0x548), ("save", "cr3", 0x550), ("save", "cr0", 0x558),
    ("save", "rflags", 0x570), ("save", "rip", 0x578), ("save", "rsp", 0x5D8), ("save", "rax", 0x5F8),
    ("save", "star", 0x600), ("save", "kernel_gs_base", 0x620), ("save", "cr2", 0x640),
    ("save", "g_pat", 0x668), ("save", "spec_ctrl", 0x6E0),
])
def test_vmcb_offsets_match_facts(area, name, offset):
    assert field_offset(area, name) == offset


def test_vmcb_fields_are_the_raw_bytes():
    v = Vmcb()
    v.control.exit_code = 0x7B
    v.control.exit_info_1 = 0xE90210
    v.save.rip = 0x1122334455667788
    v.save.cs.selector, v.save.cs.attrib = 0x08, 0xA9B
    assert len(v.raw) == 4096 and SAVE_AREA_SIZE == 744
    assert v.raw[0x70:0x78] == (0x7B).to_bytes(8, "little")
    assert struct.unpack_from("<Q", v.raw, 0x578)[0] == 0x1122334455667788
    assert struct.unpack_from("<HH", v.raw, 0x410) == (0x08, 0xA9B)
    assert v.to_dict()["save"]["cs"]["attrib"] == 0xA9B


def test_ioio_exit_info1_layout():
    assert S.ioio_exit_info1(0xE9, 1, False) == 0x00E90210
    assert S.ioio_exit_info1(0x10, 4, True, addr_size=32) == 0x00100141
    info = S.ioio_exit_info1(0x3F8, 1, False, string=True, rep=True, addr_size=64, segment=3)
    assert info == (0x3F8 << 16) | 0x10 | 0x200 | 0x4 | 0x8 | (3 << 10)
    d = S.decode_ioio_exit_info1(info)
    assert d == {"port": 0x3F8, "in": False, "string": True, "rep": True, "size": 1, "addr_size": 64,
                 "segment": 3}


def test_init_vmcb_intercepts_like_kvm():
    s = S.Svm(asid=1)
    for code in (S.SVM_EXIT_CPUID, S.SVM_EXIT_HLT, S.SVM_EXIT_IOIO, S.SVM_EXIT_MSR, S.SVM_EXIT_SHUTDOWN,
                 S.SVM_EXIT_VMRUN, S.SVM_EXIT_VMMCALL, S.SVM_EXIT_INVLPGA, S.SVM_EXIT_SKINIT,
                 S.SVM_EXIT_WBINVD, S.SVM_EXIT_MONITOR, S.SVM_EXIT_MWAIT, S.SVM_EXIT_XSETBV,
                 S.SVM_EXIT_RDPRU, 0x46, 0x51, 0x52):
        assert s.intercepted(code), S.exit_name(code)
    assert not s.intercepted(0x4E)  # no #PF intercept with NPT
    assert not s.intercepted(S.SVM_EXIT_INVLPG)
    assert s.vmcb.control.nested_ctl & S.NESTED_CTL_NP_ENABLE
    assert s.vmcb.control.asid == 1
    assert s.msr_intercepted(0x12345678, False) and s.msr_intercepted(0x10, True)
    assert not s.msr_intercepted(0xC0000082, True)
    assert s.io_intercepted(0x80, 1)



def test_capabilities_describe_the_model():
    caps = SimSystem().capabilities
    assert caps.backend == "sim" and caps.svm
    leaf0 = caps.supported_cpuid.lookup(0)
    assert leaf0.ebx.to_bytes(4, "little") + leaf0.edx.to_bytes(4, "little") + \
        leaf0.ecx.to_bytes(4, "little") == b"AuthenticAMD"
    assert caps.supported_cpuid.lookup(0x8000000A).edx & (1 << 3)  # NRIPS
    assert caps.has("KVM_CAP_X86_USER_SPACE_MSR")


def test_count_precision_mode_passes_the_guest_tests():
    """The fallback precision mode (KVMHARNESS_SIM_PRECISION=count) stays correct."""
    import os
    import subprocess
    import sys

    from kvmharness.sim import testing as T

    if not T.have_binutils():
        pytest.skip("GNU as/ld (binutils) not installed")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = dict(os.environ, KVMHARNESS_SIM_PRECISION="count",
               PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                        os.path.join(here, "test_sim_guests.py")], env=env, capture_output=True,
                       text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
