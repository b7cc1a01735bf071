"""The command line as a new user first meets it: each test pins one problem found by
running the README's commands as written (a traceback, a flag silently ignored, a JSON
field that says the opposite of the exit status, an error with no way forward)."""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from kvmharness.cli import main
from kvmharness.errors import EXIT_GUEST_FAILED, EXIT_HOST, EXIT_OK, EXIT_USAGE

ROME = Path(__file__).parent / "data" / "sev" / "rome"


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# -- measure ---------------------------------------------------------------------------

def test_measure_snp_guest_without_mode_is_its_snp_digest(capsys):
    """`measure snp-hello` (mode defaulting to the guest's, as the README says) used to die
    with a KeyError traceback; it gives the same digest as `--mode sev-snp`."""
    rc, out, err = run(capsys, "measure", "snp-hello", "--json")
    assert rc == EXIT_OK, err
    default = json.loads(out)
    rc, out, _ = run(capsys, "measure", "snp-hello", "--mode", "sev-snp", "--json")
    assert rc == EXIT_OK
    explicit = json.loads(out)
    assert default["mode"] == "sev-snp"
    assert default["launch_digest"] == explicit["launch_digest"]
    assert len(bytes.fromhex(default["launch_digest"])) == 48  # SHA-384


@pytest.mark.parametrize("guest", ["sev-hello", "es-io"])
def test_measure_vcpus_outside_snp_is_refused_not_ignored(capsys, guest):
    """--vcpus 2 used to be ignored for sev/sev-es, printing vCPU 0's digest as if for two."""
    rc, _, err = run(capsys, "measure", guest, "--vcpus", "2")
    assert rc == EXIT_USAGE
    assert err.startswith("kvmharness: error: --vcpus applies to --mode sev-snp")
    assert err.count("\n") == 1


def test_measure_bad_integer_names_the_type_not_lambda(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["measure", "sev-hello", "--build", "twenty"])
    assert ex.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "invalid integer value: 'twenty'" in err and "lambda" not in err


# -- sev ---------------------------------------------------------------------------------

def test_sev_auto_says_it_picked_the_simulator(capsys):
    if os.path.exists("/dev/sev"):
        pytest.skip("/dev/sev exists here: auto picks the real platform")
    rc, out, err = run(capsys, "sev", "status")
    assert rc == EXIT_OK
    assert out.startswith("SEV platform (sim)")
    assert "# auto: no /dev/sev, using the simulated SEV firmware" in err
    rc, out, err = run(capsys, "sev", "status", "--backend", "sim", "--json")
    assert rc == EXIT_OK and json.loads(out)["backend"] == "sim"
    assert "# auto" not in err  # asked for explicitly: nothing to explain


def test_sev_verify_json_verified_follows_the_exit_status(capsys):
    """The platform's unsigned CEK: exit 1 and "verified": false (its "ok" only means no link
    failed, which a script read as success)."""
    rc, out, _ = run(capsys, "sev", "verify", "--backend", "sim", "--json")
    d = json.loads(out)
    assert rc == EXIT_GUEST_FAILED
    assert d["unverified"] == ["ASK -> CEK"] and d["verified"] is False
    files = [f"--{n}={ROME / (n + '.cert')}" for n in ("pdh", "pek", "oca", "cek")]
    rc, out, _ = run(capsys, "sev", "verify", *files, "--json")
    d = json.loads(out)
    assert rc == EXIT_OK and d["verified"] is True and d["complete"]


# -- run -----------------------------------------------------------------------------------

def test_run_sev_policy_with_es_bit_is_a_cli_usage_error(capsys):
    """It said "use mode='sev-es'" (the Python API's words) after opening the backend."""
    rc, out, err = run(capsys, "run", "sev-hello", "--backend", "sim", "--policy", "nodbg,es")
    assert rc == EXIT_USAGE and out == ""
    assert "use --mode sev-es" in err and "mode='" not in err


# fuzz guests are assembled here: GNU as, objcopy and nm (absent on the rig in a box)
needs_binutils = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("as", "objcopy", "nm")),
    reason="assembling fuzz guests needs binutils (as, objcopy, nm)")


def _kvm_system_or_skip():
    from kvmharness.factory import open_backend

    try:
        return open_backend("kvm")
    except Exception as e:  # noqa: BLE001 -- any reason /dev/kvm cannot be opened here
        pytest.skip(f"the kvm backend cannot open here: {e}")


