"""Every timeout a user can give is honoured or refused (exit 2), and nothing that
goes wrong in the one watchdog thread can silently disable later timeouts.

Issue 13: ``--timeout 1e308`` (or inf) used to kill the watchdog thread with an
OverflowError from ``Condition.wait`` and exit 0; every later timeout in the
process then never fired.  Each test here ends by checking that a 0.5 s timeout
still fires (the ``spin`` guest, a ``jmp .`` that never exits, on each backend).
No test asserts a duration: the bounds on joins only keep a regression from
hanging the run.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import pytest

from kvmharness import errors as E
from kvmharness.cli import main
from kvmharness.images import get_guest
from kvmharness.machine import Machine, run_guest
from kvmharness.watchdog import MAX_TIMEOUT, WATCHDOG, Watchdog, check_timeout

BAD = [math.inf, -math.inf, math.nan, 0, 0.0, -1, -1e-9, 1e308, MAX_TIMEOUT * 1.0001]
HANG_GUARD = 60.0  # seconds a join waits before calling the run hung (not a timing assertion)


def _spin_times_out(backend: str) -> None:
    """run_guest("spin", timeout=0.5) must end with outcome 'timeout' (in another thread,
    so a dead watchdog fails the test instead of hanging it)."""
    box: dict = {}

    def go():
        try:
            box["result"] = run_guest("spin", backend, timeout=0.5)
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(HANG_GUARD)
    assert not t.is_alive(), f"a 0.5 s timeout on {backend} did not fire: the watchdog is dead"
    assert "error" not in box, box.get("error")
    assert box["result"].outcome == "timeout"
    assert WATCHDOG.alive


@pytest.mark.parametrize("value", BAD + [True, "1", None])
def test_check_timeout_refuses(value):
    with pytest.raises(E.UsageError) as ei:
        check_timeout(value, "--timeout")
    assert "--timeout" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("value", [1e-3, 0.5, 1, 10, MAX_TIMEOUT])
def test_check_timeout_accepts(value):
    assert check_timeout(value) == float(value)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1", "1e308", "86401"])
def test_cli_refuses_bad_timeout_with_exit_2_then_timeouts_still_fire(value, backend, capsys):
    assert main(["run", "hello64", "--backend", backend, f"--timeout={value}"]) == E.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--timeout must be a positive number of seconds, finite" in err and "Traceback" not in err
    _spin_times_out(backend)


@pytest.mark.parametrize("value", BAD)
def test_run_guest_machine_run_and_arm_refuse_then_timeouts_still_fire(value, backend):
    with pytest.raises(E.UsageError):
        run_guest("hello64", backend, timeout=value)
    with Machine.for_guest("hello64", backend) as m:
        with pytest.raises(E.UsageError):
            m.run(value)
        assert m.run(5).ok  # the refused call left the machine usable
    with pytest.raises(E.UsageError):
        WATCHDOG.arm(value, lambda: None)
    _spin_times_out(backend)


@pytest.mark.parametrize("value", [math.inf, math.nan, 0.0, -3.0, 1e308])
def test_bad_manifest_timeout_is_refused_at_run_time(value, backend):
    image = dataclasses.replace(get_guest("hello64"), timeout=value)
    with pytest.raises(E.UsageError, match="manifest timeout"):
        run_guest(image, backend)
    with Machine.for_guest(image, backend) as m:
        with pytest.raises(E.UsageError, match="manifest timeout"):
            m.run()
    _spin_times_out(backend)


def test_the_largest_accepted_timeout_does_not_break_the_watchdog(backend):
    token = WATCHDOG.arm(MAX_TIMEOUT, lambda: None)  # a wait far past any clamp
    try:
        _spin_times_out(backend)
    finally:
        WATCHDOG.disarm(token)


# -- the watchdog survives its own failures (a private instance, no guest needed) ----------
def _fires(wd: Watchdog, seconds: float = 0.05) -> bool:
    fired = threading.Event()
    wd.arm(seconds, fired.set)
    return fired.wait(HANG_GUARD)


def test_watchdog_survives_a_failing_wait():
    wd = Watchdog()
    real_wait = wd._cv.wait
    calls = []

    def flaky_wait(timeout=None):
        calls.append(timeout)
        if len(calls) == 1:
            raise OverflowError("timestamp out of range for platform time_t")
        return real_wait(timeout)

    wd._cv.wait = flaky_wait
    assert _fires(wd, 0.2)
    assert any("OverflowError" in e for e in wd.errors)
    assert _fires(wd)  # and keeps working
    assert wd.alive


def test_watchdog_survives_a_failing_callback_and_a_base_exception():
    wd = Watchdog()

    def boom():
        raise RuntimeError("kick failed")

    wd.arm(0.01, boom)
    assert _fires(wd)
    assert any("kick failed" in e for e in wd.errors)
    wd.arm(0.01, lambda: (_ for _ in ()).throw(SystemExit(3)))
    assert _fires(wd)
    assert wd.alive and wd.restarts == 0


def test_arm_restarts_a_dead_watchdog_thread():
    wd = Watchdog()
    assert _fires(wd)
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    wd._thread = dead  # what a thread killed by anything looks like
    assert _fires(wd)
    assert wd.restarts == 1 and wd.alive and any("restarted" in e for e in wd.errors)


# -- a kick that lands while the simulator enters the guest -----------------------------------
def test_sim_entry_stopped_before_vmrun_is_retried(monkeypatch):
    """A kick's uc_emu_stop can land before the host stub's VMRUN ran (the engine still in
    the stub, host mode); the entry must run the stub again instead of 'running' the stub
    as the guest (which ended in a SHUTDOWN exit about once in 200 short timeouts)."""
    from kvmharness.sim import core as corem

    real_start = corem.Core.start
    stopped = []

    def start(self, begin, count=corem.RUN_COUNT):
        if begin == corem.HOST_STUB and not stopped:
            stopped.append(begin)
            self.set_reg(corem.X.UC_X86_REG_RIP, begin)  # as if stopped before its first instruction
            return corem.UC_ERR_OK
        return real_start(self, begin, count)

    monkeypatch.setattr(corem.Core, "start", start)
    result = run_guest("hello64", "sim")
    assert stopped and result.ok, result.describe()


def test_many_short_timeouts_all_end_as_timeouts(backend):
    outcomes = {run_guest("spin", backend, timeout=0.001).outcome for _ in range(100)}
    assert outcomes == {"timeout"}


def test_watchdog_fires_an_unreadable_deadline_instead_of_failing_on_it_for_ever():
    wd = Watchdog()
    assert _fires(wd)  # thread running
    bad = threading.Event()
    with wd._cv:  # what a bug elsewhere could leave in the heap: a deadline that is no number
        wd._heap.append(("soon", -1, bad.set))
        wd._live.add(-1)
        wd._cv.notify()
    assert bad.wait(HANG_GUARD)
    assert any("TypeError" in e for e in wd.errors)
    assert _fires(wd) and wd.alive


_WORKER_FIRST = r"""
import sys, threading
box = {}
def go():
    try:
        if sys.argv[1] == "import-in-worker":
            import kvmharness.kvm.vcpu  # first import off the main thread: no handler possible
        from kvmharness.machine import run_guest
        box["outcome"] = run_guest("spin", "kvm", timeout=0.5).outcome
    except Exception as e:
        box["outcome"] = type(e).__name__ + ": " + str(e)
if sys.argv[1] == "import-in-main":
    import kvmharness.kvm.vcpu
t = threading.Thread(target=go)
t.start(); t.join(60)
print(box.get("outcome", "hung"))
"""


@pytest.mark.requires_kvm
@pytest.mark.parametrize("where", ["import-in-main", "import-in-worker"])
def test_kvm_first_opened_from_a_worker_thread_times_out_or_refuses_cleanly(where):
    """A kvm backend first opened from a worker thread: the kick must not kill the
    process.  Imported on the main thread (the usual case) the run times out; imported
    only in the worker, opening is refused with a HostError that says why."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _WORKER_FIRST, where], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, f"the process died (rc {p.returncode}): {p.stderr[-2000:]}"
    out = p.stdout.strip().splitlines()[-1]
    if where == "import-in-main":
        assert out == "timeout"
    else:
        assert out.startswith("HostError: cannot bound guest runs"), out
