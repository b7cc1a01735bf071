"""The hypervisor's-eye lab: what a malicious hypervisor sees and can do under SVM, SEV, SEV-ES.

    from kvmharness.lab import run_scenario
    report = run_scenario("regleak", mode="sev", backend="sim")
    print(report.text())

Five scenarios (``SCENARIOS``), each a guest (``guests/src/lab-*.S``; the ``-es``
image for SEV-ES) plus a hypervisor-side script (:mod:`kvmharness.lab.scenarios`):

* ``regleak``    -- a secret in registers across a CPUID exit;
* ``memview``    -- guest memory as the host reads it, with a PNG page map;
* ``lying-hv``   -- CPUID answers of the hypervisor's choosing; what the guest can check;
* ``remap``      -- SEVered: a nested page table entry re-pointed, the secret leaves;
* ``ciphertext`` -- CipherLeaks: the VMSA ciphertext repeats when a register does.

Every scenario runs on the simulator in every mode.  On real KVM the same command
runs ``regleak`` and ``memview`` in every mode the host offers (svm wherever /dev/kvm
runs guests -- this includes a KVM without kvm_amd; sev/sev-es on an EPYC with SEV),
``lying-hv`` in svm and sev mode (through KVM_SET_CPUID2) and ``ciphertext`` in svm
and sev mode (the counter read from KVM_GET_REGS).  What needs a hook inside KVM --
the NPT remap, rewriting the GHCB between KVM's answer and the guest's read, reading
the VMSA -- runs on the simulator only; the command says so (:class:`LabUnavailable`,
exit code 3).
"""

from __future__ import annotations

import os
import tempfile

from ..errors import FeatureUnavailable, SevError, UsageError
from .scenarios import LabReport, LabUnavailable

MODES = ("svm", "sev", "sev-es")
#: the scenarios' SEV-SNP guests (``--mode sev-snp``, simulator only; not in ``--mode all`` yet)
SNP_SCENARIOS = {"remap": "snp-lab-service", "memview": "snp-lab-service",
                 "regleak": "snp-lab-regleak", "ciphertext": "snp-lab-counter",
                 "lying-hv": "snp-lab-cpuid"}
#: scenario -> (guest base name, one line)
SCENARIOS = {
    "regleak": ("lab-regleak", "a secret in registers across a CPUID exit: who can read it"),
    "memview": ("lab-service", "guest memory as the host reads it, and a PNG page map"),
    "lying-hv": ("lab-cpuid", "CPUID answers of the hypervisor's choosing, and what the guest checks"),
    "remap": ("lab-service", "SEVered: re-point the reply page at the secret page"),
    "ciphertext": ("lab-counter", "CipherLeaks: VMSA ciphertext repeats reveal a loop counter"),
}
DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "kvmharness-lab")


def guest_for(scenario: str, mode: str) -> str:
    """The manifest guest a scenario runs in a mode (the ``-es`` image under SEV-ES)."""
    if mode == "sev-snp":
        return SNP_SCENARIOS[scenario]
    base = SCENARIOS[scenario][0]
    return base + "-es" if mode == "sev-es" else base


def launch(guest: str, mode: str, system, *, snp_cpuid=None):
    """A Machine with ``guest`` loaded; for sev/sev-es launched encrypted with a guest owner
    (the measurement is verified); for sev-snp with ``snp_cpuid`` as the CPUID page the VMM
    offers, if given.  Raises LabUnavailable when the backend cannot."""
    from ..machine import Machine

    try:
        if mode == "svm":
            return Machine.for_guest(guest, system)
        if mode == "sev-snp":  # the SNP launch (sim/snp.py); its digest is the firmware's
            return Machine.for_guest(guest, system, sev="sev-snp", snp_cpuid=snp_cpuid)
        from ..sev.policy import GuestPolicy
        from ..sev.session import GuestOwner

        policy = GuestPolicy.parse("nodbg,es" if mode == "sev-es" else "nodbg")
        return Machine.for_guest(guest, system, sev=mode, policy=policy, owner=GuestOwner(policy))
    except (FeatureUnavailable, SevError, UsageError) as e:
        why = str(e)
        if f"on the {system.name} backend" not in why:  # Machine.for_guest's own reasons say so already
            why = f"{mode} guests cannot run on the {system.name} backend here: {why}"
        if system.name != "sim" and "backend sim" not in why:  # what to do instead
            why += "; every scenario runs on the simulator: --backend sim"
        raise LabUnavailable(why) from e


def run_scenario(name: str, mode: str = "svm", backend="auto", *, out_dir: str | None = None) -> LabReport:
    """Run one scenario in one mode; returns its :class:`LabReport`."""
    from ..backend import System
    from ..factory import open_backend
    from . import scenarios as S

    if name not in SCENARIOS:
        raise UsageError(f"unknown lab scenario {name!r}: choose one of {', '.join(SCENARIOS)}")
    if mode not in MODES and mode != "sev-snp":
        raise UsageError(f"unknown mode {mode!r}: choose one of {', '.join(MODES)}, sev-snp")
    if mode == "sev-snp" and name not in SNP_SCENARIOS:
        raise LabUnavailable(f"{name} has no SEV-SNP guest yet: under sev-snp the lab runs "
                             f"{', '.join(SNP_SCENARIOS)}")
    own = not isinstance(backend, System)
    system = open_backend(backend) if own else backend
    try:
        lies = S.snp_cpuid_lies()[1] if (name, mode) == ("lying-hv", "sev-snp") else None
        machine = launch(guest_for(name, mode), mode, system, snp_cpuid=lies)
        try:
            if name == "regleak":
                return S.regleak(machine, mode)
            if name == "memview":
                return S.memview(machine, mode, out_dir or DEFAULT_OUT)
            if name == "lying-hv":
                return S.lying_hv(machine, mode)
            if name == "remap":
                return S.remap(machine, mode)
            return S.ciphertext(machine, mode)
        finally:
            machine.close()
    finally:
        if own:
            system.close()


__all__ = [
    "DEFAULT_OUT",
    "MODES",
    "SCENARIOS",
    "HarnessError",
    "LabReport",
    "LabUnavailable",
    "guest_for",
    "launch",
    "run_scenario",
]
