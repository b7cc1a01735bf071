"""Rebuild the shipped guest images: guests/src/NAME.S -> guests/bin/NAME.bin.

Each source goes through the C preprocessor (so it can include ucall.h and
guest.h), GNU as, ``ld -T guests/flat.ld`` and ``objcopy -O binary``.  The
output depends only on the sources and the binutils version: no timestamps
or paths reach a flat binary.  ``pip install`` needs none of this, because
the images are shipped; this script is for whoever changes a guest.

    python guests/build.py                 # rebuild every image in guests/bin
    python guests/build.py hello cpuid     # just these
    python guests/build.py --out DIR       # build elsewhere
    python guests/build.py --check         # rebuild in a temporary dir and
                                           # compare with the shipped images

Exit status: 0 success, 1 a build failed or --check found a difference,
2 a tool is missing or the command line is wrong.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC_DIR = HERE / "src"
INCLUDE_DIR = HERE / "include"
BIN_DIR = HERE / "bin"
LINKER_SCRIPT = HERE / "flat.ld"

BINUTILS = ("as", "ld", "objcopy")
PREPROCESSOR = "cpp"
INSTALL_HINT = {
    "as": "binutils", "ld": "binutils", "objcopy": "binutils", "cpp": "cpp",
}


class ToolMissing(RuntimeError):
    """A program the build needs is not on PATH."""


class BuildError(RuntimeError):
    """A tool failed; the message carries its command line and stderr."""


def missing_tools() -> list[str]:
    """The build programs (cpp, as, ld, objcopy) that are not on PATH."""
    return [tool for tool in (PREPROCESSOR, *BINUTILS) if shutil.which(tool) is None]


def require_tools() -> None:
    """Raise ToolMissing naming the absent programs and their Debian packages."""
    missing = missing_tools()
    if missing:
        packages = sorted({INSTALL_HINT[tool] for tool in missing})
        raise ToolMissing(
            f"cannot build guest images: {', '.join(missing)} not found on PATH. "
            f"They come from GNU binutils (as, ld, objcopy) and the C preprocessor "
            f"(cpp); on Debian/Ubuntu: apt-get install {' '.join(packages)}")


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    # LC_ALL=C keeps tool messages stable; nothing locale-dependent reaches the output.
    env = dict(os.environ, LC_ALL="C")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} (in {cwd or Path.cwd()}) "
                         f"exited {proc.returncode}:\n{proc.stderr.strip()}")
    if proc.stderr.strip():
        # Warnings are shown, not fatal: a newer binutils may add harmless
        # ones, and --check still catches any change in the output.
        print(f"{cmd[0]}: {proc.stderr.strip()}", file=sys.stderr)


def build_image(source: Path, output: Path,
                include_dirs: tuple[Path, ...] = (INCLUDE_DIR,)) -> Path:
    """Build one flat image from an assembly source; return the output path.

    Steps: ``cpp`` (assembler-with-cpp, no system headers) -> ``as --64`` ->
    ``ld -T flat.ld`` -> ``objcopy -O binary``.  Intermediate files live in a
    temporary directory.
    """
    require_tools()
    source = Path(source).resolve()
    output = Path(output).resolve()
    with tempfile.TemporaryDirectory(prefix="kvmharness-guest-") as tmp:
        work = Path(tmp)
        stem = source.stem
        preprocessed, obj, elf = work / f"{stem}.s", work / f"{stem}.o", work / f"{stem}.elf"
        # cpp runs in the source's directory with the bare file name, so line
        # markers (and any assembler error) name the file, not a full path.
        _run([PREPROCESSOR, "-x", "assembler-with-cpp", "-undef", "-nostdinc",
              *(f"-I{d}" for d in include_dirs), source.name, "-o", str(preprocessed)],
             cwd=source.parent)
        _run(["as", "--64", "-o", str(obj), str(preprocessed)])
        # No .note.GNU-stack in hand-written sources: say the stack is not
        # executable so ld does not warn (flat.ld discards the notes anyway).
        _run(["ld", "-T", str(LINKER_SCRIPT), "-z", "noexecstack", "--build-id=none",
              "-o", str(elf), str(obj)])
        output.parent.mkdir(parents=True, exist_ok=True)
        _run(["objcopy", "-O", "binary", str(elf), str(output)])
    output.chmod(0o644)  # data, not a host executable (objcopy copies the ELF's x bits)
    return output


def sources() -> dict[str, Path]:
    """Guest name -> source file, for every guests/src/*.S."""
    return {path.stem: path for path in sorted(SRC_DIR.glob("*.S"))}


def build_all(out_dir: Path = BIN_DIR, names: list[str] | None = None) -> list[Path]:
    """Build the named guests (default: all) into out_dir as NAME.bin."""
    available = sources()
    names = list(available) if not names else names
    unknown = [name for name in names if name not in available]
    if unknown:
        raise BuildError(f"no source for {', '.join(unknown)} in {SRC_DIR}")
    return [build_image(available[name], Path(out_dir) / f"{name}.bin") for name in names]


def check(names: list[str] | None = None) -> list[str]:
    """Rebuild in a temporary directory; return one line per difference from guests/bin."""
    problems = []
    with tempfile.TemporaryDirectory(prefix="kvmharness-check-") as tmp:
        for built in build_all(Path(tmp), names):
            shipped = BIN_DIR / built.name
            if not shipped.exists():
                problems.append(f"{built.name}: not shipped in {BIN_DIR}")
            elif shipped.read_bytes() != built.read_bytes():
                problems.append(f"{built.name}: shipped image differs from a rebuild "
                                f"({shipped.stat().st_size} vs {built.stat().st_size} bytes)")
    if not names:
        for stale in sorted(set(p.stem for p in BIN_DIR.glob("*.bin")) - set(sources())):
            problems.append(f"{stale}.bin: shipped image has no source in {SRC_DIR}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="guests to build (default: all)")
    parser.add_argument("--out", type=Path, default=BIN_DIR,
                        help=f"output directory (default: {BIN_DIR})")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in a temporary directory and compare with guests/bin")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in sources()]
    if unknown:
        parser.error(f"no source for {', '.join(unknown)} in {SRC_DIR} "
                     f"(known: {', '.join(sources())})")
    try:
        if args.check:
            problems = check(args.names)
            for line in problems:
                print(line, file=sys.stderr)
            if not problems:
                print(f"guest images up to date ({len(args.names or sources())} checked)")
            return 1 if problems else 0
        for path in build_all(args.out, args.names):
            print(f"{path}  {path.stat().st_size} bytes")
        return 0
    except ToolMissing as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BuildError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
