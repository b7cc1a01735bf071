"""The firmware side of SEV-SNP attestation, simulated: AMD's keys and MSG_REPORT_REQ.

What the SNP firmware does when a guest asks for a report (SNP ABI 56860,
MSG_REPORT_REQ): it fills an ATTESTATION_REPORT from the guest's launch
context (policy, family/image id, the launch digest as MEASUREMENT, host
data, ID/author key digests, report ids), the platform (TCBs, platform info,
chip id, firmware versions) and the request (REPORT_DATA, VMPL), and signs
bytes 0x000-0x29F with the VCEK: ECDSA P-384 over SHA-384, R and S written
little-endian and zero-padded to 72 bytes each at 0x2A0.

AMD's real keys are out of reach, so this module stands in for AMD's KDS with
a simulated ARK (RSA-4096, self-signed, RSA-PSS/SHA-384), ASK (RSA-4096,
signed by that ARK) and VCEKs (ECDSA P-384, one per chip id and REPORTED_TCB,
signed by the ASK and carrying AMD's X.509 extensions), all *deterministic*:
the same generation, chip id and TCB always give the same keys and the same
certificate bytes, so tests are reproducible.  Their subjects say
``OU=kvmharness simulated KDS``; ``snp verify`` only accepts them when the
simulated ARK is named with ``--ark``, never as AMD's.

Entry points for the launch work (issue 16) and the guest request path:

* :class:`SimulatedSnpChip` -- one chip: its TCBs, firmware version, chip id,
  VCEK and certificates; :meth:`SimulatedSnpChip.report` answers MSG_REPORT_REQ
  for a :class:`GuestAttestationContext` (what LAUNCH_START/FINISH fixed).
* :func:`sign_report` -- fields in, signed 0x4A0 bytes out.
* :func:`simulated_kds` -- the simulated ARK/ASK/VCEK generator per generation.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import hmac
import importlib.resources
import math
from typing import Mapping

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.x509.oid import NameOID

from . import certs
from .report import (
    REPORT_SIZE,
    SIG_COMPONENT_SIZE,
    SIGNATURE_ALGO_ECDSA_P384_SHA384,
    AttestationReport,
    Generation,
    SigningKey,
    TcbVersion,
)

P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973
RSA_BITS = 4096
RSA_EXPONENT = 65537
_SEED = b"kvmharness simulated AMD KDS v1"
# Fixed validity so the certificate bytes do not depend on the clock; as long
# as AMD's own (ARK/ASK 25 years).
NOT_BEFORE = _dt.datetime(2024, 1, 1, tzinfo=_dt.timezone.utc)
NOT_AFTER = _dt.datetime(2049, 1, 1, tzinfo=_dt.timezone.utc)

# What real parts report (the captures in tests/data/snp/): CPUID family/model/
# stepping and the report version their current firmware writes.
CPUID_FMS = {Generation.MILAN: (0x19, 0x01, 0x01), Generation.GENOA: (0x19, 0x11, 0x01),
             Generation.TURIN: (0x1A, 0x02, 0x01)}
REPORT_VERSION = {Generation.MILAN: 3, Generation.GENOA: 3, Generation.TURIN: 5}


# -- deterministic randomness and RSA keys ----------------------------------------------------
class _Drbg:
    """HMAC-SHA-384 in counter mode: a reproducible byte stream for one label."""

    def __init__(self, *label: bytes):
        self._key = hmac.new(_SEED, b"\x00".join(label), hashlib.sha384).digest()
        self._counter = 0

    def read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self._counter += 1
            out += hmac.new(self._key, self._counter.to_bytes(8, "big"), hashlib.sha384).digest()
        return out[:n]

    def integer(self, bits: int) -> int:
        return int.from_bytes(self.read((bits + 7) // 8), "big") >> (-bits % 8)


def _small_primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for i in range(2, math.isqrt(limit) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytes(len(range(i * i, limit, i)))
    return [i for i in range(3, limit) if sieve[i]]


_SMALL_PRIMES = _small_primes(1 << 14)


def _probably_prime(n: int, drbg: _Drbg, rounds: int = 6) -> bool:
    """Miller-Rabin with bases drawn from ``drbg`` (FIPS 186-5 asks 2 rounds for 2048-bit
    random candidates at this error level; 6 is generous)."""
    d, s = n - 1, 0
    while not d & 1:
        d >>= 1
        s += 1
    for _ in range(rounds):
        a = 2 + drbg.integer(n.bit_length()) % (n - 3)
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _prime(bits: int, drbg: _Drbg) -> int:
    """A prime of exactly ``bits`` bits with the top two set (so p*q has 2*bits bits)
    and gcd(e, p-1) = 1, found by sieving an interval above a DRBG start."""
    window = 4096
    while True:
        start = drbg.integer(bits) | (3 << (bits - 2)) | 1
        composite = bytearray(window)  # composite[k] -> start + 2k has a small factor
        for p in _SMALL_PRIMES:
            k = (-start * pow(2, -1, p)) % p  # start + 2k = 0 (mod p)
            composite[k::p] = b"\x01" * len(range(k, window, p))
        for k in range(window):
            n = start + 2 * k
            if composite[k] or n.bit_length() != bits or (n - 1) % RSA_EXPONENT == 0:
                continue
            if _probably_prime(n, drbg):
                return n


def deterministic_rsa_key(*label: bytes, bits: int = RSA_BITS) -> rsa.RSAPrivateKey:
    drbg = _Drbg(b"rsa", *label)
    p = _prime(bits // 2, drbg)
    q = _prime(bits // 2, drbg)
    while q == p:
        q = _prime(bits // 2, drbg)
    p, q = max(p, q), min(p, q)
    n = p * q
    d = pow(RSA_EXPONENT, -1, math.lcm(p - 1, q - 1))
    return rsa.RSAPrivateNumbers(
        p=p, q=q, d=d, dmp1=rsa.rsa_crt_dmp1(d, p), dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q), public_numbers=rsa.RSAPublicNumbers(RSA_EXPONENT, n),
    ).private_key()


def deterministic_p384_key(*label: bytes) -> ec.EllipticCurvePrivateKey:
    # 96 bytes reduced mod (n-1), plus 1: a scalar in [1, n-1] with negligible bias.
    scalar = int.from_bytes(_Drbg(b"p384", *label).read(96), "big") % (P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP384R1())


# -- deterministic RSA-PSS certificate signatures ---------------------------------------------
def _mgf1_sha384(seed: bytes, length: int) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.sha384(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


def pss_sign_deterministic(key: rsa.RSAPrivateKey, message: bytes) -> bytes:
    """RSASSA-PSS (RFC 8017 8.1.1, EMSA-PSS 9.1.1) with SHA-384, MGF1-SHA-384 and a
    48-byte salt derived from the message, so a certificate's bytes are reproducible.
    Any PSS verifier accepts it: the salt's value is free, only its length is fixed."""
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    em_bits = n.bit_length() - 1
    em_len = (em_bits + 7) // 8
    h_len = s_len = 48
    m_hash = hashlib.sha384(message).digest()
    salt = hmac.new(_SEED, b"pss-salt" + m_hash, hashlib.sha384).digest()
    h = hashlib.sha384(bytes(8) + m_hash + salt).digest()
    db = bytes(em_len - s_len - h_len - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, _mgf1_sha384(h, em_len - h_len - 1)))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    em = int.from_bytes(bytes(masked) + h + b"\xbc", "big")
    # CRT: s = em^d mod n
    p, q = numbers.p, numbers.q
    s1 = pow(em, numbers.dmp1, p)
    s2 = pow(em, numbers.dmq1, q)
    s = s2 + q * ((numbers.iqmp * (s1 - s2)) % p)
    return s.to_bytes((n.bit_length() + 7) // 8, "big")


def _name(cn: str) -> x509.Name:
    # AMD's KDS DN order (OU, C, L, ST, O, CN), with OU saying whose simulation it is.
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "kvmharness simulated KDS"),
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _issue(builder: x509.CertificateBuilder, signer: rsa.RSAPrivateKey) -> x509.Certificate:
    """Sign with RSA-PSS/SHA-384 as AMD does, then swap in the deterministic signature.

    The signature BIT STRING ends the certificate and an RSA signature is exactly
    the modulus length, so the swap keeps every length (and the DER) intact."""
    cert = builder.sign(signer, hashes.SHA384(), rsa_padding=certs.amd_pss())
    der = cert.public_bytes(serialization.Encoding.DER)
    sig = pss_sign_deterministic(signer, cert.tbs_certificate_bytes)
    if not der.endswith(cert.signature) or len(sig) != len(cert.signature):
        raise AssertionError("unexpected certificate layout")
    return x509.load_der_x509_certificate(der[: -len(sig)] + sig)


