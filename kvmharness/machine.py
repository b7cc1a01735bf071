"""Machine: the one-line common case, and the run loop over a device bus.

    from kvmharness import run_guest
    result = run_guest("cpuid", backend="auto")
    print(result.outcome, result.reports)

A Machine owns one VM with one vCPU and RAM at guest-physical 0, a device bus
(console, ucall, any devices a test adds) and a store for userspace MSRs.  The
run loop turns every exit into a device call; the guest ends the run through
the ucall port (done / fail / exception), HLT, a shutdown or an exit nothing
handles.  Every run is bounded: at the deadline the watchdog kicks the vCPU,
the VM is torn down and :class:`GuestTimeout` is raised.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import exits as X
from . import protocol as P
from .abi import (
    KVM_HC_MAP_GPA_RANGE,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM,
    KVM_X86_SNP_VM,
)
from .backend import System, Vcpu, Vm
from .boot import load_image
from .devices import Console, DeviceBus, FastPlan, MsrStore, NoDevice, NullDevice, RamLikeMmio
from .errors import FeatureUnavailable, GuestFailure, GuestTimeout, UsageError
from .factory import open_backend
from .images import GuestImage, get_guest
from .watchdog import WATCHDOG, check_timeout
from .x86 import Regs, with_vcpu_apic_id

DEFAULT_MEMORY = 2 << 20
TRACE_LIMIT = 250_000  # exits kept in RunResult.exits; later ones are only counted

_OUTCOME_OF_EXIT = {
    X.Hlt: "hlt", X.Shutdown: "shutdown", X.InternalError: "internal-error",
    X.FailEntry: "fail-entry", X.SevTermination: "sev-terminated", X.SystemEvent: "system-event",
    X.Unsupported: "unsupported", X.Hypercall: "hypercall", X.Debug: "debug",
}


@dataclass
class TraceRecord:
    """One userspace-visible exit, with the guest RIP when tracing was on."""

    exit: X.Exit
    rip: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.exit.to_dict()
        if self.rip is not None:
            d["rip"] = self.rip
        return d


@dataclass
class RunResult:
    guest: str
    backend: str
    outcome: str  # done | fail | exception | hlt | shutdown | timeout | unhandled | internal-error | ...
    expected: str = "done"
    reports: list[tuple[int, int]] = field(default_factory=list)  # (key, value) in order
    console: str = ""
    exits: list[TraceRecord] = field(default_factory=list)  # up to TRACE_LIMIT
    exit_count: int = 0
    final_exit: X.Exit | None = None
    regs: Regs | None = None
    fail_code: int | None = None
    fail_line: int | None = None
    exception_vector: int | None = None
    exception_rip: int | None = None
    message: str = ""
    elapsed: float = 0.0
    hw_trace: list[Any] = field(default_factory=list)  # backend's hardware-level trace, if any
    kernel_trace: list[Any] = field(default_factory=list)  # kvm: the kernel's KVM tracepoints
    kernel_trace_error: str | None = None
    regs_unavailable: str | None = None  # why ``regs`` is None (an SEV-ES guest's state is protected)
    aps: list["RunResult"] = field(default_factory=list)  # smp.run_guest_vcpus: each AP's result

    @property
    def ok(self) -> bool:
        return self.outcome == self.expected

    @property
    def values(self) -> dict[int, int]:
        """Reports as key -> last value."""
        return dict(self.reports)

    def check(self) -> "RunResult":
        """Raise :class:`GuestFailure` unless the outcome is the expected one."""
        if not self.ok:
            raise GuestFailure(self.guest, self.describe(), code=self.fail_code, line=self.fail_line,
                               result=self)
        return self

    def describe(self) -> str:
        if self.ok:
            detail = ""
            if self.outcome == "fail":
                detail = f": code {self.fail_code} at line {self.fail_line}"
            return f"finished as expected ({self.outcome}{detail})"
        if self.outcome == "fail":
            return f"reported failure code {self.fail_code} at line {self.fail_line}"
        if self.outcome == "exception":
            vec = self.exception_vector
            name = P.EXCEPTION_NAMES.get(vec, f"vector {vec}") if vec is not None else f"vector {vec}"
            return f"unexpected exception {name} at RIP {self.exception_rip:#x}"
        msg = f"ended with {self.outcome}, expected {self.expected}"
        if self.message:
            msg += f": {self.message}"
        return msg

    def to_dict(self) -> dict[str, Any]:
        return {
            "guest": self.guest, "backend": self.backend, "outcome": self.outcome,
            "expected": self.expected, "ok": self.ok,
            "reports": [[k, v] for k, v in self.reports], "console": self.console,
            "exit_count": self.exit_count, "exits": [r.to_dict() for r in self.exits],
            "final_exit": self.final_exit.to_dict() if self.final_exit else None,
            "regs": self.regs.to_dict() if self.regs is not None else None,
            "regs_unavailable": self.regs_unavailable,
            "fail_code": self.fail_code, "fail_line": self.fail_line,
            "exception_vector": self.exception_vector, "exception_rip": self.exception_rip,
            "message": self.message, "elapsed_s": round(self.elapsed, 6),
            "hw_trace": [r.to_dict() if hasattr(r, "to_dict") else str(r) for r in self.hw_trace],
            "kernel_trace": [{"event": e.event, "timestamp": e.timestamp, "fields": e.fields, "text": e.text}
                             for e in self.kernel_trace],
            "kernel_trace_error": self.kernel_trace_error,
            **({"aps": [ap.to_dict() for ap in self.aps]} if self.aps else {}),
        }


class Machine:
    """One VM, one vCPU, RAM at 0, a device bus; see the module docstring."""

    def __init__(self, backend: str | System = "auto", *, memory: int = DEFAULT_MEMORY,
                 vm_type: int = 0, name: str = "machine", create_vcpu: bool = True,
                 vcpus: int = 1):
        if not 1 <= vcpus <= 255:
            raise UsageError(f"vcpus={vcpus}: a Machine has 1 to 255 vCPUs")
        if isinstance(backend, System):
            self.system, self._owns_system = backend, False
        else:
            self.system, self._owns_system = open_backend(backend), True
        self.name = name
        self.memory = memory
        self.vm: Vm | None = None
        self.vcpu: Vcpu | None = None
        #: vCPUs 1.. (APs): created with the BSP; only the BSP runs (SNP: the guest starts
        #: an AP with AP creation, NAE 0x80000013); ``vcpu_count`` counts them all
        self.vcpu_count = vcpus
        self.aps: list[Vcpu] = []
        try:
            self.vm = vm = _create_vm(self.system, vm_type)
            self.ram = vm.add_memory(0, memory)
            if create_vcpu:  # SEV launches create it after KVM_SEV_INIT, as KVM requires
                self.vcpu = vm.create_vcpu(0)
                self.aps = [vm.create_vcpu(i) for i in range(1, vcpus)]
        except BaseException:
            self.close()
            raise
        self.bus = DeviceBus()
        self.console = Console()
        self.bus.add_ports(P.CONSOLE_PORT, 1, self.console)
        self.bus.add_ports(P.UCALL_PORT, 1, _UcallPort(self))
        self.bench_port = NullDevice()
        self.bus.add_ports(P.BENCH_PORT, 1, self.bench_port)
        # the guest contract's MMIO window (ucall.h MMIO_TEST_ADDR): behaves like RAM
        self.mmio_scratch = RamLikeMmio(P.MMIO_TEST_ADDR, 0x1000)
        self.bus.add_mmio(P.MMIO_TEST_ADDR, 0x1000, self.mmio_scratch)
        self.msrs = MsrStore()
        self.image: GuestImage | None = None
        self.expected = "done"
        self.launch_result: Any = None  # SEV/SEV-ES/SNP: what the launch established (its backend's type)
        self._snp_exits: Any = None  # SNP on kvm (kvm.snp.KvmSnpLaunch): MEMORY_FAULT, MAP_GPA_RANGE
        # SEV-ES after LAUNCH_UPDATE_VMSA: the host cannot read the vCPU's registers (KVM refuses
        # KVM_GET_REGS/SREGS with EINVAL on the SEV-ES VM type); the Machine never asks
        self.state_protected = False
        self._hooks: list[Callable[[Machine, X.Exit], object]] = []
        self._reset_run_state()

    @property
    def backend(self) -> str:
        return self.system.name

    # -- set-up ------------------------------------------------------------------
    @classmethod
    def for_guest(cls, guest: str | GuestImage, backend: str | System = "auto", *,
                  sev: str | None = None, policy: Any = None, owner: Any = None,
                  snp_cpuid: Any = None, **kw: Any) -> Machine:
        """A Machine with a manifest guest loaded, its devices and MSR routing set up.

        ``sev="sev"|"sev-es"`` launches it as an SEV / SEV-ES guest first (see
        :meth:`_sev_launch`); ``owner`` (a ``sev.session.GuestOwner``) makes the
        launch verify the firmware's measurement and fail loudly on a mismatch.
        ``snp_cpuid`` (sev-snp on the simulator): the CPUID page entries the VMM offers
        (``snp.firmware.CpuidEntry``), checked by the firmware at SNP_LAUNCH_UPDATE.
        """
        image = guest if isinstance(guest, GuestImage) else get_guest(guest)
        if sev is not None:  # an SEV mode the manifest does not declare: refused before any VM
            image.check_mode(sev)
        data = image.load()  # validated before any VM exists
        system = backend if isinstance(backend, System) else open_backend(backend)
        try:
            ok, why = needs_met(system, image.needs)
            if not ok:
                raise FeatureUnavailable(f"guest {image.name!r} cannot run on the {system.name} backend "
                                         f"here: {why}")
            if sev is not None:
                kw.setdefault("vm_type", _sev_vm_type(system, sev))
            m = cls(system, memory=image.memory, name=image.name, create_vcpu=sev is None, **kw)
        except BaseException:
            if not isinstance(backend, System):
                system.close()
            raise
        m._owns_system = not isinstance(backend, System)
        try:
            if sev is None:
                m.load(image, data)
            else:
                m._sev_launch(image, data, sev, policy, owner, snp_cpuid)
        except BaseException:
            m.close()
            raise
        return m

    def _sev_launch(self, image: GuestImage, data: bytes, mode: str, policy: Any, owner: Any,
                    snp_cpuid: Any = None) -> None:
        """The KVM SEV launch order: INIT before any vCPU, then the vCPU and its state,
        REG_REGION, LAUNCH_START, UPDATE_DATA over the boot tables and image, (SEV-ES)
        UPDATE_VMSA, MEASURE (verified with the owner's TIK), FINISH -- GUEST_STATUS
        checked after each state change."""
        if mode == "sev-snp":  # KVM_SEV_INIT2 ... SNP_LAUNCH_FINISH (sim/snp.py)
            self._snp_launch(image, data, policy, snp_cpuid)
            return
        if self.vcpu_count > 1:
            raise UsageError(f"{mode} guests have one vCPU here (vcpus={self.vcpu_count} is for "
                             "plain and SEV-SNP guests)")
        from .boot import sev_launch_blob
        from .sev.launch import SevLaunch, expected_vmsa_pages

        launch = SevLaunch(self.vm, mode, policy, owner=owner)
        launch.init()
        self.vcpu = self._open_vm().create_vcpu(0)
        c_bit = sev_c_bit(self.system)
        self.load(image, data, c_bit=c_bit)
        launch.register_memory()
        launch.start()
        start, blob = sev_launch_blob(data, image.mode, c_bit)
        launch.update_data(start, len(blob), expected=blob)
        if mode == "sev-es":
            launch.update_vmsa(expected_vmsa_pages(self.vm))
            self.state_protected = True
        launch.measure()
        if owner is not None:
            launch.verify()
        launch.finish()
        self.sev_launch = launch
        self.launch_result = launch

    def _snp_launch(self, image: GuestImage, data: bytes, policy: Any, snp_cpuid: Any = None) -> None:
        """The SEV-SNP launch (sim/snp.py ``launch_machine``: INIT2, the vCPU, memory
        attributes, SNP_LAUNCH_START/UPDATE/FINISH); ``launch_result.launch_digest`` is the
        firmware's.  On kvm, kvm/snp.py drives the same steps through /dev/kvm (guest_memfd
        slot, INIT2, LAUNCH_START/UPDATE/FINISH); a host without SNP stops at
        KVM_CREATE_VM(KVM_X86_SNP_VM) with the kernel's errno."""
        if self.system.name == "kvm":  # guest_memfd, KVM_SEV_SNP_LAUNCH_* (kvm/snp.py)
            from .kvm.snp import launch_machine as kvm_snp_launch

            if snp_cpuid is not None:
                raise FeatureUnavailable("a CPUID page of the caller's choosing in an SNP launch "
                                         "through KVM (the simulator takes one)")
            self.launch_result = self._snp_exits = kvm_snp_launch(
                self, image, data, policy, c_bit=sev_c_bit(self.system), vcpus=self.vcpu_count)
            self.state_protected = True
            self.fast_path = False  # KVM_EXIT_MEMORY_FAULT arrives as a failed KVM_RUN
            return
        if self.system.name != "sim":
            raise FeatureUnavailable(f"the SEV-SNP launch on the {self.system.name} backend")
        from .sim.snp import launch_machine

        self.launch_result = launch_machine(self, image, data, policy, cpuid_entries=snp_cpuid)
        self.state_protected = True

    def load(self, image: GuestImage, data: bytes | None = None, *, c_bit: int | None = None) -> None:
        data = image.load() if data is None else data
        self.image = image
        self.name = image.name
        self.expected = image.expect
        table = with_vcpu_apic_id(self.system.capabilities.supported_cpuid, 0)
        for entry in image.cpuid:
            table = table.with_entry(entry)
        self.cpuid = table
        if image.user_msrs:
            self.route_msrs_to_userspace(image.user_msrs)
        load_image(self._open_vm(), self._open_vcpu(), data, image.mode, self.memory, table, c_bit=c_bit)

    def route_msrs_to_userspace(self, indices: Iterable[int]) -> None:
        """Deny these MSRs in the kernel's filter so every access exits to userspace,
        where :attr:`msrs` answers (reads: last value written, initially 0)."""
        vm = self._open_vm()
        vm.enable_user_msr_exits(X.KVM_MSR_EXIT_REASON_FILTER)
        vm.set_msr_filter([(i, 1, False, False) for i in indices], default_allow=True)
        for i in indices:
            self.msrs.values.setdefault(i, 0)

    def on_exit(self, callback: Callable[[Machine, X.Exit], object]) -> None:
        """Call ``callback(machine, exit)`` at every exit before the default handling;
        a truthy return value means the callback handled the exit itself."""
        self._hooks.append(callback)

    # -- running -----------------------------------------------------------------
    def _open_vm(self) -> Vm:
        if self.vm is None:
            raise UsageError("this Machine is closed")
        return self.vm

    def _open_vcpu(self) -> Vcpu:
        if self.vcpu is None:  # closed, or an SEV launch has not made it yet
            raise UsageError("this Machine has no vCPU (closed, or not launched yet)")
        return self.vcpu

    def _reset_run_state(self) -> None:
        self._outcome: str | None = None
        self._reports: list[tuple[int, int]] = []
        self._fail: tuple[int | None, int | None] = (None, None)
        self._exception: tuple[int | None, int | None] = (None, None)
        self._message = ""
        self._final_exit: X.Exit | None = None

    def run(self, timeout: float | None = None, *, trace: bool = False, record: bool = True) -> RunResult:
        """Run until the guest finishes; raises GuestTimeout (VM torn down) at the deadline.

        ``record=False`` keeps only the exit count (the benchmark's mode);
        ``trace=True`` also records the guest RIP at every exit.
        """
        if self.vcpu is None:
            raise UsageError("this Machine is closed")
        timeout = _run_timeout(timeout, self.image)
        self._reset_run_state()
        vcpu = self.vcpu
        kicked: list[bool] = []

        def on_deadline() -> None:
            kicked.append(True)
            vcpu.kick()

        records: list[TraceRecord] = []
        self._synced_rip = None
        tracer: Any = _NoKernelTrace()  # or the backend's kernel tracer: both have events and error
        if trace and not self.state_protected:  # not where the state is protected: KVM_RUN refuses it
            try:  # RIP from kvm_run at every exit instead of a KVM_GET_REGS each
                vcpu.enable_sync_regs(True)
                self._synced_rip = vcpu.synced_rip
            except FeatureUnavailable:
                pass
        if trace:
            with contextlib.suppress(FeatureUnavailable):
                tracer = vcpu.kernel_tracer()
        t0 = time.perf_counter()
        token = WATCHDOG.arm(timeout, on_deadline)
        try:
            with tracer:
                count = self._loop(records if record else None, trace, kicked)
        except _Timeout as t:
            WATCHDOG.disarm(token)
            last = records[-1].exit if records else None
            self.close()
            raise GuestTimeout(self.name, timeout, t.count, last) from None
        finally:
            WATCHDOG.disarm(token)
        elapsed = time.perf_counter() - t0
        try:
            hw_trace = list(vcpu.hardware_trace())
        except FeatureUnavailable:
            hw_trace = []
        fail_code, fail_line = self._fail
        vec, rip = self._exception
        assert self._outcome is not None  # the loops end only on an outcome
        return RunResult(
            guest=self.name, backend=self.backend, outcome=self._outcome, expected=self.expected,
            reports=self._reports, console=self.console.text, exits=records, exit_count=count,
            final_exit=self._final_exit, regs=None if self.state_protected else vcpu.get_regs(),
            regs_unavailable=PROTECTED_REGS if self.state_protected else None, fail_code=fail_code,
            fail_line=fail_line, exception_vector=vec, exception_rip=rip, message=self._message,
            elapsed=elapsed, hw_trace=hw_trace, kernel_trace=tracer.events,
            kernel_trace_error=tracer.error)

    #: Use the compiled exit path (kvm/fastpath.c) where the backend offers it and no
    #: on_exit hook needs to see every exit as it happens; False forces the Python loop.
    fast_path = True
    #: ``vcpu.synced_rip`` while a traced run has KVM_SYNC_X86_REGS on, else None
    _synced_rip: Callable[[], int | None] | None = None
    #: the exit loop the last run() took: "compiled" (kvm/fastpath.c) or "python"
    exit_path = ""

    def _loop(self, records: list[TraceRecord] | None, trace: bool, kicked: list[bool]) -> int:
        vcpu, bus, hooks = self._open_vcpu(), self.bus, self._hooks
        if self.fast_path and not hooks:
            try:
                fast = vcpu.fast_loop()  # None where the compiled loop cannot load
            except FeatureUnavailable:
                fast = None
            if fast is not None:
                self.exit_path = "compiled"
                return self._loop_fast(fast, records, trace, kicked)
        self.exit_path = "python"
        run = vcpu.runner()  # kvm: run() with the thread bound once
        port_handlers = bus.port_out_handlers
        IoOut = X.IoOut
        append = records.append if records is not None else None
        synced_rip = self._synced_rip if trace else None
        if trace and self.state_protected:
            synced_rip = _no_rip  # a protected guest's RIP is not the host's to read
        count = 0
        limit = TRACE_LIMIT
        if append is None and not hooks:  # the benchmark's case: nothing per exit but the device
            while self._outcome is None:
                try:
                    e = run()
                except InterruptedError:
                    if kicked:
                        raise _Timeout(count)
                    continue
                count += 1
                if type(e) is IoOut:
                    handler = port_handlers.get(e.port)
                    if handler is not None:
                        handler(e.port, e.size, e.data)
                        continue
                self._dispatch(e)
            return count
        while self._outcome is None:
            try:
                e = run()
            except InterruptedError:
                if kicked:
                    raise _Timeout(count)
                continue  # a stray signal: KVM_RUN is simply re-entered
            count += 1
            if append is not None and count <= limit:
                if trace:
                    rip = synced_rip() if synced_rip else vcpu.get_regs().rip
                    append(TraceRecord(e, rip))
                else:
                    append(TraceRecord(e))
            if hooks and self._run_hooks(e):
                continue
            try:
                if type(e) is IoOut:
                    handler = port_handlers.get(e.port)
                    if handler is None:
                        raise NoDevice(f"OUT to port {e.port:#x}")
                    handler(e.port, e.size, e.data)
                else:
                    self._handle(e)
            except NoDevice as nd:
                self._outcome = "unhandled"
                self._message = f"no device handles {nd} (exit {e})"
                self._final_exit = e
        return count

    def _loop_fast(self, fast: Any, records: list[TraceRecord] | None, trace: bool, kicked: list[bool]) -> int:
        """The loop over the compiled exit path: C runs KVM_RUN and handles the sink and
        posted devices' writes; each time it returns, the sinks are credited and the posted
        writes replayed (and recorded) in order, then the exit it returned for, if any, is
        handled here exactly as :meth:`_loop` handles it."""
        vcpu = self._open_vcpu()
        plan = self.bus.fast_plan(record=records is not None)
        rips = trace and not self.state_protected  # the ring carries RIPs only where the host may read them
        fast.configure(plan.ports, plan.mmio, rip=rips)
        run_c, decode, cb = fast.run, fast.decode or vcpu.decode_exit, fast.cb
        hint = vcpu.run_failure_hint
        append = records.append if records is not None else None
        synced_rip = self._synced_rip if trace else None
        if trace and self.state_protected:
            synced_rip = _no_rip
        count = 0
        limit = TRACE_LIMIT
        while self._outcome is None:
            rc = run_c()
            if cb.exits:
                count = self._replay(fast, plan, count, append, rips)
            if rc:
                if rc > 0:  # nothing pending: a full ring or the exit budget
                    continue
                try:
                    fast.raise_error(hint)
                except InterruptedError:
                    if kicked:
                        raise _Timeout(count)
                    continue
            e = decode()
            count += 1
            if append is not None and count <= limit:
                if trace:
                    append(TraceRecord(e, synced_rip() if synced_rip else vcpu.get_regs().rip))
                else:
                    append(TraceRecord(e))
            self._dispatch(e)
        return count

    def _dispatch(self, e: X.Exit) -> None:
        """One exit to its device (or to _handle), an unclaimed one ending the run as unhandled."""
        try:
            if type(e) is X.IoOut:
                handler = self.bus.port_out_handlers.get(e.port)
                if handler is None:
                    raise NoDevice(f"OUT to port {e.port:#x}")
                handler(e.port, e.size, e.data)
            else:
                self._handle(e)
        except NoDevice as nd:
            self._outcome = "unhandled"
            self._message = f"no device handles {nd} (exit {e})"
            self._final_exit = e

    @staticmethod
    def _replay(fast: Any, plan: FastPlan, count: int, append: Callable[[TraceRecord], None] | None,
                rips: bool) -> int:
        """Credit the sinks and replay the posted writes of one C call, in order (recording
        each, with its RIP when ``rips``)."""
        if fast.sunk_total:
            for slot, sunk in plan.sinks:
                n = fast.take_sunk(slot)
                if n:
                    sunk(n)
        handlers = plan.handlers
        n = count
        for e, slot, rip in fast.records():
            n += 1
            if append is not None and n <= TRACE_LIMIT:
                append(TraceRecord(e, rip if rips else None))
            if type(e) is X.IoOut:
                handlers[slot](e.port, e.size, e.data)
            else:
                handlers[slot](e.addr, e.size, e.data)
        return count + int(fast.exits)

    def _run_hooks(self, e: X.Exit) -> bool:
        handled = False
        for h in self._hooks:
            handled = bool(h(self, e)) or handled
        return handled

    def _handle(self, e: Any) -> None:  # Any: dispatched on type(e) below, which mypy does not narrow
        t = type(e)
        vcpu = self._open_vcpu()
        if t is X.IoIn:
            data = b"".join(self.bus.port_in(e.port, e.size).to_bytes(e.size, "little")
                            for _ in range(e.count))
            vcpu.complete(data)
        elif t is X.MmioWrite:
            self.bus.mmio_write(e.addr, e.size, e.data)
        elif t is X.MmioRead:
            vcpu.complete(self.bus.mmio_read(e.addr, e.size))
        elif t is X.MsrRead:
            value = self.msrs.read(e.index)
            vcpu.complete(value or 0, error=value is None)
        elif t is X.MsrWrite:
            vcpu.complete(error=not self.msrs.write(e.index, e.value))
        elif t is X.MemoryFault and self._snp_exits is not None:  # SNP: convert, run again
            self._snp_exits.memory_fault(e.gpa, e.size, e.private)
        elif t is X.Hypercall and e.nr == KVM_HC_MAP_GPA_RANGE and self._snp_exits is not None:
            vcpu.complete(self._snp_exits.map_gpa_range(e.args))  # SNP page-state change
        else:
            self._outcome = _OUTCOME_OF_EXIT.get(t, "unsupported")
            self._final_exit = e
            if t is X.InternalError:
                self._message = f"KVM internal error: {e.description}, data {[hex(d) for d in e.data]}"
            elif t is X.SevTermination:
                self._message = (f"SEV guest terminated: reason set {e.reason_set}, "
                                 f"code {e.reason_code} (GHCB MSR {e.ghcb_msr:#x})")
            elif t is X.Unsupported:
                self._message = f"exit reason {e.raw_reason} is not decoded by this kvmharness"

    # called by the ucall port device
    def _ucall(self, op: int) -> None:
        rbx, rcx = self.ucall_args()
        if op == P.UCALL_REPORT:
            self._reports.append((rbx, rcx))
        elif op == P.UCALL_DONE:
            self._outcome = "done"
        elif op == P.UCALL_FAIL:
            self._outcome = "fail"
            self._fail = (rbx, rcx)
        elif op == P.UCALL_EXCEPTION:
            self._outcome = "exception"
            self._exception = (rbx, rcx)
        else:
            self._outcome = "unhandled"
            self._message = f"unknown ucall op {op} (RBX={rbx:#x}, RCX={rcx:#x})"

    def ucall_args(self) -> tuple[int, int]:
        """The current ucall's RBX and RCX (at its IoOut exit; on_exit hooks may ask too):
        the vCPU's registers, or for a guest whose state is
        protected (SEV-ES) the GHCB page they were exchanged in.  guests/include/sev_es.h's
        ES_REPORT/ES_DONE/ES_FAIL put RAX (the op), RBX and RCX in the GHCB at GHCB_GPA and
        VMGEXIT with an IOIO OUT to UCALL_PORT; the page is shared, so the host reads it as
        plaintext (KVM clears the valid bitmap when it takes the registers, the values stay
        until the next VMRUN)."""
        if not self.state_protected:
            regs = self._open_vcpu().get_regs()
            return regs.rbx, regs.rcx
        from .sev.ghcb import Ghcb

        # an SNP vCPU's own GHCB, as it registered it (MSR protocol 0x012): each AP has one
        gpa = getattr(getattr(self.vcpu, "ghcb", None), "registered_ghcb_gpa", None)
        ghcb = Ghcb(bytearray(self._open_vm().read(gpa or _ghcb_gpa(), 4096)))
        return int(ghcb.get("rbx")), int(ghcb.get("rcx"))

    # -- teardown ---------------------------------------------------------------
    def close(self) -> None:
        if self.vm is not None:
            self.vm.close()
        self.vm = None
        self.vcpu = None
        if self._owns_system and self.system is not None:
            self.system.close()
            self.system = None  # type: ignore[assignment]  # closed: nothing to reach through

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


