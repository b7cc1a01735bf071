"""Guest images and their manifest (``guests/manifest.toml``).

One manifest says, per guest, how to enter it, what it needs from the host and in
which run modes it works (the kvm-unit-tests ``unittests.cfg`` idea).  Everything
here is checked before any VM is made: a missing image, an image larger than its
memory or a malformed entry is a :class:`GuestImageError` naming the guest, the
field and what is allowed.

The manifest holds no fact about any host.  Whether a guest can run on a backend
is decided when it runs, by probing that backend for what the guest ``needs``
(:meth:`GuestImage.runnable_on`, :func:`kvmharness.hostinfo.need_status`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

from .datafiles import data_path
from .errors import GuestImageError
from .protocol import GUEST_LOAD_ADDR
from .x86 import CpuidEntry

MODES = ("real", "long64")  # entry modes
RUN_MODES = ("svm", "sev", "sev-es", "sev-snp")  # how a guest is launched (run --mode)
EXPECTS = ("done", "hlt", "shutdown", "timeout", "fail", "sev-terminated")
NEEDS = ("user-msr-exits", "svm", "sev", "sev-es", "sev-snp", "nested")
BACKEND_NAMES = ("kvm", "sim")
#: the policy a launch uses when the caller gives none: ``run`` and ``measure`` alike,
#: so ``measure --tik --nonce`` predicts a default run
DEFAULT_SEV_POLICY = {"sev": "nodbg", "sev-es": "nodbg,es"}
MAX_TIMEOUT = 86400.0  # one day, as the watchdog allows
MIN_MEMORY = 0x10000
MAX_MEMORY = 64 << 30
U32 = 1 << 32
_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)i?B?\s*$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KNOWN_KEYS = ("source", "mode", "memory", "timeout", "needs", "modes", "description", "expect",
               "cpuid", "user_msrs")
_CPUID_KEYS = ("function", "index", "eax", "ebx", "ecx", "edx")


def guests_dir() -> Path:
    """The guests/ directory: installed package data, or the source tree."""
    return data_path("guests", "manifest.toml").parent


def parse_size(text: str | int, *, what: str) -> int:
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise GuestImageError(f"{what}: a size is a string like '2M' or a whole number of bytes, "
                              f"not {text!r}")
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise GuestImageError(f"{what}: cannot read size {text!r} (write e.g. '2M', '512K')")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(m.group(1)) * mult


def default_modes(needs) -> tuple:
    """The run modes a guest declares when its entry has no ``modes`` key."""
    if "sev-snp" in needs:
        return ("sev-snp",)  # PVALIDATE, the RMP, page-state changes: only an SNP launch
    if "sev-es" in needs:
        return ("sev-es",)  # it talks to the host through the GHCB: only an SEV-ES launch
    if "sev" in needs:
        return ("sev",)  # it uses the C-bit; it has no #VC handler
    if "svm" in needs or "nested" in needs:
        return ("svm",)  # KVM offers no nested SVM inside an SEV guest
    return ("svm", "sev")  # a plain guest runs unchanged as an SEV guest (no #VC handler)


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
    modes: tuple = ("svm", "sev")  # run modes, default first

    @property
    def default_mode(self) -> str:
        return self.modes[0]

    def check_mode(self, mode: str) -> None:
        """Refuse (UsageError, exit 2) a run mode this guest's manifest does not declare."""
        if mode not in self.modes:
            raise GuestImageError(
                f"guest {self.name!r} does not run in {mode} mode: its manifest declares "
                f"modes {', '.join(self.modes)} (run it with --mode {self.default_mode})")

    def load(self) -> bytes:
        """The image bytes, checked against the guest memory size."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            raise GuestImageError(
                f"guest {self.name!r}: image {self.path} is missing "
                "(rebuild the images with: python guests/build.py)") from None
        except OSError as e:
            raise GuestImageError(f"guest {self.name!r}: cannot read image {self.path}: "
                                  f"{e.strerror or e}") from None
        if not data:
            raise GuestImageError(f"guest {self.name!r}: image {self.path} is empty")
        if GUEST_LOAD_ADDR + len(data) > self.memory:
            raise GuestImageError(
                f"guest {self.name!r}: image is {len(data)} bytes but only "
                f"{self.memory - GUEST_LOAD_ADDR} fit above the load address {GUEST_LOAD_ADDR:#x} "
                f"in {self.memory // 1024} KiB of guest memory")
        return data

    def runnable_on(self, backend) -> tuple[bool, str]:
        """Whether this guest can run on ``backend`` (a ``System``, or a backend name that is
        opened for the probe) on this host now: each of its needs, probed; (ok, why not)."""
        from .backend import System
        from .errors import HarnessError
        from .factory import open_backend
        from .hostinfo import unmet_needs

        if isinstance(backend, System):
            unmet = unmet_needs(backend, self.needs)
        else:
            try:
                system = open_backend(backend)
            except HarnessError as e:
                return False, f"the {backend} backend is unavailable: {e}"
            try:
                unmet = unmet_needs(system, self.needs)
            finally:
                system.close()
        if unmet:
            return False, "; ".join(f"needs {n}: {why}" for n, why in unmet)
        return True, ""

    def to_dict(self) -> dict:
        return {"name": self.name, "mode": self.mode, "memory": self.memory, "timeout": self.timeout,
                "expect": self.expect, "needs": list(self.needs), "modes": list(self.modes),
                "description": self.description}


# -- validation: one function per field, each error naming guest, field and what is allowed --

def _int(value, where: str, field: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GuestImageError(f"{where}: {field} must be a whole number from {lo:#x} to {hi - 1:#x}, "
                              f"not {value!r}")
    if not lo <= value < hi:
        raise GuestImageError(f"{where}: {field} must be from {lo:#x} to {hi - 1:#x} "
                              f"(a 32-bit value), not {value:#x}" if hi == U32 else
                              f"{where}: {field} must be from {lo} to {hi - 1}, not {value}")
    return value


def _str(value, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise GuestImageError(f"{where}: {field} must be a string, not {value!r}")
    return value


def _choice(value, where: str, field: str, allowed: tuple) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise GuestImageError(f"{where}: {field} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _list(value, where: str, field: str, what: str) -> list:
    if not isinstance(value, list):
        raise GuestImageError(f"{where}: {field} must be a list of {what}, not {value!r}")
    return value


def _names(value, where: str, field: str, allowed: tuple) -> tuple:
    items = _list(value, where, field, f"names from {', '.join(allowed)}")
    for n in items:
        if not isinstance(n, str) or n not in allowed:
            raise GuestImageError(f"{where}: {field} may hold only {', '.join(allowed)}, not {n!r}")
    dups = sorted({n for n in items if items.count(n) > 1})
    if dups:
        raise GuestImageError(f"{where}: {field} lists {', '.join(dups)} more than once")
    return tuple(items)


def _timeout(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GuestImageError(f"{where}: timeout must be a number of seconds, not {value!r}")
    t = float(value)
    if not math.isfinite(t) or not 0 < t <= MAX_TIMEOUT:
        raise GuestImageError(f"{where}: timeout must be a finite number of seconds greater than 0 "
                              f"and at most {MAX_TIMEOUT:g}, not {value!r}")
    return t


def _memory(value, where: str) -> int:
    memory = parse_size(value, what=f"{where}: memory")
    if not MIN_MEMORY <= memory <= MAX_MEMORY or memory % 4096:
        raise GuestImageError(f"{where}: memory must be a multiple of 4 KiB from 64K to "
                              f"{MAX_MEMORY >> 30}G, not {value!r}")
    return memory


def _cpuid(value, where: str) -> tuple:
    out, seen = [], set()
    for i, c in enumerate(_list(value, where, "cpuid", "tables {function = 0x..., index = ..., "
                                                       "eax = ..., ebx = ..., ecx = ..., edx = ...}")):
        field = f"cpuid[{i}]"
        if not isinstance(c, dict):
            raise GuestImageError(f"{where}: {field} must be a table {{function = 0x..., eax = ..., ...}}, "
                                  f"not {c!r}")
        unknown = sorted(set(c) - set(_CPUID_KEYS))
        if unknown:
            raise GuestImageError(f"{where}: {field} has unknown key(s) {unknown}; allowed: "
                                  f"{', '.join(_CPUID_KEYS)}")
        if "function" not in c:
            raise GuestImageError(f"{where}: {field} is malformed: it needs a function "
                                  "(write {function = 0x..., eax = ..., ...})")
        v = {k: _int(c.get(k, 0), where, f"{field}.{k}", 0, U32) for k in _CPUID_KEYS}
        key = (v["function"], v["index"])
        if key in seen:
            raise GuestImageError(f"{where}: {field} repeats CPUID function {key[0]:#x} index {key[1]}")
        seen.add(key)
        out.append(CpuidEntry(function=v["function"], index=v["index"], flags=1 if "index" in c else 0,
                              eax=v["eax"], ebx=v["ebx"], ecx=v["ecx"], edx=v["edx"]))
    return tuple(out)


def _user_msrs(value, where: str) -> tuple:
    items = _list(value, where, "user_msrs", "32-bit MSR indices")
    msrs = tuple(_int(m, where, f"user_msrs[{i}]", 0, U32) for i, m in enumerate(items))
    if len(set(msrs)) != len(msrs):
        raise GuestImageError(f"{where}: user_msrs lists an MSR more than once")
    return msrs


def _source(value, where: str, root: Path) -> Path:
    rel = PurePosixPath(_str(value, where, "source"))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise GuestImageError(f"{where}: source must be a path inside the guests directory "
                              f"(e.g. 'src/NAME.S'), not {value!r}")
    return root / rel


def _modes(raw: dict, needs: tuple, where: str) -> tuple:
    if "modes" not in raw:
        return default_modes(needs)
    modes = _names(raw["modes"], where, "modes", RUN_MODES)
    if not modes:
        raise GuestImageError(f"{where}: modes must list at least one of {', '.join(RUN_MODES)}")
    if "sev-snp" in modes and "sev-snp" not in needs:
        raise GuestImageError(f"{where}: modes may hold sev-snp only for a guest that needs sev-snp "
                              "(an SNP guest validates its own memory with PVALIDATE)")
    if "sev-snp" in needs and modes != ("sev-snp",):
        raise GuestImageError(f"{where}: modes must be ['sev-snp'] for a guest that needs sev-snp, "
                              f"not {list(modes)}")
    if "sev-es" in needs and modes != ("sev-es",):
        raise GuestImageError(f"{where}: modes must be ['sev-es'] for a guest that needs sev-es, "
                              f"not {list(modes)}")
    if "sev" in needs and "svm" in modes:
        raise GuestImageError(f"{where}: modes may not hold svm for a guest that needs sev")
    if ("svm" in needs or "nested" in needs) and modes != ("svm",):
        raise GuestImageError(f"{where}: modes must be ['svm'] for a guest that needs nested SVM, "
                              f"not {list(modes)}")
    return modes


def _entry(name: str, raw, root: Path) -> GuestImage:
    where = f"manifest entry [guest.{name}]"
    if not _NAME.match(name):
        where = f"manifest entry [guest.{name!r}]"  # quoted: it may hold anything
        raise GuestImageError(f"{where}: a guest name is 1-64 letters, digits, '_', '.' or '-', "
                              "starting with a letter or digit")
    if not isinstance(raw, dict):
        raise GuestImageError(f"{where}: must be a table of {', '.join(_KNOWN_KEYS)}, not {raw!r}")
    if "unsupported" in raw:
        raise GuestImageError(f"{where}: unsupported is no longer accepted: the manifest holds no "
                              "host facts; whether a backend can run the guest is probed from its needs")
    unknown = sorted(set(raw) - set(_KNOWN_KEYS))
    if unknown:
        raise GuestImageError(f"{where}: unknown key(s) {unknown}; known: {', '.join(_KNOWN_KEYS)}")
    if "mode" not in raw:
        raise GuestImageError(f"{where}: mode is required: one of {', '.join(MODES)}")
    mode = _choice(raw["mode"], where, "mode", MODES)
    expect = _choice(raw.get("expect", "done"), where, "expect", EXPECTS)
    needs = _names(raw.get("needs", []), where, "needs", NEEDS)
    timeout = _timeout(raw.get("timeout", 10), where)
    memory = _memory(raw.get("memory", "2M"), where)
    cpuid = _cpuid(raw.get("cpuid", []), where)
    user_msrs = _user_msrs(raw.get("user_msrs", []), where)
    if user_msrs and "user-msr-exits" not in needs:
        raise GuestImageError(f"{where}: user_msrs needs 'user-msr-exits' in needs (the MSRs reach "
                              "userspace only through KVM's userspace MSR exits)")
    modes = _modes(raw, needs, where)
    description = _str(raw.get("description", ""), where, "description")
    if "\n" in description:
        raise GuestImageError(f"{where}: description must be one line")
    source = _source(raw.get("source", f"src/{name}.S"), where, root)
    return GuestImage(name=name, mode=mode, memory=memory, timeout=timeout, expect=expect,
                      path=root / "bin" / f"{name}.bin", source=source, description=description,
                      needs=needs, cpuid=cpuid, user_msrs=user_msrs, modes=modes)


def parse_manifest(text: str, root: Path, *, where: str = "guest manifest") -> dict[str, GuestImage]:
    """The guests of manifest text whose images live under ``root``/bin."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise GuestImageError(f"{where} is not valid TOML: {e}") from None
    extra = sorted(set(data) - {"guest"})
    if extra:
        raise GuestImageError(f"{where}: unknown top-level key(s) {extra}; every guest is a "
                              "[guest.NAME] table")
    table = data.get("guest")
    if not isinstance(table, dict) or not table:
        raise GuestImageError(f"{where} has no guests: write one [guest.NAME] table per guest")
    return {name: _entry(name, raw, root) for name, raw in table.items()}


