"""The guest owner's side of a SEV launch: session blob, measurement, secret.

What sevctl's ``session`` and AMD's sev-tool do, before and after KVM's
LAUNCH_START (AMD SEV API spec 55766, LAUNCH_START and LAUNCH_SECRET):

1. Pick a transport encryption key TEK and integrity key TIK (16 bytes each).
2. Verify the platform chain and take the PDH public key; make an ephemeral
   P-384 ECDH key, whose certificate (the "GODH", usage PDH) goes to the
   firmware as LAUNCH_START's ``dh_cert``.
3. Z = ECDH(godh, PDH) (the x coordinate, big-endian, as OpenSSL derives it);
   master = KDF(Z, "sev-master-secret", nonce); KEK = KDF(master, "sev-kek");
   KIK = KDF(master, "sev-kik").  KDF is NIST SP 800-108 counter mode with
   HMAC-SHA-256: K(i) = HMAC(key, i_le32 || label || 0x00 || context || L_le32),
   L the output length in bits.
4. Session blob (128 bytes, docs/facts.md#facts-11c): nonce, AES-128-CTR(KEK, IV)(TEK || TIK),
   IV, wrap MAC = HMAC-SHA-256(KIK, wrapped keys), policy MAC =
   HMAC-SHA-256(TIK, policy as LE u32).

The owner keeps TEK/TIK to check LAUNCH_MEASURE (measurement.py) and to build
the LAUNCH_SECRET packet (docs/facts.md#facts-11d).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import struct

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .certs import (
    CertAlgo,
    CertUsage,
    PlatformCertChain,
    SevCertificate,
    generate_key,
)
from .measurement import LaunchDigest, LaunchMeasurement, verify_measurement
from .policy import GuestPolicy

MASTER_SECRET_LABEL = b"sev-master-secret"
KEK_LABEL = b"sev-kek"
KIK_LABEL = b"sev-kik"
SESSION_SIZE = 128
SECRET_HEADER_SIZE = 52
SECRET_MAC_CONTEXT = 0x01
SECRET_FLAG_COMPRESSED = 1 << 0


def kdf(key: bytes, label: bytes, context: bytes = b"", length: int = 16) -> bytes:
    """NIST SP 800-108 KDF in counter mode, PRF = HMAC-SHA-256 (SEV API flavour)."""
    out = b""
    bits = struct.pack("<I", length * 8)
    i = 1
    while len(out) < length:
        out += hmac.new(key, struct.pack("<I", i) + label + b"\0" + context + bits,
                        hashlib.sha256).digest()
        i += 1
    return out[:length]


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def aes128_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-128-CTR (encrypt and decrypt are the same operation)."""
    return Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor().update(data)


def ecdh_shared_secret(private: ec.EllipticCurvePrivateKey,
                       peer: ec.EllipticCurvePublicKey) -> bytes:
    """Z: the shared point's x coordinate, big-endian (OpenSSL's derive output)."""
    return private.exchange(ec.ECDH(), peer)


def session_keys(shared_secret: bytes, nonce: bytes) -> tuple[bytes, bytes]:
    """(KEK, KIK) from Z and the session nonce."""
    master = kdf(shared_secret, MASTER_SECRET_LABEL, nonce)
    return kdf(master, KEK_LABEL), kdf(master, KIK_LABEL)


@dataclasses.dataclass(frozen=True)
class SessionBlob:
    """LAUNCH_START's 128-byte session buffer (docs/facts.md#facts-11c)."""

    nonce: bytes
    wrap_tk: bytes  # AES-128-CTR(KEK, wrap_iv)(TEK || TIK), 32 bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    def to_bytes(self) -> bytes:
        return self.nonce + self.wrap_tk + self.wrap_iv + self.wrap_mac + self.policy_mac

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> SessionBlob:
        raw = bytes(raw)
        if len(raw) != SESSION_SIZE:
            raise ValueError(f"a SEV session blob is {SESSION_SIZE} bytes, got {len(raw)}")
        return cls(raw[0:16], raw[16:48], raw[48:64], raw[64:96], raw[96:128])

    @classmethod
    def wrap(cls, tek: bytes, tik: bytes, policy: int, kek: bytes, kik: bytes,
             nonce: bytes, iv: bytes) -> SessionBlob:
        wrapped = aes128_ctr(kek, iv, tek + tik)
        return cls(nonce, wrapped, iv, hmac_sha256(kik, wrapped),
                   hmac_sha256(tik, int(policy).to_bytes(4, "little")))

    def wrap_mac_ok(self, kik: bytes) -> bool:
        return hmac.compare_digest(hmac_sha256(kik, self.wrap_tk), self.wrap_mac)

    def unwrap(self, kek: bytes) -> tuple[bytes, bytes]:
        """(TEK, TIK).  Check :meth:`wrap_mac_ok` first."""
        keys = aes128_ctr(kek, self.wrap_iv, self.wrap_tk)
        return keys[:16], keys[16:]

    def policy_mac_ok(self, tik: bytes, policy: int) -> bool:
        expected = hmac_sha256(tik, int(policy).to_bytes(4, "little"))
        return hmac.compare_digest(expected, self.policy_mac)