def _kds_key(role: str, generation: Generation, regenerate: bool) -> rsa.RSAPrivateKey:
    if not regenerate:
        res = importlib.resources.files("kvmharness.snp") / "simkeys" / generation.value / f"{role}.key.pem"
        if res.is_file():
            key = serialization.load_pem_private_key(res.read_bytes(), password=None)
            assert isinstance(key, rsa.RSAPrivateKey)
            return key
    return deterministic_rsa_key(role.encode(), generation.value.encode())


@dataclasses.dataclass(frozen=True)
class SimulatedVcek:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


class SimulatedKds:
    """A simulated AMD KDS for one generation: its ARK, ASK and VCEKs.

    The ARK and ASK keys are RSA-4096 keys made by :func:`deterministic_rsa_key`
    from the labels ``(b"ark"|b"ask", generation)``.  Finding 2048-bit primes in
    pure Python takes 3-15 s per key, so the keys it made are shipped in
    ``kvmharness/snp/simkeys/<generation>/`` (a test regenerates one and compares);
    ``regenerate=True`` makes them again from scratch.  These are *simulation*
    keys, public on purpose: nothing they sign is ever taken for AMD's.
    Instances are cached per generation by :func:`simulated_kds`.
    """

    def __init__(self, generation: Generation, *, regenerate: bool = False):
        self.generation = generation
        title = generation.title
        self.ark_key = _kds_key("ark", generation, regenerate)
        self.ask_key = _kds_key("ask", generation, regenerate)
        ark_name, ask_name = _name(f"ARK-{title}"), _name(f"SEV-{title}")
        base = x509.CertificateBuilder().not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER)
        self.ark_cert = _issue(
            base.subject_name(ark_name).issuer_name(ark_name).serial_number(0x10000)
            .public_key(self.ark_key.public_key())
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True),
            self.ark_key)
        self.ask_cert = _issue(
            base.subject_name(ask_name).issuer_name(ark_name).serial_number(0x10001)
            .public_key(self.ask_key.public_key())
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, False, False,
                                         False), critical=True)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True),
            self.ark_key)

    @functools.lru_cache(maxsize=64)
    def vcek(self, chip_id: bytes, tcb: TcbVersion) -> SimulatedVcek:
        """The VCEK of ``chip_id`` at ``tcb`` (REPORTED_TCB), as KDS would issue it."""
        gen = self.generation
        hw_id = chip_id[:8] if gen is Generation.TURIN else chip_id
        tcb_raw = tcb.encode(gen)
        # The firmware derives the VCEK from a chip-unique secret and the TCB; here
        # the "secret" is itself derived from the chip id.
        key = deterministic_p384_key(b"vcek", gen.value.encode(), bytes(chip_id), tcb_raw)
        builder = (
            x509.CertificateBuilder().not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER)
            .subject_name(_name("SEV-VCEK")).issuer_name(self.ask_cert.subject)
            .serial_number(1).public_key(key.public_key()))
        for ext, critical in certs.vcek_extension_list(gen.product_name, tcb, hw_id,
                                                       gen is Generation.TURIN):
            builder = builder.add_extension(ext, critical=critical)
        return SimulatedVcek(key=key, cert=_issue(builder, self.ask_key))

    def pems(self) -> dict[str, bytes]:
        enc = serialization.Encoding.PEM
        return {"ark": self.ark_cert.public_bytes(enc), "ask": self.ask_cert.public_bytes(enc)}


