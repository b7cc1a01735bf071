"""Pure logic, no device: the manifest loader and the device bus."""

import textwrap

import pytest

from kvmharness.devices import DeviceBus, NoDevice, NullDevice, RamLikeMmio
from kvmharness.errors import GuestImageError, UsageError
from kvmharness.images import get_guest, load_manifest, parse_size


def write_manifest(tmp_path, body: str, images=("g",), size=16):
    (tmp_path / "bin").mkdir(exist_ok=True)
    for name in images:
        (tmp_path / "bin" / f"{name}.bin").write_bytes(b"\xf4" * size)
    p = tmp_path / "manifest.toml"
    p.write_text(textwrap.dedent(body))
    return p


def test_shipped_manifest_loads_and_every_image_fits():
    guests = load_manifest()
    assert {"hello", "cpuid", "msr", "mmio", "fault", "spin"} <= set(guests)
    for g in guests.values():
        assert len(g.load()) > 0


@pytest.mark.parametrize("body, message", [
    ('[guest.g]\nmode = "protected"\n', "mode must be one of"),
    ('[guest.g]\nmode = "real"\nexpect = "maybe"\n', "expect must be one of"),
    ('[guest.g]\nmode = "real"\ncolour = "red"\n', "unknown key(s) ['colour']"),
    ('[guest.g]\nmode = "real"\nneeds = ["quantum"]\n', "needs may hold only"),
    ('[guest.g]\nmode = "real"\ntimeout = -1\n', "timeout must be a finite number of seconds greater than 0"),
    ('[guest.g]\nmode = "real"\nmemory = "lots"\n', "cannot read size 'lots'"),
    ('[guest.g]\nmode = "real"\nmemory = "1000"\n', "multiple of 4 KiB"),
    ('[guest.g]\nmode = "real"\ncpuid = [{eax = 1}]\n', "cpuid[0] is malformed"),
    ('[guest.g]\nmode = "real"\nunsupported = {kvm = "x"}\n', "the manifest holds no host facts"),
    ("[guest.g\n", "not valid TOML"),
])
def test_malformed_manifest_entries_are_refused_naming_the_field(tmp_path, body, message):
    with pytest.raises(GuestImageError) as e:
        load_manifest(write_manifest(tmp_path, body))
    assert message in str(e.value)


def test_missing_image_and_oversized_image_are_refused_before_any_vm(tmp_path):
    p = write_manifest(tmp_path, '[guest.g]\nmode = "real"\n[guest.h]\nmode = "real"\nmemory = "64K"\n',
                       images=("h",), size=0x9000)
    guests = load_manifest(p)
    with pytest.raises(GuestImageError, match="image .* is missing"):
        guests["g"].load()
    with pytest.raises(GuestImageError, match="fit above the load address"):
        guests["h"].load()


def test_unknown_guest_names_the_known_ones():
    with pytest.raises(GuestImageError, match="unknown guest 'nosuch'.*hello"):
        get_guest("nosuch")


def test_parse_size():
    assert parse_size("2M", what="x") == 2 << 20
    assert parse_size("512K", what="x") == 512 << 10
    assert parse_size("4096", what="x") == 4096
    assert parse_size(8192, what="x") == 8192


def test_bus_refuses_overlapping_ports_and_mmio():
    bus = DeviceBus()
    bus.add_ports(0x80, 4, NullDevice())
    with pytest.raises(UsageError, match="port 0x83 .* overlaps"):
        bus.add_ports(0x83, 2, NullDevice())
    bus.add_mmio(0x1000, 0x100, RamLikeMmio(0x1000, 0x100))
    with pytest.raises(UsageError, match="overlaps"):
        bus.add_mmio(0x10F0, 0x100, RamLikeMmio(0x10F0, 0x100))
    bus.add_mmio(0x1100, 0x100, RamLikeMmio(0x1100, 0x100))  # adjacent is fine
    with pytest.raises(UsageError, match="outside"):
        bus.add_ports(0xFFFF, 2, NullDevice())


def test_bus_dispatch_and_missing_device():
    bus = DeviceBus()
    dev = NullDevice()
    bus.add_ports(0x80, 1, dev)
    bus.port_out(0x80, 1, b"\x01")
    assert dev.writes == 1
    assert bus.port_in(0x80, 1) == 0
    with pytest.raises(NoDevice, match="OUT to port 0x81"):
        bus.port_out(0x81, 1, b"\x00")
    ram = RamLikeMmio(0x2000, 0x100)
    bus.add_mmio(0x2000, 0x100, ram)
    bus.mmio_write(0x2008, 4, b"\x11\x22\x33\x44")
    assert bus.mmio_read(0x2008, 2) == 0x2211
    with pytest.raises(NoDevice, match="MMIO access to 0x20fe"):
        bus.mmio_read(0x20FE, 4)  # runs past the end of the window
