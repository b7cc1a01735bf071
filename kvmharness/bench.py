"""``kvmharness bench``: the harness against a C reference on the same /dev/kvm, in one run.

Numbers, never pass/fail: the output is exits/s of the C loop and of the full
harness path (typed exit values, device-bus dispatch, the Machine loop), their
ratio, Python user CPU per exit, and the cost of a VM lifecycle (create VM,
vCPU, 4 MiB, run to HLT, close) for both.  Runs are interleaved C, harness,
C, harness ... so drift on a noisy machine hits both sides alike; the report
gives medians.  ``--only sim`` (or ``all``) adds the simulator's numbers.

The harness runs twice per round: through the compiled exit path
(``kvm/fastpath.c``) where it is active here, and through the pure-Python loop;
the report says which path ``Machine.run`` takes by default (``exit_path``) and
prints each figure beside its goal (issue 15; ``GOALS``).  Each ratio is the
median of the per-round ratios against that round's C run.
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


def harness_ioloop(system, fast: bool = True) -> dict:
    """The full harness path: Machine loop, typed exits, device bus, NullDevice on BENCH_PORT;
    ``fast``: through the compiled exit path where it is active, else the pure-Python loop."""
    from .machine import Machine

    with Machine.for_guest("ioloop", system) as m:
        m.fast_path = fast
        u0 = _user_cpu()
        t0 = time.perf_counter()
        result = m.run(120, record=False)
        t = time.perf_counter() - t0
        u = _user_cpu() - u0
        if result.outcome != "hlt":
            raise HostError(f"ioloop ended with {result.outcome}: {result.describe()}")
        return {"exits": result.exit_count, "port_exits": m.bench_port.writes, "seconds": t,
                "user_seconds": u, "path": m.exit_path}


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
    """The same ioctls as the C lifecycle, through the harness's objects (the entry state as
    Machine gives it: boot.entry_state, built once and packed once)."""
    from .boot import entry_state
    from .exits import Hlt
    from .protocol import GUEST_LOAD_ADDR

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for _ in range(n):
        vm = system.create_vm()
        vm.add_memory(0, 4 << 20)
        vcpu = vm.create_vcpu()
        vm.write(GUEST_LOAD_ADDR, image)
        regs, sregs = entry_state("real")
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        e = vcpu.run()
        if type(e) is not Hlt:
            raise HostError(f"lifecycle guest ended with {e}, not HLT")
        vm.close()
    t = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"count": n, "seconds": t, "user_seconds": r1.ru_utime - r0.ru_utime,
            "sys_seconds": r1.ru_stime - r0.ru_stime}


def harness_threads(system, threads: int, fast: bool = True) -> dict:
    """``threads`` Machines on ``ioloop``, each run in its own thread at once: aggregate exits/s.

    Each thread's exits go through the compiled loop (the GIL released while it runs) or,
    with ``fast=False``, through the pure-Python loop (each exit holding the GIL)."""
    import threading

    from .machine import Machine

    machines = [Machine.for_guest("ioloop", system) for _ in range(threads)]
    results: list = [None] * threads
    errors: list = []
    start = threading.Barrier(threads + 1)

    def work(i: int) -> None:
        m = machines[i]
        m.fast_path = fast
        start.wait()
        try:
            results[i] = m.run(120, record=False)
        except BaseException as e:  # reported below, in this thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    try:
        for w in workers:
            w.start()
        start.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        t = time.perf_counter() - t0
    finally:
        for m in machines:
            m.close()
    if errors:
        raise errors[0]
    exits = sum(r.exit_count for r in results)
    return {"threads": threads, "exits": exits, "seconds": t, "exits_per_s": exits / t}


def harness_vcpus(system, vcpus: int, fast: bool = True) -> dict:
    """One Machine with ``vcpus`` vCPUs on ``ioloop``, each vCPU on its own thread
    (kvmharness/smp.py): aggregate exits/s of the VM."""
    from .machine import Machine
    from .smp import run_vcpus

    with Machine.for_guest("ioloop", system, vcpus=vcpus) as m:
        m.fast_path = fast
        t0 = time.perf_counter()
        results = run_vcpus(m, 120)
        t = time.perf_counter() - t0
        exits = sum(r.exit_count for r in results)
        return {"vcpus": vcpus, "exits": exits, "seconds": t, "exits_per_s": exits / t, "path": m.exit_path}


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


#: Thread counts of the scaling figure (Machines in that many threads at once).
SCALING_THREADS = (1, 2, 4)

#: Each figure's goal (issue 15), as (key, comparison, bound).
GOALS = {
    "compiled_exit_ratio": (">=", 0.95),
    "compiled_user_cpu_us_per_exit": ("<=", 1.0),
    "python_exit_ratio": (">=", 0.65),
    "lifecycle_ratio_harness_over_c": ("<=", 1.1),
    "sim_cpu_us_per_exit": ("<=", 5.0),
}


def _goal(key: str, value: float | None) -> dict:
    op, bound = GOALS[key]
    met = None if value is None else (value >= bound if op == ">=" else value <= bound)
    return {"value": value, "goal": f"{op} {bound:g}", "met": met}


def bench_kvm(rounds: int, lifecycles: int, progress) -> dict:
    """C and harness (compiled path where active, and pure Python) interleaved per round; medians."""
    from .backend import open_backend
    from .images import get_guest
    from .kvm import fastpath

    exe = build_reference()
    compiled, exit_path = fastpath.status()
    system = open_backend("kvm")
    try:
        io_img = get_guest("ioloop").path
        halt = get_guest("halt")
        halt_bytes = halt.load()
        c_io, f_io, p_io, b_io, c_lc, h_lc, m_lc = [], [], [], [], [], [], []
        for r in range(rounds):
            step = f"kvm round {r + 1}/{rounds}:"
            progress(f"{step} C ioloop")
            c_io.append(_c(exe, "ioloop", io_img))
            if compiled:
                progress(f"{step} harness ioloop, compiled exit path")
                f_io.append(harness_ioloop(system, fast=True))
            progress(f"{step} harness ioloop, pure Python")
            p_io.append(harness_ioloop(system, fast=False))
            progress(f"{step} bare cffi loop")
            b_io.append(bare_cffi_ioloop(system))
            progress(f"{step} C lifecycle x{lifecycles}")
            c_lc.append(_c(exe, "lifecycle", halt.path, lifecycles))
            progress(f"{step} harness lifecycle x{lifecycles}")
            h_lc.append(harness_lifecycle(system, halt_bytes, lifecycles))
            m_lc.append(machine_lifecycle(system, max(1, lifecycles // 4)))
        scaling: dict = {}
        vcpu_scaling: dict = {}
        for path in (["compiled"] if compiled else []) + ["python"]:
            for n in SCALING_THREADS:
                progress(f"kvm scaling: 1 VM with {n} vCPU thread(s), {path} exit path")
                vcpu_scaling.setdefault(path, {})[str(n)] = round(
                    harness_vcpus(system, n, fast=path == "compiled")["exits_per_s"])
                progress(f"kvm scaling: {n} thread(s), {path} exit path")
                scaling.setdefault(path, {})[str(n)] = round(
                    harness_threads(system, n, fast=path == "compiled")["exits_per_s"])
    finally:
        system.close()

    def rate(runs):
        return _med([d["exits"] / d["seconds"] for d in runs]) if runs else None

    def user_us(runs):
        return round(_med([d["user_seconds"] / d["exits"] for d in runs]) * 1e6, 3) if runs else None

    def ratio(runs):  # per round against that round's C run, then the median
        if not runs:
            return None
        return round(_med([(d["exits"] / d["seconds"]) / (c["exits"] / c["seconds"]) for d, c in zip(runs, c_io, strict=True)]), 3)

    c_rate, f_rate, p_rate, b_rate = rate(c_io), rate(f_io), rate(p_io), rate(b_io)
    c_vm = _med([d["seconds"] / d["count"] for d in c_lc])
    h_vm = _med([d["seconds"] / d["count"] for d in h_lc])
    m_vm = _med([d["seconds"] / d["count"] for d in m_lc])
    lc_ratio = round(_med([(h["seconds"] / h["count"]) / (c["seconds"] / c["count"]) for h, c in zip(h_lc, c_lc, strict=True)]), 3)

    def cpu(d):  # user + sys CPU seconds per VM
        return (d["user_seconds"] + d["sys_seconds"]) / d["count"]

    # CPU time per VM: on a host shared with other work, less noisy than wall time
    lc_cpu_ratio = round(_med([cpu(h) / cpu(c) for h, c in zip(h_lc, c_lc, strict=True) if cpu(c) > 0]
                              or [float("nan")]), 3)
    active = f_io if compiled else p_io
    out = {
        "exit_path": exit_path, "compiled_path_active": compiled,
        "exits_per_run": p_io[0]["exits"], "rounds": rounds,
        "c_exits_per_s": round(c_rate),
        "c_user_cpu_us_per_exit": user_us(c_io),
        "compiled_exits_per_s": round(f_rate) if f_rate else None,
        "compiled_exit_ratio": ratio(f_io),
        "compiled_user_cpu_us_per_exit": user_us(f_io),
        "python_exits_per_s": round(p_rate),
        "python_exit_ratio": ratio(p_io),
        "python_user_cpu_us_per_exit": user_us(p_io),
        "bare_cffi_exits_per_s": round(b_rate), "bare_cffi_exit_ratio": ratio(b_io),
        "bare_cffi_user_cpu_us_per_exit": user_us(b_io),
        # the path Machine.run takes by default here (compiled where active)
        "harness_exits_per_s": round(rate(active)),
        "exit_ratio_harness_over_c": ratio(active),
        "harness_user_cpu_us_per_exit": user_us(active),
        "c_lifecycle_us": round(c_vm * 1e6, 1), "harness_lifecycle_us": round(h_vm * 1e6, 1),
        "lifecycle_ratio_harness_over_c": lc_ratio,
        "c_lifecycle_cpu_us": round(_med([cpu(d) for d in c_lc]) * 1e6, 1),
        "harness_lifecycle_cpu_us": round(_med([cpu(d) for d in h_lc]) * 1e6, 1),
        "lifecycle_cpu_ratio_harness_over_c": lc_cpu_ratio,
        "machine_for_guest_lifecycle_us": round(m_vm * 1e6, 1),
        # aggregate exits/s of N Machines on ioloop in N threads (one run each, not interleaved)
        "scaling_exits_per_s": scaling,
        # aggregate exits/s of one Machine with N vCPUs on ioloop, one thread per vCPU
        "vcpu_scaling_exits_per_s": vcpu_scaling,
        "host_cpus": os.cpu_count(),
    }
    out["goals"] = {k: _goal(k, out[k]) for k in GOALS if k in out}
    out["targets"] = {k: g["goal"] for k, g in out["goals"].items()}
    return out


def bench_sim(progress) -> dict | None:
    try:
        from .sim.bench import bench_sim as run
    except ImportError:
        return None
    progress("sim: ioloop, straight-line instructions")
    out = run()
    try:
        from .sevbench import bench_sev
    except ImportError:
        return out
    progress("sim: SEV launch, memory encryption, SEV-ES VMGEXIT and #VC")
    out["sev"] = bench_sev(repeat=3, n_cpuid=5_000, n_vmgexit=5_000)
    return out


def run_bench(*, rounds: int = 3, lifecycles: int = 200, only: str = "all", as_json: bool = False) -> int:
    """``kvmharness bench``: measure, then print the figures (``as_json``: one JSON object)
    with each beside its goal; ``only`` is kvm, sim or all."""
    def progress(msg):  # on stderr, with --json too: stdout holds only the document
        print(f"... {msg}", file=sys.stderr, flush=True)

    out: dict = {}
    if only in ("kvm", "all"):
        out["kvm"] = bench_kvm(rounds, lifecycles, progress)
    if only in ("sim", "all"):
        out["sim"] = bench_sim(progress)
        if out["sim"] and out.get("kvm"):
            out["sim"]["sim_over_kvm_exit_rate"] = round(
                out["sim"].get("exits_per_s", 0) / out["kvm"]["harness_exits_per_s"], 3)
    if out.get("sim") and "cpu_us_per_exit" in out["sim"]:
        out["sim"]["goals"] = {"sim_cpu_us_per_exit": _goal("sim_cpu_us_per_exit", out["sim"]["cpu_us_per_exit"])}
    if as_json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    k = out.get("kvm")
    if k:
        print(f"kvm, {k['exits_per_run']} IO exits per run, medians of {k['rounds']} interleaved rounds "
              "(each ratio is the median of the rounds' own ratios to their C run, so on a busy "
              "host it need not equal the ratio of the medians)")
        print(f"  exit path: {k['exit_path']}")
        print(f"  {'':34} {'exits/s':>9} {'x C':>7} {'user us/exit':>13}   goal")
        _row("C loop", k["c_exits_per_s"], 1.0, k["c_user_cpu_us_per_exit"], "")
        if k["compiled_exits_per_s"] is not None:
            _row("harness, compiled exit path", k["compiled_exits_per_s"], k["compiled_exit_ratio"],
                 k["compiled_user_cpu_us_per_exit"],
                 _mark(k["goals"]["compiled_exit_ratio"], "x C") + ", "
                 + _mark(k["goals"]["compiled_user_cpu_us_per_exit"], "us"))
        else:
            print(f"  {'harness, compiled exit path':34} not active here")
        _row("harness, pure Python", k["python_exits_per_s"], k["python_exit_ratio"],
             k["python_user_cpu_us_per_exit"], _mark(k["goals"]["python_exit_ratio"], "x C"))
        _row("bare cffi KVM_RUN loop", k["bare_cffi_exits_per_s"], k["bare_cffi_exit_ratio"],
             k["bare_cffi_user_cpu_us_per_exit"], "(the floor for per-exit Python)")
        print(f"  VM lifecycle    C {k['c_lifecycle_us']:.0f} us, harness {k['harness_lifecycle_us']:.0f} us, "
              f"ratio {k['lifecycle_ratio_harness_over_c']:.3f}   "
              + _mark(k["goals"]["lifecycle_ratio_harness_over_c"], "x C"))
        print(f"                  CPU (user+sys) per VM: C {k['c_lifecycle_cpu_us']:.0f} us, harness "
              f"{k['harness_lifecycle_cpu_us']:.0f} us, ratio {k['lifecycle_cpu_ratio_harness_over_c']:.3f}")
        print(f"  Machine.for_guest('halt') + run + close: {k['machine_for_guest_lifecycle_us']:.0f} us")
        for path, by_n in k["scaling_exits_per_s"].items():
            row = ", ".join(f"{n} thread{'s' if n != '1' else ''} {v:,}" for n, v in by_n.items())
            print(f"  threads, {path} exit path (aggregate exits/s, {k['host_cpus']} CPUs): {row}")
        for path, by_n in k["vcpu_scaling_exits_per_s"].items():
            row = ", ".join(f"{n} vCPU{'s' if n != '1' else ''} {v:,}" for n, v in by_n.items())
            print(f"  one VM, a thread per vCPU, {path} exit path (aggregate exits/s): {row}")
    s = out.get("sim")
    if s:
        print("sim:")
        for key, value in s.items():
            if key == "goals":
                continue
            if isinstance(value, dict):
                print(f"  {key}:")
                for k2, v2 in value.items():
                    print(f"    {k2}: {v2}")
            elif key == "cpu_us_per_exit":
                print(f"  {key}: {value}   " + _mark(s["goals"]["sim_cpu_us_per_exit"], "us"))
            else:
                print(f"  {key}: {value}")
    elif only in ("sim", "all"):
        print("sim: not available in this build")
    return EXIT_OK


def _row(name: str, rate, ratio, user_us, goal: str) -> None:
    user = f"{user_us:.3f}" if user_us is not None else "-"
    print(f"  {name:34} {rate:>9,} {ratio:>7.3f} {user:>13}   {goal}")


def _mark(g: dict, unit: str) -> str:
    verdict = "?" if g["met"] is None else ("met" if g["met"] else "NOT met")
    return f"goal {g['goal']} {unit}: {verdict}"
