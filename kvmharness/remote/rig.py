"""`rig check` and `rig run`: drive several rigs over SSH, in parallel.

Each rig gets a thread; a failure on one rig (unreachable, refused key,
dropped connection, timeout) becomes that rig's result and the others carry
on.  Ctrl-C sets one shared event: every rig kills its remote process group,
removes its remote directory and returns; a second Ctrl-C stops waiting.

What `rig run` does on a rig, in one fresh directory ``/tmp/kvmharness-run-<id>``:
upload the project's wheel and a tarball of its tests, make a venv with
``--system-site-packages`` (the rig's Debian python3-cffi, -psutil, -pytest
are used; the rig needs no package index), ``pip install --no-deps
--no-index`` the wheel, run the command with ``KVMHARNESS_BACKEND`` set, fetch
``results/`` (JUnit XML, traces) home, remove the directory.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EXIT_HOST, EXIT_OK, EXIT_TIMEOUT, UsageError
from .errors import RigCancelled, RigError, RigTimeout
from .inventory import Rig
from .progress import Progress

REMOTE_BASE = "/tmp/kvmharness-run-"
EXIT_INTERRUPTED = 130

# Printed by the remote setup step: the wheel's requirements the rig lacks.
_MISSING_DEPS_PY = r"""
import importlib.metadata as m, re
try:
    from packaging.markers import Marker
except ImportError:
    try:
        from pip._vendor.packaging.markers import Marker
    except ImportError:
        Marker = None
missing = []
for req in m.requires("kvmharness") or []:
    marker = req.split(";", 1)[1] if ";" in req else ""
    if marker and Marker is not None:
        try:
            if not Marker(marker).evaluate({"extra": ""}):
                continue  # an extra's, or not for this python (e.g. tomli before 3.11)
        except Exception:
            pass
    elif "extra" in marker:
        continue
    name = re.match(r"[A-Za-z0-9._-]+", req).group(0)
    try:
        m.distribution(name)
    except m.PackageNotFoundError:
        missing.append(name)
print("KVMHARNESS-MISSING:", " ".join(missing))
"""


# When the rig's python is itself a venv (a CI runner's, say), its packages
# are what "the rig has"; --system-site-packages would only reach the base
# interpreter's, so the new venv gets a .pth naming the parent venv's
# site-packages (after its own, so the shipped wheel still wins).
_PARENT_VENV_PY = r"""
import pathlib, subprocess, sys, sysconfig
probe = "import site, sys; print(chr(10).join(site.getsitepackages()) if sys.prefix != sys.base_prefix else '')"
dirs = subprocess.run([sys.argv[1], "-c", probe], capture_output=True, text=True).stdout.strip()
if dirs:
    pathlib.Path(sysconfig.get_paths()["purelib"], "_kvmharness_parent_venv.pth").write_text(dirs + chr(10))
