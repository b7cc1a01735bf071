"""``kvmharness info`` on SEV-SNP: the RMP (CPUID and the kernel's RMP table), kvm_amd's
``sev_snp`` and the SNP VM type, each with what was seen and the fix; checked on
synthetic hosts (the verdict logic is a pure function of the probes) and against this
host's own probes, read here independently."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvmharness import hostinfo as H

MILAN = {"sev": True, "sev_es": True, "sev_snp": True, "raw": [], "c_bit": 51}
SNP_CPU = {"sev_flags": ["sev", "sev_es", "sev_snp", "sme"], "svm_flag": True}
PARAMS = {"sev": "Y", "sev_es": "Y", "sev_snp": "Y", "nested": "1"}
DETAILS = {"vm_type_numbers": [0, 2, 3, 4]}


def _by(checks):
    return {c["check"]: c for c in checks}


def test_an_snp_host_passes_every_check():
    checks = _by(H.snp_checks(SNP_CPU, MILAN, PARAMS, DETAILS, "6.11.0"))
    assert [c["ok"] for c in checks.values()] == [True] * 4
    assert all(c["fix"] is None for c in checks.values())
    assert "bit 4 = 1" in checks["rmp_cpuid"]["saw"] and "sev_snp" in checks["rmp_table"]["saw"]


def test_each_missing_piece_is_named_with_its_fix():
    no_rmp = {**SNP_CPU, "sev_flags": ["sev", "sev_es", "sme"]}  # RMP table not set up
    c = _by(H.snp_checks(no_rmp, MILAN, PARAMS, DETAILS, "6.11.0"))
    assert c["rmp_table"]["ok"] is False and "RMP" in c["rmp_table"]["fix"]
    c = _by(H.snp_checks(SNP_CPU, {**MILAN, "sev_snp": False}, PARAMS, DETAILS, "6.11.0"))
    assert c["rmp_cpuid"]["ok"] is False and "no SEV-SNP" in c["rmp_cpuid"]["fix"]
    c = _by(H.snp_checks(SNP_CPU, None, PARAMS, DETAILS, "6.11.0", "unavailable"))
    assert c["rmp_cpuid"]["ok"] is None and "modprobe cpuid" in c["rmp_cpuid"]["fix"]
    c = _by(H.snp_checks(SNP_CPU, MILAN, {**PARAMS, "sev_snp": "N"}, DETAILS, "6.11.0"))
    assert c["kvm_amd"]["ok"] is False and "sev_snp=1" in c["kvm_amd"]["fix"]
    c = _by(H.snp_checks(SNP_CPU, MILAN, PARAMS, {"vm_type_numbers": [0, 2, 3]}, "6.10.0"))
    assert c["vm_type"]["ok"] is False and "KVM_X86_SNP_VM" in c["vm_type"]["fix"]


def test_a_kvm_amd_without_the_parameter_is_never_told_to_set_it():
    """A 6.10 kvm_amd (loaded: its sysfs names are the truth) has no sev_snp parameter."""
    old = {"sev": "Y", "sev_es": "Y", "nested": "1"}
    c = _by(H.snp_checks(SNP_CPU, MILAN, old, {"vm_type_numbers": [0, 2, 3]}, "6.10.0"))
    assert c["kvm_amd"]["ok"] is False
    assert "has no sev_snp parameter" in c["kvm_amd"]["fix"] and "modprobe" not in c["kvm_amd"]["fix"]
    assert c["kvm_amd"]["saw"] == "kvm_amd has no sev_snp parameter"


def test_a_cpu_without_snp_is_never_told_to_reload_kvm_amd():
    """No module parameter gives a CPU SNP (an Intel host, or a pre-Milan EPYC)."""
    no_snp = {**MILAN, "sev_snp": False}
    c = _by(H.snp_checks({"sev_flags": [], "svm_flag": False}, no_snp, None, {"vm_type_numbers": [0]},
                         "6.11.0"))
    assert c["kvm_amd"]["ok"] is False and "modprobe" not in c["kvm_amd"]["fix"]
    assert "this CPU has no SEV-SNP" in c["kvm_amd"]["fix"]


def test_the_sev_snp_verdict_needs_the_vm_type():
    kvm = {"present": True, "accessible": True, "module": "kvm_amd", "path": "/dev/kvm"}
    details = {"vm_type_numbers": [0, 2, 3], "memory_encrypt_op": "supported"}
    v = H.verdicts(kvm, details, SNP_CPU, PARAMS, True, "6.10.0")
    assert v["sev"]["usable"] and not v["sev-snp"]["usable"]
    assert "KVM_X86_SNP_VM" in v["sev-snp"]["why"]
    v = H.verdicts(kvm, DETAILS, SNP_CPU, PARAMS, True, "6.11.0")
    assert v["sev-snp"]["usable"]


def test_this_hosts_report_agrees_with_its_probes():
    r = H.host_report()
    c = _by(r["snp"])
    first = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    flags = next((ln.split(":", 1)[1].split() for ln in first.splitlines()
                  if ln.startswith("flags")), [])
    assert c["rmp_table"]["ok"] == ("sev_snp" in flags)
    param = Path("/sys/module/kvm_amd/parameters/sev_snp")
    if param.exists():
        assert c["kvm_amd"]["ok"] == (param.read_text().strip() in ("Y", "1"))
    else:
        assert c["kvm_amd"]["ok"] is False and c["kvm_amd"]["fix"]
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm not accessible: the VM-type check is not probed here")
    from kvmharness import open_backend

    system = open_backend("kvm")
    try:
        assert c["vm_type"]["ok"] == (4 in system.capabilities.vm_types)
    finally:
        system.close()
    if not all(x["ok"] for x in c.values()):
        assert not r["verdicts"]["sev-snp"]["usable"]
    assert "SEV-SNP:" in H.format_report(r)
