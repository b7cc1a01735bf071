"""The simulator's per-exit calls without ctypes: IN/OUT hooks in C and unicorn through cffi.

Two things make an IO exit cheaper (issue 15 item 4):

* ``simhooks.c``, a plain C library (no Python or unicorn headers), holds the IN/OUT
  ``UC_HOOK_INSN`` callbacks.  unicorn 2.1.4 calls them with C's calling convention
  (``uc_cb_insn_out_t(uc_engine *, uint32_t port, int size, uint32_t value, void *)``,
  ``uc_cb_insn_in_t(uc_engine *, uint32_t port, int size, void *) -> uint32_t``, the
  ``user_data`` given to ``uc_hook_add``); a hook records the access and the registers the
  model reads at the instruction into a small struct and calls ``uc_emu_stop``, so no
  Python runs inside the engine.  ``Core.start`` hands the record to the model after
  ``uc_emu_start`` returns, with the engine's registers shown as they stood in the hook.
* ``uc_emu_start`` and ``uc_reg_read``/``uc_reg_write`` are called through cffi (ABI mode,
  on the same ``libunicorn`` the binding loaded: ``ucbinding.library_path``), which costs
  less per call than ctypes.

The C hooks are the default wherever the library can be had (``KVMHARNESS_SIM_CHOOKS=0``:
the Python hooks; ``=required``: an unavailable library is an error).  They pay because the
model's IO exit handler takes the record's fields as arguments (sim/vcpu.py
``on_out_recorded``/``on_in_recorded``): only where something else reads the engine during
the exit -- an L2 guest's IO, a #VC-raising IO of an SEV-ES guest, a #VMEXIT observer -- is the
engine shown the hook's registers first (``sh_show_hook``/``sh_show_stop``).  Measured on the
``ioloop`` benchmark, 5 interleaved runs each: 3.55 against 3.8 us of user CPU per exit
(median); before the handler took the record, the C hooks cost 4.1-4.2 us.
The library also holds the code hook ``sh_stop_code``, which stops the engine where it is
put: the replay of an MMIO instruction stops on the next instruction with it instead of
under an instruction count (sim/core.py ``Core.step_to``).
The library is built into the package at install time where a C compiler is present
(setup.py: ``_simhooks-<source hash>.so``), else into the per-user cache on first use;
with no compiler the hooks stay in Python (ctypes callbacks) and :func:`status` says why.
Either way the exits and the hardware trace are the same.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import Any

import cffi
from unicorn import x86_const as X

from .. import clib
from ..errors import FeatureUnavailable
from .ucbinding import library_path as _unicorn_path

SOURCE = Path(__file__).with_name("simhooks.c")
ENV = "KVMHARNESS_SIM_CHOOKS"
ABI = 3
SH_NONE, SH_OUT, SH_IN = 0, 1, 2

_HOOKS_CDEF = """
struct sh_io {
    void *reg_read;
    void *emu_stop;
    void *reg_write;
    int32_t id_rip, id_rax, id_rcx, id_rsi, id_rdi, reserved;
    uint64_t rip, rax, rcx, rsi, rdi;
    uint64_t after[5];
    uint32_t pending;
    uint32_t port;
    int32_t size;
    uint32_t value;
    uint64_t hooks;
    uint64_t overruns;
};
int sh_abi(void);
uint64_t sh_sizeof(void);
void sh_out(void *uc, uint32_t port, int size, uint32_t value, void *user_data);
uint32_t sh_in(void *uc, uint32_t port, int size, void *user_data);
void sh_show_hook(void *uc, struct sh_io *s);
void sh_show_stop(void *uc, struct sh_io *s);
void sh_stop_code(void *uc, uint64_t address, uint32_t size, void *user_data);
"""

_UC_CDEF = """
int uc_emu_start(void *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
int uc_emu_stop(void *uc);
int uc_reg_read(void *uc, int regid, void *value);
int uc_reg_write(void *uc, int regid, const void *value);
"""

ffi = cffi.FFI()
ffi.cdef(_HOOKS_CDEF)
ffi.cdef(_UC_CDEF)

#: libunicorn through cffi: the per-exit entry points (always available, compiler or not)
uc = ffi.dlopen(_unicorn_path())

_lock = threading.Lock()
_state: dict[str, Any] = {}


def library_name(source: bytes) -> str:
    """The packaged library's file name (setup.py builds exactly this one)."""
    return clib.packaged_name("simhooks", source)


def library_path() -> tuple[Path | None, str]:
    """The hook library's path, or None and why not: the packaged one, else the per-user
    cache's, built there on first use (:func:`kvmharness.clib.library_path`)."""
    return clib.library_path(SOURCE)


def _mode() -> str:
    """on (the default: unset or 1; C hooks where the library can be had, else the Python
    hooks), off (0: the Python hooks) or required (an unavailable library is an error)."""
    v = os.environ.get(ENV, "").strip().lower()
    if v in ("0", "off", "no", "false"):
        return "off"
    if v == "required":
        return "required"
    return "on"


def load() -> Any | None:
    """The hook library, or None (Python hooks); :func:`status` says why.  Read once per
    process.  Raises FeatureUnavailable when ``KVMHARNESS_SIM_CHOOKS=required`` and it cannot be had."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["status"] = _load()
        lib, why = _state["lib"], _state["status"]
    if lib is None and _mode() == "required":
        raise FeatureUnavailable(f"{ENV}=required but the simulator's C hooks are unavailable: {why}")
    return lib


def _load() -> tuple[Any | None, str]:
    if _mode() == "off":
        return None, f"Python hooks ({ENV}=0)"
    path, how = library_path()
    if path is None:
        return None, how
    try:
        lib = ffi.dlopen(str(path))
        if lib.sh_abi() != ABI or lib.sh_sizeof() != ffi.sizeof("struct sh_io"):
            return None, f"{path} does not match this kvmharness (ABI or struct size)"
    except OSError as e:
        return None, f"cannot load {path}: {e}"
    return lib, f"C ({how}: {path})"


def status() -> str:
    """Which IN/OUT hooks the simulator uses, and why."""
    load_quietly()
    return _state.get("status", "not loaded")


def load_quietly() -> Any | None:
    try:
        return load()
    except FeatureUnavailable:
        return None


def new_io_record() -> Any:
    """A zeroed ``struct sh_io`` with unicorn's entry points and register ids filled in."""
    s = ffi.new("struct sh_io *")
    s.reg_read = ffi.cast("void *", uc.uc_reg_read)
    s.emu_stop = ffi.cast("void *", uc.uc_emu_stop)
    s.reg_write = ffi.cast("void *", uc.uc_reg_write)
    s.id_rip, s.id_rax, s.id_rcx = X.UC_X86_REG_RIP, X.UC_X86_REG_RAX, X.UC_X86_REG_RCX
    s.id_rsi, s.id_rdi = X.UC_X86_REG_RSI, X.UC_X86_REG_RDI
    return s


#: struct sh_io from ``rip`` to ``value``, read in one call per exit (sim/core.py): rip, rax,
#: rcx, rsi, rdi, (after[5] skipped), pending, port, size, value
RECORD = struct.Struct("=5Q40xIIiI")
RECORD_OFFSET = ffi.offsetof("struct sh_io", "rip")
assert RECORD_OFFSET + RECORD.size == ffi.offsetof("struct sh_io", "value") + 4
assert ffi.offsetof("struct sh_io", "pending") == RECORD_OFFSET + 80
#: ``pending`` as an index into the record viewed as uint32 words
PENDING_WORD = ffi.offsetof("struct sh_io", "pending") // 4


def hook_addresses(lib: Any) -> tuple[int, int]:
    """(OUT hook, IN hook) as C function addresses for uc_hook_add."""
    return (int(ffi.cast("uintptr_t", lib.sh_out)),
            int(ffi.cast("uintptr_t", lib.sh_in)))


def stop_hook_address(lib: Any) -> int:
    """The code hook that stops the engine where it is put, as a C function address."""
    return int(ffi.cast("uintptr_t", lib.sh_stop_code))


__all__ = ["ABI", "ENV", "SH_IN", "SH_NONE", "SH_OUT", "SOURCE", "ffi", "hook_addresses",
           "library_name", "library_path", "load", "load_quietly", "new_io_record", "status", "stop_hook_address", "uc"]