PROTECTED_REGS = ("the guest's state is protected (SEV-ES: its VMSA is encrypted since "
                  "LAUNCH_UPDATE_VMSA); the host cannot read its registers")


class _NoKernelTrace(contextlib.nullcontext[None]):
    """The kernel trace of a backend without a kernel tracer: nothing, and no error."""

    error = None

    @property
    def events(self) -> list[Any]:
        return []


def _no_rip() -> None:
    return None


@functools.lru_cache(maxsize=1)
def _ghcb_gpa() -> int:
    """GHCB_GPA of the guests' SEV-ES runtime (guests/include/sev_es.h, beside ucall.h)."""
    gpa: int = P.parse_header((P.header_path().parent / "sev_es.h").read_text())["GHCB_GPA"]
    return gpa


def _sev_vm_type(system: System, mode: str) -> int:
    """KVM_X86_SEV_VM / SEV_ES_VM where offered (INIT2), else the default VM (legacy INIT);
    KVM_X86_SNP_VM for sev-snp (there is no legacy SNP: KVM_CREATE_VM refuses it or not)."""
    if mode == "sev-snp":
        return KVM_X86_SNP_VM
    wanted = KVM_X86_SEV_VM if mode == "sev" else KVM_X86_SEV_ES_VM
    return wanted if wanted in system.capabilities.vm_types else KVM_X86_DEFAULT_VM


