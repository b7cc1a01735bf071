"""Verify an SEV-SNP attestation report: AMD's chain, the signature, the TCB, expectations.

The checks run in this order and stop at the first failure (the rest are
reported as not run), so the failing check is always named:

    ark          the root is self-signed (RSA-PSS/SHA-384) and is ARK-<Generation>;
                 without --ark it is AMD's built-in ARK for the generation
    ask          the ASK is signed by that ARK (without --ask: AMD's built-in ASK)
    vcek         the VCEK is signed by the ASK, is a P-384 key, and its productName
                 is the generation's (for a VLEK, a cloud provider's key whose
                 certificate says CN=SEV-VLEK: "asvk" and "vlek", the VLEK signed by
                 AMD's ASVK, SEV-VLEK-<Generation>, shipped in kvmharness/snp/roots)
    validity     every certificate is within its validity period (at --at, default now)
    signature    SIGNATURE_ALGO is ECDSA P-384/SHA-384 and R,S over bytes 0x000-0x29F
                 verify with the VCEK's key (R and S must be < n: a flipped padding
                 bit fails too)
    format       the (now authenticated) report parses: a known version, and (v3+)
                 its CPUID family/model is the generation's
    signing-key  the report's SIGNING_KEY names the key the certificate is for
    tcb          REPORTED_TCB, decoded for the generation, equals the VCEK's blSPL,
                 teeSPL, snpSPL, ucodeSPL (and fmcSPL on Turin)
    chip-id      the VCEK's hwID is the report's CHIP_ID (unless MASK_CHIP_KEY; a VLEK
                 is not bound to a chip)
    measurement, report-data, policy
                 the caller's expectations, when given

The signature is checked on the raw bytes *before* the report is parsed, so a
flipped bit anywhere in bytes 0x000-0x29F or in R/S fails as ``signature``,
whatever field it lands in.  Nothing here touches the network: the ARK and
ASK are AMD's published ones shipped with kvmharness (``kvmharness/sev/roots``),
or files the caller names.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.resources
import struct
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from .. import errors as E
from . import certs
from .report import (
    REPORT_SIZE,
    SIG_COMPONENT_SIZE,
    SIGNATURE_ALGO_ECDSA_P384_SHA384,
    SIGNATURE_OFFSET,
    SIGNED_SIZE,
    AttestationReport,
    Generation,
    ReportFormatError,
    SigningKey,
)
from .attest import P384_ORDER

# The checks of a VCEK-signed report; a VLEK-signed one has "asvk" and "vlek" for "ask" and "vcek".
CHECKS = ("ark", "ask", "vcek", "validity", "signature", "format", "signing-key", "tcb",
          "chip-id", "measurement", "report-data", "policy")


class AttestationFailed(E.HarnessError):
    """A report failed verification: do not trust this guest."""

    exit_code = E.EXIT_GUEST_FAILED

    def __init__(self, verification: "Verification"):
        self.verification = verification
        bad = verification.failed
        super().__init__(f"attestation check {bad.name!r} failed: {bad.detail}")


@dataclasses.dataclass
class Check:
    name: str
    ok: bool | None  # None: not run (an earlier check failed, or nothing was expected)
    detail: str = ""

    def as_dict(self) -> dict:
        status = "pass" if self.ok else "fail" if self.ok is False else "not run"
        return {"name": self.name, "status": status, "detail": self.detail}


@dataclasses.dataclass
class Expectations:
    """What the verifier's caller expects: each None means "not checked"."""

    measurement: bytes | None = None
    report_data: bytes | None = None  # up to 64 bytes, zero padded on the right
    policy: int | None = None


@dataclasses.dataclass
class Verification:
    checks: list[Check]
    generation: Generation | None
    report: AttestationReport | None
    root: str  # "amd" (AMD's built-in ARK) or "supplied"
    root_detail: str = ""
    vcek_extensions: certs.VcekExtensions | None = None
    endorsement: str = "vcek"  # or "vlek": which key the certificate says signed the report

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def failed(self) -> Check | None:
        return next((c for c in self.checks if c.ok is False), None)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "failed": self.failed.name if self.failed else None,
                "generation": self.generation.value if self.generation else None,
                "endorsement": self.endorsement,
                "root": self.root, "root_detail": self.root_detail,
                "checks": [c.as_dict() for c in self.checks],
                "vcek": self.vcek_extensions.as_dict() if self.vcek_extensions else None,
                "report": self.report.to_dict(self.generation) if self.report else None}


