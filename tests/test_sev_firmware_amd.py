"""The firmware model against AMD's published SEV firmware source, check by check.

``AMD_FIRMWARE_CHECKS`` (kvmharness/sev/firmware.py) lists, per command, every
check AMD's firmware makes (github.com/amd/AMD-ASPFW, sev_mcmd.c and friends),
in its order, with the status it returns.  Each row has a trigger here that
sets up a firmware so that every earlier check of the command passes and this
one fails -- where it is cheap the trigger also breaks a *later* check, so the
order is tested too -- and the test asserts the status and that the model
reports exactly that check (``SevError.fw_check``).  No device needed.
"""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest
from sev_fakes import start_guest

from kvmharness.errors import SevError
from kvmharness.sev.certs import CERT_SIZE, CertAlgo, CertUsage, SevCertificate, generate_key
from kvmharness.sev.firmware import (
    AMD_FIRMWARE_CHECKS,
    SimulatedSevFirmware,
    render_checks_markdown,
)
from kvmharness.sev.policy import GuestPolicy
from kvmharness.sev.session import SECRET_FLAG_COMPRESSED, GuestOwner, SecretHeader, secret_mac
from kvmharness.sev.status import GuestState, PlatformState, SevStatus

PAGE = 4096
NUM_ASIDS, MIN_SEV_ASID = 6, 3  # ES ASIDs 1..2, SEV ASIDs 3..6
DOC = Path(__file__).resolve().parents[1] / "docs" / "sev-firmware-checks.md"

TRIGGERS: dict[tuple[str, str], object] = {}


def trigger(command: str, *checks: str):
    def register(fn):
        for check in checks:
            TRIGGERS[(command, check)] = fn
        return fn
    return register


def new_fw(**kw) -> SimulatedSevFirmware:
    return SimulatedSevFirmware(num_asids=NUM_ASIDS, min_sev_asid=MIN_SEV_ASID, **kw)


def measured(fw, policy=0, *, activate=True):
    handle, owner = start_guest(fw, policy, activate=activate)
    s = fw.platform_status()
    owner.verify(fw.launch_measure(handle), api_major=s.api_major, api_minor=s.api_minor,
                 build=s.build)
    return handle, owner


def ran(fw, policy=0):
    """A guest that reached RUNNING on its ASID."""
    handle, owner = measured(fw, policy)
    fw.launch_finish(handle)
    return handle


def oca_pair():
    key = generate_key()
    cert = SevCertificate.for_key(key, CertUsage.OCA, CertAlgo.ECDSA_SHA256)
    return key, cert.signed(key, CertUsage.OCA)


# -- INIT, SHUTDOWN, PLATFORM_RESET, PLATFORM_STATUS ---------------------------------------

@trigger("INIT", "platform-state")
def _(fw):
    fw.init()
    fw.init(flags=0x2)  # also a bad flag: the state is checked first


@trigger("INIT", "flags")
def _(fw):
    fw.init(flags=0x2)


def test_init_es_flag_on_a_chip_without_es_is_invalid_config():
    fw = new_fw(es=False)
    with pytest.raises(SevError) as ei:
        fw.init(flags=0x1)
    assert (ei.value.fw_error, ei.value.fw_check) == (SevStatus.INVALID_CONFIG, "flags")


@trigger("SHUTDOWN", "any-state")
def _(fw):
    fw.shutdown()  # UNINIT -> UNINIT is allowed
    assert fw.platform_status().state == PlatformState.UNINIT
    ran(fw)
    fw.shutdown()  # WORKING -> UNINIT
    assert fw.platform_status().state == PlatformState.UNINIT


@trigger("PLATFORM_RESET", "platform-state")
def _(fw):
    fw.ensure_init()
    fw.platform_reset()


@trigger("PLATFORM_STATUS", "uninit-fields")
def _(fw):
    fw.ensure_init()
    start_guest(fw)
    assert fw.platform_status().config_es and fw.platform_status().guest_count == 1
    fw.shutdown()
    st = fw.platform_status()
    assert (st.state, st.flags, st.guest_count) == (PlatformState.UNINIT, 0, 0)


