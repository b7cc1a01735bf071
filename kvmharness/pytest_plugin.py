"""pytest plugin (entry point ``pytest11``): backends, machines, hardware markers.

- ``--backend kvm|sim|all|auto`` (or ``KVMHARNESS_BACKEND``) chooses the backends a
  test using the ``backend`` fixture runs on; ``all`` (default) means every
  backend usable here, so on a machine with /dev/kvm each such test runs twice.
- ``machine_factory(guest, backend=None, **kw)`` makes a Machine and closes it
  after the test; on failure the plugin adds its registers and exit trace to
  the report.
- markers ``requires_kvm``, ``requires_svm``, ``requires_sev``,
  ``requires_sev_es`` skip with a reason naming what is missing, taken from
  ``kvmharness.hostinfo`` (the same verdicts ``kvmharness info`` prints).
"""

from __future__ import annotations

import os

import pytest

MARKERS = {
    "requires_kvm": "needs a usable /dev/kvm",
    "requires_svm": "needs real AMD SVM (kvm_amd)",
    "requires_sev": "needs an SEV-capable host (kvm_amd sev=1, /dev/sev)",
    "requires_sev_es": "needs an SEV-ES-capable host (kvm_amd sev_es=1, /dev/sev)",
}
_MARKER_MODE = {"requires_svm": "svm", "requires_sev": "sev", "requires_sev_es": "sev-es"}


def pytest_addoption(parser):
    group = parser.getgroup("kvmharness")
    group.addoption("--backend", action="store", default=None, choices=("kvm", "sim", "all", "auto"),
                    help="backend(s) for tests using the 'backend' fixture (default: all usable here; "
                         "env KVMHARNESS_BACKEND)")


def _selected(config) -> str:
    return config.getoption("--backend") or os.environ.get("KVMHARNESS_BACKEND") or "all"


def _kvm_state() -> tuple[bool, str]:
    from .backend import kvm_usable

    return kvm_usable()


def backends_for(config) -> list[str]:
    sel = _selected(config)
    kvm_ok, _ = _kvm_state()
    if sel == "all":
        return (["kvm"] if kvm_ok else []) + ["sim"]
    if sel == "auto":
        return ["kvm" if kvm_ok else "sim"]
    return [sel]


_verdicts_cache: dict = {}


def host_verdicts() -> dict:
    """hostinfo verdicts, computed once per session (they open /dev/kvm)."""
    if not _verdicts_cache:
        from .hostinfo import host_report

        _verdicts_cache.update(host_report()["verdicts"])
    return _verdicts_cache


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    config.addinivalue_line("markers", "backend_only(name): run this test only on the named backend")


def pytest_report_header(config):
    kvm_ok, why = _kvm_state()
    lines = [f"kvmharness: backends {', '.join(backends_for(config))} (--backend {_selected(config)}); "
             f"/dev/kvm: {why}"]
    return lines


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends_for(metafunc.config), scope="function")


def pytest_runtest_setup(item):
    for name in MARKERS:
        if item.get_closest_marker(name) is None:
            continue
        if name == "requires_kvm":
            ok, why = _kvm_state()
            if not ok:
                pytest.skip(f"requires_kvm: {why}")
            continue
        verdict = host_verdicts()[_MARKER_MODE[name]]
        if not verdict["usable"]:
            pytest.skip(f"{name}: {verdict['why']}")
    only = item.get_closest_marker("backend_only")
    callspec = getattr(item, "callspec", None)
    if only and callspec and callspec.params.get("backend") not in only.args:
        pytest.skip(f"only meaningful on the {', '.join(only.args)} backend")
    if callspec and callspec.params.get("backend") == "kvm":
        ok, why = _kvm_state()
        if not ok:
            pytest.skip(f"kvm backend: {why}")


@pytest.fixture
def machine_factory(request):
    """Make Machines (``machine_factory("cpuid", backend="sim")``); all closed after the test."""
    from .machine import Machine

    made: list = []
    default = request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None

    def make(guest=None, backend=None, **kw):
        b = backend or default or backends_for(request.config)[0]
        m = Machine.for_guest(guest, b, **kw) if guest is not None else Machine(b, **kw)
        made.append(m)
        return m

    request.node._kvmharness_machines = made
    yield make
    for m in made:
        m.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for m in getattr(item, "_kvmharness_machines", ()):
        report.sections.append((f"kvmharness machine {m.name} ({m.backend})", _dump(m)))


def _dump(m) -> str:
    lines = []
    if m.vcpu is None:
        return "machine closed (timed out or torn down)"
    try:
        regs = m.vcpu.get_regs()
        lines.append("registers: " + " ".join(f"{k}={v:#x}" for k, v in regs.to_dict().items()))
        s = m.vcpu.get_sregs()
        lines.append(f"cr0={s.cr0:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x} cs={s.cs.selector:#x}")
    except Exception as e:  # noqa: BLE001 - a dump must not mask the failure
        lines.append(f"(registers unavailable: {e})")
    trace = getattr(m.vcpu, "hw_trace", None)
    if trace:
        lines.append("last hardware exits:")
        lines += [f"  {r}" for r in list(trace)[-20:]]
    lines.append(f"console: {m.console.text!r}")
    return "\n".join(lines)
