"""The ``kvmharness`` command.

Exit codes (also in the README):
  0  success (the guest ended as its manifest expects)
  1  the guest failed (reported failure, unexpected exception or exit)
  2  usage error (bad arguments, unknown guest, malformed manifest or image)
  3  the host cannot do it (no /dev/kvm, no permission, no SVM/SEV, an ioctl failed)
  4  the guest timed out (the VM was torn down)
  5  internal error in kvmharness (please report it)
130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from typing import Any

from . import errors as E

EPILOG = __doc__.split("\n", 2)[2]


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


# -- info ---------------------------------------------------------------------
def cmd_info(args) -> int:
    from .hostinfo import format_report, host_report

    report = host_report()
    report["exit_path"] = _exit_path()
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
        print(f"exit path: {report['exit_path']['description']}")
    return E.EXIT_OK


def _exit_path() -> dict:
    """Which exit path Machine runs on kvm use: the compiled loop (kvm/fastpath.c) or pure Python, and why."""
    try:
        from .kvm.fastpath import status
    except ImportError as e:  # cffi missing: the kvm backend is unavailable anyway
        return {"compiled": False, "description": f"pure Python ({e})"}
    compiled, why = status()
    return {"compiled": compiled, "description": why}


# -- guests -------------------------------------------------------------------
def cmd_guests(args) -> int:
    """The manifest's guests, what each needs and, probed on this host, whether each
    backend meets every need."""
    from .backend import BACKENDS
    from .factory import open_backend
    from .hostinfo import need_status
    from .images import load_manifest

    guests = load_manifest()
    # per backend: unavailable (why), or each need probed once
    probed: dict = {}
    for name in BACKENDS:
        try:
            system = open_backend(name)
        except E.HarnessError as e:
            probed[name] = {"available": False, "why": str(e)}
            continue
        try:
            wanted = sorted({n for g in guests.values() for n in (*g.needs, *g.modes) if n != "svm"}
                            | {n for g in guests.values() for n in g.needs})
            probed[name] = {"available": True, "needs": {n: need_status(system, n) for n in wanted}}
        finally:
            system.close()

    def on(g, backend) -> dict:
        """Each need of ``g`` and each of its run modes (sev and sev-es add themselves as a
        need), met or not on ``backend`` here."""
        p = probed[backend]
        if not p["available"]:
            return {"runnable": False, "backend_unavailable": p["why"], "needs": {}, "modes": {}}
        needs = {n: {"met": p["needs"][n][0], "why": p["needs"][n][1]} for n in g.needs}
        modes = {}
        for mode in g.modes:
            extra = [] if mode == "svm" or mode in g.needs else [mode]
            unmet = {n: p["needs"][n][1] for n in (*g.needs, *extra) if not p["needs"][n][0]}
            modes[mode] = {"runnable": not unmet, "unmet": unmet}
        return {"runnable": modes[g.default_mode]["runnable"], "needs": needs, "modes": modes}

    rows = []
    for g in guests.values():
        d = g.to_dict()
        d["here"] = {b: on(g, b) for b in BACKENDS}
        rows.append(d)
    if args.json:
        _print_json(rows)
        return E.EXIT_OK
    width = max(len(n) for n in guests)
    for d in rows:
        print(f"{d['name']:<{width}}  {d['mode']:<6}  {d['memory'] // 1024:>5} KiB  "
              f"expect {d['expect']:<8}  modes {','.join(d['modes']):<8}  {d['description']}")
        here = []
        for b, r in d["here"].items():
            if "backend_unavailable" in r:
                here.append(f"{b}: unavailable ({r['backend_unavailable']})")
                continue
            met = [f"{n} met" if v["met"] else f"{n} NOT met ({v['why']})" for n, v in r["needs"].items()]
            ok = [m for m, v in r["modes"].items() if v["runnable"]]
            text = f"{b}: " + (f"{', '.join(met)}; " if met else "") + f"runs it in: {', '.join(ok) or 'none'}"
            for m, v in r["modes"].items():
                extra = {n: why for n, why in v["unmet"].items() if n not in r["needs"]}
                if not v["runnable"] and extra:
                    text += f" (not {m}: " + "; ".join(f"needs {n}: {why}" for n, why in extra.items()) + ")"
            here.append(text)
        print(f"{'':<{width}}  needs: {', '.join(d['needs']) or 'nothing'}")
        for line in here:
            print(f"{'':<{width}}    {line}")
    # "svm" names the unencrypted run mode, not a claim that this host has SVM (info says that)
    print("mode svm: the guest unencrypted, on any KVM (with or without SVM: `kvmharness info` "
          "says whether this host has it); sev, sev-es, sev-snp: launched encrypted")
    return E.EXIT_OK


# -- run -------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .factory import open_backend
    from .images import get_guest
    from .machine import run_guest

    image = get_guest(args.guest)
    image.load()  # refuse a bad image before any VM exists
    if args.timeout is not None:  # refused (exit 2) before any VM exists
        from .watchdog import check_timeout

        args.timeout = check_timeout(args.timeout, "--timeout")
    if args.mode is None:  # the manifest's first mode (from what the guest needs)
        args.mode = image.default_mode
    image.check_mode(args.mode)  # a mode the guest does not declare: exit 2, before any VM
    if args.mode == "svm" and args.policy is not None:  # refused, not ignored
        raise E.UsageError(f"--policy is a guest policy for an encrypted launch (--mode sev, "
                           f"sev-es or sev-snp); {image.name} runs here in svm mode")
    if args.no_owner and args.mode not in ("sev", "sev-es"):
        raise E.UsageError(f"--no-owner drops the guest owner of an SEV/SEV-ES launch; "
                           f"{image.name} runs here in {args.mode} mode, which has none")
    owner = policy = None
    if args.mode == "sev-snp":  # an SNP guest policy (snp/policy.py), no owner session
        from .snp.policy import SnpPolicy

        policy = SnpPolicy.parse(args.policy).value if args.policy is not None else None
    elif args.mode != "svm":
        from .images import DEFAULT_SEV_POLICY
        from .sev.policy import GuestPolicy
        from .sev.session import GuestOwner

        policy = GuestPolicy.parse(args.policy or DEFAULT_SEV_POLICY[args.mode])
        policy.validate()
        if args.mode == "sev" and policy.es:  # refused before any VM, in the CLI's words
            raise E.UsageError(f"--policy {policy} sets the ES bit, which is SEV-ES: use --mode "
                               "sev-es (with a guest that declares it), or drop 'es'")
        owner = None if args.no_owner else GuestOwner(policy)
    system = open_backend(args.backend)
    if not args.json:
        print(f"# {system.chosen_because}", file=sys.stderr)
    launched: dict = {}

    def on_launch(machine) -> None:
        launched["result"] = machine.launch_result
        if args.json or args.mode == "svm":
            return
        launch = machine.launch_result
        if args.mode == "sev-snp":
            print(f"# sev-snp launch: policy {launch.policy:#x}, launch "
                  f"digest {launch.launch_digest.hex()}", file=sys.stderr)
            return
        print(f"# {args.mode} launch: {launch.init_command}, handle {launch.handle}, policy "
              f"{launch.policy}, measurement "
              f"{'verified with the owner TIK' if launch.verified else 'not verified (no owner)'}: "
              f"{launch.measurement.measure.hex()}", file=sys.stderr)
        chain = launch.chain
        if chain is not None and chain.unverified:  # the exported CEK is unsigned
            held = ", ".join(link.name for link in chain.links if link.ok)
            print(f"# platform certificates: {held} hold; CEK -> ASK -> ARK unverified "
                  "(PDH_CERT_EXPORT's CEK is unsigned, as AMD's firmware exports it; "
                  "see kvmharness sev verify)", file=sys.stderr)

    try:  # the library's path: machine.run_guest (an expected timeout is a result there)
        if args.vcpus != 1:  # every vCPU on its own thread (smp.py)
            from .smp import run_guest_vcpus

            result = run_guest_vcpus(image, system, vcpus=args.vcpus, timeout=args.timeout,
                                     sev=args.mode, policy=policy, owner=owner,
                                     on_launch=on_launch)
        else:
            result = run_guest(image, system, timeout=args.timeout, trace=args.trace,
                               sev=args.mode, policy=policy, owner=owner, on_launch=on_launch)
    except E.FeatureUnavailable as e:  # this host's KVM cannot: say what to do instead
        if system.name != "kvm" or "backend sim" in str(e):
            raise
        err = E.FeatureUnavailable(f"{e}; run it on the simulator with --backend sim")
        err.host_verdict = e.host_verdict
        raise err from e
    except E.GuestTimeout as e:  # --json: the same document as an expected timeout, ok false
        if args.json:
            _print_json({"guest": image.name, "backend": system.name, "outcome": "timeout",
                         "expected": image.expect, "ok": False, "message": str(e)})
        raise
    finally:
        system.close()
    if result.outcome == "timeout" and result.ok:  # the manifest expects this guest to time out
        if args.json:
            _print_json({"guest": image.name, "backend": system.name, "outcome": "timeout",
                         "expected": "timeout", "ok": True, "message": result.message})
        else:
            print(f"{image.name}: timed out as expected ({result.message})")
        return E.EXIT_OK
    if args.json:
        d = result.to_dict()
        if args.mode == "sev-snp":  # the firmware's launch digest (== measure --mode sev-snp)
            d["launch"] = launched["result"].to_dict()
        _print_json(d)
    else:
        _print_result(result, args.trace)
        for i, ap in enumerate(result.aps, 1):  # --vcpus N: each AP (the BSP's outcome decides)
            print(f"vcpu {i}: {ap.outcome}" + (f" ({ap.message})" if ap.message else ""))
            for k, v in ap.reports:
                print(f"  {k:#018x} = {v:#018x}")
    if not result.ok:
        print(f"kvmharness: guest {result.guest!r}: {result.describe()}", file=sys.stderr)
        return E.EXIT_GUEST_FAILED
    return E.EXIT_OK


def _print_result(result, trace: bool) -> None:
    if result.console:
        print("console:")
        for line in result.console.rstrip("\n").split("\n"):
            print(f"  {line}")
    if result.reports:
        print("reports:")
        for k, v in result.reports:
            print(f"  {k:#018x} = {v:#018x}")
    kinds: dict = {}
    for r in result.exits:
        kinds[type(r.exit).__name__] = kinds.get(type(r.exit).__name__, 0) + 1
    summary = ", ".join(f"{n} x{c}" for n, c in kinds.items())
    print(f"exits: {result.exit_count} ({summary})")
    if trace:
        for i, r in enumerate(result.exits):
            rip = f"rip={r.rip:#x} " if r.rip is not None else ""
            print(f"  {i:6d} {rip}{r.exit}")
        for rec in result.hw_trace:
            print(f"  hw: {rec}")
        if result.kernel_trace_error:
            print(f"kernel trace: {result.kernel_trace_error}")
        elif result.kernel_trace:
            print(f"kernel trace ({len(result.kernel_trace)} KVM tracepoint events):")
            for ev in result.kernel_trace:
                print(f"  {ev}")
    print(f"outcome: {result.outcome} (expected {result.expected}) on {result.backend} "
          f"in {result.elapsed * 1e3:.2f} ms")


# -- suite ---------------------------------------------------------------------
def _suite_probe(g, system) -> tuple[bool, str]:
    """Whether ``system`` can run guest ``g`` on this host now (its needs, probed)."""
    return g.runnable_on(system)


def cmd_suite(args) -> int:
    """Run every manifest guest; one line each saying which backend ran it and why.

    ``auto``: on kvm where this host's KVM can run the guest (its needs probed), else on
    the simulator; without /dev/kvm, all on the simulator.  ``kvm`` / ``sim``: only
    there, skipping (with the reason) what that backend cannot run.
    """
    import time

    from . import backend as B
    from .images import load_manifest
    from .machine import run_guest

    open_backend = B.open_backend
    guests = load_manifest()
    primary = open_backend(args.backend)  # auto: a present but unusable /dev/kvm is an error
    if args.backend != "auto":
        because = f"--backend {primary.name}"
    elif primary.name == "kvm":
        because = "this host's KVM can run it (probed)"
    else:
        because = f"no kvm here: {B.kvm_usable(B.KVM_DEVICE)[1]}"
    fallback: list = []  # auto on kvm: the simulator, opened when a guest first needs it

    def simulator():
        if not fallback:
            try:
                fallback.append(open_backend("sim"))
            except ModuleNotFoundError as e:  # e.g. a rig's venv without unicorn
                fallback.append(_missing_module_message(e))
        return fallback[0]

    def place(g):
        """(system or None, why) for one guest."""
        ok, why = _suite_probe(g, primary)
        if ok:
            return primary, because
        if args.backend != "auto" or primary.name != "kvm":
            return None, f"{primary.name}: {why}"
        sim = simulator()
        if isinstance(sim, str):
            return None, f"kvm: {why}; sim: {sim}"
        ok, sim_why = _suite_probe(g, sim)
        if ok:
            return sim, f"this host's KVM cannot run it: {why}"
        return None, f"kvm: {why}; sim: {sim_why}"

    rows, worst = [], E.EXIT_OK
    width = max([16, *(len(n) for n in guests)])  # the name column fits the longest name

    def progress(name: str, status: str, backend) -> None:  # --json: stdout is the document
        if args.json:
            print(f"... suite {len(rows)}/{len(guests)}: {name} {status}"
                  + (f" on {backend}" if backend else ""), file=sys.stderr, flush=True)

    try:
        if not args.json:
            print(f"# {primary.chosen_because}", file=sys.stderr)
        for g in guests.values():
            system, why = place(g)
            if system is None:
                rows.append({"guest": g.name, "backend": None, "status": "skipped", "why": why})
                progress(g.name, "skipped", None)
                if not args.json:
                    print(f"{g.name:<{width}} {'skipped':<8} {'-':<4} {why}", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                r = run_guest(g, system)
                status = "passed" if r.ok else "FAILED"
                detail = r.describe()
                exits = r.exit_count
            except E.HarnessError as e:
                status, detail, exits = "FAILED", str(e), None
            except ModuleNotFoundError as e:
                if system is primary:  # the backend asked for cannot work here: exit 3
                    raise
                # auto's fall-back simulator lacks a package (a rig's venv without unicorn):
                # this and every later guest that needs it are skipped, saying what to install
                system.close()
                fallback[0] = _missing_module_message(e)
                _, kvm_why = _suite_probe(g, primary)
                why = f"kvm: {kvm_why}; sim: {fallback[0]}"
                rows.append({"guest": g.name, "backend": None, "status": "skipped", "why": why})
                progress(g.name, "skipped", None)
                if not args.json:
                    print(f"{g.name:<{width}} {'skipped':<8} {'-':<4} {why}", flush=True)
                continue
            if status != "passed":
                worst = E.EXIT_GUEST_FAILED
            row = {"guest": g.name, "backend": system.name, "status": status, "why": why,
                   "detail": detail, "exits": exits, "seconds": round(time.perf_counter() - t0, 4)}
            rows.append(row)
            progress(g.name, status, system.name)
            if not args.json:
                counted = "" if exits is None else f"{exits} exits, "  # None: it never ran
                print(f"{g.name:<{width}} {status:<8} {system.name:<4} {detail} ({counted}"
                      f"{row['seconds'] * 1e3:.1f} ms)  [{system.name}: {why}]", flush=True)
    finally:
        for system in [primary] + [f for f in fallback if not isinstance(f, str)]:
            system.close()
    on = {b: sum(1 for r in rows if r["backend"] == b) for b in ("kvm", "sim")}
    if args.json:
        _print_json({"requested": args.backend, "ran_on": on, "guests": rows})
    else:
        counts = {k: sum(1 for r in rows if r["status"] == k) for k in ("passed", "FAILED", "skipped")}
        print(f"{counts['passed']} passed, {counts['FAILED']} failed, {counts['skipped']} skipped "
              f"(ran on kvm: {on['kvm']}, on sim: {on['sim']})")
    return worst


# -- bench ----------------------------------------------------------------------
def cmd_bench(args) -> int:
    # the two modes take different counts: one given to the other is refused, not ignored
    rounds, lifecycles = getattr(args, "rounds", None), getattr(args, "lifecycles", None)
    if args.soak:  # kvmharness bench --soak: leaks, not speed
        if rounds is not None or lifecycles is not None:
            raise E.UsageError("--rounds and --lifecycles are for the speed benchmark; "
                               "--soak takes --count N")
        from .soak import main as soak_main

        return soak_main(args)
    if args.count is not None:
        raise E.UsageError("--count goes with --soak (the speed benchmark takes --rounds and "
                           "--lifecycles)")
    from .bench import run_bench

    try:
        return run_bench(rounds=3 if rounds is None else rounds,
                         lifecycles=200 if lifecycles is None else lifecycles,
                         only=args.only, as_json=args.json)
    except (E.DeviceMissing, E.PermissionDenied) as e:  # no usable /dev/kvm: bench has no --backend
        why = str(e)
        if "--backend sim" in why:
            why = why.replace("use --backend sim", "run bench --only sim (the simulator alone)")
        else:
            why += "; bench --only sim measures the simulator alone"
        err = type(e)(why)
        err.host_verdict = e.host_verdict
        raise err from e


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvmharness", description="Drive AMD SVM/SEV/SEV-ES guests through KVM, or simulate them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="what this host can do (KVM, SVM, SEV, SEV-ES), and why not")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("guests", help="list the guest images in the manifest")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_guests)

    s = sub.add_parser("run", help="run a guest image and show its results and exits")
    s.add_argument("guest", help="guest name (see: kvmharness guests)")
    s.add_argument("--backend", choices=("auto", "kvm", "sim"), default="auto",
                   help="kvm: real /dev/kvm; sim: the simulator; auto: kvm if /dev/kvm exists (default)")
    s.add_argument("--timeout", type=float, default=None, help="seconds, finite, > 0 and at most 86400 (default: the manifest's)")
    s.add_argument("--trace", action="store_true", help="record and print every exit with its RIP")
    s.add_argument("--mode", choices=("svm", "sev", "sev-es", "sev-snp"), default=None,
                   help="svm: a plain guest; sev / sev-es: launch it encrypted first, verifying "
                        "the firmware's measurement with a guest owner's TIK; sev-snp: the SNP "
                        "launch (its digest is printed, in --json under 'launch') (default: what "
                        "the guest's manifest needs)")
    s.add_argument("--policy", default=None, help="SEV guest policy, e.g. 'nodbg' or 0x5 (default "
                                                  "nodbg, plus es for sev-es)")
    s.add_argument("--no-owner", action="store_true",
                   help="launch without a guest owner session (the measurement is not verified)")
    s.add_argument("--vcpus", type=int, default=1,
                   help="vCPUs (1-255, default 1): each runs on its own thread; an SEV-SNP "
                        "guest's APs wait for its AP creation request (--backend sim); the "
                        "BSP's outcome is the run's, each AP's is shown (in --json under 'aps')")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("suite", help="run every guest the backend can run (the main job)")
    s.add_argument("--backend", choices=("auto", "kvm", "sim"), default="auto",
                   help="auto (default): each guest on kvm where this host's KVM can run it, "
                        "else on the simulator; kvm / sim: only there, skipping (with the "
                        "reason) what that backend cannot run")
    s.add_argument("--json", action="store_true",
                   help="one JSON document on stdout (each guest's backend); progress on stderr")
    s.set_defaults(func=cmd_suite)

    s = sub.add_parser("fuzz", help="random guests on kvm and the simulator, compared exit by exit")
    from .fuzz.cli import add_arguments as _fuzz_arguments
    _fuzz_arguments(s)
    s.set_defaults(func=lambda args: importlib.import_module("kvmharness.fuzz.cli").run_fuzz(args))

    s = sub.add_parser("bench", help="exits/s and lifecycle cost: harness vs a C reference, and the simulator")
    s.add_argument("--rounds", type=_positive_int, default=None, help="interleaved rounds (default 3)")
    s.add_argument("--lifecycles", type=_positive_int, default=None,
                   help="VM lifecycles per round (default 200)")
    s.add_argument("--only", choices=("kvm", "sim", "all"), default="all",
                   help="which backends to measure (default all; without /dev/kvm use sim)")
    s.add_argument("--soak", action="store_true",
                   help="instead: run --count machines of each kind (plain, SEV, SEV-ES, triple fault, "
                        "timeout) on each backend that can, and print fds, threads and RSS before "
                        "and after (kvmharness/soak.py)")
    s.add_argument("--count", type=_positive_int, default=None,
                   help="machines of each kind per backend for --soak (default 1000)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench)

    for extra in ("kvmharness.remote.cli", "kvmharness.sev.cli", "kvmharness.lab.cli",
                  "kvmharness.snp.cli"):
        try:
            present = importlib.util.find_spec(extra) is not None
        except ModuleNotFoundError:
            present = False
        if present:  # an error inside a present module is a bug: let it show
            importlib.import_module(extra).register(sub)
    return p


# An optional dependency that is not installed: (distribution, what needs it, the extra
# that brings it).  The requirement is read from kvmharness's own metadata.
_OPTIONAL_MODULES = {
    "paramiko": ("paramiko", "the rig commands", "rig"),
    "unicorn": ("unicorn", "the simulator backend", None),
    "iced_x86": ("iced-x86", "the simulator backend", None),
    "cffi": ("cffi", "the kvm backend", None),
    "_cffi_backend": ("cffi", "the kvm backend", None),
    "psutil": ("psutil", "kvmharness info", None),
    "cryptography": ("cryptography", "the SEV code", None),
    "tomli": ("tomli", "the guest manifest reader on Python 3.10", None),
    "pyroute2": ("pyroute2", "the remote-rig tests", "test"),
    "hypothesis": ("hypothesis", "the property tests", "test"),
    "sev_snp_measure": ("sev-snp-measure", "the VMSA cross-check", "test"),
    "pytest": ("pytest", "the tests", "test"),
}


def _requirement(dist: str) -> str:
    """``dist``'s requirement as kvmharness's metadata states it (e.g. 'paramiko>=3.0')."""
    import re
    from importlib import metadata

    try:
        reqs = metadata.requires("kvmharness") or []
    except metadata.PackageNotFoundError:
        reqs = []
    norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()  # noqa: E731
    for req in reqs:
        spec = req.split(";", 1)[0].strip()
        m = re.match(r"[A-Za-z0-9._-]+", spec)
        if m and norm(m.group(0)) == norm(dist):
            return spec.replace(" ", "")
    return dist


def _missing_module_message(e: ModuleNotFoundError) -> str:
    """One line: which package is missing, what needs it, and how to install it."""
    top = (e.name or "").split(".")[0] or "a module"
    dist, who, extra = _OPTIONAL_MODULES.get(top, (top, "this command", None))
    how = f"{sys.executable} -m pip install '{_requirement(dist)}'"
    if extra:
        how += f" (or the [{extra}] extra: pip install -e '.[{extra}]' in a checkout)"
    return f"{dist} is not installed (needed by {who}): {how}"


def _host_reason(e: E.HarnessError) -> str:
    """The host's reason (``kvmharness info``'s verdict) for an error the bindings state as a
    bare fact (``host_verdict``), and what to do instead; '' for any other error."""
    if not e.host_verdict:
        return ""
    from .hostinfo import verdict_reason

    why = verdict_reason(e.host_verdict)
    hint = "" if "backend sim" in why or "backend sim" in str(e) else "; use --backend sim to simulate SEV"
    return (f" ({why})" if why else "") + hint


class _Watched:
    """stdout, noting whether the command wrote anything to it (see ``_fail``)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.written = stream, False

    def write(self, text: str) -> int:
        self.written = self.written or bool(text)
        return int(self.stream.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def _fail(args, message: str, code: int, kind: str, out: _Watched | None) -> int:
    """An error ends the command: one line on stderr, and with ``--json``, where the command
    had printed no document of its own, one JSON object on stdout (``{"error": {...}}``), so
    a machine reading stdout learns why it got no result."""
    print(f"kvmharness: {message}", file=sys.stderr)
    if out is not None and not out.written:
        print(json.dumps({"error": {"kind": kind, "message": message.removeprefix("error: "),
                                    "exit_code": code}}), file=out.stream)
    return code


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = _Watched(sys.stdout) if getattr(args, "json", False) else None
    if out is not None:
        sys.stdout = out  # type: ignore[assignment]
    try:
        return _main(args, out)
    finally:
        if out is not None and sys.stdout is out:
            sys.stdout = out.stream


def _main(args, out: _Watched | None) -> int:
    try:
        return args.func(args)
    except E.HarnessError as e:
        return _fail(args, f"error: {e}{_host_reason(e)}", e.exit_code, type(e).__name__, out)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "kvmharness":  # our own module: a broken install
            return _fail(args, f"internal error: {e} (reinstall kvmharness)", E.EXIT_INTERNAL,
                         "InternalError", out)
        return _fail(args, f"error: {_missing_module_message(e)}", E.EXIT_HOST, "MissingDependency", out)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130, "Interrupted", out)
    except BrokenPipeError:
        return E.EXIT_OK
    except OSError as e:  # a file the user named cannot be read or written
        where = f" {e.filename}" if e.filename else ""
        return _fail(args, f"error: cannot use{where}: {e.strerror or e}", E.EXIT_USAGE, "FileError", out)


if __name__ == "__main__":
    raise SystemExit(main())
