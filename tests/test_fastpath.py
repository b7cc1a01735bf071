"""The compiled exit path (kvm/fastpath.c) and the lean pure-Python one give the same runs.

Every guest this host's KVM can run is run three ways -- the C loop, the pure-Python
loop (``KvmVcpu.runner``) and the plain ``Vcpu.run`` -- and the RunResults must be
equal field for field (exits recorded, console, reports, registers, counts).  The C
loop's own contract is checked directly: sinks counted, posted writes queued in order,
the budget, EINTR on a kick, the GIL released while it runs.  No timing is asserted.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from kvmharness import clib
from kvmharness import exits as X
from kvmharness import protocol as P
from kvmharness.backend import open_backend
from kvmharness.errors import GuestTimeout
from kvmharness.images import get_guest, load_manifest
from kvmharness.kvm import fastpath
from kvmharness.machine import Machine, needs_met

pytestmark = pytest.mark.requires_kvm

HANG_GUARD = 60.0  # seconds a join waits before calling the run hung (not a timing assertion)


@pytest.fixture(scope="module")
def kvm():
    system = open_backend("kvm")  # in the main thread: installs the kick signal's handler
    yield system
    system.close()


@pytest.fixture
def compiled():
    active, why = fastpath.status()
    if not active:
        pytest.skip(f"the compiled exit path is not available here: {why}")


def _runnable(system) -> list[str]:
    names = []
    for name, image in sorted(load_manifest().items()):
        if image.expect == "timeout" or any(n.startswith(("sev", "svm", "nested")) for n in image.needs):
            continue
        if needs_met(system, image.needs)[0]:
            names.append(name)
    return names


def _run(system, guest: str, how: str, **kw):
    with Machine.for_guest(guest, system) as m:
        if how == "python":
            m.fast_path = False
        elif how == "plain":
            m.fast_path = False
            m.vcpu.runner = lambda: m.vcpu.run  # the Machine loop calls Vcpu.run() itself
        result = m.run(**kw)
        return result, m.bench_port.writes, list(m.mmio_scratch.log), dict(m.msrs.values)


# KVM's tracepoints the guest's own instructions determine.  kvm_exit (and kvm_inj_*) also
# record exits KVM handles itself for reasons of the host's: on kvm_amd a nested page fault
# on a page's first touch (guest RAM is MAP_NORESERVE) or a host interrupt, which differ from
# one run to the next whatever loop issues KVM_RUN (seen on the rig: one extra NPF exit).
GUEST_DETERMINED = {"kvm_cpuid", "kvm_msr", "kvm_pio", "kvm_mmio", "kvm_userspace_exit",
                    "kvm_hypercall"}


def _same(a, b):
    da, db = a[0].to_dict(), b[0].to_dict()
    for d in (da, db):
        d.pop("elapsed_s")
        d["kernel_trace"] = [e for e in d["kernel_trace"] if e["event"] in GUEST_DETERMINED]
        for event in d["kernel_trace"]:  # in the same order, at other times
            event.pop("timestamp")
    assert da == db
    assert a[1:] == b[1:]


@pytest.mark.parametrize("trace", [False, True], ids=["record", "trace"])
def test_every_guest_gives_the_same_result_on_every_exit_path(kvm, compiled, trace):
    guests = [g for g in _runnable(kvm) if g != "ioloop"]
    assert {"hello", "mmio", "cpuid"} <= set(guests)
    for guest in guests:
        fast = _run(kvm, guest, "fast", trace=trace)
        _same(fast, _run(kvm, guest, "python", trace=trace))
        _same(fast, _run(kvm, guest, "plain", trace=trace))
        assert fast[0].exit_count == len(fast[0].exits) > 0
        if trace:
            assert all(r.rip is not None for r in fast[0].exits)


def test_the_console_and_the_mmio_window_are_posted_and_replayed_in_order(kvm, compiled):
    hello = _run(kvm, "hello", "fast")
    assert "Hello" in hello[0].console
    assert [type(r.exit) for r in hello[0].exits].count(X.IoOut) == hello[0].exit_count
    mmio = _run(kvm, "mmio", "fast")
    assert mmio[2] and [op for op, *_ in mmio[2]].count("w") >= 1  # writes replayed before the reads
    _same(mmio, _run(kvm, "mmio", "python"))


@pytest.mark.parametrize("record", [False, True], ids=["count-only", "recorded"])
def test_sink_exits_are_counted_in_c_and_credited_to_the_device(kvm, compiled, record):
    fast = _run(kvm, "ioloop", "fast", record=record)
    python = _run(kvm, "ioloop", "python", record=record)
    assert fast[0].outcome == python[0].outcome == "hlt"
    assert fast[0].exit_count == python[0].exit_count == 200_001
    assert fast[1] == python[1] == 200_000
    if record:
        assert fast[0].exits == python[0].exits
        assert fast[0].exits[0].exit == X.IoOut(P.BENCH_PORT, 1, 1, b"\0")


def test_hooks_force_the_python_path_and_see_every_exit(kvm, compiled):
    seen = []
    with Machine.for_guest("hello", kvm) as m:
        m.on_exit(lambda machine, e: seen.append(e))
        r = m.run()
        assert m.vcpu._fast is None  # the C loop was never set up
    assert len(seen) == r.exit_count and seen == [t.exit for t in r.exits]


def _ioloop_vcpu(kvm):
    m = Machine.for_guest("ioloop", kvm)
    return m, m.vcpu.fast_loop()


def test_c_loop_budget_ring_and_sinks(kvm, compiled):
    m, fast = _ioloop_vcpu(kvm)
    with m:
        fast.configure({P.BENCH_PORT: ("posted", 3)}, [], budget=1000)
        assert fast.run() == 1 and fast.exits == 1000 and fast.sunk_total == 0
        recs = fast.records()
        assert len(recs) == 1000
        assert all(e == X.IoOut(P.BENCH_PORT, 1, 1, b"\0") and slot == 3 for e, slot, _ in recs)
        fast.configure({P.BENCH_PORT: ("sink", 7)}, [])
        assert fast.run() == 1  # the default budget (65536 exits) returns with nothing pending
        assert fast.exits == fast.sunk_total == fast.take_sunk(7) == 65536 and fast.records() == []
        assert fast.take_sunk(7) == 0
        fast.configure({}, [])  # the port is Python's again: every exit comes back
        assert fast.run() == 0 and fast.exits == 0
        assert m.vcpu.decode_exit() == X.IoOut(P.BENCH_PORT, 1, 1, b"\0")


def test_the_ring_never_overflows(kvm, compiled):
    """Posted writes beyond the ring's room return to Python (1) with nothing lost."""
    m, fast = _ioloop_vcpu(kvm)
    with m:
        fast.configure({P.BENCH_PORT: ("posted", 0)}, [], budget=10_000_000)
        rc = fast.run()
        assert rc == 1 and 0 < fast.exits == len(fast.records()) < 10_000_000
        assert fast.exits * 40 <= fastpath.RING_SIZE  # 32-byte header + 8 bytes of data each


