"""Verifying real SEV-SNP reports against AMD's built-in roots, and rejecting tampered ones.

Pure logic: no device, no network.  Nine real reports from three generations
(tests/data/snp/PROVENANCE) each verify with their VCEK and AMD's ARK/ASK
shipped in kvmharness/sev/roots; a flipped bit anywhere in the signed bytes or
in R/S fails, and fails as "signature".
"""

from __future__ import annotations

import datetime as dt
import random

import pytest
from cryptography.hazmat.primitives import serialization

from kvmharness.snp import certs
from kvmharness.snp.report import SIG_COMPONENT_SIZE, SIGNATURE_OFFSET, SIGNED_SIZE, Generation
from kvmharness.snp.verify import (
    CHECKS,
    Expectations,
    amd_asvk_pem,
    amd_root_pems,
    load_certs_dir,
    verify_report,
)

from test_snp_report import DATA, REAL, load_vcek, read_report

# The real VCEKs are valid until 2029 at the earliest; pin the clock inside that.
AT = dt.datetime(2027, 6, 1, tzinfo=dt.timezone.utc)
IDS = [r[0] for r in REAL]


@pytest.fixture(scope="module")
def real():
    return {name: (read_report(rp), load_vcek(vp), gen) for name, rp, vp, gen, _v in REAL}


@pytest.mark.parametrize("name", IDS)
def test_real_report_verifies_with_amds_builtin_chain(real, name):
    report, vcek, gen = real[name]
    v = verify_report(report, vcek, at=AT)
    assert v.ok, v.failed
    assert v.generation is gen and v.root == "amd"
    assert [c.name for c in v.checks] == list(CHECKS)
    passed = {c.name for c in v.checks if c.ok}
    assert passed == set(CHECKS) - {"measurement", "report-data", "policy"}
    assert all(c.detail for c in v.checks if c.ok)  # every passing check says what it saw
    # with the generation given explicitly, and with the expectations the report meets
    rep = v.report
    v2 = verify_report(report, vcek, generation=gen, at=AT,
                       expect=Expectations(measurement=rep.measurement,
                                           report_data=rep.report_data, policy=rep.policy))
    assert v2.ok and all(c.ok for c in v2.checks)


def _bit_sample(seed: int) -> list[int]:
    """64 bit positions: the edges (first/last signed bit, first/last bit of R and S and
    of their zero padding) plus a spread of the signed area and of R/S."""
    sig_start, sig_end = SIGNATURE_OFFSET * 8, (SIGNATURE_OFFSET + 2 * SIG_COMPONENT_SIZE) * 8
    edges = [0, 7, SIGNED_SIZE * 8 - 1, sig_start, sig_start + 48 * 8 - 1, sig_start + 48 * 8,
             sig_start + SIG_COMPONENT_SIZE * 8 - 1, sig_start + SIG_COMPONENT_SIZE * 8,
             sig_end - 1]
    rnd = random.Random(seed)
    signed = sorted(rnd.sample(range(8, SIGNED_SIZE * 8 - 1), 40))
    sig = sorted(rnd.sample(range(sig_start + 1, sig_end - 1), 64 - len(edges) - len(signed)))
    return edges + signed + sig


FLIPS = [(name, bit) for i, name in enumerate(IDS) for bit in _bit_sample(i)]


@pytest.mark.parametrize("name,bit", FLIPS, ids=[f"{n}-bit{b}" for n, b in FLIPS])
def test_any_flipped_bit_fails_the_signature_check(real, name, bit):
    report, vcek, _gen = real[name]
    tampered = bytearray(report)
    tampered[bit // 8] ^= 1 << (bit % 8)
    v = verify_report(bytes(tampered), vcek, at=AT)
    assert not v.ok
    assert v.failed.name == "signature", v.failed
    assert all(c.ok for c in v.checks[:v.checks.index(v.failed)])  # the chain still passed


def test_unsigned_reserved_tail_is_not_covered_by_the_signature(real):
    """Bytes after R and S (0x330-0x49F) are outside the signature, as the ABI says."""
    report, vcek, _ = real["tav-genoa-v3"]
    tampered = bytearray(report)
    tampered[0x400] ^= 0x01
    assert verify_report(bytes(tampered), vcek, at=AT).check("signature").ok


def test_each_vcek_is_bound_to_its_own_report(real):
    r_milan, _, _ = real["tav-milan-v3"]
    _, vcek_other_milan, _ = real["virtee-milan-v2"]
    v = verify_report(r_milan, vcek_other_milan, at=AT)
    assert v.failed.name == "signature"


def test_wrong_generation_names_the_failing_link(real):
    report, vcek, _ = real["tav-milan-v3"]
    v = verify_report(report, vcek, generation=Generation.GENOA, at=AT)
    assert v.failed.name == "vcek"  # Genoa's ASK did not sign a Milan VCEK
    genoa_ark, genoa_ask = (certs.load_certificate(p) for p in amd_root_pems(Generation.GENOA))
    v = verify_report(report, vcek, ask=genoa_ask, at=AT)
    assert v.failed.name == "ask"  # Genoa's ASK is not signed by Milan's ARK
    v = verify_report(report, vcek, ark=genoa_ark, at=AT)
    assert v.failed.name == "ark" and "ARK-Genoa" in v.failed.detail
    milan_ask = certs.load_certificate(amd_root_pems(Generation.MILAN)[1])
    v = verify_report(report, vcek, ark=milan_ask, at=AT)  # an ASK posing as the root
    assert v.failed.name == "ark" and v.root == "supplied"


def test_a_tampered_vcek_fails_the_vcek_check(real):
    report, vcek, _ = real["tav-turin-v5"]
    der = bytearray(vcek.public_bytes(serialization.Encoding.DER))
    der[-10] ^= 0x40  # inside the ASK's signature over the VCEK
    bad = certs.load_certificate(bytes(der))
    v = verify_report(report, bad, at=AT)
    assert v.failed.name == "vcek" and "does not verify" in v.failed.detail


def test_validity_is_checked_at_the_given_time(real):
    report, vcek, _ = real["go-sev-guest-milan-v2"]
    v = verify_report(report, vcek, at=dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc))
    assert v.failed.name == "validity" and "VCEK" in v.failed.detail


