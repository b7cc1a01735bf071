"""``bench_sev()``: the SEV / SEV-ES numbers of issues 4 and 5 on the simulator (not a test).

* ``launch_ms`` / ``run_ms``: a full simulated SEV launch of ``sev-hello``
  (Machine.for_guest with an owner: INIT .. MEASURE verified .. FINISH), then the
  run to DONE; the median of ``repeat`` launches.
* ``memcrypt``: the guest key's encrypt/decrypt rate on 4 KiB pages (what the
  simulator's run-boundary sync does) and the rate of the first-entry decryption
  of all of RAM.
* ``vmgexit_per_s``: CPUID through the GHCB page (SW_EXIT_CODE 0x72), VMGEXIT round
  trips handled in the simulated KVM (no userspace exit), per second.
* ``vc_us`` vs ``cpuid_exit_us``: per CPUID, the SEV-ES guest's #VC delivery (+ a
  3-instruction handler and IRETQ) against the same loop in a plain SVM guest,
  where each CPUID is an intercepted #VMEXIT answered in the kernel -- same image,
  same run shape.

The guest is pre-assembled bytes (source in the comment below), so no binutils are
needed.  It runs on the harness's long-mode boot tables; for SEV-ES the second
2 MiB are made shared (C=0) before the launch for the GHCB at 0x200000, and IDT
vector 29 points at the #VC handler.
"""

from __future__ import annotations

import itertools
import statistics
import struct
import time

from . import exits
from . import protocol as P
from .errors import SimulatorError

# start: out %al,$0x80
# 1: xor %eax,%eax; xor %ecx,%ecx; cpuid; dec %r12; jnz 1b       (R12 = CPUID count)
#    out %al,$0x80; test %r13,%r13; jz 3f                         (R13 = 1: SEV-ES phase)
#    wrmsr GHCB MSR := 0x200000; r10/r9 = valid bitmap words
# 2: GHCB rax=0 rcx=0 sw_exit_code=0x72 info1=info2=0, bitmap (RAX, RCX, exit code, info1/2),
#    protocol_version 2; VMGEXIT; dec %r11; jnz 2b                (R11 = VMGEXIT count)
#    out %al,$0x80
# 3: hlt; jmp 3b
# vc (+0xA0): addq $2,8(%rsp); add $8,%rsp; iretq
_CODE = bytes.fromhex(
    "e68031c031c90fa249ffcc75f5e6804d85ed0f8483000000b9300101c0b80000200031d20f3049ba00000000"
    "02001c0049b9000000000000008048c70425f80120000000000048c70425080320000000000048c704259003"
    "20007200000048c70425980320000000000048c70425a0032000000000004c890c25f00320004c891425f803"
    "200066c70425fa0f20000200f30f01d949ffcb75a1e680f4ebfd66904883442408024883c40848cf")
_VC_OFFSET = 0xA0
MEMORY = 4 << 20


def _loop_machine(system, es: bool, n_cpuid: int, n_vmgexit: int):
    from .abi import KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM
    from .boot import _idt_gate, load_image
    from .machine import Machine
    from .sev.policy import GuestPolicy

    m = Machine(system, memory=MEMORY, vm_type=KVM_X86_SEV_ES_VM if es else KVM_X86_DEFAULT_VM,
                create_vcpu=not es)
    table = system.capabilities.supported_cpuid
    if not es:
        load_image(m.vm, m.vcpu, _CODE, "long64", MEMORY, table)
    else:
        iface = m.vm.sev_interface()
        iface.init("sev-es")
        m.vcpu = m.vm.create_vcpu(0)
        load_image(m.vm, m.vcpu, _CODE, "long64", MEMORY, table, c_bit=51)
        m.vm.write(P.BOOT_PD0 + 8, struct.pack("<Q", (1 << 21) | 0x83))  # 2-4 MiB shared
        m.vm.write(P.BOOT_IDT + 29 * 16, _idt_gate(P.GUEST_LOAD_ADDR + _VC_OFFSET))
    regs = m.vcpu.get_regs()
    regs.r12, regs.r11, regs.r13 = n_cpuid, n_vmgexit, int(es)
    m.vcpu.set_regs(regs)
    if es:
        iface.register_region(0, MEMORY)
        iface.launch_start(int(GuestPolicy.parse("nodbg,es")))
        end = (P.GUEST_LOAD_ADDR + len(_CODE) + 15) & ~15
        iface.launch_update_data(P.BOOT_PML4, end - P.BOOT_PML4)
        iface.launch_update_vmsa()
        iface.launch_measure(4096)
        iface.launch_finish()
    return m


