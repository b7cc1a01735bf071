"""kvmharness.sev.launch.SevLaunch over the KVM model and the simulated firmware.

The whole owner-attested launch without a CPU: session from the platform's
PDH, image into a MemoryRegion, LAUNCH_UPDATE_DATA, LAUNCH_MEASURE verified
with the owner's TIK, LAUNCH_SECRET, LAUNCH_FINISH, GUEST_STATUS 1 -> 2 -> 3,
then what the host and DBG_DECRYPT see.
"""

from __future__ import annotations

import errno

import pytest
from sev_fakes import FakeSystem, MemoryOnlyVm

from kvmharness.backend import (
    KVM_X86_DEFAULT_VM,
    KVM_X86_SEV_ES_VM,
    KVM_X86_SEV_VM,
)
from kvmharness.errors import SevError, UsageError
from kvmharness.sev.firmware import SimulatedSevFirmware
from kvmharness.sev.kvm_model import KvmSevModel
from kvmharness.sev.launch import SevLaunch, pad_image, sev_interface_for
from kvmharness.sev.measurement import (
    MeasurementMismatch,
    compute_measure,
    launch_digest,
)
from kvmharness.sev.policy import GuestPolicy, PolicyFlag
from kvmharness.sev.session import GuestOwner
from kvmharness.sev.status import GuestState, SevStatus

MiB = 1 << 20
IMAGE = bytes(range(256)) * 40 + b"tail"  # not a multiple of 16: padded by the launch
LOAD = 0x10000


@pytest.fixture
def fw():
    return SimulatedSevFirmware()


def vm_for(fw, vm_type=KVM_X86_SEV_VM):
    return MemoryOnlyVm(vm_type, system=FakeSystem(fw))


def test_interface_lookup_uses_the_systems_firmware(fw):
    vm = vm_for(fw)
    iface = sev_interface_for(vm)
    assert isinstance(iface, KvmSevModel) and iface.firmware is fw
    assert sev_interface_for(vm) is iface  # one per VM: it holds the launch state


def test_owner_attested_launch(fw):
    vm = vm_for(fw)
    owner = GuestOwner(GuestPolicy(0))
    launch = SevLaunch(vm, "sev", owner=owner)
    secret = b"disk key: 0123456789abcdef......"  # 32 bytes
    result = launch.launch(IMAGE, gpa=LOAD, secret=secret, secret_gpa=0x30000)
    assert result.init_command == "KVM_SEV_INIT2"
    assert result.states == [GuestState.LUPDATE, GuestState.LSECRET, GuestState.RUNNING]
    assert result.verified
    padded = pad_image(IMAGE)
    assert result.launch_digest == launch_digest([padded])
    # the firmware used the owner's TIK (unwrapped from the session): the owner
    # recomputes exactly the MEASURE the firmware reported
    m = result.measurement
    assert m.measure == compute_measure(owner.tik, api_major=1, api_minor=55, build=21, policy=0,
                                        digest=result.launch_digest, mnonce=m.mnonce)
    host_view = vm.read(LOAD, len(padded))
    assert host_view != padded  # encrypted in place
    assert launch.dbg_decrypt(LOAD, len(IMAGE)) == IMAGE  # policy allows debug
    assert launch.dbg_decrypt(0x30000, 32) == secret  # the secret arrived, encrypted
    assert secret not in vm.read(0x30000, 32)
    assert launch.status().state == GuestState.RUNNING


def test_nodbg_launch_refuses_debug(fw):
    vm = vm_for(fw, KVM_X86_DEFAULT_VM)
    launch = SevLaunch(vm, "sev", owner=GuestOwner(GuestPolicy(PolicyFlag.NODBG)))
    result = launch.launch(IMAGE, gpa=LOAD)
    assert result.init_command == "KVM_SEV_INIT" and result.verified
    with pytest.raises(SevError) as e:
        launch.dbg_decrypt(LOAD, 16)
    assert (e.value.errno, e.value.fw_error) == (errno.EIO, SevStatus.POLICY_FAILURE)
    assert "POLICY_FAILURE" in str(e.value)


