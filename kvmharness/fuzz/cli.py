"""``kvmharness fuzz``: random guests on two backends, compared exit by exit.

    kvmharness fuzz [--seeds N] [--seed S] [--mode long64,real] [--pair kvm,sim] [--profile P]
                    [--out DIR] [--json]

Runs seeds S..S+N-1 (``--seed S`` alone: just that one) in each entry mode (each seed
gives one long-mode and one real-mode guest by default), prints a progress line on
stderr and a summary; each mismatch is shrunk to a minimal guest and, with ``--out``,
written there as ``fuzz-<seed>.S`` + ``fuzz-<seed>.json``.  Exit status: 0 no mismatch,
1 mismatches found, 2 usage, 3 the host cannot run a backend of the pair.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter

from .. import errors as E
from . import gen as G
from . import runner as R
from .shrink import shrink, write_regression

PAIRS = ("kvm,sim", "sim,kvm")


def add_arguments(p) -> None:
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="how many guests (default 100; 1 with --seed)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="first seed (default 0)")
    p.add_argument("--mode", default="long64,real", metavar="M[,M]",
                   help="guest kinds, each seed in each: long64, real, nested (L1 on SVM: needs a "
                        "kvm_amd with nested=1, e.g. --pair rig,sim) (default long64,real)")
    p.add_argument("--pair", default="kvm,sim",
                   help="the two backends compared: kvm,sim (this host) or rig,sim (a rig's kvm_amd)")
    p.add_argument("--rig", default=None, metavar="NAME", help="with --pair rig,sim: the rig (default: the "
                   "inventory's only one)")
    p.add_argument("--rig-inventory", default=None, metavar="FILE",
                   help="the rig inventory (default $KVMHARNESS_RIGS)")
    p.add_argument("--rig-timeout", type=float, default=1800.0, metavar="S",
                   help="the rig's whole budget: install, run, fetch (default 1800)")
    p.add_argument("--profile", default=None, help="simulator profile (default: the kvm host's module)")
    p.add_argument("--out", default=None, metavar="DIR", help="write shrunk regression guests here")
    p.add_argument("--no-shrink", action="store_true", help="report mismatches without shrinking")
    p.add_argument("--json", action="store_true", help="the summary as JSON on stdout")


def run_fuzz(args) -> int:
    pair = tuple(x.strip() for x in args.pair.split(","))
    if len(pair) != 2 or set(pair) not in ({"kvm", "sim"}, {"rig", "sim"}):
        raise E.UsageError(f"--pair {args.pair!r}: choose kvm,sim (this host's /dev/kvm) or rig,sim "
                           f"(a rig's kvm_amd, with --rig/--rig-inventory)")
    if "rig" not in pair and (args.rig or args.rig_inventory):
        raise E.UsageError("--rig and --rig-inventory go with --pair rig,sim")
    n = args.seeds if args.seeds is not None else (1 if args.seed is not None else 100)
    if n < 1:
        raise E.UsageError("--seeds must be at least 1")
    if args.seed is None:
        args.seed = 0
    if args.seed < 0:  # random.seed(-s) is random.seed(s): a negative seed would repeat another
        raise E.UsageError(f"--seed must be 0 or more, not {args.seed}")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):  # not after the run
        raise E.UsageError(f"--out {args.out}: not a directory")
    from ..watchdog import check_timeout  # nan, inf, 0 and negatives: exit 2, as every timeout

    args.rig_timeout = check_timeout(args.rig_timeout, "--rig-timeout")
    modes = tuple(m.strip() for m in args.mode.split(",") if m.strip())
    bad = [m for m in modes if m not in G.MODES]
    if bad or not modes:
        raise E.UsageError(f"--mode {args.mode!r}: choose from {', '.join(G.MODES)}")
    jobs = [(seed, mode) for seed in range(args.seed, args.seed + n) for mode in modes]
    if "rig" in pair:
        return _run_rig_pair(args, jobs, modes)
    targets = R.open_targets(pair, profile=args.profile)
    notes = []
    if "nested" in modes and any(t.name == "kvm" and not t.system.capabilities.svm for t in targets):
        notes.append("this host's KVM offers guests no SVM (CPUID 0x80000001 ECX bit 2 clear): "
                     "nested guests stop at L1's SVM check on both sides, so no nested VMRUN is "
                     "compared here; --pair rig,sim compares them on a kvm_amd rig")
        print(f"fuzz: note: {notes[-1]}", file=sys.stderr, flush=True)
    deviations = R.cpuid_deviations(targets)
    seconds = Counter()
    classes: Counter = Counter()
    found = []
    exits = 0
    t0 = time.perf_counter()
    tty = sys.stderr.isatty()
    try:
        for i, (seed, mode) in enumerate(jobs):
            guest = G.generate(seed, mode=mode)
            a, b = R.run(targets[0], guest), R.run(targets[1], guest)
            seconds[targets[0].name] += a.seconds
            seconds[targets[1].name] += b.seconds
            exits += min(len(a.steps), len(b.steps))
            m = R.compare(guest, a, b, deviations)
            if m is not None:
                small = guest if args.no_shrink else shrink(targets, guest, m, deviations)
                sm = R.compare(small, R.run(targets[0], small), R.run(targets[1], small), deviations) or m
                classes[sm.signature] += 1
                rec = {"seed": seed, "mode": mode, "ops": len(guest.ops), "shrunk_ops": len(small.ops),
                       "mismatch": sm.to_dict(), "op_kinds": [o.kind for o in small.ops]}
                if args.out:
                    rec["written"] = str(write_regression(args.out, small, sm, [t.name for t in targets]))
                found.append(rec)
            line = (f"fuzz: {i + 1}/{len(jobs)} guests, {exits} exits compared, {len(found)} mismatches "
                    f"({time.perf_counter() - t0:.1f}s)")
            print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
        if tty:
            print(file=sys.stderr)
    finally:
        for t in targets:
            t.close()
    summary = {"pair": [t.name for t in targets], "guests": len(jobs), "modes": list(modes),
               "first_seed": args.seed,
               "exits_compared": exits, "mismatches": len(found), "classes": dict(classes),
               "guests_per_second": {k: round(len(jobs) / v, 1) if v else None for k, v in seconds.items()},
               "found": found, "notes": notes}
    _report(args, summary,
            f"{len(jobs)} guests (seeds {args.seed}..{args.seed + n - 1}, {'+'.join(modes)}), {exits} exits compared "
            f"between {summary['pair'][0]} and {summary['pair'][1]}: {len(found)} mismatches",
            [f"  note: {note}" for note in notes]
            + [f"  seed {f['seed']} ({f['mode']}): {f['mismatch']['kind']} at exit {f['mismatch']['step']} "
               f"({f['ops']} -> {f['shrunk_ops']} ops: {', '.join(f['op_kinds'])}): {f['mismatch']['detail'][:200]}"
               + (f" -> {f['written']}" if 'written' in f else "") for f in found])
    return E.EXIT_OK if not found else 1


def _report(args, summary: dict, head: str, lines: list) -> None:
    """``summary`` as JSON (--json), else as text: ``head``, each backend's guests/s, ``lines``."""
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    print(head)
    for k, v in summary["guests_per_second"].items():
        print(f"  {k}: {v} guests/s")
    for line in lines:
        print(line)


