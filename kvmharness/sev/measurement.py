"""SEV launch digest and LAUNCH_MEASURE (AMD SEV API, LAUNCH_MEASURE; docs/facts.md#facts-11a, #facts-11b).

The firmware keeps a running SHA-256 (GCTX.LD) over the plaintext of every
LAUNCH_UPDATE_DATA region in issue order, followed, for SEV-ES, by every
LAUNCH_UPDATE_VMSA page (4096 bytes each, vCPU 0 first).  Being a stream hash
it does not care how KVM splits one ioctl into several firmware calls.

LAUNCH_MEASURE returns 48 bytes: MEASURE || MNONCE, where

    MEASURE = HMAC-SHA-256(TIK, 0x04 || API_MAJOR || API_MINOR || BUILD
                                || POLICY (LE u32) || LD || MNONCE)

The guest owner, who chose the TIK, recomputes it to check that the firmware
launched exactly the image it expected (:func:`verify_measurement`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..errors import MeasurementMismatch  # noqa: F401 - re-exported for callers
from .certs import CertAlgo, CertificateError, CertUsage, SevCertificate

MEASURE_CONTEXT = 0x04  # the context byte that starts the HMAC message
MEASUREMENT_LEN = 48
VMSA_PAGE_SIZE = 4096



class LaunchDigest:
    """GCTX.LD: the running SHA-256 the firmware extends at each update."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()

    def update_data(self, plaintext: bytes | bytearray | memoryview) -> None:
        """Extend with one LAUNCH_UPDATE_DATA region's plaintext."""
        self._sha.update(plaintext)

    def update_vmsa(self, vmsa_page: bytes | bytearray | memoryview) -> None:
        """Extend with one LAUNCH_UPDATE_VMSA page (exactly 4096 bytes)."""
        if len(vmsa_page) != VMSA_PAGE_SIZE:
            raise ValueError(f"a VMSA page is {VMSA_PAGE_SIZE} bytes, got {len(vmsa_page)}")
        self._sha.update(vmsa_page)

    def digest(self) -> bytes:
        """The 32-byte launch digest so far (the stream stays open)."""
        return self._sha.digest()

    def copy(self) -> LaunchDigest:
        new = LaunchDigest()
        new._sha = self._sha.copy()
        return new


def launch_digest(regions=(), vmsas=()) -> bytes:
    """The launch digest of data regions (in order) then VMSA pages."""
    ld = LaunchDigest()
    for region in regions:
        ld.update_data(region)
    for page in vmsas:
        ld.update_vmsa(page)
    return ld.digest()


def compute_measure(tik: bytes, *, api_major: int, api_minor: int, build: int,
                    policy: int, digest: bytes, mnonce: bytes) -> bytes:
    """The 32-byte MEASURE the firmware returns (docs/facts.md#facts-11b).

    ``policy`` is the u32 policy value (an ``int`` or a ``GuestPolicy``).
    """
    if len(tik) != 16:
        raise ValueError(f"TIK is 16 bytes, got {len(tik)}")
    if len(digest) != 32:
        raise ValueError(f"launch digest is 32 bytes, got {len(digest)}")
    if len(mnonce) != 16:
        raise ValueError(f"MNONCE is 16 bytes, got {len(mnonce)}")
    msg = (bytes([MEASURE_CONTEXT, api_major, api_minor, build])
           + int(policy).to_bytes(4, "little") + bytes(digest) + bytes(mnonce))
    return hmac.new(bytes(tik), msg, hashlib.sha256).digest()


@dataclasses.dataclass(frozen=True)
class LaunchMeasurement:
    """The 48 bytes LAUNCH_MEASURE writes: MEASURE (32) then MNONCE (16)."""

    measure: bytes
    mnonce: bytes

    def __post_init__(self):
        if len(self.measure) != 32 or len(self.mnonce) != 16:
            raise ValueError("LaunchMeasurement needs a 32-byte measure and a 16-byte mnonce, "
                             f"got {len(self.measure)} and {len(self.mnonce)}")

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> LaunchMeasurement:
        raw = bytes(raw)
        if len(raw) < MEASUREMENT_LEN:
            raise ValueError(f"LAUNCH_MEASURE output is {MEASUREMENT_LEN} bytes, got {len(raw)}")
        return cls(raw[:32], raw[32:48])

    def to_bytes(self) -> bytes:
        return self.measure + self.mnonce

    def __str__(self) -> str:
        return f"measure={self.measure.hex()} mnonce={self.mnonce.hex()}"


