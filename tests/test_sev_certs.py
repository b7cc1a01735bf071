"""The SEV binary certificate format and the platform chain (pure logic)."""

import dataclasses
import struct

import pytest

from kvmharness.sev.certs import (
    BODY_SIZE,
    CERT_SIZE,
    CertAlgo,
    CertificateError,
    CertUsage,
    EcCurve,
    PlatformCertChain,
    SevCertificate,
    generate_key,
)
from kvmharness.sev.chain import verify_platform_chain
from kvmharness.sev.firmware import SimulatedSevFirmware


@pytest.fixture(scope="module")
def oca_key():
    return generate_key()


@pytest.fixture(scope="module")
def oca(oca_key):
    return SevCertificate.for_key(oca_key, CertUsage.OCA, CertAlgo.ECDSA_SHA256, api_major=1,
                                  api_minor=55).signed(oca_key, CertUsage.OCA)


def test_layout_offsets(oca, oca_key):
    raw = oca.to_bytes()
    assert len(raw) == CERT_SIZE == 2084 and BODY_SIZE == 0x414
    assert struct.unpack_from("<IBB", raw) == (1, 1, 55)
    assert struct.unpack_from("<III", raw, 8) == (0x1001, 0x002, EcCurve.P384)
    nums = oca_key.public_key().public_numbers()
    assert raw[0x14:0x14 + 48] == nums.x.to_bytes(48, "little")
    assert raw[0x5C:0x5C + 48] == nums.y.to_bytes(48, "little")
    assert raw[0x14 + 48:0x14 + 72] == bytes(24)  # coordinates are zero-padded to 72
    assert struct.unpack_from("<II", raw, 0x414) == (0x1001, 0x002)  # sig1 usage, algo
    assert struct.unpack_from("<II", raw, 0x61C) == (0x1000, 0)  # sig2 empty
    assert raw[0x624:] == bytes(512)


def test_round_trip_and_self_signature(oca):
    parsed = SevCertificate.from_bytes(oca.to_bytes())
    assert parsed == oca and parsed.to_bytes() == oca.to_bytes()
    assert parsed.is_signed_by(parsed)
    oca.verify_signed_by(oca)


@pytest.mark.parametrize("algo", [CertAlgo.ECDSA_SHA256, CertAlgo.ECDSA_SHA384])
def test_two_signatures_sha256_and_sha384(oca, oca_key, algo):
    cek_key = generate_key()
    cek = SevCertificate.for_key(cek_key, CertUsage.CEK, CertAlgo.ECDSA_SHA256)
    pek_key = generate_key()
    pek = (SevCertificate.for_key(pek_key, CertUsage.PEK, algo)
           .signed(oca_key, CertUsage.OCA, algo).signed(cek_key, CertUsage.CEK, algo))
    parsed = SevCertificate.from_bytes(pek.to_bytes())
    assert parsed.is_signed_by(oca) and parsed.is_signed_by(cek)
    assert not parsed.is_signed_by(SevCertificate.for_key(generate_key(), CertUsage.OCA,
                                                          CertAlgo.ECDSA_SHA256))
    with pytest.raises(CertificateError, match="two signatures"):
        pek.signed(oca_key, CertUsage.OCA)


def test_tampered_signature_fails(oca):
    raw = bytearray(oca.to_bytes())
    raw[0x41C] ^= 1  # r, lowest byte
    with pytest.raises(CertificateError, match="not validly signed"):
        SevCertificate.from_bytes(raw).verify_signed_by(oca)


def test_tampered_body_fails(oca):
    raw = bytearray(oca.to_bytes())
    raw[5] = 56  # api_minor is covered by the signature
    assert not SevCertificate.from_bytes(raw).is_signed_by(oca)


@pytest.mark.parametrize("offset,value,match", [
    (0, 2, "version 2"), (0x0C, 0x001, "not ECDSA or ECDH"), (0x10, 3, "curve id 3"),
])
def test_malformed_rejected(oca, offset, value, match):
    raw = bytearray(oca.to_bytes())
    struct.pack_into("<I", raw, offset, value)
    with pytest.raises(CertificateError, match=match):
        SevCertificate.from_bytes(raw)