# -- PEK / PDH / GET_ID / DF_FLUSH --------------------------------------------------------

@trigger("PEK_GEN", "platform-state")
def _(fw):
    start_guest(fw)
    fw.pek_gen()


@trigger("PEK_CSR", "platform-state")
def _(fw):
    fw.pek_csr(0, auto_init=False)  # UNINIT, and too short: the state comes first


@trigger("PEK_CSR", "length")
def _(fw):
    start_guest(fw)  # WORKING is fine for PEK_CSR
    fw.pek_csr(CERT_SIZE - 1)


@trigger("PDH_GEN", "platform-state")
def _(fw):
    fw.pdh_gen(auto_init=False)


@trigger("PDH_CERT_EXPORT", "platform-state")
def _(fw):
    fw.pdh_cert_export(0, 0, auto_init=False)


@trigger("PDH_CERT_EXPORT", "length")
def _(fw):
    fw.pdh_cert_export(CERT_SIZE, 3 * CERT_SIZE - 1)


@trigger("GET_ID", "length")
def _(fw):
    assert fw.platform_status().state == PlatformState.UNINIT
    assert len(fw.get_id()) == 64  # any state
    fw.get_id(63)


@trigger("DF_FLUSH", "wbinvd")
def _(fw):
    fw.init()  # INIT clears every core's WBINVD-done flag
    fw.df_flush()


@trigger("DF_FLUSH", "any-state")
def _(fw):
    fw.wbinvd()
    fw.df_flush()  # UNINIT: no platform state check
    handle = ran(fw)
    fw.deactivate(handle)  # a guest that ran: WBINVD needed again
    with pytest.raises(SevError) as ei:
        fw.df_flush()
    assert ei.value.fw_check == "wbinvd"
    fw.kernel_flush()


# -- PEK_CERT_IMPORT ---------------------------------------------------------------------

def _csr(fw):
    return SevCertificate.from_bytes(fw.pek_csr())


@trigger("PEK_CERT_IMPORT", "platform-state")
def _(fw):
    start_guest(fw)
    fw.pek_cert_import(b"", b"")


@trigger("PEK_CERT_IMPORT", "owned")
def _(fw):
    key, oca = oca_pair()
    pek = _csr(fw).signed(key, CertUsage.OCA)
    fw.pek_cert_import(pek.to_bytes(), oca.to_bytes())
    fw.pek_cert_import(b"", b"")  # also bad lengths: ownership comes first


@trigger("PEK_CERT_IMPORT", "length")
def _(fw):
    key, oca = oca_pair()
    fw.pek_cert_import(_csr(fw).signed(key, CertUsage.OCA).to_bytes()[:-1], oca.to_bytes())


@trigger("PEK_CERT_IMPORT", "format")
def _(fw):
    fw.pek_cert_import(bytes(CERT_SIZE), bytes(CERT_SIZE))


@trigger("PEK_CERT_IMPORT", "oca-signature")
def _(fw):
    key, oca = oca_pair()
    raw = bytearray(oca.to_bytes())
    raw[5] ^= 1  # api_minor: the body no longer matches its self-signature
    pek = _csr(fw).signed(key, CertUsage.OCA)
    fw.pek_cert_import(pek.to_bytes(), bytes(raw))


@trigger("PEK_CERT_IMPORT", "oca-unsigned")
def _(fw):
    key = generate_key()
    oca = SevCertificate.for_key(key, CertUsage.OCA, CertAlgo.ECDSA_SHA256)  # no signature
    fw.pek_cert_import(_csr(fw).signed(key, CertUsage.OCA).to_bytes(), oca.to_bytes())


@trigger("PEK_CERT_IMPORT", "oca-usage")
def _(fw):
    key = generate_key()
    not_oca = SevCertificate.for_key(key, CertUsage.PEK, CertAlgo.ECDSA_SHA256).signed(
        key, CertUsage.PEK)  # self-signed, but a PEK
    fw.pek_cert_import(_csr(fw).signed(key, CertUsage.PEK).to_bytes(), not_oca.to_bytes())


