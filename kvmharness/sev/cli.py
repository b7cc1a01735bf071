"""``kvmharness sev ...`` (the /dev/sev platform) and ``kvmharness measure`` (offline).

    kvmharness sev status [--backend auto|kvm|sim] [--json]
    kvmharness sev id | pek-csr [--out FILE] | export [--out DIR]
    kvmharness sev factory-reset | pek-gen | pdh-gen --i-know-this-is-destructive
    kvmharness sev verify [--pdh F --pek F --oca F --cek F] [--ask F] [--ark F] [--product P]
    kvmharness measure GUEST | --image FILE  --policy P --api 1.55 --build 21
                       --nonce HEX --tik HEX [--mode sev|sev-es] [--vmsa FILE]
                       [--legacy-init] [--json]

``--backend sim`` answers from the simulated SEV firmware (a fresh chip per
command: it starts UNINIT, as a platform does before anything initializes
it); ``auto`` uses /dev/sev when it exists.  ``measure`` needs no device: it
computes the launch digest the firmware will report for the image
(zero-padded to 16 bytes, as ``SevLaunch.launch`` loads it) and, given the
TIK and the firmware's MNONCE, the 32-byte MEASURE an owner compares with
LAUNCH_MEASURE's output.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from .. import errors as E

DESTRUCTIVE = {
    "factory-reset": ("factory_reset", "forget the platform owner and regenerate OCA, PEK and PDH"),
    "pek-gen": ("pek_gen", "regenerate the OCA and PEK (self-owned) and the PDH"),
    "pdh-gen": ("pdh_gen", "regenerate the PDH; sessions built for the old one stop working"),
}


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _platform(args):
    from ..factory import open_sev_platform

    platform = open_sev_platform(args.backend)
    if args.backend == "auto" and platform.backend == "sim":  # say which it picked, as run does
        print("# auto: no /dev/sev, using the simulated SEV firmware (a fresh chip per command; "
              "--backend kvm for /dev/sev)", file=sys.stderr)
    return platform


def _status_dict(st, backend: str) -> dict:
    return {"backend": backend, "api": f"{st.api_major}.{st.api_minor}", "api_major": st.api_major,
            "api_minor": st.api_minor, "build": st.build, "state": st.state.name,
            "state_value": int(st.state), "flags": f"0x{st.flags:x}",
            "owner": "external" if st.externally_owned else "self",
            "config_es": st.config_es, "guest_count": st.guest_count}


def cmd_status(args) -> int:
    """SEV_PLATFORM_STATUS."""
    with _platform(args) as p:
        d = _status_dict(p.status(), p.backend)
    if args.json:
        _print_json(d)
    else:
        print(f"SEV platform ({d['backend']}): API {d['api']} build {d['build']}, state {d['state']}, "
              f"{d['owner']}-owned, SEV-ES {'initialized' if d['config_es'] else 'not initialized'}, "
              f"{d['guest_count']} guest(s)")
    return E.EXIT_OK


def cmd_id(args) -> int:
    """SEV_GET_ID2."""
    with _platform(args) as p:
        chip_id = p.get_id()
        backend = p.backend
    if args.json:
        _print_json({"backend": backend, "id": chip_id.hex(), "length": len(chip_id)})
    else:
        print(chip_id.hex())
    return E.EXIT_OK


def _cert_summary(raw: bytes) -> dict:
    from .certs import SevCertificate

    cert = SevCertificate.from_bytes(raw)
    return {"usage": cert.usage_name, "algo": f"0x{int(cert.algo):x}",
            "api": f"{cert.api_major}.{cert.api_minor}", "size": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest()}


def cmd_export(args) -> int:
    """SEV_PDH_CERT_EXPORT: the PDH and the chain PEK, OCA, CEK (sevctl's file names)."""
    from .certs import CERT_SIZE

    with _platform(args) as p:
        pdh, chain = p.pdh_cert_export()
        backend = p.backend
    files = {"pdh.cert": pdh}
    for i, name in enumerate(("pek.cert", "oca.cert", "cek.cert")):
        files[name] = chain[i * CERT_SIZE:(i + 1) * CERT_SIZE]
    out = {"backend": backend, "certificates": {n: _cert_summary(b) for n, b in files.items()}}
    if args.out:
        d = Path(args.out)
        d.mkdir(parents=True, exist_ok=True)
        for name, raw in files.items():
            (d / name).write_bytes(raw)
        (d / "cert_chain.cert").write_bytes(chain)
        out["written"] = [str(d / n) for n in (*files, "cert_chain.cert")]
    if args.json:
        _print_json(out)
    else:
        for name, s in out["certificates"].items():
            print(f"{name:9s} {s['usage']:4s} algo {s['algo']} API {s['api']} sha256 {s['sha256']}")
        for path in out.get("written", ()):
            print(f"wrote {path}")
    return E.EXIT_OK


def cmd_pek_csr(args) -> int:
    """SEV_PEK_CSR: the PEK certificate for an owner's OCA to sign."""
    with _platform(args) as p:
        csr = p.pek_csr()
        backend = p.backend
    out = {"backend": backend, "csr": _cert_summary(csr)}
    if args.out:
        Path(args.out).write_bytes(csr)
        out["written"] = args.out
    if args.json:
        _print_json(out)
    else:
        s = out["csr"]
        print(f"PEK CSR: {s['size']} bytes, usage {s['usage']}, sha256 {s['sha256']}"
              + (f"; wrote {args.out}" if args.out else " (use --out FILE to save it)"))
    return E.EXIT_OK


def cmd_destructive(args) -> int:
    method, what = DESTRUCTIVE[args.sev_command]
    if not args.i_know_this_is_destructive:
        raise E.UsageError(f"'sev {args.sev_command}' will {what}. Certificates and sessions made "
                           "for this platform stop working. Re-run with "
                           "--i-know-this-is-destructive to do it")
    with _platform(args) as p:
        getattr(p, method)(allow_destructive=True)
        d = _status_dict(p.status(), p.backend)
    if args.json:
        _print_json({"done": args.sev_command, "status": d})
    else:
        print(f"{args.sev_command}: done ({d['backend']}); platform now {d['state']}, "
              f"{d['owner']}-owned")
    return E.EXIT_OK


# -- verify ------------------------------------------------------------------------

_CHAIN_FILES = ("pdh", "pek", "oca", "cek")


def _read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise E.UsageError(f"cannot read --{flag} {path}: {e.strerror}") from None


def _given_amd_certs(args) -> tuple[dict, dict]:
    """--ask/--ark files (AMD CA format; a file holding ASK||ARK, as AMD's KDS serves
    ``ask_ark_<product>.cert``, fills both roles unless the other is given too)."""
    from .amd_ca import AmdCaCertificate
    from .certs import CertUsage

    amd, info = {}, {}
    for flag in ("ask", "ark"):
        path = getattr(args, flag)
        if not path:
            continue
        raw = _read_file(path, flag)
        try:
            certs = AmdCaCertificate.parse_many(raw)
        except E.CertificateError:
            certs = []
        # unparseable: pass the bytes on, and verify_chain says what is wrong on the link
        amd[flag], info[flag] = (certs[0] if certs else raw), f"--{flag} {path}"
        for extra in certs[1:]:
            role = "ark" if extra.usage == CertUsage.ARK else "ask"
            if role not in amd and not getattr(args, role):
                amd[role], info[role] = extra, f"--{flag} {path}"
    return amd, info


def _product_for_cek(cek: bytes) -> str | None:
    """The built-in product whose ASK signed this CEK (None: none did, or no CEK)."""
    from .amd_ca import roots_for_cek
    from .certs import SevCertificate

    try:
        roots = roots_for_cek(SevCertificate.from_bytes(cek))
    except E.CertificateError:
        return None
    return roots.product if roots else None


def _choose_roots(args, chain: dict, platform_roots) -> tuple[dict, dict]:
    """The ARK/ASK to verify with, and where each came from.

    Given files first; then ``--product``; else the simulated platform's own
    root (sim), or the built-in product whose ASK signed the CEK.
    """
    from .amd_ca import builtin_roots

    amd, info = _given_amd_certs(args)
    product = None if args.product == "auto" else args.product
    if product is None and len(amd) < 2:
        if platform_roots is not None:
            for role, cert in zip(("ark", "ask"), platform_roots):
                if role not in amd:
                    amd[role], info[role] = cert, "the simulated platform's AMD root"
        else:
            product = _product_for_cek(chain["cek"])
    if product is not None:
        roots = builtin_roots(product)
        for role in ("ark", "ask"):
            if role not in amd:
                amd[role], info[role] = getattr(roots, role), f"built-in {product}"
    info["product"] = product
    return amd, info


def cmd_verify(args) -> int:
    """The SEV chain ARK -> ASK -> CEK -> PEK <- OCA, PEK -> PDH, one result per link."""
    from .amd_ca import PRODUCTS
    from .certs import CERT_SIZE
    from .chain import ChainVerification, LinkResult, verify_chain

    given = [f for f in _CHAIN_FILES if getattr(args, f)]
    platform_roots = kds_cek = chip_id = None
    if given and given != ["cek"]:
        if len(given) != 4:
            missing = ", ".join(f"--{f}" for f in _CHAIN_FILES if f not in given)
            raise E.UsageError(f"verifying from files needs --pdh, --pek, --oca and --cek; "
                               f"missing {missing} (or give none, or only --cek, to export from "
                               "the platform)")
        chain = {f: _read_file(getattr(args, f), f) for f in _CHAIN_FILES}
        source = "files"
        cek_from = f"--cek {args.cek}"
    else:
        # PDH_CERT_EXPORT: its CEK is unsigned (AMD's firmware exports it so); --cek alone is
        # the ASK-signed CEK the user fetched from AMD's KDS by chip id (never the network here)
        if args.cek:
            kds_cek = _read_file(args.cek, "cek")
        with _platform(args) as p:
            pdh, certs = p.pdh_cert_export()
            source = p.backend
            try:
                chip_id = p.get_id()
            except (AttributeError, E.HarnessError):
                chip_id = None  # the reason then names the KDS address without the id
            if p.firmware is not None:  # simulated: its stand-in AMD roots
                platform_roots = (p.firmware.ark_cert, p.firmware.ask_cert)
        chain = {"pdh": pdh}
        for i, name in enumerate(("pek", "oca", "cek")):
            chain[name] = certs[i * CERT_SIZE:(i + 1) * CERT_SIZE]
        cek_from = (f"--cek {args.cek} (AMD's KDS), for the exported CEK's key" if kds_cek
                    else "PDH_CERT_EXPORT (unsigned, as AMD's firmware exports it)")
    amd, roots = _choose_roots(args, {**chain, "cek": kds_cek or chain["cek"]}, platform_roots)
    result = verify_chain(chain["pdh"], chain["pek"], chain["oca"], chain["cek"],
                          ask=amd.get("ask"), ark=amd.get("ark"), kds_cek=kds_cek, chip_id=chip_id)
    if "ask" not in amd:  # auto found no built-in ASK that signed this CEK: say so
        why = (f"the CEK is signed by none of the built-in AMD ASKs ({', '.join(PRODUCTS)}); "
               "give --ask/--ark or --product")
        links = tuple(LinkResult(l.name, l.signer, l.subject, "failed", why)
                      if l.name == "ASK -> CEK" and l.status == "skipped" else l
                      for l in result.links)
        result = ChainVerification(links, result.certs)
    out = {"source": source, "roots": roots, "cek": cek_from,
           "chip_id": bytes(chip_id).hex() if chip_id else None, **result.to_dict(),
           # the exit status's answer: every link verified up to AMD's ARK ("ok" is only
           # "no link failed"; an unverified ASK -> CEK leaves it true)
           "verified": not (result.failed or result.unverified)}
    if args.json:
        _print_json(out)
    else:
        where = "; ".join(f"{r.upper()} {roots[r]}" for r in ("ark", "ask") if roots.get(r))
        print(f"SEV certificate chain from {source}; AMD roots: {where or 'none'}; "
              f"CEK from {cek_from}")
        for link in result.links:
            mark = {"ok": "ok", "failed": "FAILED", "skipped": "skipped",
                    "unverified": "UNVERIFIED"}[link.status]
            print(f"  {mark:7s} {link.name}" + (f": {link.reason}" if link.reason else ""))
        if result.failed:
            print(f"chain FAILED at: {', '.join(result.failed)}")
        elif result.unverified:
            held = ", ".join(link.name for link in result.links if link.ok)
            print(f"chain NOT verified to AMD: {', '.join(result.unverified)} unverified "
                  f"(see above); holds: {held}")
        elif result.skipped:
            print(f"chain holds as far as checked; not checked: {', '.join(result.skipped)}")
        else:
            print("chain verified: ARK -> ASK -> CEK -> PEK, OCA -> PEK, PEK -> PDH")
    return E.EXIT_GUEST_FAILED if result.failed or result.unverified else E.EXIT_OK


# -- measure -------------------------------------------------------------------------

def _hex_arg(text: str, size: int, what: str) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise E.UsageError(f"--{what} must be hex, got {text!r}") from None
    if len(raw) != size:
        raise E.UsageError(f"--{what} must be {size} bytes ({2 * size} hex digits), got {len(raw)}")
    return raw


def _api_arg(text: str) -> tuple[int, int]:
    try:
        major, minor = (int(x, 0) for x in text.split("."))
    except ValueError:
        raise E.UsageError(f"--api is MAJOR.MINOR (e.g. 1.55), got {text!r}") from None
    return major, minor


def _vmsa_pages(args, guest) -> list[bytes]:
    """SEV-ES: --vmsa FILE, or the VMSA KVM builds from the harness's entry state of ``guest``."""
    from .measurement import VMSA_PAGE_SIZE

    if args.vmsa:
        raw = Path(args.vmsa).read_bytes()
        if not raw or len(raw) % VMSA_PAGE_SIZE:
            raise E.UsageError(f"--vmsa {args.vmsa}: {len(raw)} bytes is not a whole number of "
                               f"{VMSA_PAGE_SIZE}-byte VMSA pages")
        return [raw[i:i + VMSA_PAGE_SIZE] for i in range(0, len(raw), VMSA_PAGE_SIZE)]
    if guest is None:
        raise E.UsageError("an SEV-ES measurement covers the initial VMSA, and the entry state of "
                           "a raw --image is unknown: pass --vmsa FILE (4096-byte pages, vCPU 0 "
                           "first) or name a manifest guest")
    try:
        from .vmsa import build_vmsa
    except ImportError:
        raise E.FeatureUnavailable("an SEV-ES measurement covers the initial VMSA pages, and "
                                   "kvmharness.sev.vmsa (which builds them) is not present; pass "
                                   "--vmsa FILE") from None
    from ..boot import long_mode_state, real_mode_state

    regs, sregs = (long_mode_state(guest.memory) if guest.mode == "long64" else real_mode_state())
    return [build_vmsa(regs, sregs, sev_features=0, init2=not args.legacy_init)]


def integer(text: str) -> int:
    """An integer in any base Python reads (0x..., 0o..., decimal); argparse names the type
    'integer' in its error."""
    return int(text, 0)


def _c_bit_arg(text: str) -> int:
    import argparse

    try:
        bit = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 32 <= bit <= 63:  # EPYC parts report 47 or 51; a PTE bit above the address bits
        raise argparse.ArgumentTypeError(f"the C-bit is a page-table bit from 32 to 63, not {bit}")
    return bit


# measure's options that default to a value, and the value (None in the parser: given or not)
_MEASURE_DEFAULTS = {"api": "1.55", "build": 21, "c_bit": 51, "vcpu_sig": 0x00A00F11}


def _measure_defaults(args) -> set:
    """Fill measure's defaults; the options the user gave, as flags (``--c-bit``)."""
    given = set()
    for name, default in _MEASURE_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)
        else:
            given.add("--" + name.replace("_", "-"))
    return given


