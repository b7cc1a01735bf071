"""The device bus: port and MMIO ranges, and the few devices the harness ships.

A device is any object with some of ``io_in(port, size) -> int``,
``io_out(port, size, data: bytes)``, ``mmio_read(addr, size) -> int``,
``mmio_write(addr, size, data: bytes)``.  Ranges may not overlap (checked
when a device is added).  Port dispatch is one dict lookup per exit: the bus
keeps a port -> bound-method table, since this is the per-exit hot path.

A device may let the compiled exit path (``kvm/fastpath.c``) handle its writes
without Python by declaring ``fast_kind``:

* ``"sink"``: its OUTs/MMIO writes have no effect but being counted; the C loop
  counts them and the Machine calls ``fast_sunk(n)`` with the count before the
  next exit Python handles (a sink without ``fast_sunk`` is treated as posted);
* ``"posted"``: its writes change only state the guest cannot observe before an
  exit Python answers (a console, a RAM-like window read back through MMIO reads):
  the C loop queues them and the Machine replays them, in order, through
  ``io_out``/``mmio_write`` before it handles the next exit;
* ``None`` (the default): every exit comes to Python, as without the fast path.

A subclass whose writes do more (end the run, read registers, touch guest memory,
answer through another device) must set ``fast_kind = None``.  Reads (IN, MMIO
reads) always come to Python.
"""

from __future__ import annotations

import bisect

from .errors import UsageError


class NoDevice(LookupError):
    """No device claims the port or address (the Machine turns it into UnexpectedExit)."""


class DeviceBus:
    def __init__(self) -> None:
        self._port_out: dict = {}
        self._port_in: dict = {}
        self._port_owner: dict = {}
        self._mmio: list = []  # sorted (start, end, device)
        self._mmio_starts: list = []

    # -- registration -----------------------------------------------------
    def add_ports(self, first: int, count: int, device) -> None:
        """Claim ports [first, first+count) for ``device``."""
        if not (first >= 0 and count > 0 and first + count <= 0x10000):
            raise UsageError(f"port range {first:#x}+{count} is outside 0..0xffff")
        clash = [p for p in range(first, first + count) if p in self._port_owner]
        if clash:
            other = self._port_owner[clash[0]]
            raise UsageError(f"port {clash[0]:#x} of {type(device).__name__} overlaps "
                             f"{type(other).__name__} already on the bus")
        out = getattr(device, "io_out", None)
        inp = getattr(device, "io_in", None)
        for p in range(first, first + count):
            self._port_owner[p] = device
            if out:
                self._port_out[p] = out
            if inp:
                self._port_in[p] = inp

    def clone(self, replace: dict | None = None) -> DeviceBus:
        """A bus with the same devices on the same ports and ranges (shared, not copied),
        except the ports in ``replace`` ({port: device}), which the given devices take over
        (one Machine's vCPUs each answer their own ucall port: kvmharness/smp.py)."""
        bus = DeviceBus()
        bus._port_out, bus._port_in = dict(self._port_out), dict(self._port_in)
        bus._port_owner = dict(self._port_owner)
        bus._mmio, bus._mmio_starts = list(self._mmio), list(self._mmio_starts)
        for port, device in (replace or {}).items():
            for table in (bus._port_out, bus._port_in, bus._port_owner):
                table.pop(port, None)
            bus.add_ports(port, 1, device)
        return bus

    def add_mmio(self, start: int, size: int, device) -> None:
        """Claim guest-physical [start, start+size) for ``device``."""
        if size <= 0 or start < 0:
            raise UsageError(f"MMIO range {start:#x}+{size:#x} is empty or negative")
        end = start + size
        for s, e, d in self._mmio:
            if start < e and s < end:
                raise UsageError(f"MMIO range {start:#x}-{end:#x} of {type(device).__name__} overlaps "
                                 f"{s:#x}-{e:#x} of {type(d).__name__}")
        i = bisect.bisect(self._mmio_starts, start)
        self._mmio.insert(i, (start, end, device))
        self._mmio_starts.insert(i, start)

    def fast_plan(self, record: bool = False) -> FastPlan:
        """What the compiled exit path may do per port and MMIO range (see the module
        docstring).  ``record``: every exit is to be recorded, so sinks are posted too
        (replayed through ``io_out``, which counts them as the fast path would)."""
        plan = FastPlan()
        slots: dict[tuple, int] = {}  # (id(device), kind, method) -> slot

        def slot_of(kind: str, device, method: str) -> int | None:
            fn = getattr(device, "fast_sunk" if kind == "sink" else method, None)
            if fn is None:
                return None
            key = (id(device), kind, method)
            if key not in slots:
                if len(plan.handlers) >= 256:
                    return None
                slots[key] = len(plan.handlers)
                plan.handlers.append(fn)
                if kind == "sink":
                    plan.sinks.append((slots[key], fn))
            return slots[key]

        def kind_of(device, method: str) -> tuple[str, int] | None:
            kind = getattr(device, "fast_kind", None)
            if kind == "sink" and (record or getattr(device, "fast_sunk", None) is None):
                kind = "posted"
            if kind not in ("sink", "posted"):
                return None
            slot = slot_of(kind, device, method)
            return None if slot is None else (kind, slot)

        for port in self._port_out:
            ks = kind_of(self._port_owner[port], "io_out")
            if ks is not None:
                plan.ports[port] = ks
        for start, end, device in self._mmio:
            ks = kind_of(device, "mmio_write")
            if ks is not None:
                plan.mmio.append((start, end, ks[0], ks[1]))
        return plan

    @property
    def port_out_handlers(self) -> dict:
        """port -> io_out bound method (the Machine loop reads this directly)."""
        return self._port_out

    # -- dispatch (hot path) ---------------------------------------------------
    def port_out(self, port: int, size: int, data: bytes) -> None:
        try:
            handler = self._port_out[port]
        except KeyError:
            raise NoDevice(f"OUT to port {port:#x}") from None
        handler(port, size, data)

    def port_in(self, port: int, size: int) -> int:
        try:
            handler = self._port_in[port]
        except KeyError:
            raise NoDevice(f"IN from port {port:#x}") from None
        return handler(port, size)

    def _mmio_device(self, addr: int, size: int):
        i = bisect.bisect(self._mmio_starts, addr) - 1
        if i >= 0:
            s, e, d = self._mmio[i]
            if addr + size <= e:
                return d
        raise NoDevice(f"MMIO access to {addr:#x} ({size} bytes)")

    def mmio_write(self, addr: int, size: int, data: bytes) -> None:
        self._mmio_device(addr, size).mmio_write(addr, size, data)

    def mmio_read(self, addr: int, size: int) -> int:
        return self._mmio_device(addr, size).mmio_read(addr, size)


