"""The ioctls the kvm backend issues for an SEV / SEV-ES launch, beside the kernel's own users.

This host has no SEV, so the syscall itself is replaced: ``kvm._ffi.IoctlRecorder``
(the seam below ``kvm/``) hands every ioctl of the *real* kvm backend code
(``kvm/system.py``, ``kvm/vm.py``, ``kvm/sev.py``, ``kvm/sevdev.py``,
``sev/launch.py``) to :class:`FakeSevKernel`, which answers as Linux would:
``KVM_MEMORY_ENCRYPT_OP`` through the model of KVM's ``sev.c``
(``sev.kvm_model.KvmSevModel``) over the firmware model, ``SEV_ISSUE_CMD``
through the model of ``sev-dev.c``, with the kernel's length-query
conventions (-EIO plus INVALID_LEN and the length written back).  Guest
memory is the backend's real mmap, encrypted in place; the guest owner's
TIK verifies the measurement, so every byte that went in and came out was
plausible to the owner as well.

The recorded sequence is compared with what the kernel's own users issue:

* Linux KVM selftests, torvalds/linux @ b2128290c29902315e632ea59e0504d6bc9e9b42:
  ``tools/testing/selftests/kvm/lib/x86/processor.c`` ``kvm_arch_vm_post_create``
  (KVM_SEV_INIT2 right after the VM and its memslot, before any vCPU),
  ``lib/x86/sev.c`` ``sev_vm_init`` / ``sev_es_vm_init`` (legacy INIT),
  ``sev_vm_launch``, ``encrypt_region``, ``sev_vm_launch_measure``,
  ``sev_vm_launch_finish``, ``vm_sev_launch``; ``x86/sev_smoke_test.c`` runs
  ``vm_sev_create_with_one_vcpu`` then ``vm_sev_launch`` (policy ES for SEV-ES).
* QEMU, qemu/qemu @ d4b976c0a81dc625ccd05e2b3075f353170669d4, ``target/i386/sev.c``:
  ``sev_common_kvm_init`` (KVM_SEV_INIT / KVM_SEV_ES_INIT / KVM_SEV_INIT2, then
  ``sev_launch_start``, then ``sev_kvm_init`` whose ``ram_block_notifier_add``
  registers RAM: KVM_MEMORY_ENCRYPT_REG_REGION), ``sev_launch_update_data``
  (firmware flash), ``sev_launch_get_measure`` (``sev_launch_update_vmsa`` for
  SEV-ES first, then LAUNCH_MEASURE twice: length query, then the blob),
  ``sev_launch_finish``.

Both start the guest context (LAUNCH_START) *before* registering memory;
kvmharness used to register first (KVM accepts either) and now follows them.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest

from kvmharness.backend import KVM_X86_DEFAULT_VM, KVM_X86_SEV_ES_VM, KVM_X86_SEV_VM
from kvmharness.errors import SevError
from kvmharness.sev.policy import GuestPolicy
from kvmharness.sev.session import GuestOwner
from kvmharness.sev.status import GuestState, SevStatus

K = pytest.importorskip("kvmharness.kvm._ffi", reason="the kvm backend needs cffi and libc")
ffi = K.ffi

from kvmharness.kvm.sev import KvmSev  # noqa: E402  (after the importorskip)
from kvmharness.kvm.system import KvmSystem  # noqa: E402
from kvmharness.sev.firmware import SimulatedSevFirmware  # noqa: E402
from kvmharness.sev.kvm_model import KvmSevModel, SimulatedSevDevice  # noqa: E402
from kvmharness.sev.launch import SevLaunch  # noqa: E402

LOAD = 0x10000
IMAGE = bytes(range(256)) * 24 + b"tail"  # 6148 bytes: padded to 6160
CERT = 0x824

# -- the references: the launch steps in order, with where they come from -----------------

INIT_STEPS = {"KVM_SEV_INIT", "KVM_SEV_ES_INIT", "KVM_SEV_INIT2"}
CORE = INIT_STEPS | {"KVM_SEV_LAUNCH_START", "KVM_MEMORY_ENCRYPT_REG_REGION",
                     "KVM_SEV_LAUNCH_UPDATE_DATA", "KVM_SEV_LAUNCH_UPDATE_VMSA",
                     "KVM_SEV_LAUNCH_MEASURE", "KVM_SEV_LAUNCH_FINISH"}

SELFTESTS = ("torvalds/linux b2128290c299", "tools/testing/selftests/kvm/lib/x86/sev.c",
             "kvm_arch_vm_post_create + sev_vm_launch + sev_vm_launch_measure + "
             "sev_vm_launch_finish (vm_sev_launch, as sev_smoke_test.c runs it)")
QEMU = ("qemu/qemu d4b976c0a81d", "target/i386/sev.c",
        "sev_common_kvm_init (init, sev_launch_start, sev_kvm_init: ram_block_notifier_add) + "
        "sev_launch_update_data + sev_launch_get_measure (+ sev_launch_update_vmsa) + "
        "sev_launch_finish")


def selftests_order(init: str, es: bool) -> list[str]:
    """vm_sev_launch's ioctls (GUEST_STATUS included), after the post-create INIT and the vCPU."""
    return ([init, "KVM_CREATE_VCPU",
             "KVM_SEV_LAUNCH_START", "KVM_SEV_GUEST_STATUS",          # sev_vm_launch
             "KVM_MEMORY_ENCRYPT_REG_REGION", "KVM_SEV_LAUNCH_UPDATE_DATA"]  # encrypt_region
            + (["KVM_SEV_LAUNCH_UPDATE_VMSA"] if es else [])            # policy & SEV_POLICY_ES
            + ["KVM_SEV_LAUNCH_MEASURE", "KVM_SEV_GUEST_STATUS",        # sev_vm_launch_measure
               "KVM_SEV_GUEST_STATUS", "KVM_SEV_LAUNCH_FINISH",         # sev_vm_launch_finish
               "KVM_SEV_GUEST_STATUS"])


