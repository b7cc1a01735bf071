"""The five lab scenarios: a guest, a hypervisor-side script, a report.

Each scenario function takes a launched :class:`~kvmharness.machine.Machine` (the
guest of the scenario, in the requested mode) and returns a :class:`LabReport`.
The hypervisor side uses only what a hypervisor has:

* ``Machine.on_exit(callback)`` -- every exit userspace sees (on both backends);
* ``Vcpu.add_vmexit_hook`` -- every #VMEXIT, including the ones KVM handles in the
  kernel (CPUID, VMGEXIT): what the kernel half of a malicious hypervisor sees;
  ``vcpu.vmcb`` and, for SEV-ES, ``vcpu.vmsa_ciphertext()`` (simulator only: on KVM
  these raise FeatureUnavailable, and the scenario says what it cannot see);
* guest memory as the host reads it (``Vm.read``/``Vm.write``: the memory slot);
* ``Vm.remap_page`` -- one nested page table entry changed (simulator only);
* the CPUID table it gives KVM (``Vcpu.set_cpuid``), and under SEV-ES the GHCB page,
  which is shared memory the host may rewrite before the guest reads KVM's answer.

Which secret the guest holds is known to the lab (it built the guest), so a report
can say *whether* the hypervisor got it; the hypervisor code itself only looks.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from .. import exits as X
from .. import protocol as P
from ..abi import SVM_EXIT_CPUID, SVM_EXIT_VMGEXIT
from ..errors import FeatureUnavailable, HarnessError
from ..x86 import CPUID_SEV, CpuidEntry
from . import pagemap


@dataclass
class LabReport:
    """What one scenario run showed: a verdict line, facts, text lines, files."""

    scenario: str
    mode: str
    backend: str
    outcome: str  # how the guest run ended (RunResult.outcome)
    verdict: str  # one line: what the hypervisor learned or changed
    findings: dict = field(default_factory=dict)
    lines: list = field(default_factory=list)
    artifacts: dict = field(default_factory=dict)  # name -> file path

    def to_dict(self) -> dict:
        return {"scenario": self.scenario, "mode": self.mode, "backend": self.backend,
                "outcome": self.outcome, "verdict": self.verdict, "findings": self.findings,
                "lines": list(self.lines), "artifacts": dict(self.artifacts)}

    def text(self) -> str:
        head = f"lab {self.scenario} --mode {self.mode} on {self.backend}: {self.verdict}"
        body = [f"  {line}" for line in self.lines]
        files = [f"  {name}: {path}" for name, path in self.artifacts.items()]
        return "\n".join([head, *body, *files, f"  guest outcome: {self.outcome}"])


class LabUnavailable(FeatureUnavailable):
    """The scenario cannot run in this mode on this backend (the message says why)."""


# -- small helpers ---------------------------------------------------------------------------

def _q(value: int) -> bytes:
    return struct.pack("<Q", value & (2**64 - 1))


def _is_report(e) -> bool:
    return type(e) is X.IoOut and e.port == P.UCALL_PORT and e.data[:1] == bytes([P.UCALL_REPORT])


def _hook_vmexits(machine, callback) -> bool:
    """Call ``callback(record)`` at every #VMEXIT if the backend lets the host see them
    (the simulator); False on real KVM, whose in-kernel exits are not ours."""
    try:
        machine.vcpu.add_vmexit_hook(callback)
    except FeatureUnavailable:
        return False
    return True


def _vmcb(machine):
    """The VMCB as the host can read it, or None (KVM keeps it in kernel memory)."""
    try:
        return machine.vcpu.vmcb
    except FeatureUnavailable:
        return None


def _safe_regs(machine):
    try:
        return machine.vcpu.get_regs(), None
    except HarnessError as e:  # SEV-ES with protected state on a newer KVM: EINVAL
        return None, str(e)


def _ghcb_page(machine) -> tuple[int | None, bytes | None]:
    """(GPA, host view) of the GHCB the vCPU registered in its GHCB MSR, if any."""
    vmcb = _vmcb(machine)
    gpa = vmcb.control.ghcb_gpa if vmcb is not None else 0
    if not gpa or gpa & 0xFFF:
        return None, None
    try:
        return gpa, machine.vm.read(gpa, 4096)
    except HarnessError:
        return gpa, None


def _vmsa(machine) -> bytes | None:
    try:
        return machine.vcpu.vmsa_ciphertext()
    except (FeatureUnavailable, LookupError, ValueError, AttributeError):  # none, or not yet launched
        return None


def _printable(data: bytes, n: int = 48) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "." for b in data[:n])


def _finish(machine, scenario, mode, result, verdict, findings, lines, artifacts=None):
    return LabReport(scenario=scenario, mode=mode, backend=machine.backend, outcome=result.outcome,
                     verdict=verdict, findings=findings, lines=lines, artifacts=artifacts or {})


# -- 1. register leak ------------------------------------------------------------------------

REGLEAK_SECRETS = {"r12": 0x5EC2E7C0FFEE1234, "r13": 0x70D0F00DCAFE5678, "r14": 0x1A55B00B5EEDBEEF}


def regleak(machine, mode: str) -> LabReport:
    """At the CPUID exit (and the REPORT exit after it) the hypervisor reads every register
    it can: KVM's register file (KVM_GET_REGS), the VMCB save area, the GHCB, the VMSA."""
    snapshots: list = []

    def look(where: str):
        regs, err = _safe_regs(machine)
        vmcb = _vmcb(machine)
        gpa, ghcb = _ghcb_page(machine) if mode in ("sev-es", "sev-snp") else (None, None)
        snap = {"where": where, "regs": regs.to_dict() if regs is not None else None,
                "regs_error": err,
                "vmcb_save": ({"rax": vmcb.save.rax, "rip": vmcb.save.rip, "rsp": vmcb.save.rsp}
                              if vmcb is not None else None),
                "ghcb_gpa": gpa}
        places = {"KVM_GET_REGS": b"".join(_q(v) for k, v in (snap["regs"] or {}).items()
                                           if isinstance(v, int)),
                  "VMCB page": bytes(vmcb.raw) if vmcb is not None else b"",
                  "GHCB page": ghcb or b"", "VMSA (host view)": _vmsa(machine) or b""}
        snap["found"] = {name: [where_ for where_, data in places.items() if _q(secret) in data]
                         for name, secret in REGLEAK_SECRETS.items()}
        if ghcb is not None:
            from ..sev.ghcb import Ghcb

            g = Ghcb(bytearray(ghcb))
            snap["ghcb_valid"] = list(g.valid_fields())
            snap["ghcb"] = {f: g.get(f) for f in ("rax", "rbx", "rcx", "rdx", "sw_exit_code")}
        snapshots.append(snap)

    def at_vmexit(rec):
        if rec.exit_code == SVM_EXIT_CPUID or (rec.exit_code == SVM_EXIT_VMGEXIT
                                                and rec.exit_info_2 == SVM_EXIT_CPUID):
            look(f"CPUID #VMEXIT ({rec.name}, in the kernel)")

    hooked = _hook_vmexits(machine, at_vmexit)

    def at_exit(m, e):
        if _is_report(e) and not any(s["where"].startswith("REPORT") for s in snapshots):
            look("REPORT exit (userspace, right after the CPUID)")

    machine.on_exit(at_exit)
    result = machine.run()
    if hooked:
        machine.vcpu.remove_vmexit_hook(at_vmexit)

    leaked = sorted({name for s in snapshots for name, places in s["found"].items() if places})
    lines = []
    for s in snapshots:
        lines.append(f"at the {s['where']}:")
        if s["regs"] is not None:
            r = s["regs"]
            lines.append("  KVM_GET_REGS: " + ", ".join(f"{k}={r[k]:#x}" for k in
                                                        ("rax", "rbx", "rcx", "rdx", "r12", "r13", "r14")))
        else:
            lines.append(f"  KVM_GET_REGS refused: {s['regs_error']}")
        if s["vmcb_save"] is not None:
            v = s["vmcb_save"]
            lines.append(f"  VMCB save area: rax={v['rax']:#x} rip={v['rip']:#x} rsp={v['rsp']:#x}")
        if s.get("ghcb") is not None:
            lines.append(f"  GHCB at {s['ghcb_gpa']:#x}: valid {', '.join(s['ghcb_valid']) or '-'}; "
                         + ", ".join(f"{k}={v:#x}" for k, v in s["ghcb"].items()))
        for name, places in s["found"].items():
            lines.append(f"  secret {name}: {'FOUND in ' + ', '.join(places) if places else 'not found'}")
    if not snapshots:
        lines.append("no exit seen")
    if leaked:
        verdict = f"the hypervisor read the secret registers {', '.join(leaked)}"
    else:
        verdict = ("no secret register reached the hypervisor: it saw only what the guest put in "
                   "the GHCB (the VMSA is encrypted)")
    findings = {"leaked": leaked, "snapshots": snapshots, "secrets": {k: hex(v) for k, v in
                                                                       REGLEAK_SECRETS.items()}}
    if mode == "sev-snp":  # what SNP adds: the VMSA page is the guest's in the RMP
        try:
            e = machine.launch_result.vmsa_rmp_entry(0)
        except FeatureUnavailable as why:
            lines.append(f"RMP not readable here: {why}")
        else:
            findings["vmsa_rmp"] = e
            lines.append(f"RMP of vCPU 0's VMSA page (host page {e['spa']:#x}): {e['owner']}, "
                         f"ASID {e['asid']}, VMSA bit {'set' if e['vmsa'] else 'clear'}"
                         + (", immutable" if e["immutable"] else ""))
            if e["owner"] == "guest" and e["vmsa"]:
                verdict += ("; under SNP the RMP makes the VMSA page the guest's: the hypervisor "
                            "cannot even write the ciphertext back (SEV-ES lets it)")
    return _finish(machine, "regleak", mode, result, verdict, findings, lines)