def _skip_unless_kvm_cannot_run(guest: str, reason: str) -> None:
    """Skip with ``reason`` where this host's KVM can run ``guest`` (or cannot be opened)."""
    from kvmharness.images import get_guest

    system = _kvm_system_or_skip()
    try:
        ok, _ = get_guest(guest).runnable_on(system)
    finally:
        system.close()
    if ok:
        pytest.skip(reason)


@pytest.mark.requires_kvm
def test_run_a_guest_kvm_cannot_run_says_use_the_simulator(capsys):
    _skip_unless_kvm_cannot_run("sev-hello", "this host's KVM runs SEV guests")
    rc, _, err = run(capsys, "run", "sev-hello", "--backend", "kvm")
    assert rc == EXIT_HOST
    line = err.strip().splitlines()[-1]
    assert line.startswith("kvmharness: error: guest 'sev-hello' cannot run on the kvm backend")
    assert line.endswith("run it on the simulator with --backend sim")


@pytest.mark.requires_kvm
def test_lab_mode_kvm_cannot_run_says_use_the_simulator(capsys):
    _skip_unless_kvm_cannot_run("lab-counter-es", "this host's KVM runs SEV-ES guests")
    rc, out, err = run(capsys, "lab", "ciphertext", "--mode", "sev-es", "--backend", "kvm")
    assert rc == EXIT_HOST and out == ""
    assert err.count("\n") == 1 and err.rstrip().endswith("--backend sim")
    # lab all gives the same reason in its summary row
    rc, out, _ = run(capsys, "lab", "ciphertext", "--mode", "all", "--backend", "kvm", "--json")
    row = next(r for r in json.loads(out)["summary"] if r["mode"] == "sev-es")
    assert row["status"] == "unavailable" and row["why"].endswith("--backend sim")


# -- bench -----------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["bench", "--count", "3"], "--count goes with --soak"),
    (["bench", "--soak", "--rounds", "2"], "--soak takes --count"),
    (["bench", "--soak", "--lifecycles", "5", "--only", "sim"], "--soak takes --count"),
])
def test_bench_flags_of_the_other_mode_are_refused_not_ignored(capsys, argv, words):
    """`bench --count 3` used to run the whole 80-second speed benchmark, ignoring --count."""
    rc, out, err = run(capsys, *argv)
    assert rc == EXIT_USAGE and out == ""
    assert words in err and err.count("\n") == 1


# -- fuzz ------------------------------------------------------------------------------

def test_fuzz_negative_seed_is_refused(capsys):
    rc, _, err = run(capsys, "fuzz", "--seed=-5")
    assert rc == EXIT_USAGE and "--seed must be 0 or more" in err


@pytest.mark.requires_kvm
@needs_binutils
def test_fuzz_seed_in_equals_form_runs_one_seed(capsys):
    """`--seed=7` was missed by a look at sys.argv for "--seed", so it ran 100 seeds."""
    _kvm_system_or_skip().close()
    rc, out, err = run(capsys, "fuzz", "--seed=7", "--mode", "long64", "--json")
    assert rc in (EXIT_OK, EXIT_GUEST_FAILED), err
    d = json.loads(out)
    assert d["guests"] == 1 and d["first_seed"] == 7


# -- suite -----------------------------------------------------------------------------

def test_suite_json_progress_on_stderr_and_aligned_columns(capsys, monkeypatch):
    """--json: stdout is one JSON document, progress goes to stderr; text: a name longer
    than 16 characters no longer pushes its row out of line."""
    import kvmharness.images as images

    full = images.load_manifest()
    few = {n: full[n] for n in ("hello64", "snp-double-validate")}
    monkeypatch.setattr(images, "load_manifest", lambda path=None: few)
    rc, out, err = run(capsys, "suite", "--backend", "sim", "--json")
    assert rc == EXIT_OK
    d = json.loads(out)
    assert [g["guest"] for g in d["guests"]] == list(few)
    assert "... suite 1/2: hello64 passed on sim" in err
    assert "... suite 2/2: snp-double-validate passed on sim" in err
    rc, out, _ = run(capsys, "suite", "--backend", "sim")
    rows = [line for line in out.splitlines() if " passed " in line]
    assert len(rows) == 2
    assert len({row.index(" passed ") for row in rows}) == 1  # one status column