"""


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def worst_status(statuses: list[int]) -> int:
    """The status of the whole run: the worst rig's.

    0 is best; pytest's 5 ("no tests collected") is next; every other code
    is worse, and a larger code is worse (1 tests failed < 3 rig unusable <
    4 timed out < 130 interrupted).
    """
    def rank(s: int) -> int:
        return {0: 0, 5: 1}.get(s, s + 2)
    return max(statuses, key=rank, default=EXIT_OK)


# -- what we ship ----------------------------------------------------------------
def project_root(start: Path | None = None) -> Path:
    """The source tree holding pyproject.toml and the kvmharness package."""
    here = (start or Path(__file__)).resolve()
    for d in [here, *here.parents]:
        if (d / "pyproject.toml").is_file() and (d / "kvmharness").is_dir():
            return d
    raise UsageError("rig run/check need the kvmharness source tree (pyproject.toml + tests/); "
                     "run from a checkout, or pass --wheel for a prebuilt wheel")


def build_wheel(root: Path, out_dir: Path, note: Callable[[str], None]) -> Path:
    """`pip wheel --no-deps` of the project, built from a scratch copy of the tree.

    The copy keeps setuptools' build/ and *.egg-info out of the user's
    checkout.  Without build isolation when setuptools and wheel are importable
    here (fast, offline); else pip's isolated build fetches them.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvmharness-src-") as scratch:
        src = Path(scratch) / "src"
        shutil.copytree(root, src, ignore=shutil.ignore_patterns(
            ".git", "results", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", ".pytest_cache",
            ".venv*", "tests"))
        base = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                "-w", str(out_dir), str(src)]
        err: list[str] = []
        for argv in (base[:4] + ["--no-build-isolation"] + base[4:], base):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            wheels = sorted(out_dir.glob("kvmharness-*.whl"), key=lambda p: p.stat().st_mtime)
            if proc.returncode == 0 and wheels:
                how = "pip wheel --no-deps" + (" --no-build-isolation" if "--no-build-isolation" in argv else "")
                note(f"built {wheels[-1].name} in {time.monotonic() - t0:.1f} s ({how})")
                return wheels[-1]
            # Keep setuptools' own words; drop pip's wrapping boilerplate.
            noise = ("note:", "subprocess-exited-with-error", "metadata-generation-failed", "finished with status")
            for line in (proc.stderr + proc.stdout).splitlines():
                line = line.strip(" │╰─>×")
                if "error" in line.lower() and not any(n in line for n in noise) and line not in err:
                    err.append(line)
    raise UsageError("building the kvmharness wheel failed: " + (" | ".join(err[:4]) or "see pip's output"))


# Beside the wheel, the tests need their own tree: tests/, pyproject.toml
# (pytest's configuration) and guests/ (tests rebuild and compare guest images).
SHIPPED_DIRS = ("tests", "guests")


def pack_tests(root: Path) -> bytes:
    """A tar.gz of pyproject.toml and SHIPPED_DIRS, without bytecode."""
    buf = io.BytesIO()

    def skip(ti: tarfile.TarInfo):
        return None if "__pycache__" in ti.name or ti.name.endswith(".pyc") else ti

    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(root / "pyproject.toml", arcname="pyproject.toml")
        for d in SHIPPED_DIRS:
            if (root / d).is_dir():
                tar.add(root / d, arcname=d, filter=skip)
    return buf.getvalue()


@dataclass
class Payload:
    wheel: Path
    tests_tgz: Path | None  # None for `rig check`: only the package is needed


# -- per-rig results ---------------------------------------------------------------
@dataclass
class RigResult:
    rig: str
    status: int = EXIT_OK
    reason: str = ""              # why it failed, "" when the command ran
    info: dict | None = None      # rig check: the remote `info --json`
    missing: list[str] = field(default_factory=list)  # requirements the rig lacks
    files: list[str] = field(default_factory=list)    # fetched into the results folder
    elapsed: float = 0.0
    cleaned: bool = False
    lock: dict | None = None      # rig run: our record in the rig's lock (who, since)
    lock_waited: float = 0.0      # seconds spent waiting for the rig's lock
    lock_status: dict | None = None  # rig check: who holds the rig's lock now
    hang: dict | None = None      # the rig stopped answering: when, and the power cycle

    @property
    def power_cycled(self) -> bool:
        return bool(self.hang and self.hang.get("power_cycled"))

    def to_dict(self) -> dict:
        return {"rig": self.rig, "status": self.status, "reason": self.reason, "info": self.info,
                "missing": self.missing, "files": self.files, "elapsed": round(self.elapsed, 2),
                "remote_dir_removed": self.cleaned, "lock": self.lock,
                "lock_waited": round(self.lock_waited, 2), "hang": self.hang}


@dataclass
class RunOptions:
    command: list[str]
    backend: str = "auto"
    timeout: float = 1800.0
    accept_new_host_keys: bool = False
    results_dir: Path = Path("results")
    run_id: str = ""
    lock_timeout: float = 1800.0      # wait this long for a rig's lock, then fail naming the holder
    hang_timeout: float = 60.0        # a rig that answers no SSH ping for this long is hung
    power_cycle_on_hang: bool = False  # then run its power_cycle command and wait for it
    power_timeout: float = 600.0      # for the rig to answer SSH again after the power cycle
    who: dict | None = None           # recorded in the rig's lock (default: this process)