@trigger("PEK_CERT_IMPORT", "pek-signature")
def _(fw):
    _, oca = oca_pair()
    someone_else = generate_key()
    fw.pek_cert_import(_csr(fw).signed(someone_else, CertUsage.OCA).to_bytes(), oca.to_bytes())


@trigger("PEK_CERT_IMPORT", "pek-unsigned")
def _(fw):
    _, oca = oca_pair()
    fw.pek_cert_import(_csr(fw).to_bytes(), oca.to_bytes())


@trigger("PEK_CERT_IMPORT", "pek-usage")
def _(fw):
    key, oca = oca_pair()
    fw.pek_cert_import(oca.to_bytes(), oca.to_bytes())  # an OCA where the PEK goes


@trigger("PEK_CERT_IMPORT", "pek-body")
def _(fw):
    key, oca = oca_pair()
    other = SevCertificate.for_key(generate_key(), CertUsage.PEK, CertAlgo.ECDSA_SHA256)
    fw.pek_cert_import(other.signed(key, CertUsage.OCA).to_bytes(), oca.to_bytes())


# -- guest lifecycle -----------------------------------------------------------------------

@trigger("DECOMMISSION", "platform-state")
@trigger("DEACTIVATE", "platform-state")
@trigger("ACTIVATE", "platform-state")
@trigger("LAUNCH_UPDATE_DATA", "platform-state")
@trigger("LAUNCH_MEASURE", "platform-state")
@trigger("LAUNCH_SECRET", "platform-state")
@trigger("LAUNCH_FINISH", "platform-state")
@trigger("ATTESTATION_REPORT", "platform-state")
@trigger("DBG_DECRYPT", "platform-state")
@trigger("DBG_ENCRYPT", "platform-state")
def _needs_working(fw, command):
    """INIT, no guest: every guest command wants WORKING (and would also say INVALID_GUEST)."""
    fw.ensure_init()
    call_with_handle(fw, command, 1)


def call_with_handle(fw, command, handle, **kw):
    page = bytearray(kw.get("length", 16))
    return {
        "DECOMMISSION": lambda: fw.decommission(handle),
        "DEACTIVATE": lambda: fw.deactivate(handle),
        "ACTIVATE": lambda: fw.activate(handle, kw.get("asid", MIN_SEV_ASID)),
        "LAUNCH_UPDATE_DATA": lambda: fw.launch_update_data(handle, kw.get("gpa", 0), page),
        "LAUNCH_UPDATE_VMSA": lambda: fw.launch_update_vmsa(handle, kw.get("gpa", 0),
                                                            bytearray(PAGE)),
        "LAUNCH_MEASURE": lambda: fw.launch_measure(handle),
        "LAUNCH_SECRET": lambda: fw.launch_secret(handle, bytes(52), bytes(16), 0,
                                                  bytearray(16)),
        "LAUNCH_FINISH": lambda: fw.launch_finish(handle),
        "ATTESTATION_REPORT": lambda: fw.attestation_report(handle, bytes(16)),
        "DBG_DECRYPT": lambda: fw.dbg_decrypt(handle, kw.get("gpa", 0), bytes(16)),
        "DBG_ENCRYPT": lambda: fw.dbg_encrypt(handle, kw.get("gpa", 0), bytes(16)),
    }[command]()


@trigger("DECOMMISSION", "handle")
@trigger("DEACTIVATE", "handle")
@trigger("ACTIVATE", "handle")
@trigger("LAUNCH_UPDATE_DATA", "handle")
@trigger("LAUNCH_UPDATE_VMSA", "handle")
@trigger("LAUNCH_MEASURE", "handle")
@trigger("LAUNCH_SECRET", "handle")
@trigger("LAUNCH_FINISH", "handle")
@trigger("ATTESTATION_REPORT", "handle")
@trigger("DBG_DECRYPT", "handle")
@trigger("DBG_ENCRYPT", "handle")
def _unknown_handle(fw, command):
    start_guest(fw)  # WORKING, guest 1
    call_with_handle(fw, command, 99)


