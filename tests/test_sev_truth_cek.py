"""The CEK as real platforms export it: unsigned; AMD's KDS serves the ASK-signed one.

AMD's SEV firmware (github.com/amd/AMD-ASPFW @ 3ca6650dd35d878b3fcbe5c7f58b145eed042bbf,
fw/psp_bl_uapps/sev_uapp/src/sev_mcmd.c ``pdh_cert_chain_init``, "Only used in
sev_mcmd_pdh_cert_export") builds the chain's CEK as "a dummy CEK certificate without a
signature": ``sev_cert_create(&cek_cert, &cek_pubkey, NULL)``, whose ``sev_cert_init``
(sev_cert.c) zeroes the certificate, sets version 1 and the firmware's own
SEV_API_MAJOR/MINOR, and leaves both signature slots at usage INVALID (0x1000) and algo
INVALID (0); then the CEK public key.  Guest owners fetch the ASK-signed CEK from AMD's
KDS by chip id (virtee/sevctl @ 889a2ea290a85c77be9b0084269dcbd4f2f81e37, src/main.rs
``chain()``: ``https://kdsintf.amd.com/cek/id/<GET_ID>`` replaces ``chain.cek``).

The captures in tests/data/sev/ carry the KDS's CEK, not the exported one: each is
signed by its generation's ASK and says API 0.14 while the platform's own PDH, PEK and
OCA say 0.16 (Naples) and 0.22 (Rome); an exported CEK would carry the platform's API
version and no signature.  The tests below rebuild, from each capture, the CEK that
platform's firmware exported (same key, its API version, no signature) and check what
the chain then proves.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from kvmharness.cli import main
from kvmharness.errors import EXIT_GUEST_FAILED, EXIT_OK, CertificateError
from kvmharness.sev.amd_ca import builtin_roots, roots_for_cek
from kvmharness.sev.certs import (
    BODY_SIZE,
    CERT_SIZE,
    CertAlgo,
    CertUsage,
    PlatformCertChain,
    SevCertificate,
)
from kvmharness.sev.chain import is_unsigned, verify_chain
from kvmharness.sev.firmware import KDS_CEK_API, SIMULATED_KDS, SimulatedSevFirmware
from kvmharness.sev.policy import GuestPolicy
from kvmharness.sev.session import GuestOwner

DATA = Path(__file__).parent / "data" / "sev"
GENS = ("naples", "rome")


def capture(gen: str) -> dict[str, bytes]:
    return {r: (DATA / gen / f"{r}.cert").read_bytes() for r in ("pdh", "pek", "oca", "cek")}


def exported_cek(kds_cek: bytes, platform_cert: bytes) -> bytes:
    """The CEK ``pdh_cert_chain_init`` exports on that platform: sev_cert_init (zeroes,
    version 1, the firmware's API version, empty slots) + the CEK's public key."""
    kds = SevCertificate.from_bytes(kds_cek)
    plat = SevCertificate.from_bytes(platform_cert)
    cek = SevCertificate(kds.usage, kds.algo, kds.qx, kds.qy, kds.curve, plat.api_major,
                         plat.api_minor)
    raw = cek.to_bytes()
    assert len(raw) == CERT_SIZE
    return raw


# -- the model exports what AMD's firmware exports -------------------------------------------

def test_model_exports_an_unsigned_cek_and_its_kds_serves_the_signed_one():
    fw = SimulatedSevFirmware(num_asids=4, min_sev_asid=2)
    pdh, chain = fw.pdh_cert_export()
    raw = chain[2 * CERT_SIZE:]
    cek = SevCertificate.from_bytes(raw)
    # sev_cert_init: version 1, the firmware's own API version, both slots unused and zero
    assert struct.unpack_from("<IBB", raw) == (1, fw.api_major, fw.api_minor)
    assert (cek.usage, cek.algo) == (CertUsage.CEK, CertAlgo.ECDSA_SHA256)
    for slot in (raw[BODY_SIZE:BODY_SIZE + 520], raw[BODY_SIZE + 520:]):
        assert struct.unpack_from("<II", slot) == (CertUsage.INVALID, 0)
        assert slot[8:] == bytes(512)
    assert is_unsigned(cek)
    # the KDS, by chip id (GET_ID): the same key, signed by the ASK with RSA-PSS
    kds_raw = fw.kds_cek()
    with SIMULATED_KDS.open(fw.get_id()) as f:
        assert f.read() == kds_raw
    kds = SevCertificate.from_bytes(kds_raw)
    assert (kds.qx, kds.qy) == (cek.qx, cek.qy) and (kds.api_major, kds.api_minor) == KDS_CEK_API
    assert (kds.sigs[0].usage, kds.sigs[0].algo) == (CertUsage.ASK, CertAlgo.RSA_SHA256)
    assert kds.is_signed_by(fw.ask_cert) and not cek.is_signed_by(fw.ask_cert)
    assert SIMULATED_KDS.url(fw.get_id()).endswith(fw.get_id().hex())
    with pytest.raises(LookupError):
        SIMULATED_KDS.cek(bytes(64))
    # what the export proves, and what only the KDS CEK adds
    parts = [chain[i * CERT_SIZE:(i + 1) * CERT_SIZE] for i in range(3)]
    alone = verify_chain(pdh, *parts, ask=fw.ask_cert, ark=fw.ark_cert, chip_id=fw.get_id())
    assert alone.ok and not alone.complete and alone.unverified == ("ASK -> CEK",)
    assert fw.get_id().hex() in alone.link("ASK -> CEK").reason
    with pytest.raises(CertificateError, match="ASK -> CEK unverified"):
        alone.require_amd()
    full = verify_chain(pdh, *parts, ask=fw.ask_cert, ark=fw.ark_cert, kds_cek=kds_raw)
    assert full.complete
    other = SimulatedSevFirmware(num_asids=4, min_sev_asid=2).kds_cek()  # another chip's
    wrong = verify_chain(pdh, *parts, ask=fw.ask_cert, ark=fw.ark_cert, kds_cek=other)
    assert "not this chip's" in wrong.link("CEK -> PEK").reason and not wrong.ok


# -- the real captures -------------------------------------------------------------------------

@pytest.mark.parametrize("gen", GENS)
def test_captured_ceks_are_the_kds_ones(gen):
    c = capture(gen)
    cek, pek = SevCertificate.from_bytes(c["cek"]), SevCertificate.from_bytes(c["pek"])
    assert (cek.api_major, cek.api_minor) == KDS_CEK_API != (pek.api_major, pek.api_minor)
    assert roots_for_cek(cek).product == gen and not is_unsigned(cek)


class _Exporting:
    """A /dev/sev stand-in answering PDH_CERT_EXPORT as that platform's firmware did."""

    backend = "kvm"
    firmware = None  # SevPlatformInterface.firmware: the simulated model, None for /dev/sev

    def __init__(self, gen: str, chip_id: bytes = bytes(range(64))):
        self.c = capture(gen)
        self.chip_id = chip_id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def pdh_cert_export(self):
        c = self.c
        return c["pdh"], c["pek"] + c["oca"] + exported_cek(c["cek"], c["pek"])

    def get_id(self):
        return self.chip_id


def _verify(capsys, monkeypatch, gen, *argv):
    import kvmharness.sev.cli as sev_cli

    monkeypatch.setattr(sev_cli, "_platform", lambda args: _Exporting(gen))
    rc = main(["sev", "verify", "--backend", "kvm", *argv])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("gen", GENS)
def test_sev_verify_of_a_real_export_says_the_cek_is_unverified(capsys, monkeypatch, gen):
    rc, out = _verify(capsys, monkeypatch, gen, "--json")
    d = json.loads(out)
    assert rc == EXIT_GUEST_FAILED and d["failed"] == [] and d["unverified"] == ["ASK -> CEK"]
    status = {link["name"]: link["status"] for link in d["links"]}
    # what the export proves, by the signatures it carries
    assert status["PEK -> PDH"] == status["OCA -> PEK"] == status["CEK -> PEK"] == "ok"
    assert status["OCA self-signed"] == "ok"
    why = next(link["reason"] for link in d["links"] if link["name"] == "ASK -> CEK")
    assert "unsigned" in why and "kdsintf.amd.com/cek/id/" + bytes(range(64)).hex() in why
    assert d["chip_id"] == bytes(range(64)).hex() and "unsigned" in d["cek"]
    rc, out = _verify(capsys, monkeypatch, gen)
    assert rc == EXIT_GUEST_FAILED and "UNVERIFIED ASK -> CEK" in out
    assert "chain NOT verified to AMD: ASK -> CEK unverified" in out


@pytest.mark.parametrize("gen", GENS)
def test_sev_verify_with_the_kds_cek_verifies_to_amds_root(capsys, monkeypatch, gen):
    rc, out = _verify(capsys, monkeypatch, gen, "--cek", str(DATA / gen / "cek.cert"), "--json")
    d = json.loads(out)
    assert rc == EXIT_OK and d["complete"] and d["roots"]["product"] == gen
    assert "AMD's KDS" in d["cek"]
    # another chip's KDS CEK (the other capture) is not this platform's
    other = "rome" if gen == "naples" else "naples"
    rc, out = _verify(capsys, monkeypatch, gen, "--cek", str(DATA / other / "cek.cert"), "--json")
    d = json.loads(out)
    assert rc == EXIT_GUEST_FAILED and "CEK -> PEK" in d["failed"]


@pytest.mark.parametrize("gen", GENS)
def test_guest_owner_start_on_a_real_export(gen):
    c = capture(gen)
    chain = c["pek"] + c["oca"] + exported_cek(c["cek"], c["pek"])
    owner = GuestOwner(GuestPolicy.parse("nodbg"))
    start = owner.start(c["pdh"], chain)  # what the export proves; CEK -> ASK recorded unverified
    assert len(start.session) == 128 and start.chain.unverified == ("ASK -> CEK",)
    assert start.chain.ok and owner.chain is start.chain
    # asking for AMD's roots with the unsigned CEK is refused, saying why
    with pytest.raises(CertificateError, match="ASK -> CEK unverified.*unsigned"):
        owner.start(c["pdh"], chain, ask=builtin_roots(gen).ask)
    # the KDS CEK: verified to the built-in ARK of its generation
    start = owner.start(c["pdh"], chain, cek=c["cek"])
    assert start.chain.complete
    assert GuestOwner(0, cek=c["cek"]).start(c["pdh"], PlatformCertChain.from_bytes(chain)).chain.complete
    bad = bytearray(c["cek"])
    bad[0x41C + 9] ^= 1  # inside the ASK's RSA signature
    with pytest.raises(CertificateError):
        owner.start(c["pdh"], chain, cek=bytes(bad), ask=builtin_roots(gen).ask,
                    ark=builtin_roots(gen).ark)


# -- the launch ----------------------------------------------------------------------------------

def test_sim_launch_records_what_the_chain_proved():
    pytest.importorskip("unicorn", reason="the simulator needs unicorn")
    from kvmharness.factory import open_backend
    from kvmharness.machine import Machine
    from kvmharness.sim.sev import firmware_for

    system = open_backend("sim")
    try:
        fw = firmware_for(system)
        owner = GuestOwner(GuestPolicy.parse("nodbg"))
        with Machine.for_guest("sev-hello", system, sev="sev", owner=owner) as m:
            launch = m.launch_result
            assert launch.verified and launch.chain.unverified == ("ASK -> CEK",)
            assert "unsigned" in launch.chain.summary()
        owner = GuestOwner(GuestPolicy.parse("nodbg"), cek=fw.kds_cek(), ask=fw.ask_cert,
                           ark=fw.ark_cert)
        with Machine.for_guest("sev-hello", system, sev="sev", owner=owner) as m:
            assert m.launch_result.chain.complete
            assert m.run().outcome == "done"
    finally:
        system.close()


def test_kvm_backend_launch_result_says_the_cek_is_unverified(tmp_path):
    pytest.importorskip("kvmharness.kvm._ffi", reason="the kvm backend needs cffi and libc")
    from test_sev_ioctl_sequence import recorded_launch

    from kvmharness.backend import KVM_X86_SEV_VM

    _, launch, result, _ = recorded_launch(tmp_path, "sev", KVM_X86_SEV_VM)
    assert result.verified and result.chain is launch.chain
    d = result.to_dict()["chain"]
    assert d["ok"] and not d["complete"] and d["unverified"] == ["ASK -> CEK"]
    assert "unsigned" in d["summary"]


def test_run_says_the_platform_certificates_are_not_verified_to_amd(capsys):
    pytest.importorskip("unicorn", reason="the simulator needs unicorn")
    assert main(["run", "sev-hello", "--backend", "sim", "--mode", "sev"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "measurement verified with the owner TIK" in err
    assert "PEK -> PDH hold; CEK -> ASK -> ARK unverified" in err and "unsigned" in err
