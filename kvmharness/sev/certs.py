"""The SEV firmware's binary certificate format and the platform chain.

AMD SEV API spec (55766), Appendix C: a certificate is 0x824 (2084) bytes,
little-endian throughout:

    0x000  u32   version (1)
    0x004  u8    api_major        0x005 u8 api_minor     0x006 u8[2] reserved
    0x008  u32   pubkey usage     0x00C u32 pubkey algo
    0x010  1028  public key: u32 curve, qx[72], qy[72] (LE, zero padded), 880 reserved
    0x414  u32   sig1 usage       0x418 u32 sig1 algo
    0x41C  512   sig1: r[72], s[72] (LE, zero padded), 368 reserved
    0x61C  u32   sig2 usage       0x620 u32 sig2 algo    0x624 512 sig2
    0x824  end

A signature covers the body, bytes 0x000-0x413 (everything before sig1).  An
empty signature slot has usage INVALID (0x1000) and algo 0.

The platform chain the firmware keeps (what PDH_CERT_EXPORT returns):

    OCA  owner's certificate authority, self-signed (PEK_GEN) or the
         owner's (PEK_CERT_IMPORT)
    PEK  platform endorsement key, signed by the OCA *and* the CEK
    PDH  platform Diffie-Hellman key (ECDH), signed by the PEK
    CEK  chip endorsement key, signed by AMD's ASK

Real AMD ASK/ARK certificates are RSA-4096 keys in a different format (AMD's
CA format, Appendix B).  Simplification: the simulated platform signs its CEK
with a simulated ASK that is a P-384 key in this same format, and stops there
(no ARK).  :func:`verify_platform_chain` checks the CEK against it only when
given its certificate.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ..errors import CertificateError  # noqa: F401 - re-exported for callers

CERT_SIZE = 0x824
BODY_SIZE = 0x414
SIG_AREA = 512
KEY_AREA = 1028
COORD = 72  # bytes reserved per coordinate / signature component
CERT_VERSION = 1



class CertUsage(enum.IntEnum):
    ARK = 0x0000
    ASK = 0x0013
    INVALID = 0x1000
    OCA = 0x1001
    PEK = 0x1002
    PDH = 0x1003
    CEK = 0x1004


class CertAlgo(enum.IntEnum):
    INVALID = 0x000
    RSA_SHA256 = 0x001
    ECDSA_SHA256 = 0x002
    ECDH_SHA256 = 0x003
    RSA_SHA384 = 0x101
    ECDSA_SHA384 = 0x102
    ECDH_SHA384 = 0x103

    @property
    def hash(self) -> hashes.HashAlgorithm:
        return hashes.SHA384() if int(self) & 0x100 else hashes.SHA256()


class EcCurve(enum.IntEnum):
    P256 = 1
    P384 = 2


_CURVES = {EcCurve.P256: (ec.SECP256R1, 32), EcCurve.P384: (ec.SECP384R1, 48)}
_ECDSA = (CertAlgo.ECDSA_SHA256, CertAlgo.ECDSA_SHA384)
_ECDH = (CertAlgo.ECDH_SHA256, CertAlgo.ECDH_SHA384)


def _le(value: int, size: int = COORD) -> bytes:
    return value.to_bytes(size, "little")


@dataclasses.dataclass(frozen=True)
class CertSignature:
    """One of a certificate's two signature slots (ECDSA r, s as integers)."""

    usage: int = CertUsage.INVALID
    algo: int = CertAlgo.INVALID
    r: int = 0
    s: int = 0

    @property
    def empty(self) -> bool:
        return self.usage == CertUsage.INVALID or self.algo not in _ECDSA

    def to_bytes(self) -> bytes:
        area = _le(self.r) + _le(self.s) if not self.empty else b""
        return struct.pack("<II", self.usage, self.algo) + area.ljust(SIG_AREA, b"\0")

    @classmethod
    def from_bytes(cls, raw: bytes) -> CertSignature:
        usage, algo = struct.unpack_from("<II", raw)
        if algo in (CertAlgo.RSA_SHA256, CertAlgo.RSA_SHA384):
            raise CertificateError("RSA signatures (AMD ASK/ARK) are not supported in the "
                                   "SEV certificate format here")
        r = int.from_bytes(raw[8:8 + COORD], "little")
        s = int.from_bytes(raw[8 + COORD:8 + 2 * COORD], "little")
        return cls(usage, algo, r, s)