@functools.lru_cache(maxsize=None)
def simulated_kds(generation: Generation | str) -> SimulatedKds:
    gen = generation if isinstance(generation, Generation) else Generation.parse(generation)
    return SimulatedKds(gen)


# -- signing reports -----------------------------------------------------------------------------
def sign_report(report_fields: AttestationReport | Mapping, vcek_key: ec.EllipticCurvePrivateKey
                ) -> bytes:
    """The 0x4A0-byte report for ``report_fields``, signed by ``vcek_key``.

    ``report_fields`` is an :class:`AttestationReport` or a mapping of its field
    names; unnamed fields are zero (SIGNATURE_ALGO defaults to 1, ECDSA
    P-384/SHA-384, the only algorithm the firmware signs with).  The signature
    (deterministic, RFC 6979, where ``cryptography`` offers it) covers bytes
    0x000-0x29F; R and S go little-endian, zero padded to 72 bytes, at 0x2A0.
    """
    if isinstance(report_fields, AttestationReport):
        report = dataclasses.replace(report_fields)
    else:
        report = AttestationReport(**dict(report_fields))
    if report.signature_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise ValueError(f"SIGNATURE_ALGO {report.signature_algo}: the firmware signs only with "
                         f"ECDSA P-384/SHA-384 (1)")
    if not isinstance(vcek_key.curve, ec.SECP384R1):
        raise ValueError("the VCEK is a P-384 key")
    body = report.body()
    try:
        algorithm = ec.ECDSA(hashes.SHA384(), deterministic_signing=True)
    except TypeError:  # cryptography < 44: a random nonce, still a valid signature
        algorithm = ec.ECDSA(hashes.SHA384())
    r, s = utils.decode_dss_signature(vcek_key.sign(body, algorithm))
    report.signature_r, report.signature_s = r, s
    out = report.to_bytes()
    assert len(out) == REPORT_SIZE and out[0x2A0:0x2A0 + SIG_COMPONENT_SIZE] == r.to_bytes(
        SIG_COMPONENT_SIZE, "little")
    return out


