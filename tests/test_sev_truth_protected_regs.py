"""An SEV-ES guest's registers are not the host's to read: KVM, the simulator and Machine agree.

Linux 6.10 ("KVM: x86: add fields to struct kvm_arch for CoCo features", Paolo Bonzini,
<20240209183743.22030-7-pbonzini@redhat.com>) made ``kvm_arch_vcpu_ioctl_get_regs`` /
``set_regs`` / ``get_sregs`` / ``set_sregs`` (and SREGS2, DEBUGREGS, XCRS; XSAVE and FPU
once the FPU state is confidential) return -EINVAL when
``vcpu->kvm->arch.has_protected_state && vcpu->arch.guest_state_protected``.
``has_protected_state`` is set for the SEV-ES and SNP VM types only (svm.c
``svm_vm_init``: ``type == KVM_X86_SEV_ES_VM || type == KVM_X86_SNP_VM``), and
``guest_state_protected`` by LAUNCH_UPDATE_VMSA.  A legacy KVM_SEV_ES_INIT VM (type 0)
still answers from KVM's register cache.

So after LAUNCH_UPDATE_VMSA the Machine never asks: ucall arguments come from the GHCB
page the guest exchanged them in (shared memory), results carry ``regs=None`` and say
why.  On the kvm backend that is checked through the ioctl recorder seam with a fake
kernel (the one tests/test_sev_ioctl_sequence.py drives the real backend with) that
refuses as Linux does; KVM_RUN goes through the seam too.
"""

from __future__ import annotations

import errno
import mmap
import struct

import pytest

from kvmharness import protocol as P
from kvmharness.backend import KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM, KVM_X86_SEV_VM
from kvmharness.errors import KvmError
from kvmharness.images import get_guest
from kvmharness.machine import Machine
from kvmharness.sev.ghcb import Ghcb
from kvmharness.sev.policy import GuestPolicy
from kvmharness.sev.session import GuestOwner

K = pytest.importorskip("kvmharness.kvm._ffi", reason="the kvm backend needs cffi and libc")
ffi = K.ffi

from test_sev_ioctl_sequence import FakeSevKernel  # noqa: E402

from kvmharness.kvm.sev import KvmSev  # noqa: E402
from kvmharness.kvm.system import KvmSystem  # noqa: E402

STATE_IOCTLS = {"KVM_GET_REGS", "KVM_SET_REGS", "KVM_GET_SREGS", "KVM_SET_SREGS"}
GHCB_GPA = 0x15000  # guests/include/sev_es.h
KVM_RUN_IO_DATA = 0x1000  # where the fake kernel puts an IO exit's data in kvm_run


# -- the simulator ---------------------------------------------------------------------------

@pytest.fixture
def sim_only():
    pytest.importorskip("unicorn", reason="the simulator needs unicorn")


def test_sim_refuses_register_reads_after_update_vmsa_on_the_sev_es_vm_type(sim_only):
    with Machine.for_guest("es-io", "sim", sev="sev-es") as m:
        assert m.vm.vm_type == KVM_X86_SEV_ES_VM and m.state_protected
        for call, name in ((m.vcpu.get_regs, "KVM_GET_REGS"), (m.vcpu.get_sregs, "KVM_GET_SREGS")):
            with pytest.raises(KvmError) as ei:
                call()
            assert ei.value.errno == errno.EINVAL and name in str(ei.value)
            assert "protected" in str(ei.value)
        r = m.run()
    assert r.outcome == "done" and r.regs is None and "protected" in r.regs_unavailable
    # the ucall arguments came from the GHCB: es-io's reports, as its manifest says
    assert dict(r.reports)[0x7B01] == 0x1122334455667700 and dict(r.reports)[0x7C00] == 0xFEDCBA9876543210
    assert r.to_dict()["regs"] is None and r.to_dict()["regs_unavailable"] == r.regs_unavailable


def test_sim_legacy_sev_es_init_vm_still_answers_from_the_register_cache(sim_only):
    with Machine.for_guest("es-cpuid-ghcb", "sim", sev="sev-es", vm_type=KVM_X86_DEFAULT_VM) as m:
        regs = m.vcpu.get_regs()  # KVM's cache: not the guest's state (RIP 0)
        assert regs.rip == 0
        r = m.run()
    # the Machine does not read them either way: the state is protected
    assert r.outcome == "done" and r.regs is None and r.reports[0] == (0, 16)


def test_sim_trace_of_a_protected_guest_records_no_rip(sim_only):
    with Machine.for_guest("es-cpuid-msr", "sim", sev="sev-es") as m:
        r = m.run(trace=True)
    assert r.outcome == "done" and r.exits and all(rec.rip is None for rec in r.exits)


# -- the kvm backend under a fake kernel that refuses as Linux does ------------------------------