class _RigSession:
    """Everything done on one rig, in its own thread."""

    def __init__(self, rig: Rig, run_id: str, progress: Progress, cancel: threading.Event,
                 accept_new: bool, deadline: float):
        self.rig = rig
        self.dir = f"{REMOTE_BASE}{run_id}-{rig.name}"
        self.progress = progress
        self.cancel = cancel
        self.deadline = deadline
        from .ssh import RigConnection  # paramiko only when a rig is really contacted

        self.accept_new = accept_new
        self.conn = RigConnection(rig, accept_new_host_keys=accept_new,
                                  note=lambda m: progress.note(rig.name, m))
        self.made_dir = False
        self.phase = "starting"
        self.hung: dict | None = None  # set by the watchdog: the rig stopped answering
        self._watch_stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.lock = None

    # -- a hung rig ----------------------------------------------------------------
    def watch(self, hang_timeout: float) -> None:
        """Ping the rig (a fresh SSH channel running `true`) until stopped; when one gets no
        answer within ``hang_timeout``, record the hang and drop the connection, so
        whatever waits on the rig fails at once instead of at the run's timeout."""
        interval = max(0.5, min(10.0, hang_timeout / 3))
        conn = self.conn

        def loop() -> None:
            t_ok = time.monotonic()
            while not self._watch_stop.wait(interval):
                if not conn.alive:
                    return
                t0 = time.monotonic()
                if conn.ping(hang_timeout):
                    t_ok = time.monotonic()
                    continue
                if self._watch_stop.is_set() or not conn.alive and time.monotonic() - t0 < hang_timeout:
                    return  # we closed it ourselves, or it died on its own (reported as dropped)
                self.hung = {"phase": self.phase, "silent_for": round(time.monotonic() - t_ok, 2),
                             "detected_at": time.monotonic()}
                self.progress.note(self.rig.name, f"the rig stopped answering (no SSH reply within "
                                                  f"{hang_timeout:g} s while {self.phase})")
                conn.abort()
                return

        self._watchdog = threading.Thread(target=loop, name=f"rig-watch-{self.rig.name}", daemon=True)
        self._watchdog.start()

    def stop_watch(self) -> None:
        self._watch_stop.set()

    def take_lock(self, who: dict, timeout: float) -> float:
        """The rig's own lock (see lock.py); returns the seconds waited."""
        from .lock import acquire

        self.step("locking")
        t0 = time.monotonic()
        self.lock = acquire(self.conn, self.rig, who, timeout=timeout, cancel=self.cancel,
                            waiting=lambda m: self.progress.note(self.rig.name, m))
        return time.monotonic() - t0

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def power_cycle(self, opts: RunOptions) -> float:
        """Run the rig's power command here and wait until it answers SSH again, with a
        fresh connection in ``self.conn``; returns the seconds that took."""
        from .ssh import RigConnection

        rig = self.rig
        t0 = time.monotonic()
        self.progress.phase(rig.name, "power-cycling")
        self.progress.note(rig.name, f"power-cycling: {rig.power_cycle}")
        try:
            p = subprocess.run(rig.power_cycle, shell=True, capture_output=True, text=True, timeout=300,
                               stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise RigError(rig.name, "hung, and its power command did not finish within 300 s") from None
        if p.returncode != 0:
            tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-2:])
            raise RigError(rig.name, f"hung, and its power command failed (exit {p.returncode}): {tail}")
        self.progress.phase(rig.name, "waiting for ssh")
        deadline = t0 + opts.power_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.cancel.is_set():
                raise RigCancelled(rig.name, "interrupted while waiting for the power-cycled rig")
            conn = RigConnection(rig, accept_new_host_keys=self.accept_new, connect_timeout=10.0,
                                 note=lambda m: self.progress.note(rig.name, m))
            try:
                conn.open()
                if conn.ping(min(30.0, max(5.0, opts.hang_timeout))):
                    self.conn.close()
                    self.conn = conn
                    return time.monotonic() - t0
                conn.close()
            except RigError as e:
                last = e.reason
            time.sleep(1.0)
        raise RigError(rig.name, f"power-cycled after a hang, but it did not answer SSH within "
                                 f"{opts.power_timeout:g} s ({last or 'no reply'})")

    def remaining(self, cap: float | None = None) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RigTimeout(self.rig.name, "the rig's time budget ran out")
        return min(left, cap) if cap else left

    def step(self, phase: str) -> None:
        if self.cancel.is_set():
            raise RigCancelled(self.rig.name, "interrupted")
        self.phase = phase
        self.progress.phase(self.rig.name, phase)

    def sh(self, command: str, cap: float = 300.0) -> tuple[int, str, str]:
        out: list[str] = []
        err: list[str] = []
        status = self.conn.run(command, timeout=self.remaining(cap), cancel=self.cancel,
                               pgid_file=f"{self.dir}.pgid" if self.made_dir else None,
                               sink=lambda s, l: (out if s == "stdout" else err).append(l))
        return status, "\n".join(out), "\n".join(err)

    def connect(self) -> None:
        self.step("connecting")
        self.conn.open()

    def install(self, payload: Payload) -> list[str]:
        """Fresh dir, upload, venv, wheel; returns the requirements the rig lacks."""
        rig, d = self.rig, shlex.quote(self.dir)
        self.step("uploading")
        # mkdir without -p: the directory must be new (a fresh one per run).
        status, _, err = self.sh(f"umask 077 && mkdir {d}")
        if status != 0:
            raise RigError(rig.name, f"cannot create {self.dir}: {err.strip() or status}")
        self.made_dir = True
        self.conn.put(payload.wheel, f"{self.dir}/{payload.wheel.name}")
        if payload.tests_tgz is not None:
            self.conn.put(payload.tests_tgz, f"{self.dir}/tests.tar.gz")
        self.step("installing")
        py = shlex.quote(rig.python)
        whl = shlex.quote(f"{self.dir}/{payload.wheel.name}")
        # --without-pip is fast and needs no ensurepip (Debian ships that
        # apart, in python3-venv); the system pip then installs into the venv.
        script = (
            f"set -e; cd {d}; "
            f"{py} -m venv --system-site-packages --without-pip venv; "
            f"venv/bin/python -c {shlex.quote(_PARENT_VENV_PY)} {py}; "
            f"if ! venv/bin/python -m pip --version >/dev/null 2>&1; then "
            f"rm -rf venv; {py} -m venv --system-site-packages venv; fi; "
            f"venv/bin/python -m pip install --quiet --no-deps --no-index --disable-pip-version-check {whl}; "
            f"mkdir -p src results/traces; "
            + ("tar -xzf tests.tar.gz -C src; " if payload.tests_tgz is not None else "")
            + f"venv/bin/python -c {shlex.quote(_MISSING_DEPS_PY)}"
        )
        status, out, err = self.sh(script, cap=600)
        if status != 0:
            tail = " | ".join((err or out).strip().splitlines()[-4:])
            if "No module named venv" in err or "ensurepip" in err:
                tail += f" (the rig's {rig.python} has no venv/pip: install python3-venv or python3-pip there)"
            raise RigError(rig.name, f"installing the wheel on the rig failed: {tail}")
        m = re.search(r"KVMHARNESS-MISSING:(.*)", out)
        missing = m.group(1).split() if m else []
        if missing:
            self.progress.note(rig.name, "the rig lacks these requirements of kvmharness (tests that "
                                         f"import them will fail): {', '.join(missing)}")
        return missing

    def cleanup(self) -> bool:
        """Remove the remote directory; reconnect once if the connection died."""
        if not self.made_dir:
            return True
        cmd = f"rm -rf {shlex.quote(self.dir)} {shlex.quote(self.dir + '.pgid')}"
        for attempt in range(2):
            try:
                if not self.conn.alive:
                    if attempt == 0:
                        self.conn.close()
                        self.conn.connect_timeout = 10.0
                        self.conn.open()
                    else:
                        break
                status = self.conn.run(cmd, timeout=60)
                return status == 0
            except RigError:
                continue
        self.progress.note(self.rig.name, f"could not remove {self.dir} on the rig (connection lost)")
        return False