# -- rig -------------------------------------------------------------------------------

def test_rig_check_reason_is_not_repeated(capsys, tmp_path):
    pytest.importorskip("paramiko", reason="the rig commands need paramiko (the [rig] extra)")
    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        key = tmp_path / "key"
        key.write_text("")
        inv = tmp_path / "rigs.toml"
        inv.write_text(f'[rigs.a]\nhost = "127.0.0.1"\nport = {port}\nuser = "x"\n'
                       f'key_file = "{key}"\n')
        rc, out, _ = run(capsys, "rig", "check", "--inventory", str(inv), "--timeout", "10")
    assert rc == EXIT_HOST
    line = [x for x in out.splitlines() if x.startswith("  a: ")]
    assert line and line[0].startswith("  a: unreachable: ")
    assert "unreachable: unreachable" not in out


@pytest.mark.requires_kvm
@needs_binutils
def test_fuzz_nested_says_when_no_nested_vmrun_was_compared(capsys):
    """On a KVM that offers guests no SVM, `fuzz --mode nested` reported "0 mismatches" as if
    nested SVM had been compared; it now says that only L1's SVM check ran."""
    system = _kvm_system_or_skip()
    try:
        svm = system.capabilities.svm
    finally:
        system.close()
    rc, out, err = run(capsys, "fuzz", "--mode", "nested", "--seeds", "1", "--json")
    assert rc in (EXIT_OK, EXIT_GUEST_FAILED), err
    notes = json.loads(out)["notes"]
    if svm:
        assert notes == []
    else:
        assert len(notes) == 1 and "no nested VMRUN is compared" in notes[0]
        assert "fuzz: note: this host's KVM offers guests no SVM" in err