def qemu_order(init: str, es: bool) -> list[str]:
    """QEMU's SEV ioctls on the VM fd (vCPUs come after sev_common_kvm_init)."""
    return ([init, "KVM_SEV_LAUNCH_START", "KVM_MEMORY_ENCRYPT_REG_REGION", "KVM_CREATE_VCPU",
             "KVM_SEV_LAUNCH_UPDATE_DATA"]
            + (["KVM_SEV_LAUNCH_UPDATE_VMSA"] if es else [])
            + ["KVM_SEV_LAUNCH_MEASURE", "KVM_SEV_LAUNCH_MEASURE",  # length query, then blob
               "KVM_SEV_LAUNCH_FINISH"])


def core(steps: list[str]) -> list[str]:
    """The launch steps only (no GUEST_STATUS, no vCPU, no /dev/sev), repeats collapsed."""
    out: list[str] = []
    for s in steps:
        if s in CORE and (not out or out[-1] != s):
            out.append(s)
    return out


# -- the fake kernel --------------------------------------------------------------------------

class FakeSevKernel:
    """Answers ioctls the way Linux with SEV would, from the kvmharness models of KVM and the PSP."""

    MMAP_SIZE = 3 * 4096

    def __init__(self, vm_types: int):
        self.firmware = SimulatedSevFirmware(num_asids=15, min_sev_asid=5)
        self.device = SimulatedSevDevice(self.firmware)
        self.vm_types = vm_types
        self.models: dict[int, KvmSevModel] = {}
        self.regs: dict[tuple[int, str], bytes] = {}

    def attach(self, vm) -> None:
        """KVM's per-VM state for a VM the backend created (``struct kvm_sev_info``)."""
        self.models[vm.fd] = KvmSevModel(vm, self.firmware)

    def __call__(self, fd, request, arg, call):
        name = K.IOCTL_NAMES.get(request, "")
        handler = getattr(self, "_" + name.lower(), None)
        if handler is None:
            return -1, errno.ENOTTY
        try:
            return handler(fd, arg)
        except SevError as e:  # a refusal travels back as the kernel reports it
            return -1, e.errno

    # /dev/kvm and plain VM/vCPU ioctls
    def _kvm_get_api_version(self, fd, arg):
        return 12, 0

    def _kvm_get_vcpu_mmap_size(self, fd, arg):
        return self.MMAP_SIZE, 0

    def _kvm_check_extension(self, fd, arg):
        cap = int(ffi.cast("uintptr_t", arg))
        return (self.vm_types if cap == K.KVM_CAP_VM_TYPES else 0), 0

    def _kvm_create_vm(self, fd, arg):
        return os.memfd_create("fake-kvm-vm", os.MFD_CLOEXEC), 0

    def _kvm_create_vcpu(self, fd, arg):
        vcpu = os.memfd_create("fake-kvm-vcpu", os.MFD_CLOEXEC)
        os.ftruncate(vcpu, self.MMAP_SIZE)  # the kvm_run mapping
        return vcpu, 0

    def _kvm_set_user_memory_region(self, fd, arg):
        return 0, 0

    def _kvm_enable_cap(self, fd, arg):
        return 0, 0

    def _set(self, what, fd, arg):
        self.regs[fd, what] = bytes(ffi.buffer(arg))
        return 0, 0

    def _get(self, what, fd, arg):
        ffi.buffer(arg)[:] = self.regs.get((fd, what), bytes(len(ffi.buffer(arg))))
        return 0, 0

    def _kvm_set_regs(self, fd, arg):
        return self._set("regs", fd, arg)

    def _kvm_get_regs(self, fd, arg):
        return self._get("regs", fd, arg)

    def _kvm_set_sregs(self, fd, arg):
        return self._set("sregs", fd, arg)

    def _kvm_get_sregs(self, fd, arg):
        return self._get("sregs", fd, arg)

    # SEV on the VM fd (arch/x86/kvm/svm/sev.c)
    def _gpa(self, fd, uaddr: int) -> int:
        vm = self.models[fd].vm
        for r in vm.regions:
            base = vm.host_address(r)
            if base <= uaddr < base + r.size:
                return r.gpa + uaddr - base
        raise SevError("pin_user_pages", errno.EFAULT, None, f"{uaddr:#x} is no slot")

    def _kvm_memory_encrypt_reg_region(self, fd, arg):
        r = ffi.cast("struct kvm_enc_region *", arg)
        self.models[fd].register_region(self._gpa(fd, r.addr), r.size)
        return 0, 0

    def _kvm_memory_encrypt_op(self, fd, arg):
        cmd = ffi.cast("struct kvm_sev_cmd *", arg)
        model = self.models[fd]
        name = K.SEV_KVM_COMMANDS[cmd.id][0]
        try:
            return getattr(self, "_" + name.lower())(model, cmd, fd), 0
        except SevError as e:  # sev_issue_cmd: -EIO and the status in kvm_sev_cmd.error
            cmd.error = (e.fw_error or 0) & 0xFFFFFFFF
            if e.fw_error == SevStatus.INVALID_LEN and name == "KVM_SEV_LAUNCH_MEASURE":
                ffi.cast("struct kvm_sev_launch_measure *", cmd.data).len = 48
            return -1, e.errno

    def _kvm_sev_init(self, model, cmd, fd):
        model.init("sev")
        return 0

    def _kvm_sev_es_init(self, model, cmd, fd):
        model.init("sev-es")
        return 0

    def _kvm_sev_init2(self, model, cmd, fd):
        p = ffi.cast("struct kvm_sev_init *", cmd.data)
        mode = "sev-es" if model.vm.vm_type == KVM_X86_SEV_ES_VM else "sev"
        model.init(mode, vmsa_features=p.vmsa_features, ghcb_version=p.ghcb_version)
        return 0

    @staticmethod
    def _blob(addr, length):
        return bytes(ffi.buffer(ffi.cast("char *", addr), length)) if addr else None

    def _kvm_sev_launch_start(self, model, cmd, fd):
        p = ffi.cast("struct kvm_sev_launch_start *", cmd.data)
        p.handle = model.launch_start(p.policy, handle=p.handle,
                                      dh_cert=self._blob(p.dh_uaddr, p.dh_len),
                                      session=self._blob(p.session_uaddr, p.session_len))
        return 0

    def _kvm_sev_launch_update_data(self, model, cmd, fd):
        p = ffi.cast("struct kvm_sev_launch_update_data *", cmd.data)
        model.launch_update_data(self._gpa(fd, p.uaddr), p.len)
        return 0

    def _kvm_sev_launch_update_vmsa(self, model, cmd, fd):
        model.launch_update_vmsa()
        return 0

    def _kvm_sev_launch_measure(self, model, cmd, fd):
        p = ffi.cast("struct kvm_sev_launch_measure *", cmd.data)
        if not p.len:  # the firmware answers a zero length with INVALID_LEN (and 48)
            raise SevError("KVM_SEV_LAUNCH_MEASURE", errno.EIO, SevStatus.INVALID_LEN)
        n, raw = model.launch_measure(p.len)
        ffi.buffer(ffi.cast("char *", p.uaddr), n)[:] = raw
        p.len = n
        return 0

    def _kvm_sev_launch_finish(self, model, cmd, fd):
        model.launch_finish()
        return 0

    def _kvm_sev_guest_status(self, model, cmd, fd):
        p = ffi.cast("struct kvm_sev_guest_status *", cmd.data)
        st = model.guest_status()
        p.handle, p.policy, p.state = st.handle, st.policy, int(st.state)
        return 0

    # /dev/sev (drivers/crypto/ccp/sev-dev.c)
    def _sev_issue_cmd(self, fd, arg):
        c = ffi.cast("struct sev_issue_cmd *", arg)
        name = K.SEV_DEV_COMMANDS[c.cmd][0]
        if name == "SEV_PLATFORM_STATUS":
            raw = self.device.status().to_bytes()
            ffi.buffer(ffi.cast("struct sev_user_data_status *", c.data))[:] = raw
            return 0, 0
        if name == "SEV_PDH_CERT_EXPORT":
            p = ffi.cast("struct sev_user_data_pdh_cert_export *", c.data)
            if not p.pdh_cert_address or not p.cert_chain_address:  # the length query
                p.pdh_cert_len, p.cert_chain_len = CERT, 3 * CERT
                c.error = SevStatus.INVALID_LEN
                return -1, errno.EIO
            pdh, chain = self.device.pdh_cert_export()
            ffi.buffer(ffi.cast("char *", p.pdh_cert_address), len(pdh))[:] = pdh
            ffi.buffer(ffi.cast("char *", p.cert_chain_address), len(chain))[:] = chain
            return 0, 0
        return -1, errno.ENOTTY


