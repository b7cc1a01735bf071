"""``kvmharness snp ...``: verify, show and simulate SEV-SNP attestation reports.

    kvmharness snp verify --report FILE [--vcek|--vlek FILE] [--processor milan|genoa|turin]
                          [--ark FILE --ask FILE] [--certs-dir DIR] [--measurement HEX]
                          [--report-data HEX] [--policy P] [--at TIME] [--json]
    kvmharness snp show --report FILE [--processor P] [--json]
    kvmharness snp simulate --out DIR [--processor P] [--report-data HEX] [--measurement HEX]
                          [--policy P] [--vmpl N] [--host-data HEX] [--chip-id HEX] [--json]
    kvmharness snp report GUEST [--backend sim] [--report-data HEX] [--vmpl N] --out DIR [--json]

``verify`` exits 0 when every check passes, 1 naming the first check that
fails, 2 for a file it cannot read or parse.  It never uses the network: the
VCEK comes from --vcek or --certs-dir (a KDS-style directory: ark.pem, ask.pem,
vcek.pem or vcek.der, cert_chain.pem), the ARK and ASK from files or AMD's
published roots shipped with kvmharness.  ``simulate`` writes report.bin,
vcek.pem, ask.pem and ark.pem from the simulated firmware (no guest is run);
``report`` runs an SNP guest (snp-attest) through the SNP launch and writes the
report the guest got from the firmware through an extended guest request, with
the VCEK, ASK and ARK from the certificate table KVM gave it.
"""

from __future__ import annotations

import datetime as _dt
import json
import sys
from pathlib import Path

from .. import errors as E

REPORT_HEX_CHARS = 2 * 0x4A0


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def read_report_file(path: str | Path) -> bytes:
    """A report file: the raw 0x4A0 bytes, or the same as hex text (virtee's .hex files)."""
    data = Path(path).read_bytes()
    if len(data) != 0x4A0:
        text = b"".join(data.split())
        if len(text) == REPORT_HEX_CHARS:
            try:
                return bytes.fromhex(text.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                pass
    return data


def _generation(text: str | None):
    from .report import Generation

    return Generation.parse(text) if text else None


def _policy(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text, 0)
    except ValueError:
        raise E.UsageError(f"--policy: not a number: {text!r} (e.g. 0x30000)") from None
    if not 0 <= value < 1 << 64:
        raise E.UsageError("--policy: the SNP guest policy is a 64-bit value")
    return value


def _when(text: str | None) -> _dt.datetime | None:
    if text is None:
        return None
    try:
        when = _dt.datetime.fromisoformat(text)
    except ValueError:
        raise E.UsageError(f"--at: not an ISO 8601 time: {text!r} (e.g. 2027-01-01)") from None
    return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)


# -- verify -----------------------------------------------------------------------------------
def cmd_verify(args) -> int:
    from . import certs
    from .verify import Expectations, load_certs_dir, parse_hex, verify_report

    found = load_certs_dir(args.certs_dir) if args.certs_dir else {}
    for role in ("vcek", "ark", "ask"):
        path = getattr(args, role)
        if path:
            found[role] = certs.read_certificate(path)
    if "vcek" not in found:
        raise E.UsageError("no VCEK: pass --vcek FILE (or --vlek) or --certs-dir DIR holding "
                           "vcek.pem or vcek.der (kvmharness never fetches from AMD's KDS; "
                           "https://kdsintf.amd.com/vcek/v1/<product>/<hwid>?... serves it)")
    expect = Expectations(
        measurement=(parse_hex(args.measurement, "--measurement", 48, exact=True)
                     if args.measurement else None),
        report_data=parse_hex(args.report_data, "--report-data", 64) if args.report_data else None,
        policy=_policy(args.policy))
    report = read_report_file(args.report)
    v = verify_report(report, found["vcek"], generation=_generation(args.processor),
                      ark=found.get("ark"), ask=found.get("ask"), expect=expect,
                      at=_when(args.at))
    if args.json:
        _print_json(v.to_dict())
    else:
        gen = v.generation.title if v.generation else "?"
        version = f"v{v.report.version} " if v.report else ""
        print(f"SNP attestation report {version}({gen}): {args.report}")
        print(f"root: {v.root_detail}")
        for c in v.checks:
            status = {True: "ok", False: "FAIL", None: "-"}[c.ok]
            print(f"  {status:4}  {c.name:12} {c.detail}")
        if v.ok:
            print("verified" + ("" if v.root == "amd" else
                                " (against the supplied root, not AMD's)"))
    if not v.ok:
        bad = v.failed
        print(f"kvmharness: error: attestation check {bad.name!r} failed: {bad.detail}",
              file=sys.stderr)
        return E.EXIT_GUEST_FAILED
    return E.EXIT_OK


