"""kvmharness lab: each scenario's outcome, per mode, on the simulator (and on kvm where
this host can run it).

What each test asserts is the point of the scenario: under SVM and SEV the hypervisor
reads the secret registers, under SEV-ES it does not; the host reads plaintext under
SVM and ciphertext under SEV/SEV-ES except shared pages; the guest accepts a hidden
feature and detects a moved C-bit only when it has a measured reference; remapping one
page leaks the secret in every mode; the VMSA ciphertext reveals the loop counter.
"""

from __future__ import annotations

import importlib.util

import pytest

from kvmharness.backend import kvm_usable, open_backend
from kvmharness.lab import (
    MODES,
    SCENARIOS,
    LabUnavailable,
    guest_for,
    pagemap,
    run_scenario,
)
from kvmharness.lab.scenarios import COUNTER_SECRET, REGLEAK_SECRETS


def sim_mode_missing(mode: str) -> str | None:
    """Why the simulator cannot run ``mode`` guests (None if it can)."""
    if mode == "svm":
        return None
    with open_backend("sim") as system:
        vm_type = 2 if mode == "sev" else 3
        if vm_type not in system.capabilities.vm_types:
            return (f"the simulator has no {mode.upper()} VM type yet "
                    f"({'memory encryption' if mode == 'sev' else 'SEV-ES: #VC, VMGEXIT, VMSA'} "
                    "not modelled)")
    if importlib.util.find_spec("kvmharness.sim.sev") is None:
        return "the simulator has no SEV memory encryption yet (kvmharness/sim/sev.py)"
    if mode == "sev-es" and importlib.util.find_spec("kvmharness.sim.seves") is None:
        return "the simulator has no SEV-ES yet (kvmharness/sim/seves.py)"
    return None


def sim(scenario, mode, **kw):
    why = sim_mode_missing(mode)
    if why:
        pytest.skip(why)
    return run_scenario(scenario, mode, "sim", **kw)


# -- 1. register leak ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_regleak(mode):
    r = sim("regleak", mode)
    assert r.outcome == "done"
    where = [s["where"] for s in r.findings["snapshots"]]
    assert any(w.startswith("CPUID #VMEXIT") for w in where)  # seen inside the kernel's exit
    assert any(w.startswith("REPORT exit") for w in where)
    if mode in ("svm", "sev"):
        assert r.findings["leaked"] == ["r12", "r13", "r14"]
        cpuid = next(s for s in r.findings["snapshots"] if s["where"].startswith("CPUID"))
        assert cpuid["regs"]["r12"] == REGLEAK_SECRETS["r12"]
        assert cpuid["regs"]["rax"] == 0x8000001F  # the leaf asked, in the VMCB save area too
        assert cpuid["vmcb_save"]["rax"] == 0x8000001F
    else:
        assert r.findings["leaked"] == []
        cpuid = next(s for s in r.findings["snapshots"] if s["where"].startswith("CPUID"))
        # the SEV-ES VM type (INIT2): KVM refuses KVM_GET_REGS once the VMSA is encrypted
        # (EINVAL, x86.c has_protected_state && guest_state_protected; a legacy KVM_SEV_ES_INIT
        # VM would answer from its register cache, only what the GHCB held)
        assert cpuid["regs"] is None and "KVM_GET_REGS" in cpuid["regs_error"]
        assert "protected" in cpuid["regs_error"]
        assert "rax" in cpuid["ghcb_valid"] and "r12" not in cpuid["ghcb_valid"]
        assert cpuid["ghcb"]["sw_exit_code"] == 0x72
        assert cpuid["vmcb_save"] == {"rax": 0, "rip": 0, "rsp": 0}


