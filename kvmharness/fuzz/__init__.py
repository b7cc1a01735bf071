"""Differential guest fuzzing: random guests run on two backends, compared exit by exit.

``gen``     seeded, grammar-based random long-mode guests (IO, string IO, MMIO through
            the instruction forms KVM's emulator handles, MSRs, CPUID, HLT, exceptions)
            against devices whose every answer is a known function (``devices``).
``gen_real``   the same for 16-bit real mode (the IVT, LES/LDS, 16-bit addressing).
``gen_nested`` nested-SVM guests: L1's view of random intercepts and VMCB12 fields.
``asm``     assembles a guest with GNU ``as`` (cached by the source's hash).
``runner``  runs one guest on a backend and records, at every exit, the exit, RIP, the
            GPRs and RFLAGS; compares two recordings and the end state.
``shrink``  delta-debugs a mismatching guest's op list down to a minimal guest.
``cli``     ``kvmharness fuzz``.
``remote``  the kvm side run on a rig (``python -m kvmharness.fuzz.remote``);
``rigpair`` ships a batch there and compares what comes back with the simulator.
"""

from . import gen_nested, gen_real  # noqa: F401 -- their modes register with gen