# -- show -------------------------------------------------------------------------------------
def cmd_show(args) -> int:
    from .report import AttestationReport

    report = AttestationReport.parse(read_report_file(args.report))
    gen = _generation(args.processor) or report.generation_from_cpuid()
    d = report.to_dict(gen)
    if args.json:
        _print_json({"generation": gen.value if gen else None, "report": d})
    else:
        _print_report(d, gen)
    return E.EXIT_OK


def _print_report(d: dict, gen) -> None:
    print(f"generation: {gen.title if gen else 'unknown (v2 report: pass --processor)'}")
    for key, value in d.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={v}" for k, v in value.items())
            print(f"  {key:18} {inner}")
        else:
            print(f"  {key:18} {value}")


# -- simulate ---------------------------------------------------------------------------------
def cmd_simulate(args) -> int:
    from .attest import GuestAttestationContext, SimulatedSnpChip
    from .report import AttestationReport
    from .verify import parse_hex

    gen = _generation(args.processor or "milan")
    chip_id = None
    if args.chip_id:
        chip_id = parse_hex(args.chip_id, "--chip-id", 64).ljust(64, b"\0")
    if not 0 <= args.vmpl <= 3:
        raise E.UsageError("--vmpl: 0 to 3")
    if Path(args.out).exists() and not Path(args.out).is_dir():  # before the keys are made
        raise E.UsageError(f"--out {args.out}: not a directory")
    try:
        chip = SimulatedSnpChip(gen, chip_id=chip_id)
    except ValueError as e:
        raise E.UsageError(f"--chip-id: {e}") from None
    policy = _policy(args.policy)
    guest = GuestAttestationContext(
        measurement=(parse_hex(args.measurement, "--measurement", 48, exact=True)
                     if args.measurement else bytes(48)),
        policy=0x30000 if policy is None else policy,
        host_data=(parse_hex(args.host_data, "--host-data", 32).ljust(32, b"\0")
                   if args.host_data else bytes(32)))
    report_data = parse_hex(args.report_data, "--report-data", 64) if args.report_data else b""
    report = chip.report(guest, report_data, vmpl=args.vmpl)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.bin").write_bytes(report)
    for role, pem in chip.certificates().items():
        (out / f"{role}.pem").write_bytes(pem)
    d = AttestationReport.parse(report).to_dict(gen)
    if args.json:
        _print_json({"generation": gen.value, "out": str(out), "simulated": True,
                     "files": ["report.bin", "vcek.pem", "ask.pem", "ark.pem"], "report": d})
    else:
        print(f"wrote {out}/report.bin, vcek.pem, ask.pem, ark.pem (simulated {gen.title} "
              f"firmware; its ARK is not AMD's)")
        _print_report(d, gen)
    return E.EXIT_OK


# -- report: from a running guest ---------------------------------------------------------------
# The contract of guests/src/snp-attest.S: the host writes REPORT_DATA[64], u32 VMPL and u32 flags
# into the input page (shared after the guest's page-state change: the host writes its own view);
# the guest writes the plaintext MSG_REPORT_RSP to the output page and the extended request
# leaves KVM's certificate table in its buffer.  Its first report (key REPORT_KEY | 1) is the
# request's SW_EXITINFO2.
ATTEST_INPUT_GPA = 0x1A000
ATTEST_OUTPUT_GPA = 0x1B000
ATTEST_CERTS_GPA = 0x1E000
ATTEST_CERT_PAGES = 4
ATTEST_FLAG_EXTENDED = 1
REPORT_KEY = 0x736E700000000400


def guest_report(guest: str, backend: str = "sim", report_data: bytes = bytes(64), vmpl: int = 0,
                 timeout: float | None = None) -> dict:
    """Run an SNP guest that speaks snp-attest's contract and collect its report:
    ``{"report": bytes, "certificates": {role: der}, "launch_digest": bytes, "result": RunResult}``."""
    import struct

    from ..images import get_guest
    from ..machine import Machine
    from .messages import parse_certificate_table, parse_report_response

    image = get_guest(guest)
    if "sev-snp" not in image.needs:
        raise E.UsageError(f"guest {guest!r} is not an SEV-SNP guest (its manifest does not need "
                           "sev-snp); try snp-attest")
    m = Machine.for_guest(image, backend, sev="sev-snp")
    try:
        m.vm.write(ATTEST_INPUT_GPA, bytes(report_data).ljust(64, b"\0")
                   + struct.pack("<II", vmpl, ATTEST_FLAG_EXTENDED))
        result = m.run(timeout if timeout is not None else image.timeout)
        if not result.ok:
            raise E.GuestFailure(image.name, result.describe(), code=result.fail_code,
                                 line=result.fail_line, result=result)
        values = result.values
        if REPORT_KEY | 1 not in values:
            raise E.GuestFailure(image.name, "it made no guest request (not snp-attest's "
                                 "contract)", result=result)
        err = values[REPORT_KEY | 1]
        if err:
            raise E.GuestFailure(image.name, f"the guest request failed: SW_EXITINFO2 {err:#x} "
                                 f"(VMM error {err >> 32}, firmware status {err & 0xFFFFFFFF:#x})",
                                 result=result)
        if values.get(REPORT_KEY | 2) != 0:
            raise E.GuestFailure(image.name, "the firmware's response did not authenticate in "
                                 "the guest", result=result)
        status, report = parse_report_response(m.vm.read(ATTEST_OUTPUT_GPA, 0x4C0))
        if status or len(report) != 0x4A0:
            raise E.GuestFailure(image.name, f"MSG_REPORT_RSP status {status:#x}, "
                                 f"{len(report)} report bytes", result=result)
        certs = parse_certificate_table(m.vm.read(ATTEST_CERTS_GPA, ATTEST_CERT_PAGES * 4096))
        return {"report": report, "certificates": certs,
                "launch_digest": m.launch_result.launch_digest, "result": result}
    finally:
        m.close()


