"""The SEV-SNP guest policy: a u64 bound to the guest at SNP_LAUNCH_START.

Layout (SNP ABI 56860 "GUEST_POLICY"; docs/facts.md#facts-11g; the kernel's ``SNP_POLICY_MASK_*``
and KVM's ``KVM_SNP_POLICY_MASK_VALID`` in ``arch/x86/kvm/svm/sev.c``)::

    7:0   ABI_MINOR   minimum firmware ABI minor version the guest accepts
    15:8  ABI_MAJOR   minimum firmware ABI major version
    16    SMT         SMT may be enabled on the host
    17    RSVD_MBO    reserved, must be one
    18    MIGRATE_MA  a migration agent may be associated
    19    DEBUG       SNP_DBG_DECRYPT/ENCRYPT allowed
    20    SINGLE_SOCKET  the guest may be activated on one socket only
    21    CXL_ALLOW   CXL memory may back the guest
    22    MEM_AES_256_XTS  AES-256-XTS memory encryption required
    23    RAPL_DIS    running-average power limit must be disabled
    24    CIPHERTEXT_HIDING  ciphertext hiding (DRAM) must be enabled
    25    PAGE_SWAP_DISABLE  SNP_PAGE_MOVE/SWAP refused
    63:26 reserved, must be zero

Two layers check it, in this order, as on a real host:

* KVM (``snp_launch_start``): ``flags`` must be 0, no bit outside what the
  platform and KVM support (``snp_supported_policy_bits``), bit 17 set; each
  failure is ``-EINVAL`` and the firmware is never called.  :meth:`kvm_check`.
* the firmware (SNP_LAUNCH_START): the ABI minimum against its own ABI
  version, SMT against the platform's SMT state, the features against what
  the platform enables.  :meth:`firmware_check` returns ``POLICY_FAILURE`` with
  the reason.  (Which status a firmware gives for a reserved bit it sees is
  not in any source we hold: it cannot see one through KVM, which refuses
  it first; the model answers ``POLICY_FAILURE`` there too.)
"""

from __future__ import annotations

import dataclasses
import enum

from ..errors import UsageError
from ..sev.status import SevStatus


class SnpPolicyBit(enum.IntFlag):
    SMT = 1 << 16
    RSVD_MBO = 1 << 17
    MIGRATE_MA = 1 << 18
    DEBUG = 1 << 19
    SINGLE_SOCKET = 1 << 20
    CXL_ALLOW = 1 << 21
    MEM_AES_256_XTS = 1 << 22
    RAPL_DIS = 1 << 23
    CIPHERTEXT_HIDING = 1 << 24
    PAGE_SWAP_DISABLE = 1 << 25


ABI_MINOR_MASK = 0xFF
ABI_MAJOR_MASK = 0xFF00
DEFINED_MASK = ABI_MINOR_MASK | ABI_MAJOR_MASK | sum(int(b) for b in SnpPolicyBit)
RESERVED_MASK = ~DEFINED_MASK & 0xFFFF_FFFF_FFFF_FFFF  # bits 63:26

# KVM_SNP_POLICY_MASK_VALID (sev.c): every defined bit except MIGRATE_MA.
KVM_POLICY_MASK_VALID = DEFINED_MASK & ~int(SnpPolicyBit.MIGRATE_MA)

_NAMES = {b.name.lower().replace("_", "-"): b for b in SnpPolicyBit}
# The KVM selftests' default (docs/facts.md#facts-11g): bit 17, plus SMT when the host has SMT on.
DEFAULT_POLICY = int(SnpPolicyBit.RSVD_MBO | SnpPolicyBit.SMT)


@dataclasses.dataclass(frozen=True)
class PlatformFeatures:
    """What the platform (firmware + CPU) has, for the firmware's policy checks."""

    abi_major: int = 1
    abi_minor: int = 55
    smt_enabled: bool = True
    aes_256_xts: bool = True
    rapl_disabled: bool = False
    ciphertext_hiding: bool = False
    sockets: int = 1


