"""Guest images and their manifest (``guests/manifest.toml``).

One manifest says, per guest, how to enter it and what it needs (the
kvm-unit-tests ``unittests.cfg`` idea).  Everything here is checked before any
VM is made: a missing image, an image larger than its memory or a malformed
entry is a :class:`GuestImageError` naming the guest and the field.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import GuestImageError
from .protocol import GUEST_LOAD_ADDR
from .x86 import CpuidEntry

MODES = ("real", "long64")
EXPECTS = ("done", "hlt", "shutdown", "timeout", "fail", "sev-terminated")
NEEDS = ("user-msr-exits", "svm", "sev", "sev-es", "nested")
BACKEND_NAMES = ("kvm", "sim")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)
_KNOWN_KEYS = {"source", "mode", "memory", "timeout", "needs", "description", "expect", "cpuid",
               "user_msrs", "unsupported"}


def guests_dir() -> Path:
    """The guests/ directory: installed package data, or the source tree."""
    try:
        p = Path(str(resources.files("kvmharness.guests")))
        if (p / "manifest.toml").is_file():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "guests"


def parse_size(text: str | int, *, what: str) -> int:
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise GuestImageError(f"{what}: cannot read size {text!r} (write e.g. '2M', '512K')")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(m.group(1)) * mult


@dataclass(frozen=True)
class GuestImage:
    """One manifest entry plus where its flat binary lives."""

    name: str
    mode: str
    memory: int
    timeout: float
    expect: str
    path: Path
    source: Path
    description: str = ""
    needs: tuple = ()
    cpuid: tuple = ()  # CpuidEntry overrides
    user_msrs: tuple = ()
    unsupported: dict = field(default_factory=dict)  # backend -> reason

    def load(self) -> bytes:
        """The image bytes, checked against the guest memory size."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise GuestImageError(
                f"guest {self.name!r}: image {self.path} is missing "
                "(rebuild the images with: python guests/build.py)") from None
        if not data:
            raise GuestImageError(f"guest {self.name!r}: image {self.path} is empty")
        if GUEST_LOAD_ADDR + len(data) > self.memory:
            raise GuestImageError(
                f"guest {self.name!r}: image is {len(data)} bytes but only "
                f"{self.memory - GUEST_LOAD_ADDR} fit above the load address {GUEST_LOAD_ADDR:#x} "
                f"in {self.memory // 1024} KiB of guest memory")
        return data

    def runnable_on(self, backend: str) -> tuple[bool, str]:
        if backend in self.unsupported:
            return False, self.unsupported[backend]
        return True, ""

    def to_dict(self) -> dict:
        return {"name": self.name, "mode": self.mode, "memory": self.memory, "timeout": self.timeout,
                "expect": self.expect, "needs": list(self.needs), "description": self.description,
                "unsupported": dict(self.unsupported)}


def _entry(name: str, raw: dict, root: Path) -> GuestImage:
    where = f"manifest entry [{name}]"
    if not isinstance(raw, dict):
        raise GuestImageError(f"{where}: must be a table")
    unknown = set(raw) - _KNOWN_KEYS
    if unknown:
        raise GuestImageError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(_KNOWN_KEYS)}")
    mode = raw.get("mode")
    if mode not in MODES:
        raise GuestImageError(f"{where}: mode must be one of {MODES}, not {mode!r}")
    expect = raw.get("expect", "done")
    if expect not in EXPECTS:
        raise GuestImageError(f"{where}: expect must be one of {EXPECTS}, not {expect!r}")
    needs = tuple(raw.get("needs", ()))
    bad = [n for n in needs if n not in NEEDS]
    if bad:
        raise GuestImageError(f"{where}: unknown needs {bad}; known: {NEEDS}")
    try:
        timeout = float(raw.get("timeout", 10))
    except (TypeError, ValueError):
        raise GuestImageError(f"{where}: timeout must be a number of seconds") from None
    if timeout <= 0:
        raise GuestImageError(f"{where}: timeout must be positive")
    memory = parse_size(raw.get("memory", "2M"), what=f"{where}: memory")
    if memory < 0x10000 or memory % 4096:
        raise GuestImageError(f"{where}: memory must be a multiple of 4 KiB and at least 64 KiB")
    cpuid = []
    for i, c in enumerate(raw.get("cpuid", ())):
        try:
            cpuid.append(CpuidEntry(function=int(c["function"]), index=int(c.get("index", 0)),
                                    flags=1 if "index" in c else 0,
                                    eax=int(c.get("eax", 0)), ebx=int(c.get("ebx", 0)),
                                    ecx=int(c.get("ecx", 0)), edx=int(c.get("edx", 0))))
        except (KeyError, TypeError, ValueError) as e:
            raise GuestImageError(f"{where}: cpuid[{i}] is malformed ({e}); "
                                  "write {function = 0x..., eax = ..., ...}") from None
    unsupported = raw.get("unsupported", {})
    if not isinstance(unsupported, dict) or any(k not in BACKEND_NAMES for k in unsupported):
        raise GuestImageError(f"{where}: unsupported must map backend names {BACKEND_NAMES} to reasons")
    source = root / raw.get("source", f"src/{name}.S")
    return GuestImage(name=name, mode=mode, memory=memory, timeout=timeout, expect=expect,
                      path=root / "bin" / f"{name}.bin", source=source,
                      description=str(raw.get("description", "")), needs=needs, cpuid=tuple(cpuid),
                      user_msrs=tuple(int(m) for m in raw.get("user_msrs", ())),
                      unsupported=dict(unsupported))


def load_manifest(path: Path | None = None) -> dict[str, GuestImage]:
    """All guests of a manifest (default: the shipped one), by name."""
    path = Path(path) if path else guests_dir() / "manifest.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise GuestImageError(f"guest manifest {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise GuestImageError(f"guest manifest {path} is not valid TOML: {e}") from None
    table = data.get("guest", data)
    return {name: _entry(name, raw, path.parent) for name, raw in table.items()}


def get_guest(name: str, manifest: dict | None = None) -> GuestImage:
    guests = manifest if manifest is not None else load_manifest()
    try:
        return guests[name]
    except KeyError:
        raise GuestImageError(
            f"unknown guest {name!r}; known guests: {', '.join(sorted(guests))} "
            "(see: kvmharness guests)") from None
