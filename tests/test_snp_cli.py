"""``kvmharness snp verify | show | simulate``: exit codes, messages, JSON.

Pure logic: no device, no network.  Exit codes as documented: 0 verified, 1 a
check failed (named), 2 a file that cannot be read or parsed.
"""

from __future__ import annotations

import json

import pytest
from test_snp_report import DATA, TAV, read_report

from kvmharness.cli import main
from kvmharness.snp.report import Generation
from kvmharness.snp.verify import amd_root_pems

MILAN_HEX = str(DATA / "virtee-sev" / "report_milan.hex")
MILAN_VCEK = str(DATA / "virtee-sev" / "vcek_milan.der")
TURIN = str(TAV / "turin_attestation_report.bin")
TURIN_VCEK = str(TAV / "turin_vcek.pem")
AT = ["--at", "2027-06-01"]


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_verify_real_report(capsys):
    rc, out, err = run(capsys, "snp", "verify", "--report", MILAN_HEX, "--vcek", MILAN_VCEK, *AT)
    assert rc == 0, err
    assert "AMD's built-in ARK-Milan" in out and out.strip().endswith("verified")
    assert err == ""


def test_verify_json(capsys):
    rc, out, _ = run(capsys, "snp", "verify", "--report", TURIN, "--vcek", TURIN_VCEK, "--json",
                     *AT)
    d = json.loads(out)
    assert rc == 0 and d["ok"] and d["failed"] is None and d["generation"] == "turin"
    assert d["root"] == "amd" and d["vcek"]["product_name"] == "Turin"
    assert d["report"]["reported_tcb"]["fmc"] == d["vcek"]["fmc_spl"]
    assert {c["name"]: c["status"] for c in d["checks"]}["signature"] == "pass"


@pytest.mark.parametrize("option,value,check", [
    ("--measurement", "00" * 48, "measurement"),
    ("--report-data", "ff", "report-data"),
    ("--policy", "0x1", "policy"),
])
def test_verify_expectation_mismatch_names_the_check(capsys, option, value, check):
    rc, out, err = run(capsys, "snp", "verify", "--report", TURIN, "--vcek", TURIN_VCEK,
                       option, value, *AT)
    assert rc == 1
    assert err.count("\n") == 1 and f"attestation check '{check}' failed" in err
    rc, out, _ = run(capsys, "snp", "verify", "--report", TURIN, "--vcek", TURIN_VCEK,
                     option, value, "--json", *AT)
    assert rc == 1 and json.loads(out)["failed"] == check


def test_verify_tampered_report_fails_the_signature(capsys, tmp_path):
    raw = bytearray(read_report(DATA / "virtee-sev" / "report_milan.hex"))
    raw[0x90] ^= 0x01  # the first bit of MEASUREMENT
    p = tmp_path / "report.bin"
    p.write_bytes(bytes(raw))
    rc, out, err = run(capsys, "snp", "verify", "--report", str(p), "--vcek", MILAN_VCEK, *AT)
    assert rc == 1 and "'signature' failed" in err and "FAIL  signature" in out


def test_unreadable_and_malformed_inputs_exit_2_with_one_line(capsys, tmp_path):
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a report")
    cases = [
        (["--report", str(tmp_path / "missing.bin"), "--vcek", MILAN_VCEK], "cannot use"),
        (["--report", str(junk), "--vcek", MILAN_VCEK], "1184"),
        (["--report", MILAN_HEX, "--vcek", str(junk)], "not an X.509 certificate"),
        (["--report", MILAN_HEX], "no VCEK"),
        (["--report", MILAN_HEX, "--vcek", MILAN_VCEK, "--measurement", "abc"], "not hex"),
        (["--report", MILAN_HEX, "--certs-dir", str(tmp_path / "nodir")], "cannot use"),
    ]
    for argv, words in cases:
        rc, out, err = run(capsys, "snp", "verify", *argv)
        assert rc == 2, (argv, err)
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err