def _refuse_unused(args, given: set, mode: str) -> None:
    """An option that does not enter this measurement is refused: it was silently ignored,
    so a digest looked as if it covered it."""
    unused = []
    if args.image and "--c-bit" in given:
        unused.append(("--c-bit", "the C-bit goes into the boot page tables the harness builds "
                                  "for a manifest guest; a raw --image has none"))
    elif args.guest and "--c-bit" in given:
        from ..images import get_guest

        if get_guest(args.guest).mode != "long64":
            unused.append(("--c-bit", f"{args.guest} starts in real mode: the harness builds it "
                                      "no page tables to carry the C-bit"))
    if mode == "sev-snp":
        unused += [(f, "an SNP launch digest has no firmware API/build in it")
                   for f in ("--api", "--build") if f in given]
        if args.legacy_init:
            unused.append(("--legacy-init", "SNP launches through KVM_SEV_INIT2 only"))
    else:
        if "--vcpu-sig" in given:
            unused.append(("--vcpu-sig", "it is the SNP APs' reset signature (--mode sev-snp)"))
        if mode == "sev" and (args.vmsa or args.legacy_init):
            unused.append(("--vmsa" if args.vmsa else "--legacy-init",
                           "an SEV (not SEV-ES) launch measures no VMSA (--mode sev-es)"))
    if unused:
        flag, why = unused[0]
        raise E.UsageError(f"{flag} does not apply to this {mode} measurement: {why}")


