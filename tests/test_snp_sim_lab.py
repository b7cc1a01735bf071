"""`kvmharness lab remap --mode sev-snp`: the page-remapping attack under SEV-SNP on the
simulator.  The hypervisor re-points the reply page's NPT entry at the secret page's
memory after the first reply; under SNP the RMP's reverse-map check faults (#NPF with the
RMP bit) and no reply carries the secret.  The same rewiring under SEV leaks it (the
existing lab test), which is the contrast this one checks against."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmharness.lab import run_scenario
from kvmharness.snp.rmp import PFERR_GUEST_ENC, PFERR_GUEST_FINAL, PFERR_PRESENT, PFERR_RMP

pytestmark = pytest.mark.requires_sim


def test_remap_under_snp_faults_on_the_rmp_and_leaks_nothing():
    r = run_scenario("remap", mode="sev-snp", backend="sim")
    f = r.findings
    assert f["leaked"] is False and r.outcome == "done"
    assert [x["public"] for x in f["replies"]] == [True, True, True]
    assert f["rmp_faults"] >= 1
    fault = f["faulted"]
    assert fault["gpa"] == 0x20000 and fault["rmp_bit"]
    assert fault["error_code"] == PFERR_PRESENT | PFERR_RMP | PFERR_GUEST_FINAL | PFERR_GUEST_ENC
    assert "0x21000" in fault["why"] and "not 0x20000" in fault["why"]
    assert f["secret_page_readable_directly"] is False


def test_the_same_remap_under_sev_leaks():
    r = run_scenario("remap", mode="sev", backend="sim")
    assert r.findings["leaked"] is True


def test_lab_cli_remap_sev_snp_json_and_other_scenarios_refuse():
    p = subprocess.run([sys.executable, "-m", "kvmharness", "lab", "remap", "--mode", "sev-snp",
                        "--backend", "sim", "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["mode"] == "sev-snp" and d["findings"]["leaked"] is False
    q = subprocess.run([sys.executable, "-m", "kvmharness", "lab", "lying-hv", "--mode", "sev-snp",
                        "--backend", "sim"], capture_output=True, text=True)
    assert q.returncode == 3 and "no SEV-SNP guest yet" in q.stderr
