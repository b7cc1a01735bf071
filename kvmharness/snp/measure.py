"""The SEV-SNP launch digest: a SHA-384 chain over one PAGE_INFO per launched page.

SNP ABI 56860 §8.17 (SNP_LAUNCH_UPDATE), "PAGE_INFO": each SNP_LAUNCH_UPDATE
of a 4 KiB page replaces the digest ``LD`` with ``SHA-384(PAGE_INFO)``, where
PAGE_INFO is 0x70 bytes::

    0x00  DIGEST_CUR[48]   the launch digest so far (48 zero bytes at LAUNCH_START)
    0x30  CONTENTS[48]     SHA-384 of the page for NORMAL and VMSA pages;
                           48 zero bytes for ZERO, UNMEASURED, SECRETS and CPUID
    0x60  LENGTH u16       0x70
    0x62  PAGE_TYPE u8     1 NORMAL, 2 VMSA, 3 ZERO, 4 UNMEASURED, 5 SECRETS, 6 CPUID
    0x63  IMI_PAGE u8
    0x64  VMPL3_PERMS u8, 0x65 VMPL2_PERMS u8, 0x66 VMPL1_PERMS u8, 0x67 reserved
    0x68  GPA u64          the page's GPA as the RMP records it

A VMSA page's GPA is the one KVM gives its RMP entry, ``INITIAL_VMSA_GPA``
(0xFFFFFFFFF000, sev.c).  The same construction is in virtee/sev-snp-measure
``gctx.py``; the tests check this module against it page for page.

A :class:`LaunchLog` records every step as (gpa, page_type, SHA-384 of the
contents or None when the page is measured as zeros), so anyone can replay the
digest (:func:`replay`) without the pages themselves.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import struct

LD_SIZE = 48
ZERO_DIGEST = bytes(LD_SIZE)
PAGE_INFO_LEN = 0x70
PAGE_SIZE = 4096
INITIAL_VMSA_GPA = 0xFFFFFFFFF000  # KVM's RMP GPA for a vCPU's initial VMSA


class PageType(enum.IntEnum):
    """SNP_LAUNCH_UPDATE page types (psp-sev.h ``SNP_PAGE_TYPE_*``)."""

    NORMAL = 1
    VMSA = 2
    ZERO = 3
    UNMEASURED = 4
    SECRETS = 5
    CPUID = 6

    @property
    def measures_contents(self) -> bool:
        """NORMAL and VMSA pages are measured by their contents; the rest as zeros."""
        return self in (PageType.NORMAL, PageType.VMSA)

    @property
    def label(self) -> str:
        return self.name.lower()


def page_info(digest: bytes, contents: bytes, page_type: int, gpa: int, *, imi: int = 0,
              vmpl3: int = 0, vmpl2: int = 0, vmpl1: int = 0) -> bytes:
    """The 0x70-byte PAGE_INFO structure."""
    if len(digest) != LD_SIZE or len(contents) != LD_SIZE:
        raise ValueError("PAGE_INFO digests are 48 bytes")
    return (digest + contents + struct.pack("<HBBBBBBQ", PAGE_INFO_LEN, page_type, imi,
                                            vmpl3, vmpl2, vmpl1, 0, gpa))


@dataclasses.dataclass(frozen=True)
class LogEntry:
    """One measured page: what a verifier needs to replay the digest."""

    gpa: int
    page_type: PageType
    contents_sha384: bytes | None  # None: measured as 48 zero bytes
    imi: int = 0
    vmpl_perms: tuple[int, int, int] = (0, 0, 0)  # VMPL1, VMPL2, VMPL3 (KVM leaves them 0)

    def to_json(self) -> dict:
        d = {"gpa": f"0x{self.gpa:x}", "page_type": self.page_type.label,
             "contents_sha384": self.contents_sha384.hex() if self.contents_sha384 else None}
        if self.imi:  # only when set, so the common log stays the three fields
            d["imi"] = self.imi
        if any(self.vmpl_perms):
            d["vmpl_perms"] = list(self.vmpl_perms)
        return d

    @classmethod
    def from_json(cls, d: dict) -> LogEntry:
        gpa = d["gpa"]
        digest = d.get("contents_sha384")
        perms = tuple(int(x) for x in d.get("vmpl_perms", (0, 0, 0)))
        return cls(int(gpa, 0) if isinstance(gpa, str) else int(gpa),
                   PageType[str(d["page_type"]).upper()],
                   bytes.fromhex(digest) if digest else None,
                   int(d.get("imi", 0)), perms)  # type: ignore[arg-type]


class LaunchDigest:
    """The running GCTX.LD, with the log of what went into it."""

    def __init__(self, seed: bytes = ZERO_DIGEST):
        if len(seed) != LD_SIZE:
            raise ValueError("the launch digest seed is 48 bytes")
        self.digest = bytes(seed)
        self.seed = bytes(seed)
        self.log: list[LogEntry] = []

    def update(self, gpa: int, page_type: PageType | int, page: bytes | None = None, *,
               imi: int = 0, vmpl3: int = 0, vmpl2: int = 0, vmpl1: int = 0) -> LogEntry:
        """Extend the digest with one 4 KiB page (``page`` is ignored for zero-measured types)."""
        page_type = PageType(page_type)
        if page_type.measures_contents:
            if page is None or len(page) != PAGE_SIZE:
                raise ValueError(f"a {page_type.label} page is measured by its 4096 bytes")
            contents = hashlib.sha384(page).digest()
        else:
            contents = None
        self.digest = hashlib.sha384(page_info(self.digest, contents or ZERO_DIGEST, page_type,
                                               gpa, imi=imi, vmpl3=vmpl3, vmpl2=vmpl2,
                                               vmpl1=vmpl1)).digest()
        entry = LogEntry(gpa, page_type, contents, imi, (vmpl1, vmpl2, vmpl3))
        self.log.append(entry)
        return entry

    def hex(self) -> str:
        return self.digest.hex()


def replay(log, seed: bytes = ZERO_DIGEST) -> bytes:
    """The launch digest a log of :class:`LogEntry` (or their JSON dicts) produces."""
    digest = seed
    for entry in log:
        if isinstance(entry, dict):
            entry = LogEntry.from_json(entry)
        v1, v2, v3 = entry.vmpl_perms
        digest = hashlib.sha384(page_info(digest, entry.contents_sha384 or ZERO_DIGEST,
                                          entry.page_type, entry.gpa, imi=entry.imi,
                                          vmpl3=v3, vmpl2=v2, vmpl1=v1)).digest()
    return digest


__all__ = ["INITIAL_VMSA_GPA", "LD_SIZE", "LaunchDigest", "LogEntry", "PAGE_INFO_LEN",
           "PageType", "ZERO_DIGEST", "page_info", "replay"]
