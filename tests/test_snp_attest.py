"""The firmware side, simulated: ARK/ASK/VCEK as AMD issues them, reports signed as the
firmware signs them, and the verifier's view of both.

Pure logic: no device.  The simulated roots are checked for the same shape as
AMD's real ones (tests/data/snp, kvmharness/sev/roots): RSA-4096 RSA-PSS/SHA-384
ARK and ASK, a P-384 VCEK with AMD's extensions in KDS's encoding.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from test_snp_report import REAL, load_vcek, read_report

from kvmharness.snp import certs
from kvmharness.snp.attest import (
    GuestAttestationContext,
    SimulatedKds,
    SimulatedSnpChip,
    deterministic_rsa_key,
    pss_sign_deterministic,
    sign_report,
    simulated_kds,
)
from kvmharness.snp.report import AttestationReport, Generation, TcbVersion
from kvmharness.snp.verify import Expectations, amd_root_pems, verify_report

AT = dt.datetime(2027, 6, 1, tzinfo=dt.timezone.utc)
DER = serialization.Encoding.DER


def _files(chip):
    pems = chip.certificates()
    return (certs.load_certificate(pems["vcek"]), certs.load_certificate(pems["ask"]),
            certs.load_certificate(pems["ark"]))


@pytest.mark.parametrize("gen", list(Generation))
def test_simulated_report_verifies_with_the_simulated_roots(gen):
    chip = SimulatedSnpChip(gen)
    guest = GuestAttestationContext(measurement=bytes(range(48)), policy=0x30000 | (1 << 19),
                                    host_data=b"\x42" * 32)
    raw = chip.report(guest, report_data=b"nonce-123", vmpl=1)
    vcek, ask, ark = _files(chip)
    v = verify_report(raw, vcek, ark=ark, ask=ask, at=AT, expect=Expectations(
        measurement=bytes(range(48)), report_data=b"nonce-123", policy=0x30000 | (1 << 19)))
    assert v.ok, v.failed
    assert v.generation is gen and v.root == "supplied" and "NOT AMD's" in v.root_detail
    rep = v.report
    assert rep.vmpl == 1 and rep.host_data == b"\x42" * 32
    assert rep.chip_id == chip.chip_id and rep.tcb("reported_tcb", gen) == chip.reported_tcb
    assert (rep.cpuid_fam_id, rep.cpuid_mod_id) != (0, 0)
    assert rep.generation_from_cpuid() is gen  # the same CPUID a real part of it reports


def test_simulated_report_is_rejected_by_amds_real_roots():
    chip = SimulatedSnpChip("milan")
    vcek, _ask, _ark = _files(chip)
    v = verify_report(chip.report(GuestAttestationContext()), vcek, at=AT)
    assert not v.ok and v.failed.name == "vcek" and v.root == "amd"


def test_simulated_report_with_a_flipped_bit_fails_the_signature():
    chip = SimulatedSnpChip("genoa")
    raw = bytearray(chip.report(GuestAttestationContext(), b"x"))
    vcek, ask, ark = _files(chip)
    for bit in (0, 0x50 * 8 + 3, 0x29F * 8 + 7, 0x2A0 * 8, 0x2E8 * 8 + 5, 0x32F * 8 + 7):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        v = verify_report(bytes(flipped), vcek, ark=ark, ask=ask, at=AT)
        assert v.failed.name == "signature", bit


def test_sign_report_layout_and_signature():
    """ECDSA P-384/SHA-384 over bytes 0-0x29F, R and S little-endian, 72 bytes each."""
    key = ec.generate_private_key(ec.SECP384R1())
    raw = sign_report({"version": 2, "report_data": b"\x07" * 64}, key)
    assert len(raw) == 0x4A0 and raw[0x50:0x90] == b"\x07" * 64
    r = int.from_bytes(raw[0x2A0:0x2E8], "little")
    s = int.from_bytes(raw[0x2E8:0x330], "little")
    assert r.bit_length() <= 384 and raw[0x2A0 + 48:0x2E8] == bytes(24)
    key.public_key().verify(utils.encode_dss_signature(r, s), raw[:0x2A0],
                            ec.ECDSA(hashes.SHA384()))
    assert raw[0x330:] == bytes(0x4A0 - 0x330)
    with pytest.raises(ValueError, match="ECDSA"):
        sign_report({"signature_algo": 2}, key)
    with pytest.raises(ValueError, match="P-384"):
        sign_report({}, ec.generate_private_key(ec.SECP256R1()))


def test_sign_report_preserves_every_field_of_a_real_report():
    """Re-signing a real report's fields reproduces its signed bytes exactly."""
    for _name, rp, _vp, _gen, _v in REAL:
        raw = read_report(rp)
        rep = AttestationReport.parse(raw)
        resigned = sign_report(rep, ec.generate_private_key(ec.SECP384R1()))
        assert resigned[:0x2A0] == raw[:0x2A0]


def test_simulated_chain_has_amds_shape():
    kds = simulated_kds("turin")
    real_ark = certs.load_certificate(amd_root_pems(Generation.TURIN)[0])
    for cert, issuer in ((kds.ark_cert, kds.ark_cert), (kds.ask_cert, kds.ark_cert)):
        assert certs.check_signed_by(cert, issuer) is None
        assert cert.public_key().key_size == 4096
        # cryptography's own RSA-PSS verifier accepts the deterministic signatures
        issuer.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                                   padding.PSS(padding.MGF1(hashes.SHA384()), 48), hashes.SHA384())
    assert kds.ark_cert.signature_algorithm_oid == real_ark.signature_algorithm_oid
    assert [a.oid for a in kds.ark_cert.subject] == [a.oid for a in real_ark.subject]
    chip = SimulatedSnpChip("turin")
    vcek = chip.vcek.cert
    assert certs.check_signed_by(vcek, kds.ask_cert) is None and certs.is_p384_key(vcek)


