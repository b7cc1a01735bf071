"""Shrink a mismatching guest to a minimal one, and write it out as a regression guest.

Delta debugging (Zeller's ddmin) over the guest's op list: every op is self-contained,
so any sub-list is a valid guest; a candidate is kept when the two backends still
disagree *in the same way* (the mismatch's signature: its kind and what differs).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import gen as G
from . import runner as R


def still_fails(targets, deviations, signature):
    def test(guest: G.Guest) -> bool:
        a, b = R.run(targets[0], guest), R.run(targets[1], guest)
        m = R.compare(guest, a, b, deviations)
        return m is not None and m.signature == signature
    return test


def ddmin(ops: list, test, budget: int = 200) -> list:
    """The smallest sub-list of ``ops`` (1-minimal, within ``budget`` tests) for which
    ``test(sub-list)`` holds; ``test(ops)`` must hold."""
    n = 2
    tries = 0
    while len(ops) >= 2 and tries < budget:
        chunk = max(1, len(ops) // n)
        subsets = [ops[i:i + chunk] for i in range(0, len(ops), chunk)]
        reduced = False
        for i in range(len(subsets)):
            complement = [o for j, s in enumerate(subsets) if j != i for o in s]
            tries += 1
            if complement and test(complement):
                ops, n, reduced = complement, max(n - 1, 2), True
                break
            if tries >= budget:
                break
        if not reduced:
            if n >= len(ops):
                break
            n = min(len(ops), 2 * n)
    if len(ops) == 1 or tries >= budget:
        return ops
    return ops


def shrink(targets, guest: G.Guest, mismatch: R.Mismatch, deviations, budget: int = 200) -> G.Guest:
    test = still_fails(targets, deviations, mismatch.signature)
    ops = ddmin(list(guest.ops), lambda ops: test(guest.with_ops(ops)), budget)
    return guest.with_ops(ops)


def write_regression(out_dir, guest: G.Guest, mismatch: R.Mismatch, pair) -> Path:
    """``fuzz-<seed>.S`` (the guest's assembly) and ``fuzz-<seed>.json`` (its manifest entry:
    the op list, the MSR exit reasons, the backends and the mismatch) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fuzz-{guest.seed}" + ("" if guest.mode == "long64" else f"-{guest.mode}")
    src = out / f"{stem}.S"
    src.write_text(guest.source())
    entry = {"name": stem, "mode": guest.mode, "source": src.name, "pair": list(pair),
             "mismatch": mismatch.to_dict(), "guest": guest.to_dict(),
             "devices": "kvmharness.fuzz.runner.Devices (seeded by guest.seed)"}
    (out / f"{stem}.json").write_text(json.dumps(entry, indent=1) + "\n")
    return src


def load_regression(path) -> G.Guest:
    d = json.loads(Path(path).read_text())
    return G.Guest.from_dict(d["guest"])
