"""The SEV firmware's binary certificate format and the platform chain.

AMD SEV API spec (55766), Appendix C: a certificate is 0x824 (2084) bytes,
little-endian throughout:

    0x000  u32   version (1)
    0x004  u8    api_major        0x005 u8 api_minor     0x006 u8[2] reserved
    0x008  u32   pubkey usage     0x00C u32 pubkey algo
    0x010  1028  public key: u32 curve, qx[72], qy[72] (LE, zero padded), 880 reserved
    0x414  u32   sig1 usage       0x418 u32 sig1 algo
    0x41C  512   sig1 (see below)
    0x61C  u32   sig2 usage       0x620 u32 sig2 algo    0x624 512 sig2
    0x824  end

A signature covers the body, bytes 0x000-0x413 (everything before sig1), as
the bytes stand (reserved bytes included).  An empty signature slot has usage
INVALID (0x1000) and algo 0.  A signature slot holds either

* ECDSA (algo 0x002 SHA-256 / 0x102 SHA-384): r[72], s[72], little-endian,
  zero padded; what the OCA, CEK and PEK sign with; or
* RSA-PSS (algo 0x001 SHA-256 / 0x101 SHA-384): the RSA signature as one
  little-endian integer of the signer's modulus size (256 bytes for Naples'
  RSA-2048 ASK, all 512 for the RSA-4096 ASK of Rome and later), MGF1 with
  the same hash and a salt as long as the hash: what AMD's ASK signs the CEK
  with (sig algo 0x1 on real Naples CEKs, 0x101 on Rome's; checked against
  the captures in tests/data/sev/).

The platform chain the firmware keeps (what PDH_CERT_EXPORT returns):

    OCA  owner's certificate authority, self-signed (PEK_GEN) or the
         owner's (PEK_CERT_IMPORT)
    PEK  platform endorsement key, signed by the OCA *and* the CEK
    PDH  platform Diffie-Hellman key (ECDH), signed by the PEK
    CEK  chip endorsement key, signed by AMD's ASK

AMD's ASK and ARK are RSA keys in AMD's own CA format (Appendix B), read by
:mod:`kvmharness.sev.amd_ca`; the whole chain with a result per link is
:func:`kvmharness.sev.chain.verify_chain`.  Anything with ``usage`` and
``public_key()`` (an EC or RSA key) can be a signer here.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
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
_RSA = (CertAlgo.RSA_SHA256, CertAlgo.RSA_SHA384)


def _le(value: int, size: int = COORD) -> bytes:
    return value.to_bytes(size, "little")


def usage_name(usage: int) -> str:
    try:
        return CertUsage(usage).name
    except ValueError:
        return f"usage 0x{usage:x}"


def rsa_pss_verify(key: rsa.RSAPublicKey, signature: int, data: bytes,
                   hash_algo: hashes.HashAlgorithm) -> bool:
    """RSASSA-PSS as AMD uses it: MGF1 with the same hash, salt = hash length.

    ``signature`` is the integer AMD stores little-endian; it must fit the
    modulus (a signature wider than the key is invalid, not truncated).
    """
    size = (key.key_size + 7) // 8
    if signature >= 1 << (8 * size):
        return False
    try:
        key.verify(signature.to_bytes(size, "big"), data,
                   padding.PSS(padding.MGF1(hash_algo), hash_algo.digest_size), hash_algo)
        return True
    except InvalidSignature:
        return False


def rsa_pss_sign(key: rsa.RSAPrivateKey, data: bytes, hash_algo: hashes.HashAlgorithm) -> int:
    """The RSA-PSS signature of ``data`` as the integer AMD stores little-endian."""
    der = key.sign(data, padding.PSS(padding.MGF1(hash_algo), hash_algo.digest_size), hash_algo)
    return int.from_bytes(der, "big")


@dataclasses.dataclass(frozen=True)
class CertSignature:
    """One of a certificate's two signature slots.

    ECDSA: ``r``, ``s`` as integers; RSA-PSS: ``rsa``, the signature as an
    integer (stored little-endian in the 512-byte area).
    """

    usage: int = CertUsage.INVALID
    algo: int = CertAlgo.INVALID
    r: int = 0
    s: int = 0
    rsa: int = 0

    @property
    def empty(self) -> bool:
        return self.usage == CertUsage.INVALID or self.algo not in _ECDSA + _RSA

    @property
    def is_rsa(self) -> bool:
        return self.algo in _RSA

    def to_bytes(self) -> bytes:
        if self.empty:
            area = b""
        elif self.is_rsa:
            area = _le(self.rsa, SIG_AREA)
        else:
            area = _le(self.r) + _le(self.s)
        return struct.pack("<II", self.usage, self.algo) + area.ljust(SIG_AREA, b"\0")

    @classmethod
    def from_bytes(cls, raw: bytes) -> CertSignature:
        usage, algo = struct.unpack_from("<II", raw)
        if algo in _RSA:
            return cls(usage, algo, rsa=int.from_bytes(raw[8:8 + SIG_AREA], "little"))
        r = int.from_bytes(raw[8:8 + COORD], "little")
        s = int.from_bytes(raw[8 + COORD:8 + 2 * COORD], "little")
        return cls(usage, algo, r, s)

    def verifies(self, key, data: bytes) -> bool:
        """True if this slot is a valid signature of ``data`` by ``key``."""
        if self.empty:
            return False
        hash_algo = CertAlgo(self.algo).hash
        if self.is_rsa:
            return isinstance(key, rsa.RSAPublicKey) and rsa_pss_verify(key, self.rsa, data,
                                                                          hash_algo)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        try:
            key.verify(encode_dss_signature(self.r, self.s), data, ec.ECDSA(hash_algo))
            return True
        except InvalidSignature:
            return False


EMPTY_SIGNATURE = CertSignature()


@dataclasses.dataclass(frozen=True)
class SevCertificate:
    """A SEV-format certificate holding an ECDSA or ECDH public key.

    A parsed certificate keeps its body bytes as they came (``raw_body``), so
    signatures are checked over exactly what the firmware signed, reserved
    bytes included; a certificate built or changed here re-encodes its body.
    """

    usage: int
    algo: int
    qx: int
    qy: int
    curve: int = EcCurve.P384
    api_major: int = 0
    api_minor: int = 0
    sigs: tuple[CertSignature, CertSignature] = (EMPTY_SIGNATURE, EMPTY_SIGNATURE)
    version: int = CERT_VERSION
    raw_body: bytes | None = dataclasses.field(default=None, init=False, repr=False,
                                               compare=False)

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
        if self.raw_body is not None:
            return self.raw_body
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
        if algo not in _ECDSA + _ECDH:  # RSA keys are AMD's own (ARK/ASK, amd_ca.py)
            raise CertificateError(f"{usage_name(usage)} certificate public key algorithm "
                                   f"0x{algo:x} is not ECDSA or ECDH")
        if curve not in _CURVES:
            raise CertificateError(f"SEV certificate curve id {curve} is not P-256 (1) "
                                   "or P-384 (2)")
        qx = int.from_bytes(raw[0x14:0x14 + COORD], "little")
        qy = int.from_bytes(raw[0x14 + COORD:0x14 + 2 * COORD], "little")
        sigs = (CertSignature.from_bytes(raw[BODY_SIZE:BODY_SIZE + 8 + SIG_AREA]),
                CertSignature.from_bytes(raw[BODY_SIZE + 8 + SIG_AREA:]))
        cert = cls(usage, algo, qx, qy, curve, major, minor, sigs, version)
        object.__setattr__(cert, "raw_body", raw[:BODY_SIZE])
        return cert

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
        return usage_name(self.usage)

    def signed(self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, signer_usage: int,
               algo: int = CertAlgo.ECDSA_SHA256) -> SevCertificate:
        """A copy with the first empty signature slot filled by ``key``.

        ECDSA algorithms take an EC key; RSA_SHA256/RSA_SHA384 an RSA key (an
        ASK signing a CEK, RSA-PSS as AMD does).
        """
        algo = CertAlgo(algo) if algo in list(CertAlgo) else algo
        if algo in _RSA:
            if not isinstance(key, rsa.RSAPrivateKey):
                raise CertificateError(f"algorithm 0x{int(algo):x} is RSA-PSS: sign with an "
                                       "RSA key")
            sig = CertSignature(int(signer_usage), int(algo),
                                rsa=rsa_pss_sign(key, self.body(), algo.hash))
        elif algo in _ECDSA:
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CertificateError(f"algorithm 0x{int(algo):x} is ECDSA: sign with an EC key")
            r, s = decode_dss_signature(key.sign(self.body(), ec.ECDSA(algo.hash)))
            sig = CertSignature(int(signer_usage), int(algo), r, s)
        else:
            raise CertificateError(f"cannot sign with algorithm 0x{int(algo):x}; use ECDSA "
                                   "or RSA")
        if self.sigs[0].empty:
            sigs = (sig, self.sigs[1])
        elif self.sigs[1].empty:
            sigs = (self.sigs[0], sig)
        else:
            raise CertificateError(f"{self.usage_name} certificate already has two signatures")
        signed = dataclasses.replace(self, sigs=sigs)
        object.__setattr__(signed, "raw_body", self.raw_body)  # the body did not change
        return signed

    def signature_problem(self, signer) -> str | None:
        """None if ``signer`` (``.usage``, ``.public_key()``) signed this; else why not."""
        named = [sig for sig in self.sigs if sig.usage == signer.usage]
        if not named:
            return (f"{self.usage_name} certificate has no signature by an "
                    f"{usage_name(signer.usage)} key")
        slots = [sig for sig in named if not sig.empty]
        if not slots:
            return (f"{self.usage_name} certificate's {usage_name(signer.usage)} signature slot "
                    f"has algorithm 0x{named[0].algo:x}, not ECDSA or RSA-PSS")
        key = signer.public_key()
        if any(sig.verifies(key, self.body()) for sig in slots):
            return None
        return (f"{self.usage_name} certificate's {usage_name(signer.usage)} signature "
                f"(algo 0x{slots[0].algo:x}) does not verify with the "
                f"{usage_name(signer.usage)} key")

    def is_signed_by(self, signer) -> bool:
        """True if a signature slot carries a valid signature by ``signer``'s key."""
        try:
            return self.signature_problem(signer) is None
        except CertificateError:  # the signer's key is unusable (off the curve)
            return False

    def verify_signed_by(self, signer) -> None:
        """Raise :class:`CertificateError` unless ``signer`` signed this certificate."""
        if not self.is_signed_by(signer):
            raise CertificateError(f"{self.usage_name} certificate is not validly signed by "
                                   f"the {usage_name(signer.usage)} certificate")

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
