"""SEV and SEV-ES without hardware: the pure-logic layer.

Modules (each importable on its own; this package imports nothing heavy):

* ``status``      -- SEV_RET_* firmware status codes, platform and guest states
* ``policy``      -- :class:`GuestPolicy`, the u32 guest policy
* ``measurement`` -- launch digest, LAUNCH_MEASURE, :func:`verify_measurement`
* ``certs``       -- the SEV binary certificate format and the platform chain
* ``session``     -- the guest owner's side: session blob, secret packets
* ``memcrypt``    -- simulated memory encryption (per-guest, address-tweaked)
* ``asid``        -- KVM's SEV ASID allocator
* ``firmware``    -- :class:`SimulatedSevFirmware`, the model the simulator drives
* ``launch``      -- :class:`SevLaunch`, the launch flow on either backend
* ``kvm_model``   -- a model of KVM's sev.c command handling over the firmware model
* ``vmsa``        -- the SEV-ES save area, built byte for byte as KVM writes it
* ``ghcb``        -- the GHCB page and the GHCB MSR protocol
* ``vmgexit``     -- a model of KVM's VMGEXIT handling (sev_handle_vmgexit)

The /dev/kvm and /dev/sev ioctl path lives elsewhere; it shares ``status`` and
``policy`` with this package.
"""

from .policy import GuestPolicy, PolicyFlag
from .status import GuestState, PlatformState, SevStatus, status_name

__all__ = ["GuestPolicy", "GuestState", "PlatformState", "PolicyFlag", "SevStatus",
           "status_name"]
