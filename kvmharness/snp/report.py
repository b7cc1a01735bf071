"""The SEV-SNP ATTESTATION_REPORT: parse and build, byte for byte.

AMD SEV-SNP firmware ABI (spec 56860), "ATTESTATION_REPORT Structure"; the
layout below was checked field by field against virtee/sev
(``src/firmware/guest/types/snp.rs``) and google/go-sev-guest
(``abi/abi.go``), and against real reports from Milan (v2, v3), Genoa (v3) and
Turin (v5) in ``tests/data/snp/``.  Little-endian throughout; 0x4A0 bytes:

    0x000 u32 VERSION (2; 3 adds CPUID_FAM/MOD/STEP; 5 adds the MIT vectors)
    0x004 u32 GUEST_SVN            0x008 u64 POLICY
    0x010 u8[16] FAMILY_ID         0x020 u8[16] IMAGE_ID
    0x030 u32 VMPL                 0x034 u32 SIGNATURE_ALGO (1 = ECDSA P-384/SHA-384)
    0x038 u64 CURRENT_TCB          0x040 u64 PLATFORM_INFO
    0x048 u32 flags: bit 0 AUTHOR_KEY_EN, bit 1 MASK_CHIP_KEY, bits 4:2 SIGNING_KEY
              (0 VCEK, 1 VLEK, 7 none)
    0x04C u32 reserved
    0x050 u8[64] REPORT_DATA       0x090 u8[48] MEASUREMENT
    0x0C0 u8[32] HOST_DATA         0x0E0 u8[48] ID_KEY_DIGEST
    0x110 u8[48] AUTHOR_KEY_DIGEST 0x140 u8[32] REPORT_ID
    0x160 u8[32] REPORT_ID_MA      0x180 u64 REPORTED_TCB
    0x188 u8 CPUID_FAM_ID, 0x189 u8 CPUID_MOD_ID, 0x18A u8 CPUID_STEP (v3+; zero in v2)
    0x1A0 u8[64] CHIP_ID (zero if MASK_CHIP_ID; Turin uses the first 8 bytes)
    0x1E0 u64 COMMITTED_TCB
    0x1E8 u8 CURRENT_BUILD, 0x1E9 CURRENT_MINOR, 0x1EA CURRENT_MAJOR, 0x1EB reserved
    0x1EC u8 COMMITTED_BUILD, 0x1ED COMMITTED_MINOR, 0x1EE COMMITTED_MAJOR, 0x1EF reserved
    0x1F0 u64 LAUNCH_TCB
    0x1F8 u64 LAUNCH_MIT_VECTOR, 0x200 u64 CURRENT_MIT_VECTOR (v5+)
    0x2A0 SIGNATURE: R u8[72], S u8[72] (little-endian, zero padded), 368 reserved

The signature covers bytes 0x000-0x29F.

A TCB_VERSION is 8 bytes whose layout depends on the generation:
Milan and Genoa put BOOT_LOADER, TEE, SNP, MICROCODE at bytes 0, 1, 6, 7;
Turin puts FMC, BOOT_LOADER, TEE, SNP, MICROCODE at bytes 0, 1, 2, 3, 7.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

from .. import errors as E
from .policy import SnpPolicyBit  # the guest POLICY bits above ABI_MINOR/ABI_MAJOR

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0  # the signature covers bytes [0, SIGNED_SIZE)
SIGNATURE_OFFSET = 0x2A0
SIG_COMPONENT_SIZE = 72  # R and S, each little-endian, zero padded
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
SUPPORTED_VERSIONS = (2, 3, 4, 5)


class ReportFormatError(E.UsageError):
    """A file is not an ATTESTATION_REPORT (wrong size, unknown version, bad field)."""


class Generation(str, enum.Enum):
    """An EPYC generation with SEV-SNP: decides the TCB layout and AMD's root keys."""

    MILAN = "milan"
    GENOA = "genoa"
    TURIN = "turin"

    @classmethod
    def parse(cls, text: str) -> "Generation":
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise E.UsageError(f"unknown processor {text!r}: expected milan, genoa or turin") from None

    @classmethod
    def from_product_name(cls, name: str) -> "Generation | None":
        """The VCEK's productName ("Milan-B0", "Genoa", "Turin") -> the generation."""
        head = name.split("-", 1)[0].strip().lower()
        try:
            return cls(head)
        except ValueError:
            return None

    @classmethod
    def from_cpuid(cls, family: int, model: int) -> "Generation | None":
        """CPUID family/model as a v3+ report carries them (0 in v2 reports).

        Family 19h models 00h-0Fh are Milan (Zen 3), 10h-1Fh and A0h-AFh Genoa
        and its Bergamo/Siena variants (Zen 4); family 1Ah models 00h-1Fh are
        Turin (Zen 5).
        """
        if family == 0x19:
            if model <= 0x0F:
                return cls.MILAN
            if 0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF:
                return cls.GENOA
        if family == 0x1A and model <= 0x1F:
            return cls.TURIN
        return None

    @property
    def product_name(self) -> str:
        """What AMD's KDS puts in the VCEK's productName extension."""
        return {"milan": "Milan-B0", "genoa": "Genoa", "turin": "Turin"}[self.value]

    @property
    def title(self) -> str:
        return self.value.capitalize()


