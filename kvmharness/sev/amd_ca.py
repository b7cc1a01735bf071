"""AMD's CA certificate format (ARK, ASK) and the built-in AMD roots.

AMD SEV API spec (55766), Appendix B.  AMD's root key (ARK) signs itself and
the AMD SEV key (ASK); the ASK signs every chip's CEK (a SEV-format
certificate, :mod:`kvmharness.sev.certs`).  Little-endian throughout:

    0x00  u32       version (1)
    0x04  u8[16]    key_id: this key's id (a u128)
    0x14  u8[16]    certifying_id: the id of the key that signed this one
                    (an ARK: its own key_id)
    0x24  u32       key_usage: 0x0 ARK, 0x13 ASK
    0x28  u8[16]    reserved
    0x38  u32       pubexp_size, in bits
    0x3C  u32       modulus_size, in bits (2048 on Naples, 4096 from Rome on)
    0x40            pubexp   [pubexp_size / 8]
                    modulus  [modulus_size / 8]
                    signature[modulus_size / 8]

The signature is RSASSA-PSS over every byte before it, by the certifying
key, stored as one little-endian integer: SHA-256 for a 2048-bit signing
key, SHA-384 for a 4096-bit one, MGF1 with the same hash and a salt as long
as the hash (AMD's published Naples, Rome, Milan, Genoa and Turin ARK/ASK all
verify so; tests/test_sev_certs_real.py).

The built-in roots are AMD's public ARK/ASK of each product, shipped under
``kvmharness/sev/roots/<product>/`` (``ark.cert``/``ask.cert`` in this
format; ``ark.pem``/``ask.pem``, X.509, for the SEV-SNP products) with a
PROVENANCE file saying where each came from.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from importlib import resources

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa

from ..errors import CertificateError
from .certs import CertUsage, rsa_pss_sign, rsa_pss_verify, usage_name

CA_VERSION = 1
HEADER_SIZE = 0x40
MODULUS_SIZES = (2048, 4096)
CA_USAGES = (CertUsage.ARK, CertUsage.ASK)

#: The EPYC generations whose ARK/ASK ship with the package, oldest first.
PRODUCTS = ("naples", "rome", "milan", "genoa", "turin")
#: The ones AMD also publishes as X.509 (their SEV-SNP VCEK chain).
SNP_PRODUCTS = ("milan", "genoa", "turin")


def _hash_for(modulus_bits: int) -> hashes.HashAlgorithm:
    return hashes.SHA256() if modulus_bits <= 2048 else hashes.SHA384()


@dataclasses.dataclass(frozen=True)
class AmdCaCertificate:
    """An ARK or ASK in AMD's CA format.

    A parsed certificate keeps its signed bytes as they came (``raw_body``),
    so the signature is checked over exactly what AMD signed.
    """

    key_id: int
    certifying_id: int
    usage: int
    pubexp: int
    modulus: int
    signature: int = 0
    pubexp_size: int = 2048  # bits; AMD pads the exponent to the modulus width
    modulus_size: int = 2048
    version: int = CA_VERSION
    reserved: bytes = bytes(16)
    raw_body: bytes | None = dataclasses.field(default=None, init=False, repr=False,
                                               compare=False)

    # -- encoding -----------------------------------------------------------
    @property
    def size(self) -> int:
        return HEADER_SIZE + self.pubexp_size // 8 + 2 * (self.modulus_size // 8)

    def body(self) -> bytes:
        """Everything before the signature: what the certifying key signed."""
        if self.raw_body is not None:
            return self.raw_body
        return (struct.pack("<I16s16sI16sII", self.version, self.key_id.to_bytes(16, "little"),
                            self.certifying_id.to_bytes(16, "little"), self.usage,
                            self.reserved, self.pubexp_size, self.modulus_size)
                + self.pubexp.to_bytes(self.pubexp_size // 8, "little")
                + self.modulus.to_bytes(self.modulus_size // 8, "little"))

    def to_bytes(self) -> bytes:
        return self.body() + self.signature.to_bytes(self.modulus_size // 8, "little")

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview, *,
                   exact: bool = True) -> AmdCaCertificate:
        """Parse one certificate (``exact=False``: from the start of ``raw``)."""
        raw = bytes(raw)
        if len(raw) < HEADER_SIZE:
            raise CertificateError(f"an AMD CA certificate has a {HEADER_SIZE}-byte header; "
                                   f"got {len(raw)} bytes")
        (version, key_id, cert_id, usage, reserved, exp_bits,
         mod_bits) = struct.unpack_from("<I16s16sI16sII", raw)
        if version != CA_VERSION:
            raise CertificateError(f"AMD CA certificate version {version} is not supported "
                                   "(want 1)")
        if usage not in CA_USAGES:
            raise CertificateError(f"AMD CA certificate key usage 0x{usage:x} is neither ARK "
                                   "(0x0) nor ASK (0x13)")
        if mod_bits not in MODULUS_SIZES:
            raise CertificateError(f"AMD CA certificate modulus size {mod_bits} bits is not "
                                   "2048 or 4096")
        if exp_bits == 0 or exp_bits % 8 or exp_bits > 4096:
            raise CertificateError(f"AMD CA certificate public exponent size {exp_bits} bits "
                                   "is not a whole number of bytes up to 4096")
        size = HEADER_SIZE + exp_bits // 8 + 2 * (mod_bits // 8)
        if len(raw) < size or (exact and len(raw) != size):
            raise CertificateError(f"an AMD CA certificate with a {mod_bits}-bit key is {size} "
                                   f"bytes, got {len(raw)}")
        off = HEADER_SIZE
        pubexp = int.from_bytes(raw[off:off + exp_bits // 8], "little")
        off += exp_bits // 8
        modulus = int.from_bytes(raw[off:off + mod_bits // 8], "little")
        off += mod_bits // 8
        signature = int.from_bytes(raw[off:size], "little")
        cert = cls(int.from_bytes(key_id, "little"), int.from_bytes(cert_id, "little"), usage,
                   pubexp, modulus, signature, exp_bits, mod_bits, version, reserved)
        object.__setattr__(cert, "raw_body", raw[:off])
        return cert

    @classmethod
    def parse_many(cls, raw: bytes) -> list[AmdCaCertificate]:
        """Certificates back to back, e.g. AMD's ``ask_ark_<product>.cert`` (ASK then ARK)."""
        raw = bytes(raw)
        out = []
        while raw:
            cert = cls.from_bytes(raw, exact=False)
            out.append(cert)
            raw = raw[cert.size:]
        return out

    # -- keys and signatures ------------------------------------------------
    @property
    def usage_name(self) -> str:
        return usage_name(self.usage)

    @property
    def key_id_hex(self) -> str:
        return self.key_id.to_bytes(16, "little").hex()

    def public_key(self) -> rsa.RSAPublicKey:
        try:
            return rsa.RSAPublicNumbers(self.pubexp, self.modulus).public_key()
        except ValueError as exc:
            raise CertificateError(f"{self.usage_name} certificate's RSA key is unusable: "
                                   f"{exc}") from None

    def signature_problem(self, signer: AmdCaCertificate) -> str | None:
        """None if ``signer`` signed this certificate, else why not."""
        if self.certifying_id != signer.key_id:
            return (f"{self.usage_name} certificate names key {self.certifying_id:032x} as its "
                    f"signer, not the {signer.usage_name}'s key {signer.key_id:032x}")
        key = signer.public_key()
        if not rsa_pss_verify(key, self.signature, self.body(), _hash_for(key.key_size)):
            return (f"{self.usage_name} certificate's RSA-PSS signature does not verify with "
                    f"the {signer.usage_name} key")
        return None

    def is_signed_by(self, signer: AmdCaCertificate) -> bool:
        try:
            return self.signature_problem(signer) is None
        except CertificateError:
            return False

    def verify_signed_by(self, signer: AmdCaCertificate) -> None:
        problem = self.signature_problem(signer)
        if problem:
            raise CertificateError(problem)

    def expect_usage(self, usage: CertUsage) -> None:
        if self.usage != usage:
            raise CertificateError(f"expected an {usage.name} certificate, got {self.usage_name}")

    # -- issuing (the simulated platform's AMD) -----------------------------
    @classmethod
    def issue(cls, key: rsa.RSAPrivateKey | rsa.RSAPublicKey, usage: CertUsage, key_id: int,
              signer_key: rsa.RSAPrivateKey, certifying_id: int) -> AmdCaCertificate:
        """A certificate for ``key`` signed by ``signer_key`` (RSA-PSS, as AMD signs)."""
        pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
        nums = pub.public_numbers()
        if pub.key_size not in MODULUS_SIZES:
            raise CertificateError(f"AMD CA keys are RSA-2048 or RSA-4096, not {pub.key_size}")
        cert = cls(key_id, certifying_id, int(usage), nums.e, nums.n, 0, pub.key_size,
                   pub.key_size)
        sig = rsa_pss_sign(signer_key, cert.body(), _hash_for(signer_key.key_size))
        return dataclasses.replace(cert, signature=sig)