def _run_parallel(rigs: list[Rig], work: Callable[[Rig, threading.Event], RigResult],
                  progress: Progress) -> list[RigResult]:
    """Run ``work`` for each rig in its own thread; Ctrl-C cancels all of them."""
    cancel = threading.Event()
    results: dict[str, RigResult] = {}

    def target(rig: Rig) -> None:
        t0 = time.monotonic()
        try:
            res = work(rig, cancel)
        except RigError as e:
            res = RigResult(rig.name, status=e.exit_code, reason=e.reason)
        except Exception as e:  # noqa: BLE001 - one rig's bug must not hide the others' results
            res = RigResult(rig.name, status=EXIT_HOST, reason=f"internal error: {type(e).__name__}: {e}")
        res.elapsed = time.monotonic() - t0
        results[rig.name] = res
        progress.done(rig.name, res.status, res.reason)

    threads = [threading.Thread(target=target, args=(r,), name=f"rig-{r.name}", daemon=True) for r in rigs]
    for t in threads:
        t.start()
    interrupted = 0
    # Poll with sleep rather than Thread.join: on Python 3.11 a KeyboardInterrupt
    # landing inside join() can leave the thread marked as stopped while it still
    # runs, and we would stop waiting for the cleanup.
    while len(results) < len(rigs):
        try:
            time.sleep(0.1)
        except KeyboardInterrupt:
            interrupted += 1
            cancel.set()
            if interrupted == 1:
                progress.message("interrupted: stopping the remote commands and cleaning up "
                                 "(Ctrl-C again to stop waiting)")
            else:
                break
    for r in rigs:
        results.setdefault(r.name, RigResult(r.name, status=EXIT_INTERRUPTED,
                                             reason="interrupted before the rig finished cleaning up"))
    if interrupted:
        for res in results.values():
            res.status = worst_status([res.status, EXIT_INTERRUPTED])
    return [results[r.name] for r in rigs]


