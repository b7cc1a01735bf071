"""``kvmharness bench``: the harness against a C reference on the same /dev/kvm, in one run.

Numbers, never pass/fail: the output is exits/s of the C loop and of the full
harness path (typed exit values, device-bus dispatch, the Machine loop), their
ratio, Python user CPU per exit, and the cost of a VM lifecycle (create VM,
vCPU, 4 MiB, run to HLT, close) for both.  Runs are interleaved C, harness,
C, harness ... so drift on a noisy machine hits both sides alike; the report
gives medians.  ``--only sim`` (or ``all``) adds the simulator's numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import EXIT_OK, HostError

REF_SOURCE = Path(__file__).with_name("bench_ref.c")


def build_reference() -> Path:
    """Compile bench_ref.c with gcc into a cache directory (once per source version)."""
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if not cc:
        raise HostError("the benchmark's C reference needs gcc (apt-get install gcc)")
    src = REF_SOURCE.read_bytes()
    tag = hashlib.sha256(src).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvmharness"
    cache.mkdir(parents=True, exist_ok=True)
    exe = cache / f"bench_ref-{tag}"
    if not exe.exists():
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench_ref"
            r = subprocess.run([cc, "-O2", "-o", str(out), str(REF_SOURCE)], capture_output=True, text=True)
            if r.returncode:
                raise HostError(f"building the C reference failed:\n{r.stderr.strip()}")
            shutil.move(str(out), exe)
    return exe


def _c(exe: Path, *args) -> dict:
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise HostError(f"C reference failed: {r.stderr.strip()}")
    return json.loads(r.stdout)


def _user_cpu() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def harness_ioloop(system) -> dict:
    """The full harness path: Machine loop, typed exits, device bus, NullDevice on BENCH_PORT."""
    from .machine import Machine

    with Machine.for_guest("ioloop", system) as m:
        u0 = _user_cpu()
        t0 = time.perf_counter()
        result = m.run(120, record=False)
        t = time.perf_counter() - t0
        u = _user_cpu() - u0
        if result.outcome != "hlt":
            raise HostError(f"ioloop ended with {result.outcome}: {result.describe()}")
        return {"exits": result.exit_count, "port_exits": m.bench_port.writes, "seconds": t,
                "user_seconds": u}


def bare_cffi_ioloop(system) -> dict:
    """The floor: KVM_RUN through cffi and one read of exit_reason per exit, no harness."""
    from .kvm._ffi import KVM_RUN, ffi, libc
    from .machine import Machine

    with Machine.for_guest("ioloop", system) as m:
        fd, run, kvm_run, null = m.vcpu.fd, libc.ioctl, m.vcpu.kvm_run, ffi.NULL
        n = 0
        u0 = _user_cpu()
        t0 = time.perf_counter()
        while True:
            if run(fd, KVM_RUN, null) < 0:
                raise HostError("KVM_RUN failed in the bare loop")
            n += 1
            if kvm_run.exit_reason != 2:
                break
        t = time.perf_counter() - t0
        return {"exits": n, "seconds": t, "user_seconds": _user_cpu() - u0}


def harness_lifecycle(system, image: bytes, n: int) -> dict:
    """The same ioctls as the C lifecycle, through the harness's objects."""
    from .boot import real_mode_state
    from .exits import Hlt
    from .protocol import GUEST_LOAD_ADDR

    t0 = time.perf_counter()
    for _ in range(n):
        vm = system.create_vm()
        vm.add_memory(0, 4 << 20)
        vcpu = vm.create_vcpu()
        vm.write(GUEST_LOAD_ADDR, image)
        regs, sregs = real_mode_state()
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        e = vcpu.run()
        if type(e) is not Hlt:
            raise HostError(f"lifecycle guest ended with {e}, not HLT")
        vm.close()
    return {"count": n, "seconds": time.perf_counter() - t0}


def machine_lifecycle(system, n: int) -> dict:
    """One-line common case per VM: Machine.for_guest('halt') + run + close."""
    from .machine import Machine

    t0 = time.perf_counter()
    for _ in range(n):
        with Machine.for_guest("halt", system) as m:
            m.run(10, record=False)
    return {"count": n, "seconds": time.perf_counter() - t0}


def _med(values):
    return statistics.median(values)