# -- the built-in roots ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class AmdRoots:
    """One product's ARK and ASK."""

    product: str
    ark: AmdCaCertificate
    ask: AmdCaCertificate


def _product(product: str) -> str:
    name = product.lower()
    if name not in PRODUCTS:
        raise CertificateError(f"no built-in AMD root for {product!r}: choose one of "
                               f"{', '.join(PRODUCTS)}")
    return name


def _root_file(product: str, name: str) -> bytes:
    return (resources.files("kvmharness.sev") / "roots" / product / name).read_bytes()


@functools.lru_cache(maxsize=None)
def builtin_roots(product: str) -> AmdRoots:
    """AMD's ARK and ASK of ``product`` (naples, rome, milan, genoa, turin), AMD CA format."""
    name = _product(product)
    return AmdRoots(name, AmdCaCertificate.from_bytes(_root_file(name, "ark.cert")),
                    AmdCaCertificate.from_bytes(_root_file(name, "ask.cert")))


def amd_root_pems(product: str) -> tuple[bytes, bytes]:
    """(ARK, ASK) of a SEV-SNP product (milan, genoa, turin) as X.509 PEM bytes."""
    name = _product(product)
    if name not in SNP_PRODUCTS:
        raise CertificateError(f"AMD publishes X.509 ARK/ASK for the SEV-SNP products "
                               f"({', '.join(SNP_PRODUCTS)}), not {name}")
    return _root_file(name, "ark.pem"), _root_file(name, "ask.pem")


