"""``bench_sim()``: the issue's simulator benchmark (called by ``kvmharness bench --only sim``).

One guest, two phases: 200,000 ``out 0x80, al`` exits (each a full KVM_RUN round
trip through the model: IOIO #VMEXIT, trace record, IoOut to the caller), then a
5-instruction arithmetic loop run straight through; and two more guests, a loop of MMIO
stores and one of MMIO loads (``bench_mmio``).  Wall-clock and process CPU
time are both reported: on a shared 2-core machine the CPU figures are the steady
ones.  The guest is pre-assembled bytes, so no binutils are needed.
"""

from __future__ import annotations

import os
import struct
import time

from .. import exits
from ..errors import SimulatorError

# mov ecx, N; 1: out 0x80,al; dec ecx; jnz 1b; mov al,1; out 0x81,al;
# mov rcx, M; 2: add rax,rcx; xor rax,3; dec rcx; jnz 2b; hlt
_GUEST = ("b9{n}" "e680" "ffc9" "75fa" "b001" "e681" "48c7c1{m}" "4801c8" "4883f003" "48ffc9" "75f4" "f4")


def bench_guest(n_exits: int, n_loop: int) -> bytes:
    return bytes.fromhex(_GUEST.format(n=struct.pack("<I", n_exits).hex(), m=struct.pack("<I", n_loop).hex()))


# mov ecx, N; mov edi, 0x1000000 (identity-mapped, no slot: MMIO); 1: mov [rdi], al (write),
# mov eax, [rdi] (read) or or byte [rdi], 1 (rmw); dec ecx; jnz 1b; hlt
_MMIO_GUEST = "b9{n}" "bf00000001" "{insn}" "ffc9" "75{back:02x}" "f4"


def bench_mmio(n_loops: int = 10_000) -> dict:
    """User CPU per MMIO exit, each a full KVM_RUN round trip: a plain MOV store and load (the
    model finishes those without re-running them: sim/vcpu.py ``_replay_mov``) and an OR on
    MMIO (a read exit, then the write exit of its re-run: Core.step_to)."""
    from .system import SimSystem
    from .testing import long_mode_setup

    out = {}
    for kind, insn, per_loop in (("write", "8807", 1), ("read", "8b07", 1), ("rmw", "800f01", 2)):
        back = -(len(insn) // 2 + 4) & 0xFF  # jnz back over the instruction, dec and itself
        code = bytes.fromhex(_MMIO_GUEST.format(n=struct.pack("<I", n_loops).hex(), insn=insn, back=back))
        with SimSystem() as system, system.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            long_mode_setup(vm, vcpu, code)
            n = 0
            u0 = os.times().user
            while True:
                e = vcpu.run()
                if isinstance(e, exits.MmioRead):
                    vcpu.complete(n)
                elif not isinstance(e, exits.MmioWrite):
                    break
                n += 1
            u1 = os.times().user
            if not isinstance(e, exits.Hlt) or n != n_loops * per_loop:
                raise SimulatorError(f"MMIO benchmark guest misbehaved: {n} exits, last {e}")
        out[f"mmio_{kind}_user_cpu_us_per_exit"] = round((u1 - u0) / n * 1e6, 3)
    return out


def bench_sim(n_exits: int = 200_000, n_loop: int = 20_000_000) -> dict:
    """Exits/s and us/exit on the ``out`` loop; guest instructions/s straight-line."""
    from . import simhooks
    from .system import SimSystem
    from .testing import long_mode_setup

    with SimSystem() as system, system.create_vm() as vm:
        vcpu = vm.create_vcpu(0)
        long_mode_setup(vm, vcpu, bench_guest(n_exits, n_loop))
        e = vcpu.run()  # the first exit includes engine creation and VMRUN
        n = 1
        t0, c0, u0 = time.perf_counter(), time.process_time(), os.times().user
        while True:
            e = vcpu.run()
            if e.port != 0x80:
                break
            n += 1
        t1, c1, u1 = time.perf_counter(), time.process_time(), os.times().user
        chooks = vcpu.core.chooks
        e = vcpu.run()
        t2, c2 = time.perf_counter(), time.process_time()
        if not isinstance(e, exits.Hlt) or n != n_exits:
            raise SimulatorError(f"benchmark guest misbehaved: {n} exits, last {e}")
    insns = 4 * n_loop
    wall_exit = (t1 - t0) / (n - 1)
    return {
        "exits": n,
        "exits_per_s": round((n - 1) / (t1 - t0)),
        "us_per_exit": round(wall_exit * 1e6, 3),
        "cpu_us_per_exit": round((c1 - c0) / (n - 1) * 1e6, 3),
        "user_cpu_us_per_exit": round((u1 - u0) / (n - 1) * 1e6, 3),
        # which IN/OUT hooks ran (sim/simhooks.py: KVMHARNESS_SIM_CHOOKS)
        "io_hooks": "C" if chooks else "Python",
        "io_hooks_status": simhooks.status(),
        "straight_line_insns": insns,
        "insn_per_s": round(insns / (t2 - t1)),
        "cpu_insn_per_s": round(insns / max(c2 - c1, 1e-9)),
        "targets": "us_per_exit <= 5, insn_per_s >= 100e6",
        **bench_mmio(),
    }
