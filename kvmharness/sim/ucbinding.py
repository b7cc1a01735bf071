"""The one place the simulator reaches past unicorn's public Python API.

The core drives unicorn's C library directly on the per-exit hot path (raw
``uc_emu_start``/``uc_reg_read``/``uc_hook_add`` through ctypes cost a fraction of
the binding's wrappers, see ``core.py``), and for that it needs three things the
binding keeps private:

* ``uclib``: the ctypes handle of ``libunicorn`` the binding loaded (a second
  ``CDLL`` of the same file would be a second copy of the engine's globals);
* the engine handle of a ``Uc`` object (``Uc._uch``), to pass to those C calls;
* the exception a Python hook raised (``Uc._hook_exception``): the binding's hook
  wrapper records it and stops the engine, and only the binding's own
  ``emu_start`` re-raises it -- which the raw ``uc_emu_start`` bypasses;
* closing an engine now rather than at the cyclic GC (``Uc._callbacks``,
  ``Uc._mmio_callbacks`` and the name-mangled finalizer), so that a closed
  machine frees its memory at once.

These are internals of unicorn's Python binding (``unicorn/unicorn_py3/unicorn.py``),
so this module supports exactly the unicorn versions in ``SUPPORTED_VERSIONS`` and
refuses any other with a one-line :class:`~kvmharness.errors.SimulatorError` when the
simulator is first imported, rather than letting it misbehave.  A new unicorn release
is supported by checking these three names (and ``core.py``'s CPU-context offsets,
which it guards by the context size) and adding its version here.
"""

from __future__ import annotations

import ctypes

import unicorn

from ..errors import SimulatorError

#: unicorn releases whose binding internals this module was checked against
SUPPORTED_VERSIONS = ("2.1.4",)


def check_version(version: str | None = None) -> None:
    """Raise SimulatorError unless ``version`` (default: the installed unicorn) is supported."""
    version = version if version is not None else getattr(unicorn, "__version__", "unknown")
    if version not in SUPPORTED_VERSIONS:
        raise SimulatorError(
            f"unicorn {version} is installed, but the simulator supports unicorn "
            f"{', '.join(SUPPORTED_VERSIONS)} only (it drives the engine through the binding's "
            f"internals): pip install 'unicorn=={SUPPORTED_VERSIONS[-1]}'")


check_version()

# imported after the check: on another release the binding's layout may differ
from unicorn.unicorn_py3.unicorn import uclib  # noqa: E402


def library_path() -> str:
    """The file of the ``libunicorn`` the binding loaded, for a second handle on the same
    engine (cffi's dlopen of it: sim/simhooks.py)."""
    path: str = uclib._name
    return path


def raw_handle(uc: unicorn.Uc) -> ctypes.c_void_p:
    """The ``uc_engine *`` of ``uc``, for the raw C calls of ``uclib``."""
    handle: ctypes.c_void_p = uc._uch
    return handle


def pending_hook_exception(uc: unicorn.Uc) -> BaseException | None:
    """The exception a Python hook of ``uc`` raised during the last run, if any (kept)."""
    err: BaseException | None = getattr(uc, "_hook_exception", None)
    return err


def take_hook_exception(uc: unicorn.Uc) -> BaseException | None:
    """The exception a Python hook of ``uc`` raised during the last run, if any (cleared)."""
    err = pending_hook_exception(uc)
    if err is not None:
        uc._hook_exception = None
    return err


def release_engine(uc: unicorn.Uc) -> None:
    """uc_close ``uc`` now, and drop what would keep the hooks' Python objects alive.

    The binding keeps every hook's callback (and the last hook exception, whose traceback
    holds the hook's frames) on the ``Uc`` object and closes the engine only in its
    finalizer, which a reference cycle delays to the cyclic GC.
    """
    uc._callbacks.clear()
    uc._mmio_callbacks.clear()
    uc._hook_exception = None
    finalizer = getattr(uc, "_Uc__finalizer", None)  # unicorn 2.1: Uc.release_handle(uch)
    if finalizer is not None:
        finalizer()


__all__ = ["SUPPORTED_VERSIONS", "check_version", "library_path", "pending_hook_exception", "raw_handle",
           "release_engine", "take_hook_exception", "uclib"]
