"""The GHCB page layout, the valid bitmap, the GHCB MSR protocol and IOIO EXITINFO1.

Sources: docs/facts.md#facts-1h, #facts-4, #facts-5.
"""

from __future__ import annotations

import pytest

from kvmharness import protocol
from kvmharness.sev import ghcb as G
from kvmharness.sev.ghcb import Ghcb, GhcbMsr

SEV_ES_H = protocol.header_path().parent / "sev_es.h"


# -- layout and bitmap ----------------------------------------------------------------

@pytest.mark.parametrize("field, index, byte, bit", [
    ("cpl", 25, 0x3F3, 1), ("xss", 40, 0x3F5, 0), ("dr7", 44, 0x3F5, 4), ("rip", 47, 0x3F5, 7),
    ("rsp", 59, 0x3F7, 3), ("rax", 63, 0x3F7, 7), ("rcx", 97, 0x3FC, 1), ("rdx", 98, 0x3FC, 2),
    ("rbx", 99, 0x3FC, 3), ("rbp", 101, 0x3FC, 5), ("rsi", 102, 0x3FC, 6), ("rdi", 103, 0x3FC, 7),
    ("r8", 104, 0x3FD, 0), ("r15", 111, 0x3FD, 7), ("sw_exit_code", 114, 0x3FE, 2),
    ("sw_exit_info_1", 115, 0x3FE, 3), ("sw_exit_info_2", 116, 0x3FE, 4),
    ("sw_scratch", 117, 0x3FE, 5), ("xcr0", 125, 0x3FF, 5),
])
def test_valid_bit_of_each_field_is_offset_div_8(field, index, byte, bit):
    assert G.valid_bit(field) == index
    g = Ghcb()
    g.set(field, 1)
    assert g.buf[byte] == 1 << bit
    assert g.valid_fields() == (field,)


def test_assigning_a_field_marks_it_valid_and_put_does_not():
    g = Ghcb()
    g.rax = 0x8000001F
    g.put("rcx", 7)
    assert g.rax == 0x8000001F and g.rcx == 7
    assert g.is_valid("rax") and not g.is_valid("rcx")
    g.clear_valid()
    assert g.valid_fields() == () and g.rax == 0x8000001F


def test_page_trailer_and_shared_buffer():
    g = Ghcb()
    g.protocol_version = 2
    g.ghcb_usage = 0xFFFFFFFF
    assert bytes(g)[0xFFA:0xFFC] == b"\x02\x00" and bytes(g)[0xFFC:] == b"\xff" * 4
    assert len(g.shared_buffer()) == 2032 == G.SHARED_BUFFER_SIZE
    with pytest.raises(ValueError):
        Ghcb(bytearray(100))


def test_bitmap_helpers_round_trip_and_name_unknown_bits():
    bm = G.bitmap_of("rax", "rcx", "sw_exit_code")
    assert G.bitmap_fields(bm) == ("rax", "rcx", "sw_exit_code")
    assert G.bitmap_fields(1 << 0) == ("bit0",)


# -- the MSR protocol (docs/facts.md#facts-5 worked examples) ---------------------------------------

def test_sev_info_response_examples():
    assert GhcbMsr.sev_info_response(2, 1, 51) == 0x0002_0001_3300_0001
    assert GhcbMsr.sev_info_response(1, 1, 51) == 0x0001_0001_3300_0001
    assert GhcbMsr.sev_info_response(1, 1, 47) == 0x0001_0001_2F00_0001
    m = GhcbMsr.decode(0x0002_0001_3300_0001)
    assert m.name == "SEV_INFO_RESP" and m.fields == {"max_version": 2, "min_version": 1, "c_bit": 51}


def test_cpuid_request_and_response_examples():
    assert GhcbMsr.cpuid_request(0x8000001F, "ebx") == 0x8000001F_4000_0004
    assert GhcbMsr.cpuid_request(0x8000001F, 1) == 0x8000001F_4000_0004
    req = GhcbMsr.decode(0x8000001F_4000_0004)
    assert (req.name, req.fields["function"], req.fields["reg_name"]) == ("CPUID_REQ", 0x8000001F, "ebx")
    resp = GhcbMsr.decode(GhcbMsr.cpuid_response(0x73, "edx"))
    assert (resp.name, resp.fields["cpuid_value"], resp.fields["reg"]) == ("CPUID_RESP", 0x73, 3)
    with pytest.raises(ValueError):
        GhcbMsr.cpuid_request(0, 4)


def test_termination_request_example_and_reason_names():
    assert GhcbMsr.term_request(1, 3) == 0x0000_0000_0003_1100
    m = GhcbMsr.decode(0x31100)
    assert m.name == "TERM_REQ"
    assert m.fields == {"reason_set": 1, "reason_code": 3, "reason": "not running at VMPL0"}


