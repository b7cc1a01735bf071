"""The kvm side of a fuzz pair, run on a rig: ``python -m kvmharness.fuzz.remote BATCH OUT``.

BATCH (JSON, written by fuzz/rigpair.py): ``{"guests": [{"guest": Guest.to_dict(),
"image": hex}]}`` -- the images are assembled at home, so the rig needs no binutils.
OUT (JSON): the rig's KVM (module, kernel), its KVM_GET_SUPPORTED_CPUID table (the
simulator at home is given the same table), the CPUID registers its host is recorded as
not honouring, and one :class:`~kvmharness.fuzz.runner.Recording` per guest, in order.
A progress line per guest goes to stderr.  Exit 0, or 3 when /dev/kvm is not usable.
"""

from __future__ import annotations

import json
import platform
import sys
import time

from . import gen as G
from . import runner as R


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m kvmharness.fuzz.remote BATCH.json OUT.json", file=sys.stderr)
        return 2
    from ..backend import kvm_usable, open_backend
    from ..hostinfo import cpuid_deviations, kvm_device_info

    with open(argv[0], encoding="utf-8") as f:
        batch = json.load(f)
    ok, why = kvm_usable()
    if not ok:
        print(f"kvmharness fuzz (rig side): /dev/kvm is not usable: {why}", file=sys.stderr)
        return 3
    system = open_backend("kvm")
    target = R.Target("kvm", system, system.capabilities.supported_cpuid)
    info = kvm_device_info()
    out = {"host": {"module": info.get("module"), "kernel": platform.release(), "machine": platform.machine()},
           "supported_cpuid": [e.to_dict() for e in target.cpuid.entries],
           "deviations": sorted(list(d) for d in cpuid_deviations("kvm")), "records": []}
    t0 = time.perf_counter()
    guests = batch["guests"]
    try:
        for i, item in enumerate(guests):
            g = G.Guest.from_dict(item["guest"])
            try:
                rec = R.run(target, g, image=bytes.fromhex(item["image"]))
            except Exception as e:  # noqa: BLE001 - one guest's failure is its record
                rec = R.Recording("kvm", outcome="error", detail=f"{type(e).__name__}: {e}")
            out["records"].append(rec.to_dict())
            print(f"fuzz (rig side): {i + 1}/{len(guests)} guests, {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr, flush=True)
    finally:
        system.close()
    out["seconds"] = time.perf_counter() - t0
    with open(argv[1], "w", encoding="utf-8") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
