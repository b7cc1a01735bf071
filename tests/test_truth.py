"""Only true words (issue 11.1 and 11.6): what the harness says about a host is probed on
that host, and each message names only what happened.

- a guest's needs are probed on the backend when it runs (no host facts in the manifest):
  a host that offers SEV / SEV-ES (a fake capability object over this host's real
  /dev/kvm) goes on to the KVM calls, which fail here with the kernel's errno and the
  ioctl's name instead of being refused by text;
- `info` / `rig check` advise only kvm_amd parameters the kernel has;
- `lab lying-hv` reports only the CPUID values it actually changed;
- `measure` uses `run`'s default mode and policy, so --tik/--nonce predict a default run;
- `run --mode X` on a guest whose manifest does not declare X is refused before any VM;
- `info` honours KVMHARNESS_KVM_DEVICE as `run` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from kvmharness import backend as B
from kvmharness import hostinfo
from kvmharness.backend import Capabilities, kvm_usable
from kvmharness.cli import main
from kvmharness.errors import EXIT_HOST, EXIT_USAGE, FeatureUnavailable, HarnessError
from kvmharness.images import DEFAULT_SEV_POLICY, get_guest, load_manifest
from kvmharness.x86 import CpuidEntry, CpuidTable

KVM_OK, KVM_WHY = kvm_usable()
requires_kvm = pytest.mark.skipif(not KVM_OK, reason=f"no usable /dev/kvm: {KVM_WHY}")


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kvmharness", *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=120)


# -- 11.1 the needs probe ---------------------------------------------------------------------

@dataclasses.dataclass
class FakeSystem:
    """What need_status reads of a backend: its name and capabilities."""

    name: str
    capabilities: Capabilities


SVM_LEAF = CpuidEntry(0x80000001, 0, 0, 0, 0, 1 << 2, 0)


@pytest.mark.parametrize("caps, need, met, words", [
    (Capabilities("kvm", 12, {"KVM_CAP_X86_USER_SPACE_MSR": 1}), "user-msr-exits", True, "=1"),
    (Capabilities("kvm", 12, {}), "user-msr-exits", False, "KVM_CAP_X86_USER_SPACE_MSR is 0"),
    (Capabilities("kvm", 12, supported_cpuid=CpuidTable([SVM_LEAF])), "svm", True, "offered"),
    (Capabilities("kvm", 12), "nested", False, "SVM is not offered"),
    (Capabilities("kvm", 12, {"KVM_CAP_VM_TYPES": 0b1101}, vm_types=frozenset({0, 2, 3})), "sev-es", True,
     "SEV-ES VM type (3)"),
    (Capabilities("kvm", 12, {"KVM_CAP_VM_TYPES": 0b101}, vm_types=frozenset({0, 2})), "sev", True,
     "SEV VM type (2)"),
    (Capabilities("kvm", 12, {"KVM_CAP_VM_TYPES": 0b101}, vm_types=frozenset({0, 2})), "sev-es", False,
     "no SEV-ES VM type: the kvm backend offers VM types default, sev (KVM_CAP_VM_TYPES=0x5)"),
    (Capabilities("sim", 0, vm_types=frozenset({0})), "sev", False, "the sim backend offers VM types default"),
])
def test_need_status_is_read_from_the_backend(caps, need, met, words):
    ok, why = hostinfo.need_status(FakeSystem(caps.backend, caps), need)
    assert ok is met and words in why, why


def test_a_kernel_without_vm_types_is_asked_for_legacy_sev(monkeypatch):
    """Before KVM_CAP_VM_TYPES, SEV runs on a default VM (KVM_SEV_INIT): the probe asks the
    host (kvm_amd's parameter, the SEV device, KVM_MEMORY_ENCRYPT_OP) instead of refusing."""
    caps = Capabilities("kvm", 12, {})
    asked = []
    monkeypatch.setattr(hostinfo, "_legacy_sev", lambda s, need: asked.append(need) or (True, "legacy"))
    assert hostinfo.need_status(FakeSystem("kvm", caps), "sev-es") == (True, "legacy")
    assert asked == ["sev-es"]


def test_legacy_probe_on_a_host_without_kvm_amd_says_so(monkeypatch):
    monkeypatch.setattr(hostinfo, "kvm_device_info", lambda: {"module": "kvm_pvm", "path": "/dev/kvm"})
    ok, why = hostinfo._legacy_sev(FakeSystem("kvm", Capabilities("kvm", 12, {})), "sev")
    assert not ok and "no KVM_CAP_VM_TYPES" in why and "kvm_pvm" in why


def _fake_sev_host(monkeypatch, *, legacy: bool):
    """This host's real /dev/kvm, its capabilities edited to offer SEV and SEV-ES: VM types
    2 and 3, or (legacy) no KVM_CAP_VM_TYPES and a legacy probe that says yes."""
    from kvmharness.kvm.system import KvmSystem

    real = KvmSystem.capabilities

    def fake(self):
        caps = real.fget(self)
        if legacy:
            ext = {k: v for k, v in caps.extensions.items() if k != "KVM_CAP_VM_TYPES"}
            return dataclasses.replace(caps, extensions=ext, vm_types=frozenset({0}))
        return dataclasses.replace(caps, vm_types=caps.vm_types | {2, 3},
                                   extensions={**caps.extensions, "KVM_CAP_VM_TYPES": 0b1101})

    monkeypatch.setattr(KvmSystem, "capabilities", property(fake))
    if legacy:
        monkeypatch.setattr(hostinfo, "_legacy_sev", lambda system, need: (True, "legacy (fake)"))


def _host_offers(mode: str) -> bool:
    from kvmharness.hostinfo import need_status

    with B.open_backend("kvm") as system:
        return need_status(system, mode)[0]


@requires_kvm
@pytest.mark.parametrize("guest, mode, vm_type", [("es-io", "sev-es", 3), ("sev-hello", "sev", 2),
                                                  ("hello64", "sev", 2)])
def test_a_host_offering_sev_gets_the_kvm_calls_not_a_refusal(monkeypatch, capsys, guest, mode, vm_type):
    if _host_offers(mode):
        pytest.skip(f"this host really offers {mode}: the contract suite runs {guest} here")
    _fake_sev_host(monkeypatch, legacy=False)
    assert main(["run", guest, "--backend", "kvm", "--mode", mode]) == EXIT_HOST
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # the kernel refused the SEV VM type: KVM_CREATE_VM, EINVAL -- not a sentence from a manifest
    assert "KVM_CREATE_VM" in err and "EINVAL" in err and f"VM type {vm_type}" in err, err
    assert "needs SEV" not in err and "this host's KVM offers no" not in err


@requires_kvm
@pytest.mark.parametrize("guest, mode, command", [("es-io", "sev-es", "KVM_SEV_ES_INIT"),
                                                  ("sev-hello", "sev", "KVM_SEV_INIT")])
def test_a_legacy_sev_host_gets_the_sev_ioctls(monkeypatch, capsys, guest, mode, command):
    if _host_offers(mode):
        pytest.skip(f"this host really offers {mode}")
    _fake_sev_host(monkeypatch, legacy=True)
    assert main(["run", guest, "--backend", "kvm"]) == EXIT_HOST
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # a default VM was made; the first SEV command then failed with the kernel's errno
    assert f"{command} failed: errno ENOTTY (25)" in err, err


@requires_kvm
def test_machine_for_guest_goes_on_to_kvm_create_vm(monkeypatch):
    if _host_offers("sev-es"):
        pytest.skip("this host really offers SEV-ES")
    from kvmharness.machine import Machine

    _fake_sev_host(monkeypatch, legacy=False)
    with B.open_backend("kvm") as system:
        with pytest.raises(FeatureUnavailable, match=r"KVM_CREATE_VM refused VM type 3 .*EINVAL"):
            Machine.for_guest("es-cpuid-msr", system, sev="sev-es")


@requires_kvm
def test_without_sev_the_refusal_is_the_probed_reason():
    if _host_offers("sev-es"):
        pytest.skip("this host offers SEV-ES")
    r = cli("run", "es-io", "--backend", "kvm")
    assert r.returncode == EXIT_HOST
    assert "needs sev-es: no SEV-ES VM type" in r.stderr and "KVM_CAP_VM_TYPES" in r.stderr, r.stderr


def test_guests_shows_each_need_met_or_not_per_backend(capsys):
    assert main(["guests", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(load_manifest())
    es = rows["es-io"]
    assert es["needs"] == ["sev-es", "user-msr-exits"] and es["modes"] == ["sev-es"]
    for backend in ("kvm", "sim"):
        here = es["here"][backend]
        if "backend_unavailable" in here:
            assert not here["runnable"] and here["backend_unavailable"]
            continue
        with B.open_backend(backend) as system:
            for need in es["needs"]:  # the listing says what the probe says
                met, why = hostinfo.need_status(system, need)
                assert here["needs"][need] == {"met": met, "why": why}
        assert here["runnable"] == all(v["met"] for v in here["needs"].values())
    hello = rows["hello64"]["here"]["sim"]
    assert hello["runnable"] and hello["modes"]["svm"]["runnable"]
    main(["guests"])
    text = capsys.readouterr().out
    assert "needs: sev-es, user-msr-exits" in text and "sim: sev-es met, user-msr-exits met" in text


# -- 11.6 run --mode X is refused unless the manifest declares X ------------------------------

@pytest.mark.parametrize("guest, mode, declared", [
    ("sev-hello", "sev-es", "sev"),   # no #VC handler: it would die in an emulation failure
    ("sev-hello", "svm", "sev"),
    ("es-io", "svm", "sev-es"),
    ("es-io", "sev", "sev-es"),
    ("hello64", "sev-es", "svm, sev"),
    ("nested-cpuid", "sev", "svm"),
])
def test_run_mode_not_declared_is_refused_before_any_vm(monkeypatch, capsys, guest, mode, declared):
    def no_backend(*a, **k):
        raise AssertionError("a backend was opened")

    monkeypatch.setattr(B, "open_backend", no_backend)
    assert main(["run", guest, "--mode", mode, "--backend", "sim"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"guest {guest!r} does not run in {mode} mode" in err
    assert f"declares modes {declared}" in err and err.count("\n") == 1


def test_run_default_mode_is_the_first_declared():
    for g in load_manifest().values():
        assert g.default_mode == g.modes[0]
        g.check_mode(g.default_mode)


# -- 11.6 measure predicts a default run ------------------------------------------------------

@pytest.mark.parametrize("guest", ["sev-hello", "es-io", "hello64"])
def test_measure_with_tik_and_nonce_predicts_a_default_run(monkeypatch, capsys, guest):
    """`run GUEST --backend sim` (default mode and policy) launches with a guest owner;
    `measure GUEST --tik --nonce` with that owner's TIK and the firmware's MNONCE, and no
    other option, gives the same MEASURE."""
    from kvmharness.machine import Machine

    made = []
    real = Machine.for_guest.__func__

    def record(cls, *a, **k):
        m = real(cls, *a, **k)
        made.append((m.launch_result, k.get("owner")))
        return m

    monkeypatch.setattr(Machine, "for_guest", classmethod(record))
    argv = ["run", guest, "--backend", "sim"] + ([] if guest != "hello64" else ["--mode", "sev"])
    assert main(argv) == 0
    (launch, owner), = made
    assert launch.policy == launch.policy.parse(DEFAULT_SEV_POLICY[launch.mode])
    capsys.readouterr()
    m_argv = ["measure", guest, "--json", "--tik", owner.tik.hex(),
              "--nonce", launch.measurement.mnonce.hex()]
    assert main(m_argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == launch.mode
    assert out["measure"] == launch.measurement.measure.hex()


def test_measure_defaults_follow_the_guest():
    r = cli("measure", "es-io", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "sev-es" and out["policy_text"] == "nodbg,es" and out["vmsa_pages"] == 1
    r = cli("measure", "nested-cpuid")
    assert r.returncode == EXIT_USAGE and "runs only in svm mode" in r.stderr


# -- 11.6 kvm_amd parameters: only what this kernel has ---------------------------------------

KVM_AMD_HOST = {"path": "/dev/kvm", "present": True, "accessible": True, "why": "", "module": "kvm_amd"}


def test_no_sev_snp_advice_where_kvm_amd_has_no_such_parameter():
    params = {"sev": "Y", "sev_es": "Y", "nested": "1", "npt": "Y"}  # a 6.1 kernel's kvm_amd
    v = hostinfo.verdicts(KVM_AMD_HOST, {"vm_type_numbers": [0]}, {"svm_flag": True}, params, True,
                          kernel="6.1.0-18-amd64")
    snp = v["sev-snp"]
    assert not snp["usable"]
    assert "sev_snp=1" not in snp["why"] and "modprobe" not in snp["why"]
    assert "this kernel's kvm_amd (6.1.0-18-amd64) has no sev_snp parameter" in snp["why"]


def test_advice_for_a_parameter_the_kernel_has_is_a_reload():
    params = {"sev": "Y", "sev_es": "N", "sev_snp": "N"}
    v = hostinfo.verdicts(KVM_AMD_HOST, {"vm_type_numbers": [0]}, {"svm_flag": True}, params, True,
                          kernel="6.12")
    assert "modprobe -r kvm_amd && modprobe kvm_amd sev_es=1" in v["sev-es"]["why"]
    assert "sev_snp=N" in v["sev-snp"]["why"] and "modprobe kvm_amd sev_snp=1" in v["sev-snp"]["why"]


def test_unloaded_kvm_amd_is_asked_through_modinfo(monkeypatch):
    monkeypatch.setattr(hostinfo, "kvm_amd_param_names", lambda: (frozenset({"sev", "nested"}), "modinfo"))
    assert "has no sev_snp parameter" in hostinfo._param_advice("SEV-SNP", "sev_snp", None, "6.1")
    assert "modprobe kvm_amd sev=1" in hostinfo._param_advice("SEV", "sev", None, "6.1")


def test_param_names_probe_reads_this_host():
    names, source = hostinfo.kvm_amd_param_names()
    if hostinfo.KVM_AMD_PARAMS.is_dir():
        assert names == frozenset(p.name for p in hostinfo.KVM_AMD_PARAMS.iterdir())
    else:
        assert names is None or source == "modinfo kvm_amd"
        assert source  # says where it looked, or why it could not


def test_rig_check_repeats_the_probed_advice():
    from kvmharness.remote.rig import RigResult, format_matrix

    params = {"sev": "Y", "sev_es": "Y"}
    info = {"verdicts": hostinfo.verdicts(KVM_AMD_HOST, {}, {"svm_flag": True}, params, True,
                                          kernel="6.1.0"),
            "kvm": {"accessible": True}, "cpu": {}}
    text = format_matrix([RigResult("epyc", info=info)])
    assert "epyc: no sev-snp: this kernel's kvm_amd (6.1.0) has no sev_snp parameter" in text
    assert "sev_snp=1" not in text


# -- 11.6 lab lying-hv reports only what it changed -------------------------------------------

def test_planned_lies_name_what_the_table_lacks():
    from kvmharness.lab.scenarios import _lie_table, _planned_lies

    empty = CpuidTable([])
    assert _planned_lies(empty, _lie_table(empty, 47)) == ([], [
        "RDTSCP could not be hidden: the host's CPUID table has no 0x80000001 entry",
        "the C-bit could not be moved: the host's CPUID table has no 0x8000001F entry (it offers "
        "no SEV leaf)"])
    clear = CpuidTable([CpuidEntry(0x80000001, 0, 0, 0, 0, 0, 0x20100800)])
    planned, cannot = _planned_lies(clear, _lie_table(clear, 47))
    assert planned == [] and "already has it clear" in cannot[0]
    full = CpuidTable([CpuidEntry(0x80000001, 0, 0, 0, 0, 0, 1 << 27),
                       CpuidEntry(0x8000001F, 0, 0, 0x1B, 0x73, 509, 100)])
    assert _planned_lies(full, _lie_table(full, 47)) == (["rdtscp", "c-bit"], [])


def _table_without_lies():
    from kvmharness.sim.system import SimSystem

    with SimSystem() as s:
        entries = [e for e in s.capabilities.supported_cpuid if e.function != 0x8000001F]
    return CpuidTable([dataclasses.replace(e, edx=e.edx & ~(1 << 27)) if e.function == 0x80000001
                       else e for e in entries])


def test_lying_hv_on_a_host_table_without_those_entries_says_nothing_changed():
    from kvmharness.lab import run_scenario
    from kvmharness.sim.system import SimSystem

    with SimSystem(supported_cpuid=_table_without_lies()) as system:
        r = run_scenario("lying-hv", "svm", system)
    assert r.outcome == "done"
    assert r.findings["changed"] == [] and r.findings["fake_c_bit"] is None
    text = r.text()
    assert "lie 47" not in text and "RDTSCP hidden" not in text and "changed: nothing" in text
    assert "the hypervisor could tell no lie here" in r.verdict
    assert "no 0x8000001F entry" in text and "already has it clear" in text


@requires_kvm
def test_lying_hv_on_kvm_names_only_what_the_host_table_let_it_change():
    from kvmharness.lab import run_scenario

    with B.open_backend("kvm") as system:
        table = system.capabilities.supported_cpuid
        r = run_scenario("lying-hv", "svm", system)
    ext, sev = table.lookup(0x80000001), table.lookup(0x8000001F)
    rdtscp_hideable = bool(ext and ext.edx >> 27 & 1)
    assert ("rdtscp" in r.findings["changed"]) == rdtscp_hideable
    assert ("c-bit" in r.findings["changed"]) == (sev is not None)
    text = r.text()
    if not rdtscp_hideable:
        assert "RDTSCP hidden" not in text and "RDTSCP could not be hidden" in text
    if sev is None:
        assert "lie 47" not in text and "C-bit moved" not in text and "no 0x8000001F entry" in text


# -- 11.6 info honours KVMHARNESS_KVM_DEVICE --------------------------------------------------

def test_info_names_the_device_it_was_given(tmp_path):
    missing = tmp_path / "no-kvm"
    r = cli("info", "--json", env={"KVMHARNESS_KVM_DEVICE": str(missing)})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["kvm"]["path"] == str(missing) and out["kvm"]["present"] is False
    assert out["kvm"]["module"] is None  # no device there: no module serves it
    assert out["kvm_details"] == {}
    assert str(missing) in out["verdicts"]["svm"]["why"]
    r = cli("info", env={"KVMHARNESS_KVM_DEVICE": str(missing)})
    assert r.stdout.startswith(f"{missing}: absent") and "/dev/kvm" not in r.stdout


def test_info_does_not_attribute_another_device_to_kvm(tmp_path):
    other = tmp_path / "null"
    os.symlink("/dev/null", other)
    r = cli("info", "--json", env={"KVMHARNESS_KVM_DEVICE": str(other)})
    out = json.loads(r.stdout)
    assert out["kvm"]["path"] == str(other) and out["kvm"]["module"] is None
    assert "error" in out["kvm_details"]  # /dev/null does not speak the KVM API


@requires_kvm
def test_info_reads_kvm_through_the_given_path(tmp_path):
    link = tmp_path / "kvm-link"
    os.symlink("/dev/kvm", link)
    r = cli("info", "--json", env={"KVMHARNESS_KVM_DEVICE": str(link)})
    out = json.loads(r.stdout)
    assert out["kvm"]["path"] == str(link) and out["kvm"]["accessible"] is True
    assert out["kvm_details"]["api_version"] == 12
    assert out["kvm"]["module"] == hostinfo.kvm_device_info()["module"]  # the same device


def test_machine_refuses_an_sev_mode_the_guest_does_not_declare(monkeypatch):
    """The library refuses too: hello64 (no #VC handler) as an SEV-ES guest would fault at its
    first OUT; refused before a backend is even opened."""
    from kvmharness.errors import GuestImageError
    from kvmharness.machine import Machine

    monkeypatch.setattr("kvmharness.machine.open_backend",
                        lambda *a, **k: pytest.fail("a backend was opened"))
    with pytest.raises(GuestImageError, match="does not run in sev-es mode"):
        Machine.for_guest("hello64", "sim", sev="sev-es")
    with pytest.raises(GuestImageError, match="declares modes sev-es"):
        Machine.for_guest("es-io", "sim", sev="sev")


def test_no_reload_advice_when_the_cpu_lacks_the_feature():
    """A kvm_amd that has sev_es but a CPU that does not report it (e.g. the QEMU rig's
    EPYC model): reloading the module cannot help, so it is not advised."""
    params = {"sev": "N", "sev_es": "N"}
    cpu = {"svm_flag": True, "sev_flags": ["sme", "sev"]}
    v = hostinfo.verdicts(KVM_AMD_HOST, {}, cpu, params, True, kernel="6.1")
    assert "modprobe" in v["sev"]["why"]  # the CPU has SEV: turning the parameter on is the fix
    assert "modprobe" not in v["sev-es"]["why"]
    assert "the CPU reports no sev_es flag in /proc/cpuinfo" in v["sev-es"]["why"]