EMPTY_SIGNATURE = CertSignature()


@dataclasses.dataclass(frozen=True)
class SevCertificate:
    """A SEV-format certificate holding an ECDSA or ECDH public key."""

    usage: int
    algo: int
    qx: int
    qy: int
    curve: int = EcCurve.P384
    api_major: int = 0
    api_minor: int = 0
    sigs: tuple[CertSignature, CertSignature] = (EMPTY_SIGNATURE, EMPTY_SIGNATURE)
    version: int = CERT_VERSION

    # -- construction -------------------------------------------------------
    @classmethod
    def for_key(cls, key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey,
                usage: int, algo: int, *, api_major: int = 0,
                api_minor: int = 0) -> SevCertificate:
        """An unsigned certificate for ``key`` (a P-256 or P-384 key)."""
        if isinstance(key, ec.EllipticCurvePrivateKey):
            key = key.public_key()
        curves = {ec.SECP256R1.name: EcCurve.P256, ec.SECP384R1.name: EcCurve.P384}
        curve = curves.get(key.curve.name)
        if curve is None:
            raise CertificateError("SEV certificates hold P-256 or P-384 keys, "
                                   f"not {key.curve.name}")
        nums = key.public_numbers()
        return cls(int(usage), int(algo), nums.x, nums.y, curve, api_major, api_minor)

    # -- encoding -----------------------------------------------------------
    def body(self) -> bytes:
        """Bytes 0x000-0x413: what a signature covers."""
        key = struct.pack("<I", self.curve) + _le(self.qx) + _le(self.qy)
        return (struct.pack("<IBBxxII", self.version, self.api_major, self.api_minor,
                            self.usage, self.algo) + key.ljust(KEY_AREA, b"\0"))

    def to_bytes(self) -> bytes:
        return self.body() + self.sigs[0].to_bytes() + self.sigs[1].to_bytes()

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> SevCertificate:
        """Parse 0x824 bytes; :class:`CertificateError` if malformed."""
        raw = bytes(raw)
        if len(raw) != CERT_SIZE:
            raise CertificateError(f"a SEV certificate is {CERT_SIZE} bytes, got {len(raw)}")
        version, major, minor, usage, algo, curve = struct.unpack_from("<IBBxxIII", raw)
        if version != CERT_VERSION:
            raise CertificateError(f"SEV certificate version {version} is not supported (want 1)")
        if algo not in _ECDSA + _ECDH:
            raise CertificateError(f"SEV certificate public key algorithm 0x{algo:x} is not "
                                   "ECDSA or ECDH")
        if curve not in _CURVES:
            raise CertificateError(f"SEV certificate curve id {curve} is not P-256 (1) "
                                   "or P-384 (2)")
        qx = int.from_bytes(raw[0x14:0x14 + COORD], "little")
        qy = int.from_bytes(raw[0x14 + COORD:0x14 + 2 * COORD], "little")
        sigs = (CertSignature.from_bytes(raw[BODY_SIZE:BODY_SIZE + 8 + SIG_AREA]),
                CertSignature.from_bytes(raw[BODY_SIZE + 8 + SIG_AREA:]))
        return cls(usage, algo, qx, qy, curve, major, minor, sigs, version)

    # -- keys and signatures ------------------------------------------------
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The certificate's key; :class:`CertificateError` if not on the curve."""
        curve_cls, _ = _CURVES[EcCurve(self.curve)]
        try:
            return ec.EllipticCurvePublicNumbers(self.qx, self.qy, curve_cls()).public_key()
        except ValueError as exc:
            raise CertificateError(f"{self.usage_name} certificate's public key is not a "
                                   f"point on the curve: {exc}") from None

    @property
    def usage_name(self) -> str:
        try:
            return CertUsage(self.usage).name
        except ValueError:
            return f"usage 0x{self.usage:x}"

    def signed(self, key: ec.EllipticCurvePrivateKey, signer_usage: int,
               algo: int = CertAlgo.ECDSA_SHA256) -> SevCertificate:
        """A copy with the first empty signature slot filled by ``key``."""
        if algo not in _ECDSA:
            raise CertificateError(f"cannot sign with algorithm 0x{int(algo):x}; use ECDSA")
        der = key.sign(self.body(), ec.ECDSA(CertAlgo(algo).hash))
        r, s = decode_dss_signature(der)
        sig = CertSignature(int(signer_usage), int(algo), r, s)
        if self.sigs[0].empty:
            sigs = (sig, self.sigs[1])
        elif self.sigs[1].empty:
            sigs = (self.sigs[0], sig)
        else:
            raise CertificateError(f"{self.usage_name} certificate already has two signatures")
        return dataclasses.replace(self, sigs=sigs)

    def is_signed_by(self, signer: SevCertificate) -> bool:
        """True if a signature slot carries a valid signature by ``signer``'s key."""
        key = signer.public_key()
        for sig in self.sigs:
            if sig.empty or sig.usage != signer.usage:
                continue
            try:
                key.verify(encode_dss_signature(sig.r, sig.s), self.body(),
                           ec.ECDSA(CertAlgo(sig.algo).hash))
                return True
            except InvalidSignature:
                continue
        return False

    def verify_signed_by(self, signer: SevCertificate) -> None:
        """Raise :class:`CertificateError` unless ``signer`` signed this certificate."""
        if not self.is_signed_by(signer):
            raise CertificateError(f"{self.usage_name} certificate is not validly signed by "
                                   f"the {signer.usage_name} certificate")

    def expect_usage(self, usage: CertUsage) -> None:
        if self.usage != usage:
            raise CertificateError(f"expected a {usage.name} certificate, got {self.usage_name}")


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-384 key (every SEV platform key is P-384)."""
    return ec.generate_private_key(ec.SECP384R1())


@dataclasses.dataclass(frozen=True)
class PlatformCertChain:
    """The ``cert_chain`` of PDH_CERT_EXPORT: PEK, OCA, CEK (3 x 0x824 bytes)."""

    pek: SevCertificate
    oca: SevCertificate
    cek: SevCertificate

    SIZE = 3 * CERT_SIZE

    def to_bytes(self) -> bytes:
        return self.pek.to_bytes() + self.oca.to_bytes() + self.cek.to_bytes()

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> PlatformCertChain:
        raw = bytes(raw)
        if len(raw) != cls.SIZE:
            raise CertificateError(f"a SEV platform chain (PEK, OCA, CEK) is {cls.SIZE} bytes, "
                                   f"got {len(raw)}")
        certs = [SevCertificate.from_bytes(raw[i * CERT_SIZE:(i + 1) * CERT_SIZE])
                 for i in range(3)]
        for cert, usage in zip(certs, (CertUsage.PEK, CertUsage.OCA, CertUsage.CEK)):
            cert.expect_usage(usage)
        return cls(*certs)


def verify_platform_chain(pdh: SevCertificate, chain: PlatformCertChain,
                          ask: SevCertificate | None = None) -> ec.EllipticCurvePublicKey:
    """Verify PDH <- PEK <- (OCA, CEK) [<- ASK]; return the PDH public key.

    The guest owner does this before trusting the PDH for LAUNCH_START (as
    sevctl does): OCA self-signed, PEK signed by the OCA and by the CEK, PDH
    signed by the PEK, and, if ``ask`` is given, the CEK signed by the ASK.
    """
    pdh.expect_usage(CertUsage.PDH)
    if pdh.algo not in _ECDH:
        raise CertificateError(f"PDH key algorithm 0x{pdh.algo:x} is not ECDH")
    chain.oca.verify_signed_by(chain.oca)
    chain.pek.verify_signed_by(chain.oca)
    chain.pek.verify_signed_by(chain.cek)
    pdh.verify_signed_by(chain.pek)
    if ask is not None:
        ask.expect_usage(CertUsage.ASK)
        chain.cek.verify_signed_by(ask)
    return pdh.public_key()
