"""The rig pair: each guest on a rig's KVM (kvm_amd) over SSH, and on the simulator here
with the ``kvm_amd`` profile (``kvm_amd@qemu-tcg`` for a rig labelled "tcg": kvm_amd on QEMU
TCG's CPU, sim/profile.py), compared exit by exit.

The guests are generated and assembled here; one batch (JSON: each guest and its image)
goes to the rig with the project's wheel (installed in a fresh venv, as ``rig run``
does: remote/rig.py), ``python -m kvmharness.fuzz.remote`` runs them on the rig's
/dev/kvm and writes every recording; the file comes home and each recording is compared
with the simulator's run of the same guest, given the rig's own KVM_GET_SUPPORTED_CPUID
table.  The rig is held under its lock for the whole batch.  A mismatch is not shrunk
(each try would be a rig round trip): it is reported, and written whole with ``--out``.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import runner as R

RIG_PROFILE = "kvm_amd"
#: a rig labelled "tcg" runs kvm_amd on QEMU TCG's CPU (the SVM rig in a box): its profile
#: declares what that CPU shows L1 differently from AMD silicon (sim/profile.py)
TCG_RIG_PROFILE = "kvm_amd@qemu-tcg"


def rig_profile(rig) -> str:
    """The simulator profile a rig's kvm_amd is compared with: by the rig's CPU (its labels)."""
    return TCG_RIG_PROFILE if "tcg" in rig.labels else RIG_PROFILE


@dataclass
class RigBatch:
    """What came back from the rig."""
    rig: str
    host: dict
    cpuid: object              # x86.CpuidTable: the rig's KVM_GET_SUPPORTED_CPUID
    deviations: frozenset
    records: list              # runner.Recording per guest, in order
    seconds: float             # the rig's own time running the guests
    round_trip: float          # wheel, install, upload, run, fetch
    log: list = field(default_factory=list)


def batch_json(guests) -> str:
    return json.dumps({"guests": [{"guest": g.to_dict(), "image": R.assemble_guest(g)[0].hex()}
                                  for g in guests]})


def run_on_rig(rig, guests, *, timeout: float = 900.0, wheel: Path | None = None,
               progress=None) -> RigBatch:
    """Run ``guests`` on ``rig`` (remote.inventory.Rig); returns the recordings."""
    from ..remote import rig as RR
    from ..remote.errors import RigError
    from ..remote.lock import whoami
    from ..remote.progress import Progress
    from ..x86 import CpuidEntry, CpuidTable

    progress = progress or Progress([rig.name], live=False, stream=sys.stderr)
    run_id = RR.new_run_id()
    t0 = time.monotonic()
    log: list = []
    s = RR._RigSession(rig, run_id, progress, threading.Event(), False, time.monotonic() + timeout)
    with tempfile.TemporaryDirectory(prefix="kvmharness-fuzz-rig-") as tmp:
        tmpd = Path(tmp)
        batch = tmpd / "batch.json"
        batch.write_text(batch_json(guests))
        whl = wheel or RR.build_wheel(RR.project_root(), tmpd, progress.message)
        try:
            s.connect()
            s.take_lock({**whoami(), "run_id": run_id, "what": "kvmharness fuzz --pair rig,sim"},
                        timeout=min(timeout, 600.0))
            s.install(RR.Payload(whl, None))
            s.step("uploading guests")
            s.conn.put(batch, f"{s.dir}/batch.json")
            s.step("running guests")
            d = shlex.quote(s.dir)
            budget = s.remaining()
            cmd = (f"cd {d} && timeout -k 10 {int(budget)} venv/bin/python -m kvmharness.fuzz.remote "
                   f"batch.json out.json")
            status = s.conn.run(cmd, timeout=budget + 15, sink=lambda _s, line: log.append(line),
                                cancel=s.cancel)
            if status != 0:
                tail = " | ".join(log[-3:])
                raise RigError(rig.name, f"the rig-side fuzz runner exited {status}: {tail}")
            s.step("fetching")
            local = tmpd / "out.json"
            s.conn.sftp().get(f"{s.dir}/out.json", str(local))
            out = json.loads(local.read_text())
        finally:
            try:
                s.cleanup()
            finally:
                s.release_lock()
                s.conn.close()
    cpuid = CpuidTable(CpuidEntry(**e) for e in out["supported_cpuid"])
    return RigBatch(rig.name, out["host"], cpuid, frozenset(tuple(d) for d in out["deviations"]),
                    [R.Recording.from_dict(r, f"rig:{rig.name}") for r in out["records"]],
                    out.get("seconds", 0.0), time.monotonic() - t0, log)


def sim_target(cpuid, profile: str = RIG_PROFILE) -> R.Target:
    from ..sim.system import SimSystem

    system = SimSystem(supported_cpuid=cpuid, profile=profile)
    t = R.Target(f"sim[{system.profile}]", system, system.capabilities.supported_cpuid)
    t.profile = system.profile
    return t


def compare_batch(guests, batch: RigBatch, profile: str = RIG_PROFILE):
    """[(guest, rig recording, sim recording, Mismatch or None)], and the sim's seconds."""
    t = sim_target(batch.cpuid, profile)
    deviations = batch.deviations | t.profile.cpuid_unhonoured
    out = []
    try:
        for g, a in zip(guests, batch.records, strict=True):
            b = R.run(t, g)
            out.append((g, a, b, R.compare(g, a, b, deviations)))
    finally:
        t.close()
    return out