@pytest.mark.parametrize("value, name", [
    (GhcbMsr.sev_info_request(), "SEV_INFO_REQ"), (GhcbMsr.ap_reset_hold_request(), "AP_RESET_HOLD_REQ"),
    (GhcbMsr.ap_reset_hold_response(1), "AP_RESET_HOLD_RESP"), (GhcbMsr.pref_gpa_request(), "PREF_GPA_REQ"),
    (GhcbMsr.pref_gpa_response(), "PREF_GPA_RESP"), (GhcbMsr.reg_gpa_request(0x15), "REG_GPA_REQ"),
    (GhcbMsr.reg_gpa_response(0x15), "REG_GPA_RESP"), (GhcbMsr.psc_request(0x15, 2), "PSC_REQ"),
    (GhcbMsr.psc_response(0), "PSC_RESP"), (GhcbMsr.vmpl_request(1), "VMPL_REQ"),
    (GhcbMsr.hv_features_request(), "HV_FT_REQ"), (GhcbMsr.hv_features_response(3), "HV_FT_RESP"),
    (0x15000, "GHCB_GPA"), (0, "NONE"), (0x0FF, "UNKNOWN"),
])
def test_every_code_decodes_to_its_protocol_name(value, name):
    assert GhcbMsr.decode(value).name == name


def test_decoded_fields():
    assert GhcbMsr.hv_features_response(G.GHCB_HV_FT_SUPPORTED) == 0x3081
    assert GhcbMsr.decode(GhcbMsr.reg_gpa_request(0x15)).fields == {"gfn": 0x15}
    assert GhcbMsr.decode(GhcbMsr.psc_request(0x123, 2)).fields == {"gfn": 0x123, "op": 2}
    assert GhcbMsr.decode(GhcbMsr.pref_gpa_response()).fields["gfn"] == (1 << 52) - 1
    assert GhcbMsr.decode(G.GHCB_MSR_PSC_RESP_ERROR).fields == {"error": 1 << 31}
    with pytest.raises(ValueError):
        GhcbMsr.ghcb_gpa(0x15001)


# -- exit codes and IOIO EXITINFO1 --------------------------------------------------------

def test_sw_exit_code_names():
    assert G.sw_exit_code_name(0x72) == "CPUID"
    assert G.sw_exit_code_name(0x8000FFFE) == "TERM_REQUEST"
    assert G.sw_exit_code_name(0x8000FFFF) == "UNSUPPORTED_EVENT"
    assert G.sw_exit_code_name(0x1234) == "UNKNOWN(0x1234)"
    assert (G.sw_exit_code_name(0x78), G.sw_exit_code_name(0x7F), G.sw_exit_code_name(0x8F)) == \
        ("HLT", "SHUTDOWN", "EFER_WRITE_TRAP")
    assert (G.sw_exit_code_name(0x5D), G.sw_exit_code_name(0x94), G.sw_exit_code_name(0x403)) == \
        ("EXCP_VC", "CR4_WRITE_TRAP", "VMGEXIT")
    assert G.sw_exit_code_name(0x80) == "VMRUN" and G.sw_exit_code_name(0x8D) == "XSETBV"


def test_ioio_exit_info_1_round_trip():
    info = G.ioio_exit_info_1(0xE9, 1, string=True, rep=True, segment=G.SEG_DS)
    assert info == (0xE9 << 16) | 0x4 | 0x8 | 0x10 | 0x200 | 0xC00
    assert G.decode_ioio(info) == G.IoioInfo(0xE9, 1, False, True, True, 64, 3)
    assert G.decode_ioio(G.ioio_exit_info_1(0x80, 4, is_in=True, address_size=16)) == \
        G.IoioInfo(0x80, 4, True, False, False, 16, 0)
    with pytest.raises(ValueError):
        G.ioio_exit_info_1(0x80, 3)


# -- guests/include/sev_es.h agrees with this module ------------------------------------

def test_guest_runtime_header_uses_the_same_offsets_and_bits():
    h = protocol.parse_header(SEV_ES_H.read_text())
    for field in ("rax", "rcx", "rdx", "rbx", "sw_exit_code", "sw_exit_info_1", "sw_exit_info_2",
                  "sw_scratch", "xcr0", "protocol_version", "ghcb_usage"):
        assert h[f"GHCB_OFF_{field.upper()}"] == G.FIELDS[field][0], field
    assert h["GHCB_OFF_VALID_BITMAP"] == G.VALID_BITMAP_OFFSET
    assert h["GHCB_OFF_SHARED_BUFFER"] == G.SHARED_BUFFER_OFFSET
    for reg in ("rax", "rbx", "rcx", "rdx"):
        bit = G.valid_bit(reg)
        assert (h[f"VB_{reg.upper()}_BYTE"], h[f"VB_{reg.upper()}_MASK"]) == (bit // 8, 1 << bit % 8)
    for field in ("sw_exit_code", "sw_exit_info_1", "sw_exit_info_2", "sw_scratch"):
        bit = G.valid_bit(field)
        assert bit // 8 == h["VB_SW_BYTE"] and h[f"VB_{field.upper()}_MASK"] == 1 << bit % 8
    bit = G.valid_bit("xcr0")
    assert (h["VB_XCR0_BYTE"], h["VB_XCR0_MASK"]) == (bit // 8, 1 << bit % 8)
    assert h["MSR_SEV_ES_GHCB"] == G.MSR_SEV_ES_GHCB
    assert (h["IOIO_TYPE_IN"], h["IOIO_STR"], h["IOIO_REP"], h["IOIO_SZ8"], h["IOIO_SZ32"],
            h["IOIO_A64"], h["IOIO_SEG_DS"]) == (1, 4, 8, 0x10, 0x40, 0x200, 3 << 10)
    assert h["ERROR_CODE_VECTOR_MASK"] == sum(1 << v for v in protocol.ERROR_CODE_VECTORS)
    assert h["GHCB_GPA"] % 4096 == 0