class FastPlan:
    """The device bus as the compiled exit path sees it (:meth:`DeviceBus.fast_plan`):
    ``ports`` port -> (kind, slot), ``mmio`` (start, end, kind, slot), ``handlers`` slot ->
    the bound ``io_out``/``mmio_write`` (posted) or ``fast_sunk`` (sink), ``sinks`` the
    (slot, ``fast_sunk``) pairs."""

    __slots__ = ("handlers", "mmio", "ports", "sinks")

    def __init__(self):
        self.ports: dict[int, tuple[str, int]] = {}
        self.mmio: list[tuple[int, int, str, int]] = []
        self.handlers: list = []
        self.sinks: list = []


class Console:
    """Collects text the guest writes to CONSOLE_PORT."""

    fast_kind = "posted"  # the text is read by the host only

    def __init__(self) -> None:
        self.buffer = bytearray()

    def io_out(self, port, size, data):
        self.buffer += data

    @property
    def text(self) -> str:
        return self.buffer.decode("utf-8", errors="replace")


class NullDevice:
    """Accepts every write, reads as zero (the benchmark port)."""

    __slots__ = ("writes",)
    fast_kind = "sink"

    def __init__(self) -> None:
        self.writes = 0

    def io_out(self, port, size, data):
        self.writes += 1

    def fast_sunk(self, n):
        """``n`` writes the compiled exit path counted for this device."""
        self.writes += n

    def io_in(self, port, size):
        return 0


class RamLikeMmio:
    """An MMIO window that behaves like RAM: reads return the bytes last written."""

    fast_kind = "posted"  # a write is observable only through a read, which Python answers

    def __init__(self, base: int, size: int):
        self.base = base
        self.mem = bytearray(size)
        self.log: list = []  # ("r"|"w", addr, size, value)

    def mmio_write(self, addr, size, data):
        off = addr - self.base
        self.mem[off:off + size] = data[:size]
        self.log.append(("w", addr, size, int.from_bytes(data[:size], "little")))

    def mmio_read(self, addr, size):
        off = addr - self.base
        value = int.from_bytes(self.mem[off:off + size], "little")
        self.log.append(("r", addr, size, value))
        return value


class MsrStore:
    """Answers userspace MSR exits: reads return the last value written (initially 0)."""

    def __init__(self, indices: tuple[int, ...] = ()) -> None:
        self.values = {i: 0 for i in indices}
        self.log: list = []

    def read(self, index: int) -> int | None:
        self.log.append(("r", index, self.values.get(index)))
        return self.values.get(index)

    def write(self, index: int, value: int) -> bool:
        self.log.append(("w", index, value))
        if index not in self.values:
            return False
        self.values[index] = value
        return True