def _create_vm(system: System, vm_type: int) -> Vm:
    """KVM_CREATE_VM; an SNP VM on the simulator is sim/snp.py's (its SNP firmware and RMP)."""
    if vm_type == KVM_X86_SNP_VM and system.name == "sim":
        from .sim.snp import create_snp_vm
        from .sim.system import SimSystem

        if isinstance(system, SimSystem):
            return create_snp_vm(system)
    return system.create_vm(vm_type)


def sev_c_bit(system: System) -> int:
    """The encryption bit position the backend's CPUID 0x8000001F EBX[5:0] reports (51 if none)."""
    leaf = system.capabilities.sev_leaf
    return (leaf.ebx & 0x3F) if leaf is not None and leaf.ebx & 0x3F else 51


def needs_met(system: System, needs: Iterable[str]) -> tuple[bool, str]:
    """Whether a backend offers what a guest's manifest ``needs``, probed on its host now
    (``hostinfo.need_status``); if not, why."""
    from .hostinfo import unmet_needs

    unmet = unmet_needs(system, needs)
    if unmet:
        return False, "; ".join(f"needs {need}: {why}" for need, why in unmet)
    return True, ""


def _run_timeout(timeout: float | None, image: GuestImage | None) -> float:
    """The timeout a run uses: the caller's, else the manifest's, else 10 s; checked by
    :func:`watchdog.check_timeout` either way (a manifest's nan or inf is refused too)."""
    if timeout is not None:
        return check_timeout(timeout)
    if image is not None:
        return check_timeout(image.timeout, f"guest {image.name!r}: manifest timeout")
    return check_timeout(10.0)


