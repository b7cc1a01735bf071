"""MSG_REPORT_REQ / MSG_KEY_REQ answered by the simulated SNP firmware, and the
certificate table of extended guest requests.

Pure logic: no device.  Layouts per the kernel's sev-guest.h (as go-sev-guest
mirrors it); statuses SEV_RET_INVALID_PARAM (0x16) and SEV_RET_INVALID_KEY (0x27).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import struct

import pytest

from kvmharness.sev.status import SevStatus
from kvmharness.snp import certs
from kvmharness.snp.attest import GuestAttestationContext, SimulatedSnpChip
from kvmharness.snp.messages import (
    MSG_KEY_RSP_SIZE,
    MSG_REPORT_REQ_SIZE,
    MSG_REPORT_RSP_SIZE,
    GuestFieldSelect,
    KeyRequest,
    ReportRequest,
    answer_key_request,
    answer_report_request,
    certificate_table,
    parse_certificate_table,
    parse_key_response,
    parse_report_response,
)
from kvmharness.snp.report import AttestationReport
from kvmharness.snp.verify import verify_report

AT = dt.datetime(2027, 6, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def chip():
    return SimulatedSnpChip("milan")


@pytest.fixture()
def guest():
    return GuestAttestationContext(measurement=b"\x5a" * 48, guest_svn=3, image_id=b"I" * 16,
                                   family_id=b"F" * 16, policy=0x30000)


def test_report_request_layout():
    raw = ReportRequest(report_data=b"\x01" * 64, vmpl=2).to_bytes()
    assert len(raw) == MSG_REPORT_REQ_SIZE == 0x60
    assert raw[:64] == b"\x01" * 64 and raw[0x40:0x44] == b"\x02\0\0\0" and raw[0x44:] == bytes(28)
    assert ReportRequest.parse(raw) == ReportRequest(b"\x01" * 64, 2)


def test_report_request_answered_with_a_signed_report(chip, guest):
    rsp = answer_report_request(chip, guest, ReportRequest(b"nonce".ljust(64, b"\0"), 1).to_bytes())
    assert len(rsp) == MSG_REPORT_RSP_SIZE
    status, report = parse_report_response(rsp)
    assert status == SevStatus.SUCCESS and len(report) == 0x4A0
    assert struct.unpack_from("<I", rsp, 4)[0] == 0x4A0 and rsp[8:0x20] == bytes(24)
    rep = AttestationReport.parse(report)
    assert rep.vmpl == 1 and rep.report_data.startswith(b"nonce") and rep.measurement == guest.measurement
    pems = chip.certificates()
    v = verify_report(report, certs.load_certificate(pems["vcek"]), at=AT,
                      ark=certs.load_certificate(pems["ark"]), ask=certs.load_certificate(pems["ask"]))
    assert v.ok, v.failed


@pytest.mark.parametrize("requesting,vmpl", [(1, 0), (3, 2), (0, 4)])
def test_report_for_a_more_privileged_or_bad_vmpl_is_invalid_param(chip, guest, requesting, vmpl):
    rsp = answer_report_request(chip, guest, ReportRequest(vmpl=vmpl).to_bytes(), requesting)
    status, report = parse_report_response(rsp)
    assert status == SevStatus.INVALID_PARAM == 0x16 and report == b""


def test_short_report_request_is_invalid_param(chip, guest):
    assert parse_report_response(answer_report_request(chip, guest, bytes(0x40)))[0] == 0x16


def _key(chip, guest, requesting=0, **fields):
    rsp = answer_key_request(chip, guest, KeyRequest(**fields).to_bytes(), requesting)
    assert len(rsp) == MSG_KEY_RSP_SIZE
    return parse_key_response(rsp)


def test_key_request_layout():
    raw = KeyRequest(root_key_select=1, guest_field_select=0x3F, vmpl=2, guest_svn=7,
                     tcb_version=0x1122334455667788).to_bytes()
    assert raw[:0x20] == struct.pack("<IIQIIQ", 1, 0, 0x3F, 2, 7, 0x1122334455667788)
    assert KeyRequest.parse(raw[:0x20]).tcb_version == 0x1122334455667788


def test_derived_key_is_stable_and_mixes_exactly_the_selected_fields(chip, guest):
    status, k0 = _key(chip, guest)
    assert status == 0 and len(k0) == 32 and k0 != bytes(32)
    assert _key(chip, guest)[1] == k0
    changes = {GuestFieldSelect.GUEST_POLICY: {"policy": 0x30000 | 1 << 19},
               GuestFieldSelect.IMAGE_ID: {"image_id": b"J" * 16},
               GuestFieldSelect.FAMILY_ID: {"family_id": b"G" * 16},
               GuestFieldSelect.MEASUREMENT: {"measurement": b"\x5b" * 48}}
    for bit, change in changes.items():
        other = dataclasses.replace(guest, **change)
        selected = _key(chip, guest, guest_field_select=bit)[1]
        assert _key(chip, other, guest_field_select=bit)[1] != selected, bit  # mixed in
        assert _key(chip, other)[1] == k0, bit  # not selected: not mixed in
    assert _key(chip, guest, guest_field_select=GuestFieldSelect.GUEST_SVN, guest_svn=1)[1] != \
        _key(chip, guest, guest_field_select=GuestFieldSelect.GUEST_SVN, guest_svn=2)[1]
    assert _key(chip, guest, vmpl=1)[1] != k0
    assert _key(SimulatedSnpChip("milan", chip_id=b"\x09" * 64), guest)[1] != k0


def test_key_request_errors(chip, guest):
    committed = chip.committed_tcb
    over = dataclasses.replace(committed, snp=committed.snp + 1).raw(chip.generation)
    under = dataclasses.replace(committed, microcode=committed.microcode - 1).raw(chip.generation)
    assert _key(chip, guest, tcb_version=under)[0] == 0
    assert _key(chip, guest, tcb_version=over)[0] == 0x16
    assert _key(chip, guest, guest_svn=guest.guest_svn + 1)[0] == 0x16
    assert _key(chip, guest, requesting=2, vmpl=1)[0] == 0x16
    assert _key(chip, guest, guest_field_select=1 << 7)[0] == 0x16
    assert _key(chip, guest, root_key_select=2)[0] == 0x16
    status, key = _key(chip, guest, root_key_select=1)
    assert status == SevStatus.INVALID_KEY == 0x27 and key == bytes(32)
    with_ma = dataclasses.replace(guest, vmrk=b"\x33" * 32)
    status, key = _key(chip, with_ma, root_key_select=1)
    assert status == 0 and key not in (bytes(32), _key(chip, with_ma)[1])


def test_certificate_table_round_trip_and_guid_order(chip):
    ders = chip.certificate_der()
    blob = certificate_table(ders)
    # RFC 4122 byte order: the ARK's GUID c0b406a4-a803-... starts c0 b4 06 a4 a8 03
    assert blob[:6] == bytes.fromhex("c0b406a4a803")
    assert struct.unpack_from("<II", blob, 16) == (24 * 4, len(ders["ark"]))
    assert blob[72:96] == bytes(24)  # the terminating entry
    assert parse_certificate_table(blob) == ders
    with pytest.raises(ValueError, match="past the end"):
        parse_certificate_table(blob[:48])
    with pytest.raises(ValueError, match="terminating"):  # one entry covering itself, no end
        parse_certificate_table(blob[:16] + struct.pack("<II", 0, 24))
    vcek = certs.load_certificate(parse_certificate_table(blob)["vcek"])
    assert certs.VcekExtensions.of(vcek).hw_id == chip.chip_id
