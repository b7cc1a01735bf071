"""AMD's certificates as captured on real hardware: parse, verify, and break one bit at a time.

Data (tests/data/sev/PROVENANCE, kvmharness/sev/roots/PROVENANCE): the PDH, PEK,
OCA and CEK that PDH_CERT_EXPORT returned on a Naples and a Rome EPYC (published
by virtee/sev), and AMD's public ARK/ASK of Naples, Rome, Milan, Genoa and Turin.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from kvmharness.sev.amd_ca import (
    PRODUCTS,
    SNP_PRODUCTS,
    AmdCaCertificate,
    amd_root_pems,
    builtin_roots,
    root_paths,
    roots_for_cek,
)
from kvmharness.sev.certs import (
    CERT_SIZE,
    CertAlgo,
    CertificateError,
    CertUsage,
    PlatformCertChain,
    SevCertificate,
)
from kvmharness.sev.chain import LINK_NAMES, verify_chain, verify_platform_chain
from kvmharness.sev.policy import GuestPolicy
from kvmharness.sev.session import GuestOwner

DATA = Path(__file__).parent / "data" / "sev"
GENERATIONS = ("naples", "rome")  # the real platform chains we hold
ROLES = ("pdh", "pek", "oca", "cek")


def real_chain(gen: str) -> dict[str, bytes]:
    return {role: (DATA / gen / f"{role}.cert").read_bytes() for role in ROLES}


def full_chain(gen: str) -> dict[str, bytes]:
    roots = builtin_roots(gen)
    return {**real_chain(gen), "ask": roots.ask.to_bytes(), "ark": roots.ark.to_bytes()}


# -- AMD's roots -------------------------------------------------------------------------

@pytest.mark.parametrize("product", PRODUCTS)
def test_builtin_roots_parse_round_trip_and_verify(product):
    roots = builtin_roots(product)
    paths = root_paths(product)
    bits = 2048 if product == "naples" else 4096
    for cert, usage, name in ((roots.ark, CertUsage.ARK, "ark.cert"),
                              (roots.ask, CertUsage.ASK, "ask.cert")):
        raw = Path(paths[name]).read_bytes()
        assert cert.to_bytes() == raw and len(raw) == 0x40 + 3 * bits // 8
        assert (cert.version, cert.usage, cert.modulus_size) == (1, usage, bits)
        assert cert.pubexp == 65537 and cert.public_key().key_size == bits
    assert roots.ark.certifying_id == roots.ark.key_id  # self-certified
    assert roots.ask.certifying_id == roots.ark.key_id
    roots.ark.verify_signed_by(roots.ark)
    roots.ask.verify_signed_by(roots.ark)
    assert not roots.ark.is_signed_by(roots.ask)


def test_roots_of_different_products_do_not_vouch_for_each_other():
    for a in PRODUCTS:
        for b in PRODUCTS:
            assert builtin_roots(b).ask.is_signed_by(builtin_roots(a).ark) == (a == b)


@pytest.mark.parametrize("product", SNP_PRODUCTS)
def test_x509_roots_are_the_same_keys_and_chain(product):
    ark_pem, ask_pem = amd_root_pems(product)
    ark, ask = x509.load_pem_x509_certificate(ark_pem), x509.load_pem_x509_certificate(ask_pem)
    roots = builtin_roots(product)
    assert ark.public_key().public_numbers().n == roots.ark.modulus
    assert ask.public_key().public_numbers().n == roots.ask.modulus
    assert ark.subject.rfc4514_string().startswith(f"CN=ARK-{product.capitalize()},")
    ask.verify_directly_issued_by(ark)
    ark.verify_directly_issued_by(ark)
    assert Path(root_paths(product)["ark.pem"]).read_bytes() == ark_pem


def test_no_x509_roots_before_snp_and_unknown_products():
    with pytest.raises(CertificateError, match="SEV-SNP"):
        amd_root_pems("rome")
    with pytest.raises(CertificateError, match="choose one of"):
        builtin_roots("zen9")


def test_ask_ark_concatenation_as_amd_serves_it():
    roots = builtin_roots("rome")
    ask, ark = AmdCaCertificate.parse_many(roots.ask.to_bytes() + roots.ark.to_bytes())
    assert (ask, ark) == (roots.ask, roots.ark)
    with pytest.raises(CertificateError, match="1600 bytes"):
        AmdCaCertificate.from_bytes(roots.ask.to_bytes() + roots.ark.to_bytes())


# -- the real platform chains -------------------------------------------------------------

@pytest.mark.parametrize("gen,sig_algo,api", [("naples", CertAlgo.RSA_SHA256, (0, 16)),
                                              ("rome", CertAlgo.RSA_SHA384, (0, 22))])
def test_real_chain_parses_round_trips_and_verifies(gen, sig_algo, api):
    raw = real_chain(gen)
    certs = {role: SevCertificate.from_bytes(b) for role, b in raw.items()}
    for role, cert in certs.items():
        assert cert.to_bytes() == raw[role]  # byte for byte
        assert cert.usage == CertUsage[role.upper()]
    assert (certs["pdh"].api_major, certs["pdh"].api_minor) == api
    cek_sig = certs["cek"].sigs[0]
    assert (cek_sig.usage, cek_sig.algo) == (CertUsage.ASK, sig_algo) and cek_sig.is_rsa
    assert certs["cek"].sigs[1].empty
    assert [(s.usage, s.algo) for s in certs["pek"].sigs] == [
        (CertUsage.OCA, CertAlgo.ECDSA_SHA256), (CertUsage.CEK, CertAlgo.ECDSA_SHA256)]

    assert roots_for_cek(certs["cek"]).product == gen
    roots = builtin_roots(gen)
    result = verify_chain(**raw, ask=roots.ask, ark=roots.ark)
    assert result.complete and [l.name for l in result.links] == list(LINK_NAMES)
    assert result.pdh_key.public_numbers().x == certs["pdh"].qx

    chain = PlatformCertChain.from_bytes(raw["pek"] + raw["oca"] + raw["cek"])
    key = verify_platform_chain(certs["pdh"], chain, ask=roots.ask, ark=roots.ark)
    assert key.public_numbers().y == certs["pdh"].qy


def test_a_cek_is_not_signed_by_the_other_generations_ask():
    naples_cek = SevCertificate.from_bytes(real_chain("naples")["cek"])
    rome_cek = SevCertificate.from_bytes(real_chain("rome")["cek"])
    assert not naples_cek.is_signed_by(builtin_roots("rome").ask)
    assert not rome_cek.is_signed_by(builtin_roots("naples").ask)
    assert not rome_cek.is_signed_by(builtin_roots("milan").ask)
    result = verify_chain(**real_chain("rome"), ask=builtin_roots("milan").ask,
                          ark=builtin_roots("milan").ark)
    assert result.failed == ("ASK -> CEK",)


def test_real_chains_do_not_mix():
    naples, rome = real_chain("naples"), real_chain("rome")
    result = verify_chain(naples["pdh"], rome["pek"], rome["oca"], rome["cek"])
    assert result.failed == ("PEK -> PDH",)
    assert result.skipped == ("ARK self-signed", "ARK -> ASK", "ASK -> CEK")


@pytest.mark.parametrize("gen", GENERATIONS)
def test_guest_owner_starts_a_session_for_a_real_platform(gen):
    raw = real_chain(gen)
    chain = raw["pek"] + raw["oca"] + raw["cek"]
    owner = GuestOwner(GuestPolicy.parse("nodbg"))
    roots = builtin_roots(gen)
    start = owner.start(raw["pdh"], chain, ask=roots.ask, ark=roots.ark)
    godh = SevCertificate.from_bytes(start.dh_cert)
    pdh = SevCertificate.from_bytes(raw["pdh"])
    assert godh.usage == CertUsage.PDH and len(start.dh_cert) == CERT_SIZE
    assert (godh.api_major, godh.api_minor) == (pdh.api_major, pdh.api_minor)
    assert len(start.session) == 128
    tampered = bytearray(chain)
    tampered[CERT_SIZE + 0x41C] ^= 1  # the OCA's self-signature
    with pytest.raises(CertificateError, match="OCA self-signed"):
        owner.start(raw["pdh"], bytes(tampered))


# -- one flipped bit fails exactly the links it breaks --------------------------------------

def _ca_key_offset(gen: str) -> int:
    return 0x40 + builtin_roots(gen).ark.pubexp_size // 8  # first modulus byte


# (certificate, field, offset or callable(gen) -> offset, the links that must fail).
# A signed field of the subject breaks the links it is the subject of; its public key
# also the links it signs; a signature slot only its own link; a usage field makes the
# certificate unusable, so every link it takes part in.
FLIPS = [
    ("pdh", "api_minor", 0x005, {"PEK -> PDH"}),
    ("pdh", "public key qx", 0x014, {"PEK -> PDH"}),
    ("pdh", "reserved key area", 0x200, {"PEK -> PDH"}),
    ("pdh", "PEK's signature r", 0x41C, {"PEK -> PDH"}),
    ("pek", "api_minor", 0x005, {"CEK -> PEK", "OCA -> PEK"}),
    ("pek", "usage", 0x008, {"CEK -> PEK", "OCA -> PEK", "PEK -> PDH"}),
    ("pek", "public key qy", 0x05C, {"CEK -> PEK", "OCA -> PEK", "PEK -> PDH"}),
    ("pek", "OCA's signature s", 0x41C + 72, {"OCA -> PEK"}),
    ("pek", "CEK's signature r", 0x624, {"CEK -> PEK"}),
    ("oca", "api_major", 0x004, {"OCA self-signed"}),
    ("oca", "public key qx", 0x014, {"OCA self-signed", "OCA -> PEK"}),
    ("oca", "own signature r", 0x41C, {"OCA self-signed"}),
    ("cek", "api_minor", 0x005, {"ASK -> CEK"}),
    ("cek", "public key qx", 0x014, {"ASK -> CEK", "CEK -> PEK"}),
    ("cek", "ASK's RSA signature, low byte", 0x41C, {"ASK -> CEK"}),
    ("cek", "ASK's RSA signature, byte 255", 0x41C + 255, {"ASK -> CEK"}),
    ("cek", "ASK's signature algo", 0x418, {"ASK -> CEK"}),
    ("ask", "key_id", 0x004, {"ARK -> ASK"}),
    ("ask", "certifying_id", 0x014, {"ARK -> ASK"}),
    ("ask", "usage", 0x024, {"ARK -> ASK", "ASK -> CEK"}),
    ("ask", "reserved", 0x028, {"ARK -> ASK"}),
    ("ask", "modulus", _ca_key_offset, {"ARK -> ASK", "ASK -> CEK"}),
    ("ask", "signature, top byte", -1, {"ARK -> ASK"}),
    ("ark", "key_id", 0x004, {"ARK self-signed", "ARK -> ASK"}),
    ("ark", "certifying_id", 0x014, {"ARK self-signed"}),
    ("ark", "reserved", 0x030, {"ARK self-signed"}),
    ("ark", "modulus", _ca_key_offset, {"ARK self-signed", "ARK -> ASK"}),
    ("ark", "signature, low byte", lambda gen: builtin_roots(gen).ark.size - 256,
     {"ARK self-signed"}),
]


@pytest.mark.parametrize("bit", [1, 7])
@pytest.mark.parametrize("role,field,offset,breaks", FLIPS,
                         ids=[f"{r}-{f.replace(' ', '_')}" for r, f, _, _ in FLIPS])
@pytest.mark.parametrize("gen", GENERATIONS)
def test_flipped_bit_fails_exactly_the_links_it_breaks(gen, role, field, offset, breaks, bit):
    certs = full_chain(gen)
    raw = bytearray(certs[role])
    pos = offset(gen) if callable(offset) else offset
    raw[pos] ^= 1 << bit
    certs[role] = bytes(raw)
    result = verify_chain(**certs)
    assert set(result.failed) == breaks, [(l.name, l.reason) for l in result.links]
    assert all(l.ok for l in result.links if l.name not in breaks)
    with pytest.raises(CertificateError, match=next(n for n in LINK_NAMES if n in breaks)):
        result.raise_for_failure()