# -- rig check -----------------------------------------------------------------
def check_rigs(rigs: list[Rig], *, accept_new_host_keys: bool = False, timeout: float = 300.0,
               ship: bool = False, wheel: Path | None = None, progress: Progress | None = None,
               info_args: tuple[str, ...] = ("-m", "kvmharness", "info", "--json")) -> list[RigResult]:
    """Run the remote ``kvmharness info --json`` on every rig.

    When the rig has no kvmharness (or ``ship``), the current project is shipped
    and installed in a temporary venv first, exactly as `rig run` does.
    """
    progress = progress or Progress([r.name for r in rigs], live=False)
    run_id = new_run_id()
    payload_lock = threading.Lock()
    payload: list[Payload] = []

    def get_payload(tmp: Path) -> Payload:
        with payload_lock:
            if not payload:
                whl = wheel or build_wheel(project_root(), tmp, lambda m: progress.message(m))
                payload.append(Payload(whl, None))
            return payload[0]

    with tempfile.TemporaryDirectory(prefix="kvmharness-wheel-") as tmp:
        def work(rig: Rig, cancel: threading.Event) -> RigResult:
            s = _RigSession(rig, run_id, progress, cancel, accept_new_host_keys,
                            time.monotonic() + timeout)
            res = RigResult(rig.name)
            try:
                s.connect()
                from .lock import lock_status

                s.step("lock")
                try:
                    res.lock_status = lock_status(s.conn, rig).to_dict()
                except RigError as e:  # the rig is reached; only its lock could not be read
                    from .lock import lock_path

                    res.lock_status = {"file": lock_path(rig), "held": None, "holder": None, "error": e.reason}
                args = " ".join(shlex.quote(a) for a in info_args)
                installed = False
                if not ship:  # the rig's own kvmharness, if it has one
                    s.step("info")
                    status, out, err = s.sh(f"{shlex.quote(rig.python)} {args}", cap=120)
                    installed = not (status != 0 and "No module named kvmharness" in err)
                if not installed:
                    res.missing = s.install(get_payload(Path(tmp)))
                    s.step("info")
                    status, out, err = s.sh(f"{shlex.quote(s.dir)}/venv/bin/python {args}", cap=120)
                if status != 0:
                    tail = " | ".join(err.strip().splitlines()[-3:])
                    raise RigError(rig.name, f"remote `kvmharness info --json` exited {status}: {tail}")
                try:
                    res.info = json.loads(out)
                except json.JSONDecodeError as e:
                    raise RigError(rig.name, f"remote `kvmharness info --json` printed no JSON ({e})") from None
                return res
            except RigError as e:
                res.status, res.reason = e.exit_code, e.reason
                return res
            finally:
                try:
                    s.cleanup()
                finally:
                    s.conn.close()

        return _run_parallel(rigs, work, progress)


