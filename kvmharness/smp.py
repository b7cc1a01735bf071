"""Every vCPU of a Machine at once, each on its own thread (issue 15, item 5).

``Machine.for_guest(guest, vcpus=N)`` makes the BSP and N-1 APs; :func:`run_vcpus` gives
each AP the BSP's entry (the guest's CPUID with the AP's own APIC ID, the same entry
registers) and runs every vCPU's exit loop on a thread of its own: the same loop as
``Machine.run`` (the compiled exit path where it loads, which releases the GIL inside
``KVM_RUN`` and between the exits it handles in C, so N vCPUs use N host cores), with
the Machine's devices shared and each vCPU's ucalls answered for that vCPU.

For guests that run the same code on every vCPU without coordinating (``ioloop``: the
exit-rate benchmark).  Not for SEV guests (their APs are launched by the firmware flow).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from . import protocol as P
from .boot import entry_state
from .errors import GuestTimeout, UsageError
from .machine import Machine, RunResult, _UcallPort
from .x86 import with_vcpu_apic_id


def run_vcpus(machine: Machine, timeout: float | None = None, *, record: bool = False) -> list[RunResult]:
    """Run the BSP and every AP of ``machine`` at once, one thread each; one RunResult per
    vCPU (BSP first).  A timeout on any vCPU tears the VM down once every thread has
    stopped (each has the same deadline) and raises that GuestTimeout."""
    if machine.vcpu is None or machine.vm is None:
        raise UsageError("this Machine has no vCPU (closed, or not launched yet)")
    if machine.image is None:
        raise UsageError("run_vcpus needs a loaded guest (Machine.for_guest)")
    if machine.state_protected or machine.launch_result is not None:
        raise UsageError("run_vcpus runs plain guests; an SEV guest's APs start through its launch")
    image = machine.image
    regs, sregs = entry_state(image.mode, machine.memory if image.mode == "long64" else 0)
    for i, ap in enumerate(machine.aps, 1):
        ap.set_cpuid(with_vcpu_apic_id(machine.cpuid, i))
        ap.set_sregs(sregs)
        ap.set_regs(regs)
    views = [_vcpu_view(machine, v) for v in (machine.vcpu, *machine.aps)]
    results: list[Any] = [None] * len(views)
    errors: list[BaseException | None] = [None] * len(views)
    start = threading.Barrier(len(views))

    def work(i: int) -> None:
        start.wait()
        try:
            results[i] = views[i].run(timeout, record=record)
        except BaseException as e:  # reported below, on the caller's thread
            errors[i] = e

    threads = [threading.Thread(target=work, args=(i,), name=f"{machine.name}-vcpu{i}", daemon=True)
               for i in range(len(views))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if isinstance(e, GuestTimeout):
            machine.close()  # as Machine.run does: a timed-out VM is torn down
            raise e
    for e in errors:
        if e is not None:
            raise e
    machine.exit_path = views[0].exit_path
    return results


def _vcpu_view(machine: Machine, vcpu: Any) -> Machine:
    """The Machine as one vCPU's loop sees it: that vCPU, its own run state and ucall port,
    the Machine's VM, memory and other devices; never closes the VM itself (run_vcpus
    does, once every thread has stopped)."""
    view = copy.copy(machine)
    view.vcpu = vcpu
    view.aps = []
    view._owns_system = False
    view.bus = machine.bus.clone({P.UCALL_PORT: _UcallPort(view)})
    view._reset_run_state()
    view.close = lambda: None  # type: ignore[method-assign]
    return view