class EsKernel(FakeSevKernel):
    """FakeSevKernel plus what a run needs: CPUID, KVM_RUN with scripted SEV-ES ucalls
    (the guest's part: RAX/RBX/RCX into the GHCB page, then the IOIO exit KVM makes of
    its VMGEXIT), and Linux's EINVAL for register state once it is protected."""

    def __init__(self, vm_types: int, script):
        super().__init__(vm_types)
        self.script = list(script)
        self.runs: dict[int, mmap.mmap] = {}
        self.vcpu_vm: dict[int, int] = {}
        self.protected: set[int] = set()
        self.machine = None

    def _kvm_create_vcpu(self, fd, arg):
        ret, err = super()._kvm_create_vcpu(fd, arg)
        self.runs[ret] = mmap.mmap(ret, self.MMAP_SIZE)
        self.vcpu_vm[ret] = fd
        return ret, err

    def _kvm_get_supported_cpuid(self, fd, arg):
        c = ffi.cast("struct kvm_cpuid2 *", arg)
        c.nent = 0
        return 0, 0

    def _kvm_set_cpuid2(self, fd, arg):
        return 0, 0

    def _kvm_sev_launch_update_vmsa(self, model, cmd, fd):
        ret = super()._kvm_sev_launch_update_vmsa(model, cmd, fd)
        if model.vm.vm_type == KVM_X86_SEV_ES_VM:  # has_protected_state
            self.protected |= {v for v, vm in self.vcpu_vm.items() if vm == fd}
        return ret

    def _refuse(self, fd):
        return fd in self.protected

    def _kvm_get_regs(self, fd, arg):
        return (-1, errno.EINVAL) if self._refuse(fd) else super()._kvm_get_regs(fd, arg)

    def _kvm_set_regs(self, fd, arg):
        return (-1, errno.EINVAL) if self._refuse(fd) else super()._kvm_set_regs(fd, arg)

    def _kvm_get_sregs(self, fd, arg):
        return (-1, errno.EINVAL) if self._refuse(fd) else super()._kvm_get_sregs(fd, arg)

    def _kvm_set_sregs(self, fd, arg):
        return (-1, errno.EINVAL) if self._refuse(fd) else super()._kvm_set_sregs(fd, arg)

    def _kvm_run(self, fd, arg):
        run = self.runs[fd]
        valid, dirty = struct.unpack_from("<QQ", run, ffi.offsetof("struct kvm_run", "kvm_valid_regs"))
        if (valid or dirty) and self.models[self.vcpu_vm[fd]].vm.vm_type == KVM_X86_SEV_ES_VM:
            return -1, errno.EINVAL  # 74c1807f6c4f: no sync regs where the state is protected
        if not self.script:
            return -1, errno.EFAULT
        op, rbx, rcx = self.script.pop(0)
        ghcb = Ghcb(bytearray(4096))  # what ES_REPORT leaves in the shared page
        for field, value in (("rax", op), ("rbx", rbx), ("rcx", rcx)):
            ghcb.set(field, value)
        ghcb.clear_valid()  # KVM's sev_es_sync_from_ghcb clears the bitmap, the values stay
        self.machine.vm.write(GHCB_GPA, bytes(ghcb))
        struct.pack_into("<I", run, 8, 2)  # exit_reason = KVM_EXIT_IO
        off = ffi.offsetof("struct kvm_run", "io")
        struct.pack_into("<BBHIQ", run, off, 1, 1, P.UCALL_PORT, 1, KVM_RUN_IO_DATA)
        run[KVM_RUN_IO_DATA] = op
        return 0, 0


def _kvm_machine(tmp_path, kernel, vm_type, guest="es-cpuid-msr"):
    """The guest launched as SEV-ES on the real kvm backend under the fake kernel."""
    (tmp_path / "kvm").write_bytes(b"")
    (tmp_path / "sev").write_bytes(b"")
    image = get_guest(guest)
    system = KvmSystem(str(tmp_path / "kvm"))
    m = Machine(system, memory=image.memory, vm_type=vm_type, name=guest, create_vcpu=False)
    m._owns_system = True
    kernel.machine = m
    kernel.attach(m.vm)
    sev = KvmSev(m.vm, sev_path=str(tmp_path / "sev"))
    m.vm._sev_interface_of_vm = sev
    # a Machine built directly (Machine.for_guest probes the host's needs first)
    m._sev_launch(image, image.load(), "sev-es", None, GuestOwner(GuestPolicy.parse("nodbg,es")))
    return m, sev


SCRIPT = [(P.UCALL_REPORT, 0x7B01, 0x1122334455667700), (P.UCALL_REPORT, 5, 6),
          (P.UCALL_DONE, 0, 0)]


@pytest.mark.parametrize("vm_type", [KVM_X86_SEV_ES_VM, KVM_X86_DEFAULT_VM],
                         ids=["sev-es-vm-init2", "legacy-es-init"])
