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
                        "--backend", "sim", "--json"], capture_output=True, text=True)
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["findings"]["lies"]["avx512f"]["status"] == "caught"


# -- lying-hv under SNP: the lies go into the CPUID page the firmware checks -------------------

def test_lying_hv_under_snp_each_lie_caught_detected_or_believed():
    from kvmharness.snp.firmware import DEFAULT_HW_CPUID, FEATURE_MASKED

    r = run_scenario("lying-hv", mode="sev-snp", backend="sim")
    f = r.findings
    assert r.outcome == "done" and r.mode == "sev-snp"
    lies = f["lies"]
    # AVX512F (7 EBX bit 16) claimed: the part lacks it, 7 EBX is in the model's policy ->
    # the firmware refused the page, the VMM offered the corrected one, the guest saw it clear
    hw7_ebx = DEFAULT_HW_CPUID[(0x7, 0)][1]
    assert not hw7_ebx >> 16 & 1 and (0x7, "ebx") in FEATURE_MASKED
    avx = lies["avx512f"]
    assert avx["status"] == "caught" and int(avx["told"], 16) >> 16 & 1
    assert int(avx["corrected_to"], 16) == int(avx["told"], 16) & hw7_ebx
    assert int(avx["seen"], 16) == int(avx["corrected_to"], 16) and f["avx512f_path"] == 0
    assert [c["leaf"] for c in f["cpuid_corrections"]] == ["0x7"]
    # RDTSCP hidden: checked, but saying less is allowed -> believed, the guest skips RDTSCP
    rd = lies["rdtscp"]
    assert rd["status"] == "believed" and rd["checked_by_firmware"] and rd["corrected_to"] is None
    assert not int(rd["seen"], 16) >> 27 & 1 and int(rd["honest"], 16) >> 27 & 1
    assert f["rdtscp_path"] == 0
    # the C-bit (0x8000001F EBX) is outside the model's policy: it reaches the guest, which
    # detects it against the measured boot page tables (verdict bit 1), not the SEV info
    cb = lies["c-bit"]
    assert (0x8000001F, "ebx") not in FEATURE_MASKED and not cb["checked_by_firmware"]
    assert cb["status"] == "detected" and int(cb["seen"], 16) == int(cb["told"], 16)
    assert int(cb["seen"], 16) & 0x3F != f["page_table_c_bit"] == f["sev_info_c_bit"]
    assert f["verdict_bits"] == 1
    assert "model subset" in f["firmware_policy"]
    assert "firmware caught 1" in r.verdict


def test_snp_launch_with_an_honest_cpuid_page_needs_no_correction():
    from kvmharness.lab.scenarios import snp_cpuid_lies
    from kvmharness.machine import Machine

    honest = snp_cpuid_lies()[0]
    with Machine.for_guest("snp-lab-cpuid", "sim", sev="sev-snp", snp_cpuid=honest) as m:
        assert m.launch_result.cpuid_corrections == []
        v = m.run().values
    assert v[5] == 0 and v[7] == 1 and v[9] == 0  # no verdict bits, RDTSCP offered, no AVX512F


# -- ciphertext under SNP: host writes to the VMSA fault, host reads still give ciphertext ------

def test_ciphertext_under_snp_still_decodes_without_ciphertext_hiding():
    from kvmharness.lab.scenarios import COUNTER_SECRET

    r = run_scenario("ciphertext", mode="sev-snp", backend="sim")
    f = r.findings
    assert r.outcome == "done" and f["ticks"] == 32 and f["distinct"] == 16
    assert f["decoded"] == COUNTER_SECRET.decode()
    snp = f["snp"]
    assert snp["vmsa_rmp_vmsa_page"] and snp["vmsa_owner"] == "guest"
    assert snp["host_write"].startswith("refused") and "0x80000003" in snp["host_write"]
    assert snp["host_read"] == "allowed"
    assert snp["ciphertext_hiding"] is False and snp["policy_requires_hiding"] is False


def test_a_policy_requiring_ciphertext_hiding_fails_launch_start_on_the_model():
    from kvmharness.errors import SevError
    from kvmharness.machine import Machine
    from kvmharness.snp.policy import DEFAULT_POLICY, SnpPolicyBit

    with pytest.raises(SevError, match="ciphertext hiding"):
        Machine.for_guest("snp-lab-counter", "sim", sev="sev-snp",
                          policy=DEFAULT_POLICY | SnpPolicyBit.CIPHERTEXT_HIDING)
