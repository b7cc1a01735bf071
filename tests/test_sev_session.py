"""The guest owner's side of LAUNCH_START / LAUNCH_SECRET (pure logic)."""

import os

import pytest

from kvmharness.sev.certs import CERT_SIZE, CertAlgo, CertUsage, SevCertificate, generate_key
from kvmharness.sev.firmware import SimulatedSevFirmware
from kvmharness.sev.policy import GuestPolicy
from kvmharness.sev.session import (
    KEK_LABEL,
    KIK_LABEL,
    MASTER_SECRET_LABEL,
    GuestOwner,
    SecretHeader,
    SessionBlob,
    kdf,
    secret_mac,
    session_keys,
)


def test_kdf_vector():
    # virtee/sev's key-derivation vector: master secret from Z = 0, nonce = 0
    assert kdf(bytes(16), MASTER_SECRET_LABEL, bytes(16)).hex() == \
        "ab4d269fcc62bedb4511d56c386ce706"
    assert len(kdf(b"k", b"label", length=40)) == 40
    # L (the output length in bits) is part of every PRF input, so a longer
    # output is not an extension of a shorter one
    assert kdf(b"k", b"label", length=40)[:32] != kdf(b"k", b"label", length=32)


def test_session_blob_vector():
    # virtee/sev's session vector: Z = 0, nonce = IV = 0, TEK = TIK = 0, policy 0
    kek, kik = session_keys(bytes(16), bytes(16))
    assert kek == kdf(kdf(bytes(16), MASTER_SECRET_LABEL, bytes(16)), KEK_LABEL)
    assert kik == kdf(kdf(bytes(16), MASTER_SECRET_LABEL, bytes(16)), KIK_LABEL)
    blob = SessionBlob.wrap(bytes(16), bytes(16), 0, kek, kik, bytes(16), bytes(16))
    assert blob.wrap_tk.hex() == ("2137bc7f9bb8bd7c3e55a576a15d3454"
                                  "b3856b8ba27afadf46dcfee9f02c02c4")
    assert blob.wrap_mac.hex() == ("3176c0752738bd9d5e86689534020f52"
                                   "8c088f16238826b000b327dee6aeed7d")
    assert blob.policy_mac.hex() == ("aa7855e13839dd767cd5da7c1ff50365"
                                     "40c9264b7a803029315e55375287b4af")
    raw = blob.to_bytes()
    assert len(raw) == 128 and raw[48:64] == bytes(16)  # IV at 48
    assert SessionBlob.from_bytes(raw) == blob
    assert blob.wrap_mac_ok(kik) and not blob.wrap_mac_ok(kek)
    assert blob.unwrap(kek) == (bytes(16), bytes(16))


def test_owner_start_produces_godh_cert_and_blob():
    fw = SimulatedSevFirmware(num_asids=4, min_sev_asid=2)
    owner = GuestOwner(GuestPolicy.parse("nodbg"))
    # the exported CEK is unsigned (as AMD's firmware exports it): AMD's ASK vouches for the
    # platform only through the ASK-signed CEK from the (simulated) KDS
    start = owner.start(*fw.pdh_cert_export(), cek=fw.kds_cek(), ask=fw.ask_cert)
    assert start.chain.complete is False and start.chain.skipped == ("ARK self-signed", "ARK -> ASK")
    assert len(start.dh_cert) == CERT_SIZE and len(start.session) == 128
    godh = SevCertificate.from_bytes(start.dh_cert)
    assert (godh.usage, godh.algo) == (CertUsage.PDH, CertAlgo.ECDH_SHA256)
    assert godh.sigs[0].empty and godh.sigs[1].empty
    # fresh ephemeral key and nonce each time
    again = owner.start(*fw.pdh_cert_export())
    assert again.dh_cert != start.dh_cert and again.session[:16] != start.session[:16]


def test_owner_refuses_unverifiable_chain():
    fw, other = SimulatedSevFirmware(), SimulatedSevFirmware()
    pdh, _ = fw.pdh_cert_export()
    from kvmharness.sev.certs import CertificateError
    with pytest.raises(CertificateError):
        GuestOwner(0).start(pdh, other.pdh_cert_export()[1])


def test_session_round_trip_firmware_recovers_tek_tik():
    fw = SimulatedSevFirmware(num_asids=4, min_sev_asid=2)
    fw.ensure_init()
    owner = GuestOwner(0x1)
    start = owner.start(*fw.pdh_cert_export())
    handle = fw.launch_start(start.policy, start.dh_cert, start.session)
    guest = fw._guests[handle]  # white-box: the unwrapped keys
    assert (guest.tek, guest.tik) == (owner.tek, owner.tik)


def test_secret_packet_layout():
    owner = GuestOwner(0, tek=bytes(range(16)), tik=bytes(range(16, 32)))
    from kvmharness.sev.measurement import LaunchMeasurement
    m = LaunchMeasurement(os.urandom(32), os.urandom(16))
    packet = owner.secret_packet(b"s" * 32, measurement=m, iv=bytes(16))
    raw = packet.header.to_bytes()
    assert len(raw) == 52 and raw[:4] == bytes(4) and raw[4:20] == bytes(16)
    assert SecretHeader.from_bytes(raw) == packet.header
    assert packet.header.mac == secret_mac(owner.tik, 0, bytes(16), 32, packet.ciphertext,
                                           m.measure)
    assert packet.ciphertext != b"s" * 32 and packet.guest_len == 32
    with pytest.raises(ValueError, match="verify the launch measurement"):
        GuestOwner(0).secret_packet(b"x" * 16)
    with pytest.raises(ValueError, match="compressed"):
        owner.secret_packet(b"x" * 16, measurement=m, flags=1)


def test_godh_key_can_be_supplied():
    fw = SimulatedSevFirmware()
    key = generate_key()
    start = GuestOwner(0).start(*fw.pdh_cert_export(), godh_key=key)
    assert SevCertificate.from_bytes(start.dh_cert).qx == key.public_key().public_numbers().x
