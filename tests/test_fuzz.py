"""Differential fuzzing (kvmharness/fuzz): a fixed seed set, kvm == sim at every exit.

The seeds here all pass after the fixes of issue 12; ``kvmharness fuzz --seeds N`` runs
more.  Also tested without /dev/kvm: the generator is deterministic, every generated
guest assembles, the comparison catches a difference, and the shrinker reduces.
"""

import os
import shutil

import pytest

from kvmharness.backend import kvm_usable
from kvmharness.fuzz import gen as G
from kvmharness.fuzz import runner as R
from kvmharness.fuzz.shrink import ddmin, load_regression, write_regression

KVM_OK, KVM_WHY = kvm_usable()
HAVE_AS = all(shutil.which(t) for t in ("as", "objcopy", "nm"))
needs_as = pytest.mark.skipif(not HAVE_AS, reason="assembling fuzz guests needs binutils (as, objcopy, nm)")
needs_kvm = pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")

#: the CI seed set: a few dozen guests, well under a minute on both backends
CI_SEEDS = range(int(os.environ.get("KVMHARNESS_FUZZ_FIRST_SEED", "0")),
                 int(os.environ.get("KVMHARNESS_FUZZ_FIRST_SEED", "0")) + 40)


@pytest.fixture(scope="module")
def kvm_sim():
    targets = R.open_targets(("kvm", "sim"))
    yield targets, R.cpuid_deviations(targets)
    for t in targets:
        t.close()


def test_generator_is_deterministic_and_varied():
    a, b = G.generate(7), G.generate(7)
    assert a.source() == b.source()
    assert G.generate(8).source() != a.source()
    kinds = {o.kind.split("_")[0] for s in range(60) for o in G.generate(s).ops}
    assert {"out", "in", "ins", "outs", "mmio", "rdmsr", "wrmsr", "cpuid", "hlt"} <= kinds


def test_real_mode_generator_is_deterministic_and_varied():
    a, b = G.generate(7, mode="real"), G.generate(7, mode="real")
    assert a.source() == b.source() and a.mode == "real" and ".code16" in a.source()
    assert G.generate(7, mode="real").source() != G.generate(7).source()
    kinds = {o.kind for s in range(80) for o in G.generate(s, mode="real").ops}
    prefixes = {k.split("_")[0] for k in kinds}
    assert {"out", "in", "ins", "outs", "mmio", "cpuid", "hlt", "soft", "rdmsr", "wrmsr"} <= prefixes
    assert {"mmio_les", "mmio_lds", "mmio_movs_to", "mmio_stos", "mmio_push", "mmio_pop"} <= kinds
    with pytest.raises(ValueError):
        G.generate(1, mode="protected32")


@needs_as
@pytest.mark.parametrize("mode", G.MODES)
def test_every_generated_guest_assembles_with_its_op_labels(mode):
    for s in range(50):
        g = G.generate(s, mode=mode)
        ranges = R.op_ranges(g)
        assert len(ranges) == len(g.ops)
        assert all(a < b for a, b in ranges)
        if mode == "real":  # the ops fit below the IVT handlers, in CS's 64 KiB from 0x8000
            assert ranges[-1][1] < 0x10000


@needs_as
@needs_kvm
@pytest.mark.parametrize("seed", CI_SEEDS)
def test_fixed_seed_same_on_kvm_and_sim(kvm_sim, seed):
    targets, deviations = kvm_sim
    g = G.generate(seed)
    a, b = R.run(targets[0], g), R.run(targets[1], g)
    assert a.steps, "the kvm run recorded no exit"
    m = R.compare(g, a, b, deviations)
    assert m is None, f"seed {seed}: {m.kind} at exit {m.step}, op {m.op}: {m.detail}"


@needs_as
@needs_kvm
@pytest.mark.parametrize("seed", CI_SEEDS)
def test_fixed_real_mode_seed_same_on_kvm_and_sim(kvm_sim, seed):
    targets, deviations = kvm_sim
    g = G.generate(seed, mode="real")
    a, b = R.run(targets[0], g), R.run(targets[1], g)
    assert a.steps and a.outcome in ("end", "exception", "shutdown", "internal"), (a.outcome, a.detail)
    m = R.compare(g, a, b, deviations)
    assert m is None, f"real-mode seed {seed}: {m.kind} at exit {m.step}, op {m.op}: {m.detail}"


@needs_as
def test_real_mode_guest_runs_to_its_end_on_the_simulator():
    """Without /dev/kvm too: a real-mode guest runs on the simulator through its ops to the
    end port, its device and scratch page in the real-mode layout."""
    from kvmharness.sim.system import SimSystem

    with SimSystem(profile="kvm_amd") as system:
        t = R.Target("sim", system, system.capabilities.supported_cpuid)
        for seed in range(5):
            g = G.generate(seed, mode="real")
            g = g.with_ops([o for o in g.ops if not o.terminal])
            rec = R.run(t, g)
            assert rec.outcome == "end", (seed, rec.outcome, rec.detail)
            mmio = [e for e, _r in rec.steps if e["exit"] in ("MmioRead", "MmioWrite")]
            assert all(0xD0000 <= e["addr"] < 0xD1000 for e in mmio)


@needs_as
def test_compare_reports_the_first_difference():
    g = G.generate(3)
    ops = R.op_ranges(g)
    regs = {n: 0 for n in R.REG_NAMES}
    regs["rip"] = ops[0][0]
    a = R.Recording("a", steps=[({"exit": "IoOut", "port": 0x60}, dict(regs))], outcome="end")
    b = R.Recording("b", steps=[({"exit": "IoOut", "port": 0x60}, dict(regs, rbx=1))], outcome="end")
    m = R.compare(g, a, b)
    assert m.kind == "regs" and m.step == 0 and m.detail.startswith("rbx") and m.op == 0
    assert R.compare(g, a, a) is None
    c = R.Recording("c", steps=[({"exit": "IoOut", "port": 0x61}, dict(regs))], outcome="end")
    assert R.compare(g, a, c).kind == "exit"


def test_ddmin_finds_the_minimal_sublist():
    ops = list(range(20))
    assert ddmin(ops, lambda xs: 3 in xs and 17 in xs) == [3, 17]
    assert ddmin(ops, lambda xs: 5 in xs) == [5]


@needs_as
def test_regression_written_and_loaded_round_trips(tmp_path):
    g = G.generate(11)
    m = R.Mismatch("regs", 0, "rip at X: ...", 0)
    src = write_regression(tmp_path, g, m, ["kvm", "sim[kvm_pvm]"])
    assert src.read_text() == g.source()
    back = load_regression(tmp_path / "fuzz-11.json")
    assert back.source() == g.source() and back.msr_user_reasons == g.msr_user_reasons
    r = G.generate(11, mode="real")
    src = write_regression(tmp_path, r, m, ["kvm", "sim[kvm_pvm]"])
    back = load_regression(tmp_path / "fuzz-11-real.json")
    assert back.mode == "real" and back.source() == r.source() == src.read_text()