def cmd_measure(args) -> int:
    """The expected launch digest and MEASURE, computed offline."""
    given = _measure_defaults(args)
    if args.mode == "sev-snp":  # SHA-384 PAGE_INFO chain and its log (kvmharness.snp.launch)
        from ..snp.cli import measure_command

        _refuse_unused(args, given, "sev-snp")
        return measure_command(args)
    from .launch import pad_image
    from .measurement import compute_measure, launch_digest
    from .policy import GuestPolicy

    if bool(args.guest) == bool(args.image):
        raise E.UsageError("name a guest or give --image FILE (exactly one)")
    guest = None
    if args.guest:
        from ..images import get_guest

        guest = get_guest(args.guest)
        image = guest.load()
        source = f"guest {args.guest}"
    else:
        try:
            image = Path(args.image).read_bytes()
        except OSError as e:
            raise E.UsageError(f"cannot read --image {args.image}: {e.strerror}") from None
        source = args.image
    if args.mode is None:  # what `run` launches by default: the guest's first SEV mode
        if guest is None:
            args.mode = "sev"
        else:
            args.mode = next((m for m in guest.modes if m != "svm"), None)
            if args.mode is None:
                raise E.UsageError(f"guest {guest.name!r} runs only in svm mode (its manifest "
                                   "modes): it has no SEV launch to measure; give --mode")
            if args.mode == "sev-snp":  # an SNP guest: its SNP launch digest, as `run` launches it
                from ..snp.cli import measure_command

                _refuse_unused(args, given, "sev-snp")
                return measure_command(args)
    _refuse_unused(args, given, args.mode)
    if args.vcpus != 1:  # only the SNP digest covers one VMSA per vCPU here
        raise E.UsageError(f"--vcpus applies to --mode sev-snp; an {args.mode} measurement here "
                           "covers vCPU 0 only (for SEV-ES give every vCPU's VMSA with --vmsa FILE)")
    # the same default as `run`, so --tik/--nonce predict a default run's MEASURE
    from ..images import DEFAULT_SEV_POLICY

    policy = GuestPolicy.parse(args.policy if args.policy is not None else DEFAULT_SEV_POLICY[args.mode])
    policy.validate()
    if args.mode == "sev-es" and not policy.es:
        raise E.UsageError(f"an SEV-ES guest's policy has the ES bit; {policy} does not")
    if args.mode == "sev" and policy.es:
        raise E.UsageError(f"policy {policy} requires SEV-ES: use --mode sev-es")
    major, minor = _api_arg(args.api)
    if guest is not None:  # what a launch of this guest measures: boot tables + image
        from ..boot import sev_launch_blob

        _, region = sev_launch_blob(image, guest.mode, args.c_bit)
    else:
        region = pad_image(image)
    vmsas = _vmsa_pages(args, guest) if args.mode == "sev-es" else []
    digest = launch_digest([region], vmsas)
    out = {"source": source, "mode": args.mode, "image_size": len(image),
           "measured_size": len(region), "vmsa_pages": len(vmsas),
           "policy": f"0x{policy.value:08x}", "policy_text": str(policy),
           "api": f"{major}.{minor}", "build": args.build, "launch_digest": digest.hex()}
    if vmsas:
        out["vmsa_sha256"] = [hashlib.sha256(p).hexdigest() for p in vmsas]
    if args.tik or args.nonce:
        if not (args.tik and args.nonce):
            raise E.UsageError("the MEASURE needs both --tik (the owner's 16-byte TIK) and "
                               "--nonce (the firmware's 16-byte MNONCE)")
        tik = _hex_arg(args.tik, 16, "tik")
        mnonce = _hex_arg(args.nonce, 16, "nonce")
        measure = compute_measure(tik, api_major=major, api_minor=minor, build=args.build,
                                  policy=policy.value, digest=digest, mnonce=mnonce)
        out["mnonce"] = mnonce.hex()
        out["measure"] = measure.hex()
        out["measurement"] = (measure + mnonce).hex()
    if args.json:
        _print_json(out)
    else:
        print(f"{source}: {out['measured_size']} bytes measured ({args.mode}"
              + (f", {len(vmsas)} VMSA page(s)" if vmsas else "") + f"), policy {out['policy']} "
              f"({out['policy_text']}), firmware {out['api']} build {args.build}")
        print(f"launch digest: {out['launch_digest']}")
        if "measure" in out:
            print(f"MEASURE:       {out['measure']}")
            print(f"measurement (MEASURE || MNONCE): {out['measurement']}")
        else:
            print("(give --tik and --nonce for the MEASURE the firmware will report)")
    return E.EXIT_OK


