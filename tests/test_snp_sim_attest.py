"""SEV-SNP attestation from a running guest on the simulator (issue 17 items 1, 3, 5).

snp-attest (guests/src/snp-attest.S) seals MSG_REPORT_REQ with its own
AES-256-GCM (guests/include/snp_msg.h) under VMPCK0 from the secrets page and
sends it as a GHCB guest request; the simulated firmware (snp/guestreq.py)
checks header, sequence number and tag and answers with a signed report.  The
guest's crypto is checked against the ``cryptography`` library's AES-GCM (the
host opens the guest's own request with the firmware's VMPCK0), and the report
with snp/verify.py and the `snp verify` CLI.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from kvmharness import Machine
from kvmharness.images import get_guest
from kvmharness.sev.status import SevStatus
from kvmharness.sim.system import SimSystem
from kvmharness.snp import guestreq as GR
from kvmharness.snp.certs import load_certificate
from kvmharness.snp.launch import expected_digest, guest_launch_plan
from kvmharness.snp.messages import parse_certificate_table, parse_report_response
from kvmharness.snp.report import AttestationReport, TcbVersion
from kvmharness.snp.verify import Expectations, verify_report

pytestmark = pytest.mark.requires_sim

KEY = 0x736E700000000400
INPUT, OUTPUT, REQ, RESP, CERTS = 0x1A000, 0x1B000, 0x1C000, 0x1D000, 0x1E000
REPORT_DATA = bytes(range(0x40, 0x80))


def _attest(flags: int, vmpl: int = 0, system=None, cert_pages: int = 0):
    m = Machine.for_guest("snp-attest", system or "sim", sev="sev-snp")
    m.vm.write(INPUT, REPORT_DATA + struct.pack("<III", vmpl, flags, cert_pages))
    try:
        r = m.run(timeout=60)
    except BaseException:
        m.close()
        raise
    return m, r


def _digest():
    return expected_digest(guest_launch_plan(get_guest("snp-attest").load(), "long64", 2 << 20))


def test_guest_request_gets_a_report_that_verifies():
    m, r = _attest(flags=0, vmpl=2)
    try:
        assert r.outcome == "done", r.describe()
        v = r.values
        assert v[KEY | 1] == 0 and v[KEY | 2] == 0  # answered; the response authenticated
        assert (v[KEY | 3], v[KEY | 4], v[KEY | 5], v[KEY | 6]) == (0, 0x4A0, GR.MSG_REPORT_RSP, 2)
        status, report = parse_report_response(m.vm.read(OUTPUT, 0x4C0))
        assert status == 0 and len(report) == 0x4A0
        rep = AttestationReport.parse(report)
        assert rep.report_data == REPORT_DATA and rep.vmpl == 2 == v[KEY | 7]
        assert rep.measurement == m.launch_result.launch_digest == _digest().digest
        assert v[KEY | 8] == int.from_bytes(REPORT_DATA[:8], "little")
        assert v[KEY | 9] == int.from_bytes(rep.measurement[:8], "little")
        chip = m.vm._sev_model.messages.chip
        certs = chip.certificate_der()
        res = verify_report(report, load_certificate(certs["vcek"]),
                            ark=load_certificate(certs["ark"]), ask=load_certificate(certs["ask"]),
                            expect=Expectations(measurement=_digest().digest,
                                                report_data=REPORT_DATA))
        assert res.ok, [c for c in res.checks if not c.ok]
        # what the host saw on the shared pages is ciphertext; the guest's AES-GCM is the
        # standard one: the firmware's key opens the guest's request with `cryptography`
        vmpck0 = m.vm._sev_model.messages.vmpcks[0]
        hdr, body = GR.open_message(vmpck0, m.vm.read(REQ, 0x1000))
        assert (hdr.seqno, hdr.msg_type, hdr.msg_sz, hdr.vmpck) == (1, GR.MSG_REPORT_REQ, 0x60, 0)
        assert body[:64] == REPORT_DATA and struct.unpack_from("<I", body, 64)[0] == 2
        assert REPORT_DATA not in m.vm.read(REQ, 0x1000)
        assert report not in m.vm.read(RESP, 0x1000)
    finally:
        m.close()


def test_extended_request_returns_the_certificate_table_and_refusals_keep_the_sequence():
    m, r = _attest(flags=0x1F)
    try:
        assert r.outcome == "done", r.describe()
        v = r.values
        refused = GR.snp_guest_err(0, SevStatus.INVALID_PARAM)
        assert v[KEY | 1] == 0 and v[KEY | 0xA] == 4
        assert v[KEY | 0x11] == refused  # a stale msg_seqno
        assert v[KEY | 0x12] == refused  # a corrupted tag
        assert v[KEY | 0x14] == 0  # the next good request still goes through
        assert v[KEY | 0x13] == refused  # VMPCK0 wiped in the guest
        fw = m.vm._sev_model.messages
        assert (fw.seqno[0], fw.requests, fw.refused) == (4, 5, 3)
        certs = parse_certificate_table(m.vm.read(CERTS, 4 * 4096))
        assert certs == fw.chip.certificate_der()
    finally:
        m.close()


def test_extended_request_with_a_short_certificate_buffer_gets_invalid_len():
    m, r = _attest(flags=1, cert_pages=1)
    try:
        assert r.outcome == "done", r.describe()
        blob = m.vm._sev_model.certificate_blob
        need = -(-len(blob) // 4096)
        assert need > 1
        assert r.values[KEY | 1] == GR.snp_guest_err(GR.SNP_GUEST_VMM_ERR_INVALID_LEN, 0)
        assert r.values[KEY | 0xA] == need  # KVM tells the guest how many pages it needs
        assert m.vm._sev_model.messages.requests == 0  # not issued to the firmware
    finally:
        m.close()


def test_set_config_reported_tcb_reaches_the_report_and_platform_status():
    from kvmharness.errors import SevError
    from kvmharness.sim import snp as S

    system = SimSystem()
    try:
        chip = S.snp_chip_for(system)
        lower = TcbVersion(bootloader=chip.current_tcb.bootloader - 1, tee=0,
                           snp=chip.current_tcb.snp - 2, microcode=chip.current_tcb.microcode)
        S.set_config(system, lower)
        with pytest.raises(SevError, match="INVALID_PARAM"):
            S.set_config(system, TcbVersion(bootloader=99, tee=0, snp=0, microcode=0))
        st = S.platform_status(system)
        assert st.reported_tcb_version == lower.raw(chip.generation) != st.current_tcb_version
        m, r = _attest(flags=1, system=system)
        try:
            assert r.values[KEY | 1] == 0
            _s, report = parse_report_response(m.vm.read(OUTPUT, 0x4C0))
            rep = AttestationReport.parse(report)
            assert rep.reported_tcb == lower.raw(chip.generation)
            certs = parse_certificate_table(m.vm.read(CERTS, 4 * 4096))
            res = verify_report(report, load_certificate(certs["vcek"]),
                                ark=load_certificate(certs["ark"]),
                                ask=load_certificate(certs["ask"]))
            assert res.ok, [c for c in res.checks if not c.ok]
            assert S.platform_status(system, m.vm._sev_model).guest_count == 1
        finally:
            m.close()
    finally:
        system.close()


def test_snp_report_cli_writes_files_snp_verify_accepts(tmp_path):
    out = tmp_path / "r"
    p = subprocess.run([sys.executable, "-m", "kvmharness", "snp", "report", "snp-attest",
                        "--backend", "sim", "--report-data", "c0ffee" * 8, "--vmpl", "1",
                        "--out", str(out), "--json"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert sorted(f.name for f in out.iterdir()) == ["ark.pem", "ask.pem", "report.bin", "vcek.pem"]
    digest = json.loads(subprocess.run(
        [sys.executable, "-m", "kvmharness", "measure", "snp-attest", "--mode", "sev-snp", "--json"],
        capture_output=True, text=True, check=True).stdout)["launch_digest"]
    assert d["launch_digest"] == digest
    assert d["report"]["measurement"] == digest and d["report"]["vmpl"] == 1
    verify = [sys.executable, "-m", "kvmharness", "snp", "verify", "--report", str(out / "report.bin"),
              "--vcek", str(out / "vcek.pem"), "--json"]
    ok = subprocess.run(verify + ["--ark", str(out / "ark.pem"), "--ask", str(out / "ask.pem"),
                                  "--measurement", digest, "--report-data", "c0ffee" * 8],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    amd = subprocess.run(verify, capture_output=True, text=True)  # AMD's real roots: refused
    assert amd.returncode == 1
    wrong = subprocess.run(verify + ["--ark", str(out / "ark.pem"), "--ask", str(out / "ask.pem"),
                                     "--report-data", "c0ffef" * 8], capture_output=True, text=True)
    assert wrong.returncode == 1


def test_snp_report_refuses_a_guest_that_is_not_snp(tmp_path):
    p = subprocess.run([sys.executable, "-m", "kvmharness", "snp", "report", "hello", "--out",
                        str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2 and "not an SEV-SNP guest" in p.stderr


def test_msg_key_req_from_the_guest_gets_the_firmwares_derived_key():
    from kvmharness.snp.messages import GuestFieldSelect, KeyRequest, derive_key

    fields = int(GuestFieldSelect.MEASUREMENT | GuestFieldSelect.GUEST_POLICY)
    m = Machine.for_guest("snp-attest", "sim", sev="sev-snp")
    try:
        m.vm.write(INPUT, REPORT_DATA + struct.pack("<IIIIQ", 1, 32, 0, 0, fields))
        r = m.run(timeout=60)
        assert r.outcome == "done", r.describe()
        v = r.values
        assert (v[KEY | 0x16], v[KEY | 0x17], v[KEY | 0x18]) == (0, 0, 0)
        fw = m.vm._sev_model.messages
        status, key = derive_key(fw.chip, fw.guest, KeyRequest(guest_field_select=fields, vmpl=1))
        assert status == 0
        assert (v[KEY | 0x19], v[KEY | 0x1A]) == struct.unpack("<QQ", key[:16])
        assert m.vm.read(OUTPUT + 0x820, 32) == key
    finally:
        m.close()