def test_verify_from_a_kds_style_certs_dir(capsys, tmp_path):
    ark, ask = amd_root_pems(Generation.MILAN)
    (tmp_path / "cert_chain.pem").write_bytes(ask + ark)
    (tmp_path / "vcek.der").write_bytes((DATA / "virtee-sev" / "vcek_milan.der").read_bytes())
    rc, out, err = run(capsys, "snp", "verify", "--report", MILAN_HEX, "--certs-dir",
                       str(tmp_path), *AT)
    assert rc == 0, err
    assert "AMD's built-in ARK-Milan" in out


def test_simulate_then_verify_with_the_simulated_roots(capsys, tmp_path):
    out_dir = tmp_path / "sim"
    rc, out, err = run(capsys, "snp", "simulate", "--out", str(out_dir), "--processor", "genoa",
                       "--report-data", "c0ffee", "--measurement", "11" * 48, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["simulated"] and d["report"]["report_data"].startswith("c0ffee")
    assert {p.name for p in out_dir.iterdir()} == {"report.bin", "vcek.pem", "ask.pem", "ark.pem"}
    report = str(out_dir / "report.bin")
    rc, out, err = run(capsys, "snp", "verify", "--report", report, "--certs-dir", str(out_dir),
                       "--report-data", "c0ffee", "--measurement", "11" * 48, "--policy",
                       "0x30000", *AT)
    assert rc == 0, err
    assert "NOT AMD's" in out and "not AMD's" in out.splitlines()[-1]
    rc, out, err = run(capsys, "snp", "verify", "--report", report, "--ark",
                       str(out_dir / "ark.pem"), "--ask", str(out_dir / "ask.pem"), "--vcek",
                       str(out_dir / "vcek.pem"), "--report-data", "c0ffef", *AT)
    assert rc == 1 and "'report-data' failed" in err
    # AMD's real Genoa roots never accept the simulated VCEK
    rc, out, err = run(capsys, "snp", "verify", "--report", report, "--vcek",
                       str(out_dir / "vcek.pem"), *AT)
    assert rc == 1 and "'vcek' failed" in err


def test_show(capsys):
    rc, out, _ = run(capsys, "snp", "show", "--report", TURIN, "--json")
    d = json.loads(out)
    assert rc == 0 and d["generation"] == "turin" and d["report"]["version"] == 5
    assert "fmc" in d["report"]["reported_tcb"]
    rc, out, _ = run(capsys, "snp", "show", "--report", MILAN_HEX)
    assert rc == 0 and "pass --processor" in out  # a v2 report does not say its generation
    rc, out, _ = run(capsys, "snp", "show", "--report", MILAN_HEX, "--processor", "milan")
    assert rc == 0 and "bootloader=3" in out


def test_bad_processor_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["snp", "verify", "--report", MILAN_HEX, "--processor", "rome"])
    assert e.value.code == 2


def test_verify_never_touches_the_network(capsys, monkeypatch):
    """Every socket is refused: verification still completes from files and built-ins."""
    import socket

    def refuse(*_a, **_k):
        raise AssertionError("snp verify tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    rc, out, err = run(capsys, "snp", "verify", "--report", TURIN, "--vcek", TURIN_VCEK, *AT)
    assert rc == 0, err


def test_verify_a_vlek_signed_report(capsys):
    report = str(DATA / "trustee" / "test-vlek-report.bin")
    vlek = str(DATA / "trustee" / "test-vlek.der")
    rc, out, err = run(capsys, "snp", "verify", "--report", report, "--vlek", vlek, "--at",
                       "2025-06-01", "--json")
    d = json.loads(out)
    assert rc == 0, err
    assert d["endorsement"] == "vlek" and d["root"] == "amd"
    assert [c["name"] for c in d["checks"]][:3] == ["ark", "asvk", "vlek"]
