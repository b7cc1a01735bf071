"""SEV-SNP's X.509 chain: AMD's ARK -> ASK -> VCEK, and the VCEK's AMD extensions.

What AMD's Key Distribution Service (KDS) issues, as seen in the real
certificates under ``tests/data/snp/`` and described in AMD's "Versioned Chip
Endorsement Key (VCEK) Certificate and KDS Interface Specification" (57230):

* ARK (AMD Root Key): RSA-4096, self-signed, RSASSA-PSS with SHA-384, MGF1-SHA-384,
  salt length 48.  One per generation (CN ``ARK-Milan``, ``ARK-Genoa``, ``ARK-Turin``).
* ASK (AMD SEV Key): RSA-4096, signed by the ARK the same way (CN ``SEV-Milan``...).
* VCEK (Versioned Chip Endorsement Key): ECDSA P-384, derived per chip and per
  REPORTED_TCB, signed by the ASK with RSA-PSS; carries these extensions
  (OIDs under AMD's enterprise arc 1.3.6.1.4.1.3704):

      .1.1    structVersion  INTEGER (0 on Milan/Genoa, 1 on Turin)
      .1.2    productName    IA5String ("Milan-B0", "Genoa", "Turin")
      .1.3.1  blSPL          INTEGER    .1.3.2  teeSPL    INTEGER
      .1.3.3  snpSPL         INTEGER    .1.3.4-.1.3.7  spl_4..spl_7 (reserved SPLs)
      .1.3.8  ucodeSPL       INTEGER    .1.3.9  fmcSPL (Turin)
      .1.4    hwID           the raw CHIP_ID (64 bytes; 8 bytes on Turin), not DER-wrapped

Only ``cryptography`` is used; DER for the few extension values is decoded here.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import SignatureAlgorithmOID

from .. import errors as E

AMD_ARC = "1.3.6.1.4.1.3704"
OID_STRUCT_VERSION = x509.ObjectIdentifier(AMD_ARC + ".1.1")
OID_PRODUCT_NAME = x509.ObjectIdentifier(AMD_ARC + ".1.2")
OID_BL_SPL = x509.ObjectIdentifier(AMD_ARC + ".1.3.1")
OID_TEE_SPL = x509.ObjectIdentifier(AMD_ARC + ".1.3.2")
OID_SNP_SPL = x509.ObjectIdentifier(AMD_ARC + ".1.3.3")
OID_SPL_4 = x509.ObjectIdentifier(AMD_ARC + ".1.3.4")
OID_SPL_5 = x509.ObjectIdentifier(AMD_ARC + ".1.3.5")
OID_SPL_6 = x509.ObjectIdentifier(AMD_ARC + ".1.3.6")
OID_SPL_7 = x509.ObjectIdentifier(AMD_ARC + ".1.3.7")
OID_UCODE_SPL = x509.ObjectIdentifier(AMD_ARC + ".1.3.8")
OID_FMC_SPL = x509.ObjectIdentifier(AMD_ARC + ".1.3.9")
OID_HW_ID = x509.ObjectIdentifier(AMD_ARC + ".1.4")

PSS_SALT_LENGTH = 48  # = the SHA-384 digest length, as AMD signs


class CertificateFormatError(E.UsageError):
    """A certificate file cannot be read as X.509 (PEM or DER)."""


# -- the little DER the extensions need ------------------------------------------------------
def der_integer(value: int) -> bytes:
    """DER INTEGER for a non-negative value (a leading 0x00 keeps the sign positive)."""
    if value < 0:
        raise ValueError("SPLs are non-negative")
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes((0x02, len(body))) + body


def der_ia5string(text: str) -> bytes:
    body = text.encode("ascii")
    if len(body) > 127:
        raise ValueError("productName too long")
    return bytes((0x16, len(body))) + body


def _der_tlv(raw: bytes, tag: int, what: str) -> bytes:
    if len(raw) < 2 or raw[0] != tag or raw[1] > 127 or len(raw) != 2 + raw[1]:
        raise CertificateFormatError(f"VCEK extension {what} is not a short DER value with "
                                     f"tag 0x{tag:02x}: {raw.hex()}")
    return raw[2:]


def parse_der_integer(raw: bytes, what: str) -> int:
    return int.from_bytes(_der_tlv(raw, 0x02, what), "big", signed=True)


# -- loading -------------------------------------------------------------------------------
def _load_one(data: bytes, where: str) -> x509.Certificate:
    # AMD's KDS issues VCEKs with serial number 0, which RFC 5280 disallows and
    # cryptography warns about; the certificate is still AMD's, so accept it quietly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if b"-----BEGIN CERTIFICATE-----" in data:
                return x509.load_pem_x509_certificate(data)
            return x509.load_der_x509_certificate(data)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise CertificateFormatError(f"{where}: not an X.509 certificate (PEM or DER): "
                                         f"{e}") from None


def load_certificate(data: bytes, where: str = "certificate") -> x509.Certificate:
    """One certificate from PEM or DER bytes (the first one of a PEM bundle)."""
    certs = load_certificates(data, where)
    return certs[0]


def load_certificates(data: bytes, where: str = "certificates") -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (KDS's cert_chain: ASK then ARK), or one DER."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        return [_load_one(data, where)]
    out = []
    marker_end = b"-----END CERTIFICATE-----"
    for chunk in data.split(marker_end)[:-1]:
        start = chunk.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            out.append(_load_one(chunk[start:] + marker_end + b"\n", where))
    if not out:
        raise CertificateFormatError(f"{where}: no certificate in the PEM data")
    return out


def read_certificate(path: str | Path) -> x509.Certificate:
    """A certificate file; an unreadable file raises OSError (the CLI's exit 2)."""
    p = Path(path)
    return load_certificate(p.read_bytes(), str(p))


# -- the VCEK's extensions --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class VcekExtensions:
    """AMD's extensions of a VCEK (see the module docstring); absent SPLs are None."""

    struct_version: int | None
    product_name: str | None
    bl_spl: int | None
    tee_spl: int | None
    snp_spl: int | None
    ucode_spl: int | None
    fmc_spl: int | None
    spl_4: int | None
    spl_5: int | None
    spl_6: int | None
    spl_7: int | None
    hw_id: bytes | None

    @classmethod
    def of(cls, cert: x509.Certificate) -> "VcekExtensions":
        raw = {}
        for ext in cert.extensions:
            if isinstance(ext.value, x509.UnrecognizedExtension):
                raw[ext.oid] = ext.value.value

        def integer(oid, name):
            return parse_der_integer(raw[oid], name) if oid in raw else None

        product = None
        if OID_PRODUCT_NAME in raw:
            product = _der_tlv(raw[OID_PRODUCT_NAME], 0x16, "productName").decode("ascii", "replace")
        return cls(struct_version=integer(OID_STRUCT_VERSION, "structVersion"),
                   product_name=product,
                   bl_spl=integer(OID_BL_SPL, "blSPL"), tee_spl=integer(OID_TEE_SPL, "teeSPL"),
                   snp_spl=integer(OID_SNP_SPL, "snpSPL"),
                   ucode_spl=integer(OID_UCODE_SPL, "ucodeSPL"),
                   fmc_spl=integer(OID_FMC_SPL, "fmcSPL"),
                   spl_4=integer(OID_SPL_4, "spl_4"), spl_5=integer(OID_SPL_5, "spl_5"),
                   spl_6=integer(OID_SPL_6, "spl_6"), spl_7=integer(OID_SPL_7, "spl_7"),
                   hw_id=raw.get(OID_HW_ID))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hw_id"] = self.hw_id.hex() if self.hw_id is not None else None
        return d


def vcek_extension_list(product_name: str, tcb, hw_id: bytes, turin: bool) -> list:
    """The extensions AMD's KDS puts in a VCEK, in KDS's order, for building one.

    ``tcb`` is a :class:`~kvmharness.snp.report.TcbVersion`.  The order and the
    zero-valued reserved SPLs follow the real VCEKs in tests/data/snp:

    * Milan/Genoa: structVersion 0, productName, blSPL, teeSPL, spl_4..spl_7,
      snpSPL, ucodeSPL, hwID (64 bytes)
    * Turin: structVersion 1, productName, fmcSPL, blSPL, teeSPL, snpSPL,
      spl_5..spl_7, ucodeSPL, hwID (8 bytes)
    """
    def ext(oid, value: bytes):
        return (x509.UnrecognizedExtension(oid, value), False)

    zero = der_integer(0)
    out = [ext(OID_STRUCT_VERSION, der_integer(1 if turin else 0)),
           ext(OID_PRODUCT_NAME, der_ia5string(product_name))]
    if turin:
        out += [ext(OID_FMC_SPL, der_integer(tcb.fmc or 0)),
                ext(OID_BL_SPL, der_integer(tcb.bootloader)), ext(OID_TEE_SPL, der_integer(tcb.tee)),
                ext(OID_SNP_SPL, der_integer(tcb.snp))]
        out += [ext(oid, zero) for oid in (OID_SPL_5, OID_SPL_6, OID_SPL_7)]
    else:
        out += [ext(OID_BL_SPL, der_integer(tcb.bootloader)), ext(OID_TEE_SPL, der_integer(tcb.tee))]
        out += [ext(oid, zero) for oid in (OID_SPL_4, OID_SPL_5, OID_SPL_6, OID_SPL_7)]
        out.append(ext(OID_SNP_SPL, der_integer(tcb.snp)))
    out += [ext(OID_UCODE_SPL, der_integer(tcb.microcode)), ext(OID_HW_ID, bytes(hw_id))]
    return out


# -- signatures ------------------------------------------------------------------------------
def amd_pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=PSS_SALT_LENGTH)