@pytest.mark.parametrize("name", [r[0] for r in REAL if r[0].startswith("tav-")])
def test_simulated_vcek_extensions_are_encoded_as_amds(name):
    """Same OIDs, same order, same DER for the same SPLs as the real VCEK of that
    generation: rebuild the real one's extensions from its own values and compare."""
    _n, _rp, vp, gen, _v = next(r for r in REAL if r[0] == name)
    real = load_vcek(vp)
    ext = certs.VcekExtensions.of(real)
    tcb = TcbVersion(bootloader=ext.bl_spl, tee=ext.tee_spl, snp=ext.snp_spl,
                     microcode=ext.ucode_spl, fmc=ext.fmc_spl)
    ours = certs.vcek_extension_list(ext.product_name, tcb, ext.hw_id, gen is Generation.TURIN)
    theirs = [(e.oid, e.value.value) for e in real.extensions
              if e.oid.dotted_string.startswith(certs.AMD_ARC)]
    assert [(e.oid, e.value) for e, _crit in ours] == theirs


def test_vcek_is_derived_per_chip_and_tcb_and_deterministic():
    kds = simulated_kds("milan")
    chip_a, chip_b = b"\x01" * 64, b"\x02" * 64
    t1 = TcbVersion(bootloader=4, snp=0x18, microcode=0xDB)
    t2 = dataclasses.replace(t1, snp=0x19)
    keys = {(c, t): kds.vcek(c, t).key.private_numbers().private_value
            for c in (chip_a, chip_b) for t in (t1, t2)}
    assert len(set(keys.values())) == 4
    fresh = SimulatedKds(Generation.MILAN)  # a second instance: the same bytes everywhere
    assert fresh.ark_cert.public_bytes(DER) == kds.ark_cert.public_bytes(DER)
    assert fresh.vcek(chip_a, t1).cert.public_bytes(DER) == kds.vcek(chip_a, t1).cert.public_bytes(DER)
    e = certs.VcekExtensions.of(kds.vcek(chip_b, t2).cert)
    assert (e.snp_spl, e.hw_id, e.product_name) == (0x19, chip_b, "Milan-B0")


def test_tcb_and_chip_id_checks_catch_a_vcek_for_something_else():
    chip = SimulatedSnpChip("milan")
    kds = chip.kds
    _vcek, ask, ark = _files(chip)
    fields = chip.report_fields(GuestAttestationContext())
    older = dataclasses.replace(chip.reported_tcb, microcode=chip.reported_tcb.microcode - 1)
    wrong_tcb = kds.vcek(chip.chip_id, older)  # signs fine, but for another TCB
    v = verify_report(sign_report(fields, wrong_tcb.key), wrong_tcb.cert, ark=ark, ask=ask, at=AT)
    assert v.failed.name == "tcb" and "microcode" in v.failed.detail
    other_chip = kds.vcek(b"\x77" * 64, chip.reported_tcb)
    v = verify_report(sign_report(fields, other_chip.key), other_chip.cert, ark=ark, ask=ask, at=AT)
    assert v.failed.name == "chip-id"
    masked = dataclasses.replace(fields, chip_id=bytes(64), mask_chip_key=True)
    v = verify_report(sign_report(masked, other_chip.key), other_chip.cert, ark=ark, ask=ask, at=AT)
    assert v.ok and "MASK_CHIP_KEY" in v.check("chip-id").detail
    vlek = dataclasses.replace(fields, signing_key=1)
    v = verify_report(sign_report(vlek, chip.vcek.key), chip.vcek.cert, ark=ark, ask=ask, at=AT)
    assert v.failed.name == "signing-key" and "VLEK" in v.failed.detail


def test_pss_signature_is_deterministic_and_standard():
    key = simulated_kds("genoa").ask_key
    sig = pss_sign_deterministic(key, b"tbs bytes")
    assert sig == pss_sign_deterministic(key, b"tbs bytes") and len(sig) == 512
    key.public_key().verify(sig, b"tbs bytes", certs.amd_pss(), hashes.SHA384())


def test_shipped_simulated_root_key_is_what_the_generator_makes():
    """The shipped simulated ARK key is reproducible from its label (a few seconds of
    pure-Python prime search: the one slow test here)."""
    shipped = simulated_kds("milan").ark_key.private_numbers()
    made = deterministic_rsa_key(b"ark", b"milan").private_numbers()
    assert (made.p, made.q) == (shipped.p, shipped.q)


def test_a_report_whose_cpuid_names_another_generation_fails_format():
    """A Genoa-signed report claiming a Milan CPUID: the signature holds, the format does not."""
    chip = SimulatedSnpChip("genoa")
    vcek, ask, ark = _files(chip)
    fields = dataclasses.replace(chip.report_fields(GuestAttestationContext()), cpuid_mod_id=0x01)
    v = verify_report(sign_report(fields, chip.vcek.key), vcek, ark=ark, ask=ask, at=AT)
    assert v.failed.name == "format" and "Milan" in v.failed.detail
