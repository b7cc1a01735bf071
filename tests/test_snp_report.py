"""The SEV-SNP ATTESTATION_REPORT layout and TCB_VERSION decoding, on real reports.

Pure logic: no device.  The nine real reports (tests/data/snp/, see its PROVENANCE)
come from Milan (v2 twice, v3 twice), Genoa (v3 twice, v5) and Turin (v5 twice) hardware.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import pytest
from cryptography import x509

from kvmharness.snp import certs
from kvmharness.snp.report import (
    REPORT_SIZE,
    AttestationReport,
    Generation,
    ReportFormatError,
    TcbVersion,
)

DATA = Path(__file__).parent / "data" / "snp"
TAV = DATA / "tee-attestation-verification"
RTX = DATA / "routex-client-lua"  # chains: VCEK, ASK, ARK; the first is the VCEK

# (name, report file, VCEK file, generation, report version)
REAL = [
    ("virtee-milan-v2", DATA / "virtee-sev" / "report_milan.hex",
     DATA / "virtee-sev" / "vcek_milan.der", Generation.MILAN, 2),
    ("go-sev-guest-milan-v2", DATA / "go-sev-guest" / "attestation.bin",
     DATA / "go-sev-guest" / "vcek.testcer", Generation.MILAN, 2),
    ("tav-milan-v3", TAV / "milan_attestation_report.bin", TAV / "milan_vcek.pem",
     Generation.MILAN, 3),
    ("tav-genoa-v3", TAV / "genoa_attestation_report.bin", TAV / "genoa_vcek.pem",
     Generation.GENOA, 3),
    ("tav-turin-v5", TAV / "turin_attestation_report.bin", TAV / "turin_vcek.pem",
     Generation.TURIN, 5),
    ("routex-milan-v3", RTX / "milan_v3_report.bin", RTX / "vcek-chain-milan.pem",
     Generation.MILAN, 3),
    ("routex-genoa-v3", RTX / "genoa_v3_report.bin", RTX / "vcek-chain-genoa.pem",
     Generation.GENOA, 3),
    ("routex-genoa-v5", RTX / "genoa_v5_report.bin", RTX / "vcek-chain-genoa-v5.pem",
     Generation.GENOA, 5),
    ("routex-turin-v5", RTX / "turin_v5_report.bin", RTX / "vcek-chain-turin.pem",
     Generation.TURIN, 5),
]


def read_report(path: Path) -> bytes:
    data = path.read_bytes()
    return bytes.fromhex(data.decode()) if path.suffix == ".hex" else data


def load_vcek(path: Path) -> x509.Certificate:
    return certs.read_certificate(path)


@pytest.mark.parametrize("name,report_path,vcek_path,gen,version", REAL, ids=[r[0] for r in REAL])
def test_real_report_parses_and_rebuilds_byte_for_byte(name, report_path, vcek_path, gen, version):
    raw = read_report(report_path)
    assert len(raw) == REPORT_SIZE
    rep = AttestationReport.parse(raw)
    assert rep.version == version
    assert rep.signature_algo == 1
    assert rep.signing_key == 0 and rep.vmpl in (0, 1, 2, 3)
    # every byte of the report is accounted for by a field (reserved bytes are zero)
    assert rep.to_bytes() == raw


@pytest.mark.parametrize("name,report_path,vcek_path,gen,version", REAL, ids=[r[0] for r in REAL])
def test_tcb_decoding_matches_the_vcek_extensions(name, report_path, vcek_path, gen, version):
    """REPORTED_TCB, decoded with the generation's layout, gives exactly the SPLs AMD's
    KDS wrote into the VCEK: an independent check of the per-generation byte positions."""
    rep = AttestationReport.parse(read_report(report_path))
    ext = certs.VcekExtensions.of(load_vcek(vcek_path))
    tcb = rep.tcb("reported_tcb", gen)
    assert (tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode) == (
        ext.bl_spl, ext.tee_spl, ext.snp_spl, ext.ucode_spl)
    if gen is Generation.TURIN:
        assert tcb.fmc == ext.fmc_spl and ext.struct_version == 1
    else:
        assert tcb.fmc is None and ext.struct_version == 0 and ext.fmc_spl is None
    assert rep.hw_id(gen) == ext.hw_id
    assert Generation.from_product_name(ext.product_name) is gen
    # the other layout reads different numbers from the same bytes
    other = Generation.MILAN if gen is Generation.TURIN else Generation.TURIN
    assert rep.tcb("reported_tcb", other) != tcb


@pytest.mark.parametrize("name,report_path,vcek_path,gen,version",
                         [r for r in REAL if r[4] >= 3], ids=[r[0] for r in REAL if r[4] >= 3])
def test_v3_cpuid_names_the_same_generation_as_the_vcek(name, report_path, vcek_path, gen,
                                                        version):
    rep = AttestationReport.parse(read_report(report_path))
    assert rep.generation_from_cpuid() is gen


def test_v2_reports_carry_no_cpuid():
    rep = AttestationReport.parse(read_report(REAL[0][1]))
    assert rep.generation_from_cpuid() is None
    assert (rep.cpuid_fam_id, rep.cpuid_mod_id, rep.cpuid_step) == (0, 0, 0)


def test_field_offsets_by_writing_each_field():
    """Each field lands at the offset the SNP ABI gives (spec 56860, Table 23)."""
    offsets = {"guest_svn": (0x04, 4), "policy": (0x08, 8), "vmpl": (0x30, 4),
               "current_tcb": (0x38, 8), "platform_info": (0x40, 8), "reported_tcb": (0x180, 8),
               "committed_tcb": (0x1E0, 8), "launch_tcb": (0x1F0, 8),
               "launch_mit_vector": (0x1F8, 8), "current_mit_vector": (0x200, 8)}
    for name, (off, size) in offsets.items():
        value = int.from_bytes(bytes(range(1, size + 1)), "little")
        body = AttestationReport(version=5, **{name: value}).body()
        assert body[off:off + size] == bytes(range(1, size + 1)), name
    blobs = {"family_id": 0x10, "image_id": 0x20, "report_data": 0x50, "measurement": 0x90,
             "host_data": 0xC0, "id_key_digest": 0xE0, "author_key_digest": 0x110,
             "report_id": 0x140, "report_id_ma": 0x160, "chip_id": 0x1A0}
    for name, off in blobs.items():
        size = AttestationReport._SIZES[name]
        body = AttestationReport(**{name: b"\xa5" * size}).body()
        assert body[off:off + size] == b"\xa5" * size and body.count(b"\xa5") == size, name
    b = AttestationReport(version=3, cpuid_fam_id=0x19, cpuid_mod_id=0x11, cpuid_step=1,
                          current_build=7, current_minor=55, current_major=1, committed_build=6,
                          committed_minor=54, committed_major=1, author_key_en=True,
                          mask_chip_key=True, signing_key=1).body()
    assert b[0x188:0x18B] == bytes((0x19, 0x11, 1))
    assert b[0x1E8:0x1EC] == bytes((7, 55, 1, 0)) and b[0x1EC:0x1F0] == bytes((6, 54, 1, 0))
    assert struct.unpack_from("<I", b, 0x48)[0] == 0b00111
    # v2 has no CPUID bytes and v3 no MIT vectors: those stay zero
    assert AttestationReport(version=2, cpuid_fam_id=0x19).body()[0x188] == 0
    assert AttestationReport(version=3, launch_mit_vector=5).body()[0x1F8:0x200] == bytes(8)


def test_signature_is_r_then_s_little_endian_72_bytes_each():
    rep = AttestationReport(signature_r=0x0102, signature_s=0x0304)
    raw = rep.to_bytes()
    assert raw[0x2A0:0x2A2] == b"\x02\x01" and raw[0x2A2:0x2E8] == bytes(70)
    assert raw[0x2E8:0x2EA] == b"\x04\x03" and raw[0x2EA:] == bytes(REPORT_SIZE - 0x2EA)


@pytest.mark.parametrize("gen", list(Generation))
def test_tcb_version_round_trip(gen):
    fmc = 3 if gen is Generation.TURIN else None
    tcb = TcbVersion(bootloader=9, tee=1, snp=22, microcode=0xD5, fmc=fmc)
    raw = tcb.encode(gen)
    assert TcbVersion.decode(raw, gen) == tcb
    if gen is Generation.TURIN:
        assert raw == bytes((3, 9, 1, 22, 0, 0, 0, 0xD5))
    else:
        assert raw == bytes((9, 1, 0, 0, 0, 0, 22, 0xD5))
        with pytest.raises(ValueError):
            TcbVersion(fmc=1).encode(gen)


def test_bad_sizes_and_versions_are_one_line_format_errors():
    with pytest.raises(ReportFormatError, match="1184"):
        AttestationReport.parse(bytes(100))
    for version in (0, 1, 6, 0xFFFFFFFF):
        raw = bytearray(REPORT_SIZE)
        struct.pack_into("<I", raw, 0, version)
        with pytest.raises(ReportFormatError, match=f"version {version}"):
            AttestationReport.parse(bytes(raw))
    with pytest.raises(ValueError, match="measurement"):
        AttestationReport(measurement=bytes(47)).body()


def test_generation_from_names_and_cpuid():
    assert Generation.from_product_name("Milan-B0") is Generation.MILAN
    assert Generation.from_product_name("Genoa") is Generation.GENOA
    assert Generation.from_product_name("Siena") is None
    assert Generation.from_cpuid(0x19, 0xA0) is Generation.GENOA  # Bergamo/Siena: Genoa's keys
    assert Generation.from_cpuid(0x17, 0x31) is None  # Rome has no SNP
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Generation.parse(" Turin ") is Generation.TURIN
