"""``kvmharness measure GUEST --mode sev-snp --json``: the digest and a log anyone can replay.

The replay here is independent of kvmharness: PAGE_INFO is rebuilt from the SNP
ABI's layout with ``struct`` and ``hashlib`` in this file, and separately fed
through sev-snp-measure's own ``GCTX._update`` (its PAGE_INFO code).
"""

from __future__ import annotations

import hashlib
import json
import struct

import pytest

from kvmharness.cli import main
from kvmharness.errors import EXIT_OK, EXIT_USAGE
from kvmharness.images import get_guest
from kvmharness.snp.launch import expected_digest, guest_launch_plan

gctx = pytest.importorskip("sevsnpmeasure.gctx", reason="sev-snp-measure (the [test] extra) "
                           "is the outside truth for the SNP launch digest")

TYPES = {"normal": 1, "vmsa": 2, "zero": 3, "unmeasured": 4, "secrets": 5, "cpuid": 6}


def run_json(capsys, *argv):
    assert main(list(argv)) == EXIT_OK
    return json.loads(capsys.readouterr().out)


def replay_by_hand(log) -> bytes:
    """SNP ABI PAGE_INFO: LD || CONTENTS || u16 0x70 || type || imi || vmpl3,2,1 || rsvd || GPA."""
    ld = bytes(48)
    for e in log:
        contents = bytes.fromhex(e["contents_sha384"]) if e["contents_sha384"] else bytes(48)
        info = ld + contents + struct.pack("<HBB4BQ", 0x70, TYPES[e["page_type"]], 0, 0, 0, 0, 0,
                                           int(e["gpa"], 16))
        assert len(info) == 0x70
        ld = hashlib.sha384(info).digest()
    return ld


def replay_with_sev_snp_measure(log) -> bytes:
    g = gctx.GCTX()
    for e in log:
        contents = bytes.fromhex(e["contents_sha384"]) if e["contents_sha384"] else bytes(48)
        g._update(TYPES[e["page_type"]], int(e["gpa"], 16), contents)
    return g.ld()


@pytest.mark.parametrize("guest, vcpus", [("hello", 1), ("hello64", 1), ("hello64", 4),
                                          ("cpuid", 2), ("sev-hello", 3)])
def test_measure_json_log_replays_to_the_digest(capsys, guest, vcpus):
    out = run_json(capsys, "measure", guest, "--mode", "sev-snp", "--vcpus", str(vcpus), "--json")
    assert out["mode"] == "sev-snp" and out["vcpus"] == vcpus
    log = out["launch_log"]
    digest = bytes.fromhex(out["launch_digest"])
    assert replay_by_hand(log) == digest
    assert replay_with_sev_snp_measure(log) == digest
    # ...and sev-snp-measure fed the pages themselves agrees
    g = get_guest(guest)
    plan = guest_launch_plan(g.load(), g.mode, g.memory, vcpus=vcpus)
    assert expected_digest(plan).digest == digest
    assert [e["page_type"] for e in log].count("vmsa") == vcpus
    assert all(e["contents_sha384"] is None for e in log
               if e["page_type"] in ("zero", "unmeasured", "secrets", "cpuid"))
    assert all(len(e["contents_sha384"]) == 96 for e in log
               if e["page_type"] in ("normal", "vmsa"))


def test_log_is_in_launch_order_with_the_pages_gpas(capsys):
    out = run_json(capsys, "measure", "hello64", "--mode", "sev-snp", "--vcpus", "2", "--json")
    log = out["launch_log"]
    normal = [int(e["gpa"], 16) for e in log if e["page_type"] == "normal"]
    assert normal == sorted(normal) and normal[0] == 0x1000
    assert [e["page_type"] for e in log][-4:] == ["secrets", "cpuid", "vmsa", "vmsa"]
    assert {e["gpa"] for e in log if e["page_type"] == "vmsa"} == {"0xfffffffff000"}


def test_a_different_vcpu_count_or_policy_field_changes_only_what_it_should(capsys):
    one = run_json(capsys, "measure", "hello64", "--mode", "sev-snp", "--json")
    two = run_json(capsys, "measure", "hello64", "--mode", "sev-snp", "--vcpus", "2", "--json")
    assert one["launch_digest"] != two["launch_digest"]
    assert two["launch_log"][:len(one["launch_log"])] == one["launch_log"]
    debug = run_json(capsys, "measure", "hello64", "--mode", "sev-snp", "--policy",
                     "smt,rsvd-mbo,debug", "--json")
    assert debug["launch_digest"] == one["launch_digest"]  # the policy is not in LD
    assert debug["policy"] == "0xb0000"


def test_measure_image_file(capsys, tmp_path):
    img = tmp_path / "g.bin"
    img.write_bytes(b"\xf4" * 100)
    out = run_json(capsys, "measure", "--image", str(img), "--mode", "sev-snp", "--json")
    assert replay_with_sev_snp_measure(out["launch_log"]).hex() == out["launch_digest"]
    assert out["launch_log"][0]["gpa"] == "0x8000"


@pytest.mark.parametrize("argv", [
    ["measure", "hello64", "--mode", "sev-snp", "--policy", "0x10000"],  # bit 17 clear
    ["measure", "hello64", "--mode", "sev-snp", "--policy", "smt,bogus"],
    ["measure", "hello64", "--mode", "sev-snp", "--vcpus", "0"],
    ["measure", "hello64", "--mode", "sev-snp", "--tik", "00" * 16],
    ["measure", "--mode", "sev-snp"],
])
def test_measure_usage_errors(capsys, argv):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip()
