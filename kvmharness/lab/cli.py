"""``kvmharness lab SCENARIO --mode svm|sev|sev-es``: the hypervisor's-eye lab (see kvmharness.lab).

Exit codes as for ``run``: 0 the scenario ran (its report says what the hypervisor
learned), 1 the guest did not finish as expected, 3 the scenario cannot run in this
mode on this backend (the message says why).
"""

from __future__ import annotations

import json
import sys


def cmd_lab(args) -> int:
    from .. import errors as E
    from . import MODES, SCENARIOS, run_scenario

    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    modes = list(MODES) if args.mode == "all" else [args.mode]
    reports, worst = [], E.EXIT_OK
    for name in names:
        for mode in modes:
            try:
                r = run_scenario(name, mode, args.backend, out_dir=args.out)
            except E.HarnessError as e:
                if len(names) * len(modes) == 1:
                    raise
                reports.append({"scenario": name, "mode": mode, "unavailable": str(e)})
                if not args.json:
                    print(f"lab {name} --mode {mode}: unavailable: {e}\n")
                continue
            reports.append(r.to_dict())
            if not args.json:
                print(r.text() + "\n")
            if r.outcome != "done":
                worst = E.EXIT_GUEST_FAILED
    if args.json:
        json.dump(reports[0] if len(reports) == 1 else reports, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    return worst


def register(subparsers) -> None:
    from . import MODES, SCENARIOS

    s = subparsers.add_parser(
        "lab", help="what a malicious hypervisor sees and can do under SVM, SEV and SEV-ES",
        description="Run a guest with a hypervisor-side script attached and report what the "
                    "hypervisor learned or changed.  Scenarios: "
                    + "; ".join(f"{n}: {d}" for n, (_g, d) in SCENARIOS.items()))
    s.add_argument("scenario", choices=(*SCENARIOS, "all"))
    s.add_argument("--mode", choices=(*MODES, "all"), default="svm",
                   help="svm (default), sev, sev-es, or all")
    s.add_argument("--backend", choices=("auto", "kvm", "sim"), default="auto")
    s.add_argument("--out", default=None, help="directory for pictures (default: "
                                               "$TMPDIR/kvmharness-lab)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lab)