def check_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> str | None:
    """None when ``issuer`` signed ``cert`` as AMD does (RSA-PSS, SHA-384, salt 48);
    else one line saying why not."""
    if cert.issuer != issuer.subject:
        return (f"issuer {cert.issuer.rfc4514_string()!r} is not the signer's subject "
                f"{issuer.subject.rfc4514_string()!r}")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.RSASSA_PSS:
        return f"signed with {cert.signature_algorithm_oid._name}, not RSASSA-PSS as AMD signs"
    if not isinstance(cert.signature_hash_algorithm, hashes.SHA384):
        name = getattr(cert.signature_hash_algorithm, "name", None)
        return f"signature hash is {name}, not SHA-384"
    key = issuer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        return "the signer's key is not RSA"
    params = cert.signature_algorithm_parameters
    salt = getattr(params, "_salt_length", PSS_SALT_LENGTH)
    if salt != PSS_SALT_LENGTH:
        return f"PSS salt length {salt}, not {PSS_SALT_LENGTH}"
    try:
        key.verify(cert.signature, cert.tbs_certificate_bytes, amd_pss(), hashes.SHA384())
    except InvalidSignature:
        return "the RSA-PSS signature does not verify"
    return None


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def is_p384_key(cert: x509.Certificate) -> bool:
    key = cert.public_key()
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)
