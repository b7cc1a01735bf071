"""The SEV-ES VMSA: layout, the builder that mirrors KVM's LAUNCH_UPDATE_VMSA page, the parser,
and the fidelity check against sev-snp-measure (issue 5, item 6)."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from kvmharness.boot import long_mode_state
from kvmharness.sev.measurement import LaunchDigest
from kvmharness.sev.vmsa import (
    VMSA_FIELDS,
    VMSA_PAGE_SIZE,
    VMSA_SIZE,
    FpuState,
    Vmsa,
    build_vmsa,
    parse_vmsa,
    reset_state,
    vmcb_attrib,
)
from kvmharness.x86 import Regs, Segment

EPYC_MILAN_SIG = 0x00A00F11  # family 25 model 1 stepping 1 (CPUID 1 EAX)


# -- layout ---------------------------------------------------------------------------

def test_offset_table_is_the_1648_byte_save_area_without_overlaps():
    spans = sorted((off, off + size, name) for name, off, size in VMSA_FIELDS)
    for (_, a1, an), (b0, _, bn) in itertools.pairwise(spans):
        assert a1 <= b0, f"{an} overlaps {bn}"
    assert spans[-1][1] == VMSA_SIZE == 1648


@pytest.mark.parametrize("name, offset", [
    ("es", 0x000), ("cs", 0x010), ("tr", 0x090), ("cpl", 0x0CB), ("efer", 0x0D0),
    ("xss", 0x140), ("cr4", 0x148), ("cr3", 0x150), ("cr0", 0x158), ("dr7", 0x160),
    ("dr6", 0x168), ("rflags", 0x170), ("rip", 0x178), ("rsp", 0x1D8), ("rax", 0x1F8),
    ("g_pat", 0x268), ("pkru", 0x2E8), ("rcx", 0x308), ("rdx", 0x310), ("rbx", 0x318),
    ("rbp", 0x328), ("r15", 0x378), ("sev_features", 0x3B0), ("xcr0", 0x3E8),
    ("x87_dp", 0x400), ("mxcsr", 0x408), ("x87_fcw", 0x410), ("fpreg_x87", 0x420),
    ("fpreg_xmm", 0x470), ("fpreg_ymm", 0x570),
])
def test_field_offsets_match_the_facts_reference(name, offset):
    assert {n: o for n, o, _ in VMSA_FIELDS}[name] == offset


# -- the builder ------------------------------------------------------------------------

def test_the_page_is_4096_bytes_and_zero_after_the_save_area():
    regs, sregs = reset_state(EPYC_MILAN_SIG)
    page = build_vmsa(regs, sregs, init2=True)
    assert len(page) == VMSA_PAGE_SIZE
    assert page[VMSA_SIZE:] == bytes(VMSA_PAGE_SIZE - VMSA_SIZE)


def test_what_kvm_changes_on_the_way_from_sregs_to_the_vmsa():
    """EFER gains SVME, CR0 loses CD/NW, CR4 gains the host's MCE, CPL = SS.DPL, G_PAT = reset PAT."""
    regs, sregs = reset_state(EPYC_MILAN_SIG)
    v = Vmsa(build_vmsa(regs, sregs))
    assert v.get("efer") == 0x1000
    assert v.get("cr0") == 0x10          # 0x60000010 without CD|NW
    assert v.get("cr4") == 0x40
    assert v.get("g_pat") == 0x0007040600070406
    assert v.get("dr7") == 0x400 and v.get("dr6") == 0xFFFF0FF0
    assert v.get("xcr0") == 1
    assert v.get("cs") == (0xF000, 0x9B, 0xFFFF, 0xFFFF0000)
    assert v.get("ldtr")[1] == 0x82 and v.get("tr")[1] == 0x8B
    assert v.get("gdtr") == (0, 0, 0xFFFF, 0)
    assert v.get("rdx") == EPYC_MILAN_SIG and v.get("rip") == 0xFFF0


def test_legacy_es_init_leaves_the_fpu_area_zero_and_init2_fills_it():
    regs, sregs = reset_state()
    legacy = Vmsa(build_vmsa(regs, sregs, init2=False))
    init2 = Vmsa(build_vmsa(regs, sregs, init2=True))
    assert legacy.get("mxcsr") == 0 and legacy.get("x87_fcw") == 0
    assert init2.get("mxcsr") == 0x1F80 and init2.get("x87_fcw") == 0x37F
    assert bytes(legacy)[:0x400] == bytes(init2)[:0x400]


