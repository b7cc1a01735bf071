"""The lock on the rig itself (kvmharness/remote/lock.py), against a real sshd in a network
namespace (remote_fixtures.py): two `rig run`s on one rig never overlap, a waiter names the
holder, --lock-timeout fails with one line naming it, `rig check` shows who holds it and
since when, and a killed client releases it.  Plus `rig check --json`'s health states."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote_fixtures import ROOT, run_cli  # ssh_lab, project_wheel: conftest.py


@pytest.fixture
def server(ssh_lab):
    s = ssh_lab.start_sshd()
    ssh_lab.pin_host_key(s.port)
    yield s
    if s.proc.poll() is None:
        s.kill()


@pytest.fixture
def rig(ssh_lab, server, tmp_path):
    """An inventory with one rig whose lock file is this test's own."""
    lock = tmp_path / "rig.lock"
    path = ssh_lab.inventory(tmp_path / "rigs.toml", {"box": {"port": server.port, "lock_file": str(lock)}})
    return str(path), lock


def _start_run(inventory, wheel, results, *command, extra=()):
    return subprocess.Popen([sys.executable, "-m", "kvmharness", "rig", "run", "--inventory", inventory,
                             "--wheel", str(wheel), "--results", str(results), "--plain", *extra,
                             "--", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def _summary(results: Path) -> dict:
    (run_dir,) = [d for d in results.iterdir() if d.is_dir()]
    return json.loads((run_dir / "summary.json").read_text())


def _check(inventory, wheel) -> dict:
    p = run_cli("rig", "check", "--inventory", inventory, "--wheel", str(wheel), "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)["box"]


def test_two_runs_on_one_rig_never_overlap_and_the_second_names_the_holder(rig, project_wheel, tmp_path):
    inventory, _ = rig
    stamps, release = tmp_path / "stamps", tmp_path / "release"
    # Each run records when its command started and ended (this machine is the rig); the
    # first holds on until the second has said that it waits.
    cmd = ("sh", "-c", f"echo start $(date +%s.%N) $PPID >> {stamps}; "
                       f"for i in $(seq 600); do [ -e {release} ] && break; sleep 0.1; done; "
                       f"echo end $(date +%s.%N) $PPID >> {stamps}")
    first = _start_run(inventory, project_wheel, tmp_path / "r1", *cmd)
    _wait_for(stamps)  # the first holds the rig now
    second = _start_run(inventory, project_wheel, tmp_path / "r2", *cmd)
    seen = []
    for line in second.stdout:
        seen.append(line.rstrip("\n"))
        if "waiting for the rig's lock" in line:
            break
    release.touch()
    out1, _ = first.communicate(timeout=120)
    out2, _ = second.communicate(timeout=120)
    assert first.returncode == 0, out1
    assert second.returncode == 0, "\n".join(seen) + out2
    # The second waited, saying for whom: the first client's user@host and pid.
    waiting = seen[-1]
    assert "waiting for the rig's lock" in waiting, seen
    assert f"pid {first.pid}," in waiting and "@" in waiting and "since" in waiting
    events = [line.split() for line in stamps.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end", "start", "end"]
    assert events[0][2] == events[1][2] and events[2][2] == events[3][2] != events[0][2]
    assert float(events[1][1]) <= float(events[2][1])  # the second began after the first ended
    rec1 = _summary(tmp_path / "r1")["rigs"][0]
    rec2 = _summary(tmp_path / "r2")["rigs"][0]
    assert rec1["lock"]["pid"] == first.pid and rec2["lock"]["pid"] == second.pid
    assert rec2["lock"]["since"] >= rec1["lock"]["since"]
    assert rec2["lock_waited"] > rec1["lock_waited"]


def test_lock_timeout_names_the_holder_and_rig_check_shows_it(rig, project_wheel, tmp_path):
    inventory, lock = rig
    started, release = tmp_path / "started", tmp_path / "release"
    holder = _start_run(inventory, project_wheel, tmp_path / "r1", "sh", "-c",
                        f"touch {started}; for i in $(seq 600); do [ -e {release} ] && exit 0; sleep 0.1; done")
    try:
        _wait_for(started)
        t_started = time.time()
        box = _check(inventory, project_wheel)
        assert box["state"] == "busy", box
        assert box["lock"]["held"] and box["lock"]["file"] == str(lock)
        assert box["lock"]["holder"]["pid"] == holder.pid
        assert "rig run --inventory" in box["lock"]["holder"]["command"]
        assert box["lock"]["holder"]["since"] <= t_started
        assert str(holder.pid) in box["reason"]
        # The table says it too.
        p = run_cli("rig", "check", "--inventory", inventory, "--wheel", str(project_wheel))
        assert f"lock {lock}: held by" in p.stdout and f"pid {holder.pid}," in p.stdout, p.stdout

        t0 = time.monotonic()
        late = run_cli("rig", "run", "--inventory", inventory, "--wheel", str(project_wheel), "--results",
                       str(tmp_path / "r2"), "--plain", "--lock-timeout", "2", "--", "true")
        assert time.monotonic() - t0 < 60
        assert late.returncode == 3, late.stdout + late.stderr
        (verdict,) = [line for line in late.stdout.splitlines() if line.startswith("box: ")]
        assert "locked by" in verdict and f"pid {holder.pid}," in verdict and "--lock-timeout" in verdict
        assert not list((tmp_path / "r2").glob("*/box/junit.xml"))
    finally:
        release.touch()
        out, _ = holder.communicate(timeout=120)
    assert holder.returncode == 0, out
    box = _check(inventory, project_wheel)
    assert box["state"] == "ready" and not box["lock"]["held"] and box["lock"]["holder"] is None


def test_a_killed_client_releases_the_lock(rig, project_wheel, tmp_path):
    inventory, _ = rig
    started = tmp_path / "started"
    doomed = _start_run(inventory, project_wheel, tmp_path / "r1", "sh", "-c", f"touch {started}; sleep 300")
    _wait_for(started)
    assert _check(inventory, project_wheel)["lock"]["holder"]["pid"] == doomed.pid
    doomed.send_signal(signal.SIGKILL)  # no cleanup of any kind on our side
    doomed.communicate(timeout=30)
    # The rig's sshd sees the connection close; the lock process gets EOF and exits.
    p = run_cli("rig", "run", "--inventory", inventory, "--wheel", str(project_wheel), "--results",
                str(tmp_path / "r2"), "--plain", "--lock-timeout", "30", "--", "sh", "-c", "echo got-it")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "got-it" in p.stdout
    rec = _summary(tmp_path / "r2")["rigs"][0]
    assert rec["lock"]["pid"] != doomed.pid
    # The killed run's leftovers on the "rig" (nobody was left to clean up): its sleep, its dir.
    (run_id,) = [d.name for d in (tmp_path / "r1").iterdir() if d.is_dir()]
    rdir = Path(f"/tmp/kvmharness-run-{run_id}-box")
    pgid = Path(f"{rdir}.pgid")
    if pgid.exists():  # its session: `timeout` put the command in a group of its own
        subprocess.run(["pkill", "-KILL", "-s", pgid.read_text().strip()], check=False)
    subprocess.run(["rm", "-rf", str(rdir), str(pgid)], check=False)


def test_unreachable_rig_state(ssh_lab, tmp_path, project_wheel):
    path = ssh_lab.inventory(tmp_path / "rigs.toml", {"gone": {"port": ssh_lab.unused_port()}})
    p = run_cli("rig", "check", "--inventory", str(path), "--wheel", str(project_wheel), "--json")
    assert p.returncode == 3
    gone = json.loads(p.stdout)["gone"]
    assert gone["state"] == "unreachable" and "refused" in gone["reason"]


def test_wrong_kernel_and_no_sev_states(ssh_lab, server, tmp_path, project_wheel):
    path = ssh_lab.inventory(tmp_path / "rigs.toml", {
        "old": {"port": server.port, "kernel": "2.6.*", "lock_file": str(tmp_path / "a.lock")},
        "sevbox": {"port": server.port, "labels": ["netns", "sev_es"], "lock_file": str(tmp_path / "b.lock")},
    })
    p = run_cli("rig", "check", "--inventory", str(path), "--wheel", str(project_wheel), "--json")
    doc = json.loads(p.stdout)
    assert doc["old"]["state"] == "wrong-kernel"
    assert os.uname().release in doc["old"]["reason"] and "2.6.*" in doc["old"]["reason"]
    # The remote is this machine: its SEV-ES verdict, probed there, decides.
    sev_es = doc["sevbox"]["info"]["verdicts"]["sev-es"]
    if sev_es["usable"]:
        assert doc["sevbox"]["state"] == "ready"
    else:
        assert doc["sevbox"]["state"] == "no-sev" and sev_es["why"] in doc["sevbox"]["reason"]


def test_inventory_power_lock_and_kernel_fields(tmp_path):
    from kvmharness.errors import UsageError
    from kvmharness.remote.inventory import parse_inventory
    from kvmharness.remote.lock import lock_path

    base = {"host": "127.0.0.1", "user": "ci", "key_file": "k"}
    (a, b) = parse_inventory({"rigs": {
        "a": base,
        "b": {**base, "lock_file": "/var/lock/epyc.lock", "power_cycle": "ipmitool chassis power cycle",
              "kernel": "6.1.*"}}}, tmp_path / "rigs.toml")
    assert (a.lock_file, a.power_cycle, a.kernel) == (None, None, None)
    assert lock_path(a) == "/tmp/kvmharness-rig-a.lock" and lock_path(b) == "/var/lock/epyc.lock"
    assert b.power_cycle == "ipmitool chassis power cycle" and b.kernel == "6.1.*"
    with pytest.raises(UsageError, match="lock_file.*absolute"):
        parse_inventory({"rigs": {"c": {**base, "lock_file": "rel.lock"}}}, tmp_path / "rigs.toml")
    with pytest.raises(UsageError, match="power_cycle"):
        parse_inventory({"rigs": {"c": {**base, "power_cycle": ""}}}, tmp_path / "rigs.toml")


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf", "86401", "x"])
def test_lock_and_hang_timeouts_are_bounded(bad):
    for opt in ("--lock-timeout", "--hang-timeout", "--power-timeout"):
        p = run_cli("rig", "run", "--inventory", "/nonexistent", opt, bad, "--", "true")
        assert p.returncode == 2, (opt, bad, p.stderr)
        assert opt in p.stderr


def test_a_lock_that_cannot_be_taken_fails_that_rig(ssh_lab, server, tmp_path, project_wheel):
    path = ssh_lab.inventory(tmp_path / "rigs.toml", {
        "box": {"port": server.port, "lock_file": str(tmp_path / "no-such-dir" / "rig.lock")}})
    p = run_cli("rig", "run", "--inventory", str(path), "--wheel", str(project_wheel), "--results",
                str(tmp_path / "r"), "--plain", "--", "sh", "-c", "echo should-not-run")
    assert p.returncode == 3, p.stdout + p.stderr
    (verdict,) = [line for line in p.stdout.splitlines() if line.startswith("box: ")]
    assert "cannot take the rig's lock" in verdict and "no-such-dir" in verdict
    assert "should-not-run" not in p.stdout
