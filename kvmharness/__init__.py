"""kvmharness: drive AMD SVM, SEV and SEV-ES guests through Linux KVM, or a faithful simulator.

The common case is one call::

    from kvmharness import run_guest
    result = run_guest("cpuid", backend="auto")   # kvm where /dev/kvm works, else sim
    assert result.ok, result.describe()

Lower down: ``open_backend("kvm" | "sim" | "auto")`` returns a System ->
``create_vm()`` -> ``create_vcpu()``, one object per kernel fd, the same calls
on both backends; ``Vcpu.run()`` returns one of the exit values in
``kvmharness.exits``.
"""

from .backend import Capabilities
from .errors import GuestFailure, GuestTimeout, HarnessError, HostError, KvmError, SevError, UsageError
from .factory import open_backend
from .images import get_guest, load_manifest
from .machine import Machine, RunResult, run_guest

__version__ = "0.1.0"

__all__ = ["Capabilities", "GuestFailure", "GuestTimeout", "HarnessError", "HostError", "KvmError",
           "Machine", "RunResult", "SevError", "UsageError", "get_guest", "load_manifest",
           "open_backend", "run_guest", "__version__"]