SEV_MODES = ("sev", "sev-es", "sev-snp")


def health(res: RigResult, rig: Rig | None = None) -> tuple[str, str]:
    """A rig's state after `rig check`, with the reason: ``ready``, ``busy`` (its lock is
    held), ``unreachable`` (no SSH session), ``error`` (reached, but `kvmharness info`
    failed), ``wrong-kernel`` (uname -r does not match the inventory's ``kernel`` glob) or
    ``no-sev`` (a label names an SEV mode, e.g. ``sev-es`` or ``sev_es``, that the rig
    cannot run).  A rig without SEV labels is not expected to have SEV."""
    import fnmatch

    if res.info is None:
        if res.lock_status is None:
            return "unreachable", res.reason or f"exit {res.status}"
        return "error", res.reason or f"exit {res.status}"
    kernel = str(res.info.get("kernel") or "")
    if rig is not None and rig.kernel and not fnmatch.fnmatchcase(kernel, rig.kernel):
        return "wrong-kernel", f"runs kernel {kernel or '?'}, the inventory expects {rig.kernel}"
    verdicts = res.info.get("verdicts") or {}
    labels = {lab.replace("_", "-").lower() for lab in (rig.labels if rig else ())}
    for mode in SEV_MODES:
        v = verdicts.get(mode) or {}
        if mode in labels and not v.get("usable"):
            return "no-sev", f"labelled {mode}, but {mode} is not usable: {v.get('why') or 'no reason given'}"
    lock = res.lock_status or {}
    if lock.get("held"):
        from .lock import describe

        return "busy", f"locked by {describe(lock.get('holder'))}"
    return "ready", "reachable, kvmharness info ran" + (f", kernel {kernel}" if kernel else "")


def _yes(v) -> str:
    return "-" if v is None else ("yes" if v else "no")


def capability_row(res: RigResult) -> dict[str, str]:
    """One row of the capability matrix (strings, for the table)."""
    if res.info is None:
        return {"rig": res.rig, "error": res.reason or f"exit {res.status}"}
    i = res.info
    v = i.get("verdicts") or {}
    kvm = i.get("kvm") or {}
    cpu = i.get("cpu") or {}
    sev_dev = i.get("sev_device") or {}
    return {
        "rig": res.rig,
        "kvm": "yes" if kvm.get("accessible") else ("no access" if kvm.get("present") else "no"),
        "svm": _yes((v.get("svm") or {}).get("usable")),
        "npt": _yes(i.get("npt")),
        "sev": _yes((v.get("sev") or {}).get("usable")),
        "sev-es": _yes((v.get("sev-es") or {}).get("usable")),
        "sev-snp": _yes((v.get("sev-snp") or {}).get("usable")),
        "kernel": str(i.get("kernel") or "-"),
        "cpu": str(cpu.get("model_name") or "-"),
        "fw api": str(sev_dev.get("api_version") or "-"),
    }