# -- wiring ---------------------------------------------------------------------------

def register(subparsers) -> None:
    """Add ``sev`` and ``measure`` to the kvmharness command line."""
    sev = subparsers.add_parser("sev", help="the SEV platform (/dev/sev or the simulated firmware)")
    sev_sub = sev.add_subparsers(dest="sev_command", metavar="SEV_COMMAND")
    sev_sub.required = True

    def common(p):
        p.add_argument("--backend", choices=("auto", "kvm", "sim"), default="auto",
                       help="kvm: /dev/sev; sim: the simulated firmware; auto: kvm if /dev/sev "
                            "exists (default)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    common(sev_sub.add_parser("status", help="PLATFORM_STATUS: API version, build, state, "
                              "owner, guests")).set_defaults(func=cmd_status)
    common(sev_sub.add_parser("id", help="GET_ID2: the chip id")).set_defaults(func=cmd_id)
    p = common(sev_sub.add_parser("export", help="PDH_CERT_EXPORT: the PDH and the "
                                  "certificate chain"))
    p.add_argument("--out", metavar="DIR", help="write pdh/pek/oca/cek.cert here")
    p.set_defaults(func=cmd_export)
    p = common(sev_sub.add_parser("pek-csr", help="PEK_CSR: the PEK for an owner to sign"))
    p.add_argument("--out", metavar="FILE", help="write the CSR here")
    p.set_defaults(func=cmd_pek_csr)
    for name, (_, what) in DESTRUCTIVE.items():
        p = common(sev_sub.add_parser(name, help=f"DESTRUCTIVE: {what}"))
        p.add_argument("--i-know-this-is-destructive", action="store_true",
                       help="required: confirms you mean it")
        p.set_defaults(func=cmd_destructive)
    p = common(sev_sub.add_parser("verify", help="verify the certificate chain ARK -> ASK -> "
                                  "CEK -> PEK <- OCA, PEK -> PDH (as sevctl verify)"))
    for name in _CHAIN_FILES[:3]:
        p.add_argument(f"--{name}", metavar="FILE", help=f"the {name.upper()} certificate "
                       "(SEV format); give all four, or none to export from the platform")
    p.add_argument("--cek", metavar="FILE", help="the CEK certificate (SEV format): with "
                   "--pdh/--pek/--oca, the chain's; alone, the ASK-signed CEK fetched from AMD's "
                   "KDS (https://kdsintf.amd.com/cek/id/<chip id>), used with the platform's "
                   "export, whose own CEK is unsigned (kvmharness never uses the network)")
    p.add_argument("--ask", metavar="FILE", help="AMD's ASK (AMD CA format; a file holding "
                   "ASK||ARK, as AMD serves ask_ark_<product>.cert, gives both)")
    p.add_argument("--ark", metavar="FILE", help="AMD's ARK (AMD CA format)")
    p.add_argument("--product", choices=("auto", "naples", "rome", "milan", "genoa", "turin"),
                   default="auto", help="built-in ARK/ASK to use (default auto: the one whose "
                   "ASK signed the CEK; on the simulator, its own simulated root)")
    p.set_defaults(func=cmd_verify)

    m = subparsers.add_parser("measure", help="the expected SEV launch digest and measurement "
                              "of a guest, computed offline")
    m.add_argument("guest", nargs="?", help="a manifest guest (see: kvmharness guests)")
    m.add_argument("--image", metavar="FILE", help="a raw guest image instead of a manifest guest")
    m.add_argument("--policy", default=None, help="guest policy: number or flags, e.g. nodbg,es "
                   "(default as for run: nodbg, plus es for sev-es)")
    m.add_argument("--api", default=None, help="firmware API MAJOR.MINOR (default 1.55)")
    m.add_argument("--build", type=integer, default=None,
                   help="firmware build id (default 21)")
    m.add_argument("--c-bit", type=_c_bit_arg, default=None,
                   help="encryption bit set in the harness's boot page tables of a long-mode "
                        "guest (CPUID 0x8000001F EBX[5:0] of the host; default 51)")
    m.add_argument("--nonce", metavar="HEX", help="the firmware's MNONCE (16 bytes)")
    m.add_argument("--tik", metavar="HEX", help="the owner's TIK (16 bytes)")
    m.add_argument("--mode", choices=("sev", "sev-es", "sev-snp"), default=None,
                   help="default as for run: the guest's first SEV mode in its manifest "
                        "(sev for --image); sev-snp: the SNP launch digest and its log")
    m.add_argument("--vcpus", type=integer, default=1,
                   help="sev-snp: vCPUs, each measured as a VMSA page (default 1)")
    m.add_argument("--vcpu-sig", type=integer, default=None,
                   help="sev-snp: the APs' CPUID 1 EAX in their reset VMSA (default "
                        "0x00A00F11, EPYC Milan)")
    m.add_argument("--vmsa", metavar="FILE", help="SEV-ES: the initial VMSA pages (4096 bytes "
                   "each, vCPU 0 first); default for a guest: built from its entry state")
    m.add_argument("--legacy-init", action="store_true",
                   help="SEV-ES: the VM was set up with legacy KVM_SEV_ES_INIT (no FPU state in "
                        "the VMSA) rather than KVM_SEV_INIT2")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_measure)
