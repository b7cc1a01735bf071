"""SimulatedSevFirmware: launches, state rules and every error path (no device)."""

import dataclasses
import errno
import os

import pytest
from sev_fakes import start_guest

from kvmharness.errors import SevError
from kvmharness.sev.certs import (
    CertAlgo,
    CertUsage,
    PlatformCertChain,
    SevCertificate,
    generate_key,
)
from kvmharness.sev.chain import verify_platform_chain
from kvmharness.sev.firmware import SimulatedSevFirmware
from kvmharness.sev.measurement import LaunchMeasurement, MeasurementMismatch
from kvmharness.sev.policy import GuestPolicy
from kvmharness.sev.session import GuestOwner
from kvmharness.sev.status import GuestState, PlatformState, SevStatus

PAGE = 4096
# CPUID 0x8000001F: ECX = 6 guests, EDX = 3 -> ES ASIDs 1..2, SEV ASIDs 3..6
NUM_ASIDS, MIN_SEV_ASID = 6, 3


@pytest.fixture
def fw():
    return SimulatedSevFirmware(num_asids=NUM_ASIDS, min_sev_asid=MIN_SEV_ASID)


def fw_error(excinfo, status):
    err = excinfo.value
    assert isinstance(err, SevError)
    assert (err.errno, err.fw_error) == (errno.EIO, status), str(err)
    return err


def update(fw, handle, owner, gpa, data):
    ram = bytearray(data)
    fw.launch_update_data(handle, gpa, memoryview(ram))
    owner.measure_data(data)
    return bytes(ram)


def verify(fw, owner, m):
    s = fw.platform_status()
    owner.verify(m, api_major=s.api_major, api_minor=s.api_minor, build=s.build)


# -- the happy path -----------------------------------------------------------

def test_full_attested_launch_with_secret(fw):
    handle, owner = start_guest(fw, GuestPolicy.parse("nodbg"))
    assert fw.guest_status(handle).state == GuestState.LUPDATE
    assert fw.platform_status().state == PlatformState.WORKING
    image = os.urandom(2 * PAGE)
    ct = update(fw, handle, owner, 0x100000, image)
    assert ct != image and fw.guest_key(handle).decrypt(0x100000, ct) == image
    m = fw.launch_measure(handle)
    assert fw.guest_status(handle).state == GuestState.LSECRET
    verify(fw, owner, m)

    secret = b"the disk key is 0123456789abcdef"
    packet = owner.secret_packet(secret)
    target = bytearray(len(secret))
    fw.launch_secret(handle, packet.header.to_bytes(), packet.ciphertext, 0x200800,
                     memoryview(target))
    assert bytes(target) != secret
    assert fw.guest_key(handle).decrypt(0x200800, target) == secret

    fw.launch_finish(handle)
    st = fw.guest_status(handle)
    assert (st.state, st.policy, st.asid) == (GuestState.RUNNING, 0x1, MIN_SEV_ASID)


def test_es_launch_measures_vmsa_after_data(fw):
    handle, owner = start_guest(fw, GuestPolicy.parse("es"))
    assert fw.guest_status(handle).asid == 1  # ES ASIDs come from 1..EDX-1
    update(fw, handle, owner, 0, os.urandom(PAGE))
    vmsa = bytearray(os.urandom(PAGE))
    plain = bytes(vmsa)
    fw.launch_update_vmsa(handle, 0x5000, memoryview(vmsa))
    owner.measure_vmsa(plain)
    assert fw.guest_key(handle).decrypt(0x5000, vmsa) == plain
    verify(fw, owner, fw.launch_measure(handle))


def test_measurement_detects_a_changed_image(fw):
    handle, owner = start_guest(fw)
    ram = bytearray(os.urandom(PAGE))
    fw.launch_update_data(handle, 0, memoryview(ram))
    owner.measure_data(os.urandom(PAGE))  # the owner expected something else
    with pytest.raises(MeasurementMismatch):
        verify(fw, owner, fw.launch_measure(handle))


def test_unattested_launch_without_session(fw):
    fw.ensure_init()
    handle = fw.launch_start(0)
    fw.activate(handle, fw.asids.allocate(es=False))
    fw.launch_update_data(handle, 0, bytearray(16))
    assert len(fw.launch_measure(handle).to_bytes()) == 48
    fw.launch_finish(handle)