MATRIX_COLUMNS = ("rig", "kvm", "svm", "npt", "sev", "sev-es", "sev-snp", "kernel", "cpu", "fw api")


def format_matrix(results: list[RigResult]) -> str:
    rows = [capability_row(r) for r in results]
    ok_rows = [r for r in rows if "error" not in r]
    widths = {c: max([len(c)] + [len(r.get(c, "")) for r in ok_rows] + ([len(r["rig"]) for r in rows]
                                                                      if c == "rig" else []))
              for c in MATRIX_COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in MATRIX_COLUMNS).rstrip()]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['rig'].ljust(widths['rig'])}  UNAVAILABLE: {r['error']}")
        else:
            lines.append("  ".join(r[c].ljust(widths[c]) for c in MATRIX_COLUMNS).rstrip())
    for res in results:
        if res.lock_status is not None:
            from .lock import describe

            lk = res.lock_status
            state = (f"held by {describe(lk.get('holder'))}" if lk.get("held")
                     else lk["error"] if lk.get("error") else "free")
            lines.append(f"  {res.rig}: lock {lk['file']}: {state}")
    # Say why a capability is missing, once per rig (the verdicts' own words).
    for res in results:
        for feat, verdict in ((res.info or {}).get("verdicts") or {}).items():
            if isinstance(verdict, dict) and not verdict.get("usable") and verdict.get("why"):
                lines.append(f"  {res.rig}: no {feat}: {verdict['why']}")
    return "\n".join(lines)


