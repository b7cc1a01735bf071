"""An SEV-SNP guest with two vCPUs whose AP the guest starts itself (GHCB NAE 0x80000013,
AP_CREATE), on the simulator: the AP is held until the request names it, then enters from
the VMSA page the guest built and RMPADJUSTed (guests/src/snp-ap.S); a page without the
RMP's VMSA bit is accepted by KVM (``sev_snp_ap_creation`` checks the GPA and
SEV_FEATURES, not the RMP) and the AP's VMRUN fails, so it never runs."""

from __future__ import annotations

import json

import pytest

from kvmharness.cli import main
from kvmharness.errors import EXIT_OK
from kvmharness.machine import Machine, run_guest
from kvmharness.smp import run_guest_vcpus, run_vcpus
from kvmharness.snp.launch import SVM_VMGEXIT_AP_CREATE

KEY = 0x736E706100000000
RMPADJUST_RAX, INFO1, INFO2, FLAG, AP_APIC_ID = (KEY | n for n in (1, 2, 3, 4, 0x10))
AP_VMSA = 0x19000  # guests/src/snp-ap.S


def _machine(guest):
    return Machine.for_guest(guest, "sim", sev="sev-snp", vcpus=2)


def test_the_guest_starts_its_ap_which_reports_its_apic_id():
    m = _machine("snp-ap")
    try:
        bsp, ap = run_vcpus(m, 30)
        model = m.vm._sev_model
        assert bsp.outcome == "done", bsp.describe()
        assert bsp.values[RMPADJUST_RAX] == 0
        assert (bsp.values[INFO1], bsp.values[INFO2]) == (0, 0)  # KVM accepted AP_CREATE
        assert bsp.values[FLAG] == 0x100 | 1  # the AP ran and set the shared flag
        assert ap.outcome == "hlt" and ap.ok, ap.describe()
        assert ap.reports == [(AP_APIC_ID, 1)]  # CPUID 1 EBX[31:24] on the AP
        # the request as KVM saw it, and the AP's VMSA: the guest's page, marked in the RMP
        [(apic, request, gpa, result, _s)] = model.ap_requests
        assert (apic, request, gpa, result) == (1, SVM_VMGEXIT_AP_CREATE, AP_VMSA, (0, 0))
        entry = m.launch_result.vmsa_rmp_entry(1)
        assert entry["vmsa"] and entry["validated"] and entry["gpa"] == AP_VMSA
        assert entry["spa"] == model.kvm.spa_of(AP_VMSA)
        # each vCPU registered its own GHCB (MSR protocol 0x012)
        assert m.vcpu.ghcb.registered_ghcb_gpa == 0x15000
        assert m.aps[0].ghcb.registered_ghcb_gpa == 0x1A000
    finally:
        m.close()


def test_a_vmsa_page_without_the_vmsa_bit_never_runs():
    m = _machine("snp-ap-novmsa")
    try:
        bsp, ap = run_vcpus(m, 30)
        assert bsp.outcome == "done", bsp.describe()
        assert bsp.values[RMPADJUST_RAX] == 0  # RMPADJUST itself succeeded (no VMSA bit asked)
        # sev_snp_ap_creation checks the GPA and SEV_FEATURES only: the request succeeds...
        assert (bsp.values[INFO1], bsp.values[INFO2]) == (0, 0)
        # ...and VMRUN's VMSA check fails: KVM_EXIT_FAIL_ENTRY, no instruction of the AP
        assert ap.outcome == "fail-entry" and "VMSA bit" in ap.message
        assert ap.reports == [] and bsp.values[FLAG] == 0
        assert not m.launch_result.vmsa_rmp_entry(1)["vmsa"]
        assert 1 not in m.vm._sev_model.vmsa_pages  # never entered: no protected state
    finally:
        m.close()


def test_an_ap_the_guest_never_creates_is_not_started():
    r = run_guest_vcpus("snp-hello", "sim", sev="sev-snp", vcpus=2, timeout=30)
    assert r.outcome == "done"
    [ap] = r.aps
    assert ap.outcome == "not-started" and ap.reports == []


def test_one_vcpu_ap_create_gets_kvms_bad_input():
    """With one vCPU there is no APIC ID 1: KVM answers SW_EXITINFO1 2, SW_EXITINFO2
    GHCB_ERR_INVALID_INPUT (5), and the guest's wait ends with the flag still 0."""
    r = run_guest("snp-ap", "sim", sev="sev-snp", timeout=30)
    assert r.outcome == "done" and r.aps == []
    assert (r.values[INFO1], r.values[INFO2], r.values[FLAG]) == (2, 5, 0)


def test_cli_run_vcpus_2_and_the_launch_digest_is_sev_snp_measures(capsys):
    gctx = pytest.importorskip("sevsnpmeasure.gctx", reason="sev-snp-measure (the [test] extra) "
                               "is the outside truth for the SNP launch digest")
    assert main(["run", "snp-ap", "--mode", "sev-snp", "--backend", "sim", "--vcpus", "2",
                 "--json"]) == EXIT_OK
    out = json.loads(capsys.readouterr().out)
    assert out["outcome"] == "done" and out["ok"]
    [ap] = out["aps"]
    assert ap["outcome"] == "hlt" and ap["reports"] == [[AP_APIC_ID, 1]]
    assert main(["measure", "snp-ap", "--mode", "sev-snp", "--vcpus", "2", "--json"]) == EXIT_OK
    log = json.loads(capsys.readouterr().out)["launch_log"]
    assert [e["page_type"] for e in log].count("vmsa") == 2
    types = {"normal": 1, "vmsa": 2, "zero": 3, "unmeasured": 4, "secrets": 5, "cpuid": 6}
    g = gctx.GCTX()
    for e in log:
        contents = bytes.fromhex(e["contents_sha384"]) if e["contents_sha384"] else bytes(48)
        g._update(types[e["page_type"]], int(e["gpa"], 16), contents)
    assert out["launch"]["launch_digest"] == g.ld().hex()  # the simulated firmware's digest


def test_cli_run_vcpus_out_of_range_is_a_usage_error(capsys):
    from kvmharness.errors import EXIT_USAGE

    assert main(["run", "hello64", "--backend", "sim", "--vcpus", "0"]) == EXIT_USAGE
    assert "1 to 255 vCPUs" in capsys.readouterr().err
