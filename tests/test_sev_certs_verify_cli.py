"""``kvmharness sev verify``: the chain from files (real captures) or the simulated platform."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmharness.cli import main
from kvmharness.errors import EXIT_GUEST_FAILED, EXIT_OK, EXIT_USAGE
from kvmharness.sev.amd_ca import builtin_roots
from kvmharness.sev.chain import LINK_NAMES

DATA = Path(__file__).parent / "data" / "sev"


def chain_args(directory: Path, **override) -> list[str]:
    args = []
    for role in ("pdh", "pek", "oca", "cek"):
        args += [f"--{role}", str(override.get(role, directory / f"{role}.cert"))]
    return args


def run(capsys, *argv) -> tuple[int, str]:
    rc = main(["sev", "verify", *argv])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_real_chain_from_files_with_builtin_roots(capsys, gen):
    rc, out = run(capsys, *chain_args(DATA / gen), "--json")
    d = json.loads(out)
    assert rc == EXIT_OK and d["ok"] and d["complete"] and d["failed"] == []
    assert d["roots"] == {"ark": f"built-in {gen}", "ask": f"built-in {gen}", "product": gen}
    assert [l["name"] for l in d["links"]] == list(LINK_NAMES)
    rc, out = run(capsys, *chain_args(DATA / gen))
    assert rc == EXIT_OK and out.count("  ok") == 7 and "chain verified" in out


def test_flipped_cek_names_the_link_and_exits_1(capsys, tmp_path):
    raw = bytearray((DATA / "rome" / "cek.cert").read_bytes())
    raw[0x41C + 5] ^= 0x10  # inside the ASK's RSA signature
    bad = tmp_path / "cek.cert"
    bad.write_bytes(raw)
    rc, out = run(capsys, *chain_args(DATA / "rome", cek=bad), "--product", "rome", "--json")
    d = json.loads(out)
    assert rc == EXIT_GUEST_FAILED and d["failed"] == ["ASK -> CEK"]
    assert "does not verify with the ASK key" in d["links"][2]["reason"]
    # auto: no built-in ASK signed it, which is still the ASK -> CEK link
    rc, out = run(capsys, *chain_args(DATA / "rome", cek=bad))
    assert rc == EXIT_GUEST_FAILED and "FAILED  ASK -> CEK" in out
    assert "chain FAILED at: ASK -> CEK" in out


def test_wrong_generation_roots_fail_the_cek_link(capsys):
    rc, out = run(capsys, *chain_args(DATA / "naples"), "--product", "rome", "--json")
    assert rc == EXIT_GUEST_FAILED and json.loads(out)["failed"] == ["ASK -> CEK"]


def test_given_ask_ark_files_and_amds_concatenated_form(capsys, tmp_path):
    roots = builtin_roots("naples")
    (tmp_path / "ask.cert").write_bytes(roots.ask.to_bytes())
    (tmp_path / "ark.cert").write_bytes(roots.ark.to_bytes())
    (tmp_path / "ask_ark.cert").write_bytes(roots.ask.to_bytes() + roots.ark.to_bytes())
    rc, out = run(capsys, *chain_args(DATA / "naples"), "--ask", str(tmp_path / "ask.cert"),
                  "--ark", str(tmp_path / "ark.cert"), "--json")
    d = json.loads(out)
    assert rc == EXIT_OK and d["complete"] and d["roots"]["product"] is None
    rc, out = run(capsys, *chain_args(DATA / "naples"), "--ask", str(tmp_path / "ask_ark.cert"),
                  "--json")
    assert rc == EXIT_OK and json.loads(out)["complete"]
    # the Rome ASK given for a Naples chain: the ASK -> CEK link, not the others
    (tmp_path / "rome_ask.cert").write_bytes(builtin_roots("rome").ask.to_bytes())
    rc, out = run(capsys, *chain_args(DATA / "naples"), "--ask", str(tmp_path / "rome_ask.cert"),
                  "--ark", str(tmp_path / "ark.cert"), "--json")
    assert rc == EXIT_GUEST_FAILED
    assert set(json.loads(out)["failed"]) == {"ARK -> ASK", "ASK -> CEK"}


def test_garbage_certificate_fails_its_links_not_the_command(capsys, tmp_path):
    junk = tmp_path / "pdh.cert"
    junk.write_bytes(b"\0" * 100)
    rc, out = run(capsys, *chain_args(DATA / "rome", pdh=junk), "--json")
    d = json.loads(out)
    assert rc == EXIT_GUEST_FAILED and d["failed"] == ["PEK -> PDH"]
    assert "2084 bytes" in d["links"][-1]["reason"]


def test_usage_errors(capsys, tmp_path):
    assert main(["sev", "verify", "--pdh", str(DATA / "rome" / "pdh.cert")]) == EXIT_USAGE
    assert "missing --pek, --oca, --cek" in capsys.readouterr().err
    args = chain_args(DATA / "rome", oca=tmp_path / "nope.cert")
    assert main(["sev", "verify", *args]) == EXIT_USAGE
    assert "cannot read --oca" in capsys.readouterr().err


def test_simulated_platform_chain_verifies(capsys, tmp_path, monkeypatch):
    # the export alone: its CEK is unsigned (as AMD's firmware exports it), so ASK -> CEK is
    # unverified (exit 1), everything the export can prove holds
    rc, out = run(capsys, "--backend", "sim", "--json")
    d = json.loads(out)
    assert rc == EXIT_GUEST_FAILED and d["source"] == "sim" and not d["complete"]
    assert d["failed"] == [] and d["unverified"] == ["ASK -> CEK"]
    # with the ASK-signed CEK the (simulated) KDS serves for this chip: verified to the ARK
    import kvmharness.sev.cli as sev_cli
    from kvmharness.sev.firmware import SIMULATED_KDS, SimulatedSevFirmware
    from kvmharness.sev.kvm_model import SimulatedSevDevice

    fw = SimulatedSevFirmware(num_asids=4, min_sev_asid=2)
    monkeypatch.setattr(sev_cli, "_platform", lambda args: SimulatedSevDevice(fw))
    with SIMULATED_KDS.open(fw.get_id()) as f:  # what a download by chip id gives
        (tmp_path / "kds.cert").write_bytes(f.read())
    rc, out = run(capsys, "--backend", "sim", "--cek", str(tmp_path / "kds.cert"), "--json")
    d = json.loads(out)
    assert rc == EXIT_OK and d["complete"]
    assert d["roots"]["ask"] == "the simulated platform's AMD root"
    # AMD's real roots do not vouch for the simulated chip
    rc, out = run(capsys, "--backend", "sim", "--cek", str(tmp_path / "kds.cert"),
                  "--product", "milan", "--json")
    assert rc == EXIT_GUEST_FAILED and json.loads(out)["failed"] == ["ASK -> CEK"]


class _ExportOnly:
    """A stand-in /dev/sev that answers PDH_CERT_EXPORT with a captured real chain."""

    backend = "kvm"
    firmware = None  # as SevPlatformInterface declares: a real /dev/sev has no model behind it

    def __init__(self, gen: str):
        self.raw = {r: (DATA / gen / f"{r}.cert").read_bytes() for r in ("pdh", "pek", "oca", "cek")}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def pdh_cert_export(self):
        return self.raw["pdh"], self.raw["pek"] + self.raw["oca"] + self.raw["cek"]


@pytest.mark.parametrize("gen", ["naples", "rome"])
def test_platform_export_path_picks_the_builtin_roots(capsys, monkeypatch, gen):
    """The /dev/sev path (no simulated root on the device): the built-in root that signed the CEK."""
    import kvmharness.sev.cli as sev_cli

    monkeypatch.setattr(sev_cli, "_platform", lambda args: _ExportOnly(gen))
    rc, out = run(capsys, "--backend", "kvm", "--json")
    d = json.loads(out)
    assert rc == EXIT_OK and d["source"] == "kvm" and d["complete"]
    assert d["roots"]["product"] == gen


@pytest.mark.skipif(Path("/dev/sev").exists(), reason="this host has /dev/sev")
def test_no_dev_sev_is_a_host_error(capsys):
    from kvmharness.errors import EXIT_HOST

    assert main(["sev", "verify", "--backend", "kvm"]) == EXIT_HOST
    assert "/dev/sev" in capsys.readouterr().err