def bench_kvm(rounds: int, lifecycles: int, progress) -> dict:
    from .factory import open_backend
    from .images import get_guest

    exe = build_reference()
    system = open_backend("kvm")
    try:
        io_img = get_guest("ioloop").path
        halt = get_guest("halt")
        halt_bytes = halt.load()
        c_io, h_io, b_io, c_lc, h_lc, m_lc = [], [], [], [], [], []
        for r in range(rounds):
            progress(f"kvm round {r + 1}/{rounds}: C ioloop")
            c_io.append(_c(exe, "ioloop", io_img))
            progress(f"kvm round {r + 1}/{rounds}: harness ioloop")
            h_io.append(harness_ioloop(system))
            progress(f"kvm round {r + 1}/{rounds}: bare cffi loop")
            b_io.append(bare_cffi_ioloop(system))
            progress(f"kvm round {r + 1}/{rounds}: C lifecycle x{lifecycles}")
            c_lc.append(_c(exe, "lifecycle", halt.path, lifecycles))
            progress(f"kvm round {r + 1}/{rounds}: harness lifecycle x{lifecycles}")
            h_lc.append(harness_lifecycle(system, halt_bytes, lifecycles))
            m_lc.append(machine_lifecycle(system, max(1, lifecycles // 4)))
    finally:
        system.close()
    c_rate = _med([d["exits"] / d["seconds"] for d in c_io])
    h_rate = _med([d["exits"] / d["seconds"] for d in h_io])
    h_user = _med([d["user_seconds"] / d["exits"] for d in h_io])
    c_user = _med([d["user_seconds"] / d["exits"] for d in c_io])
    b_rate = _med([d["exits"] / d["seconds"] for d in b_io])
    b_user = _med([d["user_seconds"] / d["exits"] for d in b_io])
    c_vm = _med([d["seconds"] / d["count"] for d in c_lc])
    h_vm = _med([d["seconds"] / d["count"] for d in h_lc])
    m_vm = _med([d["seconds"] / d["count"] for d in m_lc])
    return {
        "exits_per_run": h_io[0]["exits"],
        "c_exits_per_s": round(c_rate), "harness_exits_per_s": round(h_rate),
        "exit_ratio_harness_over_c": round(h_rate / c_rate, 3),
        "harness_user_cpu_us_per_exit": round(h_user * 1e6, 3),
        "c_user_cpu_us_per_exit": round(c_user * 1e6, 3),
        "bare_cffi_exits_per_s": round(b_rate), "bare_cffi_user_cpu_us_per_exit": round(b_user * 1e6, 3),
        "c_lifecycle_us": round(c_vm * 1e6, 1), "harness_lifecycle_us": round(h_vm * 1e6, 1),
        "lifecycle_ratio_harness_over_c": round(h_vm / c_vm, 3),
        "machine_for_guest_lifecycle_us": round(m_vm * 1e6, 1),
        "targets": {"exit_ratio": ">= 0.95", "user_cpu_us_per_exit": "<= 1.0", "lifecycle_ratio": "<= 1.1"},
    }


def bench_sim(progress) -> dict | None:
    try:
        from .sim.bench import bench_sim as run
    except ImportError:
        return None
    progress("sim: ioloop, straight-line instructions")
    out = run()
    try:
        from .sim.sevbench import bench_sev
    except ImportError:
        return out
    progress("sim: SEV launch, memory encryption, SEV-ES VMGEXIT and #VC")
    out["sev"] = bench_sev(repeat=3, n_cpuid=5_000, n_vmgexit=5_000)
    return out


def run_bench(args) -> int:
    if getattr(args, "soak", False):  # kvmharness bench --soak: leaks, not speed
        from .soak import main as soak_main

        return soak_main(args)

    def progress(msg):
        if not args.json:
            print(f"... {msg}", file=sys.stderr, flush=True)

    out: dict = {}
    if args.only in ("kvm", "all"):
        out["kvm"] = bench_kvm(args.rounds, args.lifecycles, progress)
    if args.only in ("sim", "all"):
        out["sim"] = bench_sim(progress)
        if out["sim"] and out.get("kvm"):
            out["sim"]["sim_over_kvm_exit_rate"] = round(
                out["sim"].get("exits_per_s", 0) / out["kvm"]["harness_exits_per_s"], 3)
    if args.json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    k = out.get("kvm")
    if k:
        print(f"kvm, {k['exits_per_run']} IO exits per run, medians of {args.rounds} interleaved rounds:")
        print(f"  C loop          {k['c_exits_per_s']:>10,} exits/s")
        print(f"  harness         {k['harness_exits_per_s']:>10,} exits/s   ratio {k['exit_ratio_harness_over_c']:.3f} (target >= 0.95)")
        print(f"  bare cffi loop  {k['bare_cffi_exits_per_s']:>10,} exits/s   (KVM_RUN + exit_reason only: "
              f"{k['bare_cffi_user_cpu_us_per_exit']:.3f} us user CPU per exit, the floor for Python)")
        print(f"  harness user CPU per exit {k['harness_user_cpu_us_per_exit']:.3f} us (C {k['c_user_cpu_us_per_exit']:.3f} us; target <= 1.0)")
        print(f"  VM lifecycle    C {k['c_lifecycle_us']:.0f} us, harness {k['harness_lifecycle_us']:.0f} us, "
              f"ratio {k['lifecycle_ratio_harness_over_c']:.3f} (target <= 1.1)")
        print(f"  Machine.for_guest('halt') + run + close: {k['machine_for_guest_lifecycle_us']:.0f} us")
    s = out.get("sim")
    if s:
        print("sim:")
        for key, value in s.items():
            if isinstance(value, dict):
                print(f"  {key}:")
                for k2, v2 in value.items():
                    print(f"    {k2}: {v2}")
            else:
                print(f"  {key}: {value}")
    elif args.only in ("sim", "all"):
        print("sim: not available in this build")
    return EXIT_OK
