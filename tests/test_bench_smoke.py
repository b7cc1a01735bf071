"""The benchmarks still run (tiny sizes; numbers are printed by `kvmharness bench`, never
asserted here): a benchmark that breaks silently is as bad as no benchmark."""

import pytest

from kvmharness.backend import open_backend
from kvmharness.images import get_guest


@pytest.mark.requires_sim
def test_sev_benchmark_runs_on_the_simulator():
    from kvmharness.sevbench import bench_sev

    out = bench_sev(repeat=1, n_cpuid=50, n_vmgexit=50)
    assert {"launch_ms", "run_ms", "vc_us", "vmgexit_per_s", "cpuid_exit_us"} <= set(out)
    assert all(v > 0 for v in out.values())


@pytest.mark.requires_kvm
def test_kvm_benchmark_paths_run():
    import shutil

    from kvmharness.bench import bare_cffi_ioloop, build_reference, harness_lifecycle

    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("the benchmark's C reference needs gcc (apt-get install gcc)")
    exe = build_reference()
    assert exe.exists()
    with open_backend("kvm") as system:
        assert harness_lifecycle(system, get_guest("halt").load(), 3)["count"] == 3
        assert bare_cffi_ioloop(system)["exits"] == 200_001


@pytest.mark.requires_kvm
def test_kvm_benchmark_runs_one_vm_with_a_thread_per_vcpu():
    from kvmharness.bench import harness_vcpus

    with open_backend("kvm") as system:
        r = harness_vcpus(system, 2)
    assert r["vcpus"] == 2 and r["exits"] == 2 * 200_001 and r["exits_per_s"] > 0
