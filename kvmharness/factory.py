"""Choosing and opening a backend: the layer above ``kvmharness.kvm`` and ``kvmharness.sim``.

``kvmharness.backend`` is the interface both backends implement; this module is
the only one that knows both exist.  Selection follows cloud-hypervisor's rule
(``hypervisor::new()``): under ``auto`` a missing ``/dev/kvm`` means "use the
simulator"; any other failure to open it (EACCES, EBUSY) is an error the user
should hear about, and ``--backend kvm`` on a machine without ``/dev/kvm``
fails loudly.  The backends are imported when asked for, so ``import
kvmharness`` loads neither cffi nor unicorn.
"""

from __future__ import annotations

import os

from .backend import BACKENDS, KVM_DEVICE, System
from .errors import UsageError


def open_backend(name: str = "auto", *, kvm_path: str | None = None) -> System:
    """Open a backend by name (``kvm``, ``sim`` or ``auto``).

    The returned system has ``chosen_because``: one line saying why it was
    picked, which the CLI and the pytest header print.
    """
    kvm_path = kvm_path or KVM_DEVICE
    if name not in ("auto", *BACKENDS):
        raise UsageError(f"unknown backend {name!r}: choose one of auto, kvm, sim")
    if name == "auto":
        if os.path.exists(kvm_path):
            # present: any failure to open it is the user's to hear about
            system = _open_kvm(kvm_path)
            system.chosen_because = f"auto: {kvm_path} is present, using the kvm backend"
            return system
        system = _open_sim()
        system.chosen_because = f"auto: {kvm_path} does not exist, using the sim backend"
        return system
    if name == "kvm":
        system = _open_kvm(kvm_path)
        system.chosen_because = "kvm backend requested"
        return system
    system = _open_sim()
    system.chosen_because = "sim backend requested"
    return system


def _open_kvm(path: str) -> System:
    from .kvm.system import KvmSystem

    return KvmSystem(path)


def _open_sim() -> System:
    from .sim.system import SimSystem

    return SimSystem()


__all__ = ["open_backend"]
