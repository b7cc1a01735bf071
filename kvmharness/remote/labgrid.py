"""Rigs from a labgrid coordinator: reserve places by tag, lock them, release them.

The only module of kvmharness that imports labgrid (an optional extra:
``pip install -e '.[labgrid]'``; labgrid 24+ with its gRPC coordinator).  What
`rig run --labgrid ADDRESS --tag sev_es=1` does here:

1. connect to the coordinator (a labgrid client session, run on an event loop
   in a thread of its own, so its stream stays serviced during the run);
2. create one reservation per wanted place, each filtered by the tags (the
   coordinator's scheduler gives each a different matching place), and poll
   them (which also keeps them from expiring) until all are allocated, printing
   a progress line that names who holds the places meanwhile;
3. acquire (lock) each allocated place;
4. turn each place's ``NetworkService`` resource into a :class:`Rig` (address,
   port, username; the SSH key, known_hosts and remote python come from the
   command line), which the ordinary SSH path then drives;
5. release every acquired place and cancel every reservation when the block
   ends: success, failure, an exception or Ctrl-C alike.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HostError, UsageError
from .inventory import Rig

INSTALL_HINT = "pip install 'labgrid>=24' (or the [labgrid] extra: pip install -e '.[labgrid]' in a checkout)"


class LabgridMissing(HostError):
    """labgrid is not installed (exit 3)."""


class LabgridError(HostError):
    """The coordinator refused or could not be reached (exit 3)."""


def _import():
    try:
        import grpc
        from labgrid.remote.client import ClientSession
        from labgrid.remote.common import Reservation, ReservationState
        from labgrid.remote.generated import labgrid_coordinator_pb2 as pb2
        from labgrid.util.proxy import proxymanager
    except ModuleNotFoundError as e:
        raise LabgridMissing(f"labgrid is not installed (needed by rig run --labgrid; missing module "
                             f"{e.name}): {INSTALL_HINT}") from None
    return grpc, ClientSession, Reservation, ReservationState, pb2, proxymanager


def parse_tags(pairs: list[str]) -> dict[str, str]:
    """``["sev_es=1", "site=lab2"]`` -> a dict; labgrid's own key/value rules."""
    import re

    key, val = re.compile(r"^[a-z][a-z0-9_]+$"), re.compile(r"^[a-z0-9_]*$")
    tags: dict[str, str] = {}
    for pair in pairs:
        k, sep, v = pair.partition("=")
        if not sep or not key.match(k) or not val.match(v):
            raise UsageError(f"--tag {pair!r}: give KEY=VALUE, a key of [a-z][a-z0-9_]+ and a value "
                             "of [a-z0-9_] (labgrid's tag rules)")
        tags[k] = v
    if not tags:
        raise UsageError("rig run --labgrid needs at least one --tag KEY=VALUE to choose places")
    return tags


@dataclass
class LabgridOptions:
    address: str
    tags: dict[str, str]
    key_file: Path
    known_hosts: Path | None = None
    python: str = "python3"
    places: int | None = None        # how many places; None: every place matching the tags now
    wait: float = 1800.0             # for the reservations to be allocated
    timings: dict = field(default_factory=dict)  # filled in: connect, reserve, acquire, release (s)


def _quiet_labgrid_root_logging(record: logging.LogRecord) -> bool:
    """labgrid's client logs its connection errors on the root logger, which Python then
    prints as an extra line; we report them ourselves, in one line."""
    return f"{os.sep}labgrid{os.sep}" not in record.pathname


