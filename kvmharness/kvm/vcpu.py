"""A KVM vCPU fd and its mmap'd ``struct kvm_run``.

``decode_exit`` is the only place that reads ``kvm_run``'s exit union.  It reads
through precompiled ``struct.Struct`` objects whose offsets come from the cffi
declarations (so the layout test pins them), because one ``unpack_from`` is
cheaper than several cffi attribute reads on the per-exit hot path.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import mmap
import operator
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .. import exits as X
from ..backend import Vcpu
from ..errors import FeatureUnavailable, KvmError, UsageError
from ..watchdog import KICK_SIGNAL
from ..x86 import CpuidEntry, DTable, FrozenRegs, FrozenSregs, Regs, Segment, Sregs
from . import _ffi as K
from . import fastpath
from ._ffi import ffi, ioctl, ioctl_raw, libc
from .fastpath import FastLoop

if TYPE_CHECKING:
    from ..abi import NestedState
    from .tracepoints import KvmTracepoints
    from .vm import KvmVm

#: a decoded kvm_run.io header: is-out, port, size, count, data offset, bytes, and for an OUT
#: the IoOut values interned by their data, for an IN the one IoIn value
_IoHead = tuple[bool, int, int, int, int, int, dict[bytes, X.IoOut] | X.IoIn]

# KICK_SIGNAL interrupts KVM_RUN for Vcpu.kick(); its handler is installed by
# kvmharness.watchdog when that is imported on the main thread.



_RUN = "struct kvm_run"
_OFF_EXIT_REASON = ffi.offsetof(_RUN, "exit_reason")
_OFF_IMMEDIATE_EXIT = ffi.offsetof(_RUN, "immediate_exit")
_OFF_UNION = ffi.offsetof(_RUN, "io")  # every member of the exit union starts here

_U32 = struct.Struct("<I")
# io: direction u8, size u8, port u16, count u32, data_offset u64
_IO = struct.Struct("<BBHIQ")
# mmio: phys_addr u64, data[8], len u32, is_write u8
_MMIO = struct.Struct("<Q8sIB")
# msr: error u8, pad[7], reason u32, index u32, data u64
_MSR = struct.Struct("<B7xIIQ")
_HYPERCALL = struct.Struct("<Q6QQI")  # nr, args[6], ret, longmode
_MEMORY_FAULT_S = struct.Struct("<QQQ")  # memory_fault: flags, gpa, size
_MEMORY_FAULT = X.KVM_EXIT_MEMORY_FAULT  # KVM_RUN fails with EFAULT and this exit reason
_EFAULT_ = _errno.EFAULT
_DEBUG = struct.Struct("<IIQQQ")  # exception, pad, pc, dr6, dr7
_FAIL_ENTRY = struct.Struct("<QI")  # hardware_entry_failure_reason, cpu
_INTERNAL = struct.Struct("<II16Q")  # suberror, ndata, data[16]
_SYSTEM_EVENT = struct.Struct("<II16Q")  # type, ndata, data[16]

_REGS = struct.Struct("<18Q")
_SEG = "QIHBBBBBBBBBB"
_SREGS = struct.Struct("<" + _SEG * 8 + "QH6x" * 2 + "7Q" + "4Q")
assert _REGS.size == ffi.sizeof("struct kvm_regs")
assert _SREGS.size == ffi.sizeof("struct kvm_sregs")
# for writing: the padding byte of each segment and the interrupt bitmap are zero-filled pads
_SREGS_SET = struct.Struct("<" + "QIH9Bx" * 8 + "QH6x" * 2 + "7Q" + "32x")
assert _SREGS_SET.size == _SREGS.size
_SEG_FIELDS = operator.attrgetter("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
                                  "avl", "unusable")
_REG_FIELDS = operator.attrgetter("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
                                  "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_U64_MASK = 0xFFFFFFFFFFFFFFFF
_KVM_SET_REGS = K.KVM_SET_REGS
#: kvm_regs/kvm_sregs of shared immutable states (x86.frozen; boot.entry_state), packed once:
#: id -> (the state, kept alive so its id stays its own; a struct pointer over its bytes)
_PACKED: dict[int, tuple[object, Any]] = {}
_REGS_PTR = ffi.typeof("struct kvm_regs *")
_SREGS_PTR = ffi.typeof("struct kvm_sregs *")
_PACKED_MAX = 64
_KVM_SET_SREGS = K.KVM_SET_SREGS
assert _IO.size <= 16 and ffi.offsetof(_RUN, "mmio") == _OFF_UNION

_IO_DIRECTION_OUT = 1  # KVM_EXIT_IO_OUT
#: VM types for which KVM sets has_protected_state (svm.c svm_vm_init: SEV-ES and SNP)
PROTECTED_STATE_VM_TYPES = frozenset({3, 4})  # KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM
PROTECTED_STATE_HINT = ("the vCPU's state is protected: on an SEV-ES/SNP VM type KVM refuses it "
                        "once LAUNCH_UPDATE_VMSA has encrypted the VMSA; the guest's registers "
                        "are not the host's to read")
_KVM_RUN = K.KVM_RUN
_NULL = ffi.NULL
_EINTR = _errno.EINTR
_get_ident = threading.get_ident
_HLT, _SHUTDOWN = X.Hlt(), X.Shutdown()  # immutable and fieldless: one value each


class KvmVcpu(Vcpu):
    def __init__(self, vm: KvmVm, fd: int, vcpu_id: int, mmap_size: int):
        self.vm = vm
        self.fd = fd
        self.vcpu_id = vcpu_id
        self._mm = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._io_heads: dict[bytes, _IoHead] = {}  # raw kvm_run.io header -> decoded head (see decode_exit)

    # Per-vCPU state with its initial value on the class: set on the instance when it first
    # changes, so creating a vCPU (a VM lifecycle's Python work, issue 15) sets two attributes.
    _pending: X.Exit | None = None  # the exit awaiting complete(), with where its data goes
    _pending_off = 0
    _thread = 0
    _ioctl = staticmethod(libc.ioctl)
    _single_step = False
    cpuid: tuple[CpuidEntry, ...] = ()
    _fast: FastLoop | None = None  # the compiled exit loop, made on first fast_loop()
    _bufs: tuple[tuple[Any, Any], tuple[Any, Any]] | None = None  # see _set_bufs
    _words: tuple[memoryview, memoryview, memoryview, memoryview] | None = None  # see _word_views
    _run_ptr: Any = None  # cffi's view of the kvm_run mapping, made on first use of kvm_run
    _run_struct: Any = None  # and the struct kvm_run * over it

    @property
    def kvm_run(self) -> Any:
        """``struct kvm_run *`` over the mapping (cffi), made on first use."""
        if self._run_ptr is None:
            if self.fd < 0:
                return None
            self._run_ptr = ffi.from_buffer(self._mm)
            self._run_struct = ffi.cast("struct kvm_run *", self._run_ptr)
        return self._run_struct

    # -- running -------------------------------------------------------------
    def run(self) -> X.Exit:
        """KVM_RUN until the next exit to userspace; returns an ``exits.*`` value.

        Raises ``InterruptedError`` when a signal or ``kick()`` interrupted it
        (EINTR), ``KvmError`` for any other failure.
        """
        self._thread = _get_ident()
        if K._recorder is not None:  # the ioctl recorder seam (kvm/_ffi.py): KVM_RUN is seen too
            ret, err = ioctl_raw(self.fd, _KVM_RUN, _NULL)
            if ret < 0:
                return self._run_failed(err)
            return self.decode_exit()
        if self._ioctl(self.fd, _KVM_RUN, _NULL) < 0:
            err = ffi.errno
            if err == _EFAULT_ and _U32.unpack_from(self._mm, _OFF_EXIT_REASON)[0] == _MEMORY_FAULT:
                return self.decode_exit()
            if err == _EINTR:
                self._mm[_OFF_IMMEDIATE_EXIT] = 0
                raise InterruptedError(_EINTR, "KVM_RUN interrupted")
            raise KvmError("KVM_RUN", err, self.run_failure_hint(err))
        return self.decode_exit()

    def runner(self) -> Callable[[], X.Exit]:
        """``run()`` for a loop on the calling thread: binds the thread ``kick()`` signals once,
        here, and returns a closure that reads the common exits from kvm_run without per-exit
        allocation (an OUT of one to four bytes comes back as the same interned ``IoOut``
        value each time its port, size and data repeat); every other exit goes through
        :meth:`decode_exit`.  Same results and errors as ``run()``.

        With an ioctl recorder installed (``kvm/_ffi.py``; checked here, once per loop, not
        per exit) it is ``run()``, which issues KVM_RUN through the recorder."""
        self._thread = _get_ident()
        if K._recorder is not None:
            return self.run
        ioctl, fd, request, null = self._ioctl, self.fd, _KVM_RUN, _NULL
        u16, u32, u64 = self._word_views()
        mm = self._mm
        i_reason, i_io = _OFF_EXIT_REASON // 4, _OFF_UNION // 8
        decode, fail = self.decode_exit, self._run_failed
        # io header word (direction, size, port, count) -> (data_offset, view, index, {value: IoOut}):
        # only single OUTs of 1, 2 or 4 bytes, their data read as one int through a same-width view
        outs: dict[int, tuple[int, Any, int, dict[int, X.IoOut]]] = {}
        views: dict[int, Any] = {1: mm, 2: u16, 4: u32}
        vcpu = self

        def run() -> X.Exit:
            if ioctl(fd, request, null) < 0:
                return fail()
            if u32[i_reason] == 2:  # KVM_EXIT_IO
                head = outs.get(u64[i_io])
                if head is not None and u64[i_io + 1] == head[0]:
                    known = head[3].get(head[1][head[2]])
                    if known is not None:
                        vcpu._pending = None
                        return known
                e = decode()
                if type(e) is X.IoOut and e.count == 1 and e.size in views:
                    self._intern_out(outs, u64[i_io], u64[i_io + 1], views[e.size], e)
                return e
            return decode()

        return run

    def _lean_decoder(self) -> Callable[[], X.Exit]:
        """:meth:`decode_exit` for the exits the compiled loop hands back: a single OUT of
        1, 2 or 4 bytes seen before comes back interned without reading a slice (as in
        :meth:`runner`); everything else through ``decode_exit``."""
        u16, u32, u64 = self._word_views()
        i_reason, i_io = _OFF_EXIT_REASON // 4, _OFF_UNION // 8
        decode = self.decode_exit
        outs: dict[int, tuple[int, Any, int, dict[int, X.IoOut]]] = {}
        views: dict[int, Any] = {1: self._mm, 2: u16, 4: u32}
        vcpu = self

        def decode_lean() -> X.Exit:
            if u32[i_reason] == 2:  # KVM_EXIT_IO
                head = outs.get(u64[i_io])
                if head is not None and u64[i_io + 1] == head[0]:
                    known = head[3].get(head[1][head[2]])
                    if known is not None:
                        vcpu._pending = None
                        return known
                e = decode()
                if type(e) is X.IoOut and e.count == 1 and e.size in views:
                    vcpu._intern_out(outs, u64[i_io], u64[i_io + 1], views[e.size], e)
                return e
            return decode()

        return decode_lean

    def _word_views(self) -> tuple[memoryview, memoryview, memoryview]:
        """kvm_run as u16/u32/u64 words (made on the first runner(): the lean runner reads no slices)."""
        words = self._words
        if words is None:
            mv = memoryview(self._mm)
            words = self._words = (mv.cast("H"), mv.cast("I"), mv.cast("Q"), mv)
        return words[0], words[1], words[2]

    @staticmethod
    def _intern_out(outs: dict[int, tuple[int, Any, int, dict[int, X.IoOut]]], word: int, off: int,
                    view: Any, e: X.IoOut) -> None:
        """Remember an OUT for the lean runner (bounded: 4096 headers x 256 values)."""
        if off % e.size or len(outs) >= 4096:
            return
        entry = outs.get(word)
        if entry is None or entry[0] != off:
            entry = outs[word] = (off, view, off // e.size, {})
        if len(entry[3]) < 256:
            entry[3][int.from_bytes(e.data, "little")] = e

    def _run_failed(self, err: int | None = None) -> X.Exit:
        """KVM_RUN failed: a KVM_EXIT_MEMORY_FAULT (EFAULT with that exit reason, the one
        failure that is an exit) is returned; anything else raises."""
        if err is None:
            err = ffi.errno
        if err == _EFAULT_ and _U32.unpack_from(self._mm, _OFF_EXIT_REASON)[0] == _MEMORY_FAULT:
            return self.decode_exit()
        if err == _EINTR:
            self._mm[_OFF_IMMEDIATE_EXIT] = 0
            raise InterruptedError(_EINTR, "KVM_RUN interrupted")
        raise KvmError("KVM_RUN", err, self.run_failure_hint(err))

    def fast_loop(self) -> FastLoop | None:
        """This vCPU's compiled exit loop (``kvm/fastpath.py``), or None where the library is
        unavailable or ``KVMHARNESS_FASTPATH=0``; binds the thread ``kick()`` signals.
        None too while an ioctl recorder is installed: C issues KVM_RUN itself, unseen."""
        if K._recorder is not None:
            return None
        lib = fastpath.load()
        if lib is None:
            return None
        if self._fast is None:
            self._fast = FastLoop(lib, self.fd, self._mm, len(self._mm), self._lean_decoder())
        self._thread = _get_ident()
        return self._fast

    def run_failure_hint(self, err: int) -> str:
        if err == _errno.ENOSPC:
            return "no memory slot backs the guest's code or page tables"
        if err == _errno.ENOEXEC:
            return "the vCPU state cannot be entered"
        return ""

    def decode_exit(self) -> X.Exit:
        """Turn ``kvm_run`` into one exit value (the only reader of the exit union)."""
        mm = self._mm
        reason = _U32.unpack_from(mm, _OFF_EXIT_REASON)[0]
        self._pending = None
        if reason == 2:  # KVM_EXIT_IO
            # Exit values are immutable, so identical IO exits are interned: a loop
            # that writes the same byte to the same port allocates nothing per exit.
            head = self._io_heads.get(mm[_OFF_UNION:_OFF_UNION + 16])
            if head is None:
                head = self._io_head(mm[_OFF_UNION:_OFF_UNION + 16])
            out, port, size, count, off, n, known = head
            if isinstance(known, dict):  # an OUT: data -> interned IoOut
                data = mm[off:off + n]
                io_out = known.get(data)
                if io_out is None:
                    io_out = X.IoOut(port, size, count, data)
                    if len(known) < 256:
                        known[data] = io_out
                return io_out
            self._pending, self._pending_off = known, off  # an IN: known is the IoIn value
            return known
        if reason == 6:  # KVM_EXIT_MMIO
            addr, data, length, is_write = _MMIO.unpack_from(mm, _OFF_UNION)
            if is_write:
                return X.MmioWrite(addr, length, data[:length])
            mmio_read = X.MmioRead(addr, length)
            self._pending, self._pending_off = mmio_read, _OFF_UNION + 8
            return mmio_read
        if reason == 5:
            return _HLT
        if reason == 8:
            return _SHUTDOWN
        if reason == 29 or reason == 30:  # X86_RDMSR / X86_WRMSR
            _, msr_reason, index, data = _MSR.unpack_from(mm, _OFF_UNION)
            msr: X.Exit = X.MsrRead(index, msr_reason) if reason == 29 else X.MsrWrite(index, data, msr_reason)
            self._pending, self._pending_off = msr, _OFF_UNION
            return msr
        if reason == 4:
            exc, _, pc, dr6, dr7 = _DEBUG.unpack_from(mm, _OFF_UNION)
            return X.Debug(exc, pc, dr6, dr7)
        if reason == 24:
            etype, ndata, *event_data = _SYSTEM_EVENT.unpack_from(mm, _OFF_UNION)
            if etype == X.KVM_SYSTEM_EVENT_SEV_TERM:
                return X.SevTermination(event_data[0] if ndata else 0)
            return X.SystemEvent(etype, tuple(event_data[:ndata]))
        if reason == 17:
            sub, ndata, *internal_data = _INTERNAL.unpack_from(mm, _OFF_UNION)
            return X.InternalError(sub, tuple(internal_data[:min(ndata, 16)]))
        if reason == 9:
            hw, cpu = _FAIL_ENTRY.unpack_from(mm, _OFF_UNION)
            return X.FailEntry(hw, cpu)
        if reason == _MEMORY_FAULT:
            flags, gpa, size = _MEMORY_FAULT_S.unpack_from(mm, _OFF_UNION)
            return X.MemoryFault(flags, gpa, size)
        if reason == 3:
            nr, *rest = _HYPERCALL.unpack_from(mm, _OFF_UNION)
            hypercall = X.Hypercall(nr, tuple(rest[:6]))
            self._pending, self._pending_off = hypercall, _OFF_UNION + 56
            return hypercall
        return X.Unsupported(reason)

    def _io_head(self, raw: bytes) -> _IoHead:
        """Decode (and cache) one kvm_run.io header: direction, size, port, count, data_offset."""
        direction, size, port, count, off = _IO.unpack(raw)
        head: _IoHead
        if direction == _IO_DIRECTION_OUT:
            head = (True, port, size, count, off, size * count, {})
        else:
            head = (False, port, size, count, off, size * count, X.IoIn(port, size, count))
        if len(self._io_heads) > 4096:
            self._io_heads.clear()
        self._io_heads[raw] = head
        return head

    def complete(self, value: int | bytes = 0, *, error: bool = False) -> None:
        """Write the data the pending exit asked for into ``kvm_run``.

        IoIn: ``size*count`` bytes at ``io.data_offset``; MmioRead: ``mmio.data``;
        MsrRead: ``msr.data`` (``error=True``: KVM injects #GP); MsrWrite:
        ``error=True`` refuses the write (#GP); Hypercall: ``hypercall.ret``.
        """
        p = self._pending
        if p is None:
            raise UsageError("complete() called but the last exit asked for no data")
        mv, off = self._mm, self._pending_off
        if isinstance(p, X.IoIn):
            n = p.size * p.count
            data = value if isinstance(value, (bytes, bytearray)) else int(value).to_bytes(n, "little")
            mv[off:off + n] = bytes(data[:n]).ljust(n, b"\0")
        elif isinstance(p, X.MmioRead):
            data = value if isinstance(value, (bytes, bytearray)) else int(value).to_bytes(8, "little")
            mv[off:off + p.size] = bytes(data[:p.size]).ljust(p.size, b"\0")
        elif isinstance(p, (X.MsrRead, X.MsrWrite)):
            mv[off] = 1 if error else 0
            if isinstance(p, X.MsrRead) and not error:
                struct.pack_into("<Q", mv, off + 16, int(value) & (2**64 - 1))
        elif isinstance(p, X.Hypercall):
            struct.pack_into("<Q", mv, off, int(value) & (2**64 - 1))
        self._pending = None

    def kick(self) -> None:
        """Make KVM_RUN return EINTR now (or immediately on its next entry)."""
        self._mm[_OFF_IMMEDIATE_EXIT] = 1
        if self._thread:
            with contextlib.suppress(ProcessLookupError, OSError):  # the thread has exited
                signal.pthread_kill(self._thread, KICK_SIGNAL)

    # -- state ----------------------------------------------------------------------
    def _get_state(self, name: str, request: int, buf: Any) -> None:
        """KVM_GET_REGS / KVM_GET_SREGS; EINVAL on a VM type with protected state says why.

        Since Linux 6.10 ("KVM: x86: add fields to struct kvm_arch for CoCo features"),
        KVM_GET/SET_REGS, KVM_GET/SET_SREGS (and SREGS2, DEBUGREGS, XCRS; XSAVE and FPU
        once the FPU state is confidential) fail with EINVAL when the VM type has protected
        state (KVM_X86_SEV_ES_VM, KVM_X86_SNP_VM: svm.c svm_vm_init) and the vCPU's VMSA is
        encrypted (LAUNCH_UPDATE_VMSA sets guest_state_protected).  A legacy
        KVM_SEV_ES_INIT VM (type 0) still answers from KVM's register cache."""
        ret, err = ioctl_raw(self.fd, request, buf)
        if ret < 0:
            protected = err == _errno.EINVAL and self.vm.vm_type in PROTECTED_STATE_VM_TYPES
            raise KvmError(name, err, PROTECTED_STATE_HINT if protected else "")

    def get_regs(self) -> Regs:
        """KVM_GET_REGS."""
        buf = ffi.new("struct kvm_regs *")
        self._get_state("KVM_GET_REGS", K.KVM_GET_REGS, buf)
        return Regs(*_REGS.unpack(ffi.buffer(buf)))

    def set_regs(self, regs: Regs) -> None:
        """KVM_SET_REGS."""
        if type(regs) is FrozenRegs:  # a shared immutable state: packed once, its kvm_regs kept
            hit = _PACKED.get(id(regs))
            if hit is None:
                hit = _remember_packed(regs, _REGS_PTR, _REGS.pack(*[v & _U64_MASK for v in _REG_FIELDS(regs)]))
            ioctl(self.fd, _KVM_SET_REGS, hit[1])
            return
        buf, view = self._set_bufs()[0]
        _REGS.pack_into(view, 0, *[v & _U64_MASK for v in _REG_FIELDS(regs)])
        ioctl(self.fd, _KVM_SET_REGS, buf)

    def _set_bufs(self) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
        """This vCPU's kvm_regs and kvm_sregs buffers for set_regs/set_sregs (made once)."""
        bufs = self._bufs
        if bufs is None:
            regs, sregs = ffi.new("struct kvm_regs *"), ffi.new("struct kvm_sregs *")
            bufs = self._bufs = ((regs, ffi.buffer(regs)), (sregs, ffi.buffer(sregs)))
        return bufs

    def get_sregs(self) -> Sregs:
        """KVM_GET_SREGS."""
        buf = ffi.new("struct kvm_sregs *")
        self._get_state("KVM_GET_SREGS", K.KVM_GET_SREGS, buf)
        v = _SREGS.unpack(ffi.buffer(buf))
        cs, ds, es, fs, gs, ss, tr, ldt = (Segment(*v[i * 13:i * 13 + 12]) for i in range(8))
        gdt = DTable(v[104], v[105])
        idt = DTable(v[106], v[107])
        cr0, cr2, cr3, cr4, cr8, efer, apic_base = v[108:115]
        return Sregs(cs, ds, es, fs, gs, ss, tr, ldt, gdt, idt, cr0, cr2, cr3, cr4, cr8, efer, apic_base)

    def set_sregs(self, s: Sregs) -> None:
        """KVM_SET_SREGS (interrupt_bitmap cleared: no pending interrupt)."""
        if type(s) is FrozenSregs:  # a shared immutable state (boot.entry_state): packed once
            hit = _PACKED.get(id(s))
            buf = (hit or _remember_packed(s, _SREGS_PTR, _pack_sregs(s)))[1]
        else:
            buf, view = self._set_bufs()[1]
            view[:] = _pack_sregs(s)
        ret, err = ioctl_raw(self.fd, _KVM_SET_SREGS, buf)
        if ret < 0:
            raise KvmError("KVM_SET_SREGS", err,
                           "KVM refused the segment/control register state (e.g. EFER bits the "
                           "guest CPUID does not offer, or LMA without PG)" if err == _errno.EINVAL else "")

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """KVM_GET_MSRS; MSRs KVM cannot read are absent from the result."""
        indices = list(indices)
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + 16 * len(indices))
        m = ffi.cast("struct kvm_msrs *", buf)
        m.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            m.entries[i].index = idx
        n = ioctl(self.fd, K.KVM_GET_MSRS, m)
        return {m.entries[i].index: m.entries[i].data for i in range(n)}

    def set_msrs(self, values: Mapping[int, int]) -> int:
        """KVM_SET_MSRS; returns how many were written (KVM stops at the first it refuses)."""
        items = list(values.items())
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + 16 * len(items))
        m = ffi.cast("struct kvm_msrs *", buf)
        m.nmsrs = len(items)
        for i, (idx, val) in enumerate(items):
            m.entries[i].index = idx
            m.entries[i].data = val
        return ioctl(self.fd, K.KVM_SET_MSRS, m)

    def set_cpuid(self, entries: Iterable[CpuidEntry]) -> None:
        """KVM_SET_CPUID2."""
        entries = list(entries)
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        c = ffi.cast("struct kvm_cpuid2 *", buf)
        c.nent = len(entries)
        for i, e in enumerate(entries):
            d = c.entries[i]
            d.function, d.index, d.flags = e.function, e.index, e.flags
            d.eax, d.ebx, d.ecx, d.edx = e.eax, e.ebx, e.ecx, e.edx
        ioctl(self.fd, K.KVM_SET_CPUID2, c)
        self.cpuid = tuple(entries)

    def get_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2."""
        nent = 256
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + nent * ffi.sizeof("struct kvm_cpuid_entry2"))
        c = ffi.cast("struct kvm_cpuid2 *", buf)
        c.nent = nent
        ioctl(self.fd, K.KVM_GET_CPUID2, c)
        return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (c.entries[i] for i in range(c.nent))]

    def set_single_step(self, enabled: bool) -> None:
        """KVM_SET_GUEST_DEBUG with KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP."""
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = (K.KVM_GUESTDBG_ENABLE | K.KVM_GUESTDBG_SINGLESTEP) if enabled else 0
        ioctl(self.fd, K.KVM_SET_GUEST_DEBUG, dbg)
        self._single_step = enabled

    def enable_sync_regs(self, enabled: bool = True) -> None:
        """kvm_run.kvm_valid_regs = KVM_SYNC_X86_REGS: KVM copies GPRs into kvm_run at
        every exit, so a trace can record RIP without a KVM_GET_REGS per exit.

        Not on a VM type with protected state (SEV-ES, SNP): the registers are not the
        host's, and since "KVM: x86: block KVM_CAP_SYNC_REGS if guest state is protected"
        (74c1807f6c4f, Linux 6.14, in stable kernels too) KVM_RUN fails with EINVAL while
        kvm_valid_regs is nonzero there: FeatureUnavailable instead."""
        if enabled and self.vm.vm_type in PROTECTED_STATE_VM_TYPES:
            raise FeatureUnavailable("KVM_SYNC_X86_REGS on an SEV-ES/SNP VM type: its register "
                                     "state is protected (KVM_RUN refuses kvm_valid_regs there)")
        self.kvm_run.kvm_valid_regs = K.KVM_SYNC_X86_REGS if enabled else 0

    def synced_rip(self) -> int:
        """RIP as KVM synced it into kvm_run at the last exit (see enable_sync_regs)."""
        return int(self.kvm_run.s.regs.regs.rip)

    def kernel_tracer(self) -> KvmTracepoints:
        """A context manager recording KVM's tracepoints for this vCPU's thread."""
        from .tracepoints import KvmTracepoints

        return KvmTracepoints()

    def get_nested_state(self) -> NestedState:
        """KVM_GET_NESTED_STATE (kvm/nested.py; FeatureUnavailable without the cap)."""
        from .nested import get_nested_state

        return get_nested_state(self)

    def set_nested_state(self, state: NestedState) -> None:
        """KVM_SET_NESTED_STATE (kvm/nested.py)."""
        from .nested import set_nested_state

        set_nested_state(self, state)

    def complete_pending_exit(self) -> None:
        """KVM_RUN with ``immediate_exit`` set (kvm/nested.py)."""
        from .nested import complete_pending_exit

        complete_pending_exit(self)

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._fast is not None:  # a thread still in the C loop keeps kvm_run mapped until GC
            self._fast.release()
        if self._words is not None:
            for view in self._words:
                view.release()
        if self._run_ptr is not None:
            ffi.release(self._run_ptr)
            self._run_ptr = self._run_struct = None
        try:  # noqa: SIM105 (not contextlib.suppress: an object and two calls per close, issue 15)
            self._mm.close()
        except BufferError:  # a caller still holds a view of kvm_run: GC unmaps it
            pass
        os.close(self.fd)
        self.fd = -1

    def __repr__(self) -> str:
        return f"KvmVcpu(id={self.vcpu_id}, fd={self.fd})"


def _pack_sregs(s: Sregs) -> bytes:
    """kvm_sregs bytes of ``s`` (the interrupt bitmap zero)."""
    f = _SEG_FIELDS
    return _SREGS_SET.pack(*f(s.cs), *f(s.ds), *f(s.es), *f(s.fs), *f(s.gs), *f(s.ss), *f(s.tr), *f(s.ldt),
                           s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit,
                           s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base)


def _remember_packed(state: object, ctype: Any, packed: bytes) -> tuple[object, Any]:
    """Keep a frozen state's packed struct (a bounded cache: cleared when full) as a typed
    pointer over the bytes, which the ioctl reads and nothing writes, and return the entry."""
    if len(_PACKED) >= _PACKED_MAX:
        _PACKED.clear()
    entry = _PACKED[id(state)] = (state, ffi.from_buffer(ctype, packed))
    return entry
