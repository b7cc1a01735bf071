"""``kvmharness sev ...`` on the simulated platform and ``kvmharness measure`` (offline)."""

from __future__ import annotations

import hashlib
import json

import pytest

from kvmharness.boot import sev_launch_blob

from kvmharness.boot import long_mode_state
from kvmharness.cli import main
from kvmharness.errors import EXIT_OK, EXIT_USAGE
from kvmharness.images import get_guest
from kvmharness.sev.certs import (
    CERT_SIZE,
    PlatformCertChain,
    SevCertificate,
)
from kvmharness.sev.chain import verify_platform_chain
from kvmharness.sev.launch import pad_image
from kvmharness.sev.measurement import compute_measure, launch_digest
from kvmharness.sev.vmsa import build_vmsa

TIK = "00112233445566778899aabbccddeeff"
NONCE = "000102030405060708090a0b0c0d0e0f"


def run_json(capsys, *argv):
    assert main(list(argv)) == EXIT_OK
    return json.loads(capsys.readouterr().out)


def test_sev_status_sim_json(capsys):
    d = run_json(capsys, "sev", "status", "--backend", "sim", "--json")
    assert d["backend"] == "sim"
    assert (d["api"], d["build"]) == ("1.55", 21)
    assert d["state"] in ("UNINIT", "INIT", "WORKING") and d["owner"] == "self"
    assert isinstance(d["guest_count"], int)


def test_sev_id_and_pek_csr(capsys, tmp_path):
    d = run_json(capsys, "sev", "id", "--backend", "sim", "--json")
    assert d["length"] == 64 and len(bytes.fromhex(d["id"])) == 64
    out = tmp_path / "pek.csr"
    d = run_json(capsys, "sev", "pek-csr", "--backend", "sim", "--out", str(out), "--json")
    assert d["csr"]["usage"] == "PEK" and out.stat().st_size == CERT_SIZE
    cert = SevCertificate.from_bytes(out.read_bytes())
    assert all(s.empty for s in cert.sigs)  # a CSR is unsigned


def test_sev_export_writes_a_verifiable_chain(capsys, tmp_path):
    d = run_json(capsys, "sev", "export", "--backend", "sim", "--out", str(tmp_path), "--json")
    assert set(d["certificates"]) == {"pdh.cert", "pek.cert", "oca.cert", "cek.cert"}
    pdh = SevCertificate.from_bytes((tmp_path / "pdh.cert").read_bytes())
    chain = PlatformCertChain.from_bytes((tmp_path / "cert_chain.cert").read_bytes())
    verify_platform_chain(pdh, chain)  # raises if the chain does not hold together
    assert d["certificates"]["pdh.cert"]["sha256"] == hashlib.sha256(pdh.to_bytes()).hexdigest()


@pytest.mark.parametrize("command", ["factory-reset", "pek-gen", "pdh-gen"])
def test_destructive_commands_need_the_flag(capsys, command):
    assert main(["sev", command, "--backend", "sim"]) == EXIT_USAGE
    assert "--i-know-this-is-destructive" in capsys.readouterr().err
    d = run_json(capsys, "sev", command, "--backend", "sim", "--i-know-this-is-destructive",
                 "--json")
    assert d["done"] == command


def test_measure_image(capsys, tmp_path):
    image = b"\x90" * 37
    path = tmp_path / "guest.bin"
    path.write_bytes(image)
    d = run_json(capsys, "measure", "--image", str(path), "--policy", "nodbg", "--api", "1.55",
                 "--build", "21", "--tik", TIK, "--nonce", NONCE, "--json")
    digest = launch_digest([pad_image(image)])
    assert d["measured_size"] == 48 and d["launch_digest"] == digest.hex()
    expected = compute_measure(bytes.fromhex(TIK), api_major=1, api_minor=55, build=21, policy=1,
                               digest=digest, mnonce=bytes.fromhex(NONCE))
    assert d["measure"] == expected.hex()
    assert d["measurement"] == expected.hex() + NONCE


def test_measure_guest_sev_es_includes_the_vmsa(capsys):
    guest = get_guest("hello64")
    d = run_json(capsys, "measure", "hello64", "--mode", "sev-es", "--policy", "nodbg,es",
                 "--json")
    regs, sregs = long_mode_state(guest.memory)
    vmsa = build_vmsa(regs, sregs, sev_features=0, init2=True)
    assert d["vmsa_pages"] == 1
    _, blob = sev_launch_blob(guest.load(), guest.mode, 51)  # boot tables (C-bit 51) + image
    assert d["launch_digest"] == launch_digest([blob], [vmsa]).hex()
    legacy = run_json(capsys, "measure", "hello64", "--mode", "sev-es", "--policy", "es",
                      "--legacy-init", "--json")
    assert legacy["launch_digest"] != d["launch_digest"]  # no FPU state in the VMSA


@pytest.mark.parametrize("argv", [
    ["measure"],  # neither guest nor image
    ["measure", "hello64", "--tik", TIK],  # TIK without the nonce
    ["measure", "hello64", "--tik", "00", "--nonce", NONCE],  # short TIK
    ["measure", "hello64", "--policy", "es"],  # ES policy in sev mode
    ["measure", "hello64", "--mode", "sev-es", "--policy", "nodbg"],  # no ES bit
    ["measure", "hello64", "--api", "one"],
])
def test_measure_usage_errors(capsys, argv):
    assert main(argv) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("kvmharness: error:")


@pytest.mark.requires_kvm
def test_run_mode_sev_on_a_host_without_sev_says_why(capsys):
    from kvmharness.hostinfo import host_report

    if host_report()["verdicts"]["sev"]["usable"]:
        pytest.skip("this host has SEV: the refusal cannot be shown here")
    assert main(["run", "hello64", "--backend", "kvm", "--mode", "sev"]) == 3
    err = capsys.readouterr().err
    assert "KVM_SEV_INIT failed: errno ENOTTY" in err and "has no SEV" in err
    assert "Traceback" not in err