class _Session:
    """A labgrid client session on its own event loop thread."""

    def __init__(self, address: str, timeout: float = 30.0):
        self.grpc, ClientSession, self.Reservation, self.State, self.pb2, proxymanager = _import()
        root = logging.getLogger()
        if _quiet_labgrid_root_logging not in root.filters:
            root.addFilter(_quiet_labgrid_root_logging)
        self.address = proxymanager.get_grpc_address(address, default_port=20408)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="labgrid-client", daemon=True)
        self.thread.start()

        async def start():
            s = ClientSession(address=self.address, loop=self.loop)
            await s.start()
            return s

        try:
            self.session = self.call(start(), timeout)
        except Exception as e:
            self.close()
            why = str(e) or type(e).__name__
            raise LabgridError(f"cannot reach the labgrid coordinator at {self.address}: {why}") from None

    def call(self, coro, timeout: float | None = 60.0):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise LabgridError(f"the labgrid coordinator at {self.address} did not answer within "
                               f"{timeout:g} s") from None
        except self.grpc.aio.AioRpcError as e:
            raise LabgridError(f"labgrid coordinator {self.address}: {e.details()}") from None

    def rpc(self, method: str, request, timeout: float | None = 60.0):
        """One coordinator RPC (made on the session's loop, as grpc.aio wants)."""
        async def call():
            return await getattr(self.session.stub, method)(request)

        return self.call(call(), timeout)

    def places(self) -> dict:
        return dict(self.session.places)

    def close(self) -> None:
        if getattr(self, "session", None) is not None:
            try:
                self.call(self.session.stop(), 10)
                self.call(self.session.close(), 10)
            except Exception:  # noqa: BLE001 - closing: the coordinator may be gone
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _matches(place, tags: dict[str, str]) -> bool:
    have = dict(place.tags)
    have.setdefault("name", place.name)
    return all(have.get(k) == v for k, v in tags.items())


def _network_service(session: _Session, place) -> dict | None:
    for exporter, groups in session.session.resources.items():
        for group, resources in groups.items():
            for name, entry in resources.items():
                if entry.cls == "NetworkService" and place.hasmatch((exporter, group, entry.cls, name)):
                    return dict(entry.params)
    return None


# Resources labgrid's `power` command drives (labgrid/remote/client.py, Client.power).
POWER_RESOURCES = ("NetworkPowerPort", "PDUDaemonPort", "USBPowerPort", "SiSPMPowerPort", "YKUSHPowerPort",
                   "TasmotaPowerPort", "SysfsGPIO", "MatchedSysfsGPIO")


def _has_power(session: _Session, place) -> bool:
    for exporter, groups in session.session.resources.items():
        for group, resources in groups.items():
            for name, entry in resources.items():
                if entry.cls in POWER_RESOURCES and place.hasmatch((exporter, group, entry.cls, name)):
                    return True
    return False


def power_cycle_command(address: str, place: str) -> str:
    """labgrid's own power driver for a place we hold: `labgrid-client -p PLACE power cycle`
    (run as this user on this host, so the coordinator sees the place's owner)."""
    return " ".join(shlex.quote(a) for a in (sys.executable, "-m", "labgrid.remote.client", "-x", address,
                                             "-p", place, "power", "cycle"))


def _holders(session: _Session, tags: dict[str, str]) -> str:
    busy = [f"{p.name} acquired by {p.acquired}" for p in session.places().values()
            if _matches(p, tags) and p.acquired]
    return "; ".join(busy)