def cmd_report(args) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from .report import AttestationReport
    from .verify import parse_hex

    if not 0 <= args.vmpl <= 3:
        raise E.UsageError("--vmpl: 0 to 3")
    report_data = parse_hex(args.report_data, "--report-data", 64) if args.report_data else b""
    if args.timeout is not None:
        from ..watchdog import check_timeout

        args.timeout = check_timeout(args.timeout, "--timeout")
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # refused before the guest runs, not after
        raise E.UsageError(f"--out {args.out}: not a directory")
    try:
        got = guest_report(args.guest, args.backend, report_data, args.vmpl, args.timeout)
    except E.FeatureUnavailable as e:  # this host's KVM cannot: say what to do instead
        if args.backend == "sim" or "backend sim" in str(e):
            raise
        err = E.FeatureUnavailable(f"{e}; run it on the simulator with --backend sim")
        err.host_verdict = e.host_verdict
        raise err from e
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.bin").write_bytes(got["report"])
    files = ["report.bin"]
    for role in ("vcek", "ask", "ark"):
        der = got["certificates"].get(role)
        if der is None:
            raise E.GuestFailure(args.guest, f"the certificate table has no {role.upper()}")
        pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
        (out / f"{role}.pem").write_bytes(pem)
        files.append(f"{role}.pem")
    report = AttestationReport.parse(got["report"])
    gen = report.generation_from_cpuid()
    d = report.to_dict(gen)
    if args.json:
        _print_json({"guest": args.guest, "backend": got["result"].backend, "out": str(out),
                     "files": files, "launch_digest": got["launch_digest"].hex(),
                     "generation": gen.value if gen else None, "report": d})
    else:
        print(f"wrote {out}/" + ", ".join(files) + f" (guest {args.guest} on "
              f"{got['result'].backend}; the simulated chip's ARK is not AMD's)")
        print(f"launch digest: {got['launch_digest'].hex()}")
        _print_report(d, gen)
    return E.EXIT_OK


