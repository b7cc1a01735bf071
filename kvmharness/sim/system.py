"""The simulator's root object: the ``sim`` backend's :class:`~kvmharness.backend.System`."""

from __future__ import annotations

import itertools

from ..abi import KVM_CAP_NUMBERS, KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM, KVM_X86_SEV_VM
from ..backend import Capabilities, System
from ..errors import FeatureUnavailable
from .cpumodel import SUPPORTED_CPUID
from .profile import KvmProfile, resolve as _resolve_profile

# The capabilities the model offers (their KVM_CAP_* numbers are in kvmharness.abi), and their values.
SIM_EXTENSIONS = {
    "KVM_CAP_HLT": 1, "KVM_CAP_USER_MEMORY": 1, "KVM_CAP_EXT_CPUID": 1, "KVM_CAP_NR_VCPUS": 1,
    "KVM_CAP_NR_MEMSLOTS": 32764, "KVM_CAP_SET_GUEST_DEBUG": 1, "KVM_CAP_MAX_VCPUS": 1,
    "KVM_CAP_READONLY_MEM": 1, "KVM_CAP_IMMEDIATE_EXIT": 1, "KVM_CAP_X86_USER_SPACE_MSR": 1,
    "KVM_CAP_X86_MSR_FILTER": 1, "KVM_CAP_DISABLE_QUIRKS2": 0x5FF, "KVM_CAP_VM_TYPES": 1,
}


class SimSystem(System):
    name = "sim"
    #: the simulated SEV firmware (one chip per host), made on first use (sim/sev.py firmware_for)
    sev_firmware = None
    #: the simulated SNP chip (snp/attest.py), made on first use (sim/snp.py snp_chip_for)
    snp_chip = None

    def __init__(self, *, supported_cpuid=None, profile: str | KvmProfile | None = None):
        """``supported_cpuid`` replaces the model's table (cpumodel.SUPPORTED_CPUID), e.g. with
        a real host's KVM_GET_SUPPORTED_CPUID so both backends give guests the same leaves.
        ``profile`` is the KVM modelled, ``"kvm_amd"`` or ``"kvm_pvm"`` (sim/profile.py);
        default ``$KVMHARNESS_SIM_PROFILE``, else kvm_amd."""
        self.profile = _resolve_profile(profile)
        self._asids = itertools.count(1)
        self._vms = []
        self._caps = Capabilities(backend="sim", api_version=12, extensions=dict(SIM_EXTENSIONS),
                                  vm_types=frozenset({KVM_X86_DEFAULT_VM, KVM_X86_SEV_VM,  # SEV, SEV-ES: sim/sev.py
                                                     KVM_X86_SEV_ES_VM}),
                                  supported_cpuid=supported_cpuid or SUPPORTED_CPUID,
                                  msr_index_list=(0x10, 0x1B, 0x174, 0x175, 0x176, 0x277, 0xC0000080,
                                                  0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,
                                                  0xC0000100, 0xC0000101, 0xC0000102, 0xC0010114,
                                                  0xC0010117))

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    def check_extension(self, cap: int) -> int:
        for name, number in KVM_CAP_NUMBERS.items():
            if number == cap:
                return SIM_EXTENSIONS.get(name, 0)
        return 0

    def create_vm(self, vm_type: int = KVM_X86_DEFAULT_VM):
        from .vm import SimVm

        if vm_type not in self._caps.vm_types:
            raise FeatureUnavailable(f"the simulator does not model VM type {vm_type} yet")
        vm = SimVm(self, vm_type, next(self._asids))
        self._vms.append(vm)
        return vm

    def close(self) -> None:
        for vm in list(self._vms):  # a VM's close() takes it off the list
            vm.close()
        self._vms.clear()