@dataclasses.dataclass(frozen=True)
class TcbVersion:
    """A TCB_VERSION: the security patch levels (SPLs) of each firmware layer.

    ``fmc`` (the Turin FMC) is None on Milan and Genoa, which have no such field.
    """

    bootloader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: int | bytes, generation: Generation) -> "TcbVersion":
        b = raw.to_bytes(8, "little") if isinstance(raw, int) else bytes(raw)
        if len(b) != 8:
            raise ValueError("a TCB_VERSION is 8 bytes")
        if generation is Generation.TURIN:
            return cls(fmc=b[0], bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7])
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def encode(self, generation: Generation) -> bytes:
        b = bytearray(8)
        if generation is Generation.TURIN:
            b[0], b[1], b[2], b[3], b[7] = (self.fmc or 0, self.bootloader, self.tee, self.snp,
                                            self.microcode)
        else:
            if self.fmc:
                raise ValueError(f"{generation.title} has no FMC field in its TCB_VERSION")
            b[0], b[1], b[6], b[7] = self.bootloader, self.tee, self.snp, self.microcode
        return bytes(b)

    def raw(self, generation: Generation) -> int:
        return int.from_bytes(self.encode(generation), "little")

    def as_dict(self) -> dict:
        d = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp,
             "microcode": self.microcode}
        if self.fmc is not None:
            d = {"fmc": self.fmc, **d}
        return d

    def __str__(self) -> str:
        parts = ([f"fmc={self.fmc}"] if self.fmc is not None else []) + [
            f"bl={self.bootloader}", f"tee={self.tee}", f"snp={self.snp}", f"ucode={self.microcode}"]
        return " ".join(parts)


class PlatformInfoBit(enum.IntFlag):
    """PLATFORM_INFO bits."""

    SMT_EN = 1 << 0
    TSME_EN = 1 << 1
    ECC_EN = 1 << 2
    RAPL_DIS = 1 << 3
    CIPHERTEXT_HIDING_EN = 1 << 4
    ALIAS_CHECK_COMPLETE = 1 << 5
    TIO_EN = 1 << 7


class SigningKey(enum.IntEnum):
    VCEK = 0
    VLEK = 1
    NONE = 7


def _flag_names(value: int, flags) -> list[str]:
    return [f.name.lower() for f in flags if value & f.value]


def policy_summary(policy: int) -> dict:
    return {"value": f"0x{policy:x}", "abi": f"{(policy >> 8) & 0xFF}.{policy & 0xFF}",
            "flags": _flag_names(policy, SnpPolicyBit)}


