"""``kvmharness lab SCENARIO --mode svm|sev|sev-es``: the hypervisor's-eye lab (see kvmharness.lab).

Exit codes as for ``run``: 0 the scenario ran (its report says what the hypervisor
learned), 1 the guest did not finish as expected, 3 the scenario cannot run in this
mode on this backend (the message says why), 4 the guest timed out.

``lab all`` and ``--mode all`` run every combination asked for, each exactly as it
would run alone, and print a summary of what ran where.  The exit status is that of
the worst combination, each judged as if run alone: a failure (5 internal error, then
1 guest failed, then 4 timed out, then 2 refused) outranks "unavailable here" (3),
which outranks "ran" (0).  So on a host without SEV, ``lab all --mode all`` exits 3
like ``lab regleak --mode sev`` does, and 1 as soon as any combination failed.
"""

from __future__ import annotations

import json
import sys

from .. import errors as E

#: per exit status: the word the summary uses
STATES = {E.EXIT_OK: "ran", E.EXIT_GUEST_FAILED: "failed", E.EXIT_USAGE: "refused",
          E.EXIT_HOST: "unavailable", E.EXIT_TIMEOUT: "timed out", E.EXIT_INTERNAL: "internal error"}
#: worst first: the combined exit status is the first of these any combination had
SEVERITY = (E.EXIT_INTERNAL, E.EXIT_GUEST_FAILED, E.EXIT_TIMEOUT, E.EXIT_USAGE, E.EXIT_HOST, E.EXIT_OK)


def combined_status(statuses) -> int:
    """The exit status of several combinations: the worst by :data:`SEVERITY`."""
    seen = set(statuses)
    return next((s for s in SEVERITY if s in seen), E.EXIT_OK)


def run_combination(name: str, mode: str, system, out_dir) -> tuple[dict, object]:
    """One scenario in one mode on an open System: (a summary row with its exit status --
    as ``lab NAME --mode MODE`` alone would exit -- and why if not 0; the LabReport or None)."""
    from . import run_scenario

    row = {"scenario": name, "mode": mode, "backend": system.name}
    try:
        r = run_scenario(name, mode, system, out_dir=out_dir)
    except E.HarnessError as e:
        status, why, report = e.exit_code, str(e), None
    else:
        report = r
        status = E.EXIT_OK if r.outcome == "done" else E.EXIT_GUEST_FAILED
        why = None if status == E.EXIT_OK else f"the guest ended with {r.outcome}, expected done"
    row.update(status=STATES.get(status, str(status)), exit_status=status, why=why)
    return row, report


def summary_lines(rows, modes, backend: str, status: int) -> list[str]:
    """A grid scenario x mode of what happened, the counts and the exit status."""
    names = list(dict.fromkeys(r["scenario"] for r in rows))
    cell = {(r["scenario"], r["mode"]): r["status"] for r in rows}
    width = max(len(n) for n in names)
    counts: dict = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines = [f"summary on the {backend} backend: "
             + ", ".join(f"{n} {state}" for state, n in counts.items()) + f"; exit status {status}",
             f"  {'':<{width}}  " + "".join(f"{m:<13}" for m in modes)]
    for n in names:
        lines.append(f"  {n:<{width}}  " + "".join(f"{cell.get((n, m), '-'):<13}" for m in modes))
    return [line.rstrip() for line in lines]


def cmd_lab(args) -> int:
    from ..factory import open_backend
    from . import MODES, SCENARIOS, run_scenario

    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    modes = list(MODES) if args.mode == "all" else [args.mode]
    if len(names) * len(modes) == 1:  # one combination: its errors are the command's
        system = open_backend(args.backend)
        try:
            if args.backend == "auto" and not args.json:  # which backend auto picked, as run says
                print(f"# {system.chosen_because}", file=sys.stderr)
            r = run_scenario(names[0], modes[0], system, out_dir=args.out)
        finally:
            system.close()
        if args.json:
            json.dump(r.to_dict(), sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
        else:
            print(r.text() + "\n")
        return E.EXIT_OK if r.outcome == "done" else E.EXIT_GUEST_FAILED

    system = open_backend(args.backend)  # one backend for every combination
    try:
        if not args.json and system.chosen_because:
            print(f"# {system.chosen_because}", file=sys.stderr)
        rows, reports = [], []
        for name in names:
            for mode in modes:
                row, report = run_combination(name, mode, system, args.out)
                rows.append(row)
                if report is not None:
                    reports.append(report.to_dict())
                if args.json:
                    continue
                if report is not None:
                    print(report.text() + "\n", flush=True)
                else:
                    print(f"lab {name} --mode {mode}: {row['status']}: {row['why']}\n", flush=True)
    finally:
        system.close()
    status = combined_status(r["exit_status"] for r in rows)
    if args.json:
        out = {"backend": system.name, "exit_status": status, "summary": rows, "reports": reports}
        json.dump(out, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        print("\n".join(summary_lines(rows, modes, system.name, status)))
    return status


def register(subparsers) -> None:
    from . import MODES, SCENARIOS

    s = subparsers.add_parser(
        "lab", help="what a malicious hypervisor sees and can do under SVM, SEV and SEV-ES",
        description="Run a guest with a hypervisor-side script attached and report what the "
                    "hypervisor learned or changed.  Scenarios: "
                    + "; ".join(f"{n}: {d}" for n, (_g, d) in SCENARIOS.items())
                    + ".  'all' and '--mode all' run every combination and end with a summary; "
                      "the exit status is the worst combination's (failed 1 / timed out 4 over "
                      "unavailable 3 over ran 0).")
    s.add_argument("scenario", choices=(*SCENARIOS, "all"))
    s.add_argument("--mode", choices=(*MODES, "sev-snp", "all"), default="svm",
                   help="svm (default), sev, sev-es, sev-snp, or all")
    s.add_argument("--backend", choices=("auto", "kvm", "sim"), default="auto",
                   help="auto (default): kvm if /dev/kvm exists; every scenario runs on sim")
    s.add_argument("--out", default=None, help="directory for pictures (default: "
                                               "$TMPDIR/kvmharness-lab)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lab)
