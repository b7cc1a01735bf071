"""Differential guest fuzzing: random guests run on two backends, compared exit by exit.

``gen``     seeded, grammar-based random long-mode guests (IO, string IO, MMIO through
            the instruction forms KVM's emulator handles, MSRs, CPUID, HLT, exceptions)
            against devices whose every answer is a known function (``devices``).
``asm``     assembles a guest with GNU ``as`` (cached by the source's hash).
``runner``  runs one guest on a backend and records, at every exit, the exit, RIP, the
            GPRs and RFLAGS; compares two recordings and the end state.
``shrink``  delta-debugs a mismatching guest's op list down to a minimal guest.
``cli``     ``kvmharness fuzz``.
"""