# -- AMD's roots --------------------------------------------------------------------------------
def amd_root_pems(generation: Generation) -> tuple[bytes, bytes]:
    """(ARK PEM, ASK PEM) AMD publishes for ``generation``, as kvmharness ships them
    (kvmharness/sev/roots/<product>/, read through the SEV package's accessor)."""
    try:
        from ..sev.amd_ca import amd_root_pems as sev_root_pems
    except ImportError:  # the accessor is absent: read the same package data directly
        base = importlib.resources.files("kvmharness.sev") / "roots" / generation.value
        return (base / "ark.pem").read_bytes(), (base / "ask.pem").read_bytes()
    return sev_root_pems(generation.value)


def amd_asvk_pem(generation: Generation) -> bytes:
    """AMD's ASVK (SEV-VLEK-<Generation>, the VLEK's issuer) as kvmharness ships it."""
    return (importlib.resources.files("kvmharness.snp") / "roots" / generation.value
            / "asvk.pem").read_bytes()


def endorsement_kind(cert: x509.Certificate) -> str:
    """"vlek" for a VLEK certificate (CN SEV-VLEK), else "vcek"."""
    return "vlek" if _common_name(cert) == "SEV-VLEK" else "vcek"


# -- inputs ------------------------------------------------------------------------------------
_NAMES = {"ark": ("ark.pem", "ark.der", "ark.crt", "ark.cert.pem"),
          "ask": ("ask.pem", "ask.der", "ask.crt", "ask.cert.pem"),
          "vcek": ("vcek.pem", "vcek.der", "vcek.crt", "vcek.cert.pem",
                   "vlek.pem", "vlek.der", "vlek.crt", "vlek.cert.pem")}


def load_certs_dir(directory: str | Path) -> dict[str, x509.Certificate]:
    """The certificates in a KDS-style directory, as users pre-provision them.

    Looks (case-insensitively) for ark.pem, ask.pem, vcek.pem or vlek.pem (or
    .der/.crt), and for cert_chain.pem, KDS's bundle of the ASK (or the ASVK,
    for a VLEK) followed by the ARK; the endorsement key is returned as "vcek".  Missing
    entries are simply absent; a directory that cannot be listed raises OSError.
    """
    d = Path(directory)
    entries = {p.name.lower(): p for p in d.iterdir() if p.is_file()}
    found: dict[str, x509.Certificate] = {}
    for chain_name in ("cert_chain.pem", "ask_ark.pem"):
        if chain_name in entries:
            bundle = certs.load_certificates(entries[chain_name].read_bytes(),
                                             str(entries[chain_name]))
            for cert in bundle:
                cn = _common_name(cert)
                role = "ark" if cn.startswith("ARK-") else "ask" if cn.startswith("SEV-") else None
                if role and role not in found:
                    found[role] = cert
    for role, names in _NAMES.items():
        for name in names:
            if name in entries:
                found[role] = certs.read_certificate(entries[name])
                break
    return found


def _common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def parse_hex(text: str, what: str, max_len: int, exact: bool = False) -> bytes:
    t = text.strip().lower()
    if t.startswith("0x"):
        t = t[2:]
    try:
        b = bytes.fromhex(t)
    except ValueError:
        raise E.UsageError(f"{what}: not hex: {text!r}") from None
    if len(b) > max_len or (exact and len(b) != max_len):
        size = f"exactly {max_len}" if exact else f"at most {max_len}"
        raise E.UsageError(f"{what}: {size} bytes expected, got {len(b)}")
    return b


def _validity(cert: x509.Certificate) -> tuple[_dt.datetime, _dt.datetime]:
    start = getattr(cert, "not_valid_before_utc", None)  # cryptography >= 42
    end = getattr(cert, "not_valid_after_utc", None)
    if start is None or end is None:
        utc = _dt.timezone.utc
        start, end = cert.not_valid_before.replace(tzinfo=utc), cert.not_valid_after.replace(tzinfo=utc)
    return start, end


# -- the verifier --------------------------------------------------------------------------------
def _generation_for(report_bytes: bytes, vcek: x509.Certificate, given: Generation | None
                    ) -> Generation:
    if given is not None:
        return given
    try:
        name = certs.VcekExtensions.of(vcek).product_name
    except certs.CertificateFormatError:
        name = None
    if name and Generation.from_product_name(name):
        return Generation.from_product_name(name)  # type: ignore[return-value]
    version = struct.unpack_from("<I", report_bytes, 0)[0]
    if version >= 3:
        gen = Generation.from_cpuid(report_bytes[0x188], report_bytes[0x189])
        if gen:
            return gen
    raise E.UsageError("cannot tell the processor generation from the VCEK or the report: "
                       "pass --processor milan|genoa|turin")


