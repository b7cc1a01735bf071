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

The CEK that PDH_CERT_EXPORT returns is *unsigned* on real platforms: AMD's
firmware makes "a dummy CEK certificate without a signature" (amd/AMD-ASPFW
``sev_mcmd.c`` ``pdh_cert_chain_init``; both signature slots empty, usage
0x1000, algo 0).  The ASK-signed CEK is AMD's, served by its Key Distribution
Service by chip id (``https://kdsintf.amd.com/cek/id/<GET_ID hex>``; sevctl
``export --full`` swaps it in).  So with the exported chain alone ASK -> CEK is
``unverified`` (with why): PEK -> PDH, OCA -> PEK and CEK -> PEK still hold or
fail on their own signatures, but nothing ties the CEK to AMD.  Given the KDS
CEK (``kds_cek``, which must hold the exported CEK's key), the chain verifies up
to the ARK.
"""

from __future__ import annotations

import dataclasses

from ..errors import CertificateError
from .amd_ca import AmdCaCertificate
from .certs import _ECDH, CertUsage, PlatformCertChain, SevCertificate

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
    """One link: ``signer`` signed ``subject``; status ok, failed, skipped (a certificate
    not given) or unverified (the CEK given carries no signature to check)."""

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

    @property
    def unverified(self) -> tuple[str, ...]:
        """Links that could not be checked with what was given (the exported CEK is unsigned)."""
        return tuple(link.name for link in self.links if link.status == "unverified")

    def require_amd(self) -> ChainVerification:
        """:class:`CertificateError` unless the CEK is verified by an ASK (no failed link
        either); for an owner who asked for AMD's roots to vouch for the platform."""
        self.raise_for_failure()
        link = self.link("ASK -> CEK")
        if not link.ok:
            raise CertificateError(f"SEV certificate chain: ASK -> CEK {link.status}: "
                                   f"{link.reason}")
        return self

    def summary(self) -> str:
        """One line: which links hold, which are not verified and why."""
        held = [link.name for link in self.links if link.ok]
        parts = [("verified: " + ", ".join(held)) if held else "nothing verified"]
        for link in self.links:
            if not link.ok:
                parts.append(f"{link.name} {link.status}: {link.reason}")
        return "; ".join(parts)

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
                "skipped": list(self.skipped), "unverified": list(self.unverified),
                "links": [l.to_dict() for l in self.links]}


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


def kds_url(chip_id: bytes) -> str:
    """Where AMD's KDS serves the ASK-signed CEK of ``chip_id`` (GET_ID's 64 bytes)."""
    return "https://kdsintf.amd.com/cek/id/" + bytes(chip_id).hex()


def unsigned_cek_reason(chip_id: bytes | None = None) -> str:
    """Why ASK -> CEK cannot be checked with the CEK PDH_CERT_EXPORT returned."""
    where = f" ({kds_url(chip_id)})" if chip_id else " (https://kdsintf.amd.com/cek/id/<chip id>)"
    return ("the CEK carries no signature: AMD's firmware exports it unsigned (PDH_CERT_EXPORT, "
            "sev_mcmd.c pdh_cert_chain_init), so CEK -> ASK -> ARK is unverified; AMD's KDS "
            f"serves the ASK-signed CEK by chip id{where}: fetch it and give it (sev verify "
            "--cek FILE, GuestOwner(cek=...)); kvmharness never uses the network")


def is_unsigned(cert: SevCertificate) -> bool:
    """Both signature slots unused (usage INVALID and algo INVALID, as sev_cert_init leaves
    them): the CEK as PDH_CERT_EXPORT returns it.  A slot with only one of the two is
    malformed (AMD's sev_cert_validate_sig: BAD_SIGNATURE), not unsigned."""
    return all(sig.usage == CertUsage.INVALID and sig.algo == 0 for sig in cert.sigs)


def verify_chain(pdh, pek, oca, cek, *, ask=None, ark=None, kds_cek=None,
                 chip_id: bytes | None = None) -> ChainVerification:
    """Check every link of the SEV chain; each argument is a certificate or its bytes.

    ``ask``/``ark`` are AMD's (:class:`AmdCaCertificate` or its bytes), e.g.
    :func:`kvmharness.sev.amd_ca.builtin_roots`; ``None`` skips their links.
    ``kds_cek`` is the ASK-signed CEK from AMD's KDS (bytes or certificate): it
    stands for ``cek`` (the exported, unsigned one) in the CEK links and must
    hold the same key.  ``chip_id`` (GET_ID) names the KDS address in the reason
    an unsigned CEK gives.
    """
    given = {"pdh": pdh, "pek": pek, "oca": oca, "cek": cek, "ask": ask, "ark": ark}
    certs, problems = {}, {}
    for role, cert in given.items():
        if cert is None:
            continue
        certs[role], problems[role] = _parse(role, cert)
    if kds_cek is not None:
        exported = certs.get("cek")
        certs["cek"], problems["cek"] = _parse("cek", kds_cek)
        given["cek"] = kds_cek
        if problems["cek"]:
            problems["cek"] = f"the CEK from AMD's KDS: {problems['cek'][5:]}"
        elif exported is not None and (exported.qx, exported.qy) != (certs["cek"].qx,
                                                                     certs["cek"].qy):
            problems["cek"] = ("CEK: the CEK from AMD's KDS holds another key than the "
                               "platform's exported CEK: it is not this chip's (check the chip id)")
    links = []
    for name, signer, subject in LINKS:
        missing = [r.upper() for r in dict.fromkeys((signer, subject)) if given[r] is None]
        broken = [problems[r] for r in dict.fromkeys((signer, subject)) if problems.get(r)]
        if name == "ASK -> CEK" and not problems.get("cek") and "cek" in certs \
                and is_unsigned(certs["cek"]):
            links.append(LinkResult(name, signer, subject, "unverified",
                                    unsigned_cek_reason(chip_id)))
        elif missing:
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


def verify_platform_chain(pdh: SevCertificate, chain: PlatformCertChain, ask=None, ark=None):
    """Verify PDH <- PEK <- (OCA, CEK) [<- ASK [<- ARK]]; return the PDH public key.

    The guest owner's check before trusting the PDH for LAUNCH_START (as sevctl
    does): OCA self-signed, PEK signed by the OCA and by the CEK, PDH signed by the
    PEK; with ``ask`` (AMD's ASK, an :class:`~kvmharness.sev.amd_ca.AmdCaCertificate`)
    the CEK must be signed by it (an unsigned CEK, as PDH_CERT_EXPORT gives it, is
    refused: fetch the signed one from AMD's KDS); with ``ark`` too, the ASK signed
    by the ARK and the ARK by itself.  Raises :class:`CertificateError` naming the
    first link that fails.
    """
    result = verify_chain(pdh, chain.pek, chain.oca, chain.cek, ask=ask, ark=ark)
    if ask is not None:
        result.require_amd()
    return result.raise_for_failure().pdh_key