def test_decommission_returns_platform_to_init(fw):
    h1, _ = start_guest(fw)
    h2, _ = start_guest(fw)
    assert fw.platform_status().guest_count == 2
    for h in (h1, h2):
        asid = fw.guest_status(h).asid
        fw.deactivate(h)
        fw.decommission(h)
        fw.asids.free(asid)
    st = fw.platform_status()
    assert (st.state, st.guest_count) == (PlatformState.INIT, 0)


# -- platform commands ----------------------------------------------------------

def test_platform_status_defaults_and_bytes(fw):
    st = fw.platform_status()
    assert (st.api_major, st.api_minor, st.build, st.state) == (1, 55, 21, PlatformState.UNINIT)
    assert not st.config_es and not st.externally_owned
    fw.ensure_init()
    st = fw.platform_status()
    assert st.state == PlatformState.INIT and st.config_es
    raw = st.to_bytes()
    assert len(raw) == 12 and raw[:3] == bytes([1, 55, 1])
    assert int.from_bytes(raw[3:7], "little") == 0x100 and raw[7] == 21
    assert len(fw.get_id()) == 64


def test_double_init_is_invalid_platform_state(fw):
    fw.init()
    with pytest.raises(SevError) as ei:
        fw.init()
    fw_error(ei, SevStatus.INVALID_PLATFORM_STATE)
    fw.ensure_init()  # the kernel path is idempotent
    fw.shutdown()
    assert fw.platform_status().state == PlatformState.UNINIT


def test_launch_start_needs_initialized_platform(fw):
    with pytest.raises(SevError) as ei:
        fw.launch_start(0)
    fw_error(ei, SevStatus.INVALID_PLATFORM_STATE)


def test_pek_gen_rotates_keys_and_breaks_old_sessions(fw):
    pdh, chain = fw.pdh_cert_export()  # INITs on first use, like the kernel
    assert fw.platform_status().state == PlatformState.INIT
    start = GuestOwner(0).start(pdh, chain)
    fw.pek_gen()
    pdh2, chain2 = fw.pdh_cert_export()
    assert pdh2 != pdh and chain2 != chain
    verify_platform_chain(SevCertificate.from_bytes(pdh2), PlatformCertChain.from_bytes(chain2))
    with pytest.raises(SevError) as ei:
        fw.launch_start(0, start.dh_cert, start.session)
    fw_error(ei, SevStatus.BAD_MEASUREMENT)


def test_pdh_gen_allowed_while_working(fw):
    start_guest(fw)
    pdh, _ = fw.pdh_cert_export()
    fw.pdh_gen()
    assert fw.pdh_cert_export()[0] != pdh


def test_pek_commands_in_working_state(fw):
    start_guest(fw)
    with pytest.raises(SevError) as ei:
        fw.pek_gen()
    fw_error(ei, SevStatus.INVALID_PLATFORM_STATE)
    # AMD's sev_mcmd_pek_csr accepts INIT and WORKING
    assert SevCertificate.from_bytes(fw.pek_csr()).usage == CertUsage.PEK


def test_factory_reset(fw):
    pdh, _ = fw.pdh_cert_export()
    fw.factory_reset()
    assert fw.platform_status().state == PlatformState.UNINIT
    assert fw.pdh_cert_export()[0] != pdh


def test_factory_reset_with_guests_is_refused_by_the_kernel(fw):
    start_guest(fw)
    with pytest.raises(SevError) as ei:
        fw.factory_reset()
    assert (ei.value.errno, ei.value.fw_error) == (errno.EBUSY, None)
    assert fw.platform_status().state == PlatformState.WORKING


