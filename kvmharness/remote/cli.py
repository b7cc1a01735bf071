"""`kvmharness rig check` and `kvmharness rig run`.

:func:`register` adds the ``rig`` command to the main parser's subparsers;
each handler returns the exit status.  paramiko is imported only when a rig
command actually runs, so the rest of the CLI works without it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import EXIT_HOST, EXIT_OK, HarnessError, UsageError

RUN_EPILOG = """\
The command after -- runs on each rig in a fresh directory holding the
project's tests; `pytest ARGS` becomes the venv's `python -m pytest ARGS
--junitxml=...`.  Results land in RESULTS/<run-id>/<rig>/ (output.log,
junit.xml, traces/, result.json).  Exit status: the worst rig's (0 best, then
pytest's 5 "no tests", then larger codes; 3 = a rig was unusable, 4 = timeout,
130 = interrupted).
"""


def _seconds(text: str) -> float:
    """A time budget: finite, > 0 and at most a day (there is no "no timeout")."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (0 < v <= 86400):  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds > 0 and at most 86400")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inventory", metavar="FILE",
                   help="rig inventory TOML (default: $KVMHARNESS_RIGS)")
    p.add_argument("--rig", action="append", metavar="NAME|LABEL",
                   help="only these rigs (a name or a label; repeatable; default: all)")
    p.add_argument("--accept-new-host-keys", action="store_true",
                   help="trust and record host keys never seen before (a changed key is still refused)")
    p.add_argument("--wheel", type=Path, metavar="WHL",
                   help="ship this prebuilt kvmharness wheel instead of building one")


