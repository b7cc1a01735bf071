"""Remote rigs against a real OpenSSH server (Debian's sshd in a network
namespace, see remote_fixtures.py): `rig check` and `rig run` through the real
CLI, and each fault a rig can have: nothing listening, an unknown or changed
host key, a refused user key, a failing command, the server killed mid-run,
a timeout, Ctrl-C."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from remote_fixtures import NS_ADDR, ROOT, run_cli  # ssh_lab, project_wheel: conftest.py


def _pgrp_members(pgid: int) -> list[int]:
    out = []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(e))
    return out


@pytest.fixture
def server(ssh_lab):
    s = ssh_lab.start_sshd()
    ssh_lab.pin_host_key(s.port)
    yield s
    if s.proc.poll() is None:
        s.kill()


@pytest.fixture
def inv(ssh_lab, tmp_path):
    return lambda rigs: str(ssh_lab.inventory(tmp_path / "rigs.toml", rigs))


def _summary(results: Path) -> dict:
    (run_dir,) = [d for d in results.iterdir() if d.is_dir()]
    return json.loads((run_dir / "summary.json").read_text())


def test_rig_check_ships_the_package_and_prints_the_matrix(server, inv, project_wheel):
    path = inv({"box": {"port": server.port, "labels": ["netns", "pvm"]}})
    before = set(Path("/tmp").glob("kvmharness-run-*-box"))  # a killed earlier run's leftovers
    p = run_cli("rig", "check", "--inventory", path, "--rig", "pvm", "--ship", "--wheel", str(project_wheel),
                "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    box = doc["box"]
    assert box["ok"] and box["error"] is None
    assert box["capabilities"]["kernel"] == platform.release()  # the remote is this machine
    assert set(box["info"]["verdicts"]) >= {"svm", "sev", "sev-es", "sev-snp"}
    assert set(Path("/tmp").glob("kvmharness-run-*-box")) <= before  # the remote dir is gone
    # Without --ship: the rig's own kvmharness if its python has one, else shipped.
    p = run_cli("rig", "check", "--inventory", path, "--wheel", str(project_wheel))
    assert p.returncode == 0, p.stderr
    header, row = p.stdout.splitlines()[:2]
    assert header.split()[:7] == ["RIG", "KVM", "SVM", "NPT", "SEV", "SEV-ES", "SEV-SNP"]
    assert row.split()[0] == "box"


def test_rig_run_brings_home_junit_and_removes_the_remote_dir(server, inv, project_wheel, tmp_path):
    path = inv({"box": {"port": server.port}})
    results = tmp_path / "results"
    p = run_cli("rig", "run", "--inventory", path, "--wheel", str(project_wheel), "--results", str(results),
                "--plain", "--backend", "sim", "--", "pytest", "-q", "tests/test_remote_inventory.py",
                "-k", "worst_status or select_by_name")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "[box] running" in p.stdout and "2 passed" in p.stdout
    summary = _summary(results)
    (rig,) = summary["rigs"]
    assert rig["status"] == 0 and rig["remote_dir_removed"]
    run_dir = results / summary["run_id"] / "box"
    suite = ET.parse(run_dir / "junit.xml").getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "0", "0")
    assert "2 passed" in (run_dir / "output.log").read_text()
    assert not Path(f"/tmp/kvmharness-run-{summary['run_id']}-box").exists()
    # --json: the summary alone on stdout, the progress on stderr
    p = run_cli("rig", "run", "--inventory", path, "--wheel", str(project_wheel), "--results", str(results),
                "--json", "--backend", "sim", "--", "sh", "-c", "echo hello from the rig")
    assert p.returncode == 0, p.stdout + p.stderr
    doc = json.loads(p.stdout)
    assert doc["status"] == 0 and [r["rig"] for r in doc["rigs"]] == ["box"]
    assert Path(doc["results"], "summary.json").is_file() and "hello from the rig" in p.stderr


def test_failing_command_and_dead_rig_each_reported_while_others_carry_on(server, ssh_lab, inv,
                                                                            project_wheel, tmp_path):
    path = inv({"good": {"port": server.port}, "dead": {"port": ssh_lab.unused_port()}})
    results = tmp_path / "results"
    p = run_cli("rig", "run", "--inventory", path, "--wheel", str(project_wheel), "--results", str(results),
                "--plain", "--backend", "kvm", "--", "sh", "-c", "echo backend=$KVMHARNESS_BACKEND; exit 7")
    assert p.returncode == 7, p.stdout + p.stderr  # worst: the command's 7 beats the dead rig's 3
    assert "[good] backend=kvm" in p.stdout
    rigs = {r["rig"]: r for r in _summary(results)["rigs"]}
    assert rigs["good"]["status"] == 7 and rigs["good"]["remote_dir_removed"]
    assert rigs["dead"]["status"] == 3
    assert "connection refused" in rigs["dead"]["reason"] and f"{NS_ADDR}:" in rigs["dead"]["reason"]
    assert "dead: exit 3" in p.stdout and "good: exit 7" in p.stdout


def _connect(ssh_lab, port, **over):
    from kvmharness.remote.inventory import Rig
    from kvmharness.remote.ssh import RigConnection

    fields = dict(name="r", host=NS_ADDR, port=port, user="root", key_file=ssh_lab.user_key,
                  python=sys.executable, labels=(), known_hosts=ssh_lab.known_hosts)
    accept = over.pop("accept_new", False)
    fields.update(over)
    return RigConnection(Rig(**fields), accept_new_host_keys=accept, connect_timeout=5)


def test_unknown_host_key_refused_unless_accept_new(ssh_lab, tmp_path):
    from kvmharness.remote.ssh import RigError

    s = ssh_lab.start_sshd()
    known = tmp_path / "empty_known_hosts"
    known.write_text("")
    with pytest.raises(RigError) as ei:
        _connect(ssh_lab, s.port, known_hosts=known).open()
    msg = str(ei.value)
    assert "unknown host key ssh-ed25519 SHA256:" in msg and "--accept-new-host-keys" in msg
    fp = subprocess.run(["ssh-keygen", "-lf", str(ssh_lab.host_key) + ".pub"], capture_output=True,
                        text=True).stdout.split()[1]
    assert fp in msg  # the same fingerprint `ssh-keygen -l` shows
    with _connect(ssh_lab, s.port, known_hosts=known, accept_new=True) as c:
        assert c.output("echo hi") == (0, "hi", "")
    assert known.read_text().startswith(f"[{NS_ADDR}]:{s.port} ssh-ed25519 ")
    with _connect(ssh_lab, s.port, known_hosts=known) as c:  # now known: no flag needed
        assert c.output("echo again")[1] == "again"
    s.kill()


def test_changed_host_key_refused_even_with_accept_new(ssh_lab):
    from kvmharness.remote.ssh import RigError

    s = ssh_lab.start_sshd(host_key=ssh_lab.other_host_key)  # an impostor on a pinned address
    ssh_lab.pin_host_key(s.port)
    for accept in (False, True):
        with pytest.raises(RigError, match="host key MISMATCH"):
            _connect(ssh_lab, s.port, accept_new=accept).open()
    s.kill()


def test_refused_user_key_and_missing_key_file(server, ssh_lab, tmp_path):
    from kvmharness.remote.ssh import RigError

    with pytest.raises(RigError) as ei:
        _connect(ssh_lab, server.port, key_file=ssh_lab.stranger_key).open()
    assert "authentication failed" in str(ei.value) and "stranger_ed25519" in str(ei.value)
    assert "BEGIN" not in str(ei.value)  # a key's name, never its content
    with pytest.raises(RigError, match="does not exist"):
        _connect(ssh_lab, server.port, key_file=tmp_path / "nokey").open()


def test_server_killed_mid_run_fails_that_rig_only(ssh_lab, inv, project_wheel, tmp_path):
    from kvmharness.remote.inventory import load_inventory
    from kvmharness.remote.progress import Progress
    from kvmharness.remote.rig import RunOptions, run_on_rigs

    doomed, steady = ssh_lab.start_sshd(), ssh_lab.start_sshd()
    for s in (doomed, steady):
        ssh_lab.pin_host_key(s.port)
    rigs = load_inventory(Path(inv({"doomed": {"port": doomed.port}, "steady": {"port": steady.port}})))
    release = tmp_path / "release"
    # Both rigs print "started" and wait for the release file (the remote is
    # this machine); the test kills doomed's sshd once doomed has started.
    script = f"echo started; for i in $(seq 300); do [ -e {release} ] && exit 0; sleep 0.1; done; exit 9"
    started = threading.Event()

    class Watch(Progress):
        def line(self, rig, text):
            super().line(rig, text)
            if rig == "doomed" and text == "started" and not started.is_set():
                started.set()
                doomed.kill()
                time.sleep(0.5)
                release.touch()

    opts = RunOptions(command=["sh", "-c", script], backend="sim", timeout=120, results_dir=tmp_path / "r")
    status, results = run_on_rigs(rigs, opts, wheel=project_wheel,
                                  progress=Watch(["doomed", "steady"], live=False, echo_lines=False))
    by = {r.rig: r for r in results}
    assert started.is_set()
    assert by["steady"].status == 0 and by["steady"].cleaned
    assert by["doomed"].status == 3 and "connection dropped" in by["doomed"].reason
    assert not by["doomed"].cleaned  # nobody left to clean up with: said so, not hidden
    assert status == 3
    for d in Path("/tmp").glob("kvmharness-run-*-doomed*"):  # leftovers of the killed "rig"
        subprocess.run(["rm", "-rf", str(d)])


def _start_cli_run(path, wheel, results, *command):
    return subprocess.Popen([sys.executable, "-m", "kvmharness", "rig", "run", "--inventory", path,
                             "--wheel", str(wheel), "--results", str(results), "--plain", "--", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_for_line(proc, needle, timeout=60.0) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip("\n"))
        if needle in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {needle!r}: {seen}")


def test_ctrl_c_kills_the_remote_command_and_cleans_up(server, inv, project_wheel, tmp_path):
    path = inv({"box": {"port": server.port}})
    proc = _start_cli_run(path, project_wheel, tmp_path / "r", "sh", "-c", "echo started; sleep 120")
    seen = _wait_for_line(proc, "[box] started")
    run_id = next(l.split()[1].rstrip(":") for l in seen if l.startswith("run "))
    rdir = Path(f"/tmp/kvmharness-run-{run_id}-box")
    pgid = int(Path(f"{rdir}.pgid").read_text())
    assert _pgrp_members(pgid)  # the remote sleep is running
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert not _pgrp_members(pgid)
    assert not rdir.exists() and not Path(f"{rdir}.pgid").exists()


def test_timeout_kills_the_remote_command(server, inv, project_wheel, tmp_path):
    path = inv({"box": {"port": server.port}})
    proc = subprocess.run([sys.executable, "-m", "kvmharness", "rig", "run", "--inventory", path, "--wheel",
                           str(project_wheel), "--results", str(tmp_path / "r2"), "--plain", "--timeout", "8",
                           "--", "sh", "-c", "echo started; sleep 120"],
                          capture_output=True, text=True, cwd=ROOT, timeout=90)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    (rig,) = _summary(tmp_path / "r2")["rigs"]
    assert "timed out" in rig["reason"] or "did not finish" in rig["reason"]
    assert rig["remote_dir_removed"]


def test_all_output_arrives_in_order_with_the_exit_status(server, ssh_lab):
    with _connect(ssh_lab, server.port) as c:
        status, out, err = c.output("seq 1 50000; echo to-stderr >&2; exit 3")
    assert status == 3
    assert out.split("\n") == [str(i) for i in range(1, 50001)]
    assert err == "to-stderr"
