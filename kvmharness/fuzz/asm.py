"""Assemble a fuzz guest with GNU ``as`` (as guests/build.py does), cached by the source's hash.

Returns the flat image and its labels (``opN_start`` / ``opN_end``: which op an exit's
RIP belongs to).  The cache lives in ``$KVMHARNESS_FUZZ_CACHE`` or
``~/.cache/kvmharness/fuzz`` (one ``.bin`` + ``.sym`` per source hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import FeatureUnavailable

TOOLS = ("as", "objcopy", "nm")
_MEMO: dict = {}


def cache_dir() -> Path:
    d = os.environ.get("KVMHARNESS_FUZZ_CACHE")
    return Path(d) if d else Path.home() / ".cache" / "kvmharness" / "fuzz"


def missing_tools() -> list:
    return [t for t in TOOLS if shutil.which(t) is None]


class AsmError(RuntimeError):
    """``as`` rejected a generated source (a generator bug): the message has its stderr."""


def guests_dir() -> Path:
    """The source tree's guests/ (include/ and flat.ld): linked guests need it."""
    return Path(__file__).resolve().parents[2] / "guests"


def assemble(source: str, linked: bool = False) -> tuple[bytes, dict]:
    """(flat image, {label: offset}) of a 64-bit source.  ``linked``: a source in the shipped
    guests' form (C preprocessor with guests/include, ``ld -T guests/flat.ld``: sections
    .text/.rodata/.data laid out from the load address), as guests/build.py builds them."""
    key = hashlib.sha256((("linked:" if linked else "") + source).encode()).hexdigest()[:32]
    hit = _MEMO.get(key)
    if hit is not None:
        return hit
    cdir = cache_dir()
    binf, symf = cdir / f"{key}.bin", cdir / f"{key}.sym"
    try:
        if binf.is_file() and symf.is_file():
            hit = binf.read_bytes(), json.loads(symf.read_text())
            _MEMO[key] = hit
            return hit
    except (OSError, ValueError):
        pass
    missing = missing_tools()
    if missing:
        raise FeatureUnavailable(f"assembling fuzz guests needs {', '.join(missing)} (Debian: apt-get install binutils)")
    if linked:
        image, syms = _assemble_linked(source)
    else:
        image, syms = _assemble_flat(source)
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        binf.write_bytes(image)
        symf.write_text(json.dumps(syms))
    except OSError:
        pass
    _MEMO[key] = (image, syms)
    if len(_MEMO) > 4096:
        _MEMO.clear()
    return image, syms


def _assemble_linked(source: str) -> tuple[bytes, dict]:
    gdir = guests_dir()
    if not (gdir / "include").is_dir() or shutil.which("cpp") is None or shutil.which("ld") is None:
        raise FeatureUnavailable(f"nested fuzz guests need the source tree's guests/ ({gdir}), cpp and ld "
                                 f"(Debian: apt-get install cpp binutils)")
    from .. import protocol as P

    with tempfile.TemporaryDirectory(prefix="kvmh-fuzz-") as tmp:
        src, pre, obj, elf, out = (Path(tmp, n) for n in ("g.S", "g.s", "g.o", "g.elf", "g.bin"))
        src.write_text(source)
        steps = (["cpp", "-x", "assembler-with-cpp", "-undef", "-nostdinc", f"-I{gdir / 'include'}", str(src),
                  "-o", str(pre)],
                 ["as", "--64", "-o", str(obj), str(pre)],
                 ["ld", "-T", str(gdir / "flat.ld"), "-z", "noexecstack", "--build-id=none", "-o", str(elf),
                  str(obj)],
                 ["objcopy", "-O", "binary", str(elf), str(out)])
        _run_steps(steps)
        return out.read_bytes(), _symbols(elf, P.GUEST_LOAD_ADDR)


def _assemble_flat(source: str) -> tuple[bytes, dict]:
    with tempfile.TemporaryDirectory(prefix="kvmh-fuzz-") as tmp:
        src, obj, out = Path(tmp, "g.S"), Path(tmp, "g.o"), Path(tmp, "g.bin")
        src.write_text(source)
        _run_steps((["as", "--64", "-o", str(obj), str(src)],
                    ["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)]))
        return out.read_bytes(), _symbols(obj)


def _run_steps(steps) -> None:
    """Run each tool in turn; the first that fails: AsmError with its stderr."""
    for argv in steps:
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode:
            raise AsmError(f"{argv[0]} failed: {r.stderr.strip()[:2000]}")


def _symbols(path: Path, base: int = 0) -> dict:
    """{label: address - base} of ``nm path``."""
    r = subprocess.run(["nm", str(path)], capture_output=True, text=True)
    syms = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms[parts[2]] = int(parts[0], 16) - base
    return syms
