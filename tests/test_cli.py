"""The command line as a user meets it: exit codes, one-line errors, no tracebacks."""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from kvmharness.cli import main
from kvmharness.errors import HarnessError


def cli(*args, env=None, prefix=()):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([*prefix, sys.executable, "-m", "kvmharness", *args], capture_output=True,
                          text=True, env=e, timeout=120)


def test_unknown_guest_is_a_usage_error_without_traceback():
    r = cli("run", "nosuch")
    assert r.returncode == 2
    assert "unknown guest 'nosuch'" in r.stderr and "Traceback" not in r.stderr


def test_bad_backend_choice_is_refused_by_argparse():
    r = cli("run", "hello", "--backend", "qemu")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_missing_kvm_device_with_kvm_backend_says_what_to_do():
    r = cli("run", "hello", "--backend", "kvm", env={"KVMHARNESS_KVM_DEVICE": "/nonexistent/kvm"})
    assert r.returncode == 3
    assert "does not exist" in r.stderr and "--backend sim" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.requires_kvm
def test_eacces_says_join_the_kvm_group(tmp_path):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv (util-linux) to make a device node this process cannot open")
    st = os.stat("/dev/kvm")
    node = tmp_path / "kvm"
    os.mknod(node, stat.S_IFCHR | 0o600, st.st_rdev)
    os.chown(node, 65534, 65534)  # owned by nobody: without capabilities, root cannot open it
    r = cli("run", "hello", "--backend", "kvm", env={"KVMHARNESS_KVM_DEVICE": str(node)},
            prefix=("setpriv", "--inh-caps=-all", "--bounding-set=-all"))
    assert r.returncode == 3, r.stderr
    assert "join the 'kvm' group" in r.stderr.lower() and "Traceback" not in r.stderr


@pytest.mark.requires_kvm
def test_run_json_and_exit_codes():
    r = cli("run", "hello", "--backend", "kvm", "--json")
    assert r.returncode == 0
    out = json.loads(r.stdout)
    assert out["outcome"] == "done" and out["console"].startswith("Hello")
    r = cli("run", "fault", "--backend", "kvm", "--timeout", "5")
    assert r.returncode == 0  # shutdown is what fault's manifest expects


@pytest.mark.requires_kvm
def test_a_guest_that_hangs_unexpectedly_times_out_with_exit_code_4(tmp_path):
    manifest = tmp_path / "manifest.toml"
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "hang.bin").write_bytes(b"\xeb\xfe")  # jmp .
    manifest.write_text('[guest.hang]\nmode = "real"\ntimeout = 0.3\n')
    from kvmharness.images import load_manifest
    from kvmharness.errors import GuestTimeout
    from kvmharness.machine import run_guest

    g = load_manifest(manifest)["hang"]
    with pytest.raises(GuestTimeout) as e:
        run_guest(g, "kvm")
    assert e.value.exit_code == 4 and "did not finish within 0.3 s" in str(e.value)


