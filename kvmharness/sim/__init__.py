"""The ``sim`` backend: AMD SVM and KVM's in-kernel layer modelled on the unicorn CPU core.

Layers, bottom up (each one module):

* ``core``     -- the unicorn 2.1.4 engine: memory, registers, hooks, precise stops;
* ``vmcb``     -- the VMCB page, byte for byte (docs/facts.md#facts-1, #facts-2), with named fields;
* ``svm``      -- the SVM model: intercept vectors as KVM's ``init_vmcb`` sets them,
                  IOPM/MSRPM, #VMEXIT records (exit code, EXITINFO1/2, nRIP);
* ``events``   -- exception delivery through the guest IDT / IVT, #DF, triple fault;
* ``kvmlayer`` -- what KVM does above each #VMEXIT, so userspace sees the same exits;
* ``trace``    -- the hardware-level exit trace;
* ``cpumodel`` -- the one CPUID table the model supports;
* ``vcpu``, ``vm``, ``system`` -- the :mod:`kvmharness.backend` interface.

Importing this package is cheap; unicorn is loaded by ``core`` on first use.
"""
