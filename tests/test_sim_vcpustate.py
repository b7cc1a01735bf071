"""The simulated vCPU's run state as one object (sim/vcpustate.py): the phase it names at
each exit of real guests, and that no other module writes its fields."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvmharness import exits
from kvmharness.machine import Machine
from kvmharness.sim import testing as T
from kvmharness.sim.system import SimSystem
from kvmharness.sim.vcpustate import Phase, SimVcpuState

SIM = Path(__file__).resolve().parent.parent / "kvmharness" / "sim"
needs_as = pytest.mark.skipif(not T.have_binutils(), reason="GNU as/ld (binutils) not installed")


def _phases(guest: str) -> tuple[Phase, list[tuple[str, Phase]], Phase, str]:
    """The phase before the run, at every exit (as an on_exit hook sees it), after it
    ends, and the outcome."""
    seen: list[tuple[str, Phase]] = []
    with Machine.for_guest(guest, "sim") as m:
        first = m.vcpu.phase
        m.on_exit(lambda machine, e: seen.append((type(e).__name__, machine.vcpu.phase)))
        r = m.run()
        return first, seen, m.vcpu.phase, r.outcome


def test_io_exits_leave_the_out_or_in_pending():
    first, seen, last, outcome = _phases("cpuid")
    assert outcome == "done" and first is Phase.ENTRY
    assert seen and all(phase is Phase.PENDING_IO for name, phase in seen if name in ("IoOut", "IoIn"))
    assert last is Phase.PENDING_IO  # the ucall DONE's OUT is the last exit


def test_an_mmio_read_waits_for_its_data_and_a_write_is_complete():
    """As KVM: a read's instruction completes on the next run (the data is owed); a write
    exits with its instruction complete (RIP past it), nothing owed."""
    _, seen, _, outcome = _phases("mmio")
    assert outcome == "done"
    reads = [phase for name, phase in seen if name == "MmioRead"]
    writes = [phase for name, phase in seen if name == "MmioWrite"]
    assert reads and writes  # sizes 1, 2, 4 and 8
    assert set(reads) == {Phase.PENDING_MMIO} and set(writes) == {Phase.IN_GUEST}


def test_userspace_msr_exits_leave_the_msr_pending():
    _, seen, _, outcome = _phases("msr")
    assert outcome == "done"
    msr = [phase for name, phase in seen if name in ("MsrRead", "MsrWrite")]
    assert len(msr) == 4 and set(msr) == {Phase.PENDING_MSR}  # two WRMSR, two RDMSR


@needs_as
def test_triple_fault_is_the_shutdown_phase_and_close_the_closed_one():
    system = SimSystem()
    vm = system.create_vm()
    v = vm.create_vcpu(0)
    T.long_mode_setup(vm, v, T.assemble("lidt [rip+idt]\nud2\nidt: .word 0\n.quad 0\n"))
    assert v.phase is Phase.ENTRY
    assert v.run() == exits.Shutdown()
    assert v.phase is Phase.SHUTDOWN
    v.set_regs(v.get_regs())  # what userspace does next changes nothing: still shut down
    assert v.run() == exits.Shutdown() and v.phase is Phase.SHUTDOWN
    system.close()
    assert v.phase is Phase.CLOSED


def test_the_transitions():
    st = SimVcpuState()
    assert st.phase is Phase.ENTRY and st.shadow["rdx"] == 0x600
    st.entered()
    assert st.phase is Phase.IN_GUEST and st.resume is None
    st.post_event(14, 0x1000)
    assert st.take_event() == (14, 0x1000) and st.event is None
    with pytest.raises(RuntimeError):
        st.take_event()
    st.owe("rdmsr", 0x10, 0x12)
    assert st.phase is Phase.PENDING_MSR and st.pending == ("rdmsr", 0x10, 0x12, None)
    st.pending = None
    st.reenter([("rbx", 7), ("rax", 9)])  # RAX lives in the VMCB, not in the shadow
    assert st.phase is Phase.ENTRY and st.shadow["rbx"] == 7 and "rax" not in st.shadow
    st.shut_down(exits.Shutdown())
    assert st.phase is Phase.SHUTDOWN and st.exit == exits.Shutdown()


FIELDS = set(SimVcpuState.__slots__)


def _writes_outside(path: Path) -> list[str]:
    """Assignments to a run-state field (``x.run_state.f = ...``, ``x._f = ...`` on another
    object than self, or a field of the old flat layout) in one module."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            for sub in ast.walk(t):
                if not isinstance(sub, ast.Attribute):
                    continue
                owner = sub.value
                a_field = isinstance(owner, ast.Attribute) and owner.attr == "run_state" and sub.attr in FIELDS
                an_old_flag = sub.attr.startswith("_") and sub.attr.lstrip("_") in FIELDS \
                    and not (isinstance(owner, ast.Name) and owner.id == "self")
                if a_field or an_old_flag:
                    found.append(f"{path.name}:{sub.lineno} {ast.unparse(sub)}")
    return found


def test_only_the_vcpu_writes_its_run_state_fields():
    """The models (nested, SEV, SEV-ES, SNP) and the KVM exit layer move the state through
    SimVcpuState's transitions or SimVcpu's calls; only sim/vcpu.py (the run loop, the
    register calls) sets fields itself."""
    offenders = []
    for path in sorted(SIM.glob("*.py")):
        if path.name in ("vcpu.py", "vcpustate.py"):
            continue
        offenders += _writes_outside(path)
    # kvmlayer.py is SimVcpu's own mixin (the exit handling of the same object): it may
    # clear the exit and the pending completion it finishes itself, nothing else
    allowed = {"self.run_state.pending", "self.run_state.replay", "self.run_state.exit"}
    offenders = [o for o in offenders if not (o.startswith("kvmlayer.py:") and o.split()[1] in allowed)]
    assert offenders == []


def test_the_planted_write_is_found(tmp_path):
    bad = tmp_path / "nested.py"
    bad.write_text("def f(v):\n    v.run_state.need_entry = True\n    v._save_stale = False\n")
    assert len(_writes_outside(bad)) == 2


def test_nested_reads_only_the_public_decode_api():
    """sim/nested.py reaches the vCPU through public names only (no ``v._x``)."""
    tree = ast.parse((SIM / "nested.py").read_text())
    private = sorted({f"{ast.unparse(n)}" for n in ast.walk(tree)
                      if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                      and n.value.id in ("v", "vcpu") and n.attr.startswith("_")})
    assert private == []