@dataclasses.dataclass(frozen=True)
class LaunchStart:
    """What the owner hands the host for KVM_SEV_LAUNCH_START."""

    policy: GuestPolicy
    dh_cert: bytes  # the owner's GODH certificate, 0x824 bytes
    session: bytes  # SessionBlob, 128 bytes
    #: what the platform chain proved (``chain.ChainVerification``); None: no chain given
    chain: object = None


@dataclasses.dataclass(frozen=True)
class SecretHeader:
    """LAUNCH_SECRET's 52-byte packet header: flags u32, IV 16, MAC 32 (docs/facts.md#facts-11d)."""

    flags: int
    iv: bytes
    mac: bytes

    def to_bytes(self) -> bytes:
        return struct.pack("<I", self.flags) + self.iv + self.mac

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> SecretHeader:
        raw = bytes(raw)
        if len(raw) != SECRET_HEADER_SIZE:
            raise ValueError(f"a LAUNCH_SECRET header is {SECRET_HEADER_SIZE} bytes, "
                             f"got {len(raw)}")
        return cls(struct.unpack_from("<I", raw)[0], raw[4:20], raw[20:52])


def secret_mac(tik: bytes, flags: int, iv: bytes, guest_len: int, ciphertext: bytes,
               measure: bytes) -> bytes:
    """HMAC-SHA-256(TIK; 0x01 || FLAGS || IV || GUEST_LEN || TRANS_LEN || data || MEASURE)."""
    msg = (bytes([SECRET_MAC_CONTEXT]) + struct.pack("<I", flags) + iv
           + struct.pack("<II", guest_len, len(ciphertext)) + ciphertext + measure)
    return hmac_sha256(tik, msg)


@dataclasses.dataclass(frozen=True)
class SecretPacket:
    """A LAUNCH_SECRET packet: header plus the transport (encrypted) data."""

    header: SecretHeader
    ciphertext: bytes

    @property
    def guest_len(self) -> int:
        return len(self.ciphertext)