def test_x87_registers_are_split_into_8_and_2_byte_parts():
    st = bytes(range(128))  # register i occupies st[16i : 16i+10]
    fpu = FpuState(st=st, xmm=bytes([0xAB]) * 256, ymm=None)
    v = Vmsa(build_vmsa(Regs(), reset_state()[1], fpu=fpu, init2=True))
    x87 = v.get("fpreg_x87")
    for i in range(8):
        assert x87[8 * i:8 * i + 8] == st[16 * i:16 * i + 8]
        assert x87[64 + 2 * i:64 + 2 * i + 2] == st[16 * i + 8:16 * i + 10]
    assert v.get("fpreg_xmm") == bytes([0xAB]) * 256
    assert v.get("fpreg_ymm") == bytes(256)  # no YMM component: KVM memsets it


def test_dr7_beyond_the_fixed_bit_is_refused_like_kvm_does():
    regs, sregs = reset_state()
    with pytest.raises(ValueError, match="EINVAL"):
        build_vmsa(regs, sregs, dr7=0x401)


def test_an_unusable_segment_has_p_clear_and_cpl_comes_from_ss():
    seg = Segment(type=3, s=1, present=1, dpl=3, unusable=1)
    assert vmcb_attrib(seg) & 0x80 == 0
    regs, sregs = reset_state()
    sregs.ss = Segment(type=3, s=1, present=1, dpl=3)
    assert Vmsa(build_vmsa(regs, sregs)).get("cpl") == 3


def test_the_harness_long_mode_entry_state_round_trips_through_the_parser():
    regs, sregs = long_mode_state(2 << 20)
    regs.rax, regs.r15 = 0x1122334455667788, 0xF00D
    page = build_vmsa(regs, sregs, sev_features=0x20)
    v = Vmsa(page)
    assert v.regs() == Regs(**{**regs.to_dict(), "rflags": regs.rflags | 2})
    back = v.sregs()
    assert (back.cr0, back.cr3, back.cr4 & ~0x40, back.efer) == (sregs.cr0, sregs.cr3, sregs.cr4,
                                                                 sregs.efer)
    assert back.cs.l == 1 and back.cs.selector == sregs.cs.selector
    assert (back.gdt.base, back.idt.limit) == (sregs.gdt.base, sregs.idt.limit)
    d = parse_vmsa(page)
    assert d["sev_features"] == 0x20 and d["cr3"] == sregs.cr3 and d["efer"] == sregs.efer | 0x1000


def test_the_vmsa_page_extends_the_launch_digest_as_4096_bytes():
    regs, sregs = reset_state()
    page = build_vmsa(regs, sregs)
    d = LaunchDigest()
    d.update_vmsa(page)
    assert d.digest() == hashlib.sha256(page).digest()


# -- fidelity: sev-snp-measure builds the same page (issue 5, item 6) --------------------

def _ssm():
    try:
        from sevsnpmeasure.sev_mode import SevMode
        from sevsnpmeasure.vmsa import VMSA
    except ImportError:
        pytest.skip("sev-snp-measure is not installed (pip install sev-snp-measure)")
    return VMSA, SevMode


@pytest.mark.parametrize("sig", [0x00800F12, EPYC_MILAN_SIG, 0x00A10F10])
def test_reset_vmsa_equals_sev_snp_measure_byte_for_byte(sig):
    """sev-snp-measure's QEMU VMSA for SEV-ES = the harness's page for the same reset state
    on an INIT2 VM (it includes the default FCW/MXCSR that KVM copies only for INIT2 types)."""
    VMSA, SevMode = _ssm()
    ref = next(VMSA(SevMode.SEV_ES, 0, sig, 0x0).pages(1))
    regs, sregs = reset_state(sig)
    assert build_vmsa(regs, sregs, init2=True) == ref


def test_ap_vmsa_equals_sev_snp_measure_for_an_ap_reset_eip():
    VMSA, SevMode = _ssm()
    ap_eip = 0x0080B000 | 0x0FF0
    ref = list(VMSA(SevMode.SEV_ES, ap_eip, EPYC_MILAN_SIG, 0x0).pages(2))
    for eip, page in ((0xFFFFFFF0, ref[0]), (ap_eip, ref[1])):
        regs, sregs = reset_state(EPYC_MILAN_SIG, eip)
        assert build_vmsa(regs, sregs, init2=True) == page
