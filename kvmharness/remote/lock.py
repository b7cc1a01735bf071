"""A lock on the rig itself, so two `rig run`s never share a rig (no labgrid needed).

The lock is ``flock(2)`` on a file on the rig (the inventory's ``lock_file``,
default ``/tmp/kvmharness-rig-<name>.lock``, beside the runs' directories).  It
is taken by a small Python process started over SSH for the whole run: it holds
the flock and waits for EOF on its stdin, which comes when we release the lock
*or* when the SSH session ends in any way (client killed, connection dropped),
so a dead client never leaves the rig locked.  The holder writes who it is
(user@host, pid, command, run id) and since when into the lock file; a waiter
and `rig check` read that.  Whether the lock is held is asked of the kernel
(a non-blocking flock), never guessed from the file's contents.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import RigCancelled, RigError
from .inventory import Rig

DEFAULT_DIR = "/tmp"  # where the runs' own directories go (rig.REMOTE_BASE)


def lock_path(rig: Rig) -> str:
    return rig.lock_file or f"{DEFAULT_DIR}/kvmharness-rig-{rig.name}.lock"


# Run on the rig with its python: `python3 -c SCRIPT acquire|status PATH [WHO-JSON]`.
# acquire: prints "BUSY <holder json>" whenever the holder it sees changes while it
# waits, then "HELD <our record>" once it has the lock, and holds it until stdin
# reaches EOF (released, or the session is gone).  status: prints one JSON object.
LOCK_PY = r"""
import fcntl, json, os, select, sys, time
mode, path = sys.argv[1], sys.argv[2]

def holder(fd):
    try:
        raw = os.pread(fd, 65536, 0).decode("utf-8", "replace").strip()
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return None

def stdin_closed():
    r, _, _ = select.select([0], [], [], 0)
    return bool(r) and not os.read(0, 4096)

if mode == "status":
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        print(json.dumps({"held": False, "holder": None, "now": time.time()}))
        sys.exit(0)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        held = False
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        held = True
    print(json.dumps({"held": held, "holder": holder(fd) if held else None, "now": time.time()}))
    sys.exit(0)

old = os.umask(0)
try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
finally:
    os.umask(old)
seen = object()
while True:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
    except BlockingIOError:
        h = holder(fd)
        if h != seen:
            print("BUSY " + json.dumps(h), flush=True)
            seen = h
        r, _, _ = select.select([0], [], [], 0.2)
        if r and not os.read(0, 4096):
            sys.exit(0)  # the waiter went away
me = json.loads(sys.argv[3])
me.update(since=time.time(), rig_pid=os.getpid())
os.ftruncate(fd, 0)
os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
print("HELD " + json.dumps(me), flush=True)
while os.read(0, 4096):
    pass
os.ftruncate(fd, 0)  # still ours: nobody else can have it yet
"""


def whoami(command: list[str] | None = None, run_id: str = "") -> dict:
    """Who takes the lock: this user and host, this process and its command line."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return {"user": user, "host": socket.gethostname(), "pid": os.getpid(),
            "command": " ".join(shlex.quote(a) for a in (command or sys.argv)), "run_id": run_id}


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def describe(holder: dict | None, now: float | None = None) -> str:
    """One phrase naming a holder: 'alice@ws1 (pid 42, `kvmharness rig run ...`) since ...'."""
    if not holder:
        return "a holder that has not recorded itself yet"
    who = f"{holder.get('user', '?')}@{holder.get('host', '?')}"
    cmd = holder.get("command") or ""
    if len(cmd) > 80:
        cmd = cmd[:77] + "..."
    since = holder.get("since")
    when = ""
    if isinstance(since, (int, float)):
        when = f" since {_utc(since)}"
        if now is not None:
            when += f" ({max(0.0, now - since):.0f} s)"
    return f"{who} (pid {holder.get('pid', '?')}, `{cmd}`){when}"


@dataclass
class LockStatus:
    path: str
    held: bool
    holder: dict | None
    now: float  # the rig's clock when asked

    def to_dict(self) -> dict:
        since = self.holder.get("since") if self.held and self.holder else None
        return {"file": self.path, "held": self.held, "holder": self.holder,
                "since": _utc(since) if isinstance(since, (int, float)) else None,
                "held_for": round(self.now - since, 1) if isinstance(since, (int, float)) else None}

    def describe(self) -> str:
        return f"locked by {describe(self.holder, self.now)}" if self.held else "free"


def lock_status(conn, rig: Rig, timeout: float = 60.0) -> LockStatus:
    """Who holds the rig's lock now (asked of the rig's kernel)."""
    path = lock_path(rig)
    cmd = f"{shlex.quote(rig.python)} -c {shlex.quote(LOCK_PY)} status {shlex.quote(path)}"
    status, out, err = conn.output(cmd, timeout=timeout)
    try:
        doc = json.loads(out.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RigError(rig.name, f"cannot read the rig's lock {path}: exit {status}: "
                                 f"{' | '.join(err.strip().splitlines()[-2:])}") from None
    return LockStatus(path, bool(doc.get("held")), doc.get("holder"), float(doc.get("now") or time.time()))


class RigBusy(RigError):
    """The rig's lock stayed held for the whole --lock-timeout."""


class RigLock:
    """The rig's lock, held by a remote process for as long as this object is open."""

    def __init__(self, rig: Rig, proc, record: dict):
        self.rig = rig
        self.path = lock_path(rig)
        self._proc = proc
        self.record = record

    def release(self) -> None:
        self._proc.close()

    @property
    def held(self) -> bool:
        return self._proc.running


def acquire(conn, rig: Rig, me: dict, *, timeout: float, cancel: threading.Event | None = None,
            waiting: Callable[[str], None] = lambda msg: None) -> RigLock:
    """Take the rig's lock, waiting up to ``timeout`` s; ``waiting`` gets a line each time
    the holder we wait for changes and then every 30 s.  Raises :class:`RigBusy` naming
    the holder when the time runs out."""
    path = lock_path(rig)
    cmd = (f"exec {shlex.quote(rig.python)} -c {shlex.quote(LOCK_PY)} acquire {shlex.quote(path)} "
           f"{shlex.quote(json.dumps(me))}")
    proc = conn.start(cmd)
    t0 = time.monotonic()
    holder: dict | None = None
    told = 0.0
    try:
        while True:
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                raise RigBusy(rig.name, f"locked by {describe(holder, time.time())}; gave up after "
                                        f"{timeout:g} s (--lock-timeout)")
            if cancel is not None and cancel.is_set():
                raise RigCancelled(rig.name, "interrupted while waiting for the rig's lock")
            line = proc.readline(min(left, 0.5))
            now = time.monotonic()
            if line is None:
                if holder is not None and now - told >= 30:
                    waiting(f"still waiting for the rig's lock ({now - t0:.0f} s), held by "
                            f"{describe(holder, time.time())}")
                    told = now
                continue
            if line.startswith("HELD "):
                return RigLock(rig, proc, json.loads(line[5:]))
            if line.startswith("BUSY "):
                holder = json.loads(line[5:]) or {}
                waiting(f"waiting for the rig's lock {path}, held by {describe(holder, time.time())}"
                        f" (up to {timeout:g} s, --lock-timeout)")
                told = now
                continue
            if line == "":
                if not proc.running:
                    err = " | ".join(proc.stderr().strip().splitlines()[-2:])
                    raise RigError(rig.name, f"cannot take the rig's lock {path}: "
                                             f"{err or 'the lock process ended'}")
                time.sleep(0.05)  # EOF came before the exit status
    except BaseException:
        proc.close()
        raise