# -- running a launch under the recorder ---------------------------------------------------------

def recorded_launch(tmp_path, mode: str, vm_type: int):
    """Launch IMAGE on the kvm backend with the fake kernel; return (recorder, launch, result)."""
    types = (1 << KVM_X86_DEFAULT_VM) | (1 << KVM_X86_SEV_VM) | (1 << KVM_X86_SEV_ES_VM)
    kernel = FakeSevKernel(types)
    kvm_path, sev_path = tmp_path / "kvm", tmp_path / "sev"
    kvm_path.write_bytes(b"")
    sev_path.write_bytes(b"")
    policy = GuestPolicy.parse("nodbg,es" if mode == "sev-es" else "nodbg")
    owner = GuestOwner(policy)
    with K.IoctlRecorder(answer=kernel) as rec:
        system = KvmSystem(str(kvm_path))
        vm = system.create_vm(vm_type)
        kernel.attach(vm)
        vm.add_memory(0, 0x40000)
        sev = KvmSev(vm, sev_path=str(sev_path))
        rec.name_fd(sev.sev_fd, "sev")
        vm._sev_interface_of_vm = sev  # what sev_interface_for(vm) caches
        launch = SevLaunch(vm, mode, owner=owner)
        result = launch.launch(IMAGE, gpa=LOAD, after_init=lambda v: v.create_vcpu(0))
    ciphertext = vm.read(LOAD, 64)
    sev_fd = sev.sev_fd
    sev.close()
    vm.close()
    system.close()
    assert ciphertext != IMAGE[:64]  # the firmware model encrypted the backend's real memory
    return rec, launch, result, sev_fd