@trigger("DECOMMISSION", "guest-active")
def _(fw):
    handle, _ = start_guest(fw)
    fw.decommission(handle)


@trigger("ACTIVATE", "asid-range")
def _(fw):
    handle, _ = start_guest(fw, activate=False)
    fw.activate(handle, NUM_ASIDS + 1)


@trigger("ACTIVATE", "asid-owned")
def _(fw):
    a, _ = start_guest(fw)
    b, _ = start_guest(fw, GuestPolicy.parse("es"))  # active too, and an ES guest on an SEV ASID
    fw.activate(b, fw.guest_status(a).asid)


@trigger("ACTIVATE", "guest-active")
def _(fw):
    handle, _ = start_guest(fw)
    fw.activate(handle, 1)  # also the wrong kind of ASID: ACTIVE comes first


@trigger("ACTIVATE", "asid-dirty")
def _(fw):
    first = ran(fw)
    asid = fw.guest_status(first).asid
    fw.deactivate(first)  # it ran: the ASID is dirty
    es, _ = start_guest(fw, GuestPolicy.parse("es"), activate=False)
    fw.activate(es, asid)  # also the wrong kind: the dirty check comes first


def test_init_leaves_every_asid_dirty():
    fw = new_fw()
    fw.init()  # the bare command, without the kernel's DF_FLUSH
    handle = fw.launch_start(0)
    with pytest.raises(SevError) as ei:
        fw.activate(handle, MIN_SEV_ASID)
    assert (ei.value.fw_error, ei.value.fw_check) == (SevStatus.DFFLUSH_REQUIRED, "asid-dirty")
    fw.kernel_flush()
    fw.activate(handle, MIN_SEV_ASID)


@trigger("ACTIVATE", "asid-kind")
def _(fw):
    handle, _ = start_guest(fw, activate=False)
    fw.activate(handle, 1)  # an ES ASID for a plain SEV guest


@trigger("ACTIVATE", "asid-clean")
def _(fw):
    handle, _ = start_guest(fw)  # activated, never ran
    asid = fw.guest_status(handle).asid
    fw.deactivate(handle)
    other, _ = start_guest(fw, activate=False)
    fw.activate(other, asid)  # clean: no DF_FLUSH needed
    assert fw.guest_status(other).asid == asid


@trigger("DEACTIVATE", "inactive")
@trigger("LAUNCH_UPDATE_DATA", "inactive")
@trigger("LAUNCH_MEASURE", "length")
def _not_active(fw, command):
    handle, _ = start_guest(fw, activate=False)
    if command == "LAUNCH_MEASURE":  # needs no ASID: the length query works unactivated
        fw.launch_measure(handle, 0)
    call_with_handle(fw, command, handle, gpa=8, length=8)  # also misaligned: later checks


@trigger("GUEST_STATUS", "platform-state")
def _(fw):
    fw.guest_status(1)


@trigger("GUEST_STATUS", "unknown-handle")
def _(fw):
    fw.ensure_init()  # INIT is enough for GUEST_STATUS
    st = fw.guest_status(7)
    assert (st.state, st.policy, st.asid) == (GuestState.INVALID, 0, 0)


# -- LAUNCH_START --------------------------------------------------------------------------

def _session(fw, policy=0):
    fw.ensure_init()
    return GuestOwner(policy).start(*fw.pdh_cert_export())


@trigger("LAUNCH_START", "platform-state")
def _(fw):
    fw.launch_start(0)


@trigger("LAUNCH_START", "session-length")
def _(fw):
    start = _session(fw)
    fw.launch_start(0, start.dh_cert[:-1], start.session[:-1])  # both short: session first


@trigger("LAUNCH_START", "dh-cert-length")
def _(fw):
    start = _session(fw)
    fw.launch_start(0, start.dh_cert[:-1], start.session)


@trigger("LAUNCH_START", "dh-cert")
def _(fw):
    start = _session(fw)
    godh = SevCertificate.from_bytes(start.dh_cert)
    sha384 = dataclasses.replace(godh, algo=CertAlgo.ECDH_SHA384)  # AMD: exactly ECDH-SHA256
    fw.launch_start(0, sha384.to_bytes(), start.session)


