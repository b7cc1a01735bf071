"""`rig run --labgrid` against a real labgrid coordinator and exporter, started here on
loopback only (127.0.0.1), with one place whose NetworkService is a real sshd in this
session's network namespace (remote_fixtures.py).  The place is reserved by tag, acquired
for the run and released on success, failure and Ctrl-C; a place another user holds is
waited for with a line naming the holder.  Skipped, with the reason, where labgrid is not
installed; the missing-labgrid message is tested everywhere."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from remote_fixtures import NS_ADDR, ROOT, SSHD, _descendants, run_cli  # ssh_lab, project_wheel: conftest.py

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
    def __init__(self, address: str, bindir: Path, tmp: Path, place: str = PLACE):
        self.address = address
        self.bindir = bindir
        self.tmp = tmp
        self.place = place

    def client(self, *args: str, user: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        env = {**os.environ, **({"LG_USERNAME": user} if user else {})}
        p = subprocess.run([str(self.bindir / "labgrid-client"), "-x", self.address, *args],
                           capture_output=True, text=True, timeout=60, env=env)
        if check and p.returncode != 0:
            raise AssertionError(f"labgrid-client {' '.join(args)}: {p.stdout} {p.stderr}")
        return p

    def acquired_by(self) -> str:
        out = self.client("-p", self.place, "show").stdout
        line = next(l for l in out.splitlines() if l.strip().startswith("acquired:"))
        return line.split(":", 1)[1].strip()

    def reservations(self) -> str:
        return self.client("reservations").stdout.strip()


def _need_labgrid() -> Path:
    pytest.importorskip("labgrid", reason="labgrid is not installed (pip install -e '.[labgrid]')")
    bindir = Path(sys.executable).parent
    for tool in ("labgrid-coordinator", "labgrid-exporter", "labgrid-client"):
        if not (bindir / tool).exists():
            pytest.skip(f"{tool} is not beside {sys.executable} (labgrid installed elsewhere)")
    return bindir


@contextlib.contextmanager
def labgrid_lab(tmp: Path, host: str, port: int, place: str, tags: list[str], user: str = "root",
                extra_yaml: str = ""):
    """A coordinator and an exporter on 127.0.0.1, exporting one NetworkService (host:port)
    (and ``extra_yaml``'s resources, in the same group) that one place with ``tags`` matches."""
    bindir = _need_labgrid()
    cport = _free_port()
    address = f"127.0.0.1:{cport}"
    procs = []
    try:
        log = tmp / "coordinator.log"
        with open(log, "w") as out:
            coord = subprocess.Popen([str(bindir / "labgrid-coordinator"), "-l", address], cwd=tmp,
                                     stdout=out, stderr=subprocess.STDOUT)
        procs.append(coord)
        _wait_port(cport, coord, log)
        (tmp / "exporter.yaml").write_text(
            f"{GROUP}:\n  NetworkService:\n    address: '{host}'\n    username: {user}\n    port: {port}\n"
            + extra_yaml)
        elog = tmp / "exporter.log"
        with open(elog, "w") as out:
            procs.append(subprocess.Popen([str(bindir / "labgrid-exporter"), "-c", address, "-n", EXPORTER,
                                           "--hostname", "127.0.0.1", str(tmp / "exporter.yaml")], cwd=tmp,
                                          stdout=out, stderr=subprocess.STDOUT))
        lab = Lab(address, bindir, tmp, place)
        deadline = time.monotonic() + 30
        while f"{EXPORTER}/{GROUP}/NetworkService" not in lab.client("resources").stdout:
            assert time.monotonic() < deadline, elog.read_text()[-800:]
            time.sleep(0.2)
        lab.client("-p", place, "create")
        lab.client("-p", place, "add-match", f"{EXPORTER}/{GROUP}/*")
        lab.client("-p", place, "set-tags", *tags)
        yield lab
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def lab(ssh_lab, tmp_path_factory):
    _need_labgrid()
    server = ssh_lab.start_sshd()
    ssh_lab.pin_host_key(server.port)
    try:
        with labgrid_lab(tmp_path_factory.mktemp("labgrid"), NS_ADDR, server.port, PLACE,
                         ["sev_es=1", "site=netns"]) as lab:
            lab.ssh = ssh_lab
            lab.server = server
            yield lab
    finally:
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
        # Ctrl-C while we wait: our reservation is cancelled, alice keeps the place.
        proc = subprocess.Popen([sys.executable, "-m", "kvmharness",
                                 *_lg_args(lab, project_wheel, tmp_path / "r3", "--lock-timeout", "120"),
                                 "--", "true"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        for line in proc.stdout:
            if "labgrid: waiting for 1 of 1" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 130, out
        assert lab.reservations() == "" and lab.acquired_by() == holder
        # Released by alice once we said that we wait: we get it and run.
        proc = subprocess.Popen([sys.executable, "-m", "kvmharness",
                                 *_lg_args(lab, project_wheel, tmp_path / "r2", "--lock-timeout", "120"),
                                 "--", "sh", "-c", "echo got-it"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "labgrid: waiting for 1 of 1 place(s) with sev_es=1" in line:
                break
        lab.client("-p", PLACE, "release", user="alice")
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, "".join(seen) + out
        assert f"{PLACE} acquired by {holder}" in seen[-1]
        assert f"[{PLACE}] got-it" in out
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


def test_rig_in_a_box_as_a_labgrid_place(svm_rig, project_wheel, tmp_path):
    """The session's SVM rig in a box (tests/rig_fixtures.py, booted once) exported as a
    labgrid place: reserve, ship and run there through labgrid, then the same over the plain
    SSH path; both times are printed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    _need_labgrid()
    rig = tomllib.loads(svm_rig.inventory.read_text())["rigs"]["svm-rig"]
    cmd = ("sh", "-c", "grep -qw svm /proc/cpuinfo && test -c /dev/kvm && echo svm-and-kvm-here")
    with labgrid_lab(tmp_path, "127.0.0.1", rig["port"], "svm-rig-box", ["svm=1", "tcg=1"]) as lab:
        t0 = time.monotonic()
        p = run_cli("rig", "run", "--labgrid", lab.address, "--tag", "svm=1", "--ssh-key", rig["key_file"],
                    "--known-hosts", rig["known_hosts"], "--python", rig["python"], "--wheel", str(project_wheel),
                    "--results", str(tmp_path / "lg"), "--plain", "--backend", "kvm", "--", *cmd, timeout=900)
        t_lg = time.monotonic() - t0
        assert p.returncode == 0, p.stdout + p.stderr
        assert "[svm-rig-box] svm-and-kvm-here" in p.stdout
        assert "labgrid: released svm-rig-box" in p.stdout and lab.acquired_by() == "None"
        timing = next(l for l in p.stdout.splitlines() if l.startswith("labgrid: connect"))
    t0 = time.monotonic()
    q = run_cli("rig", "run", "--inventory", str(svm_rig.inventory), "--wheel", str(project_wheel), "--results",
                str(tmp_path / "ssh"), "--plain", "--backend", "kvm", "--", *cmd, timeout=900)
    t_ssh = time.monotonic() - t0
    assert q.returncode == 0, q.stdout + q.stderr
    assert "[svm-rig] svm-and-kvm-here" in q.stdout
    print(f"\nrig in a box: reserve+ship+run through labgrid {t_lg:.1f} s ({timing}); "
          f"plain SSH path {t_ssh:.1f} s")


ENV_FILE = ROOT / "ci" / "rig" / "labgrid-env.yaml"


def _rig_target():
    _need_labgrid()
    from labgrid import Environment  # the test reads the env file as a labgrid user would

    return Environment(str(ENV_FILE)).get_target("main")


def test_labgrid_env_file_is_the_rig_in_a_box(tmp_path):
    """ci/rig/labgrid-env.yaml loads in labgrid, binds the strategy to its QEMU and SSH
    drivers, and starts the same machine as ci/rig/boot-rig.sh."""
    target = _rig_target()
    strategy = target.get_driver("RigInABoxStrategy", activate=False)
    assert type(strategy.qemu).__name__ == "QEMUDriver" and type(strategy.ssh).__name__ == "SSHDriver"
    assert strategy.ssh.networkservice.address == "127.0.0.1"
    boot = (ROOT / "ci" / "rig" / "boot-rig.sh").read_text()
    common = (ROOT / "ci" / "rig" / "common.sh").read_text()
    cfg = strategy.qemu
    # The machine boot-rig.sh starts: the same CPU model, one vCPU, TCG, q35, 2 GiB, kernel command line.
    for flag in (f"-machine {cfg.machine}", f"-cpu {cfg.cpu}", "-smp 1", "-accel tcg",
                 f"-m {cfg.memory.rstrip('M')}"):
        assert flag in boot, flag
    assert "-smp 1" in cfg.extra_args and "-accel tcg" in cfg.extra_args
    assert f'-append "{cfg.boot_args}"' in boot
    # The cached build's files, at the scripts' default cache.
    cache = '${KVMHARNESS_RIG_CACHE:-/var/cache/kvmharness-rig}'
    assert f'RIG_CACHE="{cache}"' in common
    assert "-initrd /var/cache/kvmharness-rig/rig.cpio.zst" in cfg.extra_args
    assert 'RIG_INITRD="$RIG_CACHE/rig.cpio.zst"' in common
    assert strategy.ssh.keyfile == "/var/cache/kvmharness-rig/rig_ed25519"
    assert 'RIG_KEY="$RIG_CACHE/rig_ed25519"' in common
    assert target.env.config.get_image_path("kernel") == "/var/cache/kvmharness-rig/vmlinuz"
    assert 'RIG_KERNEL="$RIG_CACHE/vmlinuz"' in common
    # The strategy forwards to the guest address the rig's init configures.
    from kvmharness.remote.labgrid import RIG_GUEST_ADDR

    assert f"ip addr add {RIG_GUEST_ADDR}/24 dev eth0" in (ROOT / "ci" / "rig" / "build-rig.sh").read_text()


@pytest.mark.skipif(os.environ.get("KVMHARNESS_LABGRID_BOOT") != "1",
                    reason="boots a second rig in a box through labgrid's QEMUDriver (minutes under TCG); "
                           "set KVMHARNESS_LABGRID_BOOT=1 to run it")
def test_labgrid_env_boots_the_rig_and_reaches_it_over_ssh():
    target = _rig_target()
    if not Path(target.env.config.get_image_path("kernel")).exists():
        pytest.skip("the rig in a box is not built (bash ci/rig/build-rig.sh)")
    strategy = target.get_driver("RigInABoxStrategy")
    t0 = time.monotonic()
    try:
        strategy.transition("ssh")
        booted = time.monotonic() - t0
        out = target.get_driver("SSHDriver").run_check("grep -c -w svm /proc/cpuinfo; ls /sys/module | grep -x kvm_amd")
        assert out[-1] == "kvm_amd" and int(out[0]) >= 1
        print(f"\nlabgrid QEMUDriver + SSHDriver: the rig in a box answered SSH {booted:.1f} s after power on "
              f"(127.0.0.1:{strategy.port})")
    finally:
        strategy.transition("off")


def test_labgrid_power_driver_recovers_a_hung_place(ssh_lab, project_wheel, tmp_path):
    """A place with a NetworkPowerPort (labgrid's simplerest model, served here on
    127.0.0.1): --power-cycle-on-hang power-cycles it through `labgrid-client power cycle`
    on the place we hold.  The "outlet" kills the frozen sshd when switched off and starts
    a fresh one on the same port when switched on."""
    _need_labgrid()
    server = ssh_lab.start_sshd()
    ssh_lab.pin_host_key(server.port)
    frozen: list[int] = []
    switched: list[str] = []
    restarted: list[subprocess.Popen] = []

    class Outlet(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            parts = self.path.strip("/").split("/")  # relay/0/1, relay/0/0, relay/0 (state)
            if len(parts) == 3:
                switched.append(parts[2])
                if parts[2] == "0":
                    for pid in frozen:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                else:
                    cfg = ssh_lab.tmp / f"sshd_{server.port}.conf"
                    with open(tmp_path / "restarted.log", "w") as out:
                        restarted.append(subprocess.Popen(["ip", "netns", "exec", ssh_lab.ns, SSHD, "-D", "-e",
                                                           "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT))
            body = b"1" if not switched or switched[-1] == "1" else b"0"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Outlet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    power = (f"  NetworkPowerPort:\n    model: simplerest\n"
             f"    host: 'http://127.0.0.1:{httpd.server_address[1]}/relay/{{index}}/{{value}}'\n    index: 0\n")
    place = "kvmh-lg-power"
    try:
        with labgrid_lab(tmp_path, NS_ADDR, server.port, place, ["power=1"], extra_yaml=power) as lab:
            cmd = [sys.executable, "-m", "kvmharness", "rig", "run", "--labgrid", lab.address, "--tag", "power=1",
                   "--ssh-key", str(ssh_lab.user_key), "--known-hosts", str(ssh_lab.known_hosts),
                   "--python", sys.executable, "--wheel", str(project_wheel), "--results", str(tmp_path / "r"),
                   "--plain", "--hang-timeout", "8", "--power-cycle-on-hang", "--power-timeout", "60",
                   "--", "sh", "-c", "echo started; sleep 30"]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
            lines = []
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith(f"[{place}] started") and not frozen:
                    frozen.extend(_descendants(server.proc.pid))
                    for pid in frozen:
                        os.kill(pid, signal.SIGSTOP)
            proc.wait(timeout=60)
            out = "\n".join(lines)
            assert frozen, out
            assert proc.returncode == 3, out
            assert switched[:2] == ["0", "1"], (switched, out)  # off, then on: labgrid's power cycle
            assert "power-cycling:" in out and "labgrid.remote.client" in out and "power cycle" in out
            (run_dir,) = [d for d in (tmp_path / "r").iterdir() if d.is_dir()]
            (rec,) = json.loads((run_dir / "summary.json").read_text())["rigs"]
            assert rec["reason"].startswith("power-cycled after hang") and rec["hang"]["power_cycled"], rec
            assert f"labgrid: released {place}" in out and lab.acquired_by() == "None"
            print(f"\nlabgrid power driver: hang found after {rec['hang']['silent_for']:.1f} s of silence, "
                  f"SSH back {rec['hang']['recovered_in']:.1f} s after `power cycle` began")
    finally:
        httpd.shutdown()
        for p in restarted:
            for pid in _descendants(p.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if server.proc.poll() is None:
            server.kill()
