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


@needs_as
def test_every_generated_guest_assembles_with_its_op_labels():
    for s in range(50):
        g = G.generate(s)
        ranges = R.op_ranges(g)
        assert len(ranges) == len(g.ops)
        assert all(a < b for a, b in ranges)


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