def register(subparsers) -> None:
    snp = subparsers.add_parser("snp", help="SEV-SNP attestation: verify real or simulated "
                                            "reports, show one, simulate one")
    sub = snp.add_subparsers(dest="snp_command", metavar="SUBCOMMAND")
    sub.required = True
    processors = ("milan", "genoa", "turin")

    v = sub.add_parser("verify", help="check a report: AMD's chain, the signature, the TCB "
                                      "against the VCEK, and the given expectations")
    v.add_argument("--report", required=True, help="the 0x4A0-byte report (binary or hex text)")
    v.add_argument("--vcek", "--vlek", dest="vcek",
                   help="the VCEK, or the VLEK of a VLEK-signed report (PEM or DER; a PEM bundle's "
                        "first certificate)")
    v.add_argument("--processor", choices=processors,
                   help="the generation (default: the VCEK's productName, else the report's CPUID)")
    v.add_argument("--ark", help="the ARK to trust instead of AMD's built-in one")
    v.add_argument("--ask", help="the ASK, or the ASVK for a VLEK (default: AMD's built-in one "
                                 "for the generation)")
    v.add_argument("--certs-dir", help="a KDS-style directory: ark.pem, ask.pem, vcek.pem or "
                                       "vcek.der, cert_chain.pem")
    v.add_argument("--measurement", help="expected MEASUREMENT (48 bytes, hex)")
    v.add_argument("--report-data", help="expected REPORT_DATA (up to 64 bytes, hex; zero padded)")
    v.add_argument("--policy", help="expected guest POLICY (e.g. 0x30000)")
    v.add_argument("--at", help="check certificate validity at this ISO 8601 time (default now)")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    s = sub.add_parser("show", help="print a report's fields (no verification)")
    s.add_argument("--report", required=True)
    s.add_argument("--processor", choices=processors,
                   help="to decode the TCBs of a v2 report (v3+ carry the CPUID)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

    m = sub.add_parser("simulate", help="a report from the simulated SNP firmware, with its "
                                        "simulated VCEK, ASK and ARK")
    m.add_argument("--out", required=True, help="directory for report.bin, vcek.pem, ask.pem, "
                                                "ark.pem")
    m.add_argument("--processor", choices=processors, default="milan")
    m.add_argument("--report-data", help="REPORT_DATA (up to 64 bytes, hex)")
    m.add_argument("--measurement", help="MEASUREMENT (48 bytes, hex; default zeros)")
    m.add_argument("--policy", help="guest POLICY (default 0x30000)")
    m.add_argument("--vmpl", type=int, default=0)
    m.add_argument("--host-data", help="HOST_DATA (up to 32 bytes, hex)")
    m.add_argument("--chip-id", help="CHIP_ID (hex, up to 64 bytes; 8 on Turin)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_simulate)

    r = sub.add_parser("report", help="run an SNP guest (snp-attest) and write the report it "
                                      "gets from the firmware, with the certificates")
    r.add_argument("guest", help="an SNP guest speaking snp-attest's contract (snp-attest)")
    r.add_argument("--backend", choices=("sim", "kvm", "auto"), default="sim")
    r.add_argument("--report-data", help="REPORT_DATA (up to 64 bytes, hex; zero padded)")
    r.add_argument("--vmpl", type=int, default=0, help="the VMPL the report is for (0-3)")
    r.add_argument("--out", required=True, help="directory for report.bin, vcek.pem, ask.pem, "
                                                "ark.pem")
    r.add_argument("--timeout", type=float, default=None)
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_report)


# -- `kvmharness measure ... --mode sev-snp` ---------------------------------------------

def measure_command(args) -> int:
    """The SNP launch digest of a guest or image, with the log that replays it.
    (Here, not in snp/launch.py: the guest catalogue is the CLI's to open.)"""
    from ..errors import UsageError
    from .launch import SNP_CPUID_GPA, SNP_SECRETS_GPA, expected_digest, guest_launch_plan
    from .policy import DEFAULT_POLICY, SnpPolicy

    if bool(args.guest) == bool(args.image):
        raise UsageError("name a guest or give --image FILE (exactly one)")
    if getattr(args, "vmsa", None) or getattr(args, "tik", None) or getattr(args, "nonce", None):
        raise UsageError("--vmsa/--tik/--nonce are SEV/SEV-ES options; an SNP launch digest "
                         "covers the VMSAs it builds and has no TIK")
    if args.guest:
        from ..images import get_guest

        guest = get_guest(args.guest)
        image, entry_mode, memory, source = guest.load(), guest.mode, guest.memory, \
            f"guest {args.guest}"
    else:
        try:
            image = Path(args.image).read_bytes()
        except OSError as e:
            raise UsageError(f"cannot read --image {args.image}: {e.strerror}") from None
        entry_mode, memory, source = "real", 2 << 20, args.image
    policy = SnpPolicy.parse(args.policy) if args.policy is not None else SnpPolicy(
        DEFAULT_POLICY)
    why = policy.kvm_check()
    if why:
        raise UsageError(f"SNP policy {policy.value:#x} ({policy}): KVM refuses it: {why}")
    plan = guest_launch_plan(image, entry_mode, memory, vcpus=args.vcpus,
                             c_bit=args.c_bit if entry_mode == "long64" else None,
                             vcpu_sig=args.vcpu_sig, source=source)
    digest = expected_digest(plan)
    counts: dict[str, int] = {}
    for p in plan.pages:
        counts[p.page_type.label] = counts.get(p.page_type.label, 0) + 1
    out = {"source": source, "mode": "sev-snp", "vcpus": plan.vcpus,
           "vcpu_sig": f"0x{args.vcpu_sig:08x}", "policy": f"0x{policy.value:x}",
           "policy_text": str(policy), "image_size": len(image), "pages": counts,
           "secrets_gpa": f"0x{SNP_SECRETS_GPA:x}", "cpuid_gpa": f"0x{SNP_CPUID_GPA:x}",
           "launch_digest": digest.hex(),
           "launch_log": [e.to_json() for e in digest.log]}
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(f"{source}: SEV-SNP launch of {len(plan.pages)} pages ("
              + ", ".join(f"{n} {t}" for t, n in counts.items())
              + f"), {plan.vcpus} vCPU(s), policy {out['policy']} ({policy})")
        print(f"launch digest: {out['launch_digest']}")
        print("(--json gives the launch log: every page's GPA, type and SHA-384)")
    return E.EXIT_OK
