"""SEV-SNP attestation: the report, AMD's X.509 chain, a simulated firmware signer, a verifier.

Modules (no device needed anywhere here):

* ``report``  -- :class:`AttestationReport` (the 0x4A0-byte ATTESTATION_REPORT, v2/v3/v5),
  :class:`TcbVersion` decoded per generation, :class:`Generation`
* ``certs``   -- loading X.509 certificates, AMD's VCEK extensions, RSA-PSS chain links
* ``attest``  -- the firmware side, simulated: a deterministic ARK/ASK/VCEK per generation,
  chip and TCB, :func:`sign_report`, :class:`SimulatedSnpChip` for MSG_REPORT_REQ
* ``messages`` -- MSG_REPORT_REQ/RSP and MSG_KEY_REQ/RSP answered by a simulated chip, and
  the certificate table of extended guest requests
* ``verify``  -- :func:`verify_report`: chain from AMD's built-in roots, signature, TCB
  against the VCEK, expectations; each check named
* ``cli``     -- ``kvmharness snp verify`` and ``kvmharness snp simulate``
"""

from .report import AttestationReport, Generation, TcbVersion

__all__ = ["AttestationReport", "Generation", "TcbVersion"]
