"""The CPU the simulator models: one CPUID table, defined once.

An EPYC-like part (AuthenticAMD, family 0x19 "Zen 3"), with SVM advertised in
0x80000001 ECX and the SVM feature leaf 0x8000000A as KVM offers it to a
nested-SVM guest (sim/nested.py).  ``SUPPORTED_CPUID`` is what
``Capabilities.supported_cpuid`` reports (KVM_GET_SUPPORTED_CPUID's role);
the SEV work may add 0x8000001F with :func:`kvmharness.x86.sev_cpuid_leaf`.
"""

from __future__ import annotations

from ..x86 import CpuidEntry, CpuidTable, KVM_CPUID_FLAG_SIGNIFCANT_INDEX as SIG


def _s(text: str) -> tuple[int, int, int]:
    b = text.encode()
    return tuple(int.from_bytes(b[i:i + 4], "little") for i in range(0, 12, 4))


_VB, _VD, _VC = _s("AuthenticAMD")
_BRAND = "AMD EPYC (kvmharness sim)".ljust(48, "\0").encode()
_BR = [int.from_bytes(_BRAND[i:i + 4], "little") for i in range(0, 48, 4)]

# family 0x19, model 0x01, stepping 1 -> 0x00A00F11 (the hosts report 0x00a10f11)
LEAF1_EAX = 0x00A00F11

SUPPORTED_CPUID = CpuidTable((
    CpuidEntry(0x0, 0, 0, 0x10, _VB, _VC, _VD),
    CpuidEntry(0x1, 0, 0, LEAF1_EAX, 0x00000800, 0x76D82203, 0x178BFBFF),
    CpuidEntry(0x7, 0, SIG, 0, 0x219C01A9, 0x00000000, 0x00000010),
    CpuidEntry(0xD, 0, SIG, 0x7, 0x340, 0x340, 0),
    CpuidEntry(0xD, 1, SIG, 0x1, 0, 0, 0),
    CpuidEntry(0x80000000, 0, 0, 0x80000021, _VB, _VC, _VD),
    CpuidEntry(0x80000001, 0, 0, LEAF1_EAX, 0, 0x000005F7, 0x2FD3FBFF),  # ECX bit 2 = SVM
    CpuidEntry(0x80000002, 0, 0, *_BR[0:4]),
    CpuidEntry(0x80000003, 0, 0, *_BR[4:8]),
    CpuidEntry(0x80000004, 0, 0, *_BR[8:12]),
    CpuidEntry(0x80000007, 0, 0, 0, 0, 0, 0x100),
    CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0, 0),  # 48 physical / 48 virtual bits
    # What KVM offers a guest hypervisor (cpuid.c: revision 1, 8 ASIDs) and sim/nested.py
    # implements: EDX NRIPS(3) VmcbClean(5) FlushByAsid(6) SVME_ADDR_CHK(28); no NP (nested
    # NPT is not modelled).  The SVM rig's kvm_amd offers 0x10000021 (NP, no NRIPS: TCG).
    CpuidEntry(0x8000000A, 0, 0, 0x1, 0x8, 0, 0x10000068),
    # SEV + SEV-ES, C-bit 51, 1 bit of physical address reduction, 509 ASIDs, SEV-ES ASIDs
    # 1..99 (sim/sev.py; sev_cpuid_leaf's defaults written out)
    CpuidEntry(0x8000001F, 0, 0, 0x0000000A, 0x00000073, 509, 100),
    CpuidEntry(0x80000021, 0, 0, 0x45, 0, 0, 0),
))

CPUID_VENDOR = "AuthenticAMD"
CPUID_FAMILY = 0x19