# -- rig run -------------------------------------------------------------------
def remote_command(argv: list[str], rdir: str, backend: str, timeout: float) -> str:
    """The shell command run on the rig (in ``rdir/src``, the unpacked tests).

    ``pytest ...`` runs as the venv's ``python -m pytest`` with
    ``--junitxml`` added; anything else runs with the venv first on PATH.
    The coreutils ``timeout`` also bounds it on the rig, so a lost connection
    cannot leave it running forever.
    """
    if not argv:
        raise UsageError("rig run needs a command after --, e.g. rig run -- pytest -m requires_svm")
    q = shlex.quote
    if argv[0] in ("pytest", "py.test"):
        argv = [f"{rdir}/venv/bin/python", "-m", "pytest", *argv[1:],
                f"--junitxml={rdir}/results/junit.xml", "-p", "no:cacheprovider"]
    env = {
        "KVMHARNESS_BACKEND": backend,
        "KVMHARNESS_TRACE_DIR": f"{rdir}/results/traces",
        "PATH": f"{rdir}/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "VIRTUAL_ENV": f"{rdir}/venv",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    envs = " ".join(f"{k}={q(v)}" for k, v in env.items())
    cmd = " ".join(q(a) for a in argv)
    return f"cd {q(rdir + '/src')} && env {envs} timeout -k 10 {int(timeout) + 1} {cmd}"


def _hang_reason(s: _RigSession, opts: RunOptions) -> str:
    why = (f"the rig stopped answering (no SSH reply for {s.hung['silent_for']:.0f} s while "
           f"{s.hung['phase']})")
    if s.rig.power_cycle and not opts.power_cycle_on_hang:
        why += "; --power-cycle-on-hang would power-cycle it with its power_cycle command"
    elif opts.power_cycle_on_hang and not s.rig.power_cycle:
        why += "; it has no power_cycle command in the inventory"
    return why


def run_on_rigs(rigs: list[Rig], opts: RunOptions, *, wheel: Path | None = None,
                project: Path | None = None, progress: Progress | None = None) -> tuple[int, list[RigResult]]:
    """`rig run`: returns (worst status, per-rig results); results land in
    ``opts.results_dir / run_id / rig``."""
    from .lock import whoami

    progress = progress or Progress([r.name for r in rigs], live=False)
    run_id = opts.run_id or new_run_id()
    who = {**whoami(), "run_id": run_id, **(opts.who or {})}
    out_root = opts.results_dir / run_id
    out_root.mkdir(parents=True, exist_ok=True)
    progress.message(f"run {run_id}: results in {out_root}")
    root = project or project_root()
    with tempfile.TemporaryDirectory(prefix="kvmharness-ship-") as tmp:
        whl = wheel or build_wheel(root, Path(tmp), progress.message)
        tgz = Path(tmp) / "tests.tar.gz"
        tgz.write_bytes(pack_tests(root))
        payload = Payload(whl, tgz)

        def work(rig: Rig, cancel: threading.Event) -> RigResult:
            rig_dir = out_root / rig.name
            rig_dir.mkdir(parents=True, exist_ok=True)
            log = open(rig_dir / "output.log", "w", encoding="utf-8")
            s = _RigSession(rig, run_id, progress, cancel, opts.accept_new_host_keys,
                            time.monotonic() + opts.timeout)
            res = RigResult(rig.name)

            def sink(stream: str, line: str) -> None:
                log.write(line + "\n")
                log.flush()
                progress.line(rig.name, line)

            try:
                s.connect()
                s.watch(opts.hang_timeout)
                res.lock_waited = s.take_lock(who, opts.lock_timeout)
                res.lock = s.lock.record
                # The rig's time budget starts once the rig is ours.
                s.deadline = time.monotonic() + opts.timeout
                res.missing = s.install(payload)
                s.step("running")
                budget = s.remaining()
                cmd = remote_command(opts.command, s.dir, opts.backend, budget)
                try:
                    res.status = s.conn.run(cmd, timeout=budget + 15, sink=sink, cancel=cancel,
                                            pgid_file=f"{s.dir}.pgid")
                    if res.status == 124:
                        res.status, res.reason = EXIT_TIMEOUT, f"timed out after {budget:.0f} s on the rig"
                finally:
                    if s.conn.alive and not s.hung:
                        s.progress.phase(rig.name, "fetching")
                        try:
                            got = s.conn.get_tree(f"{s.dir}/results", rig_dir)
                            res.files = [str(p.relative_to(out_root)) for p in got]
                        except RigError as e:
                            res.reason = res.reason or e.reason
            except Exception as e:
                if not s.hung and not isinstance(e, RigError):
                    raise
                if s.hung:
                    res.status, res.reason = EXIT_HOST, _hang_reason(s, opts)
                else:
                    res.status, res.reason = worst_status([res.status, e.exit_code]), e.reason
            finally:
                s.stop_watch()
                try:
                    if s.hung:
                        res.hang = {"phase": s.hung["phase"], "silent_for": s.hung["silent_for"],
                                    "power_cycled": False}
                        if opts.power_cycle_on_hang and rig.power_cycle:
                            try:
                                back = s.power_cycle(opts)
                                res.hang.update(power_cycled=True, recovered_in=round(back, 2))
                                res.reason = (f"power-cycled after hang (no SSH reply for "
                                              f"{s.hung['silent_for']:.0f} s while {s.hung['phase']}; "
                                              f"answering again {back:.1f} s after the power command; "
                                              f"this run's results on it are lost)")
                            except RigError as e:
                                res.reason = e.reason
                    s.progress.phase(rig.name, "cleaning up")
                    res.cleaned = s.cleanup()
                finally:
                    s.release_lock()
                    s.conn.close()
                    log.close()
                    (rig_dir / "result.json").write_text(json.dumps(res.to_dict(), indent=2) + "\n")
            return res

        results = _run_parallel(rigs, work, progress)
    (out_root / "summary.json").write_text(json.dumps(
        {"run_id": run_id, "command": opts.command, "backend": opts.backend,
         "status": worst_status([r.status for r in results]),
         "rigs": [r.to_dict() for r in results]}, indent=2) + "\n")
    return worst_status([r.status for r in results]), results