@dataclasses.dataclass
class GuestAttestationContext:
    """What a guest's launch fixes in its reports (SNP_LAUNCH_START / _FINISH):
    the guest policy, the launch digest (MEASUREMENT), the ID block's family/image
    id and SVN, HOST_DATA, the ID/author key digests, the report ids and the TCB
    at launch (None: the chip's current TCB)."""

    measurement: bytes = bytes(48)
    policy: int = 0x30000
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    guest_svn: int = 0
    host_data: bytes = bytes(32)
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    author_key_en: bool = False
    report_id: bytes | None = None  # None: derived from the launch (the firmware picks one)
    report_id_ma: bytes = b"\xff" * 32  # all ones: no migration agent
    launch_tcb: TcbVersion | None = None
    launch_mit_vector: int = 0
    vmrk: bytes | None = None  # the VM root key: only a guest with a migration agent has one


class SimulatedSnpChip:
    """One simulated SNP platform: chip id, TCBs, firmware version and its VCEK.

    ``reported_tcb`` is what SNP_SET_CONFIG sets (the TCB the VCEK is derived
    for); by default all TCBs are equal, as on a freshly updated machine.
    """

    def __init__(self, generation: Generation | str = Generation.MILAN, *,
                 chip_id: bytes | None = None, tcb: TcbVersion | None = None,
                 reported_tcb: TcbVersion | None = None, committed_tcb: TcbVersion | None = None,
                 firmware: tuple[int, int, int] = (1, 55, 29), platform_info: int = 0x3,
                 mask_chip_key: bool = False, report_version: int | None = None):
        self.generation = gen = (generation if isinstance(generation, Generation)
                                 else Generation.parse(generation))
        if chip_id is None:
            chip_id = _Drbg(b"chip-id", gen.value.encode()).read(64)
            if gen is Generation.TURIN:  # Turin chip ids are 8 bytes, zero padded
                chip_id = chip_id[:8] + bytes(56)
        if len(chip_id) != 64:
            raise ValueError("CHIP_ID is 64 bytes")
        if gen is Generation.TURIN and any(chip_id[8:]):
            raise ValueError("a Turin CHIP_ID is 8 bytes followed by 56 zero bytes")
        self.chip_id = bytes(chip_id)
        default = (TcbVersion(fmc=1, bootloader=1, tee=1, snp=4, microcode=0x51)
                   if gen is Generation.TURIN else TcbVersion(bootloader=4, tee=0, snp=0x18,
                                                              microcode=0xDB))
        self.current_tcb = tcb or default
        self.reported_tcb = reported_tcb or self.current_tcb
        self.committed_tcb = committed_tcb or self.current_tcb
        self.firmware = firmware
        self.platform_info = platform_info
        self.mask_chip_key = mask_chip_key
        self.report_version = report_version or REPORT_VERSION[gen]
        self.kds = simulated_kds(gen)

    @property
    def vcek(self) -> SimulatedVcek:
        return self.kds.vcek(self.chip_id, self.reported_tcb)

    @property
    def vcek_root_secret(self) -> bytes:
        """The chip-unique secret MSG_KEY_REQ derives VCEK-rooted keys from (simulated)."""
        return _Drbg(b"vcek-root", self.generation.value.encode(), self.chip_id).read(48)

    def certificate_der(self) -> dict[str, bytes]:
        """DER of the ARK, ASK and VCEK: what the host's certificate table carries."""
        der = serialization.Encoding.DER
        return {"ark": self.kds.ark_cert.public_bytes(der), "ask": self.kds.ask_cert.public_bytes(der),
                "vcek": self.vcek.cert.public_bytes(der)}

    def certificates(self) -> dict[str, bytes]:
        """PEMs of the ARK, ASK and this chip's VCEK (what a KDS-style directory holds)."""
        return {**self.kds.pems(), "vcek": self.vcek.pem}

    def report_fields(self, guest: GuestAttestationContext, report_data: bytes = bytes(64),
                      vmpl: int = 0) -> AttestationReport:
        """The unsigned report MSG_REPORT_REQ would produce."""
        if len(report_data) > 64:
            raise ValueError("REPORT_DATA is 64 bytes")
        if not 0 <= vmpl <= 3:
            raise ValueError("VMPL is 0-3")
        gen = self.generation
        fam, mod, step = CPUID_FMS[gen]
        major, minor, build = self.firmware
        report_id = guest.report_id or hashlib.sha384(
            b"report-id" + self.chip_id + guest.measurement + guest.host_data).digest()[:32]
        return AttestationReport(
            version=self.report_version, guest_svn=guest.guest_svn, policy=guest.policy,
            family_id=guest.family_id, image_id=guest.image_id, vmpl=vmpl,
            signature_algo=SIGNATURE_ALGO_ECDSA_P384_SHA384,
            current_tcb=self.current_tcb.raw(gen), platform_info=self.platform_info,
            author_key_en=guest.author_key_en, mask_chip_key=self.mask_chip_key,
            signing_key=SigningKey.VCEK, report_data=bytes(report_data).ljust(64, b"\0"),
            measurement=guest.measurement, host_data=guest.host_data,
            id_key_digest=guest.id_key_digest, author_key_digest=guest.author_key_digest,
            report_id=report_id, report_id_ma=guest.report_id_ma,
            reported_tcb=self.reported_tcb.raw(gen),
            cpuid_fam_id=fam, cpuid_mod_id=mod, cpuid_step=step,
            chip_id=bytes(64) if self.mask_chip_key else self.chip_id,
            committed_tcb=self.committed_tcb.raw(gen),
            current_build=build, current_minor=minor, current_major=major,
            committed_build=build, committed_minor=minor, committed_major=major,
            launch_tcb=(guest.launch_tcb or self.current_tcb).raw(gen),
            launch_mit_vector=guest.launch_mit_vector)

    def report(self, guest: GuestAttestationContext, report_data: bytes = bytes(64),
               vmpl: int = 0) -> bytes:
        """MSG_REPORT_REQ: the signed 0x4A0-byte ATTESTATION_REPORT."""
        return sign_report(self.report_fields(guest, report_data, vmpl), self.vcek.key)