# -- 2. memory view --------------------------------------------------------------------------

SERVICE_REPLY_PAGE = 0x20000
SERVICE_SECRET_PAGE = 0x21000
SERVICE_SHARED_BUF = 0x40000
SERVICE_KEY_REPLY = 0x5E0
SECRET_TEXT = b"TOP-SECRET guest key"
REPLY_TEXT = b"GUEST SERVICE v1"


def _service_reply(m, e, replies: list) -> int | None:
    """At the service's reply REPORT: the reply in the shared buffer appended to ``replies``,
    its number returned; None at any other exit."""
    if not _is_report(e):
        return None
    rbx, n = m.ucall_args()  # SEV-ES/SNP: from the GHCB (the registers are protected)
    if rbx != SERVICE_KEY_REPLY:
        return None
    buf = m.vm.read(SERVICE_SHARED_BUF, 4096)
    replies.append({"request": n, "text": _printable(buf, 64),
                    "secret": SECRET_TEXT in buf, "public": REPLY_TEXT in buf})
    return n


def memview(machine, mode: str, out_dir: str) -> LabReport:
    """At the service's first reply the hypervisor reads all of guest RAM and maps it."""
    seen: dict = {}

    def at_exit(m, e):
        if _is_report(e) and not seen:
            if m.ucall_args()[0] != SERVICE_KEY_REPLY:
                return
            seen["memory"] = m.vm.read(0, m.memory)
            seen["ghcb_gpa"] = _ghcb_page(m)[0] if mode in ("sev-es", "sev-snp") else None

    machine.on_exit(at_exit)
    result = machine.run()
    if "memory" not in seen:
        raise LabUnavailable("the service guest never announced a reply")
    memory = seen["memory"]
    encrypted = mode != "svm"
    cats = pagemap.classify_memory(memory, encrypted)
    counts = {c: cats.count(c) for c in pagemap.CATEGORIES}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"memview-{mode}.png")
    with open(path, "wb") as f:
        f.write(pagemap.render(cats))

    def page(gpa):
        return memory[gpa:gpa + 4096]

    probes = {"secret page": SERVICE_SECRET_PAGE, "reply page": SERVICE_REPLY_PAGE,
              "shared buffer": SERVICE_SHARED_BUF}
    if seen.get("ghcb_gpa"):
        probes["GHCB"] = seen["ghcb_gpa"]
    lines = [f"guest RAM {len(memory) >> 10} KiB, {len(cats)} pages: "
             + ", ".join(f"{n} {c}" for c, n in counts.items())]
    pages = {}
    for name, gpa in probes.items():
        data = page(gpa)
        cat = cats[gpa // 4096]
        pages[name] = {"gpa": gpa, "category": cat, "entropy": round(pagemap.entropy(data), 2),
                       "head": data[:48].hex()}
        lines.append(f"{name} at {gpa:#x}: {cat} (entropy {pagemap.entropy(data):.2f}): "
                     f"'{_printable(data)}'")
    secret_readable = SECRET_TEXT in memory
    lines.append("the secret text is " + ("READABLE in host memory" if secret_readable else
                                          "nowhere in host memory (only ciphertext)"))
    verdict = ("the host reads guest memory in the clear" if not encrypted else
               "the host reads ciphertext, except the pages the guest shares")
    findings = {"counts": counts, "pages": pages, "secret_readable": secret_readable,
                "reply_readable_in_shared_buffer": REPLY_TEXT in page(SERVICE_SHARED_BUF),
                "categories": cats}
    if mode == "sev-snp":  # what SNP adds to the reading: the RMP says whose each page is
        rmp, why = {}, None
        for name, gpa in probes.items():
            try:
                rmp[name] = machine.launch_result.rmp_entry(gpa)
            except FeatureUnavailable as e:
                why = str(e)
                break
        findings["rmp"] = rmp
        for name, e in rmp.items():
            lines.append(f"RMP of {name} (host page {e['spa']:#x}): {e['owner']}"
                         + (f", ASID {e['asid']}, GPA {e['gpa']:#x}, "
                            f"{'validated' if e['validated'] else 'NOT validated'}"
                            if e["assigned"] else " (shared)"))
        if why:
            lines.append(f"RMP not readable here: {why}")
        private = [n for n, e in rmp.items() if e["owner"] == "guest"]
        verdict += ("; under SNP the RMP also records " + ", ".join(private)
                    + " as the guest's (validated at their GPA): reading them gives ciphertext, "
                    "writing or remapping them faults (lab remap)") if private else ""
    return _finish(machine, "memview", mode, result, verdict, findings, lines, {"pagemap": path})


# -- 3. lying hypervisor ----------------------------------------------------------------------

CPUID_FEATURES = 0x80000001
RDTSCP_BIT = 27  # CPUID 0x80000001 EDX


def _lie_table(table, fake_c_bit: int):
    """The CPUID table with RDTSCP hidden (0x80000001 EDX bit 27) and the C-bit moved."""
    ext = table.lookup(CPUID_FEATURES)
    sev = table.lookup(CPUID_SEV)
    if ext is not None:
        table = table.with_entry(CpuidEntry(ext.function, ext.index, ext.flags, ext.eax, ext.ebx,
                                            ext.ecx, ext.edx & ~(1 << RDTSCP_BIT)))
    if sev is not None:
        table = table.with_entry(CpuidEntry(sev.function, sev.index, sev.flags, sev.eax,
                                            (sev.ebx & ~0x3F) | fake_c_bit, sev.ecx, sev.edx))
    return table


def _planned_lies(table, lied) -> tuple[list, list]:
    """Which lies the edited table really tells (["rdtscp", "c-bit"]) and, for each it cannot
    tell, why: a lie about an entry the host's table lacks changes nothing."""
    planned, cannot = [], []
    ext, ext_lie = table.lookup(CPUID_FEATURES), lied.lookup(CPUID_FEATURES)
    if ext is None:
        cannot.append("RDTSCP could not be hidden: the host's CPUID table has no 0x80000001 entry")
    elif ext.edx == ext_lie.edx:
        cannot.append(f"RDTSCP could not be hidden: the host's CPUID table already has it clear "
                      f"(0x80000001 EDX={ext.edx:#x}): nothing to hide")
    else:
        planned.append("rdtscp")
    sev, sev_lie = table.lookup(CPUID_SEV), lied.lookup(CPUID_SEV)
    if sev is None:
        cannot.append("the C-bit could not be moved: the host's CPUID table has no 0x8000001F "
                      "entry (it offers no SEV leaf)")
    elif sev.ebx != sev_lie.ebx:
        planned.append("c-bit")
    return planned, cannot


def lying_hv(machine, mode: str) -> LabReport:
    """The hypervisor answers CPUID with values of its choosing: RDTSCP hidden, the C-bit
    moved.  Under SVM/SEV through the CPUID table KVM answers from; under SEV-ES by
    rewriting KVM's answer in the (shared) GHCB page before the guest reads it.  The
    report names only what was actually changed, and says what could not be.  Under
    SEV-SNP the lies go into the CPUID page instead (:func:`_lying_hv_snp`)."""
    if mode == "sev-snp":
        return _lying_hv_snp(machine)
    table = machine.cpuid
    real_sev = table.lookup(CPUID_SEV)
    real_c_bit = real_sev.ebx & 0x3F if real_sev is not None else 0
    fake_c_bit = real_c_bit - 4 if real_c_bit > 36 else 47
    lied = _lie_table(table, fake_c_bit)
    planned, cannot = _planned_lies(table, lied)
    tampered: list = []
    if mode == "sev-es":
        from ..sev.ghcb import Ghcb

        def at_vmexit(rec):
            if rec.exit_code != SVM_EXIT_VMGEXIT or rec.exit_info_2 != SVM_EXIT_CPUID:
                return
            gpa, raw = _ghcb_page(machine)
            if raw is None:
                return
            g = Ghcb(bytearray(raw))
            answer = (g.get("rax"), g.get("rbx"), g.get("rcx"), g.get("rdx"))
            # which leaf KVM answered: the honest entry its answer equals
            for f in (CPUID_FEATURES, CPUID_SEV):
                honest, entry = table.lookup(f), lied.lookup(f)
                if honest is None or answer != (honest.eax, honest.ebx, honest.ecx, honest.edx):
                    continue
                if (entry.eax, entry.ebx, entry.ecx, entry.edx) == answer:
                    break  # the lie equals the truth here: nothing to rewrite
                for reg, value in zip(("rax", "rbx", "rcx", "rdx"),
                                      (entry.eax, entry.ebx, entry.ecx, entry.edx)):
                    g.put(reg, value)
                machine.vm.write(gpa, bytes(g.buf))
                tampered.append({"function": hex(f), "honest": [hex(x) for x in answer],
                                 "sent": [hex(entry.eax), hex(entry.ebx), hex(entry.ecx),
                                          hex(entry.edx)]})
                break

        if not _hook_vmexits(machine, at_vmexit):
            raise LabUnavailable("rewriting the GHCB between KVM's answer and the guest's read needs "
                                 "a hook inside KVM's VMGEXIT handling: the simulator has one "
                                 "(Vcpu.add_vmexit_hook), real KVM does not")
        how = "KVM answered from the honest table; the host rewrote the answer in the GHCB page"
    elif planned:
        machine.vcpu.set_cpuid(lied)
        how = "KVM answered from a CPUID table the hypervisor edited (KVM_SET_CPUID2)"
    else:
        how = "KVM answered from the host's own CPUID table: there was nothing in it to edit"
    result = machine.run()
    if mode == "sev-es":
        machine.vcpu.remove_vmexit_hook(at_vmexit)
        rewritten = {t["function"] for t in tampered}
        changed = [lie for lie, f in (("rdtscp", CPUID_FEATURES), ("c-bit", CPUID_SEV))
                   if lie in planned and hex(f) in rewritten]
        cannot += [f"{'RDTSCP' if lie == 'rdtscp' else 'the C-bit'}: no GHCB answer to rewrite "
                   "(the guest never asked for that leaf)" for lie in planned if lie not in changed]
    else:
        changed = planned
    v = result.values
    seen_c_bit = v.get(2, 0) & 0x3F
    pt_c_bit = v.get(4, 0)
    verdict_bits = v.get(5, 0)
    rdtscp_path = v.get(7)
    seen_rdtscp = bool(v.get(3, 0) >> RDTSCP_BIT & 1)
    detected = []
    if verdict_bits & 1:
        detected.append(f"C-bit: CPUID says {seen_c_bit}, the measured boot page tables use {pt_c_bit}")
    if verdict_bits & 2:
        detected.append("SEV hidden in CPUID although the guest runs encrypted")
    if verdict_bits & 4:
        detected.append("C-bit: the GHCB SEV information response differs from the page tables")
    accepted, notes = [], list(cannot)
    honest_ext = table.lookup(CPUID_FEATURES)
    offered = bool(honest_ext and honest_ext.edx >> RDTSCP_BIT & 1)
    if "rdtscp" in changed:
        if not seen_rdtscp and rdtscp_path == 0:
            accepted.append("RDTSCP hidden: the guest took its fallback path (it cannot check)")
        elif seen_rdtscp:
            notes.append("RDTSCP: the lie did not reach the guest (the host's KVM forced the bit)")
    if "c-bit" in changed:
        if seen_c_bit != fake_c_bit:
            notes.append(f"the C-bit lie ({fake_c_bit}) did not reach the guest: it saw {seen_c_bit}")
        elif not verdict_bits & 1:
            accepted.append(f"C-bit {fake_c_bit}: accepted, nothing to compare with")
    told = []
    if "rdtscp" in changed:
        told.append("RDTSCP hidden (CPUID 0x80000001 EDX bit 27 cleared)")
    if "c-bit" in changed:
        told.append(f"C-bit moved from {real_c_bit} to {fake_c_bit} (CPUID 0x8000001F EBX[5:0])")
    lines = [how + ".",
             "changed: " + ("; ".join(told) if told else "nothing"),
             (f"the guest saw CPUID 0x8000001F EBX={v.get(2, 0):#x} (C-bit {seen_c_bit}), "
              f"CPUID 0x80000001 EDX={v.get(3, 0):#x} (RDTSCP bit {'set' if seen_rdtscp else 'clear'})"),
             f"the C-bit in the measured boot page tables: {pt_c_bit or 'none (not an SEV launch)'}"]
    if 6 in v:
        lines.append(f"the C-bit in the GHCB MSR protocol's SEV information: {v[6]}")
    lines += [f"accepted: {a}" for a in accepted] + [f"DETECTED: {d}" for d in detected] + notes
    lines.append("what a guest can check: a source the hypervisor cannot answer for -- the "
                 "measured boot page tables (above), SEV_STATUS (MSR 0xC0010131, read from the "
                 "CPU, not intercepted); under SEV-SNP the firmware-validated CPUID page")
    if changed:
        verdict = (f"the hypervisor told {len(changed)} lie(s); the guest accepted {len(accepted)} "
                   f"and detected {len(detected)}")
    else:
        verdict = "the hypervisor could tell no lie here: " + "; ".join(cannot)
    findings = {"changed": changed, "could_not": cannot, "accepted": accepted, "detected": detected,
                "verdict_bits": verdict_bits, "rdtscp_path": rdtscp_path, "rdtscp_offered": offered,
                "seen_rdtscp": seen_rdtscp, "seen_c_bit": seen_c_bit, "page_table_c_bit": pt_c_bit,
                "fake_c_bit": fake_c_bit if "c-bit" in changed else None, "real_c_bit": real_c_bit,
                "ghcb_rewrites": tampered}
    return _finish(machine, "lying-hv", mode, result, verdict, findings, lines)


AVX512F_BIT = 16  # CPUID 7 EBX


def snp_cpuid_lies() -> tuple[list, list, list]:
    """(the CPUID page a VMM offers an SNP guest, the same page with the hypervisor's lies,
    the lies) -- each lie (name, leaf, register, what it says): RDTSCP hidden (less than the
    part has), the C-bit moved, AVX512F claimed (more than the part has)."""
    import dataclasses

    from ..snp.firmware import MILAN_SIG
    from ..snp.launch import default_cpuid_entries

    honest = default_cpuid_entries(MILAN_SIG)  # the page guest_launch_plan offers by default
    by_leaf = {e.eax_in: e for e in honest}
    real_c_bit = by_leaf[CPUID_SEV].ebx & 0x3F
    fake_c_bit = real_c_bit - 4 if real_c_bit > 36 else 47
    changes = {CPUID_FEATURES: {"edx": by_leaf[CPUID_FEATURES].edx & ~(1 << RDTSCP_BIT)},
               CPUID_SEV: {"ebx": (by_leaf[CPUID_SEV].ebx & ~0x3F) | fake_c_bit},
               0x7: {"ebx": by_leaf[0x7].ebx | 1 << AVX512F_BIT}}
    lied = [dataclasses.replace(e, **changes.get(e.eax_in, {})) if e.ecx_in == 0 else e
            for e in honest]
    lies = [("rdtscp", CPUID_FEATURES, "edx", "RDTSCP hidden (0x80000001 EDX bit 27 cleared)"),
            ("c-bit", CPUID_SEV, "ebx",
             f"C-bit moved from {real_c_bit} to {fake_c_bit} (0x8000001F EBX[5:0])"),
            ("avx512f", 0x7, "ebx", "AVX512F claimed (7 EBX bit 16 set)")]
    return honest, lied, lies


def _lying_hv_snp(machine) -> LabReport:
    """lying-hv under SEV-SNP: the guest's CPUID values come from the CPUID page, which the
    VMM builds from its table and the firmware checks at SNP_LAUNCH_UPDATE (the model's
    policy: snp.firmware.FEATURE_MASKED -- the feature registers of leaves 1, 7, 0x80000001
    and 0x8000001F EAX may say less than the part has, never more; a refused page comes back
    corrected and the VMM offers it again).  The lab launched the guest with the lied page
    (run_scenario); this reads what became of each lie."""
    from ..snp.firmware import FEATURE_MASKED

    honest, lied, lies = snp_cpuid_lies()
    corrections = list(getattr(machine.launch_result, "cpuid_corrections", []))
    result = machine.run()
    v = result.values
    seen = {("rdtscp", CPUID_FEATURES, "edx"): v.get(3, 0),
            ("c-bit", CPUID_SEV, "ebx"): v.get(2, 0), ("avx512f", 0x7, "ebx"): v.get(8, 0)}
    by_leaf = {e.eax_in: e for e in lied}
    honest_by_leaf = {e.eax_in: e for e in honest}
    pt_c_bit, sev_info_c_bit, verdict_bits = v.get(4, 0), v.get(6, 0), v.get(5, 0)
    fate, caught, believed, detected = {}, [], [], []
    for name, leaf, reg, what in lies:
        told = getattr(by_leaf[leaf], reg)
        got = seen[(name, leaf, reg)]
        checked = (leaf, reg) in FEATURE_MASKED
        fixed = next((getattr(b, reg) for a, b in corrections if a.eax_in == leaf and a.ecx_in == 0
                      and getattr(a, reg) != getattr(b, reg)), None)
        if fixed is not None:
            status = "caught"
            caught.append(f"{what}: the firmware refused the page and wrote back "
                          f"{reg.upper()}={fixed:#x}; the guest saw {got:#x}")
        elif name == "c-bit" and verdict_bits & 1:
            status = "detected"
            detected.append(f"{what}: not checked by the model's firmware policy; the guest saw "
                            f"C-bit {got & 0x3F} in the CPUID page and {pt_c_bit} in the measured "
                            "boot page tables")
        else:
            status = "believed"
            believed.append(f"{what}: " + ("allowed by the firmware (less than the part has)"
                                           if checked else "not checked by the model's firmware "
                                           "policy") + f"; the guest saw {reg.upper()}={got:#x}")
        fate[name] = {"leaf": hex(leaf), "register": reg, "honest": hex(getattr(honest_by_leaf[leaf], reg)),
                      "told": hex(told), "seen": hex(got), "checked_by_firmware": checked,
                      "corrected_to": hex(fixed) if fixed is not None else None, "status": status}
    if verdict_bits & 4:
        detected.append(f"C-bit: the SEV information response says {sev_info_c_bit}, the page "
                        f"tables {pt_c_bit}")
    lines = ["the hypervisor put its lies into the CPUID page it offered at SNP_LAUNCH_UPDATE: "
             + "; ".join(what for _, _, _, what in lies),
             (f"the firmware refused the page and wrote back the corrected table "
              f"({len(corrections)} entries changed); the VMM offered it again (as KVM and QEMU do)"
              if corrections else "the firmware accepted the page as offered"),
             "the model's firmware policy (its subset of AMD's per-leaf CPUID policy): the feature "
             "registers " + ", ".join(f"{leaf:#x} {reg.upper()}" for leaf, reg in sorted(FEATURE_MASKED))
             + " may say less than the part has, never more (and at most 64 entries); other "
             "registers are not checked"]
    lines += [f"CAUGHT: {c}" for c in caught] + [f"DETECTED: {d}" for d in detected]
    lines += [f"believed: {b}" for b in believed]
    lines.append(f"the guest's checks: CPUID page C-bit {seen[('c-bit', CPUID_SEV, 'ebx')] & 0x3F}, "
                 f"boot page tables {pt_c_bit}, SEV information {sev_info_c_bit}; RDTSCP path "
                 f"{'taken' if v.get(7) else 'not taken'}, AVX512F path "
                 f"{'taken' if v.get(9) else 'not taken'}")
    verdict = (f"the hypervisor told {len(lies)} lies in the CPUID page; the firmware caught "
               f"{len(caught)}, the guest detected {len([f for f in fate.values() if f['status'] == 'detected'])}"
               f", {len(believed)} believed")
    findings = {"lies": fate, "caught": caught, "detected": detected, "believed": believed,
                "cpuid_corrections": [{"leaf": hex(a.eax_in), "offered": [hex(a.eax), hex(a.ebx),
                                                                         hex(a.ecx), hex(a.edx)],
                                       "corrected": [hex(b.eax), hex(b.ebx), hex(b.ecx), hex(b.edx)]}
                                      for a, b in corrections],
                "verdict_bits": verdict_bits, "page_table_c_bit": pt_c_bit,
                "sev_info_c_bit": sev_info_c_bit, "rdtscp_path": v.get(7), "avx512f_path": v.get(9),
                "firmware_policy": "model subset: " + ", ".join(f"{leaf:#x}.{reg}" for leaf, reg
                                                                in sorted(FEATURE_MASKED))}
    return _finish(machine, "lying-hv", "sev-snp", result, verdict, findings, lines)


# -- 4. page remapping (SEVered) -------------------------------------------------------------

def remap(machine, mode: str) -> LabReport:
    """After the service's first reply the hypervisor points the reply page's guest-physical
    address at the secret page's memory; the next reply carries the secret out."""
    if mode == "sev-snp":
        return _remap_snp(machine)
    vm = machine.vm
    try:  # the identity remap changes nothing; a backend without remapping refuses it here
        vm.remap_page(SERVICE_REPLY_PAGE, SERVICE_REPLY_PAGE)
    except FeatureUnavailable:
        raise LabUnavailable("changing one nested page table entry needs the simulator "
                             "(Vm.remap_page): KVM offers userspace no call for it") from None
    replies: list = []
    direct = {}

    def at_exit(m, e):
        n = _service_reply(m, e, replies)
        if n == 0:
            direct["secret_page"] = m.vm.read(SERVICE_SECRET_PAGE, 4096)
            m.vm.remap_page(SERVICE_REPLY_PAGE, SERVICE_SECRET_PAGE)
        elif n == 1:
            m.vm.remap_page(SERVICE_REPLY_PAGE, SERVICE_REPLY_PAGE)  # cover the tracks

    machine.on_exit(at_exit)
    result = machine.run()
    leaked = any(r["secret"] for r in replies)
    sp = direct.get("secret_page", b"")
    kind = "plaintext" if SECRET_TEXT in sp else "ciphertext"
    lines = [f"reading the secret page {SERVICE_SECRET_PAGE:#x} directly: '{_printable(sp)}' ({kind})",
             (f"after reply 0: NPT entry of {SERVICE_REPLY_PAGE:#x} -> the memory of "
              f"{SERVICE_SECRET_PAGE:#x}; after reply 1: restored")]
    for r in replies:
        lines.append(f"reply {r['request']} in the shared buffer: '{r['text'][:60]}'")
    lines.append("SEV-SNP would stop this: the RMP records, for every private page, the guest and "
                 "the GPA it was validated at; an NPT entry that maps GPA "
                 f"{SERVICE_REPLY_PAGE:#x} to the page validated at {SERVICE_SECRET_PAGE:#x} fails "
                 "the RMP check (#NPF), and a page swapped in behind the guest's back is not "
                 "validated (#VC on access)")
    verdict = ("the secret left through the service's own reply" if leaked
               else "the remapped reply did not carry the secret")
    findings = {"leaked": leaked, "replies": replies,
                "secret_page_readable_directly": SECRET_TEXT in sp}
    return _finish(machine, "remap", mode, result, verdict, findings, lines)


SNP_REMAP_FAULTS = 8  # RMP faults the hypervisor watches before it restores the NPT entry


def _remap_snp(machine) -> LabReport:
    """remap under SEV-SNP (sim/snp.py): the same rewiring after reply 0; every access the
    service then makes to the reply page fails the RMP's reverse-map check (#NPF with the
    RMP bit, KVM cannot fix it, the guest faults again).  After SNP_REMAP_FAULTS of them the
    hypervisor puts the entry back (else the guest would fault for ever: SNP stops the
    leak, not a denial of service) and the service goes on."""
    from ..snp.rmp import PFERR_RMP

    vcpu = machine.vcpu
    replies: list = []
    faults: list = []
    direct: dict = {}
    state = {"remapped": False}

    def at_exit(m, e):
        if _service_reply(m, e, replies) == 0:
            direct["secret_page"] = m.vm.read(SERVICE_SECRET_PAGE, 4096)
            m.vm.remap_page(SERVICE_REPLY_PAGE, SERVICE_SECRET_PAGE)
            state["remapped"] = True

    def at_fault(kind, code, gpa, rip, why):
        if not state["remapped"]:
            return
        # what the hypervisor sees of it: #VMEXIT(NPF), EXITINFO1/2, and the RMP (not the RIP:
        # the guest's state is protected)
        faults.append({"kind": kind, "error_code": code, "gpa": gpa, "why": why})
        if len(faults) >= SNP_REMAP_FAULTS:
            machine.vm.remap_page(SERVICE_REPLY_PAGE, SERVICE_REPLY_PAGE)
            state["remapped"] = False

    vcpu.add_rmp_fault_hook(at_fault)
    machine.on_exit(at_exit)
    result = machine.run()
    leaked = any(r["secret"] for r in replies)
    sp = direct.get("secret_page", b"")
    first = faults[0] if faults else None
    lines = [f"reading the secret page {SERVICE_SECRET_PAGE:#x} directly: '{_printable(sp)}' "
             f"({'plaintext' if SECRET_TEXT in sp else 'ciphertext'})",
             f"after reply 0: NPT entry of {SERVICE_REPLY_PAGE:#x} -> the memory of "
             f"{SERVICE_SECRET_PAGE:#x} (its guest_memfd page)"]
    if first is not None:
        lines.append(f"the service's next access to {first['gpa']:#x}: "
                     f"#NPF error code {first['error_code']:#x} "
                     f"({'RMP bit set' if first['error_code'] & PFERR_RMP else 'no RMP bit'}): "
                     f"{first['why']}; KVM cannot fix it, the guest faults again: "
                     f"{len(faults)} faults, then the hypervisor restored the entry")
    for r in replies:
        lines.append(f"reply {r['request']} in the shared buffer: '{r['text'][:60]}'")
    verdict = ("the secret left through the service's own reply" if leaked else
               "the RMP stopped the remap: the reply page faulted (#NPF, RMP) instead of "
               "reading the secret page")
    findings = {"leaked": leaked, "replies": replies, "rmp_faults": len(faults),
                "faulted": ({"gpa": first["gpa"], "error_code": first["error_code"],
                             "rmp_bit": bool(first["error_code"] & PFERR_RMP),
                             "why": first["why"]} if first else None),
                "secret_page_readable_directly": SECRET_TEXT in sp}
    return _finish(machine, "remap", "sev-snp", result, verdict, findings, lines)


# -- 5. ciphertext side channel --------------------------------------------------------------

COUNTER_KEY_TICK = 0x71C
VMSA_R12_BLOCK = 0x360  # R12 and R13 share this 16-byte block of the VMSA
COUNTER_SECRET = b"K3Y!s3v!"


def ciphertext(machine, mode: str) -> LabReport:
    """At every tick the hypervisor records the counter's value if it can read registers,
    else the ciphertext of the VMSA block holding it, and decodes phase 2 with phase 1."""
    observations: list = []
    vmsa_mode = mode in ("sev-es", "sev-snp")  # the registers are in the encrypted VMSA
    if vmsa_mode:
        try:  # the CPU's part: the guest state written into the encrypted VMSA at each #VMEXIT
            machine.vcpu.save_vmsa_at_exit()
        except FeatureUnavailable:
            raise LabUnavailable("the host cannot read an SEV-ES VMSA here: KVM keeps it in kernel "
                                 "memory (the simulator exposes it)") from None

    def at_exit(m, e):
        if not _is_report(e):
            return
        if m.ucall_args()[0] != COUNTER_KEY_TICK:  # SEV-ES: from the GHCB
            return
        if vmsa_mode:
            vmsa = _vmsa(m) or b""
            observations.append(vmsa[VMSA_R12_BLOCK:VMSA_R12_BLOCK + 16].hex())
        else:
            observations.append(m.vcpu.get_regs().r12)

    machine.on_exit(at_exit)
    result = machine.run()
    phase1, phase2 = observations[:16], observations[16:32]
    codebook = {}
    for i, obs in enumerate(phase1):  # the hypervisor knows phase 1 counts 0..15
        codebook.setdefault(obs, i)
    nibbles = [codebook.get(obs) for obs in phase2]
    decoded = None
    if len(nibbles) == 16 and None not in nibbles:
        decoded = bytes(nibbles[2 * i] | nibbles[2 * i + 1] << 4 for i in range(8))
    distinct = len(set(observations))
    how = ("the VMSA ciphertext of the 16-byte block holding R12 (offset 0x360)" if vmsa_mode
           else "R12 itself (KVM_GET_REGS)")
    lines = [f"observed at each of {len(observations)} ticks: {how}",
             f"{distinct} distinct observations; phase 1 (counter 0..15) gives the codebook",
             "phase 2 decoded: " + (" ".join("?" if n is None else f"{n:x}" for n in nibbles)),
             f"-> the secret bytes: {decoded!r}" if decoded else "-> not decoded"]
    if mode == "sev-es":
        lines.append("equal plaintext at the same address gives equal ciphertext (XEX/XTS tweaked by "
                     "address only): repeats are visible without the key.  The mitigations shipped "
                     "after CipherLeaks (SEV-SNP-era firmware; ciphertext hiding on newer parts) "
                     "take this view away from the hypervisor; SEV-ES as modelled here has none")
    snp = None
    if mode == "sev-snp":  # what SNP changes: the RMP stops host writes, not host reads
        snp = _ciphertext_snp(machine)
        lines += snp.pop("lines")
    verdict = (f"the hypervisor recovered the secret the loop walked: {decoded!r}" if decoded
               else "the hypervisor could not decode the loop")
    findings = {"decoded": decoded.decode("latin-1") if decoded else None, "ticks": len(observations),
                "distinct": distinct, "nibbles": nibbles,
                "vmsa_writeback_model": vmsa_mode}  # the VMSA written at each #VMEXIT
    if snp is not None:
        findings["snp"] = snp
    return _finish(machine, "ciphertext", mode, result, verdict, findings, lines)


def _ciphertext_snp(machine) -> dict:
    """What SEV-SNP changes for CipherLeaks, as the host finds it after the run: the VMSA is a
    guest-owned VMSA page in the RMP, so a host write faults, but a host read is not an RMP
    check (APM vol. 2, "RMP checks": only writes by the hypervisor to guest-owned pages
    fault) and returns the ciphertext.  What takes the read away is ciphertext hiding
    (SNP_INIT_EX's CIPHERTEXT_HIDING_EN on parts that have it; an SNP guest can require it
    with policy bit 24): the model's platform does not have it."""
    from ..snp.policy import SnpPolicyBit
    from ..snp.rmp import HostRmpFault

    model = machine.vm._sev_model
    fw = model.firmware
    spa = model.vmsa_pages[0][0]
    entry = fw.rmp.effective(spa >> 12)[0]
    vmsa_page = bool(entry.assigned and entry.vmsa)

    def host(write: bool) -> str:  # a host access to the VMSA page, as the RMP checks it
        try:
            fw.rmp.check_host_access(spa, write)
        except HostRmpFault as e:
            return f"refused ({e})"
        return "allowed"

    write, read = host(True), host(False)
    hiding = bool(fw.platform.ciphertext_hiding)
    lines = [f"SEV-SNP: the VMSA (SPA {spa:#x}) is "
             f"{'a ' + entry.owner + '-owned VMSA page' if vmsa_page else 'not a VMSA page'} in the "
             f"RMP; a host write to it: {write}; a host read: {read} (the RMP checks host writes, "
             "not reads) and returns the ciphertext, so the repeats above were read under SNP "
             "as under SEV-ES",
             "ciphertext hiding (SNP_INIT_EX CIPHERTEXT_HIDING_EN; guest policy bit 24 "
             f"requires it) would take the read away: the model's platform "
             f"{'has' if hiding else 'does not have'} it"
             + ("" if hiding else " (a policy with bit 24 is refused at SNP_LAUNCH_START)")]
    return {"vmsa_rmp_vmsa_page": vmsa_page, "vmsa_owner": entry.owner, "host_write": write,
            "host_read": read,
            "ciphertext_hiding": hiding,
            "policy_requires_hiding": bool(machine.vm._sev_model._attestation[1]
                                           & SnpPolicyBit.CIPHERTEXT_HIDING),
            "lines": lines}
