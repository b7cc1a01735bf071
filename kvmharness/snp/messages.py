"""The SNP guest messages the firmware answers about attestation, as plaintext bodies.

SNP ABI (56860), "Guest Messages": a guest sends these through SNP_GUEST_REQUEST,
wrapped in the message header and AES-256-GCM under a VMPCK (that wrapping is
the guest-request path's job, not this module's).  Layouts checked against
the kernel's ``include/uapi/linux/sev-guest.h`` (``snp_report_req``,
``snp_derived_key_req``) as google/go-sev-guest mirrors it
(``client/linuxabi/linux_abi.go``), and virtee/sev's ``DerivedKey``:

    MSG_REPORT_REQ  (0x60)  0x00 REPORT_DATA[64]  0x40 u32 VMPL  0x44 reserved[28]
    MSG_REPORT_RSP  (0x4C0) 0x00 u32 STATUS  0x04 u32 REPORT_SIZE  0x08 reserved[24]
                            0x20 ATTESTATION_REPORT (0x4A0)
    MSG_KEY_REQ     (0x20)  0x00 u32 ROOT_KEY_SELECT (bit 0: 0 VCEK, 1 VMRK)  0x04 reserved
                            0x08 u64 GUEST_FIELD_SELECT  0x10 u32 VMPL  0x14 u32 GUEST_SVN
                            0x18 u64 TCB_VERSION  (0x20 u64 LAUNCH_MIT_VECTOR in newer ABIs)
    MSG_KEY_RSP     (0x40)  0x00 u32 STATUS  0x04 reserved[28]  0x20 DERIVED_KEY[32]

Statuses: 0 success; INVALID_PARAM (0x16) for a VMPL below the requester's,
a GUEST_SVN above the launch's, a TCB_VERSION above the committed TCB or a
reserved bit set; INVALID_KEY (0x27) for the VMRK of a guest that has none
(our reading: the VMRK exists only for guests with a migration agent).

The derived key is the firmware's secret business; the model here is an
HMAC-SHA-256 of the root key (the chip's VCEK root, or the guest's VMRK) over
the VMPL and the selected fields, which has the properties a guest can test:
the same inputs give the same key, any selected field or the VMPL changes it,
an unselected field does not.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import struct
import uuid

from ..sev.status import SevStatus
from .attest import GuestAttestationContext, SimulatedSnpChip
from .report import REPORT_SIZE, TcbVersion

MSG_REPORT_REQ_SIZE = 0x60
MSG_REPORT_RSP_SIZE = 0x20 + REPORT_SIZE
MSG_KEY_REQ_SIZE = 0x20
MSG_KEY_REQ_SIZE_MIT = 0x28
MSG_KEY_RSP_SIZE = 0x40


class GuestFieldSelect(enum.IntFlag):
    """MSG_KEY_REQ GUEST_FIELD_SELECT: what is mixed into the derived key (63:7 reserved)."""

    GUEST_POLICY = 1 << 0
    IMAGE_ID = 1 << 1
    FAMILY_ID = 1 << 2
    MEASUREMENT = 1 << 3
    GUEST_SVN = 1 << 4
    TCB_VERSION = 1 << 5
    LAUNCH_MIT_VECTOR = 1 << 6


class RootKey(enum.IntEnum):
    VCEK = 0
    VMRK = 1


@dataclasses.dataclass
class ReportRequest:
    report_data: bytes = bytes(64)
    vmpl: int = 0

    @classmethod
    def parse(cls, data: bytes) -> ReportRequest:
        if len(data) < MSG_REPORT_REQ_SIZE:
            raise ValueError(f"MSG_REPORT_REQ is {MSG_REPORT_REQ_SIZE:#x} bytes, got {len(data)}")
        return cls(report_data=bytes(data[:64]), vmpl=struct.unpack_from("<I", data, 0x40)[0])

    def to_bytes(self) -> bytes:
        return bytes(self.report_data).ljust(64, b"\0") + struct.pack("<I", self.vmpl) + bytes(28)


@dataclasses.dataclass
class KeyRequest:
    root_key_select: int = RootKey.VCEK
    guest_field_select: int = 0
    vmpl: int = 0
    guest_svn: int = 0
    tcb_version: int = 0  # raw TCB_VERSION u64
    launch_mit_vector: int = 0
    reserved: int = 0

    @classmethod
    def parse(cls, data: bytes) -> KeyRequest:
        if len(data) < MSG_KEY_REQ_SIZE:
            raise ValueError(f"MSG_KEY_REQ is at least {MSG_KEY_REQ_SIZE:#x} bytes, got {len(data)}")
        rks, reserved, gfs, vmpl, svn, tcb = struct.unpack_from("<IIQIIQ", data, 0)
        mit = struct.unpack_from("<Q", data, 0x20)[0] if len(data) >= MSG_KEY_REQ_SIZE_MIT else 0
        return cls(rks, gfs, vmpl, svn, tcb, mit, reserved)

    def to_bytes(self) -> bytes:
        return struct.pack("<IIQIIQQ", self.root_key_select, self.reserved,
                           self.guest_field_select, self.vmpl, self.guest_svn, self.tcb_version,
                           self.launch_mit_vector)


def report_response(status: int, report: bytes = b"") -> bytes:
    """MSG_REPORT_RSP: the report follows a 0x20-byte header (zero report on failure)."""
    body = report if status == SevStatus.SUCCESS else bytes(REPORT_SIZE)
    return struct.pack("<II", status, len(report) if status == SevStatus.SUCCESS else 0) + bytes(
        24) + body


def parse_report_response(data: bytes) -> tuple[int, bytes]:
    status, size = struct.unpack_from("<II", data, 0)
    return status, bytes(data[0x20:0x20 + size])


def key_response(status: int, key: bytes = bytes(32)) -> bytes:
    return struct.pack("<I", status) + bytes(28) + (key if status == SevStatus.SUCCESS else bytes(32))


def parse_key_response(data: bytes) -> tuple[int, bytes]:
    return struct.unpack_from("<I", data, 0)[0], bytes(data[0x20:0x40])


def answer_report_request(chip: SimulatedSnpChip, guest: GuestAttestationContext,
                          message: bytes, requesting_vmpl: int = 0) -> bytes:
    """MSG_REPORT_REQ -> MSG_REPORT_RSP, as the firmware answers a guest at ``requesting_vmpl``."""
    try:
        req = ReportRequest.parse(message)
    except ValueError:
        return report_response(SevStatus.INVALID_PARAM)
    if not requesting_vmpl <= req.vmpl <= 3:  # a VMPL may only ask for itself or less privileged
        return report_response(SevStatus.INVALID_PARAM)
    return report_response(SevStatus.SUCCESS, chip.report(guest, req.report_data, req.vmpl))


def _tcb_exceeds(requested: TcbVersion, limit: TcbVersion) -> bool:
    pairs = [(requested.bootloader, limit.bootloader), (requested.tee, limit.tee),
             (requested.snp, limit.snp), (requested.microcode, limit.microcode),
             (requested.fmc or 0, limit.fmc or 0)]
    return any(r > m for r, m in pairs)


def derive_key(chip: SimulatedSnpChip, guest: GuestAttestationContext, req: KeyRequest,
               requesting_vmpl: int = 0) -> tuple[int, bytes]:
    """(status, 32-byte key) for MSG_KEY_REQ; see the module docstring for the checks."""
    gen = chip.generation
    if (req.root_key_select & ~1 or req.reserved or req.guest_field_select >> 7
            or not requesting_vmpl <= req.vmpl <= 3 or req.guest_svn > guest.guest_svn):
        return SevStatus.INVALID_PARAM, bytes(32)
    requested_tcb = TcbVersion.decode(req.tcb_version, gen)
    if _tcb_exceeds(requested_tcb, chip.committed_tcb):
        return SevStatus.INVALID_PARAM, bytes(32)
    if req.root_key_select == RootKey.VMRK:
        if guest.vmrk is None:
            return SevStatus.INVALID_KEY, bytes(32)
        root = guest.vmrk
    else:
        root = chip.vcek_root_secret
    sel = GuestFieldSelect(req.guest_field_select)
    parts = [b"snp-derived-key", struct.pack("<IQ", req.vmpl, req.guest_field_select)]
    if sel & GuestFieldSelect.GUEST_POLICY:
        parts.append(struct.pack("<Q", guest.policy))
    if sel & GuestFieldSelect.IMAGE_ID:
        parts.append(guest.image_id)
    if sel & GuestFieldSelect.FAMILY_ID:
        parts.append(guest.family_id)
    if sel & GuestFieldSelect.MEASUREMENT:
        parts.append(guest.measurement)
    if sel & GuestFieldSelect.GUEST_SVN:
        parts.append(struct.pack("<I", req.guest_svn))
    if sel & GuestFieldSelect.TCB_VERSION:
        parts.append(struct.pack("<Q", req.tcb_version))
    if sel & GuestFieldSelect.LAUNCH_MIT_VECTOR:
        parts.append(struct.pack("<Q", req.launch_mit_vector))
    key = hmac.new(root, b"\x00".join(parts), hashlib.sha256).digest()
    return SevStatus.SUCCESS, key


def answer_key_request(chip: SimulatedSnpChip, guest: GuestAttestationContext, message: bytes,
                       requesting_vmpl: int = 0) -> bytes:
    """MSG_KEY_REQ -> MSG_KEY_RSP."""
    try:
        req = KeyRequest.parse(message)
    except ValueError:
        return key_response(SevStatus.INVALID_PARAM)
    status, key = derive_key(chip, guest, req, requesting_vmpl)
    return key_response(status, key)


# -- the certificate table of extended guest requests ------------------------------------------
# GHCB spec (56421) and the kernel's sev-guest documentation: a table of
# {GUID[16], u32 offset, u32 length} entries ended by an all-zero entry, the
# certificates (DER) after it, offsets from the start of the blob.  GUIDs as
# virtee/sev (CertType) and go-sev-guest (abi.go) spell them, in RFC 4122 byte order.
CERT_GUIDS = {
    "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae",
    "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
    "vlek": "a8074bc2-a25a-483e-aae6-39c045a0b8a1",
    "crl": "92f81bc3-5811-4d3d-97ff-d19f88dc67ea",
}
CERT_TABLE_ENTRY = 24


def certificate_table(certificates: dict[str, bytes]) -> bytes:
    """The blob KVM hands an extended guest request: ``{"ark": der, "ask": der, ...}``."""
    entries = list(certificates.items())
    offset = CERT_TABLE_ENTRY * (len(entries) + 1)
    table, data = b"", b""
    for name, der in entries:
        table += uuid.UUID(CERT_GUIDS[name]).bytes + struct.pack("<II", offset + len(data), len(der))
        data += der
    return table + bytes(CERT_TABLE_ENTRY) + data


def parse_certificate_table(blob: bytes) -> dict[str, bytes]:
    """Inverse of :func:`certificate_table`; unknown GUIDs are kept under their string form."""
    names = {v: k for k, v in CERT_GUIDS.items()}
    out: dict[str, bytes] = {}
    pos = 0
    while True:
        if pos + CERT_TABLE_ENTRY > len(blob):
            raise ValueError("certificate table: no terminating all-zero entry")
        guid, offset, length = blob[pos:pos + 16], *struct.unpack_from("<II", blob, pos + 16)
        if guid == bytes(16) and offset == 0 and length == 0:
            return out
        if offset + length > len(blob):
            raise ValueError(f"certificate table: entry {pos // CERT_TABLE_ENTRY} points past the end")
        text = str(uuid.UUID(bytes=bytes(guid)))
        out[names.get(text, text)] = bytes(blob[offset:offset + length])
        pos += CERT_TABLE_ENTRY
