"""A real OpenSSH server for the remote-rig tests, in a network namespace.

The only module of the project that imports pyroute2.  The session fixture
creates a namespace plus a veth pair (10.213.0.1/30 on our side, 10.213.0.2/30
inside; nothing else is ever addressed), throwaway host and user keys in a tmp
dir, and starts Debian's sshd inside the namespace on demand.  Every test
starts its own sshd on its own port, so killing one mid-run never disturbs
another.  Everything is torn down at the end of the session.

The "rig" behind that sshd is this machine (root, this Python), so `rig run`
really uploads, builds a venv, installs the wheel and runs pytest over SSH.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOST_ADDR = "10.213.0.1"
NS_ADDR = "10.213.0.2"
PREFIX = 30
SSHD = "/usr/sbin/sshd"
INSTALL = ROOT / "ci" / "rig" / "install-test-deps.sh"


def _descendants(pid: int) -> list[int]:
    """pid and all its descendants, from /proc (children first)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []

    def walk(p: int) -> None:
        for c in children.get(p, []):
            walk(c)
        out.append(p)

    walk(pid)
    return out


def keygen(path: Path, comment: str = "kvmharness-test") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True)
    return path


@dataclass
class Sshd:
    """One sshd listening on NS_ADDR:port inside the namespace."""

    port: int
    proc: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """SIGKILL the daemon and every per-connection child: connections drop."""
        for pid in _descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(10)


def _sweep_stale_labs(netns, IPRoute) -> None:
    """Remove the labs of test processes that died without closing theirs (killed runs):
    their host-side veth still holds HOST_ADDR, which would collide with this lab's.  A lab
    is named after its process's pid (mod 100000), so a live process keeps its lab."""
    for name in netns.listnetns():
        if not name.startswith("kvmh-test-"):
            continue
        tag = name[len("kvmh-test-"):]
        try:
            pid = int(tag[:-2])
            os.kill(pid, 0)
            continue  # its process is alive: not stale
        except ValueError:
            continue  # not one of ours
        except PermissionError:
            continue
        except ProcessLookupError:
            pass
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
        for line in pids.stdout.split():
            try:
                os.kill(int(line), signal.SIGKILL)  # its orphaned sshd instances
            except (ValueError, ProcessLookupError):
                pass
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=f"kvh{tag}a")
            if idx:
                ipr.link("del", index=idx[0])
        try:
            netns.remove(name)
        except OSError:
            pass


