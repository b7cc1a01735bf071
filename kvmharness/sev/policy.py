"""The SEV guest policy (a u32 bound to the guest at LAUNCH_START).

Layout (docs/facts.md#facts-11f, ``include/linux/psp-sev.h``): bits 0-5 are flags, bits 15:6
are reserved and must be 0, bits 23:16 and 31:24 are the minimum firmware API
major and minor version the guest accepts.
"""

from __future__ import annotations

import dataclasses
import enum

from ..errors import UsageError


class PolicyFlag(enum.IntFlag):
    """Policy flag bits 0-5."""

    NODBG = 1 << 0  # DBG_DECRYPT / DBG_ENCRYPT refused
    NOKS = 1 << 1  # no key sharing with other guests (LAUNCH_START handle != 0)
    ES = 1 << 2  # SEV-ES required
    NOSEND = 1 << 3  # SEND_* refused
    DOMAIN = 1 << 4  # send only within the domain (same OCA)
    SEV = 1 << 5  # send only to SEV-capable platforms


FLAGS_MASK = 0x3F
RESERVED_MASK = 0xFFC0  # bits 15:6
API_MAJOR_SHIFT = 16
API_MINOR_SHIFT = 24


@dataclasses.dataclass(frozen=True)
class GuestPolicy:
    """A SEV guest policy.

    >>> GuestPolicy.parse("nodbg,es").value
    5
    >>> str(GuestPolicy(0x37))
    'nodbg,noks,es,domain,sev'

    ``reserved`` keeps bits 15:6 as given so that a policy read back from
    firmware or a command line round-trips; :meth:`validate` rejects it.
    """

    # Fields (set by __init__ from the u32 or keywords):
    flags: PolicyFlag
    api_major: int
    api_minor: int
    reserved: int

    def __init__(self, value: int | PolicyFlag = 0, *, api_major: int | None = None,
                 api_minor: int | None = None):
        value = int(value)
        if not 0 <= value <= 0xFFFFFFFF:
            raise UsageError(f"SEV policy 0x{value:x} does not fit in 32 bits")
        object.__setattr__(self, "flags", PolicyFlag(value & FLAGS_MASK))
        object.__setattr__(self, "reserved", value & RESERVED_MASK)
        major = (value >> API_MAJOR_SHIFT) & 0xFF if api_major is None else api_major
        minor = (value >> API_MINOR_SHIFT) & 0xFF if api_minor is None else api_minor
        for name, v in (("api_major", major), ("api_minor", minor)):
            if not 0 <= v <= 0xFF:
                raise UsageError(f"SEV policy {name} {v} does not fit in 8 bits")
        object.__setattr__(self, "api_major", major)
        object.__setattr__(self, "api_minor", minor)

    @property
    def value(self) -> int:
        """The u32 the firmware sees."""
        return (int(self.flags) | self.reserved | self.api_major << API_MAJOR_SHIFT
                | self.api_minor << API_MINOR_SHIFT)

    def __int__(self) -> int:
        return self.value

    def to_bytes(self) -> bytes:
        """Little-endian u32, as hashed into the policy MAC and the measurement."""
        return self.value.to_bytes(4, "little")

    def __contains__(self, flag: PolicyFlag) -> bool:
        return bool(self.flags & flag)

    @property
    def nodbg(self) -> bool:
        return PolicyFlag.NODBG in self.flags

    @property
    def es(self) -> bool:
        return PolicyFlag.ES in self.flags

    @property
    def noks(self) -> bool:
        return PolicyFlag.NOKS in self.flags

    def validate(self) -> None:
        """Raise :class:`UsageError` if reserved bits 15:6 are set."""
        if self.reserved:
            raise UsageError(f"SEV policy 0x{self.value:08x} sets reserved bits 15:6 "
                             f"(0x{self.reserved:04x}); they must be 0")

    def api_satisfied_by(self, major: int, minor: int) -> bool:
        """True if firmware API ``major.minor`` meets the policy's minimum."""
        return (major, minor) >= (self.api_major, self.api_minor)

    @classmethod
    def parse(cls, text: str) -> GuestPolicy:
        """Parse ``"nodbg,es"``, ``"0x5"``, ``"5"`` or ``"nodbg,api=1.55"``.

        ``reserved=0x..`` sets reserved bits (only to reproduce a bad policy).

        An empty string or ``"none"`` is policy 0.  Unknown words raise
        :class:`UsageError` naming the accepted ones.
        """
        text = text.strip().lower()
        if not text or text == "none":
            return cls(0)
        try:
            return cls(int(text, 0))
        except ValueError:
            pass
        flags = PolicyFlag(0)
        major = minor = reserved = 0
        for word in filter(None, (w.strip() for w in text.replace("|", ",").split(","))):
            if word.startswith("api="):
                try:
                    major_s, minor_s = word[4:].split(".")
                    major, minor = int(major_s, 0), int(minor_s, 0)
                except ValueError:
                    raise UsageError(f"bad SEV policy API version {word!r}; "
                                     "write api=MAJOR.MINOR, e.g. api=1.55") from None
                continue
            if word.startswith("reserved="):
                try:
                    reserved = int(word[9:], 0)
                except ValueError:
                    reserved = -1
                if reserved & ~RESERVED_MASK:
                    raise UsageError(f"bad {word!r}: reserved bits are 15:6 (mask 0xffc0)")
                continue
            try:
                flags |= PolicyFlag[word.upper()]
            except KeyError:
                names = ", ".join(f.name.lower() for f in PolicyFlag)
                raise UsageError(f"unknown SEV policy flag {word!r}; known: {names}, "
                                 "api=MAJOR.MINOR, or a number") from None
        return cls(int(flags) | reserved, api_major=major, api_minor=minor)

    def __str__(self) -> str:
        words = [f.name.lower() for f in PolicyFlag if f in self.flags]
        if self.api_major or self.api_minor:
            words.append(f"api={self.api_major}.{self.api_minor}")
        if self.reserved:
            words.append(f"reserved=0x{self.reserved:x}")
        return ",".join(words) if words else "none"

    def __repr__(self) -> str:
        return f"GuestPolicy(0x{self.value:x}: {self})"