def _phases(m, n_markers: int) -> list[float]:
    """Times between the guest's OUT 0x80 markers, then the run to HLT."""
    v = m.vcpu
    stamps = []
    while True:
        e = v.run()
        stamps.append(time.perf_counter())
        if isinstance(e, exits.Hlt):
            break
        if not (isinstance(e, exits.IoOut) and e.port == 0x80):
            raise SimulatorError(f"SEV benchmark guest misbehaved: {e}")
    if len(stamps) != n_markers + 1:
        raise SimulatorError(f"SEV benchmark guest gave {len(stamps) - 1} markers, not {n_markers}")
    return [b - a for a, b in itertools.pairwise(stamps)]


def bench_sev(repeat: int = 5, n_cpuid: int = 20_000, n_vmgexit: int = 20_000) -> dict:
    from .machine import Machine
    from .sev.memcrypt import GuestKey
    from .sev.policy import GuestPolicy
    from .sev.session import GuestOwner
    from .sim.system import SimSystem

    out = {}
    launches, runs = [], []
    with SimSystem() as system:
        for _ in range(repeat):
            t0 = time.perf_counter()
            m = Machine.for_guest("sev-hello", system, sev="sev",
                                  owner=GuestOwner(GuestPolicy.parse("nodbg")))
            t1 = time.perf_counter()
            r = m.run(10)
            t2 = time.perf_counter()
            m.close()
            if r.outcome != "done":
                raise SimulatorError(f"sev-hello: {r.describe()}")
            launches.append(t1 - t0)
            runs.append(t2 - t1)
        out["launch_ms"] = round(statistics.median(launches) * 1e3, 2)
        out["run_ms"] = round(statistics.median(runs) * 1e3, 2)

        key = GuestKey()
        page = bytes(range(256)) * 16
        n = 2048
        for name, fn in (("encrypt", key.encrypt), ("decrypt", key.decrypt)):
            t0 = time.perf_counter()
            for i in range(n):
                fn(i * 4096, page)
            out[f"{name}_MBps_4k"] = round(n * 4096 / (time.perf_counter() - t0) / 1e6, 1)
        ram = bytes(2 << 20)
        t0 = time.perf_counter()
        key.decrypt(0, ram)
        out["decrypt_MBps_2M"] = round(len(ram) / (time.perf_counter() - t0) / 1e6, 1)

        m = _loop_machine(system, False, n_cpuid, 1)
        try:
            plain = _phases(m, 2)
        finally:
            m.close()
        # Under SEV-ES the marker OUTs are themselves #VC events (IOIO is intercepted and the
        # handler skips them), so there are no marker exits: time two runs to HLT instead,
        # one dominated by the CPUID #VC loop, one by the VMGEXIT loop.
        vc_time, vc = _es_run(system, n_cpuid, 1)
        gexit_time, gexits = _es_run(system, 1, n_vmgexit)
    if vc[0] != n_cpuid + 3 or gexits[1] != n_vmgexit:  # + the 3 marker OUTs
        raise SimulatorError(f"SEV-ES loop: {vc[0]} #VC, {gexits[1]} VMGEXITs")
    # phases: [0] start marker -> after the CPUID loop
    out["cpuid_exit_us"] = round(plain[0] / n_cpuid * 1e6, 2)
    out["vc_us"] = round(vc_time / n_cpuid * 1e6, 2)
    out["vmgexit_per_s"] = round(n_vmgexit / gexit_time)
    out["vmgexit_us"] = round(gexit_time / n_vmgexit * 1e6, 2)
    return out


def _es_run(system, n_cpuid: int, n_vmgexit: int) -> tuple[float, tuple[int, int]]:
    """Seconds from entry to HLT of the SEV-ES loop, and (#VC count, VMGEXIT count)."""
    m = _loop_machine(system, True, n_cpuid, n_vmgexit)
    try:
        t0 = time.perf_counter()
        e = m.vcpu.run()
        t = time.perf_counter() - t0
        if not isinstance(e, exits.Hlt):
            raise SimulatorError(f"SEV-ES benchmark guest misbehaved: {e}")
        return t, (m.vcpu.vc_count, len(m.vcpu.vmgexit_trace))
    finally:
        m.close()


if __name__ == "__main__":
    import json

    print(json.dumps(bench_sev(), indent=2))