def test_unattested_launch_without_owner(fw):
    vm = vm_for(fw)
    result = SevLaunch(vm, "sev", policy="nodbg").launch(IMAGE, gpa=LOAD)
    assert not result.verified and result.policy.value == 1
    assert result.states[-1] == GuestState.RUNNING


def test_measurement_mismatch_stops_before_the_secret(fw):
    vm = vm_for(fw)
    owner = GuestOwner(GuestPolicy(0))
    launch = SevLaunch(vm, "sev", owner=owner)
    launch.init()
    launch.register_memory()
    launch.start()
    vm.write(LOAD, pad_image(IMAGE))
    expected = bytearray(pad_image(IMAGE))
    expected[7] ^= 1  # the owner expects a different image than the host loaded
    launch.update_data(LOAD, len(expected), expected=bytes(expected))
    launch.measure()
    with pytest.raises(MeasurementMismatch) as e:
        launch.verify()
    assert "do not inject secrets" in str(e.value)
    assert launch.status().state == GuestState.LSECRET


def test_session_for_an_old_pdh_is_refused(fw):
    vm = vm_for(fw)
    owner = GuestOwner(GuestPolicy(0))
    pdh, chain = sev_interface_for(vm).platform().pdh_cert_export()
    session = owner.start(pdh, chain)
    fw.pdh_gen()  # the platform rotated its PDH after the owner built the session
    launch = SevLaunch(vm, "sev", owner=owner, session=session)
    launch.init()
    with pytest.raises(SevError) as e:
        launch.start()
    assert (e.value.errno, e.value.fw_error) == (errno.EIO, SevStatus.BAD_MEASUREMENT)
    assert e.value.command == "KVM_SEV_LAUNCH_START"


def test_sev_es_launch_measures_the_vmsa(fw):
    vm = vm_for(fw, KVM_X86_SEV_ES_VM)
    owner = GuestOwner(GuestPolicy(PolicyFlag.ES))
    launch = SevLaunch(vm, "sev-es", owner=owner)
    result = launch.launch(IMAGE, gpa=LOAD, after_init=lambda v: v.create_vcpu())
    assert result.verified and result.init_command == "KVM_SEV_INIT2"
    model = sev_interface_for(vm)
    spa, page = model.vmsa_pages[0]
    vmsa_plain = model.key.decrypt(spa, page)
    assert result.launch_digest == launch_digest([pad_image(IMAGE)], [vmsa_plain])


def test_step_order_enforced_by_guest_status(fw):
    vm = vm_for(fw)
    launch = SevLaunch(vm, "sev")
    launch.init()
    launch.start()
    with pytest.raises(SevError) as e:
        launch.finish()  # no LAUNCH_MEASURE yet
    assert (e.value.errno, e.value.fw_error) == (errno.EIO, SevStatus.INVALID_GUEST_STATE)


def test_policy_and_mode_must_agree(fw):
    vm = vm_for(fw)
    with pytest.raises(UsageError):
        SevLaunch(vm, "sev-es", policy=0)
    with pytest.raises(UsageError):
        SevLaunch(vm, "sev", policy="es")
    with pytest.raises(UsageError):
        SevLaunch(vm, "sev", policy=1, owner=GuestOwner(GuestPolicy(0)))
    with pytest.raises(UsageError):
        SevLaunch(vm, "sev").update_data(LOAD + 8, 16)


def test_offline_measure_predicts_the_firmware(fw, tmp_path, capsys):
    """`kvmharness measure` computes, without any device, what LAUNCH_MEASURE returns."""
    import json

    from kvmharness.cli import main

    tik = bytes(range(16))
    owner = GuestOwner(GuestPolicy(PolicyFlag.NODBG), tik=tik)
    result = SevLaunch(vm_for(fw), "sev", owner=owner).launch(IMAGE, gpa=LOAD)
    path = tmp_path / "image.bin"
    path.write_bytes(IMAGE)
    assert main(["measure", "--image", str(path), "--policy", "nodbg", "--api", "1.55",
                 "--build", "21", "--tik", tik.hex(), "--nonce", result.measurement.mnonce.hex(),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["launch_digest"] == result.launch_digest.hex()
    assert out["measure"] == result.measurement.measure.hex()