def _select_rig(args):
    import os

    from ..remote.inventory import ENV_VAR, inventory_path, load_inventory, select_rigs

    if not args.rig_inventory and not os.environ.get(ENV_VAR):
        raise E.UsageError(f"--pair rig,sim needs --rig-inventory FILE (or ${ENV_VAR}): e.g. the one "
                           f"ci/rig/boot-rig.sh prints for the SVM rig in a box")
    rigs = load_inventory(inventory_path(args.rig_inventory))
    chosen = select_rigs(rigs, [args.rig] if args.rig else None)
    if len(chosen) != 1:
        raise E.UsageError(f"--pair rig,sim runs on one rig: name it with --rig (the inventory has "
                           f"{', '.join(r.name for r in chosen)})")
    return chosen[0]


def _run_rig_pair(args, jobs, modes) -> int:
    """The rig pair: the whole batch on the rig in one trip, then each guest on the simulator
    here (kvm_amd profile, or kvm_amd@qemu-tcg for a TCG rig; the rig's CPUID table); mismatches
    reported, not shrunk."""
    from . import rigpair as RP

    rig = _select_rig(args)
    guests = [G.generate(seed, mode=mode) for seed, mode in jobs]
    profile = args.profile or RP.rig_profile(rig)
    print(f"fuzz: {len(guests)} guests to {rig.name} ({rig.address}) and the simulator ({profile})",
          file=sys.stderr, flush=True)
    batch = RP.run_on_rig(rig, guests, timeout=args.rig_timeout)  # a RigError: exit 3 (4: timed out)
    if batch.host.get("module") != "kvm_amd":
        print(f"fuzz: note: the rig's KVM is {batch.host.get('module')!r}, compared with the "
              f"{profile} profile", file=sys.stderr)
    t0 = time.perf_counter()
    results = RP.compare_batch(guests, batch, profile=profile)
    sim_seconds = time.perf_counter() - t0
    found, classes, exits = [], Counter(), 0
    for (seed, mode), (g, a, b, m) in zip(jobs, results, strict=True):
        exits += min(len(a.steps), len(b.steps))
        if m is None:
            continue
        classes[m.signature] += 1
        rec = {"seed": seed, "mode": mode, "ops": len(g.ops), "shrunk_ops": len(g.ops), "mismatch": m.to_dict(),
               "op_kinds": [o.kind for o in g.ops]}
        if args.out:
            rec["written"] = str(write_regression(args.out, g, m, [a.backend, b.backend]))
        found.append(rec)
    n = len(guests)
    names = [f"rig:{rig.name}", f"sim[{profile}]"]
    summary = {"pair": names, "guests": n, "modes": list(modes), "first_seed": args.seed,
               "exits_compared": exits, "mismatches": len(found), "classes": dict(classes),
               "rig": {"name": rig.name, **batch.host, "round_trip_seconds": round(batch.round_trip, 1)},
               "guests_per_second": {names[0]: round(n / batch.seconds, 2) if batch.seconds else None,
                                     names[1]: round(n / sim_seconds, 1) if sim_seconds else None},
               "found": found}
    _report(args, summary,
            f"{n} guests (seeds {args.seed}..{args.seed + len(jobs) // len(modes) - 1}, {'+'.join(modes)}), "
            f"{exits} exits compared between {names[0]} ({batch.host.get('module')}, "
            f"{batch.host.get('kernel')}) and {names[1]}: {len(found)} mismatches "
            f"(rig round trip {batch.round_trip:.0f}s)",
            [f"  seed {f['seed']} ({f['mode']}): {f['mismatch']['kind']} at exit {f['mismatch']['step']} "
             f"(op {f['mismatch']['op']}): {f['mismatch']['detail'][:200]}"
             + (f" -> {f['written']}" if "written" in f else "") for f in found])
    return E.EXIT_OK if not found else 1