def test_info_json_has_a_verdict_per_mode(capsys):
    assert main(["info", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["verdicts"]) == {"svm", "sev", "sev-es", "sev-snp"}
    for v in out["verdicts"].values():
        assert isinstance(v["usable"], bool) and v["why"]
    assert {"kvm", "cpu", "kernel", "kvm_amd", "sev_device", "memory"} <= set(out)


def test_info_here_tells_the_truth_about_svm_and_sev(capsys):
    main(["info", "--json"])
    out = json.loads(capsys.readouterr().out)
    if out["kvm"]["module"] == "kvm_amd":
        pytest.skip("this host has kvm_amd: the negative verdicts cannot be shown here")
    assert out["verdicts"]["svm"]["usable"] is False
    assert "not kvm_amd" in out["verdicts"]["svm"]["why"] or "does not exist" in out["verdicts"]["svm"]["why"]
    assert out["verdicts"]["sev"]["usable"] is False


def test_guests_lists_the_manifest(capsys):
    assert main(["guests"]) == 0
    text = capsys.readouterr().out
    assert "hello" in text and "cpuid" in text


def test_non_positive_timeout_is_a_usage_error():
    r = cli("run", "hello", "--backend", "sim", "--timeout", "-1")
    assert r.returncode == 2 and "--timeout must be a positive number" in r.stderr


def test_run_picks_the_sev_mode_the_manifest_needs():
    r = cli("run", "sev-hello", "--backend", "sim")
    assert r.returncode == 0, r.stderr
    assert "# sev launch: KVM_SEV_INIT2" in r.stderr and "verified with the owner TIK" in r.stderr


def test_guest_the_host_cannot_run_is_a_host_error_with_the_probed_reason():
    from kvmharness.backend import open_backend
    from kvmharness.hostinfo import need_status

    try:
        with open_backend("kvm") as system:
            met, why = need_status(system, "sev-es")
    except HarnessError as e:
        met, why = False, str(e)
    if met:
        pytest.skip("this host offers SEV-ES: es-io runs here")
    r = cli("run", "es-io", "--backend", "kvm")
    assert r.returncode == 3 and why in r.stderr, r.stderr  # what the probe found, nothing written down
    assert "needs SEV-ES hardware" not in r.stderr


def test_run_mode_the_guest_does_not_declare_is_a_usage_error():
    r = cli("run", "sev-hello", "--mode", "sev-es", "--backend", "sim")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "does not run in sev-es mode: its manifest declares modes sev" in r.stderr
    assert "launch" not in r.stderr  # refused before any VM


def test_guests_says_per_backend_whether_each_need_is_met(capsys):
    assert main(["guests"]) == 0
    text = capsys.readouterr().out
    assert "needs: sev-es, user-msr-exits" in text
    assert "sim: sev-es met, user-msr-exits met; runs it in: sev-es" in text


@pytest.mark.parametrize("argv, rc, message", [
    (["measure", "hello64", "--c-bit", "99"], 2, "the C-bit is a page-table bit from 32 to 63"),
    (["sev", "export", "--backend", "sim", "--out", "/proc/nonexistent/x"], 2, "cannot use /proc/nonexistent"),
    (["bench", "--rounds", "0"], 2, "must be at least 1"),
])
def test_bad_arguments_and_unwritable_paths_are_one_line_errors(argv, rc, message):
    r = cli(*argv)
    assert r.returncode == rc and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- suite: every guest, on kvm where this host can run it, else on the simulator --------
def _suite_json(monkeypatch, capsys, names, *argv):
    """`suite --json` in-process over a few manifest guests (the whole manifest is the
    fresh-Debian check's job)."""
    import kvmharness.images as images

    full = images.load_manifest()
    monkeypatch.setattr(images, "load_manifest", lambda *a, **k: {n: full[n] for n in names})
    rc = main(["suite", "--json", *argv])
    return rc, json.loads(capsys.readouterr().out)


SUITE_SAMPLE = ("hello", "es-io", "sev-hello", "nested-cpuid")


def _kvm_verdicts(names):
    """{guest: (ok, why)} as the probe says for this host's kvm backend."""
    from kvmharness.backend import open_backend
    from kvmharness.images import get_guest

    with open_backend("kvm") as system:
        return {n: get_guest(n).runnable_on(system) for n in names}


def test_suite_without_kvm_runs_every_guest_on_the_simulator():
    code = ("import sys, kvmharness.images as images\n"
            "full = images.load_manifest()\n"
            f"images.load_manifest = lambda *a, **k: {{n: full[n] for n in {SUITE_SAMPLE!r}}}\n"
            "from kvmharness.cli import main\nsys.exit(main(['suite', '--json']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, KVMHARNESS_KVM_DEVICE="/nonexistent/kvm"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["requested"] == "auto" and out["ran_on"] == {"kvm": 0, "sim": len(SUITE_SAMPLE)}
    for row in out["guests"]:
        assert (row["backend"], row["status"]) == ("sim", "passed"), row
        assert "/nonexistent/kvm does not exist" in row["why"]


@pytest.mark.requires_kvm
def test_suite_auto_uses_kvm_where_the_probe_allows_else_the_simulator(monkeypatch, capsys):
    import importlib.util

    sim_usable = importlib.util.find_spec("unicorn") is not None  # not on the SVM rig
    verdicts = _kvm_verdicts(SUITE_SAMPLE)
    rc, out = _suite_json(monkeypatch, capsys, SUITE_SAMPLE)
    assert rc == 0, out
    for row in out["guests"]:
        ok, why = verdicts[row["guest"]]
        if ok:
            assert (row["backend"], row["status"]) == ("kvm", "passed") and "can run it" in row["why"], row
        elif sim_usable:  # the probe's own reason says why it ran on the simulator
            assert (row["backend"], row["status"]) == ("sim", "passed") and why in row["why"], row
        else:  # no simulator here either: skipped, naming what to install
            assert row["status"] == "skipped" and why in row["why"], row
            assert "unicorn is not installed" in row["why"], row
    assert out["ran_on"]["kvm"] == sum(ok for ok, _ in verdicts.values())


@pytest.mark.requires_kvm
def test_suite_backend_kvm_is_strict_and_skips_with_the_probed_reason(monkeypatch, capsys):
    verdicts = _kvm_verdicts(SUITE_SAMPLE)
    rc, out = _suite_json(monkeypatch, capsys, SUITE_SAMPLE, "--backend", "kvm")
    assert rc == 0 and out["requested"] == "kvm" and out["ran_on"]["sim"] == 0
    for row in out["guests"]:
        ok, why = verdicts[row["guest"]]
        if ok:
            assert (row["backend"], row["status"]) == ("kvm", "passed"), row
        else:
            assert row["backend"] is None and row["status"] == "skipped" and why in row["why"], row


def test_suite_lines_name_the_backend_and_why(monkeypatch, capsys):
    import kvmharness.images as images

    full = images.load_manifest()
    monkeypatch.setattr(images, "load_manifest", lambda *a, **k: {n: full[n] for n in ("hello", "es-io")})
    assert main(["suite", "--backend", "sim"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [l.split()[:3] for l in lines[:2]] == [["hello", "passed", "sim"], ["es-io", "passed", "sim"]]
    assert all(l.endswith("[sim: --backend sim]") for l in lines[:2]), lines
    assert lines[-1] == "2 passed, 0 failed, 0 skipped (ran on kvm: 0, on sim: 2)"


# -- a missing optional dependency: one line naming what to install, exit 3 ---------------
def _cli_without(module, *argv):
    """The CLI in a fresh interpreter in which `import module` fails as if not installed."""
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from kvmharness.cli import main\nsys.exit(main({list(argv)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module, dist, argv", [
    ("paramiko", "paramiko", ("rig", "check", "--inventory", "{inv}")),
    ("paramiko", "paramiko", ("rig", "run", "--inventory", "{inv}", "--", "pytest")),
    ("unicorn", "unicorn", ("run", "hello", "--backend", "sim")),
    ("cffi", "cffi", ("run", "hello", "--backend", "kvm")),
    ("psutil", "psutil", ("info",)),
    ("cryptography", "cryptography", ("sev", "status", "--backend", "sim")),
])
def test_missing_optional_dependency_is_one_line_naming_what_to_install(tmp_path, module, dist, argv):
    inv = tmp_path / "rigs.toml"
    inv.write_text('[rigs.r]\nhost = "127.0.0.1"\nport = 9\nuser = "root"\n')
    r = _cli_without(module, *(a.format(inv=inv) for a in argv))
    assert r.returncode == 3, r.stderr
    err = [l for l in r.stderr.splitlines() if not l.startswith("# ")]  # "# sim backend requested"
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert err[0].startswith(f"kvmharness: error: {dist} is not installed (needed by ")
    assert f"-m pip install '{dist}" in err[0]


def test_missing_paramiko_names_the_rig_extra(tmp_path):
    inv = tmp_path / "rigs.toml"
    inv.write_text('[rigs.r]\nhost = "127.0.0.1"\nport = 9\nuser = "root"\n')
    r = _cli_without("paramiko", "rig", "check", "--inventory", str(inv))
    assert "needed by the rig commands" in r.stderr and "[rig] extra" in r.stderr, r.stderr


def test_a_missing_kvmharness_module_is_an_internal_error_not_an_install_hint():
    r = _cli_without("kvmharness.hostinfo", "info")
    assert r.returncode == 5 and "internal error" in r.stderr and "pip install" not in r.stderr, r.stderr