def test_a_kick_interrupts_the_c_loop(kvm, compiled):
    m, fast = _ioloop_vcpu(kvm)
    with m:
        fast.configure({P.BENCH_PORT: ("sink", 0)}, [])
        m.vcpu.kick()  # immediate_exit set: the next KVM_RUN returns EINTR at once
        assert fast.run() == -1 and fast.exits == 0
        with pytest.raises(InterruptedError):
            fast.raise_error()
        assert m.vcpu.kvm_run.immediate_exit == 0
        assert fast.run() == 1  # and it runs again


@pytest.mark.parametrize("guest", ["spin", "ioloop"])
def test_timeouts_fire_in_the_c_loop(kvm, compiled, guest):
    """spin never exits (the signal interrupts KVM_RUN); ioloop exits all the time into a
    sink (immediate_exit catches a signal that lands between two KVM_RUNs)."""
    with Machine.for_guest(guest, kvm) as m, pytest.raises(GuestTimeout) as info:
        m.run(timeout=0.05 if guest == "ioloop" else 0.3)
    assert m.vcpu is None  # torn down
    if guest == "ioloop":
        assert 0 < info.value.exits < 200_001


def test_the_gil_is_released_while_the_c_loop_runs(kvm, compiled):
    """Another thread runs Python while a vCPU thread is inside kh_run (in_run is set by C)."""
    m = Machine.for_guest("spin", kvm)
    box: dict = {}

    def worker():
        try:
            m.run(timeout=1.0)
        except GuestTimeout as t:
            box["timeout"] = t

    t = threading.Thread(target=worker)
    t.start()
    seen = False
    deadline = time.monotonic() + HANG_GUARD
    while t.is_alive() and time.monotonic() < deadline:
        fast = m.vcpu._fast if m.vcpu is not None else None
        if fast is not None and fast.busy:
            seen = True
            break
        time.sleep(0.001)
    t.join(HANG_GUARD)
    assert not t.is_alive()
    assert seen, "this thread never ran while the vCPU thread was inside the C loop"
    assert "timeout" in box


def test_env_var_forces_the_python_path(kvm, monkeypatch):
    monkeypatch.setenv(fastpath.ENV, "0")
    assert fastpath.status() == (False, "pure Python (KVMHARNESS_FASTPATH=0)")
    with Machine.for_guest("hello", kvm) as m:
        assert m.vcpu.fast_loop() is None
        assert m.run().ok and m.vcpu._fast is None


def test_no_compiler_falls_back_to_python_and_says_why(kvm, monkeypatch, tmp_path):
    import tempfile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("CC", "false")
    monkeypatch.delenv(fastpath.ENV, raising=False)
    # an installed wheel carries the library built at install time (setup.py): hide it
    monkeypatch.setattr(clib, "installed", lambda path: False)
    fastpath.reset()
    try:
        active, why = fastpath.status()
        assert not active and why.startswith("pure Python: building fastpath.c with") and "failed" in why
        result = run_with_hello(kvm)
        assert result.ok
        monkeypatch.setenv(fastpath.ENV, "1")
        with pytest.raises(Exception, match="KVMHARNESS_FASTPATH=1 but the compiled exit path is unavailable"):
            fastpath.load()
    finally:
        fastpath.reset()


