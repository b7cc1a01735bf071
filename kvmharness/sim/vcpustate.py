"""The simulated vCPU's run state: one object, its phases and the transitions that move it.

A :class:`~kvmharness.sim.vcpu.SimVcpu` keeps everything KVM_RUN's state machine needs
here (``vcpu.run_state``), apart from the CPU itself (the unicorn core, the VMCB):

- where the guest state lives: ``need_entry`` (the next run() enters from the VMCB save
  area, as VMRUN does), ``save_stale`` (the core holds state the save area has not been
  given: a #VMEXIT's write is owed), ``shadow`` (the GPRs the VMCB has no room for) and
  ``resume`` (where the guest continues when known without reading RIP);
- the exit in flight: ``exit`` (what the current run() returns to userspace), ``event``
  (what stopped the core, for the model to handle: an exception vector or one of the
  models' event numbers, with its RIP), ``pending`` (the completion owed to the guest
  after an IO, MMIO or MSR exit: ``(kind, insn_rip, next_rip, extra)``), ``completion``
  (userspace's answer, from complete()), ``replay`` (an MMIO read's data to re-run the
  instruction against), ``rip_moved`` (userspace moved RIP: the pending completion is
  dropped, as KVM does) and ``in_old_rax`` (the accumulator KVM_GET_REGS shows during an IN);
- the run itself: ``running``, ``kicked``, ``shutdown`` (a triple fault: every run()
  returns Shutdown), ``closed``, ``fault_consumed`` (an event handler answered the access
  the core stopped on) and ``precise_retry`` (re-run one instruction to see a fault exactly).

:attr:`SimVcpuState.phase` names the state these make; the models move it only through
the methods below (sim/nested.py through SimVcpu's own calls, which use them).
"""

from __future__ import annotations

import enum
from typing import Any


class Phase(enum.Enum):
    """Where a simulated vCPU stands between two KVM_RUNs (or during one)."""

    ENTRY = "entry"  # idle: the next run() enters the guest from the VMCB save area
    IN_GUEST = "in-guest"  # the core holds the live guest state; run() resumes it
    PENDING_IO = "pending-io"  # an IN/OUT (or string IO) exit returned; its completion is owed
    PENDING_MMIO = "pending-mmio"  # an MMIO exit returned; a read's data is owed
    PENDING_MSR = "pending-msr"  # a userspace RDMSR/WRMSR exit returned; its answer is owed
    SHUTDOWN = "shutdown"  # a triple fault ended the guest: every run() returns Shutdown
    CLOSED = "closed"


_PENDING_PHASE = {
    "in": Phase.PENDING_IO, "out": Phase.PENDING_IO, "outs": Phase.PENDING_IO,
    "mmio_r": Phase.PENDING_MMIO, "mmio_w": Phase.PENDING_MMIO,
    "rdmsr": Phase.PENDING_MSR, "wrmsr": Phase.PENDING_MSR,
}

_GPRS_NOT_IN_VMCB = ("rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
                     "r14", "r15")


class SimVcpuState:
    """The run state of one simulated vCPU (see the module docstring for each field)."""

    __slots__ = ("need_entry", "save_stale", "shadow", "resume", "exit", "event", "pending", "completion",
                 "replay", "rip_moved", "in_old_rax", "running", "kicked", "shutdown", "closed",
                 "fault_consumed", "precise_retry")

    def __init__(self) -> None:
        self.need_entry = True
        self.save_stale = True
        # at reset RDX holds the processor signature (the vCPU sets it from CPUID)
        self.shadow: dict[str, int] = {name: 0 for name in _GPRS_NOT_IN_VMCB}
        self.shadow["rdx"] = 0x600
        self.resume: int | None = None
        self.exit: Any = None
        self.event: tuple[int, int] | None = None
        self.pending: tuple[str, int, int, Any] | None = None
        self.completion: tuple[Any, bool] | None = None
        self.replay: tuple[int, bytes, int] | None = None
        self.rip_moved = False
        self.in_old_rax = 0
        self.running = False
        self.kicked = False
        self.shutdown = False
        self.closed = False
        self.fault_consumed = False
        self.precise_retry = False

    @property
    def phase(self) -> Phase:
        if self.closed:
            return Phase.CLOSED
        if self.shutdown:
            return Phase.SHUTDOWN
        if self.pending is not None:
            return _PENDING_PHASE[self.pending[0]]
        return Phase.ENTRY if self.need_entry else Phase.IN_GUEST

    # -- transitions --------------------------------------------------------------------
    def post_event(self, kind: int, rip: int) -> None:
        """What stopped the core, for the model's event handler once the core stops."""
        self.event = (kind, rip)

    def take_event(self) -> tuple[int, int]:
        """The event the core stopped on, now being handled (it is no longer posted)."""
        event = self.event
        if event is None:
            raise RuntimeError("no event is posted")  # a simulator bug, never the guest's
        self.event = None
        return event

    def drop_event(self) -> None:
        """The posted event was handled (by a subclass's model before the base handler)."""
        self.event = None

    def exit_to_user(self, e: Any) -> None:
        """The current run() returns ``e`` to userspace once the core stops."""
        self.exit = e

    def owe(self, kind: str, insn_rip: int, next_rip: int, extra: Any = None) -> None:
        """An exit of ``kind`` (in, out, outs, mmio_r, mmio_w, rdmsr, wrmsr) returns with
        its completion owed to the guest at the next run()."""
        self.pending = (kind, insn_rip, next_rip, extra)

    def shut_down(self, e: Any) -> None:
        """A triple fault: this run() returns ``e`` (Shutdown), and so does every later one."""
        self.shutdown = True
        self.exit = e

    def fault_answered(self) -> None:
        """An event handler answered the access the core stopped on (an SEV-ES MMIO #VC, an
        RMP fault): the core's error for it is then not a KVM_RUN result."""
        self.fault_consumed = True

    def reenter(self, gprs: Any = None) -> None:
        """The next run() enters from the VMCB in force; ``gprs`` (name, value) pairs are the
        live registers the shadow keeps (those the VMCB has no room for)."""
        if gprs is not None:
            shadow = self.shadow
            for name, value in gprs:
                if name in shadow:
                    shadow[name] = value
        self.need_entry = True

    def entered(self) -> None:
        """The core now holds the live guest state (entered from the VMCB, or switched by
        the model itself); where it continues is read from RIP."""
        self.need_entry = False
        self.resume = None


__all__ = ["Phase", "SimVcpuState"]
