"""A plain C library shipped as source: the installed build, else the per-user cache, else compiled on first use.

Used by the compiled exit path (``kvm/fastpath.py``) and the simulator's IN/OUT hooks
(``sim/simhooks.py``); each keeps its own ``load``/``status`` and environment variable,
and asks :func:`library_path` for the file to dlopen.  For a source ``<stem>.c``:

* the library setup.py built into the package, ``_<stem>-<source hash>.so`` beside the
  source (:func:`packaged_name`), when no one but its owner (this user or root) can write
  it or its directory;
* else ``<stem>-<source hash>-<machine>.so`` in the per-user cache
  (``$XDG_CACHE_HOME/kvmharness``, else ``~/.cache/kvmharness``, else a private
  ``kvmharness-<uid>`` in the temporary directory), when it and its directory are this
  user's alone;
* else that file compiled there with ``cc -O2 -shared -fPIC`` (``$CC``, cc, gcc or clang),
  atomically (a concurrent build of the same source is harmless).

The answer is ``(path, "installed" | "cached" | "built")`` or ``(None, why not)``.
Nothing here is specific to either backend, so both may import it (pyproject.toml's
import-linter contracts keep kvm and sim independent of each other).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


def source_tag(source: bytes) -> str:
    """The short source hash that names every build of one version of the source."""
    return hashlib.sha256(source).hexdigest()[:16]


def packaged_name(stem: str, source: bytes) -> str:
    """The packaged library's file name, ``_<stem>-<source hash>.so`` (setup.py builds exactly this one)."""
    return f"_{stem}-{source_tag(source)}.so"


def cache_dirs() -> list[Path]:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return [Path(base) / "kvmharness", Path(tempfile.gettempdir()) / f"kvmharness-{os.getuid()}"]


def ours(path: Path) -> bool:
    """Whether ``path`` belongs to this user and no one else can write it: a library loaded
    from a directory another user controls (a shared /tmp) would run their code here."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def installed(path: Path) -> bool:
    """Whether a library shipped in the package may be loaded: a file no one but its owner
    (this user or root, who installed the package) can write, in such a directory."""
    try:
        for p in (path.parent, path):
            st = p.lstat()
            if st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o022:
                return False
    except OSError:
        return False
    return path.is_file()


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name:
            path = shutil.which(name)
            if path:
                return path
    return None


def library_path(source_path: Path) -> tuple[Path | None, str]:
    """The library for ``source_path`` (``<stem>.c``), or None and why not: the packaged
    one, else the per-user cache's, built there on first use (once per source version)."""
    name = source_path.name
    stem = source_path.stem
    try:
        src = source_path.read_bytes()
    except OSError as e:
        return None, f"{name} is not installed ({e.strerror})"
    packaged = source_path.with_name(packaged_name(stem, src))
    if installed(packaged):
        return packaged, "installed"
    cached = f"{stem}-{source_tag(src)}-{platform.machine()}.so"
    for d in cache_dirs():
        if (d / cached).is_file() and ours(d) and ours(d / cached):
            return d / cached, "cached"
    cc = compiler()
    if cc is None:
        return None, "no C compiler (cc/gcc/clang; set CC)"
    last = ""
    for d in cache_dirs():
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not ours(d):
                last = f"{d} is not this user's alone (owner or group/other write)"
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=d)
            os.close(fd)
        except OSError as e:
            last = f"cannot write {d}: {e.strerror}"
            continue
        try:
            r = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(source_path)],
                               capture_output=True, text=True, timeout=120)
            if r.returncode:
                err = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
                return None, f"building {name} with {cc} failed: {err}"
            os.replace(tmp, d / cached)  # atomic: a concurrent build of the same source is harmless
            return d / cached, "built"
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"building {name} with {cc} failed: {e}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return None, last or "no writable cache directory"


__all__ = ["cache_dirs", "compiler", "installed", "library_path", "ours", "packaged_name", "source_tag"]
