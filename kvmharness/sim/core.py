"""The CPU core: unicorn 2.1.4 (QEMU's TCG x86), driven for precise, SVM-shaped exits.

Why this shape (measured with unicorn 2.1.4 on a 2-core EPYC VM; the numbers are in the bullets below):

* **Entry through the emulated SVM.**  The engine is a UC_MODE_64 engine on the EPYC
  CPU model.  A three-instruction host stub (``vmload rax; vmrun rax; hlt``) at a
  hidden host address runs VMRUN on *our* VMCB page (mapped into the engine's
  physical space), so QEMU's SVM implementation loads the guest state from the
  VMCB save area -- real mode, protected or long mode with our page tables, all
  from one engine -- and takes the intercept vectors from the VMCB control area.
  Intercepted CPUID / RDMSR / WRMSR / HLT / VMMCALL / CRn / DRn ... then arrive in
  ``UC_HOOK_INTR`` as ``0x100 + exit code`` with RIP at the instruction: the only
  way unicorn offers to trap RDMSR/WRMSR/HLT/VMMCALL at all, and free for code
  that does not exit.
* **Precise stops after IN/OUT: code hooks on the instruction after each one.**
  unicorn ignores the IOIO intercept (its ``gen_check_io`` returns early), and
  ``emu_stop()`` from an IN/OUT hook takes effect only when the translation block
  ends, after the instructions that follow.  unicorn does check for a pending stop
  right after every code hook, so each IN/OUT the model finds gets a C no-op code
  hook on the next instruction (``add_io_site``): the stop lands exactly there.
  IN/OUTs are found when a block is translated (UC_HOOK_EDGE_GENERATED: the block
  is scanned with iced-x86, and if it holds new sites it is stopped before it runs,
  hooked and translated again) and, for the first block of each run (no edge event
  is raised for it), by scanning the straight-line code at the start address.
  Everything else that exits is precise already: intercepts and faults end the
  block, an unbacked access (the NPF) faults, HLT is intercepted.
  Measured: ~0.5-1.2 G straight-line guest instructions/s, ~5 us per IO exit.
  The alternative, ``count = 2**62`` on every run (unicorn then checks for a stop
  after every instruction: simple, no foreknowledge of the code), runs
  straight-line code at only ~90-100 M/s; it stays selectable with
  ``KVMHARNESS_SIM_PRECISION=count``, and the test suite passes in both modes.
  Quirk handled: without a count unicorn raises a guest fault twice before the
  INTR hook sees it (a #PF arrives as #DF); faults are restartable, so the model
  re-executes the instruction under a count of 1 (``start_counted``) and gets the
  real one.  UC_HOOK_CODE on every instruction from Python runs at ~2 M/s and
  ``ctl_set_exits`` needs the addresses before translation, hence neither.
* **Hot path in C and cffi.**  The IN/OUT hooks are C functions (``simhooks.c``):
  one records the access and the registers the model reads at the instruction,
  and stops the engine; ``start`` hands the record to the model once
  ``uc_emu_start`` returns (``_dispatch_io``), with the engine's registers shown
  as they stood in the hook, so the model sees exactly what a Python hook saw.
  The model takes the record's fields as arguments (``on_out_recorded``), and only where
  something else may read the engine then are its registers shown as they stood in the
  hook first.  ``uc_emu_start`` and register access go through cffi, not the binding's
  wrappers (2-3 us per register) nor ctypes.  Without a C compiler, or with
  ``KVMHARNESS_SIM_CHOOKS=0``, the hooks are Python (ctypes callbacks) and run
  the same model inside the engine.
* **No real #VMEXIT.**  unicorn diverts intercepts to the hook before QEMU's
  ``do_vmexit``, so the guest stays in guest mode; the model (``svm.Svm``) writes
  the exit into the VMCB itself.  Changing segment state wholesale (set_sregs,
  real-mode event delivery) therefore re-enters with a fresh engine and a new
  VMRUN from the VMCB, which is exact and costs ~1 ms.
* **Exceptions are ours.**  unicorn never delivers through the IDT/IVT; faults
  arrive as ``UC_HOOK_INTR(vector)`` (``#UD`` as ``UC_HOOK_INSN_INVALID``) and
  ``events`` delivers them.  QEMU's "exception in flight" state is reset by hand
  after each one (``reset_exception_state``), else every later fault became #DF.
* **Where the engine differs from the VMCB it is given** (``sync_svm_pages``):
  NP_ENABLE is cleared (the engine's own memory map plays the nested page table;
  an unbacked GPA reaches the unmapped-memory hook, which is the NPF), CR2
  accesses are intercepted (unicorn clobbers CR2, so the model keeps it) and CR0
  writes are always intercepted (to apply KVM's CR0 / SELECTIVE_CR0 rules, which
  QEMU lacks).  These engine-only intercepts never appear in the trace.  And
  unicorn's VMRUN does not load CR0: ``enter`` writes it after VMRUN.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading

import unicorn
from unicorn import x86_const as X

from ..errors import SimulatorError
from . import simhooks
from .ucbinding import raw_handle, release_engine, take_hook_exception
from .ucbinding import uclib as _uclib

# Host-only physical page range (below the 40-bit physical limit of the model CPU).
HOST_BASE = 0xFF_FFF0_0000
HOST_SIZE = 0x10000
HOST_STUB = HOST_BASE
HOST_VMCB = HOST_BASE + 0x1000
HOST_HSAVE = HOST_BASE + 0x2000
HOST_MSRPM = HOST_BASE + 0x4000
HOST_IOPM = HOST_BASE + 0x8000
UNTIL = 0xFFFF_8000_DEAD_0000 & ~0xF  # never reached: all stops are requested
# How exits after IN/OUT are made precise (see the module docstring): "sites" (default)
# or "count" (the simpler, ~10x slower straight-line mode).
PRECISION = os.environ.get("KVMHARNESS_SIM_PRECISION", "sites")
if PRECISION not in ("sites", "count"):  # any other value ran guests in neither mode, wrongly
    from ..errors import UsageError

    raise UsageError(f"KVMHARNESS_SIM_PRECISION={PRECISION!r}: choose sites (the default) or count")
RUN_COUNT = (1 << 62) if PRECISION == "count" else 0
PRECISE_COUNT = 1 << 62

# vmload rax; vmrun rax; hlt
HOST_STUB_CODE = bytes.fromhex("0f01da" "0f01d8" "f4")
_STUB_ATTEMPTS = 16  # a kick stops the engine at most 3 times (sim/vcpu.py kick); more is a bug

MSR_EFER = 0xC0000080
MSR_VM_HSAVE_PA = 0xC0010117
EFER_SVME = 1 << 12

GPR_IDS = (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX,
           X.UC_X86_REG_RSI, X.UC_X86_REG_RDI, X.UC_X86_REG_RSP, X.UC_X86_REG_RBP,
           X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
           X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15,
           X.UC_X86_REG_RIP, X.UC_X86_REG_RFLAGS)
SEG_IDS = {"es": X.UC_X86_REG_ES, "cs": X.UC_X86_REG_CS, "ss": X.UC_X86_REG_SS,
           "ds": X.UC_X86_REG_DS, "fs": X.UC_X86_REG_FS, "gs": X.UC_X86_REG_GS}
MMR_IDS = {"gdtr": X.UC_X86_REG_GDTR, "idtr": X.UC_X86_REG_IDTR, "ldtr": X.UC_X86_REG_LDTR,
           "tr": X.UC_X86_REG_TR}
CR_IDS = {0: X.UC_X86_REG_CR0, 2: X.UC_X86_REG_CR2, 3: X.UC_X86_REG_CR3, 4: X.UC_X86_REG_CR4,
          8: X.UC_X86_REG_CR8}
DR_IDS = {n: getattr(X, f"UC_X86_REG_DR{n}") for n in range(8)}

# raw prototypes on our own handle of the same library (the binding's stay untouched)
_lib = ctypes.CDLL(_uclib._name)
_u64p = ctypes.POINTER(ctypes.c_uint64)
# uc_reg_read has no argtypes: its callers (sim/vcpu.py, twice per IO exit) pass the handle as
# a c_void_p and the value as a byref, which ctypes passes as pointers without a per-argument
# from_param conversion (measured 0.43 -> 0.25 us a call).  Never pass it a plain int handle.
_lib.uc_reg_write.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_lib.uc_reg_read_batch.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                   ctypes.POINTER(ctypes.c_void_p), ctypes.c_int)
_lib.uc_emu_start.argtypes = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64,
                              ctypes.c_size_t)
_lib.uc_emu_stop.argtypes = (ctypes.c_void_p,)
_lib.uc_hook_add.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_int,
                             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                             ctypes.c_int)
_lib.uc_hook_add.restype = ctypes.c_int

_lib.uc_context_size.argtypes = (ctypes.c_void_p,)
_lib.uc_context_size.restype = ctypes.c_size_t
_lib.uc_context_alloc.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p))
_lib.uc_context_save.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
_lib.uc_context_restore.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
_lib.uc_context_free.argtypes = (ctypes.c_void_p,)
# unicorn 2.1.4 x86-64: struct uc_context header, sizeof(CPUX86State) saved, and the offset
# of env->old_exception in it (see Core.reset_exception_state)
_CTX_HEADER = 40
_CONTEXT_SIZE = 5568
_OLD_EXCEPTION_OFFSET = 5496

_OUT_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32,
                           ctypes.c_void_p)
_IN_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                          ctypes.c_void_p)
# A C function that ignores its arguments, used as a code hook whose only effect is the
# stop check unicorn emits after every code hook: libc's abs(int) (x86-64 SysV: extra
# arguments are ignored, the int return value is discarded by unicorn's void call).
_NOOP_CODE_HOOK = ctypes.cast(ctypes.CDLL(None).abs, ctypes.c_void_p)

# the C IN/OUT hooks (None: Python hooks) and libunicorn through cffi, for the per-exit calls
_CHOOKS = simhooks.load()
_CHOOK_ADDRS = simhooks.hook_addresses(_CHOOKS) if _CHOOKS is not None else None
_STOP_HOOK = simhooks.stop_hook_address(_CHOOKS) if _CHOOKS is not None else None
_cffi = simhooks.ffi
_uc = simhooks.uc
_uc_emu_start = _uc.uc_emu_start
_uc_reg_read = _uc.uc_reg_read
_uc_reg_write = _uc.uc_reg_write
_REG_RIP = X.UC_X86_REG_RIP
_SH_OUT = simhooks.SH_OUT
_RECORD, _RECORD_OFFSET = simhooks.RECORD.unpack_from, simhooks.RECORD_OFFSET
_PENDING_WORD = simhooks.PENDING_WORD

UC_ERR_OK = unicorn.UC_ERR_OK
UC_ERR_READ_UNMAPPED = unicorn.UC_ERR_READ_UNMAPPED
UC_ERR_WRITE_UNMAPPED = unicorn.UC_ERR_WRITE_UNMAPPED
UC_ERR_FETCH_UNMAPPED = unicorn.UC_ERR_FETCH_UNMAPPED
UC_ERR_WRITE_PROT = unicorn.UC_ERR_WRITE_PROT


class Core:
    """One unicorn engine running one vCPU's guest inside emulated SVM guest mode.

    ``handler`` receives the hook events: ``on_out(port, size, value)``,
    ``on_in(port, size) -> int``, ``on_intr(intno)``, ``on_invalid()``,
    ``on_unmapped(access, addr, size, value) -> bool``.
    """

    def __init__(self, regions, svm, handler):
        self.regions = regions  # the Vm's list of (gpa, size, ctypes address, readonly)
        self.svm = svm
        self.handler = handler
        self.uc = None
        self.uch = None
        # stop() may come from another thread (Vcpu.kick from the watchdog and its re-try
        # timers): it must never reach an engine _release_engine is freeing
        self._engine_lock = threading.Lock()
        self._keep = []
        self._host = (ctypes.c_char * HOST_SIZE)()
        ctypes.memmove(ctypes.addressof(self._host), HOST_STUB_CODE, len(HOST_STUB_CODE))
        self._buf = ctypes.c_uint64()
        self._bufp = ctypes.byref(self._buf)
        self._cbuf = _cffi.new("uint64_t[1]")  # for the cffi register calls
        self._cuch = _cffi.NULL  # the engine handle as cffi sees it
        # the C hooks' record of the last IN/OUT (None: Python hooks)
        self._io = simhooks.new_io_record() if _CHOOKS is not None else None
        self.chooks = self._io is not None
        # the record as bytes (one unpack per exit) and as uint32 words (its pending flag)
        self._io_buf = _cffi.buffer(self._io) if self.chooks else None
        self._io_words = memoryview(self._io_buf).cast("I") if self.chooks else None
        self.in_guest = False
        self._ctx = None
        self.hook_error = None
        self.io_sites = {}  # linear address of an IN/OUT/INS/OUTS -> last byte to hook
        # callables run on every fresh engine, after the regions and hooks (sim/sev.py maps the
        # plaintext alias of encrypted memory and installs its page-table walker here)
        self.build_hooks = []
        # set by sim/sev.py for an SEV guest: its own walk of the guest's page tables
        # (C-bit aware); translate() defers to it
        self.mmu = None
        self.build()

    # -- engine lifecycle ----------------------------------------------------
    def build(self) -> None:
        """A fresh engine with every region mapped and every hook installed."""
        self._release_contexts()
        self._release_engine()  # a rebuild (a new VMRUN from guest mode) frees the old engine now
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.ctl_set_cpu_model(X.UC_CPU_X86_EPYC)  # must precede mem_map (docs/facts.md#unicorn-memory)
        # unicorn initializes an engine lazily, in the first call that needs it (here the
        # mem_map_ptr), and uc_emu_stop is such a call (UC_INIT): a stop() from the watchdog
        # thread reaching the handle before that would initialize it concurrently with this
        # thread -- tcg.c "assertion failed: !err" or a SIGSEGV, the process gone.  Publish
        # the handle to stop() only under the engine lock, initialized.
        with self._engine_lock:
            uc.mem_map_ptr(HOST_BASE, HOST_SIZE, unicorn.UC_PROT_ALL, ctypes.addressof(self._host))
            self.uc = uc
            self.uch = raw_handle(uc)
            self._cuch = _cffi.cast("void *", self.uch.value)
        self._keep = []
        # The SVM pages live in the model's bytearrays; the page-aligned host window holds
        # copies refreshed before each VMRUN / consulted by the core (see enter()).
        for gpa, size, addr, readonly in self.regions:
            self.map_region(gpa, size, addr, readonly)
        h = self.handler
        hh = ctypes.c_size_t()
        if self._io is not None:  # C hooks: record and stop, the model runs after the stop
            self._io.pending = 0
            user_data = int(_cffi.cast("uintptr_t", self._io))
            hooks = tuple(zip(_CHOOK_ADDRS, (X.UC_X86_INS_OUT, X.UC_X86_INS_IN)))
        else:
            self._out_cb = _OUT_CB(h.on_out)
            self._in_cb = _IN_CB(h.on_in)
            user_data = None
            hooks = ((ctypes.cast(self._out_cb, ctypes.c_void_p), X.UC_X86_INS_OUT),
                     (ctypes.cast(self._in_cb, ctypes.c_void_p), X.UC_X86_INS_IN))
        for cb, insn in hooks:
            rc = _lib.uc_hook_add(self.uch, ctypes.byref(hh), unicorn.UC_HOOK_INSN, cb, user_data,
                                  1, 0, insn)
            if rc:
                raise SimulatorError(f"uc_hook_add(INSN {insn}) failed: {rc}")
        io = self._io

        def first(fn):
            """A Python hook runs after any IN/OUT the C hooks recorded (never expected: the
            stop lands right after the IN/OUT), as it would after a Python IN/OUT hook."""
            if io is None:
                return fn

            words = self._io_words

            def hook(*args):
                if words[_PENDING_WORD]:
                    self._dispatch_io()
                return fn(*args)
            return hook

        on_intr, on_invalid = first(h.on_intr), first(h.on_invalid)
        on_unmapped, on_new_block = first(h.on_unmapped), first(h.on_new_block)
        uc.hook_add(unicorn.UC_HOOK_INTR, lambda _uc, intno, _ud: on_intr(intno))
        uc.hook_add(unicorn.UC_HOOK_INSN_INVALID, lambda _uc, _ud: on_invalid())
        uc.hook_add(unicorn.UC_HOOK_MEM_UNMAPPED | unicorn.UC_HOOK_MEM_WRITE_PROT,
                    lambda _uc, acc, addr, size, val, _ud: on_unmapped(acc, addr, size, val))
        if PRECISION == "sites":
            uc.hook_add(unicorn.UC_HOOK_EDGE_GENERATED,
                        lambda _uc, cur, _prev, _ud: on_new_block(cur.pc, cur.size))
            for site, end in list(self.io_sites.items()):
                self._hook_site(site, end)
        for fn in self.build_hooks:
            fn(self)
        if _lib.uc_context_size(self.uch) == _CTX_HEADER + _CONTEXT_SIZE:
            self._ctx = ctypes.c_void_p()
            if _lib.uc_context_alloc(self.uch, ctypes.byref(self._ctx)):
                self._ctx = None
        self.in_guest = False
        # self._host_ctx (None now): host-mode CPU state for enter(reuse=True), saved at its first use

    def reset_exception_state(self) -> None:
        """Set QEMU's ``env->old_exception`` back to -1 (no exception in flight).

        QEMU escalates a fault to #DF / triple fault from ``old_exception``, which only
        its ``do_interrupt`` resets once an event is delivered -- and unicorn never calls
        it (it hands exceptions to the INTR hook; the model delivers them).  Left alone,
        every #PF after the first would become a #DF.  The field sits at a fixed offset
        of the CPU context of this unicorn build (found by comparing contexts before and
        after a #PF; guarded by the context size).
        """
        if self._ctx is None:
            return
        _lib.uc_context_save(self.uch, self._ctx)
        addr = self._ctx.value + _CTX_HEADER + _OLD_EXCEPTION_OFFSET
        if ctypes.c_int32.from_address(addr).value != -1:
            ctypes.c_int32.from_address(addr).value = -1
            _lib.uc_context_restore(self.uch, self._ctx)

    def hook_failed(self, error: BaseException) -> None:
        """A raw ctypes callback cannot raise: keep the error, stop, re-raise after the run."""
        if self.hook_error is None:
            self.hook_error = error
        _lib.uc_emu_stop(self.uch)

    def take_hook_error(self):
        """The first exception a hook raised during the last run (binding or raw hooks)."""
        err, self.hook_error = self.hook_error, None
        if err is None and self.uc is not None:
            err = take_hook_exception(self.uc)
        return err

    def add_io_site(self, site: int, after: int) -> None:
        """Put a code hook on the instruction after an IN/OUT/INS/OUTS at ``site``.

        unicorn checks for a pending stop right after every code hook, so the stop the
        IN/OUT hook requested takes effect there, exactly one instruction later (a REP
        INS/OUTS ends its block after each element, which checks too).  The hook itself
        is a C no-op: no Python runs for it.
        """
        if site not in self.io_sites:
            self.io_sites[site] = after
            self._hook_site(site, after)

    def _hook_site(self, site, after):
        hh = ctypes.c_size_t()
        rc = _lib.uc_hook_add(self.uch, ctypes.byref(hh), unicorn.UC_HOOK_CODE, _NOOP_CODE_HOOK,
                              None, after, after, 0)
        if rc:
            raise SimulatorError(f"uc_hook_add(CODE {site:#x}) failed: {rc}")

    def map_region(self, gpa, size, addr, readonly) -> None:
        perms = unicorn.UC_PROT_READ | unicorn.UC_PROT_EXEC if readonly else unicorn.UC_PROT_ALL
        self.uc.mem_map_ptr(gpa, size, perms, addr)

    def unmap(self, gpa, size) -> None:
        self.uc.mem_unmap(gpa, size)

    def close(self) -> None:
        """Free the engine now: its contexts, its hooks' callbacks and the uc itself.

        A unicorn ``Uc`` is always in a reference cycle (its ``_callbacks`` hold wrappers
        that hold the ``Uc``; our hooks hold this Core through the vCPU), so without this
        its ``uc_close`` -- and the engine's translation buffer and guest-mode copies --
        would wait for the cyclic GC's oldest generation.  The binding frees the handle in
        a ``weakref.finalize``; calling that finalizer runs ``uc_close`` once, now, and
        never again at collection.
        """
        self._release_engine()
        self._release_contexts()
        self.build_hooks = []
        self.handler = self._out_cb = self._in_cb = None

    def _release_engine(self) -> None:
        with self._engine_lock:
            uc, self.uc, self.uch = self.uc, None, None
            if uc is not None:
                release_engine(uc)

    def _release_contexts(self) -> None:
        for name in ("_ctx", "_host_ctx"):
            ctx = getattr(self, name, None)
            if ctx is not None:
                _lib.uc_context_free(ctx)
            setattr(self, name, None)

    # -- entering the guest: VMLOAD + VMRUN on the VMCB ------------------------
    def enter(self, gprs: dict, count: int | None = RUN_COUNT, *, reuse: bool = False) -> int:
        """Rebuild the engine if it is in guest mode, then VMRUN from the host stub.

        ``reuse``: instead of rebuilding, restore the host-mode CPU state saved at the
        first such entry and VMRUN in the same engine (sim/nested.py's VMCB switches).

        ``gprs``: the GPRs VMRUN does not load (all but RAX/RSP/RIP come from the
        host's registers, as on hardware, where KVM loads them before VMRUN).
        Returns the unicorn error of the run (the guest runs until its first stop).
        """
        if self.in_guest:
            if reuse and self._host_ctx is not None:
                # back to the host-mode CPU state saved before an earlier VMRUN: the same engine
                # (memory, hooks, translated code) VMRUNs again, ~100x cheaper than build()
                _lib.uc_context_restore(self.uch, self._host_ctx)
            else:
                self.build()
        c = self.svm.vmcb.control
        c.iopm_base_pa = HOST_IOPM
        c.msrpm_base_pa = HOST_MSRPM
        self.sync_svm_pages()
        uc = self.uc
        uc.msr_write(MSR_EFER, uc.msr_read(MSR_EFER) | EFER_SVME)
        uc.msr_write(MSR_VM_HSAVE_PA, HOST_HSAVE)
        for name, value in gprs.items():
            self.set_reg(getattr(X, f"UC_X86_REG_{name.upper()}"), value)  # raw: 64-bit GPRs
        uc.reg_write(X.UC_X86_REG_RAX, HOST_VMCB)
        if reuse and self._host_ctx is None:
            ctx = ctypes.c_void_p()
            if not _lib.uc_context_alloc(self.uch, ctypes.byref(ctx)):
                _lib.uc_context_save(self.uch, ctx)
                self._host_ctx = ctx
        self.in_guest = True
        self.reset_exception_state()
        for _attempt in range(_STUB_ATTEMPTS):
            if reuse:
                # stop at the guest's first instruction by its address: a count would make unicorn
                # drop every translated block at the next run without one (uc_emu_start)
                s = self.svm.vmcb.save
                err = _lib.uc_emu_start(self.uch, HOST_STUB, (s.cs.base + s.rip) & (2**64 - 1), 0, 0)
            else:
                err = self.start(HOST_STUB, 2)  # VMLOAD, VMRUN: stops at the guest's first instruction
            # A stop() from another thread (a kick at the deadline) can land before the stub's
            # VMRUN ran: the engine is still in host mode in the stub.  Run the stub again
            # (VMLOAD is idempotent); the kick itself stays pending in the vCPU, which raises
            # EINTR after the guest's next stop.  (Unhandled, the guest then "ran" the host
            # stub and ended in a SHUTDOWN exit: ~1 in 200 runs with a 1 ms timeout.)
            if err or not HOST_STUB <= self.rip() < HOST_STUB + len(HOST_STUB_CODE):
                break
        else:
            raise SimulatorError(f"VMRUN from the host stub was stopped {_STUB_ATTEMPTS} times in a row")
        if err:
            return err
        if reuse and self.rip() != s.rip:
            raise SimulatorError(f"VMRUN did not stop at the guest's first instruction {s.rip:#x}")
        # unicorn's VMRUN leaves CR0 at the host value (measured: 0x11 after loading
        # 0x80000033); load it from the save area as the APM says VMRUN does.
        cr0 = self.svm.vmcb.save.cr0
        if self.cr(0) != cr0:
            self.uc.reg_write(X.UC_X86_REG_CR0, cr0)
        if count is None:  # enter only: the guest sits at its first instruction
            return UC_ERR_OK
        return self.start(self.rip(), count)

    def sync_svm_pages(self) -> None:
        """Copy the model's VMCB/IOPM/MSRPM bytes into the engine-visible host pages."""
        base = ctypes.addressof(self._host)
        svm = self.svm
        page = bytearray(svm.vmcb.raw)
        # The engine's own MMU plays the nested page table (guest-physical = the mapped
        # regions; an unbacked GPA is the NPF, seen by the unmapped-memory hook), so the
        # copy the engine reads has NP_ENABLE cleared: QEMU would otherwise walk an nCR3.
        page[0x90] &= ~1
        # unicorn clobbers CR2 (it reads back UNTIL-1 after any run), so the engine copy also
        # intercepts CR2 reads/writes and the model keeps CR2 itself (vcpu._cr_dr); these
        # engine-only intercepts are not KVM's and are not traced.
        page[0x00] |= 1 << 2
        page[0x02] |= 1 << 2
        # CR0: the engine never intercepts reads and always intercepts writes, so the model
        # can apply KVM's CR0 intercepts as they stand (they change with the guest's CR0,
        # svm.c svm_set_cr0) and the SELECTIVE_CR0 rule QEMU does not implement.
        page[0x00] &= ~1
        page[0x02] |= 1
        ctypes.memmove(base + (HOST_VMCB - HOST_BASE), bytes(page), 4096)
        ctypes.memmove(base + (HOST_MSRPM - HOST_BASE), bytes(svm.msrpm), len(svm.msrpm))
        ctypes.memmove(base + (HOST_IOPM - HOST_BASE), bytes(svm.iopm), len(svm.iopm))

    def sync_msrpm(self) -> None:
        base = ctypes.addressof(self._host)
        ctypes.memmove(base + (HOST_MSRPM - HOST_BASE), bytes(self.svm.msrpm), len(self.svm.msrpm))

    def host_vmcb_exit_info_2(self) -> int:
        """EXITINFO2 of the engine's VMCB copy (where QEMU puts a guest #PF's address)."""
        off = HOST_VMCB - HOST_BASE + 0x80
        return struct.unpack_from("<Q", self._host, off)[0]

    def msrpm_host_byte(self, off: int, value: int | None = None) -> int:
        a = HOST_MSRPM - HOST_BASE + off
        old = self._host[a][0]
        if value is not None:
            self._host[a] = bytes((value,))
        return old

    # -- running -------------------------------------------------------------
    def start(self, begin: int, count: int = RUN_COUNT) -> int:
        err = _uc_emu_start(self._cuch, begin, UNTIL, 0, count)
        words = self._io_words
        if words is not None and words[_PENDING_WORD]:
            self._dispatch_io()
        return err

    def _dispatch_io(self) -> None:
        """Hand the IN/OUT the C hook recorded to the model: with the record's fields as
        arguments (sim/vcpu.py ``on_out_recorded``), or, where something else may read the
        engine meanwhile, as a Python hook would have seen it -- the engine's RIP on the
        instruction (for an IN also the RAX/RCX/RSI/RDI it had: an INS moves RDI and RCX, the
        IN's 0 lands in AX) while the model runs, then the registers as the stop left them."""
        h = self.handler
        rip, rax, rcx, _rsi, rdi, pending, port, size, value = _RECORD(self._io_buf, _RECORD_OFFSET)
        if pending == _SH_OUT:
            done = h.on_out_recorded(rip, port, size, value)
        else:
            done = h.on_in_recorded(rip, port, size, rax, rcx, rdi)
        if done:
            self._io_words[_PENDING_WORD] = 0
            return
        io, uch = self._io, self._cuch
        _CHOOKS.sh_show_hook(uch, io)
        try:
            if pending == _SH_OUT:
                h.on_out(None, port, size, value, None)
            else:
                h.on_in(None, port, size, None)
        finally:
            _CHOOKS.sh_show_stop(uch, io)  # clears io.pending

    def step_to(self, begin: int, after: int) -> int | None:
        """Run from ``begin`` and stop at the linear address ``after`` (the next instruction of
        one that always falls through to it), with the C stop hook put there: no instruction
        count, so the translated code stays.  Only the block holding ``begin``..``after`` is
        translated again, to carry the hook.  None where the C hooks are not loaded."""
        if _STOP_HOOK is None:
            return None
        hh = ctypes.c_size_t()
        user_data = int(_cffi.cast("uintptr_t", self._io))
        if _lib.uc_hook_add(self.uch, ctypes.byref(hh), unicorn.UC_HOOK_CODE, _STOP_HOOK, user_data,
                            after, after, 0):
            return None
        try:
            self.uc.ctl_remove_cache(begin, after + 1)  # blocks made before the hook
            return self.start(begin, 0)
        finally:
            _lib.uc_hook_del(self.uch, hh)

    def start_counted(self, begin: int, count: int) -> int:
        """Run exactly ``count`` instructions.  unicorn honours a count only in blocks
        translated while its count hook exists, so in "sites" mode (no count otherwise)
        the translated code is dropped first."""
        if PRECISION == "sites":
            self.uc.ctl_flush_tb()
        return self.start(begin, count)

    def stop(self) -> None:
        with self._engine_lock:
            if self.uch is not None:  # a late kick after close() finds no engine
                _lib.uc_emu_stop(self.uch)

    # -- registers -----------------------------------------------------------
    def rip(self) -> int:
        _uc_reg_read(self._cuch, _REG_RIP, self._cbuf)
        return self._cbuf[0]

    def reg(self, rid: int) -> int:
        _uc_reg_read(self._cuch, rid, self._cbuf)
        return self._cbuf[0]

    def set_reg(self, rid: int, value: int) -> None:
        self._cbuf[0] = value & (2**64 - 1)
        _uc_reg_write(self._cuch, rid, self._cbuf)

    def gprs(self) -> list[int]:
        n = len(GPR_IDS)
        vals = (ctypes.c_uint64 * n)()
        ids = (ctypes.c_int * n)(*GPR_IDS)
        ptrs = (ctypes.c_void_p * n)(*[ctypes.addressof(vals) + 8 * i for i in range(n)])
        _lib.uc_reg_read_batch(self.uch, ids, ptrs, n)
        return list(vals)

    def set_gprs(self, values) -> None:
        for rid, v in zip(GPR_IDS, values):
            self.set_reg(rid, v)

    def selector(self, name: str) -> int:
        return self.uc.reg_read(SEG_IDS[name]) & 0xFFFF

    def mmr(self, name: str) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of GDTR/IDTR/LDTR/TR."""
        return tuple(self.uc.reg_read(MMR_IDS[name]))

    def cr(self, n: int) -> int:
        return self.reg(CR_IDS[n])

    def set_cr(self, n: int, value: int) -> None:
        self.uc.reg_write(CR_IDS[n], value)

    def dr(self, n: int) -> int:
        return self.reg(DR_IDS[n])

    def set_dr(self, n: int, value: int) -> None:
        self.uc.reg_write(DR_IDS[n], value)

    def msr_read_native(self, msr: int) -> int:
        """RDMSR by the emulated CPU itself; the MSRPM bit is lifted meanwhile, because
        unicorn's own intercept check would longjmp out of the API call (docs/facts.md#unicorn-msr-crash)."""
        return self._with_msr_passthrough(msr, lambda: self.uc.msr_read(msr))

    def msr_write_native(self, msr: int, value: int) -> None:
        self._with_msr_passthrough(msr, lambda: self.uc.msr_write(msr, value))

    def _with_msr_passthrough(self, msr, fn):
        from .svm import msrpm_position

        pos = msrpm_position(msr)
        if pos is None:
            raise SimulatorError(f"MSR {msr:#x} is outside the MSRPM ranges; not natively accessible")
        off, bit = pos
        old = self.msrpm_host_byte(off)
        self.msrpm_host_byte(off, old & ~(3 << bit))
        try:
            return fn()
        finally:
            self.msrpm_host_byte(off, old)

    # -- memory --------------------------------------------------------------
    def read_phys(self, gpa: int, size: int) -> bytes:
        return bytes(self.uc.mem_read(gpa, size))

    def write_phys(self, gpa: int, data: bytes) -> None:
        self.uc.mem_write(gpa, bytes(data))

    def flush_code(self, gpa: int, size: int) -> None:
        """Drop translated blocks over [gpa, gpa+size): the host wrote guest code."""
        if self.uc is not None:
            self.uc.ctl_remove_cache(gpa, gpa + size)

    def flush_all_code(self) -> None:
        if self.uc is not None:
            self.uc.ctl_flush_tb()


def translate(core: Core, linear: int, *, write: bool = False) -> tuple[int | None, int]:
    """Guest linear -> physical through the guest's own paging structures.

    Returns (gpa or None, #PF error code if not mapped).  Models 4-level long-mode
    paging (2 MiB / 1 GiB pages) and no paging; 32-bit paging is not supported
    by the hosts' KVM either (docs/facts.md#kvm-pvm-modes).
    """
    if core.mmu is not None:  # an SEV guest: C-bit stripped, private pages at their alias
        return core.mmu.translate(linear, write=write)
    cr0 = core.cr(0)
    if not cr0 & (1 << 31):
        return linear & 0xFFFFFFFF, 0
    cr3 = core.cr(3)
    table = cr3 & 0x000F_FFFF_FFFF_F000
    shifts = (39, 30, 21, 12)
    for level, shift in enumerate(shifts):
        idx = (linear >> shift) & 0x1FF
        try:
            (entry,) = struct.unpack("<Q", core.read_phys(table + 8 * idx, 8))
        except unicorn.UcError:
            return None, (2 if write else 0)
        if not entry & 1:
            return None, (2 if write else 0)
        if write and not entry & 2:
            return None, 3
        if shift in (30, 21) and entry & 0x80:
            mask = (1 << shift) - 1
            return (entry & 0x000F_FFFF_FFFF_F000 & ~mask) | (linear & mask), 0
        table = entry & 0x000F_FFFF_FFFF_F000
    return table | (linear & 0xFFF), 0
