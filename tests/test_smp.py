"""A Machine's vCPUs run at once, one thread each (kvmharness/smp.py; issue 15, item 5)."""

import pytest

from kvmharness.errors import GuestTimeout, UsageError
from kvmharness.smp import run_vcpus

CPUID_1_EBX = 1 << 32 | 0 << 8 | 1  # the cpuid guest's report key: leaf 1, subleaf 0, EBX


@pytest.mark.parametrize("vcpus", [1, 3])
def test_every_vcpu_runs_the_guest_with_its_own_apic_id(backend, exit_path, machine_factory, vcpus):
    m = machine_factory("cpuid", vcpus=vcpus)
    results = run_vcpus(m, 60)
    assert [r.outcome for r in results] == ["done"] * vcpus  # each vCPU's ucall ends its own run
    assert [dict(r.reports)[CPUID_1_EBX] >> 24 for r in results] == list(range(vcpus))
    assert m.exit_path == (exit_path or "python")


@pytest.mark.backend_only("kvm")
def test_ioloop_on_four_vcpus_counts_every_exit(backend, exit_path, machine_factory):
    m = machine_factory("ioloop", vcpus=4)
    results = run_vcpus(m, 120)
    assert [r.outcome for r in results] == ["hlt"] * 4
    assert all(r.exit_count == 200001 for r in results)
    assert m.bench_port.writes == 4 * 200000  # the shared sink device saw every vCPU's OUTs


def test_a_timeout_on_any_vcpu_tears_the_vm_down(backend, machine_factory):
    m = machine_factory("spin", vcpus=2)
    with pytest.raises(GuestTimeout):
        run_vcpus(m, 0.5)
    assert m.vm is None


def test_refused_without_a_loaded_guest(backend, machine_factory):
    m = machine_factory(None, vcpus=2)
    with pytest.raises(UsageError, match="loaded guest"):
        run_vcpus(m)


_NO_UNICORN = r"""
import sys
sys.modules["unicorn"] = None  # as on the rig in a box: kvm only, no simulator
from kvmharness.machine import Machine
from kvmharness.smp import run_vcpus
with Machine.for_guest("cpuid", "kvm", vcpus=2) as m:
    print(sorted(r.outcome for r in run_vcpus(m, 30)))
"""


@pytest.mark.requires_kvm
def test_several_kvm_vcpus_run_without_the_simulator_installed():
    """run_vcpus on a kvm machine must not import the simulator (it failed the rig tier)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _NO_UNICORN], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "['done', 'done']"
