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
from typing import TYPE_CHECKING, Any

from .backend import BACKENDS, KVM_DEVICE, SEV_DEVICE, System
from .errors import UsageError

if TYPE_CHECKING:
    from .sev.launch import SevPlatformInterface


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


_SIM_FIRMWARE: Any = None


def default_sim_firmware() -> Any:
    """The simulated chip of this process (one, like one /dev/sev per host)."""
    global _SIM_FIRMWARE
    if _SIM_FIRMWARE is None:
        from .sev.firmware import SimulatedSevFirmware

        _SIM_FIRMWARE = SimulatedSevFirmware()
    return _SIM_FIRMWARE


def open_sev_platform(backend: str = "auto", *, firmware: Any = None) -> SevPlatformInterface:
    """``/dev/sev`` (kvm) or the firmware model (sim); ``auto``: kvm iff /dev/sev exists."""
    if backend not in ("auto", *BACKENDS):
        raise UsageError(f"unknown backend {backend!r}: choose auto, kvm or sim")
    if backend == "auto":
        backend = "kvm" if os.path.exists(SEV_DEVICE) else "sim"
    if backend == "kvm":
        from .kvm.sevdev import SevDevice

        return SevDevice()
    from .sev.kvm_model import SimulatedSevDevice

    return SimulatedSevDevice(firmware if firmware is not None else default_sim_firmware())


__all__ = ["default_sim_firmware", "open_backend", "open_sev_platform"]