class SshLab:
    """The namespace, its keys and the sshd instances started in it."""

    def __init__(self, tmp: Path):
        from pyroute2 import IPRoute, NetNS, netns  # the project's only pyroute2 import

        self.tmp = tmp
        tag = f"{os.getpid() % 100000}{secrets.token_hex(1)}"
        self.ns = f"kvmh-test-{tag}"
        self.veth_host, self.veth_ns = f"kvh{tag}a", f"kvh{tag}b"
        self._netns = netns
        self._ports = itertools.count(2200)
        self.servers: list[Sshd] = []
        _sweep_stale_labs(netns, IPRoute)
        netns.create(self.ns)
        try:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.veth_host, kind="veth", peer=self.veth_ns)
                peer = ipr.link_lookup(ifname=self.veth_ns)[0]
                ipr.link("set", index=peer, net_ns_fd=self.ns)
                idx = ipr.link_lookup(ifname=self.veth_host)[0]
                ipr.addr("add", index=idx, address=HOST_ADDR, prefixlen=PREFIX)
                ipr.link("set", index=idx, state="up")
            with NetNS(self.ns) as ns:
                lo = ns.link_lookup(ifname="lo")[0]
                ns.link("set", index=lo, state="up")
                idx = ns.link_lookup(ifname=self.veth_ns)[0]
                ns.addr("add", index=idx, address=NS_ADDR, prefixlen=PREFIX)
                ns.link("set", index=idx, state="up")
        except Exception:
            self.close()
            raise
        self.host_key = keygen(tmp / "ssh_host_ed25519_key", "test-host")
        self.other_host_key = keygen(tmp / "other_host_ed25519_key", "impostor-host")
        self.user_key = keygen(tmp / "user_ed25519", "test-user")
        self.stranger_key = keygen(tmp / "stranger_ed25519", "not-authorized")
        shutil.copy(tmp / "user_ed25519.pub", tmp / "authorized_keys")
        self.known_hosts = tmp / "known_hosts"
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir

    # -- servers -------------------------------------------------------------------
    def start_sshd(self, host_key: Path | None = None) -> Sshd:
        port = next(self._ports)
        cfg = self.tmp / f"sshd_{port}.conf"
        cfg.write_text(
            f"Port {port}\nListenAddress {NS_ADDR}\nHostKey {host_key or self.host_key}\n"
            f"AuthorizedKeysFile {self.tmp}/authorized_keys\nPidFile none\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nUseDNS no\n"
            "Subsystem sftp internal-sftp\nLogLevel VERBOSE\nMaxStartups 50\n")
        log = self.tmp / f"sshd_{port}.log"
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, SSHD, "-D", "-e", "-f", str(cfg)],
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)
        server = Sshd(port, proc, log)
        self.servers.append(server)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((NS_ADDR, port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"sshd did not start: {log.read_text()[-500:]}")
                time.sleep(0.05)
        return server

    def pin_host_key(self, port: int, key: Path | None = None, path: Path | None = None) -> Path:
        """Write a known_hosts line for NS_ADDR:port (the real key unless ``key``)."""
        path = path or self.known_hosts
        kind, blob = (key or self.host_key).with_suffix(".pub").read_text().split()[:2]
        with open(path, "a") as f:
            f.write(f"[{NS_ADDR}]:{port} {kind} {blob}\n")
        return path

    def unused_port(self) -> int:
        return next(self._ports)

    def inventory(self, path: Path, rigs: dict[str, dict]) -> Path:
        """An inventory file; each rig dict overrides the defaults (port required)."""
        lines = []
        for name, over in rigs.items():
            r = {"host": NS_ADDR, "user": "root", "key_file": str(self.user_key),
                 "python": sys.executable, "known_hosts": str(self.known_hosts),
                 "labels": ["netns"], **over}
            lines.append(f"[rigs.{name}]")
            for k, v in r.items():
                if isinstance(v, list):
                    lines.append(f"{k} = [{', '.join(repr(x) for x in v)}]".replace("'", '"'))
                elif isinstance(v, int):
                    lines.append(f"{k} = {v}")
                else:
                    lines.append(f'{k} = "{v}"')
            lines.append("")
        path.write_text("\n".join(lines))
        return path

    def close(self) -> None:
        for s in self.servers:
            if s.proc.poll() is None:
                s.kill()
        try:
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=self.veth_host)
                if idx:
                    ipr.link("del", index=idx[0])
        finally:
            try:
                self._netns.remove(self.ns)
            except OSError:
                pass


def _need_tools() -> None:
    if os.geteuid() != 0:
        pytest.skip("remote-rig tests need root (network namespace + sshd)")
    if not (os.path.exists(SSHD) and shutil.which("ip") and shutil.which("ssh-keygen")):
        # The project installs its own test dependencies, as CI does.
        proc = subprocess.run(["bash", str(INSTALL), "--tests"], capture_output=True, text=True,
                              env={**os.environ, "PYTHON": sys.executable})
        if proc.returncode != 0:
            pytest.fail(f"{INSTALL} failed: {proc.stderr[-800:]}")
    try:
        import pyroute2  # noqa: F401
        import paramiko  # noqa: F401
    except ImportError as e:
        pytest.skip(f"{e.name} is not installed (run ci/rig/install-test-deps.sh)")


@pytest.fixture(scope="session")
def ssh_lab(tmp_path_factory):
    _need_tools()
    tmp = tmp_path_factory.mktemp("sshlab")
    try:
        lab = SshLab(tmp)
    except PermissionError as e:
        pytest.skip(f"cannot create a network namespace here: {e}")
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once per session (what `rig run` would build)."""
    from kvmharness.remote.rig import build_wheel

    return build_wheel(ROOT, tmp_path_factory.mktemp("wheel"), lambda msg: None)


def run_cli(*args: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `kvmharness` CLI, as a user runs it (from the source tree)."""
    return subprocess.run([sys.executable, "-m", "kvmharness", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
