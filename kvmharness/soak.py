"""``kvmharness bench --soak``: many machines of each kind, and what they leave behind.

Each kind of machine is run ``count`` times (default 1000) on each backend that can
run it, every one through the whole public lifecycle -- ``run_guest`` opens the
backend, creates the VM (launching it encrypted for SEV / SEV-ES), runs it to its
end and closes everything.  Before and after each batch the process's open file
descriptors, OS threads and resident set size are read (``hostinfo.process_usage``:
psutil enters through hostinfo only).  A machine that keeps anything after
``close()`` shows up as growth: fds and threads must come back exactly, RSS within
the allocator's noise.

Kinds (guest, what its run ends with):

- plain: ``hello64``, done
- sev: ``sev-hello`` launched as an SEV guest, done
- sev-es: ``es-io`` launched as an SEV-ES guest (GHCB IO and MSR exits), done
- triple-fault: ``fault``, a shutdown exit (KVM_EXIT_SHUTDOWN)
- timeout: ``spin`` (``jmp .``) with a :data:`SOAK_TIMEOUT` deadline: the watchdog
  kicks the vCPU and the VM is torn down

A kind the backend cannot run here is reported with the reason and skipped.
Numbers, not pass/fail: the exit status is 1 only if a machine ended other than
as its guest expects.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time

from .errors import EXIT_GUEST_FAILED, EXIT_OK, HarnessError, HostError, UsageError

KINDS = (  # (kind, guest)
    ("plain", "hello64"),
    ("sev", "sev-hello"),
    ("sev-es", "es-io"),
    ("triple-fault", "fault"),
    ("timeout", "spin"),
)
DEFAULT_COUNT = 1000
WARMUP = 5  # runs of each kind before its "before" reading: first-use caches and the allocator's arenas
SOAK_TIMEOUT = 0.02  # seconds: the timeout kind's deadline (short: the spin never ends anyway)
SETTLE_S = 2.0  # the longest wait for transient threads (the simulator's kick re-tries) to end
MIB = 1 << 20


def usage() -> dict:
    """fds, threads and RSS (bytes) now, after a full collection and transient threads ended."""
    from .hostinfo import process_usage

    gc.collect()
    return process_usage()


def _settled() -> dict:
    """Usage once transient threads are gone: the simulator's kick starts two short
    ``threading.Timer`` re-tries (sim/vcpu.py, 5 and 50 ms), joined here (up to SETTLE_S);
    any other thread, or a timer still alive after that, is counted."""
    deadline = time.monotonic() + SETTLE_S
    for t in threading.enumerate():
        if isinstance(t, threading.Timer):
            t.join(max(0.0, deadline - time.monotonic()))
    return usage()


def _run_one(guest: str, backend: str) -> tuple[bool, str]:
    from .machine import run_guest

    timeout = SOAK_TIMEOUT if guest == "spin" else None
    result = run_guest(guest, backend, timeout=timeout)
    return result.ok, result.describe()


def soak_batch(kind: str, guest: str, backend: str, count: int, progress=None,
               warmup: int = WARMUP) -> dict:
    """Run ``count`` machines of one kind on one backend; usage before (after ``warmup``
    runs) and after, and the failures.  A kind the backend cannot run is returned as
    ``{"unavailable": why}``."""
    row = {"backend": backend, "kind": kind, "guest": guest, "count": count}
    try:
        for _ in range(warmup):
            _run_one(guest, backend)
    except (HostError, UsageError) as e:  # this backend cannot run it here
        row["unavailable"] = str(e)
        return row
    before = _settled()
    failures: list[str] = []
    step = max(1, count // 10)
    t0 = time.perf_counter()
    for i in range(1, count + 1):
        try:
            ok, why = _run_one(guest, backend)
        except HarnessError as e:
            ok, why = False, f"{type(e).__name__}: {e}"
        if not ok:
            failures.append(why)
        if progress and (i % step == 0 or i == count):
            progress(f"soak {backend} {kind}: {i}/{count}, "
                     f"rss {usage()['rss'] / MIB:.1f} MiB, {len(failures)} failed")
    elapsed = time.perf_counter() - t0
    after = _settled()
    row.update(before=before, after=after, elapsed_s=round(elapsed, 3),
               growth={k: after[k] - before[k] for k in before},
               failures=len(failures), first_failure=failures[0] if failures else None)
    return row


def backends_here() -> list[tuple[str, str | None]]:
    """(backend, why not usable or None) for kvm and sim."""
    from .backend import kvm_usable

    ok, why = kvm_usable()
    return [("kvm", None if ok else why), ("sim", None)]


def run_soak(count: int = DEFAULT_COUNT, kinds=KINDS, backends=None, progress=None,
             warmup: int = WARMUP) -> dict:
    """Every kind on every backend; process usage at the start and the end as well."""
    if count < 1:
        raise UsageError(f"--count must be at least 1, not {count}")
    start = _settled()
    rows = []
    for backend, why in backends if backends is not None else backends_here():
        for kind, guest in kinds:
            if why is not None:
                rows.append({"backend": backend, "kind": kind, "guest": guest, "count": count,
                             "unavailable": why})
                continue
            if progress:
                progress(f"soak {backend} {kind}: {count} x {guest}")
            rows.append(soak_batch(kind, guest, backend, count, progress, warmup))
    return {"count": count, "warmup": warmup, "start": start, "end": _settled(), "batches": rows}


def _fmt(u: dict) -> str:
    return f"fds {u['fds']:>3}  threads {u['threads']:>2}  rss {u['rss'] / MIB:7.1f} MiB"


def main(args) -> int:
    """``kvmharness bench --soak [--count N] [--only kvm|sim|all] [--json]``."""
    def progress(msg):
        print(f"... {msg}", file=sys.stderr, flush=True)

    only = getattr(args, "only", "all") or "all"
    backends = [(b, why) for b, why in backends_here() if only in ("all", b)]
    out = run_soak(args.count if args.count is not None else DEFAULT_COUNT, backends=backends,
                   progress=progress)
    failed = any(r.get("failures") for r in out["batches"])
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_GUEST_FAILED if failed else EXIT_OK
    print(f"soak: {out['count']} machines of each kind per backend (after {out['warmup']} warm-up runs)")
    for r in out["batches"]:
        head = f"{r['backend']:<4} {r['kind']:<13}"
        if "unavailable" in r:
            print(f"{head} unavailable: {r['unavailable']}")
            continue
        g = r["growth"]
        print(f"{head} before {_fmt(r['before'])}")
        print(f"{'':<18} after  {_fmt(r['after'])}   growth fds {g['fds']:+d}, threads "
              f"{g['threads']:+d}, rss {g['rss'] / MIB:+.1f} MiB; {r['elapsed_s']:.1f} s, "
              f"{r['failures']} failed" + (f" (first: {r['first_failure']})" if r["failures"] else ""))
    print(f"process: start {_fmt(out['start'])}")
    print(f"         end   {_fmt(out['end'])}")
    return EXIT_GUEST_FAILED if failed else EXIT_OK