def test_expectation_mismatches_name_the_check(real):
    report, vcek, _ = real["tav-genoa-v3"]
    for expect, name in ((Expectations(measurement=bytes(48)), "measurement"),
                         (Expectations(report_data=b"\x01"), "report-data"),
                         (Expectations(policy=0x30000), "policy")):
        v = verify_report(report, vcek, expect=expect, at=AT)
        assert v.failed.name == name, v.failed
        assert "expected" in v.failed.detail


def test_certs_dir_in_kds_layout(real, tmp_path):
    """cert_chain.pem (KDS: ASK then ARK) plus vcek.der, as users pre-provision them."""
    report, vcek, gen = real["virtee-milan-v2"]
    ark_pem, ask_pem = amd_root_pems(gen)
    (tmp_path / "cert_chain.pem").write_bytes(ask_pem + ark_pem)
    (tmp_path / "vcek.der").write_bytes(vcek.public_bytes(serialization.Encoding.DER))
    found = load_certs_dir(tmp_path)
    assert set(found) == {"ark", "ask", "vcek"}
    v = verify_report(report, found["vcek"], ark=found["ark"], ask=found["ask"], at=AT)
    assert v.ok and v.root == "amd"  # the supplied ARK *is* AMD's: said so


def test_builtin_roots_are_the_ones_amd_ships_in_kds_chains():
    """AMD's ARK is self-signed and signs the ASK for every SNP generation."""
    for gen in Generation:
        ark, ask = (certs.load_certificate(p) for p in amd_root_pems(gen))
        assert certs.check_signed_by(ark, ark) is None
        assert certs.check_signed_by(ask, ark) is None
        assert ark.public_key().key_size == 4096 and ask.public_key().key_size == 4096


def test_chain_files_shipped_with_real_vceks_are_amds():
    """The routex-client-lua chains carry their ASK and ARK: the same certificates as
    AMD's built-in ones, so verifying with them given explicitly says the root is AMD's."""
    for name, rp, vp, gen, _v in REAL:
        if not name.startswith("routex-"):
            continue
        vcek, ask, ark = certs.load_certificates(vp.read_bytes())
        assert [certs.fingerprint(c) for c in (ark, ask)] == [
            certs.fingerprint(certs.load_certificate(p)) for p in amd_root_pems(gen)]
        v = verify_report(read_report(rp), vcek, ark=ark, ask=ask, at=AT)
        assert v.ok and v.root == "amd", (name, v.failed)


# A real VLEK-signed Milan report (a cloud provider's key, signed by AMD's ASVK); its
# VLEK was valid 2024-12-10 to 2025-12-10.
VLEK_REPORT = DATA / "trustee" / "test-vlek-report.bin"
VLEK_CERT = DATA / "trustee" / "test-vlek.der"
VLEK_AT = dt.datetime(2025, 6, 1, tzinfo=dt.timezone.utc)


def test_real_vlek_report_verifies_with_amds_asvk():
    report, vlek = VLEK_REPORT.read_bytes(), certs.read_certificate(VLEK_CERT)
    v = verify_report(report, vlek, at=VLEK_AT)
    assert v.ok, v.failed
    assert v.endorsement == "vlek" and v.root == "amd" and v.generation is Generation.MILAN
    names = [c.name for c in v.checks]
    assert names[:3] == ["ark", "asvk", "vlek"] and "SEV-VLEK-Milan" in v.check("vlek").detail
    assert v.report.signing_key == 1 and "not bound to a chip" in v.check("chip-id").detail
    # AMD's ASK did not sign a VLEK
    milan_ask = certs.load_certificate(amd_root_pems(Generation.MILAN)[1])
    assert verify_report(report, vlek, ask=milan_ask, at=VLEK_AT).failed.name == "vlek"
    expired = verify_report(report, vlek, at=AT).failed
    assert expired.name == "validity" and "the VLEK is valid 2024-12-10 to 2025-12-10" in expired.detail
    assert all(c.detail for c in v.checks if c.ok)  # every passing check says what it saw


@pytest.mark.parametrize("bit", _bit_sample(99))
def test_vlek_report_with_a_flipped_bit_fails_the_signature(bit):
    tampered = bytearray(VLEK_REPORT.read_bytes())
    tampered[bit // 8] ^= 1 << (bit % 8)
    v = verify_report(bytes(tampered), certs.read_certificate(VLEK_CERT), at=VLEK_AT)
    assert v.failed.name == "signature", v.failed


def test_builtin_asvks_are_signed_by_amds_arks():
    for gen in Generation:
        ark = certs.load_certificate(amd_root_pems(gen)[0])
        asvk = certs.load_certificate(amd_asvk_pem(gen))
        assert asvk.subject.rfc4514_string().startswith(f"CN=SEV-VLEK-{gen.title},")
        assert certs.check_signed_by(asvk, ark) is None