# -- 2. memory view --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_memview(mode, tmp_path):
    r = sim("memview", mode, out_dir=str(tmp_path))
    assert r.outcome == "done"
    pages = r.findings["pages"]
    png = (tmp_path / f"memview-{mode}.png").read_bytes()
    assert r.artifacts["pagemap"] == str(tmp_path / f"memview-{mode}.png")
    assert pagemap.read_png_size(png) == (32 * 15 + 1, 16 * 15 + 1 + 16)
    if mode == "svm":
        assert r.findings["secret_readable"]
        assert pages["secret page"]["category"] == "plaintext"
        assert r.findings["counts"]["ciphertext"] == 0
    else:
        assert not r.findings["secret_readable"]
        assert pages["secret page"]["category"] == "ciphertext"
        assert pages["reply page"]["category"] == "ciphertext"
        assert pages["shared buffer"]["category"] == "shared"
        assert r.findings["reply_readable_in_shared_buffer"]
    if mode == "sev-es":
        assert pages["GHCB"]["gpa"] == 0x15000 and pages["GHCB"]["category"] == "shared"
    # the picture says what the report says
    for name, info in pages.items():
        assert pagemap.cell_colour(png, info["gpa"] // 4096) == pagemap.COLOURS[info["category"]], name


# -- 3. lying hypervisor ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_lying_hypervisor(mode):
    r = sim("lying-hv", mode)
    f = r.findings
    assert r.outcome == "done"
    assert f["seen_c_bit"] == f["fake_c_bit"] != f["real_c_bit"]  # the lie reached the guest
    assert f["rdtscp_offered"] and f["rdtscp_path"] == 0  # accepted: RDTSCP hidden, fallback taken
    if mode == "svm":
        assert f["page_table_c_bit"] == 0 and f["verdict_bits"] == 0  # nothing to check against
    else:
        assert f["page_table_c_bit"] == f["real_c_bit"]
        assert f["verdict_bits"] == 1  # the moved C-bit is detected; SEV itself was not hidden
    if mode == "sev-es":
        assert [t["function"] for t in f["ghcb_rewrites"]] == ["0x8000001f", "0x80000001"]


# -- 4. page remapping -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_remap_leaks_the_secret_through_the_reply(mode):
    r = sim("remap", mode)
    assert r.outcome == "done"
    replies = r.findings["replies"]
    assert [x["secret"] for x in replies] == [False, True, False]
    assert [x["public"] for x in replies] == [True, False, True]
    assert r.findings["secret_page_readable_directly"] == (mode == "svm")
    assert "RMP" in r.text()


def test_remap_page_is_refused_outside_ram():
    from kvmharness.errors import UsageError

    with open_backend("sim") as system:
        vm = system.create_vm()
        vm.add_memory(0, 0x10000)
        with pytest.raises(UsageError, match="not a page of guest RAM"):
            vm.remap_page(0x1000, 0x20000)
        with pytest.raises(UsageError, match="not a page of guest RAM"):
            vm.remap_page(0x1001, 0x2000)
        vm.remap_page(0x1000, 0x2000)
        assert vm.remapped == {0x1000: 0x2000}
        vm.remap_page(0x1000, 0x1000)
        assert vm.remapped == {}


# -- 5. ciphertext side channel --------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_ciphertext_side_channel_recovers_the_counter(mode):
    r = sim("ciphertext", mode)
    assert r.outcome == "done"
    assert r.findings["ticks"] == 32
    assert r.findings["distinct"] == 16
    assert r.findings["decoded"] == COUNTER_SECRET.decode()
    assert r.findings["vmsa_writeback_model"] == (mode == "sev-es")


# -- the same command on kvm -----------------------------------------------------------------

KVM_OK, KVM_WHY = kvm_usable()


@pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")
@pytest.mark.parametrize("scenario", ["regleak", "memview", "ciphertext"])
def test_svm_scenarios_run_on_kvm(scenario, tmp_path):
    r = run_scenario(scenario, "svm", "kvm", out_dir=str(tmp_path))
    assert r.backend == "kvm" and r.outcome == "done"
    if scenario == "regleak":
        assert r.findings["leaked"] == ["r12", "r13", "r14"]
    elif scenario == "memview":
        assert r.findings["secret_readable"]
    else:
        assert r.findings["decoded"] == COUNTER_SECRET.decode()


@pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")
def test_remap_on_kvm_says_it_needs_the_simulator():
    with pytest.raises(LabUnavailable, match="needs the simulator"):
        run_scenario("remap", "svm", "kvm")


# -- guests and registry ---------------------------------------------------------------------

def test_every_scenario_has_a_guest_per_mode():
    from kvmharness.images import get_guest

    for name in SCENARIOS:
        for mode in MODES:
            g = get_guest(guest_for(name, mode))
            assert ("sev-es" in g.needs) == (mode == "sev-es")


def test_unknown_scenario_and_mode_are_usage_errors():
    from kvmharness.errors import UsageError

    with pytest.raises(UsageError, match="unknown lab scenario"):
        run_scenario("nope", "svm", "sim")
    with pytest.raises(UsageError, match="unknown mode"):
        run_scenario("regleak", "tdx", "sim")


# -- lab all: exit status and reasons as each combination alone, and a summary ---------------

def _lab(capsys, *args):
    import json as _json

    from kvmharness.cli import main

    rc = main(["lab", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err, (_json.loads(out.out) if "--json" in args else None)


def test_combined_status_is_the_worst_combination():
    from kvmharness import errors as E
    from kvmharness.lab.cli import combined_status

    assert combined_status([E.EXIT_OK, E.EXIT_OK]) == E.EXIT_OK
    assert combined_status([E.EXIT_OK, E.EXIT_HOST]) == E.EXIT_HOST
    assert combined_status([E.EXIT_HOST, E.EXIT_GUEST_FAILED, E.EXIT_OK]) == E.EXIT_GUEST_FAILED
    assert combined_status([E.EXIT_HOST, E.EXIT_TIMEOUT]) == E.EXIT_TIMEOUT
    assert combined_status([E.EXIT_TIMEOUT, E.EXIT_GUEST_FAILED]) == E.EXIT_GUEST_FAILED
    assert combined_status([E.EXIT_INTERNAL, E.EXIT_GUEST_FAILED]) == E.EXIT_INTERNAL


def test_lab_all_with_a_failure_and_an_unavailable_combination_exits_1(capsys, monkeypatch):
    """A failed combination outranks unavailable ones; a timeout is not 'unavailable'."""
    import kvmharness.lab as lab
    from kvmharness.errors import GuestTimeout
    from kvmharness.lab.scenarios import LabReport

    def fake(name, mode, backend, out_dir=None):
        if name == "regleak":
            raise LabUnavailable(f"{mode} guests cannot run on the sim backend here: test")
        if name == "memview":
            raise GuestTimeout("lab-service", 1.0, 0, None)
        outcome = "fail" if name == "remap" else "done"
        return LabReport(scenario=name, mode=mode, backend="sim", outcome=outcome, verdict="v")

    monkeypatch.setattr(lab, "run_scenario", fake)
    rc, out, _err, doc = _lab(capsys, "all", "--mode", "svm", "--backend", "sim", "--json")
    assert rc == doc["exit_status"] == 1
    states = {r["scenario"]: r["status"] for r in doc["summary"]}
    assert states == {"regleak": "unavailable", "memview": "timed out", "lying-hv": "ran",
                      "remap": "failed", "ciphertext": "ran"}
    monkeypatch.setattr(lab, "run_scenario",
                        lambda name, mode, backend, out_dir=None: fake("regleak", mode, backend))
    rc, out, _err, _ = _lab(capsys, "all", "--mode", "all", "--backend", "sim")
    assert rc == 3
    assert "summary on the sim backend: 15 unavailable; exit status 3" in out


def test_lab_all_on_the_simulator_runs_every_combination(capsys, tmp_path):
    for mode in MODES:
        if sim_mode_missing(mode):
            pytest.skip(sim_mode_missing(mode))
    rc, _out, _err, doc = _lab(capsys, "all", "--mode", "all", "--backend", "sim", "--json",
                               "--out", str(tmp_path))
    assert rc == doc["exit_status"] == 0
    assert len(doc["summary"]) == len(SCENARIOS) * len(MODES) == len(doc["reports"])
    assert {(r["scenario"], r["mode"], r["backend"], r["status"]) for r in doc["summary"]} == \
        {(n, m, "sim", "ran") for n in SCENARIOS for m in MODES}


@pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")
def test_lab_all_on_kvm_agrees_with_each_scenario_alone(capsys, tmp_path):
    """Each combination's status and reason are what the single command gives; the combined
    status is the worst of them (3 here at least: remap needs the simulator everywhere)."""
    from kvmharness.lab.cli import combined_status

    rc, out, _err, doc = _lab(capsys, "all", "--mode", "all", "--backend", "kvm", "--json",
                              "--out", str(tmp_path))
    assert rc == doc["exit_status"] == combined_status(r["exit_status"] for r in doc["summary"])
    assert rc != 0
    for row in doc["summary"]:
        alone, _o, err, _ = _lab(capsys, row["scenario"], "--mode", row["mode"], "--backend", "kvm",
                                 "--out", str(tmp_path))
        assert alone == row["exit_status"], row
        if row["exit_status"] not in (0, 1):  # refused: the single command's one-line error
            assert err.strip() == f"kvmharness: error: {row['why']}"
            assert row["why"].count("cannot run on the") <= 1, row["why"]
    rc_text, text, _err, _ = _lab(capsys, "all", "--mode", "all", "--backend", "kvm", "--out", str(tmp_path))
    assert rc_text == rc and "summary on the kvm backend:" in text and f"exit status {rc}" in text