@contextmanager
def labgrid_rigs(opts: LabgridOptions, note: Callable[[str], None]) -> Iterator[list[Rig]]:
    """Reserve, lock and describe labgrid places as rigs for the duration of the block."""
    t0 = time.monotonic()
    s = _Session(opts.address)
    opts.timings["connect"] = time.monotonic() - t0
    tokens: list[str] = []
    acquired: list[str] = []
    try:
        tagtext = " ".join(f"{k}={v}" for k, v in opts.tags.items())
        matching = sorted(p.name for p in s.places().values() if _matches(p, opts.tags))
        if not matching:
            known = ", ".join(f"{p.name} ({' '.join(f'{k}={v}' for k, v in p.tags.items()) or 'no tags'})"
                              for p in s.places().values()) or "none"
            raise UsageError(f"no labgrid place at {s.address} has the tags {tagtext} (places: {known})")
        want = opts.places or len(matching)
        if want > len(matching):
            raise UsageError(f"--places {want}: only {len(matching)} labgrid place(s) have the tags "
                             f"{tagtext}: {', '.join(matching)}")
        t1 = time.monotonic()
        fltr = {"main": s.pb2.Reservation.Filter(filter=opts.tags)}
        for _ in range(want):
            resp = s.rpc("CreateReservation", s.pb2.CreateReservationRequest(filters=fltr, prio=0.0))
            tokens.append(s.Reservation.from_pb2(resp.reservation).token)
        allocated: dict[str, str] = {}
        told = 0.0
        while True:
            for token in tokens:
                if token in allocated:
                    continue
                resp = s.rpc("PollReservation", s.pb2.PollReservationRequest(token=token))
                res = s.Reservation.from_pb2(resp.reservation)
                if res.state in (s.State.allocated, s.State.acquired):
                    allocated[token] = res.allocations["main"][0]
                elif res.state in (s.State.expired, s.State.invalid):
                    raise LabgridError(f"labgrid reservation {token} became {res.state.name}")
            now = time.monotonic()
            if len(allocated) == len(tokens):
                break
            if now - t1 > opts.wait:
                raise LabgridError(f"waited {opts.wait:g} s for {want} labgrid place(s) with {tagtext}; "
                                   f"{len(allocated)} allocated; " + (_holders(s, opts.tags) or "none free"))
            if now - told >= 10 or not told:
                note(f"labgrid: waiting for {want - len(allocated)} of {want} place(s) with {tagtext} "
                     f"({now - t1:.0f} s)" + (f"; {_holders(s, opts.tags)}" if _holders(s, opts.tags) else ""))
                told = now
            time.sleep(1.0)
        opts.timings["reserve"] = time.monotonic() - t1
        t2 = time.monotonic()
        for name in allocated.values():
            s.rpc("AcquirePlace", s.pb2.AcquirePlaceRequest(placename=name))
            acquired.append(name)
        opts.timings["acquire"] = time.monotonic() - t2
        s.call(s.session.sync_with_coordinator(), 30)
        rigs = []
        for name in acquired:
            place = s.places()[name]
            ns = _network_service(s, place)
            if ns is None or not ns.get("address"):
                raise LabgridError(f"labgrid place {name} has no NetworkService resource (address, username, "
                                   "port) to reach it over SSH")
            rigs.append(Rig(name=name, host=str(ns["address"]), port=int(ns.get("port") or 22),
                            user=str(ns.get("username") or "root"), key_file=opts.key_file,
                            python=opts.python, labels=tuple(f"{k}={v}" for k, v in sorted(place.tags.items())),
                            known_hosts=opts.known_hosts,
                            power_cycle=power_cycle_command(opts.address, name) if _has_power(s, place) else None))
        note(f"labgrid: acquired {', '.join(acquired)} ({tagtext}) in "
             f"{opts.timings['reserve'] + opts.timings['acquire']:.1f} s")
        yield rigs
    finally:
        t3 = time.monotonic()
        problems = []
        for name in acquired:
            try:
                s.rpc("ReleasePlace", s.pb2.ReleasePlaceRequest(placename=name), 30)
            except LabgridError as e:
                problems.append(f"release {name}: {e}")
        for token in tokens:
            try:
                s.rpc("CancelReservation", s.pb2.CancelReservationRequest(token=token), 30)
            except LabgridError as e:
                problems.append(f"cancel reservation {token}: {e}")
        if acquired:
            note(f"labgrid: released {', '.join(acquired)}")
        for p in problems:
            note(f"labgrid: could not {p}")
        s.close()
        opts.timings["release"] = time.monotonic() - t3


# -- the rig in a box as a labgrid target (ci/rig/labgrid-env.yaml) ----------------------
RIG_GUEST_ADDR = "10.0.2.15"  # QEMU user networking's first guest address (ci/rig/build-rig.sh's init)


