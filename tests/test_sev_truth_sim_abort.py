"""The simulator never takes the Python process down, whatever an SEV-ES guest does.

``hello`` (a real-mode guest without a #VC handler) run as SEV-ES used to end the
whole process now and then with unicorn's ``tcg.c: assertion failed: !err`` or a
SIGSEGV.  Cause: its first OUT raises #VC, delivered through the real-mode IVT,
which under SEV-ES is encrypted memory the launch never wrote (zeros decrypted
with the guest's key: garbage), so the guest runs garbage that raises
exceptions in a loop; every real-mode delivery makes the simulator build a
fresh unicorn engine, and unicorn initializes an engine lazily in the first
call that needs it -- ``uc_emu_stop`` included.  The watchdog's kick at the
deadline (another thread) reached a freshly built engine before its own thread
had initialized it: two threads in unicorn's init.  ``sim/core.py`` now
publishes an engine to ``stop()`` only once initialized, under its lock.

On hardware the same guest runs the same garbage; what it ends in depends on
the key.  The run must end as a guest outcome (an exit KVM reports, or the
timeout), never as a dead process.  The runs happen in a subprocess, so a
regression fails this test instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("unicorn", reason="the simulator needs unicorn")

# A Machine built directly: Machine.for_guest (and `run`) refuse an SEV-ES launch of a
# guest whose manifest does not declare it; the simulator below them must still hold.
SCRIPT = textwrap.dedent("""
    import json, sys
    from kvmharness.backend import KVM_X86_SEV_ES_VM
    from kvmharness.errors import GuestTimeout
    from kvmharness.images import get_guest
    from kvmharness.machine import Machine

    name, runs, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    image = get_guest(name)
    for _ in range(runs):
        m = Machine("sim", memory=image.memory, vm_type=KVM_X86_SEV_ES_VM, name=name,
                    create_vcpu=False)
        try:
            m._sev_launch(image, image.load(), "sev-es", None, None)
            try:
                r = m.run(timeout=timeout)
                print(json.dumps({"outcome": r.outcome, "exit": type(r.final_exit).__name__,
                                  "vc": m.vcpu.vc_count}), flush=True)
            except GuestTimeout:
                print(json.dumps({"outcome": "timeout"}), flush=True)
        finally:
            m.close()
""")

#: what a run may end in: an exit KVM reports to userspace for a guest that lost its way
CLEAN = {"timeout", "shutdown", "hlt", "internal-error", "sev-terminated", "unhandled",
         "exception", "fail-entry", "unsupported", "done", "fail"}


def _runs(name: str, runs: int, timeout: float) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, name, str(runs), str(timeout)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert proc.returncode == 0, (
        f"the simulator killed the process (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_hello_as_sev_es_ends_as_a_guest_outcome_not_an_abort():
    # 24 short runs: each ends at its deadline kick while the guest loops through
    # real-mode #VC deliveries (an engine rebuild each); before the fix about one run in
    # seven killed the process (measured: 3 of 20 with a 2 s deadline).
    results = _runs("hello", 24, 0.25)
    assert len(results) == 24
    assert {r["outcome"] for r in results} <= CLEAN, results
    assert all(r.get("vc", 1) >= 1 for r in results if r["outcome"] != "timeout")
