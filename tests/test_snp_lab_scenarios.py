"""The lab's other scenarios under ``--mode sev-snp`` (simulator): what SNP changes.

regleak (snp-lab-regleak): as under SEV-ES no secret register reaches the host (KVM_GET_REGS
refused, only GHCB fields visible); SNP adds that vCPU 0's VMSA page is guest-owned in the
RMP with the VMSA bit set, so the host cannot write it back either.

memview: the host's read of guest RAM is the same ciphertext as under SEV-ES, and the RMP
(which a simulated host can read; KVM shows userspace none) records the secret and reply
pages as the guest's -- ASID of the launch, validated at their own GPA -- and the shared
buffer and GHCB as the hypervisor's.  The truth for the RMP is the firmware model's own
table, read here independently of the scenario."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmharness.lab import run_scenario
from kvmharness.lab.scenarios import (
    SECRET_TEXT,
    SERVICE_REPLY_PAGE,
    SERVICE_SECRET_PAGE,
    SERVICE_SHARED_BUF,
)

pytest.importorskip("unicorn", reason="the simulator runs SNP guests on unicorn")


def test_memview_under_snp_reads_ciphertext_and_names_the_rmp_owner(tmp_path):
    r = run_scenario("memview", mode="sev-snp", backend="sim", out_dir=str(tmp_path))
    assert r.outcome == "done" and r.mode == "sev-snp"
    assert r.findings["secret_readable"] is False
    pages = r.findings["pages"]
    assert pages["secret page"]["category"] == "ciphertext"
    assert pages["shared buffer"]["category"] == "shared"
    assert r.findings["reply_readable_in_shared_buffer"] is True
    rmp = r.findings["rmp"]
    for name, gpa in (("secret page", SERVICE_SECRET_PAGE), ("reply page", SERVICE_REPLY_PAGE)):
        e = rmp[name]
        assert (e["owner"], e["assigned"], e["validated"], e["gpa"]) == ("guest", True, True, gpa)
        assert e["asid"] > 0 and e["spa"] != gpa  # the guest_memfd page, not the GPA
    assert rmp["shared buffer"]["owner"] == "hypervisor" and not rmp["shared buffer"]["assigned"]
    assert "GHCB" in rmp and rmp["GHCB"]["owner"] == "hypervisor"
    assert "RMP" in r.verdict and (tmp_path / "memview-sev-snp.png").stat().st_size > 0


def test_memview_rmp_matches_the_firmware_table(tmp_path):
    """The same guest launched by hand: the firmware model's RMP for each page, read directly."""
    from kvmharness.machine import Machine

    m = Machine.for_guest("snp-lab-service", "sim", sev="sev-snp")
    try:
        m.run()
        model = m.launch_result.model
        for gpa in (SERVICE_SECRET_PAGE, SERVICE_REPLY_PAGE, SERVICE_SHARED_BUF):
            spa = model.kvm.spa_of(gpa) & ~0xFFF
            e, _ = model.firmware.rmp.effective(spa >> 12)
            assert m.launch_result.rmp_entry(gpa) == {
                "spa": spa, "owner": e.owner, "assigned": e.assigned, "validated": e.validated,
                "asid": e.asid, "gpa": e.gpa, "vmsa": e.vmsa, "immutable": e.immutable}
        assert SECRET_TEXT not in m.vm.read(0, m.memory)
    finally:
        m.close()


def test_lab_cli_memview_sev_snp_json(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kvmharness", "lab", "memview", "--mode", "sev-snp",
                        "--backend", "sim", "--json", "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["mode"] == "sev-snp" and d["findings"]["rmp"]["secret page"]["owner"] == "guest"


def test_regleak_under_snp_leaks_nothing_and_the_vmsa_page_is_the_guests():
    r = run_scenario("regleak", mode="sev-snp", backend="sim")
    assert r.outcome == "done" and r.findings["leaked"] == []
    wheres = [s["where"] for s in r.findings["snapshots"]]
    assert any(w.startswith("CPUID #VMEXIT") for w in wheres)
    assert any(w.startswith("REPORT") for w in wheres)
    for s in r.findings["snapshots"]:
        assert s["regs"] is None and "EINVAL" in s["regs_error"]  # protected state
        assert s["ghcb_gpa"]  # the GHCB the guest registered, read by the host
    cpuid = next(s for s in r.findings["snapshots"] if s["where"].startswith("CPUID"))
    assert cpuid["ghcb"]["sw_exit_code"] == 0x72  # SVM_EXIT_CPUID, through the GHCB
    e = r.findings["vmsa_rmp"]
    assert (e["owner"], e["vmsa"], e["assigned"]) == ("guest", True, True) and e["asid"] > 0
    assert "RMP" in r.verdict


def test_regleak_vmsa_entry_matches_the_firmware_table():
    from kvmharness.machine import Machine

    m = Machine.for_guest("snp-lab-regleak", "sim", sev="sev-snp")
    try:
        assert m.run().outcome == "done"
        model = m.launch_result.model
        pfn = model.kvm.vcpus[0].vmsa_pfn
        e, _ = model.firmware.rmp.effective(pfn)
        got = m.launch_result.vmsa_rmp_entry(0)
        assert (got["spa"], got["vmsa"], got["asid"], got["gpa"]) == (pfn << 12, e.vmsa, e.asid, e.gpa)
        assert e.vmsa and e.asid == model.kvm.asid
    finally:
        m.close()