@dataclasses.dataclass
class AttestationReport:
    """Every field of an ATTESTATION_REPORT (see the module docstring for offsets).

    TCB fields are kept as raw u64s (what is signed); :meth:`tcb` decodes one for
    a generation.  ``signature_r``/``signature_s`` are the integers R and S.
    Fields are stored as given: :meth:`to_bytes` writes exactly them, so a
    parsed report serializes to the same bytes it came from.
    """

    version: int = 2
    guest_svn: int = 0
    policy: int = 0x30000  # SMT allowed and the must-be-one bit, ABI 0.0
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    vmpl: int = 0
    signature_algo: int = SIGNATURE_ALGO_ECDSA_P384_SHA384
    current_tcb: int = 0
    platform_info: int = 0
    author_key_en: bool = False
    mask_chip_key: bool = False
    signing_key: int = SigningKey.VCEK
    report_data: bytes = bytes(64)
    measurement: bytes = bytes(48)
    host_data: bytes = bytes(32)
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    report_id: bytes = bytes(32)
    report_id_ma: bytes = bytes(32)
    reported_tcb: int = 0
    cpuid_fam_id: int = 0
    cpuid_mod_id: int = 0
    cpuid_step: int = 0
    chip_id: bytes = bytes(64)
    committed_tcb: int = 0
    current_build: int = 0
    current_minor: int = 0
    current_major: int = 0
    committed_build: int = 0
    committed_minor: int = 0
    committed_major: int = 0
    launch_tcb: int = 0
    launch_mit_vector: int = 0
    current_mit_vector: int = 0
    signature_r: int = 0
    signature_s: int = 0
    flags_reserved: int = 0  # bits 31:5 of the flags word (must be zero)

    _SIZES = {"family_id": 16, "image_id": 16, "report_data": 64, "measurement": 48,
              "host_data": 32, "id_key_digest": 48, "author_key_digest": 48, "report_id": 32,
              "report_id_ma": 32, "chip_id": 64}

    # -- bytes -> report -------------------------------------------------------------------
    @classmethod
    def parse(cls, data: bytes) -> "AttestationReport":
        data = bytes(data)
        if len(data) != REPORT_SIZE:
            raise ReportFormatError(f"an attestation report is {REPORT_SIZE} (0x{REPORT_SIZE:x}) "
                                    f"bytes, this is {len(data)}")
        version = struct.unpack_from("<I", data, 0)[0]
        if version not in SUPPORTED_VERSIONS:
            raise ReportFormatError(f"attestation report version {version} is not one this "
                                    f"verifier knows (2, 3, 4, 5)")
        u32 = lambda off: struct.unpack_from("<I", data, off)[0]  # noqa: E731
        u64 = lambda off: struct.unpack_from("<Q", data, off)[0]  # noqa: E731
        flags = u32(0x48)
        v3 = version >= 3
        v5 = version >= 5
        return cls(
            version=version, guest_svn=u32(0x04), policy=u64(0x08),
            family_id=data[0x10:0x20], image_id=data[0x20:0x30], vmpl=u32(0x30),
            signature_algo=u32(0x34), current_tcb=u64(0x38), platform_info=u64(0x40),
            author_key_en=bool(flags & 1), mask_chip_key=bool(flags & 2),
            signing_key=(flags >> 2) & 7, flags_reserved=flags >> 5,
            report_data=data[0x50:0x90], measurement=data[0x90:0xC0], host_data=data[0xC0:0xE0],
            id_key_digest=data[0xE0:0x110], author_key_digest=data[0x110:0x140],
            report_id=data[0x140:0x160], report_id_ma=data[0x160:0x180], reported_tcb=u64(0x180),
            cpuid_fam_id=data[0x188] if v3 else 0, cpuid_mod_id=data[0x189] if v3 else 0,
            cpuid_step=data[0x18A] if v3 else 0,
            chip_id=data[0x1A0:0x1E0], committed_tcb=u64(0x1E0),
            current_build=data[0x1E8], current_minor=data[0x1E9], current_major=data[0x1EA],
            committed_build=data[0x1EC], committed_minor=data[0x1ED], committed_major=data[0x1EE],
            launch_tcb=u64(0x1F0),
            launch_mit_vector=u64(0x1F8) if v5 else 0, current_mit_vector=u64(0x200) if v5 else 0,
            signature_r=int.from_bytes(data[0x2A0:0x2A0 + SIG_COMPONENT_SIZE], "little"),
            signature_s=int.from_bytes(data[0x2E8:0x2E8 + SIG_COMPONENT_SIZE], "little"),
        )

    # -- report -> bytes -------------------------------------------------------------------
    def body(self) -> bytes:
        """Bytes 0x000-0x29F: what the firmware signs."""
        for name, size in self._SIZES.items():
            value = getattr(self, name)
            if len(value) != size:
                raise ValueError(f"{name} must be {size} bytes, not {len(value)}")
        if self.version not in SUPPORTED_VERSIONS:
            raise ValueError(f"report version {self.version} is not 2, 3, 4 or 5")
        if not 0 <= self.signing_key <= 7:
            raise ValueError("signing_key is a 3-bit field")
        b = bytearray(SIGNED_SIZE)
        struct.pack_into("<IIQ", b, 0x00, self.version, self.guest_svn, self.policy)
        b[0x10:0x20] = self.family_id
        b[0x20:0x30] = self.image_id
        struct.pack_into("<IIQQ", b, 0x30, self.vmpl, self.signature_algo, self.current_tcb,
                         self.platform_info)
        flags = (int(self.author_key_en) | int(self.mask_chip_key) << 1 | int(self.signing_key) << 2
                 | self.flags_reserved << 5)
        struct.pack_into("<I", b, 0x48, flags)
        b[0x50:0x90] = self.report_data
        b[0x90:0xC0] = self.measurement
        b[0xC0:0xE0] = self.host_data
        b[0xE0:0x110] = self.id_key_digest
        b[0x110:0x140] = self.author_key_digest
        b[0x140:0x160] = self.report_id
        b[0x160:0x180] = self.report_id_ma
        struct.pack_into("<Q", b, 0x180, self.reported_tcb)
        if self.version >= 3:
            b[0x188:0x18B] = bytes((self.cpuid_fam_id, self.cpuid_mod_id, self.cpuid_step))
        b[0x1A0:0x1E0] = self.chip_id
        struct.pack_into("<Q", b, 0x1E0, self.committed_tcb)
        b[0x1E8:0x1EB] = bytes((self.current_build, self.current_minor, self.current_major))
        b[0x1EC:0x1EF] = bytes((self.committed_build, self.committed_minor, self.committed_major))
        struct.pack_into("<Q", b, 0x1F0, self.launch_tcb)
        if self.version >= 5:
            struct.pack_into("<QQ", b, 0x1F8, self.launch_mit_vector, self.current_mit_vector)
        return bytes(b)

    def signature_bytes(self) -> bytes:
        """The 0x200-byte signature area: R, S (72 bytes each, LE), then zeros."""
        return (self.signature_r.to_bytes(SIG_COMPONENT_SIZE, "little")
                + self.signature_s.to_bytes(SIG_COMPONENT_SIZE, "little")
                + bytes(REPORT_SIZE - SIGNATURE_OFFSET - 2 * SIG_COMPONENT_SIZE))

    def to_bytes(self) -> bytes:
        return self.body() + self.signature_bytes()

    # -- decoding helpers ------------------------------------------------------------------
    def generation_from_cpuid(self) -> Generation | None:
        if self.version < 3:
            return None
        return Generation.from_cpuid(self.cpuid_fam_id, self.cpuid_mod_id)

    def tcb(self, name: str, generation: Generation) -> TcbVersion:
        """Decode one of current_tcb, reported_tcb, committed_tcb, launch_tcb."""
        return TcbVersion.decode(getattr(self, name), generation)

    def hw_id(self, generation: Generation) -> bytes:
        """The part of CHIP_ID the VCEK's hwID extension carries (8 bytes on Turin)."""
        return self.chip_id[:8] if generation is Generation.TURIN else self.chip_id

    def to_dict(self, generation: Generation | None = None) -> dict:
        d: dict = {"version": self.version, "guest_svn": self.guest_svn,
                   "policy": policy_summary(self.policy), "family_id": self.family_id.hex(),
                   "image_id": self.image_id.hex(), "vmpl": self.vmpl,
                   "signature_algo": self.signature_algo}
        for name in ("current_tcb", "reported_tcb", "committed_tcb", "launch_tcb"):
            raw = getattr(self, name)
            d[name] = ({"raw": f"0x{raw:016x}", **self.tcb(name, generation).as_dict()}
                       if generation else {"raw": f"0x{raw:016x}"})
        d["platform_info"] = {"value": f"0x{self.platform_info:x}",
                              "flags": _flag_names(self.platform_info, PlatformInfoBit)}
        d["flags"] = {"author_key_en": self.author_key_en, "mask_chip_key": self.mask_chip_key,
                      "signing_key": (SigningKey(self.signing_key).name
                                      if self.signing_key in set(SigningKey) else self.signing_key)}
        for name in ("report_data", "measurement", "host_data", "id_key_digest",
                     "author_key_digest", "report_id", "report_id_ma", "chip_id"):
            d[name] = getattr(self, name).hex()
        if self.version >= 3:
            d["cpuid"] = {"family": self.cpuid_fam_id, "model": self.cpuid_mod_id,
                          "stepping": self.cpuid_step}
        d["current_version"] = f"{self.current_major}.{self.current_minor}.{self.current_build}"
        d["committed_version"] = (f"{self.committed_major}.{self.committed_minor}."
                                  f"{self.committed_build}")
        if self.version >= 5:
            d["launch_mit_vector"] = f"0x{self.launch_mit_vector:x}"
            d["current_mit_vector"] = f"0x{self.current_mit_vector:x}"
        d["signature"] = {"r": f"{self.signature_r:x}", "s": f"{self.signature_s:x}"}
        return d
