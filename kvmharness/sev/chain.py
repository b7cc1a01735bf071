"""The whole SEV certificate chain, one result per link (as ``sevctl verify`` checks it).

    ARK self-signed          AMD's root (AMD CA format, RSA-PSS)
    ARK -> ASK               AMD's SEV signing key
    ASK -> CEK               the chip's endorsement key (RSA-PSS in a SEV certificate)
    CEK -> PEK               the platform endorsement key (ECDSA) ...
    OCA self-signed          ... which the owner's CA also signs
    OCA -> PEK
    PEK -> PDH               the platform's Diffie-Hellman key, what LAUNCH_START uses

Every link is checked even after one fails, so a report names each broken
link; a certificate that cannot be parsed fails every link it takes part in.
Without the ASK (or ARK) the links that need it are ``skipped``, not passed.
"""

from __future__ import annotations

import dataclasses

from ..errors import CertificateError
from .amd_ca import AmdCaCertificate
from .certs import _ECDH, CertUsage, SevCertificate

LINKS = (
    ("ARK self-signed", "ark", "ark"),
    ("ARK -> ASK", "ark", "ask"),
    ("ASK -> CEK", "ask", "cek"),
    ("CEK -> PEK", "cek", "pek"),
    ("OCA self-signed", "oca", "oca"),
    ("OCA -> PEK", "oca", "pek"),
    ("PEK -> PDH", "pek", "pdh"),
)
LINK_NAMES = tuple(name for name, _, _ in LINKS)

_SEV_ROLES = {"pdh": CertUsage.PDH, "pek": CertUsage.PEK, "oca": CertUsage.OCA,
              "cek": CertUsage.CEK}
_CA_ROLES = {"ask": CertUsage.ASK, "ark": CertUsage.ARK}


@dataclasses.dataclass(frozen=True)
class LinkResult:
    """One link: ``signer`` signed ``subject``; status ok, failed or skipped."""

    name: str
    signer: str
    subject: str
    status: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ChainVerification:
    """What :func:`verify_chain` found; ``certs`` holds every certificate that parsed."""

    links: tuple[LinkResult, ...]
    certs: dict

    @property
    def ok(self) -> bool:
        """No link failed (skipped links are not failures; see :attr:`complete`)."""
        return not self.failed

    @property
    def complete(self) -> bool:
        """Every link, ARK to PDH, was checked and holds."""
        return all(link.ok for link in self.links)

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(link.name for link in self.links if link.status == "failed")

    @property
    def skipped(self) -> tuple[str, ...]:
        return tuple(link.name for link in self.links if link.status == "skipped")

    def link(self, name: str) -> LinkResult:
        return next(link for link in self.links if link.name == name)

    @property
    def pdh_key(self):
        """The PDH's public key (only once the PDH's own links hold)."""
        self.raise_for_failure()
        return self.certs["pdh"].public_key()

    def raise_for_failure(self) -> ChainVerification:
        """:class:`CertificateError` naming the first failed link; else ``self``."""
        for link in self.links:
            if link.status == "failed":
                raise CertificateError(f"SEV certificate chain: {link.name} failed: {link.reason}")
        return self

    def to_dict(self) -> dict:
        return {"ok": self.ok, "complete": self.complete, "failed": list(self.failed),
                "skipped": list(self.skipped), "links": [l.to_dict() for l in self.links]}


def _parse(role: str, cert):
    """(certificate, None) or (None, why it is unusable)."""
    try:
        if role in _SEV_ROLES:
            if not isinstance(cert, SevCertificate):
                cert = SevCertificate.from_bytes(cert)
            cert.expect_usage(_SEV_ROLES[role])
            if role == "pdh" and cert.algo not in _ECDH:
                raise CertificateError(f"PDH key algorithm 0x{cert.algo:x} is not ECDH")
            cert.public_key()  # on the curve
        else:
            if not isinstance(cert, AmdCaCertificate):
                cert = AmdCaCertificate.from_bytes(cert)
            cert.expect_usage(_CA_ROLES[role])
            cert.public_key()
        return cert, None
    except CertificateError as exc:
        return None, f"{role.upper()}: {exc}"


def verify_chain(pdh, pek, oca, cek, *, ask=None, ark=None) -> ChainVerification:
    """Check every link of the SEV chain; each argument is a certificate or its bytes.

    ``ask``/``ark`` are AMD's (:class:`AmdCaCertificate` or its bytes), e.g.
    :func:`kvmharness.sev.amd_ca.builtin_roots`; ``None`` skips their links.
    """
    given = {"pdh": pdh, "pek": pek, "oca": oca, "cek": cek, "ask": ask, "ark": ark}
    certs, problems = {}, {}
    for role, cert in given.items():
        if cert is None:
            continue
        certs[role], problems[role] = _parse(role, cert)
    links = []
    for name, signer, subject in LINKS:
        missing = [r.upper() for r in dict.fromkeys((signer, subject)) if given[r] is None]
        broken = [problems[r] for r in dict.fromkeys((signer, subject)) if problems.get(r)]
        if missing:
            links.append(LinkResult(name, signer, subject, "skipped",
                                    f"no {' or '.join(missing)} certificate given"))
        elif broken:
            links.append(LinkResult(name, signer, subject, "failed", "; ".join(broken)))
        else:
            try:
                why = certs[subject].signature_problem(certs[signer])
            except CertificateError as exc:
                why = str(exc)
            links.append(LinkResult(name, signer, subject, "failed" if why else "ok", why or ""))
    return ChainVerification(tuple(links), {r: c for r, c in certs.items() if c is not None})
