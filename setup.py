"""Build step for the compiled exit path (issue 15); everything else is in pyproject.toml.

``build_py`` also compiles ``kvmharness/kvm/fastpath.c`` (plain C: no Python headers, no
CPython ABI) into the package as ``_fastpath-<source hash>.so``, which
``kvmharness.kvm.fastpath`` loads before its per-user cache.  Where no C compiler is
present, or compiling fails, the install goes on without it: the library is then built on
first use where a compiler appears, else the pure-Python exit path runs.  A wheel that
carries the library is tagged ``py3-none-<platform>`` (one wheel for every Python 3:
the library is loaded with cffi's ABI-mode dlopen); without it, ``py3-none-any``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

try:  # setuptools >= 70.1 carries bdist_wheel; before that the wheel package does
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover - depends on the build environment
    try:
        from wheel.bdist_wheel import bdist_wheel
    except ImportError:
        bdist_wheel = None

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "kvmharness" / "kvm" / "fastpath.c"
# the simulator's IN/OUT hooks (issue 15 item 4): plain C too, loaded by kvmharness/sim/simhooks.py
SIM_SOURCE = HERE / "kvmharness" / "sim" / "simhooks.c"


def sim_library_name(source: bytes) -> str:
    """The packaged hook library's file name: sim/simhooks.py looks for exactly this one."""
    return f"_simhooks-{hashlib.sha256(source).hexdigest()[:16]}.so"


def library_name(source: bytes) -> str:
    """The packaged library's file name: fastpath.py looks for exactly this one."""
    return f"_fastpath-{hashlib.sha256(source).hexdigest()[:16]}.so"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class BuildPyWithFastPath(build_py):
    """build_py, then the compiled exit path into the build tree (never a build failure)."""

    def run(self) -> None:
        super().run()
        self.built_fastpath = self._compile_fastpath()
        self.built_simhooks = self._compile_simhooks()

    def _compile_simhooks(self) -> bool:
        """sim/simhooks.c beside simhooks.py; like the fast path, never a build failure."""
        if os.environ.get("KVMHARNESS_NO_FASTPATH_BUILD") or not sys.platform.startswith("linux"):
            return False
        cc = _compiler()
        try:
            src = SIM_SOURCE.read_bytes()
        except OSError:
            return False
        if cc is None:
            return False
        return self._compile(cc, SIM_SOURCE, Path("sim") / sim_library_name(src), "Python hooks run")

    def _compile_fastpath(self) -> bool:
        if os.environ.get("KVMHARNESS_NO_FASTPATH_BUILD"):
            return False
        try:
            src = SOURCE.read_bytes()
        except OSError as e:
            self.warn(f"kvmharness: not building the compiled exit path: {e}")
            return False
        if not sys.platform.startswith("linux"):
            self.warn("kvmharness: the compiled exit path is Linux-only; not built")
            return False
        cc = _compiler()
        if cc is None:
            self.warn("kvmharness: no C compiler (cc/gcc/clang; CC): the compiled exit path is "
                      "built on first use where one appears, else pure Python runs")
            return False
        return self._compile(cc, SOURCE, Path("kvm") / library_name(src), "pure Python runs")

    def _compile(self, cc: str, source: Path, lib: Path, fallback: str) -> bool:
        """``cc -O2 -shared -fPIC`` of ``source`` into ``kvmharness/<lib>`` in the build tree;
        a failure is a warning ending in ``fallback`` (what runs instead), never a build failure."""
        out = Path(self.build_lib) / "kvmharness" / lib
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(source)],
                               capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            self.warn(f"kvmharness: compiling {source.name} with {cc} failed ({e}); {fallback}")
            return False
        if r.returncode:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            self.warn(f"kvmharness: compiling {source.name} with {cc} failed ({last}); {fallback}")
            out.unlink(missing_ok=True)
            return False
        return True

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outs = list(super().get_outputs(include_bytecode))
        lib = Path(self.build_lib) / "kvmharness" / "kvm" / library_name(SOURCE.read_bytes())
        if lib.is_file():
            outs.append(str(lib))
        sim = Path(self.build_lib) / "kvmharness" / "sim" / sim_library_name(SIM_SOURCE.read_bytes())
        if sim.is_file():
            outs.append(str(sim))
        return outs


cmdclass: dict = {"build_py": BuildPyWithFastPath}

if bdist_wheel is not None:
    class BdistWheelPy3None(bdist_wheel):
        """A platform wheel for every Python 3 (py3-none-<platform>) when the library is in it."""

        def run(self) -> None:
            self.run_command("build_py")  # first, to know whether the library is in the wheel
            if getattr(self.get_finalized_command("build_py"), "built_fastpath", False):
                self.root_is_pure = False
                self.distribution.has_ext_modules = lambda: True  # installed as platlib
            super().run()

        def get_tag(self) -> tuple[str, str, str]:
            build = self.get_finalized_command("build_py")
            if not getattr(build, "built_fastpath", False):
                return "py3", "none", "any"
            _, _, plat = super().get_tag()
            return "py3", "none", plat

    cmdclass["bdist_wheel"] = BdistWheelPy3None

setup(cmdclass=cmdclass)