def load_manifest(path: Path | None = None) -> dict[str, GuestImage]:
    """All guests of a manifest (default: the shipped one), by name."""
    path = Path(path) if path else guests_dir() / "manifest.toml"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GuestImageError(f"guest manifest {path} not found") from None
    except UnicodeDecodeError as e:
        raise GuestImageError(f"guest manifest {path} is not UTF-8 text ({e.reason} at byte "
                              f"{e.start})") from None
    except OSError as e:
        raise GuestImageError(f"cannot read guest manifest {path}: {e.strerror or e}") from None
    key = (str(path), text)  # the text read now: an edited manifest is parsed again
    guests = _PARSED.get(key)
    if guests is None:
        guests = parse_manifest(text, path.parent, where=f"guest manifest {path}")
        if len(_PARSED) >= 8:
            _PARSED.clear()
        _PARSED[key] = guests
    return dict(guests)  # a fresh dict of the (frozen) GuestImages


#: parsed manifests by (path, text): Machine.for_guest reads the manifest per Machine, and
#: parsing its TOML cost ~2.5 ms of the ~3.5 ms of a one-line Machine lifecycle (issue 15)
_PARSED: dict[tuple[str, str], dict[str, GuestImage]] = {}


def get_guest(name: str, manifest: dict | None = None) -> GuestImage:
    guests = manifest if manifest is not None else load_manifest()
    try:
        return guests[name]
    except KeyError:
        raise GuestImageError(
            f"unknown guest {name!r}; known guests: {', '.join(sorted(guests))} "
            "(see: kvmharness guests)") from None