def test_pek_csr_and_cert_import_take_ownership(fw):
    csr = SevCertificate.from_bytes(fw.pek_csr())
    assert csr.usage == CertUsage.PEK and csr.sigs[0].empty and csr.sigs[1].empty
    oca_key = generate_key()
    oca = SevCertificate.for_key(oca_key, CertUsage.OCA, CertAlgo.ECDSA_SHA256).signed(
        oca_key, CertUsage.OCA)
    pek = csr.signed(oca_key, CertUsage.OCA)

    bad = generate_key()  # a PEK signed by someone else's key
    with pytest.raises(SevError) as ei:
        fw.pek_cert_import(csr.signed(bad, CertUsage.OCA).to_bytes(), oca.to_bytes())
    fw_error(ei, SevStatus.BAD_SIGNATURE)
    with pytest.raises(SevError) as ei:
        fw.pek_cert_import(oca.to_bytes(), oca.to_bytes())  # not a PEK
    fw_error(ei, SevStatus.INVALID_CERTIFICATE)

    fw.pek_cert_import(pek.to_bytes(), oca.to_bytes())
    assert fw.platform_status().externally_owned
    pdh, chain = fw.pdh_cert_export()
    parsed = PlatformCertChain.from_bytes(chain)
    assert parsed.oca == oca
    signed = dataclasses.replace(parsed, cek=SevCertificate.from_bytes(fw.kds_cek()))
    verify_platform_chain(SevCertificate.from_bytes(pdh), signed, ask=fw.ask_cert)
    with pytest.raises(SevError) as ei:
        fw.pek_cert_import(pek.to_bytes(), oca.to_bytes())
    fw_error(ei, SevStatus.ALREADY_OWNED)
    fw.pek_gen()  # back to self-owned
    assert not fw.platform_status().externally_owned


# -- guest state machine ----------------------------------------------------------

def test_wrong_order_is_invalid_guest_state(fw):
    handle, _ = start_guest(fw)
    with pytest.raises(SevError) as ei:
        fw.launch_finish(handle)  # not measured yet
    fw_error(ei, SevStatus.INVALID_GUEST_STATE)
    with pytest.raises(SevError) as ei:
        fw.launch_secret(handle, bytes(52), bytes(16), 0, bytearray(16))
    fw_error(ei, SevStatus.INVALID_GUEST_STATE)
    fw.launch_measure(handle)
    for call in (lambda: fw.launch_measure(handle),
                 lambda: fw.launch_update_data(handle, 0, bytearray(16))):
        with pytest.raises(SevError) as ei:
            call()
        fw_error(ei, SevStatus.INVALID_GUEST_STATE)


def test_update_after_finish_is_invalid_guest_state(fw):
    handle, _ = start_guest(fw)
    fw.launch_measure(handle)
    fw.launch_finish(handle)
    for call in (lambda: fw.launch_update_data(handle, 0, bytearray(16)),
                 lambda: fw.launch_finish(handle),
                 lambda: fw.launch_measure(handle)):
        with pytest.raises(SevError) as ei:
            call()
        err = fw_error(ei, SevStatus.INVALID_GUEST_STATE)
        assert "RUNNING" in str(err)


@pytest.mark.parametrize("call", [
    lambda fw: fw.launch_update_data(99, 0, bytearray(16)),
    lambda fw: fw.launch_measure(99), lambda fw: fw.launch_finish(99),
    lambda fw: fw.activate(99, 3),
    lambda fw: fw.deactivate(99), lambda fw: fw.decommission(99),
    lambda fw: fw.dbg_decrypt(99, 0, bytes(16)),
    lambda fw: fw.launch_start(0, handle=99),
])
def test_bad_handle_is_invalid_guest(fw, call):
    start_guest(fw)  # WORKING: the platform state is checked before the handle
    with pytest.raises(SevError) as ei:
        call(fw)
    fw_error(ei, SevStatus.INVALID_GUEST)


def test_guest_status_of_unknown_handle_is_invalid_state(fw):
    start_guest(fw)
    st = fw.guest_status(99)
    assert (st.state, st.policy, st.asid) == (GuestState.INVALID, 0, 0)


def test_update_needs_active_guest_and_alignment(fw):
    handle, _ = start_guest(fw, activate=False)
    with pytest.raises(SevError) as ei:
        fw.launch_update_data(handle, 0, bytearray(16))
    fw_error(ei, SevStatus.INACTIVE)
    fw.activate(handle, MIN_SEV_ASID)
    with pytest.raises(SevError) as ei:
        fw.launch_update_data(handle, 8, bytearray(16))
    fw_error(ei, SevStatus.INVALID_ADDRESS)
    with pytest.raises(SevError) as ei:
        fw.launch_update_data(handle, 0, bytearray(20))
    fw_error(ei, SevStatus.INVALID_LEN)
    with pytest.raises(SevError) as ei:
        fw.launch_update_data(handle, 0, bytearray())
    fw_error(ei, SevStatus.INVALID_LEN)
    with pytest.raises(TypeError, match="writable"):
        fw.launch_update_data(handle, 0, bytes(16))


