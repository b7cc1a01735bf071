"""Launch digest and LAUNCH_MEASURE (pure logic; docs/facts.md#facts-11a, #facts-11b)."""

import hashlib
import os
import struct
import tempfile
import uuid

import pytest

from kvmharness.sev.measurement import (
    LaunchDigest,
    LaunchMeasurement,
    MeasurementMismatch,
    compute_measure,
    launch_digest,
    verify_measurement,
)

EMPTY_SHA256 = hashlib.sha256(b"").digest()


def test_facts_worked_vector():
    # docs/facts.md#facts-11b: TIK 0, API 1.55 build 21, policy 0x5, LD = SHA-256(""), MNONCE 00..0f
    measure = compute_measure(bytes(16), api_major=1, api_minor=55, build=0x15, policy=0x5,
                              digest=EMPTY_SHA256, mnonce=bytes(range(16)))
    assert measure.hex() == "231b25da723c201404d36db822474c01e3c3f7b7f93b4481df368e24d61bf53a"


def test_virtee_sev_vector():
    # The vector virtee/sev's session tests use (API 0.18 build 15, policy 0).
    m = LaunchMeasurement(
        bytes.fromhex("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea"),
        bytes.fromhex("4fbe0bedbad6c86ae8f68971d103e554"))
    tik = bytes.fromhex("66320db73158a35a255d051758e95ed4")
    verify_measurement(m, tik=tik, api_major=0, api_minor=0x12, build=0x0F, policy=0,
                       digest=EMPTY_SHA256)
    with pytest.raises(MeasurementMismatch):
        verify_measurement(m, tik=tik, api_major=0, api_minor=0x12, build=0x0F, policy=1,
                           digest=EMPTY_SHA256)


def test_mismatch_message_says_what_differs():
    tik = os.urandom(16)
    good = {"api_major": 1, "api_minor": 55, "build": 21, "policy": 1,
            "digest": launch_digest([b"a" * 16])}
    m = LaunchMeasurement(compute_measure(tik, mnonce=bytes(16), **good), bytes(16))
    verify_measurement(m, tik=tik, **good)
    for change in ({"build": 22}, {"api_minor": 54}, {"policy": 0},
                   {"digest": launch_digest([b"b" * 16])}):
        with pytest.raises(MeasurementMismatch, match="do not inject secrets"):
            verify_measurement(m, tik=tik, **{**good, **change})
    with pytest.raises(MeasurementMismatch):
        verify_measurement(m, tik=os.urandom(16), **good)


def test_digest_is_a_stream_over_regions_then_vmsas():
    a, b = os.urandom(4096), os.urandom(48)
    vmsa = os.urandom(4096)
    assert launch_digest([a, b], [vmsa]) == hashlib.sha256(a + b + vmsa).digest()
    # splitting a region (as KVM does at page boundaries) changes nothing
    assert launch_digest([a[:100], a[100:], b]) == launch_digest([a, b])
    # order matters
    assert launch_digest([b, a]) != launch_digest([a, b])
    ld = LaunchDigest()
    with pytest.raises(ValueError):
        ld.update_vmsa(b"x" * 100)


def test_launch_measurement_bytes():
    raw = bytes(range(48))
    m = LaunchMeasurement.from_bytes(raw)
    assert m.measure == raw[:32] and m.mnonce == raw[32:] and m.to_bytes() == raw
    # selftests pass a larger (256-byte) buffer; only the first 48 bytes count
    assert LaunchMeasurement.from_bytes(raw + bytes(208)) == m
    with pytest.raises(ValueError):
        LaunchMeasurement.from_bytes(raw[:47])


def _fake_ovmf(path, reset_eip):
    """A firmware volume with just the OVMF footer table (SEV-ES reset block)."""
    def guid(s):
        return uuid.UUID(s).bytes_le
    reset = struct.pack("<I", reset_eip) + struct.pack("<H", 4 + 18) + guid(
        "00f771de-1a7e-4fcb-890e-68c77e2fb44e")
    footer = struct.pack("<H", len(reset) + 18) + guid("96b582de-1fb2-45f7-baea-a366c55a082d")
    tail = reset + footer + bytes(32)
    image = os.urandom(64 * 1024 - len(tail)) + tail
    with open(path, "wb") as f:
        f.write(image)
    return image


def test_cross_check_with_sev_snp_measure():
    """Our firmware model's SEV-ES measurement equals sev-snp-measure's digest.

    sev-snp-measure (IBM/virtee) computes the SEV and SEV-ES launch digest of
    an OVMF image plus QEMU's initial VMSA pages; we feed the same bytes
    through the simulated firmware and check the owner-side verification with
    *their* digest.
    """
    guest = pytest.importorskip("sevsnpmeasure.guest", reason="sev-snp-measure not installed "
                                "(pip install sev-snp-measure)")
    from sevsnpmeasure.sev_mode import SevMode
    from sevsnpmeasure.vmm_types import VMMType
    from sevsnpmeasure.vmsa import VMSA

    from kvmharness.sev.firmware import SimulatedSevFirmware
    from kvmharness.sev.session import GuestOwner

    vcpu_sig, vcpus, eip = 0x00A00F11, 2, 0xFFFFF000
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "OVMF.fd")
        image = _fake_ovmf(path, eip)
        sev_digest = guest.sev_calc_launch_digest(path, None, None, None)
        es_digest = guest.seves_calc_launch_digest(vcpus, vcpu_sig, path, None, None, None,
                                                   VMMType.QEMU)
    assert sev_digest == launch_digest([image])

    fw = SimulatedSevFirmware(num_asids=8, min_sev_asid=4)
    fw.ensure_init()
    owner = GuestOwner(0x5)
    start = owner.start(*fw.pdh_cert_export())
    handle = fw.launch_start(start.policy, start.dh_cert, start.session)
    fw.activate(handle, fw.asids.allocate(es=True))
    ram = bytearray(image)
    fw.launch_update_data(handle, (1 << 32) - len(image), memoryview(ram))
    for i, page in enumerate(VMSA(SevMode.SEV_ES, eip, vcpu_sig, 0, VMMType.QEMU).pages(vcpus)):
        fw.launch_update_vmsa(handle, 0x10000 * (i + 1), bytearray(page))
    measurement = fw.launch_measure(handle)
    status = fw.platform_status()
    owner.verify(measurement, api_major=status.api_major, api_minor=status.api_minor,
                 build=status.build, digest=es_digest)