CASES = [("sev", KVM_X86_SEV_VM, "KVM_SEV_INIT2"),
         ("sev-es", KVM_X86_SEV_ES_VM, "KVM_SEV_INIT2"),
         ("sev", KVM_X86_DEFAULT_VM, "KVM_SEV_INIT"),
         ("sev-es", KVM_X86_DEFAULT_VM, "KVM_SEV_ES_INIT")]


@pytest.mark.parametrize("mode,vm_type,init", CASES,
                         ids=[f"{m}-{'init2' if t else 'legacy'}" for m, t, _ in CASES])
def test_launch_order_matches_the_selftests_and_qemu(tmp_path, mode, vm_type, init):
    rec, launch, result, _ = recorded_launch(tmp_path, mode, vm_type)
    assert result.verified and result.states[-1] == GuestState.RUNNING
    es = mode == "sev-es"
    ours = [s for s in rec.steps("vm", "vcpu", "sev") if s not in ("KVM_CHECK_EXTENSION",)]
    # the launch steps proper, in order, equal both references'
    assert core(ours) == core(selftests_order(init, es)) == core(qemu_order(init, es)), (
        f"ours: {ours}\nselftests ({SELFTESTS}): {selftests_order(init, es)}\n"
        f"qemu ({QEMU}): {qemu_order(init, es)}")
    # every reference (and KVM: __sev_guest_init refuses once vCPUs exist) inits first
    assert ours.index(init) < ours.index("KVM_CREATE_VCPU")
    # we check GUEST_STATUS only where the selftests do (after START, MEASURE, FINISH)
    def after(seq):
        return {core(seq[:i])[-1] for i, s in enumerate(seq) if s == "KVM_SEV_GUEST_STATUS"}
    assert after(ours) <= after(selftests_order(init, es))
    assert after(ours) == {"KVM_SEV_LAUNCH_START", "KVM_SEV_LAUNCH_MEASURE",
                           "KVM_SEV_LAUNCH_FINISH"}
    # the measurement is read as QEMU reads it: a length query, then the blob
    measure = rec.find("KVM_SEV_LAUNCH_MEASURE")
    assert [(c.ret, c.errno) for c in measure] == [(-1, errno.EIO), (0, 0)]
    # /dev/sev: the PDH for the owner's session right before LAUNCH_START, PLATFORM_STATUS
    # for the measurement's firmware version after it
    sev_steps = rec.steps("sev")
    assert sev_steps[:2] == ["SEV_PDH_CERT_EXPORT", "SEV_PDH_CERT_EXPORT"]
    assert set(sev_steps[2:]) == {"SEV_PLATFORM_STATUS"}
    assert ours.index("SEV_PDH_CERT_EXPORT") < ours.index("KVM_SEV_LAUNCH_START")


