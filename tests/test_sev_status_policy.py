"""SEV status codes and guest policy (pure logic, no device)."""

import pytest

from kvmharness.errors import SevError, UsageError
from kvmharness.sev import status
from kvmharness.sev.policy import GuestPolicy, PolicyFlag
from kvmharness.sev.status import GuestState, PlatformState, SevStatus, status_name


@pytest.mark.parametrize("code,name", [
    (0x00, "SUCCESS"), (0x01, "INVALID_PLATFORM_STATE"), (0x02, "INVALID_GUEST_STATE"),
    (0x03, "INVALID_CONFIG"), (0x07, "POLICY_FAILURE"), (0x0B, "BAD_MEASUREMENT"),
    (0x10, "INVALID_GUEST"), (0x13, "HWSEV_RET_PLATFORM"), (0x17, "RESOURCE_LIMIT"),
    (0x18, "SECURE_DATA_INVALID"), (0x19, "INVALID_PAGE_SIZE"), (0x1F, "EXIT_RING_BUFFER"),
    (0x27, "INVALID_KEY"), (0x28, "SHUTDOWN_INCOMPLETE"), (-1, "NO_FW_CALL"),
])
def test_status_names_match_reference(code, name):
    assert status_name(code) == name
    assert getattr(status, f"SEV_RET_{name}") == code


def test_status_name_accepts_u32_error_field_and_unknown_codes():
    assert status_name(0xFFFFFFFF) == "NO_FW_CALL"
    assert status_name(0x1E) == "UNKNOWN_0x1e"  # a hole in the table
    assert status_name(0x30) == "UNKNOWN_0x30"


def test_sev_error_message_carries_errno_and_firmware_name():
    err = SevError("LAUNCH_UPDATE_DATA", 5, SevStatus.INVALID_GUEST_STATE)
    assert err.fw_name == "INVALID_GUEST_STATE"
    assert "EIO" in str(err) and "INVALID_GUEST_STATE (0x2)" in str(err)


def test_states_have_firmware_values():
    assert [int(s) for s in PlatformState] == [0, 1, 2]
    assert (GuestState.LUPDATE, GuestState.LSECRET, GuestState.RUNNING,
            GuestState.SENT) == (1, 2, 3, 6)


@pytest.mark.parametrize("text,value", [
    ("nodbg,es", 0x5), ("NODBG|ES", 0x5), ("0x37", 0x37), ("", 0), ("none", 0),
    ("nodbg,noks,es,domain,sev", 0x37), ("nosend", 0x8), ("nodbg,api=1.55", 0x37010001),
])
def test_policy_parse(text, value):
    assert GuestPolicy.parse(text).value == value


@pytest.mark.parametrize("value", [0, 1, 5, 0x37, 0x3F, 0x37010004, 0xFF00003F])
def test_policy_format_round_trips(value):
    policy = GuestPolicy(value)
    assert GuestPolicy.parse(str(policy)) == policy
    assert policy.to_bytes() == value.to_bytes(4, "little")


def test_policy_fields():
    p = GuestPolicy(0x37010005)
    assert p.nodbg and p.es and not p.noks
    assert PolicyFlag.ES in p and PolicyFlag.NOSEND not in p
    assert (p.api_major, p.api_minor) == (1, 0x37)
    assert p.api_satisfied_by(0x37, 0x37) and not p.api_satisfied_by(1, 0x36)
    assert p.api_satisfied_by(2, 0)


def test_policy_reserved_bits_rejected_by_validate():
    GuestPolicy(0x3F).validate()
    bad = GuestPolicy(0x40 | 0x1)
    assert bad.reserved == 0x40 and bad.value == 0x41
    with pytest.raises(UsageError, match="reserved bits 15:6"):
        bad.validate()
    assert GuestPolicy.parse(str(bad)) == bad


@pytest.mark.parametrize("text", ["nodbgg", "es,bogus", "api=1", "api=x.y"])
def test_policy_parse_errors_name_the_problem(text):
    with pytest.raises(UsageError):
        GuestPolicy.parse(text)


def test_policy_out_of_range():
    with pytest.raises(UsageError):
        GuestPolicy(1 << 32)
    with pytest.raises(UsageError):
        GuestPolicy(0, api_major=256)


def test_kernel_constants_agree_with_enum():
    for s in SevStatus:
        assert getattr(status, f"SEV_RET_{s.name}") == int(s)
    names = [n for n in dir(status) if n.startswith("SEV_RET_")]
    assert len(names) == len(SevStatus) + 1  # plus the header's INAVLID_CONFIG spelling
