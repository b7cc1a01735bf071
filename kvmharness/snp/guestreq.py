"""SNP_GUEST_REQUEST: the firmware's side of the guest message protocol (simulated).

A guest sends a message (0x60-byte header + AES-256-GCM payload, the kernel's
``struct snp_guest_msg_hdr`` in drivers/virt/coco/sev-guest/sev-guest.h) through
the GHCB (NAE 0x80000011, or 0x80000012 with a certificate buffer); KVM hands
the request page to the firmware (``snp_handle_guest_req``) and the guest finds
SW_EXITINFO2 = ``SNP_GUEST_ERR(vmm_error, fw_error)`` (vmm error in bits 63:32).

The header: authtag[32] (the GCM tag in its first 16 bytes) @0, msg_seqno u64 @0x20,
algo u8 @0x30 (1 = AES-256-GCM), hdr_version u8 @0x31 (1), hdr_sz u16 @0x32 (0x60),
msg_type u8 @0x34, msg_version u8 @0x35, msg_sz u16 @0x36, msg_vmpck u8 @0x3C.
AES-256-GCM under VMPCK[msg_vmpck], IV = msg_seqno's 8 bytes then 4 zero bytes,
AAD = header bytes 0x30..0x5F (as the Linux driver's ``enc_payload``/``dec_payload``).

The firmware (:class:`GuestMessageFirmware`) keeps one sequence counter per
VMPCK: a request must carry the counter + 1, its response carries the request's
+ 1, and the counter then stands at the response's.  A request it cannot
accept leaves the counter untouched and gets no response.  Which firmware
status each refusal carries is not in the sources this project holds (the SNP
ABI's SNP_GUEST_REQUEST text is not quoted there); the model answers
INVALID_PARAM (0x16) for each -- a malformed header, a wrong sequence number, a
message that does not authenticate (a bad tag, or a key the guest wiped) --
marked "(model)" below.
"""

from __future__ import annotations

import dataclasses
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..sev.status import SevStatus
from .attest import GuestAttestationContext, SimulatedSnpChip
from .messages import answer_key_request, answer_report_request

HDR_SIZE = 0x60
PAYLOAD_MAX = 4000
AAD = slice(0x30, 0x60)
AEAD_AES_256_GCM = 1
MSG_KEY_REQ, MSG_KEY_RSP, MSG_REPORT_REQ, MSG_REPORT_RSP = 3, 4, 5, 6
STATUS_BAD_HEADER = SevStatus.INVALID_PARAM  # (model)
STATUS_BAD_SEQNO = SevStatus.INVALID_PARAM  # (model)
STATUS_AUTH_FAILED = SevStatus.INVALID_PARAM  # (model)
SNP_GUEST_VMM_ERR_INVALID_LEN = 1  # include/linux/psp-sev.h / the GHCB spec
SNP_GUEST_VMM_ERR_BUSY = 2


def snp_guest_err(vmm_error: int, fw_error: int) -> int:
    """``SNP_GUEST_ERR``: what the guest finds in SW_EXITINFO2."""
    return (vmm_error & 0xFFFFFFFF) << 32 | (fw_error & 0xFFFFFFFF)


@dataclasses.dataclass(frozen=True)
class MessageHeader:
    seqno: int
    msg_type: int
    msg_sz: int
    vmpck: int
    algo: int = AEAD_AES_256_GCM
    hdr_version: int = 1
    hdr_sz: int = HDR_SIZE
    msg_version: int = 1

    @classmethod
    def parse(cls, raw: bytes) -> MessageHeader:
        seqno, = struct.unpack_from("<Q", raw, 0x20)
        algo, hdr_version, hdr_sz, msg_type, msg_version, msg_sz = struct.unpack_from(
            "<BBHBBH", raw, 0x30)
        return cls(seqno, msg_type, msg_sz, raw[0x3C], algo, hdr_version, hdr_sz, msg_version)

    def pack(self, tag: bytes = bytes(16)) -> bytes:
        out = bytearray(HDR_SIZE)
        out[0:16] = tag
        struct.pack_into("<Q", out, 0x20, self.seqno)
        struct.pack_into("<BBHBBH", out, 0x30, self.algo, self.hdr_version, self.hdr_sz,
                         self.msg_type, self.msg_version, self.msg_sz)
        out[0x3C] = self.vmpck
        return bytes(out)


def _iv(seqno: int) -> bytes:
    return struct.pack("<Q", seqno) + bytes(4)


def seal(key: bytes, header: MessageHeader, payload: bytes) -> bytes:
    """A whole message: header with the tag, then the ciphertext (what the guest sends)."""
    hdr = header.pack()
    ct = AESGCM(key).encrypt(_iv(header.seqno), bytes(payload), hdr[AAD])
    return header.pack(ct[-16:]) + ct[:-16]


def open_message(key: bytes, message: bytes) -> tuple[MessageHeader, bytes]:
    """(header, plaintext); raises InvalidTag when the message does not authenticate."""
    h = MessageHeader.parse(message)
    ct = bytes(message[HDR_SIZE:HDR_SIZE + h.msg_sz])
    tag = bytes(message[0:16])
    return h, AESGCM(key).decrypt(_iv(h.seqno), ct + tag, bytes(message[AAD]))


class GuestMessageFirmware:
    """One guest's message channel in the firmware: VMPCK0-3 and their sequence counters."""

    def __init__(self, vmpcks, chip: SimulatedSnpChip, guest: GuestAttestationContext):
        self.vmpcks = tuple(bytes(k) for k in vmpcks)
        self.chip = chip
        self.guest = guest
        self.seqno = [0, 0, 0, 0]
        self.requests = 0
        self.refused = 0

    def request(self, message: bytes) -> tuple[bytes | None, int]:
        """SNP_GUEST_REQUEST: (the response message or None, the firmware status)."""
        self.requests += 1
        h = MessageHeader.parse(message)
        if (h.algo != AEAD_AES_256_GCM or h.hdr_version != 1 or h.hdr_sz != HDR_SIZE
                or h.vmpck > 3 or h.msg_sz > PAYLOAD_MAX
                or h.msg_type not in (MSG_REPORT_REQ, MSG_KEY_REQ)):
            self.refused += 1
            return None, STATUS_BAD_HEADER
        if h.seqno != self.seqno[h.vmpck] + 1:
            self.refused += 1
            return None, STATUS_BAD_SEQNO
        key = self.vmpcks[h.vmpck]
        try:
            _h, body = open_message(key, message)
        except InvalidTag:
            self.refused += 1
            return None, STATUS_AUTH_FAILED
        if h.msg_type == MSG_REPORT_REQ:
            reply = answer_report_request(self.chip, self.guest, body, requesting_vmpl=h.vmpck)
        else:
            reply = answer_key_request(self.chip, self.guest, body, requesting_vmpl=h.vmpck)
        resp = MessageHeader(h.seqno + 1, h.msg_type + 1, len(reply), h.vmpck)
        self.seqno[h.vmpck] = h.seqno + 1
        return seal(key, resp, reply), SevStatus.SUCCESS


__all__ = [
    "GuestMessageFirmware", "MessageHeader", "SNP_GUEST_VMM_ERR_BUSY",
    "SNP_GUEST_VMM_ERR_INVALID_LEN", "open_message", "seal", "snp_guest_err",
]