@dataclasses.dataclass(frozen=True)
class SnpPolicy:
    """A u64 SNP guest policy.

    >>> p = SnpPolicy.parse("smt,rsvd-mbo")
    >>> hex(p.value), p.smt, p.debug
    ('0x30000', True, False)
    >>> str(SnpPolicy(0x30000 | 1 << 19))
    'smt,rsvd-mbo,debug'
    """

    value: int

    def __post_init__(self):
        if not 0 <= int(self.value) <= 0xFFFF_FFFF_FFFF_FFFF:
            raise UsageError(f"SNP policy {self.value:#x} does not fit in 64 bits")
        object.__setattr__(self, "value", int(self.value))

    @classmethod
    def parse(cls, text: str | int) -> "SnpPolicy":
        """A number (``0x30000``) or comma-separated bit names (``smt,rsvd-mbo,debug``),
        optionally with ``abi=MAJOR.MINOR``."""
        if isinstance(text, int):
            return cls(text)
        text = text.strip()
        try:
            return cls(int(text, 0))
        except ValueError:
            pass
        value = 0
        for part in filter(None, (p.strip().lower() for p in text.split(","))):
            if part.startswith("abi="):
                try:
                    major, minor = (int(x, 0) for x in part[4:].split("."))
                except ValueError:
                    raise UsageError(f"SNP policy: abi=MAJOR.MINOR, got {part!r}") from None
                if not (0 <= major <= 0xFF and 0 <= minor <= 0xFF):
                    raise UsageError(f"SNP policy: ABI {major}.{minor} does not fit in two bytes")
                value |= major << 8 | minor
            elif part in _NAMES:
                value |= int(_NAMES[part])
            else:
                raise UsageError(f"SNP policy: unknown bit {part!r} (known: "
                                 f"{', '.join(_NAMES)}, abi=MAJOR.MINOR, or a number)")
        return cls(value)

    # -- fields --------------------------------------------------------------------
    @property
    def abi_major(self) -> int:
        return (self.value >> 8) & 0xFF

    @property
    def abi_minor(self) -> int:
        return self.value & 0xFF

    def has(self, bit: SnpPolicyBit) -> bool:
        return bool(self.value & bit)

    smt = property(lambda self: self.has(SnpPolicyBit.SMT))
    rsvd_mbo = property(lambda self: self.has(SnpPolicyBit.RSVD_MBO))
    migrate_ma = property(lambda self: self.has(SnpPolicyBit.MIGRATE_MA))
    debug = property(lambda self: self.has(SnpPolicyBit.DEBUG))
    single_socket = property(lambda self: self.has(SnpPolicyBit.SINGLE_SOCKET))
    reserved = property(lambda self: self.value & RESERVED_MASK)

    def __str__(self) -> str:
        names = [n for n, b in _NAMES.items() if self.value & b]
        if self.abi_major or self.abi_minor:
            names.append(f"abi={self.abi_major}.{self.abi_minor}")
        if self.reserved:
            names.append(f"reserved={self.reserved:#x}")
        return ",".join(names) or "0"

    # -- checks --------------------------------------------------------------------
    def kvm_check(self, supported_bits: int = KVM_POLICY_MASK_VALID) -> str | None:
        """Why KVM's ``snp_launch_start`` refuses this policy with -EINVAL, or None.

        ``supported_bits`` is ``snp_supported_policy_bits`` (the firmware's
        supported bits AND ``KVM_SNP_POLICY_MASK_VALID``; KVM_GET_DEVICE_ATTR
        KVM_X86_SNP_POLICY_BITS reports it).
        """
        extra = self.value & ~supported_bits
        if extra:
            return f"policy bits {extra:#x} are not supported (supported {supported_bits:#x})"
        if not self.rsvd_mbo:
            return "policy bit 17 (reserved, must be one) is clear"
        return None

    def firmware_check(self, platform: PlatformFeatures,
                       ma_en: bool = False) -> tuple[SevStatus, str] | None:
        """SNP_LAUNCH_START's policy checks: (POLICY_FAILURE, reason) or None."""
        fail = SevStatus.POLICY_FAILURE
        if self.reserved or not self.rsvd_mbo:
            return fail, f"reserved policy bits wrong (63:26 = {self.reserved:#x}, 17 = {int(self.rsvd_mbo)})"
        if (self.abi_major, self.abi_minor) > (platform.abi_major, platform.abi_minor):
            return fail, (f"the guest needs ABI {self.abi_major}.{self.abi_minor}, the firmware "
                          f"is {platform.abi_major}.{platform.abi_minor}")
        if platform.smt_enabled and not self.smt:
            return fail, "SMT is enabled on the platform and the policy does not allow it"
        if ma_en and not self.migrate_ma:
            return fail, "a migration agent is requested (MA_EN) and the policy does not allow one"
        if self.has(SnpPolicyBit.MEM_AES_256_XTS) and not platform.aes_256_xts:
            return fail, "AES-256-XTS is required and the platform lacks it"
        if self.has(SnpPolicyBit.RAPL_DIS) and not platform.rapl_disabled:
            return fail, "RAPL must be disabled and it is not"
        if self.has(SnpPolicyBit.CIPHERTEXT_HIDING) and not platform.ciphertext_hiding:
            return fail, "ciphertext hiding is required and not enabled"
        if self.single_socket and platform.sockets > 1:
            return fail, "single-socket policy on a multi-socket platform"
        return None


__all__ = ["DEFAULT_POLICY", "KVM_POLICY_MASK_VALID", "PlatformFeatures", "SnpPolicy",
           "SnpPolicyBit"]
