"""The total backend contract: which backend offers which optional capability.

Every optional capability is a method of the ABCs in kvmharness/backend.py whose default
raises FeatureUnavailable (cloud-hypervisor's ``trait Vcpu``/``trait Vm`` give each
optional call a default body returning an "unimplemented" error).  This file pins, as
psutil's ``tests/test_contracts.py`` (TestAvailability) does for platforms, which backend
class implements which capability, so none can silently vanish from one backend; checks
that a capability a backend lacks is refused with FeatureUnavailable (never an
AttributeError); and that nothing in kvmharness/ asks a backend object whether it has an
attribute (``hasattr``/``getattr`` with a contract name) instead of calling it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kvmharness.backend import KVM_X86_DEFAULT_VM, System, Vcpu, Vm, kvm_usable
from kvmharness.errors import FeatureUnavailable
from kvmharness.sim.seves import SevEsVcpu
from kvmharness.sim.snp import SnpVcpu
from kvmharness.sim.system import SimSystem
from kvmharness.sim.vcpu import SimVcpu
from kvmharness.sim.vm import SimVm

PACKAGE = Path(__file__).resolve().parent.parent / "kvmharness"
KVM_OK, KVM_WHY = kvm_usable()

# The optional capabilities, and the backend classes that implement each.  A change here
# is a change of the contract: say so in the commit.
VCPU_CAPABILITIES: dict[str, set[str]] = {
    "fast_loop": {"KvmVcpu"},                 # the compiled exit loop (kvm/fastpath.c)
    "decode_exit": {"KvmVcpu"},
    "enable_sync_regs": {"KvmVcpu"},          # KVM_CAP_SYNC_REGS
    "synced_rip": {"KvmVcpu"},
    "kernel_tracer": {"KvmVcpu"},             # KVM tracepoints through tracefs
    "get_nested_state": {"KvmVcpu", "SimVcpu"},
    "set_nested_state": {"KvmVcpu", "SimVcpu"},
    "complete_pending_exit": {"KvmVcpu", "SimVcpu"},
    "hardware_trace": {"SimVcpu"},            # every SVM #VMEXIT (KVM's stay in the kernel)
    "add_vmexit_hook": {"SimVcpu"},
    "remove_vmexit_hook": {"SimVcpu"},
    "vmcb": {"SimVcpu", "SevEsVcpu"},         # the VMCB view (SEV-ES: the control area only)
    "inject_exception": {"SimVcpu"},
    "vmsa_ciphertext": {"SevEsVcpu"},         # the encrypted VMSA as the host reads it
    "save_vmsa_at_exit": {"SevEsVcpu"},
    "add_rmp_fault_hook": {"SnpVcpu"},        # RMP faults of an SEV-SNP guest (kvmharness.lab)
}
VM_CAPABILITIES: dict[str, set[str]] = {
    "open_sev_interface": {"KvmVm", "SimVm"},  # KVM_MEMORY_ENCRYPT_OP / the simulated PSP
    "remap_page": {"SimVm"},                   # one nested page table entry (kvmharness.lab)
    "flush_code": {"SimVm"},                   # stale translations: an emulator's only
}


def _kvm_classes():
    from kvmharness.kvm.vcpu import KvmVcpu
    from kvmharness.kvm.vm import KvmVm

    return KvmVcpu, KvmVm


def _implements(cls: type, base: type, name: str) -> bool:
    """Whether ``cls`` (or a backend class between it and ``base``) defines ``name``."""
    for klass in cls.__mro__:
        if klass is base:
            return False
        if name in vars(klass):
            return True
    return False


def test_every_capability_has_a_default_that_refuses():
    for base, table in ((Vcpu, VCPU_CAPABILITIES), (Vm, VM_CAPABILITIES)):
        for name in table:
            assert name in vars(base), f"{base.__name__}.{name} is not part of the interface"
    # the pinned list is the whole of the optional part: no default left out of it
    optional = {n for n, v in vars(Vcpu).items() if not n.startswith("_") and n not in Vcpu.__abstractmethods__
                and (callable(v) or isinstance(v, property))}
    # with a default every backend can live with: run() itself, no hint for a KVM_RUN errno
    assert optional - set(VCPU_CAPABILITIES) == {"runner", "run_failure_hint"}


@pytest.mark.parametrize("name", sorted(VCPU_CAPABILITIES))
def test_which_vcpu_class_offers_which_capability(name):
    kvm_vcpu, _ = _kvm_classes()
    classes = {"KvmVcpu": kvm_vcpu, "SimVcpu": SimVcpu, "SevEsVcpu": SevEsVcpu, "SnpVcpu": SnpVcpu}
    offered = {label for label, cls in classes.items() if _implements(cls, Vcpu, name)}
    expected = set(VCPU_CAPABILITIES[name])
    if "SimVcpu" in expected:
        expected.add("SevEsVcpu")  # an SEV-ES vCPU is a simulated vCPU
    if "SevEsVcpu" in expected:
        expected.add("SnpVcpu")  # and an SNP vCPU an SEV-ES one
    assert offered == expected


@pytest.mark.parametrize("name", sorted(VM_CAPABILITIES))
def test_which_vm_class_offers_which_capability(name):
    _, kvm_vm = _kvm_classes()
    offered = {label for label, cls in (("KvmVm", kvm_vm), ("SimVm", SimVm)) if _implements(cls, Vm, name)}
    assert offered == VM_CAPABILITIES[name]


def test_chosen_because_is_declared_by_the_interface():
    assert System.chosen_because == ""
    assert SimSystem().chosen_because == ""  # made directly: nobody chose it
    from kvmharness.factory import open_backend

    with open_backend("sim") as system:
        assert system.chosen_because == "sim backend requested"


def _call(obj, name: str):
    """Call one capability with harmless arguments (nothing the guest could notice)."""
    if name == "vmcb":
        return obj.vmcb
    args = {"enable_sync_regs": (False,), "inject_exception": (6,),
            "add_vmexit_hook": (print,), "remove_vmexit_hook": (print,), "add_rmp_fault_hook": (print,),
            "set_nested_state": (None,),
            "remap_page": (0x1000, 0x1000), "flush_code": (0x1000, 0x1000)}.get(name, ())
    return getattr(obj, name)(*args)


def test_a_missing_capability_is_refused_with_feature_unavailable(backend):
    # ``backend``: the pytest plugin's parameter, kvm skipped where /dev/kvm is not usable
    from kvmharness.factory import open_backend

    with open_backend(backend) as system, system.create_vm(KVM_X86_DEFAULT_VM) as vm:
        vm.add_memory(0, 0x10000)
        vcpu = vm.create_vcpu(0)
        label = type(vcpu).__name__
        refused = []
        for name, offered_by in VCPU_CAPABILITIES.items():
            if label in offered_by or (label != "KvmVcpu" and "SimVcpu" in offered_by):
                continue
            with pytest.raises(FeatureUnavailable) as info:
                _call(vcpu, name)
            assert label in str(info.value)  # says which vCPU lacks it
            refused.append(name)
        vm_label = type(vm).__name__
        for name, offered_by in VM_CAPABILITIES.items():
            if vm_label in offered_by:
                continue
            if name == "flush_code":  # hardware keeps no stale translation: nothing to refuse
                assert _call(vm, name) is None
                continue
            with pytest.raises(FeatureUnavailable):
                _call(vm, name)
            refused.append(name)
        assert refused  # each backend lacks something the other has


def test_the_simulators_capabilities_answer():
    with SimSystem() as system, system.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        vcpu = vm.create_vcpu(0)
        assert list(vcpu.hardware_trace()) == []
        seen = []
        vcpu.add_vmexit_hook(seen.append)
        vcpu.remove_vmexit_hook(seen.append)
        assert vcpu.vmcb.control.exit_code == 0
        state = vcpu.get_nested_state()
        assert not state.guest_mode and state.gif_set
        vcpu.complete_pending_exit()
        vm.remap_page(0x1000, 0x2000)
        assert vm.remapped == {0x1000: 0x2000}
        vm.remap_page(0x1000, 0x1000)
        assert vm.sev_interface() is vm.sev_interface()  # one per VM: it holds the launch state


@pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")
def test_the_kvm_backends_capabilities_answer():
    from kvmharness.factory import open_backend

    with open_backend("kvm") as system, system.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        vcpu = vm.create_vcpu(0)
        vcpu.enable_sync_regs(True)
        assert isinstance(vcpu.synced_rip(), int)
        vcpu.enable_sync_regs(False)
        assert vcpu.run_failure_hint(28).startswith("no memory slot")  # ENOSPC
        tracer = vcpu.kernel_tracer()
        assert hasattr(tracer, "__enter__")
        iface = vm.sev_interface()
        assert iface is vm.sev_interface() and iface.backend == "kvm"
        iface.close()
        from kvmharness.kvm._ffi import KVM_CAP_NESTED_STATE

        if not vm.check_extension(KVM_CAP_NESTED_STATE):
            with pytest.raises(FeatureUnavailable, match="KVM_CAP_NESTED_STATE"):
                vcpu.get_nested_state()
        else:
            assert vcpu.get_nested_state().size >= 128


# -- no probe of a backend object --------------------------------------------------------

#: attribute names that are backend objects' (the interface's, and the backends' own):
#: asking ``hasattr(x, name)`` or ``getattr(x, name, default)`` for one is a probe
_BACKEND_NAMES = ({n for base in (Vcpu, Vm, System) for n in dir(base) if not n.startswith("__")}
                  | {"svm", "core", "sev_model", "sev_firmware", "profile", "hw_trace", "kvm_run",
                     "vmsa_saved_at_exit", "vcpus", "vm_type", "system", "_fast", "_sev_model",
                     "_sev_memory", "_vms", "_run_failure_hint", "_sev_interface_of_vm", "remapped",
                     "snp_chip", "firmware"})


def _probes(package: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("hasattr", "getattr") and len(node.args) >= 2):
                continue
            name = node.args[1]
            if isinstance(name, ast.Constant) and name.value in _BACKEND_NAMES:
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}: "
                             f"{node.func.id}(..., {name.value!r})")
    return found


def test_no_probe_of_a_backend_object_remains():
    assert _probes() == []


def test_the_probe_finder_finds_a_probe(tmp_path):
    (tmp_path / "kvmharness").mkdir()
    (tmp_path / "kvmharness" / "x.py").write_text(
        "def f(v, r):\n    return getattr(v, 'vmcb', None), getattr(r, 'rax'), hasattr(v, 'remap_page')\n")
    assert _probes(tmp_path / "kvmharness") == ["kvmharness/x.py:2: getattr(..., 'vmcb')",
                                                "kvmharness/x.py:2: hasattr(..., 'remap_page')"]
