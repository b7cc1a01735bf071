"""The compiled exit path: ``fastpath.c`` built on first use, loaded with cffi's ABI-mode dlopen.

The library is plain C (no Python headers, no CPython ABI, no kernel headers): it
runs ``KVM_RUN`` in a loop and handles the exits the device bus declared it may
(OUTs to sink ports are counted, writes to posted devices queued in a ring that
the Machine replays in order), returning to Python for every other exit.  cffi's
ABI-mode calls release the GIL, so other threads run while a vCPU is in the loop.

It is never required.  An install with a C compiler builds it into the package
(setup.py: ``_fastpath-<source hash>.so``, also in the ``py3-none-<platform>``
wheel), and :func:`load` takes that one first.  Otherwise it compiles ``fastpath.c``
with ``cc -O2 -shared -fPIC`` into a per-user cache (``$XDG_CACHE_HOME/kvmharness``, else
``~/.cache/kvmharness``; one file per source version and machine) the first time
it is wanted; with no compiler, or a failed build, the pure-Python exit path
runs and :func:`status` says why.  ``KVMHARNESS_FASTPATH=0`` forces the
pure-Python path; ``KVMHARNESS_FASTPATH=1`` makes an unavailable library an
error instead of a fall-back (for CI's compiled pass).

This module has its own ``cffi.FFI`` (the library's declarations only); the
kernel's structs stay in ``_ffi``, from which the ``kvm_run`` offsets and the
``KVM_RUN`` number are taken and passed in.
"""

from __future__ import annotations

import errno as _errno
import functools
import os
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import cffi

from .. import clib
from .. import exits as X
from ..errors import FeatureUnavailable, KvmError
from . import _ffi as K

SOURCE = Path(__file__).with_name("fastpath.c")
ENV = "KVMHARNESS_FASTPATH"
ABI = 1
RING_SIZE = 256 << 10

#: Kinds a port or MMIO range can have in the C loop (fastpath.c's KH_*).
PY, SINK, POSTED = 0, 1, 2
KINDS = {"sink": SINK, "posted": POSTED}
#: Ring record kinds.
REC_IO_OUT, REC_MMIO_WRITE = 1, 2
MAX_MMIO = 32
MAX_SLOTS = 256

_CDEF = """
struct kh_mmio_range { uint64_t start, end; uint32_t kind, slot; };
struct kh_fast {
    int32_t fd;
    uint32_t off_exit_reason;
    uint32_t off_union;
    uint32_t off_rip;
    uint64_t run_request;
    uint8_t *run;
    uint64_t run_size;
    uint8_t *ring;
    uint32_t ring_size;
    uint32_t budget;
    uint32_t n_mmio;
    uint32_t reserved;
    struct kh_mmio_range mmio[32];
    uint8_t port_kind[65536];
    uint8_t port_slot[65536];
    uint64_t sunk[256];
    uint64_t exits;
    uint64_t sunk_total;
    uint32_t ring_used;
    uint32_t ring_records;
    int32_t err;
    volatile int32_t in_run;
};
int kh_abi(void);
uint64_t kh_sizeof(void);
int kh_run(struct kh_fast *f);
"""

ffi = cffi.FFI()
ffi.cdef(_CDEF)

# a ring record: kind u8, slot u8, port u16, len u32, size u32, count u32, addr u64, rip u64
_REC = struct.Struct("<BBHIIIQQ")
assert _REC.size == 32

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "lib": the loaded library or None, "status": why


def library_path() -> tuple[Path | None, str]:
    """The shared library's path, or None and why not: the one built into the package at
    install time (setup.py) where present, else the per-user cache's, built on first use
    (once per source version): :func:`kvmharness.clib.library_path`."""
    return clib.library_path(SOURCE)


def _mode() -> str:
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("0", "off", "no", "false"):
        return "off"
    if v in ("1", "on", "yes", "true", "required"):
        return "required"
    return "auto"


