"""Every vCPU of a Machine at once, each on its own thread (issue 15, item 5).

``Machine.for_guest(guest, vcpus=N)`` makes the BSP and N-1 APs; :func:`run_vcpus` gives
each AP the BSP's entry (the guest's CPUID with the AP's own APIC ID, the same entry
registers) and runs every vCPU's exit loop on a thread of its own: the same loop as
``Machine.run`` (the compiled exit path where it loads, which releases the GIL inside
``KVM_RUN`` and between the exits it handles in C, so N vCPUs use N host cores), with
the Machine's devices shared and each vCPU's ucalls answered for that vCPU.

For guests that run the same code on every vCPU without coordinating (``ioloop``: the
exit-rate benchmark), and for SEV-SNP guests on the simulator, whose APs the guest itself
starts: each AP's thread is held (no KVM_RUN) until the guest's AP creation request
(GHCB NAE 0x80000013, AP_CREATE) for its APIC ID, then enters from the VMSA page the guest
built (``sim.snp.start_ap``; a page VMRUN refuses ends that AP's thread without running
it, as KVM_EXIT_FAIL_ENTRY).  An AP never created is released when the BSP's thread
ends, outcome "not-started".  Other SEV guests are refused.
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
    snp = _snp_sim_model(machine)
    if (machine.state_protected or machine.launch_result is not None) and snp is None:
        raise UsageError("run_vcpus runs plain guests and SEV-SNP guests on the simulator; "
                         "another SEV guest's APs start through its launch")
    image = machine.image
    regs, sregs = entry_state(image.mode, machine.memory if image.mode == "long64" else 0)
    for i, ap in enumerate(machine.aps, 1):
        ap.set_cpuid(with_vcpu_apic_id(machine.cpuid, i))
        if snp is None:  # an SNP AP's state comes from the VMSA its AP_CREATE names
            ap.set_sregs(sregs)
            ap.set_regs(regs)
    views = [_vcpu_view(machine, v) for v in (machine.vcpu, *machine.aps)]
    results: list[Any] = [None] * len(views)
    errors: list[BaseException | None] = [None] * len(views)
    start = threading.Barrier(len(views))
    if snp is not None:
        from .sim.snp import start_ap

        for i, view in enumerate(views[1:], 1):
            view.expected = "hlt"  # an SNP AP reports, then halts (the BSP reports DONE)
            snp.ap_starters[i] = (lambda v=view.vcpu, i=i: start_ap(machine, v, i))

    def work(i: int) -> None:
        start.wait()
        try:
            if snp is not None and i:
                results[i] = _held_ap(machine, views[i], i, snp, timeout)
                if results[i] is not None:
                    return
            results[i] = views[i].run(timeout, record=record)
        except BaseException as e:  # reported below, on the caller's thread
            errors[i] = e
        finally:
            if i == 0 and snp is not None:
                snp.ap_starters.clear()  # an AP_CREATE after the run starts nothing
                for j in range(1, len(views)):
                    snp.ap_event(j).set()  # release the APs still held

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


def run_guest_vcpus(guest: Any, backend: Any = "auto", *, vcpus: int, timeout: float | None = None,
                    sev: str | None = None, policy: Any = None, owner: Any = None,
                    on_launch: Any = None) -> RunResult:
    """``machine.run_guest`` with ``vcpus`` vCPUs, each on its own thread (:func:`run_vcpus`):
    the BSP's result, with each AP's in its ``aps`` (an SEV-SNP guest on the simulator
    starts its APs itself)."""
    import time

    from .images import GuestImage, get_guest
    from .machine import _run_timeout, launch_mode

    image = guest if isinstance(guest, GuestImage) else get_guest(guest)
    timeout = _run_timeout(timeout, image)
    m = Machine.for_guest(image, backend, sev=launch_mode(image, sev), policy=policy, owner=owner,
                          vcpus=vcpus)
    t0 = time.perf_counter()
    try:
        if on_launch is not None:
            on_launch(m)
        bsp, *aps = run_vcpus(m, timeout, record=True)
        bsp.aps = aps
        bsp.elapsed = time.perf_counter() - t0
        return bsp
    finally:
        m.close()


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


def _snp_sim_model(machine: Machine) -> Any:
    """The SEV-SNP model of a Machine launched on the simulator, else None.

    Only a simulator machine can have one: the simulator (and unicorn) is not imported for a
    kvm machine, so several vCPUs run on a host without unicorn (the rig in a box)."""
    if machine.launch_result is None or machine.system is None or machine.system.name != "sim":
        return None
    from .sim.snp import SimSnpModel

    model = machine.vm.sev_interface() if machine.vm is not None else None  # made at launch
    return model if isinstance(model, SimSnpModel) else None


def _held_ap(machine: Machine, view: Machine, apic_id: int, snp: Any,
             timeout: float | None) -> RunResult | None:
    """Hold AP ``apic_id`` until the guest's AP_CREATE for it (or the BSP's end), then let
    it enter from the guest's VMSA; None when it entered (its loop runs next), else the
    result of an AP that never ran."""
    import time

    t0 = time.perf_counter()
    event = snp.ap_event(apic_id)
    event.wait(timeout)
    name = machine.image.name if machine.image is not None else machine.name
    if not _created(snp, apic_id) or snp.ap_vmsa_gpa.get(apic_id) is None:
        return RunResult(guest=name, backend=machine.backend, outcome="not-started",
                         expected="hlt", elapsed=time.perf_counter() - t0,
                         message=f"vCPU {apic_id}: no AP_CREATE for it (NAE 0x80000013)")
    why = snp.ap_started.get(apic_id)  # start_ap's answer, on the creating vCPU's thread
    if why is None:
        return None
    return RunResult(guest=name, backend=machine.backend, outcome="fail-entry", expected="hlt",
                     elapsed=time.perf_counter() - t0,
                     message=f"vCPU {apic_id}: KVM_EXIT_FAIL_ENTRY: {why}")


def _created(snp: Any, apic_id: int) -> bool:
    from .snp.launch import SVM_VMGEXIT_AP_CREATE

    return any(a == apic_id and r == SVM_VMGEXIT_AP_CREATE and not res[0]
               for a, r, _g, res, _s in snp.ap_requests)