def test_wrong_size_and_off_curve_point(oca):
    with pytest.raises(CertificateError, match="2084"):
        SevCertificate.from_bytes(oca.to_bytes()[:-1])
    off = dataclasses.replace(oca, qy=oca.qy ^ 1)
    with pytest.raises(CertificateError, match="not a point on the curve"):
        SevCertificate.from_bytes(off.to_bytes()).public_key()


def test_platform_chain_from_simulated_firmware_verifies():
    fw = SimulatedSevFirmware(num_asids=4, min_sev_asid=2)
    pdh_raw, chain_raw = fw.pdh_cert_export()
    assert len(pdh_raw) == CERT_SIZE and len(chain_raw) == 3 * CERT_SIZE
    pdh = SevCertificate.from_bytes(pdh_raw)
    chain = PlatformCertChain.from_bytes(chain_raw)
    assert (pdh.usage, pdh.algo) == (CertUsage.PDH, CertAlgo.ECDH_SHA256)
    # the exported CEK is unsigned, as AMD's firmware exports it: asking the ASK to vouch
    # for it is refused; the ASK-signed CEK from the (simulated) KDS verifies
    with pytest.raises(CertificateError, match="ASK -> CEK unverified"):
        verify_platform_chain(pdh, chain, ask=fw.ask_cert)
    signed = dataclasses.replace(chain, cek=SevCertificate.from_bytes(fw.kds_cek()))
    key = verify_platform_chain(pdh, signed, ask=fw.ask_cert)
    assert key.public_numbers().x == pdh.qx
    assert verify_platform_chain(pdh, chain).public_numbers().x == pdh.qx  # without AMD's roots
    # the chain of a different platform does not vouch for this PDH
    other = PlatformCertChain.from_bytes(SimulatedSevFirmware().pdh_cert_export()[1])
    with pytest.raises(CertificateError):
        verify_platform_chain(pdh, other)
    # wrong order is refused on parse
    with pytest.raises(CertificateError, match="expected a PEK"):
        PlatformCertChain.from_bytes(chain_raw[CERT_SIZE:] + chain_raw[:CERT_SIZE])


def test_simulated_chip_chain_runs_the_real_verify_path():
    """The simulated chip's KDS CEK is signed as AMD signs one: RSA-PSS by an ASK under an
    ARK; the CEK in its PDH_CERT_EXPORT is unsigned, as AMD's firmware exports it."""
    from kvmharness.sev.amd_ca import AmdCaCertificate, roots_for_cek
    from kvmharness.sev.chain import verify_chain

    fw = SimulatedSevFirmware(num_asids=4, min_sev_asid=2)
    assert isinstance(fw.ask_cert, AmdCaCertificate) and isinstance(fw.ark_cert, AmdCaCertificate)
    assert (fw.ark_cert.usage, fw.ask_cert.usage) == (CertUsage.ARK, CertUsage.ASK)
    pdh, chain = fw.pdh_cert_export()
    assert all(s.usage == CertUsage.INVALID for s in PlatformCertChain.from_bytes(chain).cek.sigs)
    cek = SevCertificate.from_bytes(fw.kds_cek())
    assert (cek.sigs[0].usage, cek.sigs[0].algo) == (CertUsage.ASK, CertAlgo.RSA_SHA256)
    result = verify_chain(pdh, *(chain[i * CERT_SIZE:(i + 1) * CERT_SIZE] for i in range(3)),
                          ask=fw.ask_cert.to_bytes(), ark=fw.ark_cert.to_bytes(),
                          kds_cek=fw.kds_cek())
    assert result.complete
    assert roots_for_cek(cek) is None  # AMD's real roots never vouch for a simulated chip


def test_rsa_signature_needs_an_rsa_key(oca, oca_key):
    with pytest.raises(CertificateError, match="RSA key"):
        oca.signed(oca_key, CertUsage.ASK, CertAlgo.RSA_SHA384)