class _Timeout(Exception):
    def __init__(self, count: int) -> None:
        self.count = count


class _UcallPort:
    __slots__ = ("machine",)

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def io_out(self, port: int, size: int, data: bytes) -> None:
        # a malformed GHCB can produce a zero-length OUT: op 0 is "unknown ucall"
        self.machine._ucall(data[0] if data else 0)


def launch_mode(image: GuestImage, sev: str | None) -> str | None:
    """The SEV mode a run of ``image`` launches in: ``sev`` as asked ("svm": none), else the
    guest's own (the first of sev-snp, sev-es, sev it needs), else none."""
    if sev is None:
        return next((mode for mode in ("sev-snp", "sev-es", "sev") if mode in image.needs), None)
    return None if sev == "svm" else sev


def run_guest(guest: str | GuestImage, backend: str | System = "auto", *, timeout: float | None = None,
              trace: bool = False, sev: str | None = None, policy: Any = None, owner: Any = None,
              on_launch: Callable[[Machine], object] | None = None) -> RunResult:
    """Load a manifest guest, run it to the end, return its result.

    A guest whose manifest expects a timeout (``spin``) returns outcome
    ``timeout``; any other guest that times out raises :class:`GuestTimeout`.
    A guest that ``needs`` "sev-snp", "sev-es" or "sev" is launched in that mode unless
    ``sev`` names one (``"svm"``: no SEV launch); ``policy`` and ``owner`` are the
    launch's (see :meth:`Machine.for_guest`).  ``on_launch(machine)`` is called once
    the Machine is made (launched, for an SEV mode) and before it runs: ``kvmharness
    run`` prints the launch there.  (Several vCPUs: ``smp.run_guest_vcpus``.)
    """
    image = guest if isinstance(guest, GuestImage) else get_guest(guest)
    timeout = _run_timeout(timeout, image)  # refused before any VM exists
    m = Machine.for_guest(image, backend, sev=launch_mode(image, sev), policy=policy, owner=owner)
    backend_name = m.backend
    t0 = time.perf_counter()
    try:
        if on_launch is not None:
            on_launch(m)
        return m.run(timeout, trace=trace)
    except GuestTimeout as t:
        if image.expect != "timeout":
            raise
        return RunResult(guest=image.name, backend=backend_name, outcome="timeout",
                         expected=image.expect, exit_count=t.exits, message=str(t),
                         elapsed=time.perf_counter() - t0)
    finally:
        m.close()
