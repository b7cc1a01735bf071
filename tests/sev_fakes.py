"""A VM that is only memory and a vCPU list: all the KVM SEV model (kvmharness.sev.kvm_model)
needs, so the launch flow and its error paths are tested without a CPU; and the guest
owner's attested LAUNCH_START on a simulated firmware (:func:`start_guest`)."""

from __future__ import annotations

from kvmharness.backend import KVM_X86_DEFAULT_VM, MemoryRegion, Vm
from kvmharness.boot import long_mode_state

MiB = 1 << 20


class FakeVcpu:
    """What the model reads from a vCPU: registers (for the VMSA), guest_debug, DR7."""

    def __init__(self, memory: int):
        self.regs, self.sregs = long_mode_state(memory)
        self.guest_debug = 0
        self.dr7 = 0x400

    def get_regs(self):
        return self.regs

    def get_sregs(self):
        return self.sregs


class FakeSystem:
    """How a simulator system offers SEV: a firmware model attached to the system."""

    name = "fake"

    def __init__(self, firmware):
        self.sev_firmware = firmware


class MemoryOnlyVm(Vm):
    def __init__(self, vm_type: int = KVM_X86_DEFAULT_VM, memory: int = MiB, system=None):
        self.vm_type = vm_type
        self.system = system
        self.vcpus: list = []
        self.regions: list = []
        self.add_memory(0, memory)

    def add_memory(self, gpa, size, *, readonly=False):
        buf = bytearray(size)
        region = MemoryRegion(len(self.regions), gpa, size, memoryview(buf), readonly, owner=buf)
        self.regions.append(region)
        return region

    def create_vcpu(self, vcpu_id=0):
        vcpu = FakeVcpu(self.regions[0].size)
        self.vcpus.append(vcpu)
        return vcpu

    def check_extension(self, cap):
        return 0

    def enable_cap(self, cap, *args):
        pass

    def enable_user_msr_exits(self, reasons):
        pass

    def set_msr_filter(self, ranges, *, default_allow=True):
        pass

    def open_sev_interface(self):
        """As the simulator's VM: KVM's SEV model over the system's firmware model."""
        from kvmharness.sev.kvm_model import KvmSevModel

        return KvmSevModel(self, self.system.sev_firmware)

    def close(self):
        pass


def start_guest(fw, policy=0, *, owner=None, activate=True):
    """An attested LAUNCH_START on firmware ``fw`` (INITed the kernel's way first) by
    ``owner`` (default: a GuestOwner with ``policy``), optionally ACTIVATEd on a fresh
    ASID of its kind: (handle, owner)."""
    from kvmharness.sev.session import GuestOwner

    fw.ensure_init()
    owner = owner or GuestOwner(policy)
    start = owner.start(*fw.pdh_cert_export())
    handle = fw.launch_start(start.policy, start.dh_cert, start.session)
    if activate:
        fw.activate(handle, fw.asids.allocate(es=owner.policy.es))
    return handle, owner