def verify_measurement(measurement: LaunchMeasurement, *, tik: bytes, api_major: int,
                       api_minor: int, build: int, policy: int, digest: bytes) -> None:
    """Check the firmware's measurement against the owner's expectation.

    Raises :class:`MeasurementMismatch` (with both values) if they differ.
    """
    expected = compute_measure(tik, api_major=api_major, api_minor=api_minor, build=build,
                               policy=policy, digest=digest, mnonce=measurement.mnonce)
    if not hmac.compare_digest(expected, measurement.measure):
        raise MeasurementMismatch(
            "SEV launch measurement mismatch: firmware reported "
            f"{measurement.measure.hex()}, expected {expected.hex()} for launch digest "
            f"{bytes(digest).hex()}, policy 0x{int(policy):08x}, firmware API "
            f"{api_major}.{api_minor} build {build}; the launched image, VMSA, policy or "
            "firmware is not what you measured, so do not inject secrets")


ATTESTATION_REPORT_LEN = 208
_REPORT_SIGNED_LEN = 52  # mnonce, launch digest, policy: everything before sig_usage


@dataclasses.dataclass(frozen=True)
class AttestationReport:
    """ATTESTATION_REPORT (0x036, KVM_SEV_GET_ATTESTATION_REPORT): 208 bytes (docs/facts.md#facts-11e).

    mnonce 16 @0, launch digest 32 @16, policy u32 @48, sig_usage u32 @52
    (PEK, 0x1002), sig_algo u32 @56 (ECDSA SHA-256, 0x2), reserved @60,
    signature 144 @64 (r, s: 72 bytes each, little-endian), made with the PEK
    over bytes 0-51.  Unlike LAUNCH_MEASURE it can be checked by anyone who
    trusts the platform chain, without the TIK.
    """

    mnonce: bytes
    launch_digest: bytes
    policy: int
    sig_usage: int
    sig_algo: int
    r: int
    s: int

    def signed_bytes(self) -> bytes:
        return self.mnonce + self.launch_digest + self.policy.to_bytes(4, "little")

    def to_bytes(self) -> bytes:
        return (self.signed_bytes() + self.sig_usage.to_bytes(4, "little")
                + self.sig_algo.to_bytes(4, "little") + bytes(4)
                + self.r.to_bytes(72, "little") + self.s.to_bytes(72, "little"))

    @classmethod
    def from_bytes(cls, raw: bytes | bytearray | memoryview) -> AttestationReport:
        raw = bytes(raw)
        if len(raw) != ATTESTATION_REPORT_LEN:
            raise ValueError(f"a SEV attestation report is {ATTESTATION_REPORT_LEN} bytes, "
                             f"got {len(raw)}")

        def u32(off):
            return int.from_bytes(raw[off:off + 4], "little")
        return cls(raw[0:16], raw[16:48], u32(48), u32(52), u32(56),
                   int.from_bytes(raw[64:136], "little"), int.from_bytes(raw[136:208], "little"))

    def verify(self, pek: SevCertificate) -> None:
        """Check the signature with ``pek`` (a PEK ``SevCertificate``).

        Raises :class:`CertificateError` if the report was not signed by that PEK.
        """
        pek.expect_usage(CertUsage.PEK)
        if (self.sig_usage, self.sig_algo) != (CertUsage.PEK, CertAlgo.ECDSA_SHA256):
            raise CertificateError(f"attestation report signature usage/algo "
                                   f"0x{self.sig_usage:x}/0x{self.sig_algo:x} is not "
                                   "PEK/ECDSA-SHA256")
        try:
            pek.public_key().verify(encode_dss_signature(self.r, self.s), self.signed_bytes(),
                                    ec.ECDSA(CertAlgo(self.sig_algo).hash))
        except InvalidSignature:
            raise CertificateError("attestation report signature does not verify with "
                                   "this PEK") from None