def register(subparsers) -> None:
    """Add `rig check` and `rig run` to the main parser's ``subparsers``."""
    rig = subparsers.add_parser("rig", help="check or run tests on remote AMD rigs over SSH")
    sub = rig.add_subparsers(dest="rig_command", metavar="{check,run}")
    sub.required = True

    c = sub.add_parser("check", help="what each rig can do (kvm, svm, npt, sev, sev-es, sev-snp)")
    _common(c)
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--ship", action="store_true",
                   help="always run the current project's kvmharness (shipped), not the rig's own")
    c.add_argument("--timeout", type=_seconds, default=300.0, metavar="S", help="per rig (default 300)")
    c.set_defaults(func=cmd_rig_check)

    r = sub.add_parser("run", help="run a command (e.g. pytest) on rigs and bring the results home",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(r)
    r.add_argument("--backend", choices=("auto", "kvm", "sim"), default="auto",
                   help="KVMHARNESS_BACKEND on the rig (default auto)")
    r.add_argument("--timeout", type=_seconds, default=1800.0, metavar="S",
                   help="per rig, setup included (default 1800)")
    r.add_argument("--results", type=Path, default=Path("results"), metavar="DIR",
                   help="local results folder (default ./results)")
    r.add_argument("--plain", action="store_true", help="plain lines even on a terminal")
    r.add_argument("--json", action="store_true",
                   help="print the run's summary (results/RUN_ID/summary.json: each rig's status, "
                        "reason, files, lock and hang) on stdout; progress goes to stderr")
    r.add_argument("--lock-timeout", type=_seconds, default=1800.0, metavar="S",
                   help="wait up to S s for a rig another run holds (flock on the rig; default 1800), "
                        "then fail naming the holder")
    r.add_argument("--hang-timeout", type=_seconds, default=60.0, metavar="S",
                   help="a rig that answers no SSH ping for S s is hung (default 60)")
    r.add_argument("--power-cycle-on-hang", action="store_true",
                   help="run a hung rig's power_cycle command (inventory), wait for it to answer "
                        "again, mark its result 'power-cycled after hang' and go on with the others")
    r.add_argument("--power-timeout", type=_seconds, default=600.0, metavar="S",
                   help="after a power cycle, wait up to S s for SSH (default 600)")
    lg = r.add_argument_group("rigs from a labgrid coordinator (the [labgrid] extra) instead of an inventory")
    lg.add_argument("--labgrid", metavar="HOST:PORT",
                    help="reserve places from this labgrid coordinator (waiting up to --lock-timeout), "
                         "acquire them for the run and release them at the end, whatever happens")
    lg.add_argument("--tag", action="append", metavar="KEY=VALUE",
                    help="only places with this tag (repeatable), e.g. --tag sev_es=1")
    lg.add_argument("--places", type=_positive_int, metavar="N",
                    help="how many places to reserve (default: every place with the tags)")
    lg.add_argument("--ssh-key", type=Path, metavar="FILE",
                    help="the key that logs in to the places' NetworkService (required)")
    lg.add_argument("--known-hosts", type=Path, metavar="FILE",
                    help="known_hosts for the places (default ~/.ssh/known_hosts)")
    lg.add_argument("--python", metavar="PATH", help="the places' python (default python3)")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS (e.g. -- pytest -m requires_svm)")
    r.set_defaults(func=cmd_rig_run)


def _require_ssh() -> None:
    """Import the SSH layer before any rig thread starts: a missing paramiko is then one
    ModuleNotFoundError that the CLI reports as "paramiko is not installed: pip install ..."
    (exit 3), not an internal error per rig."""
    from . import ssh  # noqa: F401  (imports paramiko)


def _rigs(args):
    from .inventory import inventory_path, load_inventory, select_rigs

    return select_rigs(load_inventory(inventory_path(args.inventory)), args.rig)


def cmd_rig_check(args) -> int:
    from .progress import Progress
    from .rig import check_rigs, format_matrix

    _require_ssh()
    rigs = _rigs(args)
    progress = Progress([r.name for r in rigs], live=False, stream=sys.stderr, echo_lines=False)
    results = check_rigs(rigs, accept_new_host_keys=args.accept_new_host_keys, timeout=args.timeout,
                         ship=args.ship, wheel=args.wheel, progress=progress)
    progress.close()
    if args.json:
        from .rig import capability_row, health

        by_name = {r.name: r for r in rigs}
        doc = {}
        for r in results:
            state, why = health(r, by_name.get(r.rig))
            doc[r.rig] = {"ok": r.info is not None, "state": state, "reason": why,
                          "error": r.reason or None, "lock": r.lock_status,
                          "capabilities": capability_row(r) if r.info else None, "info": r.info}
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        from .rig import health

        print(format_matrix(results))
        by_name = {r.name: r for r in rigs}
        for r in results:
            state, why = health(r, by_name.get(r.rig))
            why = str(why or "")  # the reason may already open with its state ("unreachable: ...")
            print(f"  {r.rig}: {why}" if why.startswith(f"{state}:") else f"  {r.rig}: {state}: {why}")
    return EXIT_OK if all(r.info is not None for r in results) else EXIT_HOST


def cmd_rig_run(args) -> int:
    _require_ssh()
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not args.labgrid:
        if args.tag or args.places or args.ssh_key or args.known_hosts or args.python:
            raise UsageError("--tag, --places, --ssh-key, --known-hosts and --python go with --labgrid")
        return _run(args, _rigs(args), command)
    if args.inventory or args.rig:
        raise UsageError("--labgrid takes its rigs from the coordinator: drop --inventory/--rig")
    if not args.ssh_key:
        raise UsageError("--labgrid needs --ssh-key FILE: the key that logs in to the places' NetworkService")
    if not command:
        raise UsageError("rig run needs a command after --, e.g. rig run -- pytest -m requires_svm")
    from .labgrid import LabgridOptions, labgrid_rigs, parse_tags

    lg = LabgridOptions(address=args.labgrid, tags=parse_tags(args.tag or []), key_file=args.ssh_key.expanduser(),
                        known_hosts=args.known_hosts.expanduser() if args.known_hosts else None,
                        python=args.python or "python3", places=args.places, wait=args.lock_timeout)

    out = sys.stderr if args.json else sys.stdout  # --json: stdout holds the summary alone

    def note(msg: str) -> None:
        print(msg, flush=True, file=out)

    with labgrid_rigs(lg, note) as rigs:
        status = _run(args, rigs, command)
    t = lg.timings
    print(f"labgrid: connect {t.get('connect', 0):.2f} s, reserve {t.get('reserve', 0):.2f} s, "
          f"acquire {t.get('acquire', 0):.2f} s, release {t.get('release', 0):.2f} s", flush=True, file=out)
    return status


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of places, 1 or more")
    return v


def _run(args, rigs, command: list[str]) -> int:
    from .progress import Progress
    from .rig import RunOptions, new_run_id, run_on_rigs

    out = sys.stderr if args.json else sys.stdout  # --json: stdout holds the summary alone
    progress = Progress([r.name for r in rigs], live=False if args.plain or args.json else None, stream=out)
    opts = RunOptions(command=command, backend=args.backend, timeout=args.timeout,
                      accept_new_host_keys=args.accept_new_host_keys, results_dir=args.results,
                      run_id=new_run_id(), lock_timeout=args.lock_timeout,
                      hang_timeout=args.hang_timeout, power_cycle_on_hang=args.power_cycle_on_hang,
                      power_timeout=args.power_timeout)
    try:
        status, results = run_on_rigs(rigs, opts, wheel=args.wheel, progress=progress)
    finally:
        progress.close()
    for r in results:
        word = "ok" if r.status == 0 else f"exit {r.status}"
        extra = f": {r.reason}" if r.reason else ""
        print(f"{r.rig}: {word} in {r.elapsed:.1f} s{extra}", file=out)
        log = args.results / opts.run_id / r.rig / "output.log"
        if progress.live and r.status not in (0, 5) and log.is_file():
            # The live lines showed only the latest output; show how it ended.
            for line in log.read_text(errors="replace").splitlines()[-15:]:
                print(f"  {r.rig}| {line}", file=out)
    if args.json:
        summary = json.loads((args.results / opts.run_id / "summary.json").read_text())
        summary["results"] = str(args.results / opts.run_id)
        print(json.dumps(summary, indent=2))
    return status



def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m kvmharness.remote.cli rig ...``), for tests and debugging."""
    p = argparse.ArgumentParser(prog="kvmharness")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    register(sub)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except HarnessError as e:
        print(f"kvmharness: {e}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:
        from ..cli import _missing_module_message

        print(f"kvmharness: error: {_missing_module_message(e)}", file=sys.stderr)
        return EXIT_HOST
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
