"""SEV-SNP guests on the simulator, end to end (sim/snp.py).

The launch goes through KvmSnpVm and the simulated SNP firmware from
``Machine.for_guest(sev="sev-snp")``; the guests (guests/src/snp-*.S) PVALIDATE
their memory, change page states through the GHCB MSR protocol and the PSC
NAE event, and hit the RMP's faults.  Expected values come from the SNP model
(firmware secrets page, the launch plan's CPUID page, snp/rmp.py return codes)
and from the APM/GHCB constants the guests' docstrings name, never from a run.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from kvmharness import Machine
from kvmharness.images import get_guest
from kvmharness.snp import rmp as R
from kvmharness.snp.firmware import SECRETS, parse_cpuid_page
from kvmharness.snp.launch import (
    SNP_CPUID_GPA,
    SNP_SECRETS_GPA,
    default_cpuid_entries,
    expected_digest,
    guest_launch_plan,
)

pytestmark = pytest.mark.requires_sim

SNP = 0x736E700000000000
GHCB_GPA, DATA_A, DATA_B, UNTOUCHED = 0x15000, 0x17000, 0x18000, 0x19000
PSC_ERROR_INVALID_HDR = (1 << 32) | 1
PSC_ERROR_INVALID_ENTRY = (1 << 32) | 2


def _run(name, **kw):
    m = Machine.for_guest(name, "sim", sev="sev-snp", **kw)
    try:
        r = m.run(timeout=30)
    except BaseException:
        m.close()
        raise
    return m, r


@pytest.fixture(scope="module")
def hello():
    m, r = _run("snp-hello")
    yield m, r
    m.close()


def test_snp_hello_runs_and_reads_its_firmware_pages(hello):
    m, r = hello
    assert r.outcome == "done", r.describe()
    v = r.values
    assert v[SNP | 1] == 7  # SEV_STATUS: SEV | SEV-ES | SNP
    fw_secrets = m.vm._sev_model.firmware.memory.read_page(
        m.vm._sev_model.kvm.gmem_pfn(SNP_SECRETS_GPA >> 12))
    version, _imi, fms, _gosvw, vmpck0, *_ = SECRETS.unpack_from(fw_secrets)
    assert v[SNP | 2] == version and v[SNP | 3] == fms == m.vm._sev_model.firmware.cpu_sig
    assert v[SNP | 4] == struct.unpack_from("<Q", vmpck0)[0] and any(vmpck0)
    assert v[SNP | 5] == 1
    plan_cpuid = next(p.data for p in guest_launch_plan(
        get_guest("snp-hello").load(), "long64", 2 << 20).pages if p.gpa == SNP_CPUID_GPA)
    count, entries = parse_cpuid_page(plan_cpuid)
    assert v[SNP | 6] == count == len(default_cpuid_entries(0))
    assert v[SNP | 7] == next(e.eax for e in entries if e.eax_in == 0x8000001F)
    # CPUID through the GHCB is the hypervisor's answer: the vCPU's CPUID table
    assert v[SNP | 8] == m.vcpu.cpuid.lookup(0x8000001F, 0).eax


def test_snp_hello_page_state_changes_reach_the_rmp_and_the_host(hello):
    m, r = hello
    v = r.values
    assert v[SNP | 9] == 0x5A17C0DE5EC12E75  # private write read back
    assert v[SNP | 0xA] == 0  # rescinded: RAX 0, CF 0
    assert (v[SNP | 0xB], v[SNP | 0xC]) == (0, 1)  # NAE PSC done, cur_entry advanced past entry 0
    assert (v[SNP | 0xD], v[SNP | 0xE], v[SNP | 0xF]) == (0, 0, 0)
    assert v[SNP | 0x10] == 0x5A17C0DE5EC12E75 ^ (2**64 - 1)
    assert m.vm.read(DATA_A, 16) == b"snp-hello shared"  # written with C=0 after the PSC
    kvm = m.vm._sev_model.kvm
    rmp = m.vm._sev_model.firmware.rmp
    for gpa in (GHCB_GPA, DATA_A):
        assert gpa >> 12 not in kvm.private
        assert not rmp.effective(kvm.gmem_pfn(gpa >> 12))[0].assigned
    e = rmp.effective(kvm.gmem_pfn(DATA_B >> 12))[0]
    assert (e.assigned, e.validated, e.asid, e.gpa) == (True, True, kvm.asid, DATA_B)
    # the private pages the host holds are ciphertext
    priv = m.vcpu.private_read(0x10000, 64)
    assert priv is not None and m.vm.read(0x10000, 64) != priv
    names = [t.msr_request for t in m.vcpu.vmgexit_trace if t.protocol == "msr"]
    assert names[:2] == ["PSC_REQ", "REG_GPA_REQ"]
    assert any(t.sw_exit_code == 0x80000010 for t in m.vcpu.vmgexit_trace)
    stats = m.vm._sev_model.stats
    assert stats["psc_nae"] == 1 and stats["psc_msr"] == 3 and stats["vc_404"] == 0


def test_launch_digest_is_the_offline_digest_and_measure_cli(hello):
    m, _r = hello
    plan = guest_launch_plan(get_guest("snp-hello").load(), "long64", 2 << 20)
    assert m.launch_result.launch_digest == expected_digest(plan).digest
    out = subprocess.run([sys.executable, "-m", "kvmharness", "measure", "snp-hello", "--mode",
                          "sev-snp", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["launch_digest"] == m.launch_result.launch_digest.hex()


def test_double_validate_reports_no_change_size_mismatch_and_rmpadjust():
    m, r = _run("snp-double-validate")
    try:
        assert r.outcome == "done", r.describe()
        v = r.values
        base = SNP | 0x100
        assert [v[base | n] for n in range(1, 9)] == [
            R.SUCCESS, R.SUCCESS | 0x100, R.SUCCESS, R.SUCCESS | 0x100, R.FAIL_SIZEMISMATCH,
            R.SUCCESS, R.FAIL_PERMISSION, R.FAIL_INPUT]
        kvm = m.vm._sev_model.kvm
        e = m.vm._sev_model.firmware.rmp.effective(kvm.gmem_pfn(UNTOUCHED >> 12))[0]
        assert (e.validated, e.perms[1], e.perms[2]) == (False, R.Perm.READ | R.Perm.WRITE, 0)
    finally:
        m.close()


def test_unvalidated_page_raises_vc_404_at_the_load():
    m, r = _run("snp-unvalidated")
    try:
        assert r.outcome == "done", r.describe()
        v = r.values
        assert v[0x736E707663000000] == R.SVM_EXIT_PAGE_NOT_VALIDATED
        assert v[0x736E707663000001] == v[SNP | 0x201]  # RIP of the load itself
        kind, code, gpa, rip, why = m.vcpu.rmp_faults[-1]
        assert (kind, code, gpa, rip) == ("vc", 0x404, UNTOUCHED, v[SNP | 0x201])
        assert "not validated" in why
    finally:
        m.close()


def test_bad_psc_descriptors_get_kvms_errors():
    m, r = _run("snp-bad-psc")
    m.close()
    assert r.outcome == "done", r.describe()
    v = r.values
    base = SNP | 0x300
    assert v[base | 1] == PSC_ERROR_INVALID_HDR
    assert v[base | 2] == PSC_ERROR_INVALID_ENTRY
    assert v[base | 3] == 0
    assert v[base | 4] == 1 << 31 and v[base | 5] == 0x015  # GHCB_MSR_PSC_RESP_ERROR


def test_a_page_the_launch_measured_is_validated_but_a_tampered_one_is_refused():
    """The launch refuses a guest whose memory differs from its plan (the host wrote it)."""
    from kvmharness.sim import snp as S

    m = Machine("sim", memory=2 << 20, vm_type=4, create_vcpu=False)
    try:
        image = get_guest("snp-hello")
        data = bytearray(image.load())
        real_load = m.load

        def load_then_tamper(img, d, *, c_bit=None):
            real_load(img, d, c_bit=c_bit)
            m.vm.write(0x8000, b"\xcc")  # one byte of the image changed after loading

        m.load = load_then_tamper
        with pytest.raises(Exception, match="differs from the launch plan"):
            S.launch_machine(m, image, bytes(data), None)
    finally:
        m.close()


def test_run_mode_sev_snp_json_carries_the_firmware_digest():
    out = subprocess.run([sys.executable, "-m", "kvmharness", "run", "snp-hello", "--backend", "sim",
                          "--mode", "sev-snp", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    plan = guest_launch_plan(get_guest("snp-hello").load(), "long64", 2 << 20)
    assert d["outcome"] == "done" and d["launch"]["launch_digest"] == expected_digest(plan).hex()


def test_plain_guest_refuses_sev_snp_mode():
    out = subprocess.run([sys.executable, "-m", "kvmharness", "run", "hello", "--backend", "sim",
                          "--mode", "sev-snp"], capture_output=True, text=True)
    assert out.returncode == 2 and "does not run in sev-snp mode" in out.stderr


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm on this host")
def test_kvm_backend_reports_the_kernels_answer_to_the_snp_vm_type():
    from kvmharness.backend import KVM_X86_SNP_VM
    from kvmharness.factory import open_backend

    system = open_backend("kvm")
    try:
        offered = KVM_X86_SNP_VM in system.capabilities.vm_types
    finally:
        system.close()
    if offered:
        pytest.skip("this host's KVM offers KVM_X86_SNP_VM: the refusal path cannot be seen here")
    out = subprocess.run([sys.executable, "-m", "kvmharness", "run", "snp-hello", "--backend", "kvm",
                          "--mode", "sev-snp"], capture_output=True, text=True)
    assert out.returncode == 3
    assert "sev-snp" in out.stderr and "KVM_CREATE_VM" in out.stderr
    assert len(out.stderr.strip().splitlines()[-1]) > 0 and "Traceback" not in out.stderr


def test_snp_bench_completes_every_operation():
    """snp-bench's phases (its timings are for `kvmharness`'s measurements, not checked here)."""
    m, r = _run("snp-bench")
    try:
        assert r.outcome == "done", r.describe()
        v = r.values
        assert [v[SNP | 0x500 | n] for n in range(4)] == [0, 1000, 400, 400]
        stats = m.vm._sev_model.stats
        assert stats["pvalidate"] >= 1000 and stats["psc_msr"] >= 400 and stats["psc_nae"] == 400
    finally:
        m.close()
