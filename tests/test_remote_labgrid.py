"""`rig run --labgrid` against a real labgrid coordinator and exporter, started here on
loopback only (127.0.0.1), with one place whose NetworkService is a real sshd in this
session's network namespace (remote_fixtures.py).  The place is reserved by tag, acquired
for the run and released on success, failure and Ctrl-C; a place another user holds is
waited for with a line naming the holder.  Skipped, with the reason, where labgrid is not
installed; the missing-labgrid message is tested everywhere."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from remote_fixtures import NS_ADDR, ROOT, run_cli  # ssh_lab, project_wheel: conftest.py

PLACE = "kvmh-lg-box"
EXPORTER = "kvmh-exporter"
GROUP = "kvmh-rig"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"labgrid-coordinator did not start: {log.read_text()[-800:]}") from None
            time.sleep(0.1)


class Lab:
    def __init__(self, address: str, bindir: Path, tmp: Path):
        self.address = address
        self.bindir = bindir
        self.tmp = tmp

    def client(self, *args: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, **({"LG_USERNAME": user} if user else {})}
        p = subprocess.run([str(self.bindir / "labgrid-client"), "-x", self.address, *args],
                           capture_output=True, text=True, timeout=60, env=env)
        if check and p.returncode != 0:
            raise AssertionError(f"labgrid-client {' '.join(args)}: {p.stdout} {p.stderr}")
        return p

    def acquired_by(self) -> str:
        out = self.client("-p", PLACE, "show").stdout
        line = next(l for l in out.splitlines() if l.strip().startswith("acquired:"))
        return line.split(":", 1)[1].strip()

    def reservations(self) -> str:
        return self.client("reservations").stdout.strip()


@pytest.fixture(scope="module")
def lab(ssh_lab, tmp_path_factory):
    pytest.importorskip("labgrid", reason="labgrid is not installed (pip install -e '.[labgrid]')")
    bindir = Path(sys.executable).parent
    for tool in ("labgrid-coordinator", "labgrid-exporter", "labgrid-client"):
        if not (bindir / tool).exists():
            pytest.skip(f"{tool} is not beside {sys.executable} (labgrid installed elsewhere)")
    tmp = tmp_path_factory.mktemp("labgrid")
    server = ssh_lab.start_sshd()
    ssh_lab.pin_host_key(server.port)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs = []
    try:
        log = tmp / "coordinator.log"
        with open(log, "w") as out:
            coord = subprocess.Popen([str(bindir / "labgrid-coordinator"), "-l", address], cwd=tmp,
                                     stdout=out, stderr=subprocess.STDOUT)
        procs.append(coord)
        _wait_port(port, coord, log)
        (tmp / "exporter.yaml").write_text(
            f"{GROUP}:\n  NetworkService:\n    address: '{NS_ADDR}'\n    username: root\n    port: {server.port}\n")
        elog = tmp / "exporter.log"
        with open(elog, "w") as out:
            procs.append(subprocess.Popen([str(bindir / "labgrid-exporter"), "-c", address, "-n", EXPORTER,
                                           "--hostname", "127.0.0.1", str(tmp / "exporter.yaml")], cwd=tmp,
                                          stdout=out, stderr=subprocess.STDOUT))
        lab = Lab(address, bindir, tmp)
        deadline = time.monotonic() + 30
        while f"{EXPORTER}/{GROUP}/NetworkService" not in lab.client("resources").stdout:
            assert time.monotonic() < deadline, elog.read_text()[-800:]
            time.sleep(0.2)
        lab.client("-p", PLACE, "create")
        lab.client("-p", PLACE, "add-match", f"{EXPORTER}/{GROUP}/NetworkService")
        lab.client("-p", PLACE, "set-tags", "sev_es=1", "site=netns")
        lab.ssh = ssh_lab
        lab.server = server
        yield lab
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        if server.proc.poll() is None:
            server.kill()


def _lg_args(lab, wheel, results, *extra):
    return ["rig", "run", "--labgrid", lab.address, "--tag", "sev_es=1", "--ssh-key", str(lab.ssh.user_key),
            "--known-hosts", str(lab.ssh.known_hosts), "--python", sys.executable, "--wheel", str(wheel),
            "--results", str(results), "--plain", *extra]


def test_labgrid_run_reserves_runs_there_and_releases(lab, project_wheel, tmp_path):
    t0 = time.monotonic()
    p = run_cli(*_lg_args(lab, project_wheel, tmp_path / "r"), "--", "sh", "-c", "echo on-the-place $(hostname)")
    t_lg = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"labgrid: acquired {PLACE} (sev_es=1)" in p.stdout
    assert f"[{PLACE}] on-the-place" in p.stdout
    assert f"labgrid: released {PLACE}" in p.stdout
    assert lab.acquired_by() == "None"
    assert lab.reservations() == ""
    timing = next(l for l in p.stdout.splitlines() if l.startswith("labgrid: connect"))
    # The same command over the plain SSH path (an inventory naming the same sshd).
    inv = lab.ssh.inventory(tmp_path / "rigs.toml", {PLACE: {"port": lab.server.port}})
    t0 = time.monotonic()
    q = run_cli("rig", "run", "--inventory", str(inv), "--wheel", str(project_wheel), "--results",
                str(tmp_path / "r2"), "--plain", "--", "sh", "-c", "echo on-the-place $(hostname)")
    t_ssh = time.monotonic() - t0
    assert q.returncode == 0, q.stdout + q.stderr
    print(f"\nreserve+ship+run through labgrid: {t_lg:.2f} s ({timing}); plain SSH path: {t_ssh:.2f} s")


def test_labgrid_failure_still_releases(lab, project_wheel, tmp_path):
    p = run_cli(*_lg_args(lab, project_wheel, tmp_path / "r"), "--", "sh", "-c", "exit 1")
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"labgrid: released {PLACE}" in p.stdout
    assert lab.acquired_by() == "None" and lab.reservations() == ""


def test_labgrid_waits_for_a_place_another_user_holds(lab, project_wheel, tmp_path):
    lab.client("-p", PLACE, "acquire", user="alice")
    holder = lab.acquired_by()
    assert holder.endswith("/alice")
    try:
        # Given up after --lock-timeout, naming who holds the place.
        p = run_cli(*_lg_args(lab, project_wheel, tmp_path / "r1", "--lock-timeout", "3"), "--", "true")
        assert p.returncode == 3, p.stdout + p.stderr
        assert f"{PLACE} acquired by {holder}" in p.stderr.strip().splitlines()[-1]
        assert f"{PLACE} acquired by {holder}" in p.stdout  # the waiting line
        assert lab.reservations() == ""  # our reservation was cancelled
        # Released by alice 3 s into our wait: we get it and run.
        timer = threading.Timer(3.0, lambda: lab.client("-p", PLACE, "release", user="alice"))
        timer.start()
        p = run_cli(*_lg_args(lab, project_wheel, tmp_path / "r2", "--lock-timeout", "60"), "--",
                    "sh", "-c", "echo got-it")
        timer.join()
        assert p.returncode == 0, p.stdout + p.stderr
        assert "labgrid: waiting for 1 of 1 place(s) with sev_es=1" in p.stdout
        assert f"[{PLACE}] got-it" in p.stdout
    finally:
        if lab.acquired_by().endswith("/alice"):
            lab.client("-p", PLACE, "release", user="alice")
    assert lab.acquired_by() == "None"


def test_labgrid_ctrl_c_releases(lab, project_wheel, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "kvmharness",
                             *_lg_args(lab, project_wheel, tmp_path / "r"), "--", "sh", "-c",
                             "echo started; sleep 120"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"[{PLACE}] started" in line:
            break
    assert lab.acquired_by() != "None", seen
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, "".join(seen) + out
    assert f"labgrid: released {PLACE}" in out
    assert lab.acquired_by() == "None" and lab.reservations() == ""


def test_labgrid_no_matching_place_is_a_usage_error(lab, project_wheel, tmp_path):
    p = run_cli("rig", "run", "--labgrid", lab.address, "--tag", "sev_snp=1", "--ssh-key", str(lab.ssh.user_key),
                "--wheel", str(project_wheel), "--", "true")
    assert p.returncode == 2, p.stdout + p.stderr
    assert "no labgrid place" in p.stderr and PLACE in p.stderr and "sev_es=1" in p.stderr


def test_missing_labgrid_is_one_line_naming_what_to_install(tmp_path):
    key = tmp_path / "key"
    key.write_text("")
    code = ("import sys; sys.modules['labgrid'] = None; from kvmharness.cli import main; "
            f"sys.exit(main(['rig', 'run', '--labgrid', '127.0.0.1:1', '--tag', 'sev_es=1', '--ssh-key', "
            f"'{key}', '--', 'true']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 3, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "labgrid is not installed" in lines[0] and "pip install 'labgrid>=24'" in lines[0]


def test_labgrid_options_need_labgrid_and_a_key(tmp_path):
    p = run_cli("rig", "run", "--inventory", "/nonexistent", "--tag", "sev_es=1", "--", "true")
    assert p.returncode == 2 and "go with --labgrid" in p.stderr
    p = run_cli("rig", "run", "--labgrid", "127.0.0.1:1", "--tag", "sev_es=1", "--", "true")
    assert p.returncode == 2 and "--ssh-key" in p.stderr
    p = run_cli("rig", "run", "--labgrid", "127.0.0.1:1", "--tag", "SEV", "--ssh-key", "k", "--", "true")
    assert p.returncode == 2 and "KEY=VALUE" in p.stderr


def test_unreachable_coordinator_is_one_line(tmp_path):
    pytest.importorskip("labgrid", reason="labgrid is not installed (pip install -e '.[labgrid]')")
    p = run_cli("rig", "run", "--labgrid", f"127.0.0.1:{_free_port()}", "--tag", "sev_es=1", "--ssh-key",
                str(tmp_path / "k"), "--", "true", timeout=120)
    assert p.returncode == 3, p.stdout + p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "labgrid coordinator" in p.stderr