def test_vmsa_update_rules(fw):
    handle, _ = start_guest(fw)  # plain SEV
    with pytest.raises(SevError) as ei:
        fw.launch_update_vmsa(handle, 0, bytearray(PAGE))
    fw_error(ei, SevStatus.UNSUPPORTED)
    es, _ = start_guest(fw, GuestPolicy.parse("es"))
    with pytest.raises(SevError) as ei:
        fw.launch_update_vmsa(es, 0x8, bytearray(PAGE))
    fw_error(ei, SevStatus.INVALID_ADDRESS)
    with pytest.raises(SevError) as ei:
        fw.launch_update_vmsa(es, 0, bytearray(PAGE // 2))
    fw_error(ei, SevStatus.INVALID_LEN)


def test_measure_length_query(fw):
    handle, _ = start_guest(fw)
    with pytest.raises(SevError) as ei:
        fw.launch_measure(handle, length=0)
    fw_error(ei, SevStatus.INVALID_LEN)
    assert fw.guest_status(handle).state == GuestState.LUPDATE  # nothing happened
    assert isinstance(fw.launch_measure(handle, length=256), LaunchMeasurement)


# -- policy -----------------------------------------------------------------------

@pytest.mark.parametrize("policy,why", [
    (0x40, "reserved bits"), (0x8000, "reserved bits"),
    (GuestPolicy(0, api_major=1, api_minor=56), "requires firmware API >= 1.56"),
    (GuestPolicy(0, api_major=2), "requires firmware API >= 2.0"),
])
def test_bad_policy_is_policy_failure(fw, policy, why):
    with pytest.raises(SevError) as ei:
        start_guest(fw, policy, activate=False)  # checked only with a session (AMD's source)
    err = fw_error(ei, SevStatus.POLICY_FAILURE)
    assert why in str(err)
    assert fw.launch_start(policy)  # an unattested launch checks nothing of the policy


def test_api_minimum_met_is_accepted(fw):
    fw.ensure_init()
    fw.launch_start(GuestPolicy(0, api_major=1, api_minor=55))


def test_es_policy_on_platform_without_es():
    fw = SimulatedSevFirmware(es=False, num_asids=4, min_sev_asid=2)
    fw.ensure_init()
    assert not fw.platform_status().config_es
    with pytest.raises(SevError) as ei:
        fw.launch_start(GuestPolicy.parse("es"))
    fw_error(ei, SevStatus.UNSUPPORTED)  # sev_mcmd_launch_start: !sev_es_platform_enabled


def test_key_sharing_respects_noks(fw):
    a, _ = start_guest(fw)
    b = fw.launch_start(0, handle=a)
    assert fw.guest_key(b) is fw.guest_key(a)
    c, _ = start_guest(fw, GuestPolicy.parse("noks"))
    for args in ((GuestPolicy.parse("noks"), c), (GuestPolicy.parse("noks"), a), (1, a)):
        with pytest.raises(SevError) as ei:
            fw.launch_start(args[0], handle=args[1])
        fw_error(ei, SevStatus.POLICY_FAILURE)


# -- session and secret integrity -----------------------------------------------------

def test_bad_session_mac_is_bad_measurement(fw):
    fw.ensure_init()
    start = GuestOwner(0).start(*fw.pdh_cert_export())
    blob = bytearray(start.session)
    blob[20] ^= 1  # wrapped TEK
    with pytest.raises(SevError) as ei:
        fw.launch_start(0, start.dh_cert, bytes(blob))
    fw_error(ei, SevStatus.BAD_MEASUREMENT)
    # the host changing the policy the owner MACed
    with pytest.raises(SevError) as ei:
        fw.launch_start(GuestPolicy.parse("es"), start.dh_cert, start.session)
    fw_error(ei, SevStatus.BAD_MEASUREMENT)
    # a different GODH key than the blob was made with
    other = GuestOwner(0).start(*fw.pdh_cert_export())
    with pytest.raises(SevError) as ei:
        fw.launch_start(0, other.dh_cert, start.session)
    fw_error(ei, SevStatus.BAD_MEASUREMENT)
    assert fw.platform_status().guest_count == 0


def test_bad_dh_cert_and_lengths(fw):
    fw.ensure_init()
    start = GuestOwner(0).start(*fw.pdh_cert_export())
    with pytest.raises(SevError) as ei:
        fw.launch_start(0, start.dh_cert[:-4], start.session)
    fw_error(ei, SevStatus.INVALID_LEN)
    with pytest.raises(SevError) as ei:
        fw.launch_start(0, start.dh_cert, start.session[:64])
    fw_error(ei, SevStatus.INVALID_LEN)
    key = generate_key()
    wrong_usage = SevCertificate.for_key(key, CertUsage.PEK, CertAlgo.ECDSA_SHA256)
    with pytest.raises(SevError) as ei:
        fw.launch_start(0, wrong_usage.to_bytes(), start.session)
    fw_error(ei, SevStatus.INVALID_CERTIFICATE)
    godh = SevCertificate.from_bytes(start.dh_cert)
    import dataclasses
    off_curve = dataclasses.replace(godh, qy=godh.qy ^ 1)
    with pytest.raises(SevError) as ei:
        fw.launch_start(0, off_curve.to_bytes(), start.session)
    fw_error(ei, SevStatus.INVALID_CERTIFICATE)


def _measured(fw):
    handle, owner = start_guest(fw)
    update(fw, handle, owner, 0, bytes(PAGE))
    verify(fw, owner, fw.launch_measure(handle))
    return handle, owner


def test_tampered_secret_is_bad_measurement(fw):
    handle, owner = _measured(fw)
    packet = owner.secret_packet(b"k" * 16)
    ct = bytearray(packet.ciphertext)
    ct[0] ^= 1
    target = bytearray(16)
    with pytest.raises(SevError) as ei:
        fw.launch_secret(handle, packet.header.to_bytes(), bytes(ct), 0x1000, memoryview(target))
    fw_error(ei, SevStatus.BAD_MEASUREMENT)
    assert target == bytearray(16)  # nothing written
    # a packet bound to another launch's measurement
    stale = owner.secret_packet(b"k" * 16, measurement=LaunchMeasurement(bytes(32), bytes(16)))
    with pytest.raises(SevError) as ei:
        fw.launch_secret(handle, stale.header.to_bytes(), stale.ciphertext, 0x1000, target)
    fw_error(ei, SevStatus.BAD_MEASUREMENT)


def test_secret_argument_checks(fw):
    handle, owner = _measured(fw)
    packet = owner.secret_packet(b"k" * 32)
    hdr = packet.header.to_bytes()
    # crossing a page is the kernel's business (contiguous pages), not the firmware's
    fw.launch_secret(handle, hdr, packet.ciphertext, 0xFF0, bytearray(32))
    with pytest.raises(SevError) as ei:
        fw.launch_secret(handle, hdr[:48], packet.ciphertext, 0, bytearray(32))
    fw_error(ei, SevStatus.INVALID_LEN)
    with pytest.raises(SevError) as ei:
        fw.launch_secret(handle, hdr, packet.ciphertext, 0, bytearray(16))
    fw_error(ei, SevStatus.INVALID_LEN)
    flagged = b"\x01\0\0\0" + hdr[4:]
    with pytest.raises(SevError) as ei:
        fw.launch_secret(handle, flagged, packet.ciphertext, 0, bytearray(32))
    fw_error(ei, SevStatus.BAD_MEASUREMENT)  # the MAC covers the flags and comes first


# -- debug -------------------------------------------------------------------------------

def test_dbg_round_trip_without_nodbg(fw):
    handle, owner = start_guest(fw)
    image = os.urandom(64)
    ct = update(fw, handle, owner, 0x3000, image)
    assert fw.dbg_decrypt(handle, 0x3000, ct) == image
    assert fw.dbg_encrypt(handle, 0x3000, image) == ct
    with pytest.raises(SevError) as ei:
        fw.dbg_decrypt(handle, 0x3008, ct)
    fw_error(ei, SevStatus.INVALID_ADDRESS)


def test_dbg_with_nodbg_is_policy_failure(fw):
    handle, _ = start_guest(fw, GuestPolicy.parse("nodbg"))
    for call in (fw.dbg_decrypt, fw.dbg_encrypt):
        with pytest.raises(SevError) as ei:
            call(handle, 0, bytes(16))
        fw_error(ei, SevStatus.POLICY_FAILURE)


# -- ASIDs -------------------------------------------------------------------------------

def test_asid_ranges_and_exhaustion(fw):
    fw.ensure_init()
    assert [fw.asids.allocate(es=True) for _ in range(2)] == [1, 2]
    with pytest.raises(SevError) as ei:
        fw.asids.allocate(es=True)
    err = ei.value
    assert (err.errno, err.fw_error) == (errno.EBUSY, None)
    assert "no free SEV-ES ASID" in str(err)
    assert [fw.asids.allocate(es=False) for _ in range(4)] == [3, 4, 5, 6]
    with pytest.raises(SevError) as ei:
        fw.asids.allocate(es=False)
    assert ei.value.errno == errno.EBUSY


def test_freed_asid_is_reused_only_after_flush(fw):
    handles = []
    for _ in range(4):
        handles.append(start_guest(fw)[0])
    h = handles[1]
    asid = fw.guest_status(h).asid
    fw.launch_measure(h)
    fw.launch_finish(h)  # the guest ran on its ASID: the ASID is now 'in use'
    fw.deactivate(h)
    fw.decommission(h)
    # bypassing KVM's allocator: the firmware wants WBINVD + DF_FLUSH first
    h2, _ = start_guest(fw, activate=False)
    with pytest.raises(SevError) as ei:
        fw.activate(h2, asid)
    fw_error(ei, SevStatus.DFFLUSH_REQUIRED)
    # KVM's way: free parks the ASID, the allocator flushes when it runs dry
    fw.asids.free(asid)
    new = fw.asids.allocate(es=False)
    assert new == asid
    fw.activate(h2, new)


def test_asid_of_a_guest_that_never_ran_is_clean(fw):
    h, _ = start_guest(fw)  # activated, still LUPDATE: its ASID is only 'allocated'
    asid = fw.guest_status(h).asid
    fw.deactivate(h)
    fw.activate(h, asid)  # AMD: allocated-but-never-used CCXs go back to clean
    assert fw.guest_status(h).asid == asid


def test_activate_checks(fw):
    a, _ = start_guest(fw)
    b, _ = start_guest(fw, activate=False)
    es, _ = start_guest(fw, GuestPolicy.parse("es"), activate=False)
    owned = fw.guest_status(a).asid
    cases = [((b, 0), SevStatus.INVALID_ASID), ((b, NUM_ASIDS + 1), SevStatus.INVALID_ASID),
             ((b, 1), SevStatus.INVALID_ASID),  # an ES ASID for a plain SEV guest
             ((es, MIN_SEV_ASID + 1), SevStatus.INVALID_ASID),  # and the other way round
             ((b, owned), SevStatus.ASID_OWNED),
             ((a, owned + 1), SevStatus.ACTIVE)]
    for args, status in cases:
        with pytest.raises(SevError) as ei:
            fw.activate(*args)
        fw_error(ei, status)
    with pytest.raises(SevError) as ei:
        fw.decommission(a)
    fw_error(ei, SevStatus.ACTIVE)
    with pytest.raises(SevError) as ei:
        fw.deactivate(b)
    fw_error(ei, SevStatus.INACTIVE)


# -- attestation report ---------------------------------------------------------------

def test_attestation_report_signed_by_pek(fw):
    from kvmharness.sev.certs import CertificateError
    from kvmharness.sev.measurement import AttestationReport, launch_digest

    handle, owner = start_guest(fw, 0x1)
    image = os.urandom(PAGE)
    update(fw, handle, owner, 0, image)
    with pytest.raises(SevError) as ei:
        fw.attestation_report(handle, bytes(16))  # not measured yet
    fw_error(ei, SevStatus.INVALID_GUEST_STATE)
    fw.launch_measure(handle)
    nonce = os.urandom(16)
    raw = fw.attestation_report(handle, nonce)
    assert len(raw) == 208
    report = AttestationReport.from_bytes(raw)
    assert (report.mnonce, report.launch_digest, report.policy) == (
        nonce, launch_digest([image]), 0x1)
    assert (report.sig_usage, report.sig_algo) == (0x1002, 0x2)
    assert report.to_bytes() == raw
    pek = PlatformCertChain.from_bytes(fw.pdh_cert_export()[1]).pek
    report.verify(pek)
    tampered = bytearray(raw)
    tampered[20] ^= 1  # launch digest
    with pytest.raises(CertificateError, match="does not verify"):
        AttestationReport.from_bytes(tampered).verify(pek)
    other_pek = PlatformCertChain.from_bytes(SimulatedSevFirmware().pdh_cert_export()[1]).pek
    with pytest.raises(CertificateError):
        report.verify(other_pek)