def _define_rig_strategy():
    """``RigInABoxStrategy``, registered with labgrid's target factory so that an
    environment file (``imports: [kvmharness.remote.labgrid]``) can name it.

    States ``off`` and ``ssh``: ``ssh`` starts QEMU (QEMUDriver, its power protocol),
    forwards a free 127.0.0.1 port to the rig's sshd (QEMU's hostfwd, loopback only),
    points the target's NetworkService at it, activates the SSHDriver (which retries
    while the rig boots, up to its ``connection_timeout``) and checks that the rig is an
    SVM host with /dev/kvm.
    """
    import enum
    import socket

    import attr
    from labgrid.factory import target_factory
    from labgrid.step import step
    from labgrid.strategy.common import Strategy, StrategyError, never_retry

    class Status(enum.Enum):
        unknown = 0
        off = 1
        ssh = 2

    @target_factory.reg_driver
    @attr.s(eq=False)
    class RigInABoxStrategy(Strategy):
        """Boot the SVM rig in a box with QEMUDriver and reach it with SSHDriver."""

        bindings = {"qemu": "QEMUDriver", "ssh": "SSHDriver"}
        status = attr.ib(default=Status.unknown)
        netdev = attr.ib(default="n0", validator=attr.validators.instance_of(str))
        boot_timeout = attr.ib(default=300.0, converter=float)
        port = attr.ib(default=None)  # the 127.0.0.1 port forwarded to the rig's sshd
        console = attr.ib(default=b"")  # what the rig printed on its serial console

        def _drain(self, seconds: float) -> None:
            """Read the serial console for ``seconds``: QEMU stalls a guest whose console
            output nobody reads, so it is read all along the boot (and kept)."""
            end = time.monotonic() + seconds
            while (left := end - time.monotonic()) > 0:
                try:
                    self.console += self.qemu.read(size=4096, timeout=left)
                except Exception:  # noqa: BLE001 - pexpect's TIMEOUT: nothing more to read now
                    return

        def _sshd_answers(self) -> bool:
            """A real SSH banner on the forwarded port (QEMU's forwarder itself accepts at once)."""
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as c:
                    c.settimeout(2)
                    return c.recv(4).startswith(b"SSH-")
            except OSError:
                return False

        @never_retry
        @step(args=["status"])
        def transition(self, status, *, step):  # noqa: ARG002 - labgrid's step decorator passes it
            if not isinstance(status, Status):
                status = Status[status]
            if status == Status.unknown:
                raise StrategyError(f"can not transition to {status}")
            if status == self.status:
                return
            if status == Status.off:
                self.target.deactivate(self.ssh)
                self.target.activate(self.qemu)
                self.qemu.off()
                self.port = None
            elif status == Status.ssh:
                self.transition(Status.off)
                self.qemu.on()
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    self.port = s.getsockname()[1]
                self.qemu.add_port_forward("tcp", "127.0.0.1", self.port, RIG_GUEST_ADDR, 22, self.netdev)
                self.ssh.networkservice.port = self.port
                deadline = time.monotonic() + self.boot_timeout
                while not self._sshd_answers():
                    if time.monotonic() > deadline:
                        tail = self.console.decode("utf-8", "replace").strip().splitlines()[-5:]
                        raise StrategyError(f"the rig's sshd did not answer within {self.boot_timeout:g} s; "
                                            f"console: {' | '.join(tail) or '(nothing)'}")
                    self._drain(1.0)
                self.target.activate(self.ssh)
                self.ssh.run_check("grep -qw svm /proc/cpuinfo && test -c /dev/kvm")
            self.status = status

    return RigInABoxStrategy


try:
    import labgrid as _labgrid  # noqa: F401  (only to know whether the strategy can be defined)
except ImportError:
    RigInABoxStrategy = None
else:
    RigInABoxStrategy = _define_rig_strategy()
