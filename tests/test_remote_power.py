"""A rig that stops answering (its whole sshd frozen with SIGSTOP, as a hung host looks
from outside: the kernel still ACKs TCP, nothing answers), found by the SSH ping of
`rig run`; with --power-cycle-on-hang its inventory `power_cycle` command runs here
(in the test: kill the frozen tree, start a fresh sshd on the same port, as a reboot
would), the run waits for SSH, cleans up, marks that rig "power-cycled after hang" and
the other rig's run finishes normally.  Timings are printed (-s), never asserted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from remote_fixtures import ROOT, SSHD, _descendants, run_cli  # ssh_lab, project_wheel: conftest.py

HANG_TIMEOUT = "8"  # a loaded CI machine must not look hung


def _freeze(pid: int) -> list[int]:
    pids = _descendants(pid)
    for p in pids:
        try:
            os.kill(p, signal.SIGSTOP)
        except ProcessLookupError:
            pass
    return pids


@pytest.fixture
def two_rigs(ssh_lab, tmp_path):
    hung, steady = ssh_lab.start_sshd(), ssh_lab.start_sshd()
    for s in (hung, steady):
        ssh_lab.pin_host_key(s.port)
    frozen = tmp_path / "frozen.pids"
    new_pid = tmp_path / "restarted.pid"
    power = tmp_path / "power-cycle.sh"
    # The "power cycle": everything of the old sshd dies (SIGKILL reaches stopped
    # processes), and after a moment a new sshd listens on the same port.
    power.write_text(
        "#!/bin/sh\nset -e\n"
        f"kill -KILL $(cat {frozen}) 2>/dev/null || true\n"
        "sleep 1\n"
        f"setsid ip netns exec {ssh_lab.ns} {SSHD} -D -e -f {ssh_lab.tmp}/sshd_{hung.port}.conf "
        f">{tmp_path}/restarted.log 2>&1 </dev/null &\n"
        f"echo $! > {new_pid}\n")
    power.chmod(0o755)
    inv = ssh_lab.inventory(tmp_path / "rigs.toml", {
        "hung": {"port": hung.port, "power_cycle": str(power), "lock_file": str(tmp_path / "hung.lock")},
        "steady": {"port": steady.port, "lock_file": str(tmp_path / "steady.lock")},
    })
    yield str(inv), hung, frozen, new_pid
    for s in (hung, steady):
        if s.proc.poll() is None:
            s.kill()
    if new_pid.exists():
        for p in _descendants(int(new_pid.read_text())):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _run_and_freeze(inv, wheel, results, hung, frozen, *extra):
    cmd = [sys.executable, "-m", "kvmharness", "rig", "run", "--inventory", inv, "--wheel", str(wheel),
           "--results", str(results), "--plain", "--hang-timeout", HANG_TIMEOUT, *extra, "--",
           "sh", "-c", "echo started; sleep 12; echo finished"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines, t_freeze = [], None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if t_freeze is None and line.startswith("[hung] started"):
            frozen.write_text(" ".join(map(str, _freeze(hung.proc.pid))))
            t_freeze = time.monotonic()
    proc.wait(timeout=300)
    t_end = time.monotonic()
    (run_dir,) = [d for d in results.iterdir() if d.is_dir()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return proc.returncode, lines, {r["rig"]: r for r in summary["rigs"]}, t_freeze, t_end, run_dir


def test_power_cycle_on_hang_recovers_the_rig_and_the_others_finish(two_rigs, project_wheel, tmp_path):
    inv, hung, frozen, new_pid = two_rigs
    status, lines, by, t_freeze, t_end, run_dir = _run_and_freeze(
        inv, project_wheel, tmp_path / "r", hung, frozen, "--power-cycle-on-hang", "--power-timeout", "60")
    out = "\n".join(lines)
    assert t_freeze is not None, out
    assert status == 3, out
    assert by["steady"]["status"] == 0, out
    assert "[steady] finished" in out
    h = by["hung"]
    assert h["status"] == 3 and h["reason"].startswith("power-cycled after hang"), h
    assert h["hang"]["power_cycled"] and h["hang"]["phase"] == "running"
    assert h["remote_dir_removed"]  # cleaned up over the new sshd
    assert new_pid.exists()  # the power command really ran
    assert f"hung: exit 3" in out and "power-cycled after hang" in out
    assert not Path(f"/tmp/kvmharness-run-{run_dir.name}-hung").exists()
    # The rig is usable again, and its lock is free (the old holder died with the old sshd).
    p = run_cli("rig", "check", "--inventory", inv, "--rig", "hung", "--wheel", str(project_wheel), "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["hung"]["state"] == "ready"
    print(f"\nforced hang: detected and power-cycled; rig answering again {h['hang']['recovered_in']:.1f} s "
          f"after the power command; whole run ended {t_end - t_freeze:.1f} s after the freeze "
          f"(hang timeout {HANG_TIMEOUT} s, silent for {h['hang']['silent_for']:.1f} s)")


def test_hang_without_power_cycle_is_reported_with_the_hint(two_rigs, project_wheel, tmp_path):
    inv, hung, frozen, new_pid = two_rigs
    status, lines, by, t_freeze, t_end, run_dir = _run_and_freeze(inv, project_wheel, tmp_path / "r", hung, frozen)
    # Nobody could clean up on the frozen "rig" (this machine): its run directory stays.
    subprocess.run(["rm", "-rf", f"/tmp/kvmharness-run-{run_dir.name}-hung",
                    f"/tmp/kvmharness-run-{run_dir.name}-hung.pgid"], check=False)
    out = "\n".join(lines)
    assert t_freeze is not None, out
    assert status == 3 and by["steady"]["status"] == 0, out
    h = by["hung"]
    assert "stopped answering" in h["reason"] and "--power-cycle-on-hang would" in h["reason"], h
    assert h["hang"] and not h["hang"]["power_cycled"] and not h["remote_dir_removed"]
    assert not new_pid.exists()  # nothing was power-cycled
    # Found by the ping, long before the run's own timeout (1800 s).
    assert t_end - t_freeze < 120
    print(f"\nforced hang without power cycling: reported {t_end - t_freeze:.1f} s after the freeze")