def load() -> Any | None:
    """The loaded library, or None (the pure-Python path); see :func:`status` for why.

    Raises :class:`FeatureUnavailable` when ``KVMHARNESS_FASTPATH=1`` and it cannot be had.
    """
    mode = _mode()
    if mode == "off":
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["status"] = _load()
    if _state["lib"] is None and mode == "required":
        raise FeatureUnavailable(f"{ENV}=1 but the compiled exit path is unavailable: {_state['status']}")
    return _state["lib"]


def _load() -> tuple[Any | None, str]:
    path, why = library_path()
    if path is None:
        return None, why
    try:
        lib = ffi.dlopen(str(path))
    except OSError as e:
        return None, f"loading {path} failed: {e}"
    if lib.kh_abi() != ABI or lib.kh_sizeof() != ffi.sizeof("struct kh_fast"):
        return None, f"{path} does not match this kvmharness (ABI or struct size); delete it to rebuild"
    return lib, f"compiled ({path})"


def status() -> tuple[bool, str]:
    """(active, one line): which exit path Machine runs use, and why."""
    if _mode() == "off":
        return False, f"pure Python ({ENV}=0)"
    try:
        lib = load()
    except FeatureUnavailable as e:
        return False, str(e)
    if lib is None:
        return False, f"pure Python: {_state.get('status')}"
    return True, str(_state["status"])


def reset() -> None:
    """Forget the loaded library's state (tests; a new ``KVMHARNESS_FASTPATH`` is read anyway)."""
    with _lock:
        _state.clear()