class GuestOwner:
    """The guest owner: holds TEK/TIK, starts the session, checks, injects.

    >>> owner = GuestOwner(GuestPolicy.parse("nodbg"))          # doctest: +SKIP
    >>> start = owner.start(pdh_bytes, chain_bytes)              # doctest: +SKIP
    ... # host: LAUNCH_START(start.policy, start.dh_cert, start.session), updates
    >>> owner.measure_data(image)                                # doctest: +SKIP
    >>> owner.verify(measurement, api_major=1, api_minor=55, build=21)  # doctest: +SKIP
    >>> packet = owner.secret_packet(b"disk key ...")             # doctest: +SKIP
    """

    def __init__(self, policy: GuestPolicy | int = 0, *, tek: bytes | None = None,
                 tik: bytes | None = None, cek=None, ask=None, ark=None):
        self.policy = policy if isinstance(policy, GuestPolicy) else GuestPolicy(policy)
        # trust anchors start() uses unless given there: the ASK-signed CEK from AMD's KDS
        # (bytes or SevCertificate) and AMD's ASK/ARK (AmdCaCertificate or bytes)
        self.cek, self.ask, self.ark = cek, ask, ark
        self.chain = None  # the last start()'s ChainVerification
        self.tek = os.urandom(16) if tek is None else bytes(tek)
        self.tik = os.urandom(16) if tik is None else bytes(tik)
        if len(self.tek) != 16 or len(self.tik) != 16:
            raise ValueError("TEK and TIK are 16 bytes each")
        self.digest = LaunchDigest()
        self.measurement: LaunchMeasurement | None = None

    def start(self, pdh: bytes | SevCertificate, chain: bytes | PlatformCertChain | None = None,
              *, cek=None, ask=None, ark=None, chip_id: bytes | None = None,
              nonce: bytes | None = None, iv: bytes | None = None,
              godh_key: ec.EllipticCurvePrivateKey | None = None) -> LaunchStart:
        """Build LAUNCH_START's dh_cert and session blob for the platform's PDH.

        ``chain`` (PDH_CERT_EXPORT's cert_chain: PEK, OCA, CEK) is verified when
        given; pass ``None`` only if the PDH came from a trusted channel.  What
        the exported chain can prove is checked: PDH by the PEK, the PEK by the
        OCA and the CEK, the OCA by itself.  Its CEK is unsigned on real
        platforms (AMD's firmware exports it so, ``chain.py``): ``cek`` is the
        ASK-signed one from AMD's KDS (by chip id; bytes or certificate, the
        exported CEK's key), and ``ask``/``ark`` (AMD's, e.g.
        :func:`~kvmharness.sev.amd_ca.builtin_roots`; with ``cek`` alone, the
        built-in roots whose ASK signed it) extend the check to AMD.  Asking for
        AMD's roots (``ask``) without a signed CEK is refused
        (:class:`CertificateError` saying why); without ``ask``, the result's
        ``chain`` (also ``self.chain``) says CEK -> ASK -> ARK is unverified and why.
        Defaults for ``cek``/``ask``/``ark`` come from the constructor.
        """
        from .chain import verify_chain

        cek = self.cek if cek is None else cek
        ask = self.ask if ask is None else ask
        ark = self.ark if ark is None else ark
        pdh_cert = pdh if isinstance(pdh, SevCertificate) else SevCertificate.from_bytes(pdh)
        verification = None
        if chain is not None:
            if not isinstance(chain, PlatformCertChain):
                chain = PlatformCertChain.from_bytes(chain)
            if cek is not None and ask is None:
                from .amd_ca import roots_for_cek

                signed = cek if isinstance(cek, SevCertificate) else SevCertificate.from_bytes(cek)
                roots = roots_for_cek(signed)
                if roots is not None:
                    ask, ark = roots.ask, roots.ark if ark is None else ark
            verification = verify_chain(pdh_cert, chain.pek, chain.oca, chain.cek, ask=ask,
                                        ark=ark, kds_cek=cek, chip_id=chip_id)
            verification.raise_for_failure()
            if ask is not None or cek is not None:
                verification.require_amd()
            self.chain = verification
            pdh_key = verification.pdh_key
        else:
            pdh_cert.expect_usage(CertUsage.PDH)
            pdh_key = pdh_cert.public_key()
        godh = generate_key() if godh_key is None else godh_key
        nonce = os.urandom(16) if nonce is None else bytes(nonce)
        iv = os.urandom(16) if iv is None else bytes(iv)
        kek, kik = session_keys(ecdh_shared_secret(godh, pdh_key), nonce)
        blob = SessionBlob.wrap(self.tek, self.tik, self.policy.value, kek, kik, nonce, iv)
        # The firmware does not check the GODH's signature; sev-tool signs it
        # with itself anyway, sevctl leaves both slots empty.  Leave them empty.
        godh_cert = SevCertificate.for_key(godh, CertUsage.PDH, CertAlgo.ECDH_SHA256,
                                           api_major=pdh_cert.api_major,
                                           api_minor=pdh_cert.api_minor)
        return LaunchStart(self.policy, godh_cert.to_bytes(), blob.to_bytes(), verification)

    def measure_data(self, plaintext: bytes) -> None:
        """Account for one LAUNCH_UPDATE_DATA region, in the host's order."""
        self.digest.update_data(plaintext)

    def measure_vmsa(self, page: bytes) -> None:
        """Account for one LAUNCH_UPDATE_VMSA page (SEV-ES), after the data."""
        self.digest.update_vmsa(page)

    def verify(self, measurement: LaunchMeasurement | bytes, *, api_major: int,
               api_minor: int, build: int, digest: bytes | None = None) -> None:
        """Check LAUNCH_MEASURE; raises ``MeasurementMismatch`` on mismatch.

        The firmware version must be what PLATFORM_STATUS reported; ``digest``
        overrides the digest accumulated by :meth:`measure_data`.
        """
        if not isinstance(measurement, LaunchMeasurement):
            measurement = LaunchMeasurement.from_bytes(measurement)
        verify_measurement(measurement, tik=self.tik, api_major=api_major,
                           api_minor=api_minor, build=build, policy=self.policy.value,
                           digest=self.digest.digest() if digest is None else digest)
        self.measurement = measurement

    def secret_packet(self, secret: bytes, *, measurement: LaunchMeasurement | None = None,
                      flags: int = 0, iv: bytes | None = None) -> SecretPacket:
        """Encrypt ``secret`` (a multiple of 16 bytes) for LAUNCH_SECRET.

        Bound to the verified measurement (the MAC covers MEASURE), so the
        firmware accepts it only for the launch the owner checked.
        """
        measurement = measurement or self.measurement
        if measurement is None:
            raise ValueError("verify the launch measurement before building a secret packet")
        if flags & SECRET_FLAG_COMPRESSED:
            raise ValueError("compressed LAUNCH_SECRET packets are not supported")
        iv = os.urandom(16) if iv is None else bytes(iv)
        ciphertext = aes128_ctr(self.tek, iv, bytes(secret))
        mac = secret_mac(self.tik, flags, iv, len(secret), ciphertext, measurement.measure)
        return SecretPacket(SecretHeader(flags, iv, mac), ciphertext)