def verify_report(report_bytes: bytes, vcek: x509.Certificate, *,
                  generation: Generation | None = None, ark: x509.Certificate | None = None,
                  ask: x509.Certificate | None = None, expect: Expectations | None = None,
                  at: _dt.datetime | None = None) -> Verification:
    """Run every check (see the module docstring) and return the named results."""
    report_bytes = bytes(report_bytes)
    if len(report_bytes) != REPORT_SIZE:
        raise ReportFormatError(f"an attestation report is {REPORT_SIZE} (0x{REPORT_SIZE:x}) "
                                f"bytes, this is {len(report_bytes)}")
    expect = expect or Expectations()
    gen = _generation_for(report_bytes, vcek, generation)
    kind = endorsement_kind(vcek)
    amd_ark_pem, amd_ask_pem = amd_root_pems(gen)
    if kind == "vlek":  # a VLEK is signed by the ASVK, not the ASK
        amd_ask_pem = amd_asvk_pem(gen)
    amd_ark = certs.load_certificate(amd_ark_pem, f"AMD's {gen.title} ARK")
    amd_ask = certs.load_certificate(amd_ask_pem, f"AMD's {gen.title} {'ASVK' if kind == 'vlek' else 'ASK'}")
    root_is_amd = ark is None or certs.fingerprint(ark) == certs.fingerprint(amd_ark)
    ark = ark or amd_ark
    ask = ask or amd_ask
    root_detail = (f"AMD's built-in {_common_name(amd_ark)} (sha256 {certs.fingerprint(amd_ark)})"
                   if root_is_amd else
                   f"a supplied ARK, NOT AMD's {gen.title} ARK (sha256 {certs.fingerprint(ark)})")
    v = Verification(checks=[], generation=gen, report=None,
                     root="amd" if root_is_amd else "supplied", root_detail=root_detail,
                     endorsement=kind)
    key_name = kind.upper()  # VCEK or VLEK, in messages
    issuer_role = "ASVK" if kind == "vlek" else "ASK"  # what signs it

    _PASS_TEXT: dict[str, str] = {}  # what a passing check says, filled in by the check

    def run(name: str, fn) -> bool:
        try:
            problem = fn()
        except (ValueError, certs.CertificateFormatError) as e:
            problem = str(e)
        ok = not problem
        v.checks.append(Check(name, ok, problem or _PASS_TEXT.get(name, "")))
        return ok

    def check_ark():
        if _common_name(ark) != f"ARK-{gen.title}":
            return f"the root is {_common_name(ark)!r}, not ARK-{gen.title}"
        why = certs.check_signed_by(ark, ark)
        if why:
            return f"the ARK is not validly self-signed: {why}"
        _PASS_TEXT["ark"] = (f"{_common_name(ark)} self-signed"
                             + (" (AMD's built-in)" if root_is_amd else " (supplied, NOT AMD's)"))
        return None

    def check_ask():
        why = certs.check_signed_by(ask, ark)
        if why:
            return f"the {issuer_role} {_common_name(ask)!r} is not signed by the ARK: {why}"
        _PASS_TEXT[issuer_role.lower()] = f"{_common_name(ask)} signed by {_common_name(ark)}"
        return None

    def check_vcek():
        why = certs.check_signed_by(vcek, ask)
        if why:
            return f"the {key_name} is not signed by the {issuer_role} {_common_name(ask)!r}: {why}"
        if not certs.is_p384_key(vcek):
            return f"the {key_name}'s key is not ECDSA P-384"
        ext = certs.VcekExtensions.of(vcek)
        v.vcek_extensions = ext
        if ext.product_name is not None and Generation.from_product_name(ext.product_name) != gen:
            return f"the {key_name} is for {ext.product_name!r}, not {gen.title}"
        _PASS_TEXT[kind] = f"{_common_name(vcek)} ({ext.product_name}) signed by {_common_name(ask)}"
        return None

    def check_validity():
        when = at or _dt.datetime.now(_dt.timezone.utc)
        for role, cert in (("ARK", ark), (issuer_role, ask), (key_name, vcek)):
            start, end = _validity(cert)
            if not start <= when <= end:
                return (f"the {role} is valid {start:%Y-%m-%d} to {end:%Y-%m-%d}, not at "
                        f"{when:%Y-%m-%d %H:%M} UTC (--at TIME checks at another time)")
        _PASS_TEXT["validity"] = f"all three valid at {when:%Y-%m-%d %H:%M} UTC"
        return None

    def check_signature():
        algo = struct.unpack_from("<I", report_bytes, 0x34)[0]
        if algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
            return f"SIGNATURE_ALGO is {algo}, not 1 (ECDSA P-384 with SHA-384)"
        r = int.from_bytes(report_bytes[SIGNATURE_OFFSET:SIGNATURE_OFFSET + SIG_COMPONENT_SIZE],
                           "little")
        s = int.from_bytes(report_bytes[SIGNATURE_OFFSET + SIG_COMPONENT_SIZE:
                                        SIGNATURE_OFFSET + 2 * SIG_COMPONENT_SIZE], "little")
        if not (0 < r < P384_ORDER and 0 < s < P384_ORDER):
            return "R or S is out of range for P-384 (zero, or not zero-padded)"
        key = vcek.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        try:
            key.verify(utils.encode_dss_signature(r, s), report_bytes[:SIGNED_SIZE],
                       ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            return "the report's signature does not verify with the VCEK"
        _PASS_TEXT["signature"] = "ECDSA P-384/SHA-384 over bytes 0x000-0x29F verifies"
        return None

    def check_format():
        try:
            v.report = AttestationReport.parse(report_bytes)
        except ReportFormatError as e:
            return str(e)
        rep = v.report
        claimed = rep.generation_from_cpuid()
        if rep.version >= 3 and claimed is not None and claimed is not gen:
            return (f"the report's CPUID (family {rep.cpuid_fam_id:#x} model {rep.cpuid_mod_id:#x}) "
                    f"is {claimed.title}, not {gen.title}")
        _PASS_TEXT["format"] = f"version {rep.version}" + (
            f", CPUID family {rep.cpuid_fam_id:#x} model {rep.cpuid_mod_id:#x} stepping "
            f"{rep.cpuid_step}" if rep.version >= 3 else "")
        return None

    def check_signing_key():
        rep = v.report
        want = SigningKey.VLEK if kind == "vlek" else SigningKey.VCEK
        if rep.signing_key != want:
            name = SigningKey(rep.signing_key).name if rep.signing_key in set(SigningKey) else rep.signing_key
            return f"SIGNING_KEY is {name}, but the certificate given is a {key_name}"
        _PASS_TEXT["signing-key"] = key_name
        return None

    def check_tcb():
        rep = v.report
        ext = v.vcek_extensions
        tcb = rep.tcb("reported_tcb", gen)
        pairs = [("bootloader", tcb.bootloader, ext.bl_spl), ("tee", tcb.tee, ext.tee_spl),
                 ("snp", tcb.snp, ext.snp_spl), ("microcode", tcb.microcode, ext.ucode_spl)]
        if gen is Generation.TURIN:
            pairs.insert(0, ("fmc", tcb.fmc, ext.fmc_spl))
        bad = [f"{n} {have} vs {key_name} {want}" for n, have, want in pairs if have != want]
        if bad:
            return f"REPORTED_TCB ({tcb}) is not the {key_name}'s: " + ", ".join(bad)
        _PASS_TEXT["tcb"] = f"REPORTED_TCB {tcb} = the {key_name}'s SPLs"
        return None

    def check_chip_id():
        rep = v.report
        if rep.mask_chip_key:
            _PASS_TEXT["chip-id"] = "MASK_CHIP_KEY set: CHIP_ID not reported"
            return None
        if kind == "vlek":  # a VLEK belongs to a cloud provider, not to one chip
            _PASS_TEXT["chip-id"] = "VLEK-signed: the key is not bound to a chip (no hwID)"
            return None
        hw = v.vcek_extensions.hw_id
        if hw is None:
            return "the VCEK has no hwID extension"
        if rep.hw_id(gen) != hw:
            return f"CHIP_ID {rep.hw_id(gen).hex()[:16]}... is not the VCEK's hwID {hw.hex()[:16]}..."
        _PASS_TEXT["chip-id"] = f"CHIP_ID = the VCEK's hwID ({hw.hex()[:16]}...)"
        return None

    def expectation(name, want, have_of, show):
        if want is None:
            return Check(name, None, "not requested")
        have = have_of(v.report)
        if have != want:
            return Check(name, False, f"the report has {show(have)}, expected {show(want)}")
        return Check(name, True, f"{show(have)} as expected")

    steps = [("ark", check_ark), ("asvk" if kind == "vlek" else "ask", check_ask), (kind, check_vcek),
             ("validity", check_validity), ("signature", check_signature),
             ("format", check_format), ("signing-key", check_signing_key), ("tcb", check_tcb),
             ("chip-id", check_chip_id)]
    for i, (name, fn) in enumerate(steps):
        if not run(name, fn):
            v.checks += [Check(n, None, "not run") for n, _ in steps[i + 1:]]
            v.checks += [Check(n, None, "not run") for n in ("measurement", "report-data", "policy")]
            return v
    report_data = (expect.report_data.ljust(64, b"\0") if expect.report_data is not None else None)
    for check in (
        expectation("measurement", expect.measurement, lambda r: r.measurement, bytes.hex),
        expectation("report-data", report_data, lambda r: r.report_data, bytes.hex),
        expectation("policy", expect.policy, lambda r: r.policy, lambda p: f"0x{p:x}"),
    ):
        v.checks.append(check)
        if check.ok is False:
            break
    else:
        return v
    done = {c.name for c in v.checks}
    v.checks += [Check(n, None, "not run") for n in ("measurement", "report-data", "policy")
                 if n not in done]
    return v
