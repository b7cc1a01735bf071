"""Remote rigs, pure logic: the inventory, rig selection, exit status, the
remote command line, the capability matrix, the progress lines.  No SSH."""

from __future__ import annotations

import io
import shlex
from pathlib import Path

import pytest

from kvmharness.errors import UsageError
from kvmharness.remote.inventory import inventory_path, load_inventory, select_rigs
from kvmharness.remote.progress import Progress
from kvmharness.remote.rig import RigResult, format_matrix, remote_command, worst_status

GOOD = """
[rigs.milan-1]
host = "10.1.2.3"
user = "ci"
key_file = "keys/rig"
labels = ["milan", "sev-es"]

[rigs.rome-2]
host = "rome2.lab"
port = 2222
user = "root"
key_file = "/abs/key"
python = "/opt/py/bin/python3"
known_hosts = "~/lab_known_hosts"
labels = ["rome"]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "rigs.toml"
    p.write_text(text)
    return p


def test_inventory_fields_defaults_and_paths(tmp_path):
    rigs = load_inventory(write(tmp_path, GOOD))
    a, b = rigs
    assert (a.name, a.host, a.port, a.user, a.python) == ("milan-1", "10.1.2.3", 22, "ci", "python3")
    assert a.key_file == tmp_path / "keys" / "rig"  # relative to the inventory file
    assert a.labels == ("milan", "sev-es") and a.known_hosts is None
    assert (b.port, b.python, b.key_file) == (2222, "/opt/py/bin/python3", Path("/abs/key"))
    assert b.known_hosts == Path.home() / "lab_known_hosts"
    assert b.address == "root@rome2.lab:2222"


@pytest.mark.parametrize("body, words", [
    ('host = "h"\nuser = "u"', ["rig 'r1'", "'key_file'", "missing"]),
    ('host = "h"\nkey_file = "k"', ["rig 'r1'", "'user'", "missing"]),
    ('host = "h"\nuser = "u"\nkey_file = "k"\nport = "22"', ["rig 'r1'", "'port'", "1-65535"]),
    ('host = "h"\nuser = "u"\nkey_file = "k"\nport = 70000', ["'port'"]),
    ('host = "h"\nuser = "u"\nkey_file = "k"\nlabels = "sev"', ["'labels'", "list of strings"]),
    ('host = ""\nuser = "u"\nkey_file = "k"', ["'host'", "non-empty"]),
    ('host = "h"\nuser = "u"\nkey_file = "k"\nhostname = "x"', ["unknown field", "hostname"]),
])
def test_inventory_errors_name_rig_and_field(tmp_path, body, words):
    with pytest.raises(UsageError) as ei:
        load_inventory(write(tmp_path, f"[rigs.r1]\n{body}\n"))
    for w in words:
        assert w in str(ei.value)
    assert str(tmp_path / "rigs.toml") in str(ei.value)


@pytest.mark.parametrize("text, words", [
    ("", ["defines no rigs"]),
    ("[rigz.a]\nhost='h'", ["unknown top-level", "rigz"]),
    ("[rigs\nhost=", ["not valid TOML"]),
    ('[rigs."bad name"]\nhost="h"', ["'bad name'", "letters"]),
])
def test_inventory_file_level_errors(tmp_path, text, words):
    with pytest.raises(UsageError) as ei:
        load_inventory(write(tmp_path, text))
    for w in words:
        assert w in str(ei.value)


def test_inventory_missing_file_and_path_sources(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match="does not exist"):
        load_inventory(tmp_path / "nope.toml")
    monkeypatch.delenv("KVMHARNESS_RIGS", raising=False)
    with pytest.raises(UsageError, match="KVMHARNESS_RIGS"):
        inventory_path(None)
    monkeypatch.setenv("KVMHARNESS_RIGS", "/from/env.toml")
    assert inventory_path(None) == Path("/from/env.toml")
    assert inventory_path("/from/option.toml") == Path("/from/option.toml")


def test_select_by_name_and_label(tmp_path):
    rigs = load_inventory(write(tmp_path, GOOD))
    assert [r.name for r in select_rigs(rigs, None)] == ["milan-1", "rome-2"]
    assert [r.name for r in select_rigs(rigs, ["sev-es"])] == ["milan-1"]
    assert [r.name for r in select_rigs(rigs, ["rome-2", "milan", "rome"])] == ["rome-2", "milan-1"]
    with pytest.raises(UsageError, match="'genoa' matches no rig"):
        select_rigs(rigs, ["genoa"])


def test_worst_status_orders_rig_outcomes():
    assert worst_status([]) == 0
    assert worst_status([0, 0]) == 0
    assert worst_status([0, 5]) == 5          # no tests collected: worse than success only
    assert worst_status([5, 1, 0]) == 1       # failed tests beat "no tests"
    assert worst_status([1, 3]) == 3          # an unusable rig beats failed tests
    assert worst_status([3, 4, 1]) == 4       # a timeout beats both
    assert worst_status([4, 130]) == 130      # interrupted is the worst


def test_remote_command_pytest_gets_venv_python_and_junit():
    cmd = remote_command(["pytest", "-m", "requires_svm", "-k", "a b"], "/tmp/kvmharness-run-x",
                         "kvm", 100)
    argv = shlex.split(cmd)
    assert argv[:3] == ["cd", "/tmp/kvmharness-run-x/src", "&&"]
    assert "KVMHARNESS_BACKEND=kvm" in argv
    i = argv.index("timeout")
    assert argv[i + 1:i + 4] == ["-k", "10", "101"]
    assert argv[i + 4:i + 7] == ["/tmp/kvmharness-run-x/venv/bin/python", "-m", "pytest"]
    assert ["-m", "requires_svm", "-k", "a b"] == argv[i + 7:i + 11]
    assert "--junitxml=/tmp/kvmharness-run-x/results/junit.xml" in argv


def test_remote_command_other_commands_run_as_given():
    argv = shlex.split(remote_command(["sh", "-c", "exit 3"], "/r", "sim", 5))
    assert argv[-3:] == ["sh", "-c", "exit 3"] and "KVMHARNESS_BACKEND=sim" in argv
    with pytest.raises(UsageError, match="needs a command"):
        remote_command([], "/r", "sim", 5)


INFO = {
    "kvm": {"present": True, "accessible": True, "api_version": 12},
    "cpu": {"vendor": "AuthenticAMD", "family": 25, "model": 1, "model_name": "AMD EPYC 7713",
            "svm_flag": True},
    "kernel": "6.1.0-56-amd64", "kvm_amd": {"npt": "Y", "sev": "Y"}, "nested": True, "npt": True,
    "sev_device": {"present": True, "api_version": "1.55"},
    "verdicts": {"svm": {"usable": True, "why": ""}, "sev": {"usable": True, "why": ""},
                 "sev-es": {"usable": False, "why": "kvm_amd sev_es=N"},
                 "sev-snp": {"usable": False, "why": "no SNP firmware"}},
}


def test_capability_matrix():
    out = format_matrix([RigResult("milan-1", info=INFO), RigResult("dead", status=3, reason="unreachable: x")])
    lines = out.splitlines()
    assert lines[0].split() == ["RIG", "KVM", "SVM", "NPT", "SEV", "SEV-ES", "SEV-SNP", "KERNEL", "CPU",
                                "FW", "API"]
    assert lines[1].split() == ["milan-1", "yes", "yes", "yes", "yes", "no", "no", "6.1.0-56-amd64",
                                "AMD", "EPYC", "7713", "1.55"]
    assert lines[2].split(None, 2) == ["dead", "UNAVAILABLE:", "unreachable: x"]
    assert "milan-1: no sev-es: kvm_amd sev_es=N" in out


def test_progress_plain_lines_name_the_rig():
    buf = io.StringIO()
    p = Progress(["a", "bb"], live=False, stream=buf)
    p.phase("a", "running")
    p.line("bb", "tests/test_x.py ..  [ 50%]")
    p.done("a", 0, "")
    p.done("bb", 1, "tests failed")
    p.close()
    lines = buf.getvalue().splitlines()
    assert lines[0] == "[a] running"
    assert lines[1] == "[bb] tests/test_x.py ..  [ 50%]"
    assert lines[2].startswith("[a] ok after ")
    assert lines[3].startswith("[bb] FAILED (exit 1) after ") and lines[3].endswith(": tests failed")
    assert p.state["bb"]["pct"] == "50%"


def test_progress_live_redraws_one_line_per_rig():
    buf = io.StringIO()
    p = Progress(["a", "b"], live=True, stream=buf)
    p.line("a", "collecting")
    p.message("note")
    p.close()
    out = buf.getvalue()
    assert "\x1b[2A" in out                      # moved back up over the two rig lines
    assert "note\n" in out
    last_frame = out.rsplit("\x1b[2A", 1)[1]
    assert [l.split()[0] for l in last_frame.replace("\x1b[2K", "").splitlines()] == ["a", "b"]
