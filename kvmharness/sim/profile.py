"""Which KVM the simulator models: upstream ``kvm_amd`` (the default) or this project's host KVM.

The project's hosts run ``kvm_pvm``, which differs from upstream kvm_amd in these
userspace-visible ways (kvm_amd measured on the SVM rig); a :class:`KvmProfile`
selects each of them, in this one place:

=====================  ======================================  =========================
behaviour              kvm_amd (upstream, default)             kvm_pvm (these hosts)
=====================  ======================================  =========================
RIP at an OUT exit     AT the OUT: x86.c kvm_fast_pio's        already past the OUT
                       complete_fast_pio_out skips it on
                       the next KVM_RUN (dropped if userspace
                       moved RIP meanwhile)
RIP at an IN exit      AT the IN (complete_fast_pio_in)        AT the IN as well (measured
                                                               by kvmharness fuzz on a
                                                               kvm_pvm host, 2026-12-01:
                                                               `in %dx,%ax` at 0x80ae gave
                                                               RIP 0x80ae at the IoIn exit,
                                                               0x80b0 at the next exit)
VMMCALL, FIX_HYPER-    KVM's hypercall (kvm_emulate_hyper-     #UD
CALL_INSN disabled     call): RIP past it, RAX = the result
``int n`` / ``int3``   delivered through the guest's IDT       emulation failure
/ ``int1`` at CPL0     (not intercepted)                       (KVM_EXIT_INTERNAL_ERROR)
=====================  ======================================  =========================

``SimSystem(profile=...)`` takes a name or a :class:`KvmProfile`; without one the
environment variable ``KVMHARNESS_SIM_PROFILE`` decides, else ``kvm_amd``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import UsageError

PROFILE_ENV = "KVMHARNESS_SIM_PROFILE"
DEFAULT_PROFILE = "kvm_amd"


@dataclass(frozen=True)
class KvmProfile:
    name: str
    io_rip_past: bool      # KVM_GET_REGS during an OUT exit shows RIP past the OUT
    vmmcall_ud: bool       # VMMCALL (quirk disabled) raises #UD instead of being a hypercall
    soft_int_fails: bool   # int n / int3 / int1 are emulation failures instead of IDT deliveries

    in_rip_past: bool = False  # ... and during an IN exit past the IN (no KVM measured does)

    def __str__(self) -> str:
        return self.name


KVM_AMD = KvmProfile("kvm_amd", io_rip_past=False, vmmcall_ud=False, soft_int_fails=False)
KVM_PVM = KvmProfile("kvm_pvm", io_rip_past=True, vmmcall_ud=True, soft_int_fails=True)
PROFILES = {p.name: p for p in (KVM_AMD, KVM_PVM)}


def resolve(profile: str | KvmProfile | None = None) -> KvmProfile:
    """The profile named (or given); ``None``: ``$KVMHARNESS_SIM_PROFILE``, else kvm_amd."""
    if isinstance(profile, KvmProfile):
        return profile
    name = profile if profile is not None else (os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE)
    try:
        return PROFILES[name]
    except KeyError:
        where = f" (from {PROFILE_ENV})" if profile is None else ""
        raise UsageError(f"unknown simulator profile {name!r}{where}: choose one of "
                         f"{', '.join(PROFILES)}") from None


def for_kvm_module(module: str | None) -> str:
    """The profile matching a host's KVM module (hostinfo.kvm_device_info()["module"])."""
    return "kvm_pvm" if module == "kvm_pvm" else "kvm_amd"