class FastLoop:
    """One vCPU's C loop: its control block (port/MMIO table, counters) and its ring.

    ``run()`` is one C call (GIL released); afterwards ``exits`` exits were handled
    in C, ``sunk_total`` of them only counted (``take_sunk(slot)``), the rest are in
    ``records()``, and the return code says whether an exit awaits Python (0),
    nothing does (1), or KVM_RUN failed (-1: ``raise_error()``).
    """

    def __init__(self, lib: Any, fd: int, mm: Any, run_size: int,
                 decode: Callable[[], X.Exit] | None = None):
        self._lib = lib
        #: the vCPU's decoder for the exit a call returns with (rc 0)
        self.decode = decode
        self._run_buf = ffi.from_buffer(mm)  # an export: the kvm_run mapping cannot be unmapped under C
        self._f = ffi.new("struct kh_fast *")
        self._ring = ffi.new("uint8_t[]", RING_SIZE)
        f = self._f
        f.fd = fd
        f.off_exit_reason = K.ffi.offsetof("struct kvm_run", "exit_reason")
        f.off_union = K.ffi.offsetof("struct kvm_run", "io")
        f.run_request = K.KVM_RUN
        f.run = ffi.cast("uint8_t *", self._run_buf)
        f.run_size = run_size
        f.ring = self._ring
        f.ring_size = RING_SIZE
        self._off_rip = K.ffi.offsetof("struct kvm_run", "s", "regs", "regs", "rip")
        self._off_immediate_exit = K.ffi.offsetof("struct kvm_run", "immediate_exit")
        self._ports: list[int] = []
        self._known: dict[bytes, X.IoOut | X.MmioWrite] = {}
        #: the control block, for reading ``cb.exits`` without a property call per return
        self.cb = f
        #: one C call: ``kh_run(cb)`` (no Python frame of its own)
        self.run: Callable[[], int] = functools.partial(lib.kh_run, f)

    # -- configuration (once per Machine.run) ----------------------------------------
    def configure(self, ports: Mapping[int, tuple[str, int]],
                  mmio: Iterable[tuple[int, int, str, int]], *, rip: bool = False,
                  budget: int = 0) -> None:
        """ports: port -> (kind, slot); mmio: (start, end, kind, slot), kind "sink" or
        "posted" (anything else: Python handles it); rip: record RIP (kvm_run's synced
        regs, see ``KvmVcpu.enable_sync_regs``) in each ring record; budget: exits per
        call (0: fastpath.c's default)."""
        f = self._f
        for p in self._ports:
            f.port_kind[p] = PY
        self._ports = []
        for port, (kind_name, slot) in ports.items():
            kind = KINDS.get(kind_name, PY)
            if kind != PY:
                if not 0 <= slot < MAX_SLOTS:
                    raise ValueError(f"slot {slot} out of range")
                f.port_kind[port] = kind
                f.port_slot[port] = slot
                self._ports.append(port)
        ranges = [(start, end, KINDS[k], slot) for start, end, k, slot in mmio if k in KINDS]
        if len(ranges) > MAX_MMIO:  # too many to scan in C: the rest go to Python
            ranges = ranges[:MAX_MMIO]
        for i, (start, end, kind, slot) in enumerate(ranges):
            if not 0 <= slot < MAX_SLOTS:
                raise ValueError(f"slot {slot} out of range")
            m = f.mmio[i]
            m.start, m.end, m.kind, m.slot = start, end, kind, slot
        f.n_mmio = len(ranges)
        f.off_rip = self._off_rip if rip else 0
        f.budget = budget
        for i in range(MAX_SLOTS):
            f.sunk[i] = 0

    # -- after a call -------------------------------------------------------------
    @property
    def exits(self) -> int:
        return int(self._f.exits)

    @property
    def sunk_total(self) -> int:
        return int(self._f.sunk_total)

    @property
    def busy(self) -> bool:
        """True while a thread is inside the C loop."""
        return bool(self._f.in_run)

    def take_sunk(self, slot: int) -> int:
        n = int(self._f.sunk[slot])
        self._f.sunk[slot] = 0
        return n

    def records(self) -> list[tuple[X.IoOut | X.MmioWrite, int, int]]:
        """The ring's records in order, as (exit, slot, rip) with the exit value the pure-Python
        path decodes for the same exit (``IoOut`` or ``MmioWrite``; equal values are interned)."""
        f = self._f
        n = f.ring_records
        if not n:
            return []
        buf = ffi.buffer(self._ring, f.ring_used)[:]
        out: list[tuple[X.IoOut | X.MmioWrite, int, int]] = []
        pos = 0
        unpack, known = _REC.unpack_from, self._known
        for _ in range(n):
            kind, slot, port, length, size, count, addr, rip = unpack(buf, pos)
            end = pos + 32 + length
            key = buf[pos:pos + 24] + buf[pos + 32:end]  # all but the RIP
            e = known.get(key)
            if e is None:
                data = buf[pos + 32:end]
                e = X.IoOut(port, size, count, data) if kind == REC_IO_OUT else X.MmioWrite(addr, length, data)
                if len(known) >= 4096:
                    known.clear()
                known[key] = e
            out.append((e, slot, rip))
            pos = end + (-length & 7)
        return out

    def raise_error(self, hint: Callable[[int], str] | None = None) -> None:
        """After ``run()`` returned -1: InterruptedError for EINTR (immediate_exit cleared, as
        ``KvmVcpu.run`` does), else KvmError naming KVM_RUN, the errno and ``hint(errno)``."""
        err = int(self._f.err)
        if err == _errno.EINTR:
            self._f.run[self._off_immediate_exit] = 0
            raise InterruptedError(_errno.EINTR, "KVM_RUN interrupted")
        raise KvmError("KVM_RUN", err, hint(err) if hint is not None else "")

    def release(self) -> None:
        """The vCPU is closing: no further KVM_RUN (its fd number may be reused: a later call
        fails with EBADF), and the export of kvm_run is dropped unless a thread is still in the
        loop (then the mapping lives until this object is collected)."""
        self._f.fd = -1
        if self._run_buf is not None and not self.busy:
            self._f.run = ffi.NULL
            ffi.release(self._run_buf)
            self._run_buf = None