def run_with_hello(kvm):
    with Machine.for_guest("hello", kvm) as m:
        assert m.vcpu.fast_loop() is None
        return m.run()


def test_fast_plan_declares_only_opted_in_devices():
    from kvmharness.devices import Console, DeviceBus, NullDevice, RamLikeMmio

    class Noisy(Console):
        fast_kind = None

    bus = DeviceBus()
    console, null = Console(), NullDevice()
    bus.add_ports(0x10, 2, console)
    bus.add_ports(0x20, 1, null)
    bus.add_ports(0x30, 1, Noisy())
    bus.add_mmio(0x1000, 0x100, RamLikeMmio(0x1000, 0x100))
    plan = bus.fast_plan()
    assert plan.ports == {0x10: ("posted", 0), 0x11: ("posted", 0), 0x20: ("sink", 1)}
    assert plan.mmio == [(0x1000, 0x1100, "posted", 2)]
    assert plan.sinks == [(1, null.fast_sunk)]
    recorded = bus.fast_plan(record=True)  # recording: sinks are replayed through io_out
    assert recorded.ports[0x20] == ("posted", 1) and recorded.sinks == []
    assert get_guest("ioloop").expect == "hlt"


def test_info_says_which_exit_path_is_active(monkeypatch, capsys):
    import json

    from kvmharness.cli import main

    monkeypatch.setenv(fastpath.ENV, "0")
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["exit_path"] == {
        "compiled": False, "description": "pure Python (KVMHARNESS_FASTPATH=0)"}
    monkeypatch.delenv(fastpath.ENV)
    assert main(["info"]) == 0
    active, why = fastpath.status()
    assert capsys.readouterr().out.rstrip().endswith(f"exit path: {why}")


def test_bench_runs_the_harness_on_both_paths(kvm):
    from kvmharness.bench import GOALS, _goal, harness_ioloop

    active, _ = fastpath.status()
    fast, python = harness_ioloop(kvm, fast=True), harness_ioloop(kvm, fast=False)
    assert fast["path"] == ("compiled" if active else "python") and python["path"] == "python"
    assert fast["exits"] == python["exits"] == 200_001 and fast["port_exits"] == python["port_exits"] == 200_000
    assert set(GOALS) >= {"compiled_exit_ratio", "python_exit_ratio", "lifecycle_ratio_harness_over_c"}
    assert _goal("lifecycle_ratio_harness_over_c", 1.2)["met"] is False
    assert _goal("python_exit_ratio", 0.7) == {"value": 0.7, "goal": ">= 0.65", "met": True}


def test_a_failed_kvm_run_in_the_c_loop_names_the_ioctl_errno_and_hint(kvm, compiled):
    from kvmharness.errors import KvmError

    vm = kvm.create_vm()
    try:
        vcpu = vm.create_vcpu(0)  # no memory slot: KVM_RUN fails with ENOSPC
        fast = vcpu.fast_loop()
        fast.configure({}, [])
        assert fast.run() == -1
        with pytest.raises(KvmError, match="KVM_RUN failed: ENOSPC.*no memory slot"):
            fast.raise_error(getattr(vcpu, "run_failure_hint", None) or vcpu._run_failure_hint)
    finally:
        vm.close()


@pytest.mark.parametrize("fast", [True, False], ids=["compiled", "python"])
def test_machines_in_threads_each_run_to_the_end(kvm, fast):
    """The bench's scaling figure: two Machines in two threads at once, every exit counted."""
    from kvmharness.bench import harness_threads

    r = harness_threads(kvm, 2, fast=fast)
    assert r["threads"] == 2 and r["exits"] == 2 * 200_001 and r["seconds"] > 0


def test_the_c_loop_of_a_closed_vcpu_never_runs_again(kvm, compiled):
    import errno

    from kvmharness.errors import KvmError

    m, fast = _ioloop_vcpu(kvm)
    m.close()
    assert fast.run() == -1 and fast.cb.err == errno.EBADF  # not whatever now holds the fd number
    with pytest.raises(KvmError, match="EBADF"):
        fast.raise_error()


def test_a_library_in_a_directory_others_can_write_is_never_loaded(monkeypatch, tmp_path):
    import hashlib
    import platform
    import tempfile

    cache = tmp_path / "cache" / "kvmharness"
    cache.mkdir(parents=True)
    tag = hashlib.sha256(fastpath.SOURCE.read_bytes()).hexdigest()[:16]
    planted = cache / f"fastpath-{tag}-{platform.machine()}.so"
    planted.write_bytes(b"not a library")
    cache.chmod(0o777)  # anyone could have put it there
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.delenv("CC", raising=False)
    path, why = fastpath.library_path()
    assert path != planted
    if clib.compiler() is not None:  # built afresh in the private fallback directory
        assert why == "built" and path.parent == tmp_path / "tmp" / f"kvmharness-{os.getuid()}"
        assert path.parent.stat().st_mode & 0o077 == 0