def _u(fmt, raw, *fields):
    """Unpack ``raw`` with ``fmt`` and return the named positions."""
    vals = struct.unpack(fmt, raw)
    return [vals[i] for i in fields]


@pytest.mark.parametrize("mode,vm_type", [("sev", KVM_X86_SEV_VM), ("sev-es", KVM_X86_SEV_ES_VM)])
def test_struct_bytes_are_what_the_kernel_expects(tmp_path, mode, vm_type):
    """Each command's bytes, field by field (layouts pinned by tests/test_cdefs_layout.py)."""
    rec, launch, result, sev_fd = recorded_launch(tmp_path, mode, vm_type)
    policy = launch.policy.value
    sizes = {"struct kvm_sev_cmd": 24, "struct kvm_sev_init": 48,
             "struct kvm_sev_launch_start": 40, "struct kvm_sev_launch_update_data": 16,
             "struct kvm_sev_launch_measure": 16, "struct kvm_sev_guest_status": 12,
             "struct kvm_enc_region": 16, "struct sev_issue_cmd": 16,
             "struct sev_user_data_pdh_cert_export": 24, "struct sev_user_data_status": 12}
    for ctype, n in sizes.items():
        assert ffi.sizeof(ctype) == n, ctype
    assert sev_fd >= 0
    for c in rec.calls:
        if c.name == "KVM_MEMORY_ENCRYPT_OP":  # struct kvm_sev_cmd: id, pad0, data, error, sev_fd
            cid, pad, data, error, fd = struct.unpack("<IIQII", c.arg_in)
            assert (K.SEV_KVM_COMMANDS[cid][0], pad, error, fd) == (c.command, 0, 0, sev_fd), c
            assert bool(data) == (c.data_type is not None), c
        elif c.name == "SEV_ISSUE_CMD":
            cmd, data, error = struct.unpack("<IQI", c.arg_in)
            assert (K.SEV_DEV_COMMANDS[cmd][0], error) == (c.command, 0) and data
    init = rec.find("KVM_SEV_INIT2")[0]
    assert init.data_in == bytes(48)  # { 0 }, as the selftests and QEMU pass it
    start = rec.find("KVM_SEV_LAUNCH_START")[0]
    handle, pol, dh, dh_len, pad0, ses, ses_len, pad1 = struct.unpack("<IIQIIQII", start.data_in)
    assert (handle, pol, dh_len, pad0, ses_len, pad1) == (0, policy, CERT, 0, 128, 0)
    assert dh and ses
    assert struct.unpack("<I", start.data_out[:4])[0] == result.handle != 0
    updates = rec.find("KVM_SEV_LAUNCH_UPDATE_DATA")
    assert [struct.unpack("<QI4x", u.data_in)[1] for u in updates] == [len(IMAGE) + 12]
    reg = rec.find("KVM_MEMORY_ENCRYPT_REG_REGION")
    assert len(reg) == 1
    base, size = struct.unpack("<QQ", reg[0].arg_in)
    assert size == 0x40000
    assert struct.unpack("<QI4x", updates[0].data_in)[0] == base + LOAD  # the slot's user address
    q, blob = rec.find("KVM_SEV_LAUNCH_MEASURE")
    assert struct.unpack("<QI4x", q.data_in) == (0, 0)  # the length query: NULL, 0
    assert struct.unpack("<QI4x", q.data_out)[1] == 48  # ... answered with the length
    assert struct.unpack("<IIQII", q.arg_out)[3] == SevStatus.INVALID_LEN  # kvm_sev_cmd.error
    uaddr, n = struct.unpack("<QI4x", blob.data_in)
    assert uaddr and n == 48
    for st in rec.find("KVM_SEV_GUEST_STATUS"):
        assert st.data_in == bytes(12)
        h, p, state = struct.unpack("<III", st.data_out)
        assert (h, p) == (result.handle, policy)
    states = [struct.unpack("<III", st.data_out)[2] for st in rec.find("KVM_SEV_GUEST_STATUS")]
    assert states == [GuestState.LUPDATE, GuestState.LSECRET, GuestState.RUNNING]
    pdh_q, pdh = rec.find("SEV_PDH_CERT_EXPORT")  # packed: address, len, address, len
    assert struct.unpack("<QIQI", pdh_q.data_in) == (0, 0, 0, 0)
    assert struct.unpack("<QIQI", pdh_q.data_out)[1::2] == (CERT, 3 * CERT)
    a, n1, b, n2 = struct.unpack("<QIQI", pdh.data_in)
    assert a and b and (n1, n2) == (CERT, 3 * CERT)
    if mode == "sev-es":
        vmsa = rec.find("KVM_SEV_LAUNCH_UPDATE_VMSA")
        assert len(vmsa) == 1 and vmsa[0].data_in is None  # NULL data, as QEMU and selftests


def test_recorder_passes_through_to_the_kernel_and_uninstalls():
    """Without ``answer`` the real syscall runs: a bad fd is EBADF, recorded, then the seam is gone."""
    with K.IoctlRecorder() as rec:
        assert K.ioctl_raw(-1, K.KVM_GET_API_VERSION) == (-1, errno.EBADF)
        with pytest.raises(RuntimeError):
            K.IoctlRecorder().__enter__()
    assert [(c.name, c.fd_kind, c.ret, c.errno) for c in rec.calls] == [
        ("KVM_GET_API_VERSION", "kvm", -1, errno.EBADF)]
    assert K._recorder is None
    assert K.ioctl_raw(-1, K.KVM_GET_API_VERSION) == (-1, errno.EBADF)
    assert len(rec.calls) == 1  # not recorded any more