def test_kvm_sev_es_run_issues_no_register_ioctl_after_update_vmsa(tmp_path, vm_type):
    types = (1 << KVM_X86_DEFAULT_VM) | (1 << KVM_X86_SEV_VM) | (1 << KVM_X86_SEV_ES_VM)
    kernel = EsKernel(types, SCRIPT)
    with K.IoctlRecorder(answer=kernel) as rec:
        m, sev = _kvm_machine(tmp_path, kernel, vm_type)
        rec.name_fd(sev.sev_fd, "sev")
        try:
            assert m.launch_result.verified and m.state_protected
            r = m.run(timeout=5)
        finally:
            m.close()
            sev.close()
    assert r.outcome == "done" and r.reports == [(0x7B01, 0x1122334455667700), (5, 6)]
    assert r.regs is None and "protected" in r.regs_unavailable
    steps = rec.steps()
    vmsa = steps.index("KVM_SEV_LAUNCH_UPDATE_VMSA")
    before = set(steps[:vmsa]) & STATE_IOCTLS
    assert {"KVM_SET_REGS", "KVM_SET_SREGS", "KVM_GET_REGS", "KVM_GET_SREGS"} <= before  # the VMSA
    assert not set(steps[vmsa:]) & STATE_IOCTLS, steps[vmsa:]
    # KVM_RUN is issued through the recorder seam (kvm/vcpu.py): once per exit, on the vCPU fd
    runs = rec.find("KVM_RUN")
    assert len(runs) == len(SCRIPT) and {c.fd_kind for c in runs} == {"vcpu"}
    assert steps.index("KVM_SEV_LAUNCH_FINISH") < steps.index("KVM_RUN")


@pytest.mark.parametrize("vm_type", [KVM_X86_SEV_ES_VM, KVM_X86_DEFAULT_VM],
                         ids=["sev-es-vm-init2", "legacy-es-init"])
def test_kvm_trace_of_a_protected_guest_asks_for_no_registers(tmp_path, vm_type):
    """A trace records no RIP and never sets kvm_valid_regs on the SEV-ES VM type, where
    KVM_RUN refuses it ("KVM: x86: block KVM_CAP_SYNC_REGS if guest state is protected",
    74c1807f6c4f, Linux 6.14 and stable)."""
    types = (1 << KVM_X86_DEFAULT_VM) | (1 << KVM_X86_SEV_ES_VM)
    kernel = EsKernel(types, SCRIPT)
    with K.IoctlRecorder(answer=kernel) as rec:
        m, sev = _kvm_machine(tmp_path, kernel, vm_type)
        try:
            if vm_type == KVM_X86_SEV_ES_VM:
                from kvmharness.errors import FeatureUnavailable

                with pytest.raises(FeatureUnavailable, match="protected"):
                    m.vcpu.enable_sync_regs(True)
            r = m.run(timeout=5, trace=True)
        finally:
            m.close()
            sev.close()
    assert r.outcome == "done" and len(r.exits) == len(SCRIPT)
    assert all(rec_.rip is None for rec_ in r.exits)
    steps = rec.steps()
    assert not set(steps[steps.index("KVM_SEV_LAUNCH_UPDATE_VMSA"):]) & STATE_IOCTLS
    assert all(c.ret == 0 for c in rec.find("KVM_RUN"))


def test_kvm_backend_names_the_ioctl_and_says_the_state_is_protected(tmp_path):
    types = (1 << KVM_X86_DEFAULT_VM) | (1 << KVM_X86_SEV_ES_VM)
    kernel = EsKernel(types, [])
    with K.IoctlRecorder(answer=kernel) as rec:
        m, sev = _kvm_machine(tmp_path, kernel, KVM_X86_SEV_ES_VM)
        try:
            for call, name in ((m.vcpu.get_regs, "KVM_GET_REGS"),
                               (m.vcpu.get_sregs, "KVM_GET_SREGS")):
                with pytest.raises(KvmError) as ei:
                    call()
                assert ei.value.errno == errno.EINVAL and name in str(ei.value)
                assert "protected" in str(ei.value) and "LAUNCH_UPDATE_VMSA" in str(ei.value)
            # a KVM_RUN failure through the seam is the usual one-line KvmError
            with pytest.raises(KvmError, match="KVM_RUN"):
                m.vcpu.run()
            assert m.vcpu.fast_loop() is None  # C would issue KVM_RUN unseen
            assert m.vcpu.runner() == m.vcpu.run
        finally:
            m.close()
            sev.close()
    assert [c.errno for c in rec.find("KVM_GET_REGS")][-1] == errno.EINVAL


def test_kvm_run_through_the_seam_reports_eintr_as_interrupted(tmp_path):
    kernel = EsKernel(1 << KVM_X86_DEFAULT_VM, [])
    kernel._kvm_run = lambda fd, arg: (-1, errno.EINTR)
    (tmp_path / "kvm").write_bytes(b"")
    with K.IoctlRecorder(answer=kernel) as rec:
        system = KvmSystem(str(tmp_path / "kvm"))
        vm = system.create_vm(KVM_X86_DEFAULT_VM)
        vcpu = vm.create_vcpu(0)
        with pytest.raises(InterruptedError):
            vcpu.run()
        vm.close()
        system.close()
    assert [(c.ret, c.errno) for c in rec.find("KVM_RUN")] == [(-1, errno.EINTR)]
