"""The compiled exit path built at install time (issue 15, item 2): setup.py compiles
kvmharness/kvm/fastpath.c into the package (never failing the install), the wheel is
``py3-none-<platform>`` with the library and ``py3-none-any`` without, and fastpath.py
loads the packaged library before its per-user cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from kvmharness.kvm import fastpath

ROOT = Path(__file__).resolve().parents[1]
COMPILER = next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
needs_cc = pytest.mark.skipif(COMPILER is None, reason="no C compiler (cc/gcc/clang) on PATH")


def _tree(dst: Path) -> Path:
    """The project's tracked files (and setup.py, fastpath.py as in this work tree) in dst."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    for name in ("setup.py", "kvmharness/kvm/fastpath.py", "kvmharness/kvm/fastpath.c"):
        shutil.copy2(ROOT / name, dst / name)
    return dst


def _wheel(src: Path, out: Path, env: dict[str, str]) -> Path:
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(out), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def _no_cc_path(tmp: Path) -> str:
    """A PATH holding every program of this one except the C compilers."""
    bin_ = tmp / "bin"
    bin_.mkdir()
    skip = {"cc", "gcc", "clang", "c89", "c99", "tcc"}
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if name in skip or name.startswith(("gcc-", "clang-", "x86_64-linux-gnu-gcc")):
                continue
            if not (bin_ / name).exists():
                (bin_ / name).symlink_to(Path(d) / name)
    return str(bin_)


@needs_cc
def test_the_wheel_carries_the_library_and_is_py3_none_platform(tmp_path):
    src = _tree(tmp_path / "src")
    wheel = _wheel(src, tmp_path / "dist", dict(os.environ))
    tag = wheel.name.removesuffix(".whl").split("-")[-3:]
    assert tag[:2] == ["py3", "none"] and tag[2].startswith(("linux_", "manylinux")), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    libs = [n for n in names if n.endswith(".so")]
    want = f"_fastpath-{hashlib.sha256(fastpath.SOURCE.read_bytes()).hexdigest()[:16]}.so"
    sim = ROOT / "kvmharness" / "sim" / "simhooks.c"
    want_sim = f"_simhooks-{hashlib.sha256(sim.read_bytes()).hexdigest()[:16]}.so"
    # the only binaries, each named for its source, in the wheel's root, platlib (auditwheel wants it there):
    # the compiled exit path and the simulator's IN/OUT hooks
    assert sorted(libs) == [f"kvmharness/kvm/{want}", f"kvmharness/sim/{want_sim}"]
    assert any(n.endswith("kvmharness/kvm/fastpath.c") for n in names)
    (meta,) = [n for n in names if n.endswith(".dist-info/WHEEL")]
    assert "Root-Is-Purelib: false" in zipfile.ZipFile(wheel).read(meta).decode()
    # plain C: no Python symbols needed (ABI-mode dlopen), so one wheel fits every Python 3
    with zipfile.ZipFile(wheel) as z:
        for lib in libs:
            data = z.read(lib)
            assert b"Py_" not in data and b"PyInit" not in data, lib


def test_without_a_compiler_the_install_goes_on_and_the_wheel_is_pure(tmp_path):
    src = _tree(tmp_path / "src")
    env = dict(os.environ, PATH=_no_cc_path(tmp_path))
    env.pop("CC", None)
    wheel = _wheel(src, tmp_path / "dist", env)
    assert wheel.name.endswith("-py3-none-any.whl")
    assert not [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".so")]


@needs_cc
def test_the_packaged_library_is_loaded_before_the_user_cache(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir(mode=0o755)
    source = pkg / "fastpath.c"
    shutil.copy2(fastpath.SOURCE, source)
    tag = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    lib = pkg / f"_fastpath-{tag}.so"
    subprocess.run([COMPILER, "-O2", "-shared", "-fPIC", "-o", str(lib), str(source)], check=True)
    lib.chmod(0o755)
    monkeypatch.setattr(fastpath, "SOURCE", source)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # empty: nothing cached
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", "/nonexistent")  # and no compiler to build one
    assert fastpath.library_path() == (lib, "installed")
    # a library others could have replaced is never loaded: the cache's build is tried instead
    lib.chmod(0o777)
    path, why = fastpath.library_path()
    assert path is None and "no C compiler" in why
    lib.chmod(0o755)
    pkg.chmod(0o777)
    assert fastpath.library_path()[0] is None
    pkg.chmod(0o755)
    # and one built for another version of fastpath.c is not this one's
    source.write_bytes(source.read_bytes() + b"\n/* another version */\n")
    assert fastpath.library_path()[0] is None
