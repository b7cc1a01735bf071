"""The contract: every manifest guest both backends can run gives the same result on both.

Compared: the userspace-visible exit sequence, the guest's reports, the outcome
and the final registers.  Whether a backend can run a guest is probed on this host
from the guest's ``needs`` (the manifest holds no host facts): SEV and SEV-ES guests
run on kvm wherever the host offers them, and are skipped with the probed reason
elsewhere.
The kvm side runs only where /dev/kvm is usable; the simulator runs with the profile of
the KVM module behind it (kvm_pvm here, else kvm_amd: kvmharness/sim/profile.py).
"""

import difflib
import os

import pytest

from kvmharness.backend import kvm_usable, open_backend
from kvmharness.hostinfo import cpuid_deviations, kvm_device_info
from kvmharness.images import load_manifest
from kvmharness.kvm import fastpath
from kvmharness.machine import needs_met, run_guest
from kvmharness.sim.profile import for_kvm_module
from kvmharness.sim.system import SimSystem

MANIFEST = load_manifest()
KVM_OK, KVM_WHY = kvm_usable()


REG_NAMES = ("eax", "ebx", "ecx", "edx")


def _exempt_keys():
    """Report keys (the cpuid guest's fn << 32 | index << 8 | reg) of the CPUID registers
    the kvm host is recorded as not honouring (hostinfo.KNOWN_CPUID_DEVIATIONS)."""
    return {fn << 32 | idx << 8 | REG_NAMES.index(reg) for fn, idx, reg in cpuid_deviations("kvm")}


def _lines(result, exempt=frozenset()):
    out = [f"outcome {result.outcome}"]
    out += [f"report {k:#x} = {v:#x}" if k not in exempt else f"report {k:#x} = (host deviation, not compared)"
            for k, v in result.reports]
    out += [f"exit {e.to_dict() if hasattr(e, 'to_dict') else e}" for e in result.exits]
    out += [f"reg {k} = {v:#x}" for k, v in result.regs.to_dict().items()] if result.regs else []
    return out


def _runnable(image, backend, mode=None):
    """Skip, with the reason probed on this host, unless ``backend`` can run ``image`` (in
    ``mode``: sev and sev-es are needs of their own)."""
    with open_backend(backend) as system:
        met, why = needs_met(system, image.needs)
        if met and mode not in (None, "svm") and mode not in image.needs:
            met, why = needs_met(system, [mode])
    if not met:
        as_mode = f" as an {mode.upper()} guest" if mode not in (None, "svm") else ""
        pytest.skip(f"{image.name}{as_mode} on {backend} (probed here): {why}")


@pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")
@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_same_behaviour_on_sim_and_kvm(name, monkeypatch):
    image = MANIFEST[name]
    _runnable(image, "sim")
    _runnable(image, "kvm")
    with open_backend("kvm") as kvm_system:
        host_cpuid = kvm_system.capabilities.supported_cpuid
    # Same input on both sides: the simulator offers the guest this host's supported CPUID
    # table, so any difference in what the guest sees is the model's, not the tables'; and
    # it models the KVM module this host runs (kvm_pvm's profile on these machines).
    profile = for_kvm_module(kvm_device_info()["module"])
    with SimSystem(supported_cpuid=host_cpuid, profile=profile) as sim_system:
        sim = run_guest(image, backend=sim_system)
    exempt = _exempt_keys() if name == "cpuid" else frozenset()
    a = _lines(sim, exempt)
    # kvm on each exit path this host has (the compiled loop where it loads, and pure Python)
    paths = ("compiled", "python") if fastpath.status()[0] or os.environ.get(fastpath.ENV) == "1" else ("python",)
    for path in paths:
        monkeypatch.setenv(fastpath.ENV, "1" if path == "compiled" else "0")
        b = _lines(run_guest(image, backend="kvm"), exempt)
        if a != b:
            diff = "\n".join(difflib.unified_diff(b, a, f"kvm ({path} exit path)", "sim", lineterm="", n=2))
            pytest.fail(f"guest {name}: sim and kvm ({path} exit path) differ:\n{diff[:20000]}")


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_runs_on_sim(name):
    """Every manifest guest the simulator can run finishes with the manifest's expected outcome."""
    image = MANIFEST[name]
    _runnable(image, "sim")
    result = run_guest(image, backend="sim")
    assert result.outcome == image.expect, result.describe()


DECLARED = [(name, mode) for name in sorted(MANIFEST) for mode in MANIFEST[name].modes
            if name != "ioloop"]  # ioloop is the 200000-exit benchmark


@pytest.mark.parametrize("name, mode", DECLARED, ids=[f"{n}-{m}" for n, m in DECLARED])
def test_every_declared_mode_runs(name, mode, backend, exit_path):
    """Every guest in every run mode its manifest declares ends as the manifest expects, on
    every backend that can run it here (SEV/SEV-ES on kvm wherever the host offers them; on
    kvm on both exit paths)."""
    image = MANIFEST[name]
    _runnable(image, backend, mode)
    result = run_guest(image, backend=backend, sev=None if mode == "svm" else mode)
    assert result.outcome == image.expect, result.describe()