def test_bench_without_kvm_points_at_only_sim_not_a_missing_flag(tmp_path):
    """bench has no --backend; without /dev/kvm it told the user to use one."""
    import subprocess
    import sys

    env = dict(os.environ, KVMHARNESS_KVM_DEVICE=str(tmp_path / "no-kvm"))
    r = subprocess.run([sys.executable, "-m", "kvmharness", "bench", "--rounds", "1",
                        "--lifecycles", "1"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == EXIT_HOST and r.stdout == ""
    assert "bench --only sim" in r.stderr and "--backend sim" not in r.stderr
    assert r.stderr.count("\n") == 1


def test_bench_json_progress_goes_to_stderr(capsys):
    """bench --json ran for minutes with no sign of life; stdout stays the JSON document."""
    rc, out, err = run(capsys, "bench", "--only", "sim", "--json")
    assert rc == EXIT_OK
    assert "sim" in json.loads(out)
    assert err.startswith("... sim: ")


def test_lab_single_scenario_says_which_backend_auto_picked(capsys):
    rc, out, err = run(capsys, "lab", "regleak", "--mode", "svm")
    assert rc in (EXIT_OK, EXIT_HOST)
    assert err.startswith("# auto: ")
    rc, out, err = run(capsys, "lab", "regleak", "--mode", "svm", "--backend", "sim", "--json")
    assert rc == EXIT_OK and json.loads(out) and err == ""


def test_run_json_on_an_unexpected_timeout_is_still_a_document(capsys):
    """An expected timeout printed JSON and an unexpected one printed nothing on stdout: a
    script reading `run --json` now gets outcome "timeout", ok false, with exit 4."""
    rc, out, err = run(capsys, "run", "ioloop", "--backend", "sim", "--timeout", "0.05", "--json")
    assert rc == 4
    d = json.loads(out)
    assert d["outcome"] == "timeout" and d["ok"] is False and d["expected"] == "hlt"
    assert "did not finish within 0.05 s" in d["message"]
    assert err.startswith("kvmharness: error: guest 'ioloop' did not finish") and err.count("\n") == 1


def test_guests_explains_that_mode_svm_is_no_claim_of_svm(capsys):
    """`guests` said "kvm: runs it in: svm" on a host whose `info` says "svm NOT usable"; the
    listing now says what the mode name means and where the host's SVM verdict is."""
    rc, out, _ = run(capsys, "guests")
    assert rc == EXIT_OK
    last = out.rstrip("\n").splitlines()[-1]
    assert last.startswith("mode svm: the guest unencrypted, on any KVM")
    assert "kvmharness info" in last
    rc, out, _ = run(capsys, "guests", "--json")
    assert rc == EXIT_OK and isinstance(json.loads(out), list)  # the legend is text-only


@pytest.mark.parametrize("argv", [
    ["snp", "simulate"],
    ["snp", "report", "snp-attest", "--backend", "sim"],
])
def test_snp_out_that_is_a_file_is_refused_before_any_work(capsys, tmp_path, argv):
    """--out naming a file was found only after the guest ran / the keys were made
    ("cannot use ...: File exists"); it is now refused first, naming the flag."""
    f = tmp_path / "a-file"
    f.write_text("x")
    rc, out, err = run(capsys, *argv, "--out", str(f))
    assert rc == EXIT_USAGE and out == ""
    assert err == f"kvmharness: error: --out {f}: not a directory\n"


@pytest.mark.requires_kvm
def test_snp_report_kvm_cannot_run_says_use_the_simulator(capsys, tmp_path):
    from kvmharness.images import get_guest

    system = _kvm_system_or_skip()
    try:
        ok, _ = get_guest("snp-attest").runnable_on(system)
    finally:
        system.close()
    if ok:
        pytest.skip("this host's KVM runs SEV-SNP guests")
    rc, out, err = run(capsys, "snp", "report", "snp-attest", "--backend", "kvm",
                       "--out", str(tmp_path / "r"))
    assert rc == EXIT_HOST and out == ""
    assert err.count("\n") == 1 and err.rstrip().endswith("run it on the simulator with --backend sim")
    assert not (tmp_path / "r").exists()


def test_fuzz_out_that_is_a_file_is_refused_before_the_run(capsys, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    rc, out, err = run(capsys, "fuzz", "--seeds", "1", "--out", str(f))
    assert rc == EXIT_USAGE and out == ""
    assert err == f"kvmharness: error: --out {f}: not a directory\n"


def test_the_wheel_carries_its_data_and_runs_outside_the_tree(tmp_path):
    """What `pip install kvmharness-*.whl` gets: every tracked data file (guest images and
    sources, the manifest, cdefs, AMD roots, the simulated keys, the C sources compiled at run
    time) is in the wheel, and the unpacked wheel runs a guest and the suite's manifest with
    no checkout on its path."""
    import re
    import shutil
    import subprocess
    import sys
    import zipfile

    from kvmharness.remote.rig import build_wheel

    root = Path(__file__).resolve().parent.parent
    if not shutil.which("git") or not (root / ".git").exists():
        pytest.skip("needs the git checkout to list the tracked files")
    whl = build_wheel(root, tmp_path / "wheel", lambda msg: None)
    # a platform wheel (the compiled exit path inside) keeps the package under
    # kvmharness-<v>.data/purelib|platlib/; pip installs both layouts to the same place
    names = {re.sub(r"^[^/]+\.data/(purelib|platlib)/", "", n) for n in zipfile.ZipFile(whl).namelist()}
    tracked = subprocess.run(["git", "ls-files", "kvmharness", "cdefs", "guests"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.split()
    missing = []
    for f in tracked:
        if "/__pycache__/" in f or not (root / f).exists():
            continue
        inside = f if f.startswith("kvmharness/") else f"kvmharness/{f}"
        if inside not in names:
            missing.append(f)
    assert missing == [], f"tracked files missing from the wheel: {missing}"
    for needed in ("kvmharness/guests/manifest.toml", "kvmharness/kvm/fastpath.c",
                   "kvmharness/bench_ref.c", "kvmharness/cdefs/kvm.h"):
        assert needed in names
    unpacked = tmp_path / "site"  # installed by pip itself, no index, no dependencies
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                        "--target", str(unpacked), str(whl)], capture_output=True, text=True,
                       timeout=300)
    if r.returncode and "No module named pip" in r.stderr:
        pytest.skip("this interpreter has no pip to install the wheel with")
    assert r.returncode == 0, r.stderr
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = dict(os.environ, PYTHONPATH=str(unpacked))
    r = subprocess.run([sys.executable, "-c", "import kvmharness, kvmharness.datafiles as d; "
                        "print(kvmharness.__file__); print(d.data_path('guests')); "
                        "print(d.data_path('cdefs'))"],
                       capture_output=True, text=True, env=env, cwd=away, timeout=60)
    assert r.returncode == 0, r.stderr
    assert all(line.startswith(str(unpacked)) for line in r.stdout.split()), r.stdout
    r = subprocess.run([sys.executable, "-m", "kvmharness", "run", "hello64", "--backend", "sim",
                        "--json"], capture_output=True, text=True, env=env, cwd=away, timeout=120)
    assert r.returncode == EXIT_OK, r.stderr
    assert json.loads(r.stdout)["console"].startswith("Hello from a 64-bit long-mode guest")


@pytest.mark.parametrize("argv, words", [
    (["run", "hello64", "--backend", "sim", "--policy", "nodbg"], "--policy is a guest policy"),
    (["run", "hello64", "--backend", "sim", "--no-owner"], "--no-owner drops the guest owner"),
    (["run", "snp-hello", "--backend", "sim", "--no-owner"], "runs here in sev-snp mode"),
])
def test_run_flags_that_do_not_apply_are_refused_not_ignored(capsys, argv, words):
    rc, out, err = run(capsys, *argv)
    assert rc == EXIT_USAGE and out == ""
    assert words in err and err.count("\n") == 1


def test_run_no_owner_still_launches_an_sev_guest(capsys):
    rc, _, err = run(capsys, "run", "sev-hello", "--backend", "sim", "--no-owner")
    assert rc == EXIT_OK and "measurement not verified (no owner)" in err


@pytest.mark.parametrize("argv, flag", [
    (["measure", "sev-hello", "--legacy-init"], "--legacy-init"),
    (["measure", "sev-hello", "--vmsa", __file__], "--vmsa"),
    (["measure", "sev-hello", "--vcpu-sig", "0x1"], "--vcpu-sig"),
    (["measure", "--image", __file__, "--c-bit", "47"], "--c-bit"),
    (["measure", "hello", "--c-bit", "47"], "--c-bit"),  # real mode: no page tables
    (["measure", "snp-hello", "--legacy-init"], "--legacy-init"),
    (["measure", "snp-hello", "--api", "1.2"], "--api"),
    (["measure", "hello64", "--mode", "sev-snp", "--build", "3"], "--build"),
])
def test_measure_options_that_do_not_enter_the_digest_are_refused(capsys, argv, flag):
    """Each was silently ignored: the printed digest looked as if it covered the option."""
    rc, out, err = run(capsys, *argv)
    assert rc == EXIT_USAGE and out == ""
    assert err.startswith(f"kvmharness: error: {flag} does not apply to this ") and err.count("\n") == 1


def test_measure_options_that_do_enter_the_digest_still_change_it(capsys):
    def digest(*argv, field="launch_digest"):
        rc, out, err = run(capsys, "measure", *argv, "--json")
        assert rc == EXIT_OK, err
        return json.loads(out)[field]

    assert digest("hello64", "--c-bit", "47") != digest("hello64")
    assert digest("es-io", "--legacy-init") != digest("es-io")
    assert digest("snp-hello", "--vcpus", "2", "--vcpu-sig", "0x1") != digest("snp-hello", "--vcpus", "2")
    owner = ("--tik", "00" * 16, "--nonce", "11" * 16)  # the build enters SEV's MEASURE
    assert digest("hello64", "--build", "22", *owner, field="measure") != \
        digest("hello64", *owner, field="measure")


@pytest.mark.parametrize("argv", [
    ["rig", "check", "--timeout", "nan"],
    ["rig", "run", "--timeout", "inf", "--", "true"],
    ["rig", "run", "--timeout", "-1", "--", "true"],
])
def test_rig_timeouts_follow_the_timeout_rule(capsys, argv):
    """Every timeout is finite, > 0 and at most a day; rig's --timeout took nan and inf."""
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == EXIT_USAGE
    assert "give seconds > 0 and at most 86400" in capsys.readouterr().err


def test_fuzz_rig_timeout_follows_the_timeout_rule(capsys):
    rc, _, err = run(capsys, "fuzz", "--rig-timeout", "nan")
    assert rc == EXIT_USAGE and "--rig-timeout must be a positive number of seconds" in err


def test_bad_sim_precision_is_a_usage_error_not_a_wrong_run(tmp_path):
    """KVMHARNESS_SIM_PRECISION=bogus put the simulator in neither mode: hello64 "ended with
    hlt, expected done" (exit 1), as if the guest were wrong.  And a suite row of a guest that
    never ran said "(None exits, ...)"."""
    import subprocess
    import sys

    env = dict(os.environ, KVMHARNESS_SIM_PRECISION="bogus")
    r = subprocess.run([sys.executable, "-m", "kvmharness", "run", "hello64", "--backend", "sim"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == EXIT_USAGE and r.stdout == ""
    assert r.stderr.splitlines()[-1] == ("kvmharness: error: KVMHARNESS_SIM_PRECISION='bogus': "
                                         "choose sites (the default) or count")
    for mode in ("count", "sites"):
        env["KVMHARNESS_SIM_PRECISION"] = mode
        r = subprocess.run([sys.executable, "-m", "kvmharness", "run", "hello64", "--backend",
                            "sim"], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == EXIT_OK, r.stderr


def test_suite_row_of_a_guest_that_never_ran_has_no_none(capsys, monkeypatch):
    import kvmharness.images as images
    import kvmharness.machine as machine

    full = images.load_manifest()
    monkeypatch.setattr(images, "load_manifest", lambda path=None: {"hello64": full["hello64"]})

    def refuse(*a, **k):
        from kvmharness.errors import FeatureUnavailable
        raise FeatureUnavailable("stand-in refusal")

    monkeypatch.setattr(machine, "run_guest", refuse)
    rc, out, _ = run(capsys, "suite", "--backend", "sim")
    assert rc == EXIT_GUEST_FAILED
    row = out.splitlines()[0]
    assert "FAILED" in row and "stand-in refusal (" in row and "None" not in row


@pytest.mark.parametrize("top, expect_cbit", [(0x8000_0008, 0), (0x8000_0028, 51)])
def test_info_decodes_0x8000001f_only_where_the_cpu_has_it(monkeypatch, top, expect_cbit):
    """On an Intel CPU (highest extended leaf 0x80000008) leaf 0x8000001F answers with a basic
    leaf's data; `info` decoded it as "c_bit=1".  Above the top leaf it now reads as zeros and
    says why; an AMD part's real leaf is decoded as before."""
    import kvmharness.hostinfo as H

    leaves = {0x8000_0000: (top, 0, 0, 0), 0x8000_001F: (0x1003, 0x70001 | 51, 509, 1)}
    monkeypatch.setattr(H, "host_cpuid", lambda leaf, subleaf=0: leaves.get(leaf))
    r = H.host_report()
    assert r["host_sev_leaf"]["c_bit"] == expect_cbit
    if top < 0x8000_001F:
        assert r["host_sev_leaf"]["sev"] is False and r["host_sev_leaf"]["encrypted_guests"] == 0
        assert "highest extended leaf is 0x80000008" in r["host_sev_leaf_source"]
        assert "highest extended leaf is 0x80000008" in H.format_report(r)
    else:
        assert r["host_sev_leaf"]["sev"] is True and r["host_sev_leaf_source"] == "/dev/cpu/0/cpuid"


# -- errors under --json ---------------------------------------------------------------

def test_an_error_under_json_is_also_one_json_object_on_stdout(capsys, tmp_path):
    """With --json a machine reads stdout: an error used to leave it empty (the reason only on
    stderr); now stdout has one object naming the error and the exit status, and stderr keeps
    its line."""
    rc, out, err = run(capsys, "run", "no-such-guest", "--backend", "sim", "--json")
    assert rc != EXIT_OK and "no-such-guest" in err
    doc = json.loads(out)
    assert doc["error"]["exit_code"] == rc and "no-such-guest" in doc["error"]["message"]
    assert doc["error"]["kind"] and not doc["error"]["message"].startswith("error:")
    missing = tmp_path / "missing.bin"
    rc, out, err = run(capsys, "sev", "verify", "--pdh", str(missing), "--json")
    assert rc != EXIT_OK and err.startswith("kvmharness: ")
    assert json.loads(out)["error"]["exit_code"] == rc
    rc, out, err = run(capsys, "run", "no-such-guest", "--backend", "sim")  # without --json: stderr only
    assert rc != EXIT_OK and out == "" and "no-such-guest" in err