@trigger("LAUNCH_START", "wrap-mac")
def _(fw):
    start = _session(fw)
    fw.pdh_gen()  # the blob was made for the old PDH
    fw.launch_start(0, start.dh_cert, start.session)


@trigger("LAUNCH_START", "policy-mac")
def _(fw):
    start = _session(fw, 0)
    fw.launch_start(1 << 6, start.dh_cert, start.session)  # host changed the policy


@trigger("LAUNCH_START", "policy-api")
def _(fw):
    policy = GuestPolicy(1 << 6, api_major=2)  # too new *and* reserved bits: API first
    start = _session(fw, policy)
    fw.launch_start(policy, start.dh_cert, start.session)


@trigger("LAUNCH_START", "policy-reserved")
def _(fw):
    start = _session(fw, 1 << 6)
    fw.launch_start(1 << 6, start.dh_cert, start.session)


@trigger("LAUNCH_START", "unattested-policy")
def _(fw):
    fw.ensure_init()
    handle = fw.launch_start(GuestPolicy(1 << 6, api_major=9))
    assert fw.guest_status(handle).policy == GuestPolicy(1 << 6, api_major=9).value


@trigger("LAUNCH_START", "share-handle")
def _(fw):
    start_guest(fw)
    fw.launch_start(0, handle=5)


@trigger("LAUNCH_START", "share-policy")
def _(fw):
    a, _ = start_guest(fw, 0)
    b = fw.launch_start(0, handle=a)  # equal policy: the key is shared
    assert fw.guest_key(b) is fw.guest_key(a)
    fw.launch_start(GuestPolicy.parse("nodbg"), handle=a)


def test_key_sharing_with_a_noks_guest_is_policy_failure():
    fw = new_fw()
    a, _ = start_guest(fw, GuestPolicy.parse("noks"))
    with pytest.raises(SevError) as ei:
        fw.launch_start(GuestPolicy.parse("noks"), handle=a)  # equal, but NOKS
    assert (ei.value.fw_error, ei.value.fw_check) == (SevStatus.POLICY_FAILURE, "share-policy")


@trigger("LAUNCH_START", "guests")
def _(fw):
    small = new_fw(max_guests=2)
    small.ensure_init()
    first = small.launch_start(0)
    small.launch_start(0)
    small.decommission(first)
    assert small.launch_start(0) == first  # the lowest free handle is reused
    small.launch_start(GuestPolicy.parse("es"))  # full (and ES would be fine)


@trigger("LAUNCH_START", "es-platform")
def _(fw):
    no_es = new_fw(es=False)
    no_es.ensure_init()
    no_es.launch_start(GuestPolicy.parse("es"))


# -- LAUNCH_UPDATE_* / MEASURE / SECRET / FINISH / ATTESTATION ---------------------------------

@trigger("LAUNCH_UPDATE_DATA", "guest-state")
@trigger("LAUNCH_UPDATE_VMSA", "guest-state")
@trigger("LAUNCH_MEASURE", "guest-state")
def _measured_already(fw, command):
    handle, _ = measured(fw, GuestPolicy.parse("es"))
    call_with_handle(fw, command, handle, gpa=8)


@trigger("LAUNCH_UPDATE_DATA", "address")
def _(fw):
    handle, _ = start_guest(fw)
    fw.launch_update_data(handle, 8, bytearray(8))  # length bad too: address first


@trigger("LAUNCH_UPDATE_DATA", "length")
def _(fw):
    handle, _ = start_guest(fw)
    fw.launch_update_data(handle, 0, bytearray())


