"""The lean VM lifecycle (issue 15, item 3): entry states built once, frozen and packed
once per kvm vCPU buffer; the hypercall-quirk answer kept per VM type; the same ioctls and
the same guest state as building everything afresh."""

import dataclasses

import pytest

from kvmharness import exits as X
from kvmharness import protocol as P
from kvmharness.backend import open_backend
from kvmharness.boot import entry_state, long_mode_state, long_mode_tables, real_mode_state
from kvmharness.kvm._ffi import IoctlRecorder
from kvmharness.kvm.vcpu import _PACKED
from kvmharness.x86 import FrozenRegs, FrozenSregs, Regs, Sregs, frozen


def test_entry_state_is_shared_frozen_and_equal_to_a_fresh_one():
    for mode, size in (("real", 0), ("long64", 2 << 20)):
        regs, sregs = entry_state(mode, size)
        assert entry_state(mode, size)[1] is sregs  # built once
        assert type(regs) is FrozenRegs and type(sregs) is FrozenSregs
        fresh = long_mode_state(size) if mode == "long64" else real_mode_state()
        assert dataclasses.asdict(regs) == dataclasses.asdict(fresh[0])
        assert dataclasses.asdict(sregs) == dataclasses.asdict(fresh[1])
        with pytest.raises(dataclasses.FrozenInstanceError):
            sregs.cr0 = 0
        with pytest.raises(dataclasses.FrozenInstanceError):
            sregs.cs.base = 0x1000  # the segments inside are frozen too
        with pytest.raises(dataclasses.FrozenInstanceError):
            regs.rip = 0
    assert entry_state("long64", 2 << 20) is not entry_state("long64", 4 << 20)
    assert entry_state("long64", 4 << 20)[0].rsp == 4 << 20
    with pytest.raises(ValueError, match="unknown entry mode"):
        entry_state("protected32")


def test_the_public_state_builders_still_give_fresh_mutable_objects():
    a, b = real_mode_state(), real_mode_state()
    assert a[1] is not b[1] and type(a[1]) is Sregs and type(a[0]) is Regs
    a[0].rip = 0x1234  # a caller may change its own copy
    assert real_mode_state()[0].rip == P.GUEST_LOAD_ADDR
    t = long_mode_tables()
    t[P.BOOT_GDT] = b"changed"
    assert long_mode_tables()[P.BOOT_GDT] != b"changed"
    assert frozen(frozen(a[1])) is not a[1] and type(frozen(a[1])) is FrozenSregs


@pytest.mark.requires_kvm
def test_frozen_state_packs_once_and_sets_the_same_registers_on_kvm():
    system = open_backend("kvm")
    try:
        got = []
        for state in (real_mode_state(), entry_state("real"), entry_state("real")):
            vm = system.create_vm()
            vm.add_memory(0, 1 << 20)
            vcpu = vm.create_vcpu()
            vm.write(P.GUEST_LOAD_ADDR, b"\xf4")  # hlt
            vcpu.set_sregs(state[1])
            vcpu.set_regs(state[0])
            got.append((vcpu.get_regs(), vcpu.get_sregs()))
            assert type(vcpu.run()) is X.Hlt
            vm.close()
        assert got[0] == got[1] == got[2]
        assert id(entry_state("real")[1]) in _PACKED and id(entry_state("real")[0]) in _PACKED
    finally:
        system.close()


@pytest.mark.requires_kvm
def test_the_hypercall_quirk_is_asked_once_per_vm_type_and_disabled_on_every_vm():
    system = open_backend("kvm")
    try:
        with IoctlRecorder() as rec:
            for _ in range(3):
                system.create_vm().close()
        names = [c.name for c in rec.calls]
        assert names.count("KVM_CREATE_VM") == 3
        second = names.index("KVM_CREATE_VM", 1)
        assert "KVM_CHECK_EXTENSION" in names[:second]  # asked on the first VM
        assert "KVM_CHECK_EXTENSION" not in names[second:]  # kept for the others
        # where the kernel offers it, each VM gets its own KVM_ENABLE_CAP
        if system.quirk_caps.get(0) is not None:
            assert names.count("KVM_ENABLE_CAP") == 3
    finally:
        system.close()


def test_the_manifest_is_parsed_once_per_text(tmp_path):
    from kvmharness.images import load_manifest

    src = load_manifest()  # the shipped one, parsed (or cached) once
    again = load_manifest()
    assert again == src and again is not src  # a fresh dict of the same frozen images
    assert again["halt"] is src["halt"]
    path = tmp_path / "manifest.toml"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "g.S").write_text("")
    path.write_text('[guest.g]\nmode = "real"\nexpect = "hlt"\n')
    assert load_manifest(path)["g"].expect == "hlt"
    path.write_text('[guest.g]\nmode = "real"\nexpect = "done"\n')  # edited: parsed again
    assert load_manifest(path)["g"].expect == "done"