def root_paths(product: str) -> dict[str, str]:
    """Where the built-in root files of ``product`` are (for a user to inspect)."""
    name = _product(product)
    base = resources.files("kvmharness.sev") / "roots" / name
    files = ("ark.cert", "ask.cert") + (("ark.pem", "ask.pem") if name in SNP_PRODUCTS else ())
    return {f: os.fspath(base / f) for f in files}


def roots_for_cek(cek) -> AmdRoots | None:
    """The built-in roots whose ASK signed ``cek`` (a SevCertificate), or None."""
    for product in PRODUCTS:
        roots = builtin_roots(product)
        if cek.is_signed_by(roots.ask):
            return roots
    return None


# -- the simulated platform's AMD ----------------------------------------------

@functools.lru_cache(maxsize=1)
def simulated_amd_roots() -> tuple[AmdCaCertificate, AmdCaCertificate, rsa.RSAPrivateKey]:
    """(ARK, ASK, ASK private key) of the simulator's stand-in for AMD.

    One per process, as one AMD root serves every chip of a generation.  The
    keys are RSA-2048 as on Naples (so the CEK signature is RSA-PSS with
    SHA-256, sig algo 0x1), the smaller of AMD's two sizes, to keep a
    simulated chip cheap to make; they are fresh random keys and no AMD
    product's, so the built-in roots never vouch for a simulated chip.
    """
    ark_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ask_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ark_id = int.from_bytes(os.urandom(16), "little")
    ask_id = int.from_bytes(os.urandom(16), "little")
    ark = AmdCaCertificate.issue(ark_key, CertUsage.ARK, ark_id, ark_key, ark_id)
    ask = AmdCaCertificate.issue(ask_key, CertUsage.ASK, ask_id, ark_key, ark_id)
    return ark, ask, ask_key