@trigger("LAUNCH_UPDATE_VMSA", "vmsa-length")
def _(fw):
    fw.launch_update_vmsa(1, 0, bytearray(PAGE // 2))  # UNINIT, no guest: length first


@trigger("LAUNCH_UPDATE_VMSA", "platform-state")
def _(fw):
    fw.ensure_init()
    fw.launch_update_vmsa(1, 0, bytearray(PAGE))


@trigger("LAUNCH_UPDATE_VMSA", "es-guest")
def _(fw):
    handle, _ = start_guest(fw, activate=False)  # plain SEV, and inactive: ES first
    fw.launch_update_vmsa(handle, 0, bytearray(PAGE))


@trigger("LAUNCH_UPDATE_VMSA", "inactive")
def _(fw):
    handle, _ = start_guest(fw, GuestPolicy.parse("es"), activate=False)
    fw.launch_update_vmsa(handle, 8, bytearray(PAGE))


@trigger("LAUNCH_UPDATE_VMSA", "address")
def _(fw):
    handle, _ = start_guest(fw, GuestPolicy.parse("es"))
    fw.launch_update_vmsa(handle, 0x1008, bytearray(PAGE))


def test_vmsa_address_needs_only_16_byte_alignment():
    fw = new_fw()
    handle, _ = start_guest(fw, GuestPolicy.parse("es"))
    fw.launch_update_vmsa(handle, 0x1010, bytearray(PAGE))  # not page aligned: accepted


def _packet(fw, handle, owner, *, flags=0, n=16):
    packet = owner.secret_packet(b"s" * n)
    if flags:
        g = fw._guests[handle]
        mac = secret_mac(owner.tik, flags, packet.header.iv, n, packet.ciphertext,
                         g.measurement.measure)
        return SecretHeader(flags, packet.header.iv, mac).to_bytes(), packet.ciphertext
    return packet.header.to_bytes(), packet.ciphertext


@trigger("LAUNCH_SECRET", "address")
def _(fw):
    handle, owner = measured(fw)
    hdr, ct = _packet(fw, handle, owner)
    fw.launch_secret(handle, hdr[:10], ct, 8, bytearray(16))  # header bad too: address first


@trigger("LAUNCH_SECRET", "length")
def _(fw):
    handle, owner = start_guest(fw, activate=False)  # LUPDATE and inactive too: lengths first
    fw.launch_secret(handle, bytes(52), bytes(32), 0, bytearray(16))


def test_launch_secret_length_rules():
    fw = new_fw()
    handle, owner = measured(fw)
    hdr, ct = _packet(fw, handle, owner)
    for header, trans, area in ((hdr[:51], ct, 16), (hdr, ct[:8], 8), (hdr, b"", 0),
                                (hdr, bytes(0x5010), 0x5010)):
        with pytest.raises(SevError) as ei:
            fw.launch_secret(handle, header, trans, 0, bytearray(area))
        assert (ei.value.fw_error, ei.value.fw_check) == (SevStatus.INVALID_LEN, "length")


@trigger("LAUNCH_SECRET", "guest-state")
def _(fw):
    handle, _ = start_guest(fw, activate=False)  # LUPDATE and inactive: the state first
    fw.launch_secret(handle, bytes(52), bytes(16), 0, bytearray(16))


@trigger("LAUNCH_SECRET", "inactive")
def _(fw):
    handle, owner = measured(fw, activate=False)
    hdr, ct = _packet(fw, handle, owner)
    fw.launch_secret(handle, hdr, bytes(16), 0, bytearray(16))  # a bad MAC too


@trigger("LAUNCH_SECRET", "mac")
def _(fw):
    handle, owner = measured(fw)
    hdr, ct = _packet(fw, handle, owner)
    flagged = bytes([hdr[0] | SECRET_FLAG_COMPRESSED]) + hdr[1:]  # MAC no longer covers it
    fw.launch_secret(handle, flagged, ct, 0, bytearray(16))


@trigger("LAUNCH_SECRET", "compressed")
def _(fw):
    handle, owner = measured(fw)
    hdr, ct = _packet(fw, handle, owner, flags=SECRET_FLAG_COMPRESSED)
    fw.launch_secret(handle, hdr, ct, 0, bytearray(16))


@trigger("LAUNCH_FINISH", "guest-state")
def _(fw):
    handle, _ = start_guest(fw)
    fw.launch_finish(handle)


@trigger("ATTESTATION_REPORT", "guest-state")
def _(fw):
    handle, _ = start_guest(fw)
    fw.attestation_report(handle, bytes(16), 0)  # short buffer too: state first


@trigger("ATTESTATION_REPORT", "length")
def _(fw):
    handle, _ = measured(fw)
    fw.attestation_report(handle, bytes(16), 207)


# -- DBG_DECRYPT / DBG_ENCRYPT ---------------------------------------------------------------

@trigger("DBG_DECRYPT", "address")
@trigger("DBG_ENCRYPT", "address")
def _dbg_address(fw, command):
    start_guest(fw, GuestPolicy.parse("nodbg"))
    call_with_handle(fw, command, 99, gpa=8)  # unknown handle, NODBG: the address first


@trigger("DBG_DECRYPT", "length")
@trigger("DBG_ENCRYPT", "length")
def _dbg_length(fw, command):
    start_guest(fw)
    call = fw.dbg_decrypt if command == "DBG_DECRYPT" else fw.dbg_encrypt
    call(99, 0, bytes(8))  # unknown handle too: the length first


@trigger("DBG_DECRYPT", "nodbg")
@trigger("DBG_ENCRYPT", "nodbg")
def _dbg_nodbg(fw, command):
    handle, _ = start_guest(fw, GuestPolicy.parse("nodbg"), activate=False)  # inactive too
    call_with_handle(fw, command, handle)


@trigger("DBG_DECRYPT", "inactive")
@trigger("DBG_ENCRYPT", "inactive")
def _dbg_inactive(fw, command):
    handle, _ = start_guest(fw, activate=False)
    call_with_handle(fw, command, handle)


# -- the table, row by row ---------------------------------------------------------------------

def _call(fn, fw, command):
    try:
        return fn(fw, command)
    except TypeError as e:
        if "positional argument" not in str(e):
            raise
        return fn(fw)


@pytest.mark.parametrize("row", AMD_FIRMWARE_CHECKS,
                         ids=[f"{r.command}:{r.check}" for r in AMD_FIRMWARE_CHECKS])
def test_every_check_returns_amds_status(row):
    fn = TRIGGERS[(row.command, row.check)]
    fw = new_fw()
    if row.status == SevStatus.SUCCESS:
        _call(fn, fw, row.command)  # the trigger asserts what AMD's firmware accepts
        return
    with pytest.raises(SevError) as ei:
        _call(fn, fw, row.command)
    err = ei.value
    assert (err.command, err.errno, err.fw_error, getattr(err, "fw_check", None)) == (
        row.command, errno.EIO, row.status, row.check), str(err)


def test_every_trigger_has_a_row_and_every_row_a_source():
    rows = {(r.command, r.check) for r in AMD_FIRMWARE_CHECKS}
    assert len(rows) == len(AMD_FIRMWARE_CHECKS), "duplicate rows"
    assert set(TRIGGERS) == rows
    for r in AMD_FIRMWARE_CHECKS:
        file, function = r.source.split()
        assert file.endswith(".c") and function.isidentifier(), r


def test_the_issues_four_cases():
    """Issue 11's table: AMD's firmware against what the model used to answer."""
    fw = new_fw(es=False)
    fw.ensure_init()
    with pytest.raises(SevError) as ei:
        fw.launch_start(GuestPolicy.parse("es"))
    assert ei.value.fw_error == SevStatus.UNSUPPORTED  # was POLICY_FAILURE
    fw = new_fw()
    a, _ = start_guest(fw, GuestPolicy.parse("nodbg"))
    with pytest.raises(SevError) as ei:
        fw.launch_start(0, handle=a)  # different policy, neither has NOKS
    assert ei.value.fw_error == SevStatus.POLICY_FAILURE  # was SUCCESS
    asid = fw.guest_status(a).asid
    fw.deactivate(a)
    fw.activate(a, asid)  # was DFFLUSH_REQUIRED
    st = fw.guest_status(42)
    assert st.state == GuestState.INVALID == 0  # was INVALID_GUEST


def test_doc_is_the_table():
    assert DOC.read_text() == render_checks_markdown(), (
        "docs/sev-firmware-checks.md is stale: regenerate it with "
        "kvmharness.sev.firmware.render_checks_markdown()")
