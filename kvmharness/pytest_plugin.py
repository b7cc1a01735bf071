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
  They describe the *host*, so on a test parametrized over ``backend`` they
  apply per parameter: the ``[kvm]`` item skips where the host lacks the
  feature, the ``[sim]`` item runs (the simulator models it).  A test whose
  ``[sim]`` item needs the host too says ``requires_kvm(all_backends=True)``.
- marker ``requires_sim``: the test drives the simulator directly (not through
  the ``backend`` fixture); it skips where the sim backend is not selected
  (``--backend kvm``).
- the simulator is a required dependency: when the sim backend is selected and
  unicorn is missing or of an unsupported version, the session stops with that
  one-line error instead of turning a broken install into skips.  Under
  ``--backend kvm`` without unicorn (the SVM rig, which installs only Debian's
  packages), test modules that import the simulator at module level are not
  collected, and the header lists them.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

MARKERS = {
    "requires_kvm": "needs a usable /dev/kvm",
    "requires_svm": "needs real AMD SVM (kvm_amd)",
    "requires_sev": "needs an SEV-capable host (kvm_amd sev=1, /dev/sev)",
    "requires_sev_es": "needs an SEV-ES-capable host (kvm_amd sev_es=1, /dev/sev)",
}
_MARKER_MODE = {"requires_svm": "svm", "requires_sev": "sev", "requires_sev_es": "sev-es"}
REQUIRES_SIM = "requires_sim"


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


_sim_state_cache: list[tuple[bool, str]] = []


def sim_state() -> tuple[bool, str]:
    """(usable, why not): whether the simulator's CPU core loads here (unicorn, supported version)."""
    if not _sim_state_cache:
        try:
            from .sim import ucbinding  # noqa: F401 - imports unicorn and checks its version
        except ImportError as e:
            _sim_state_cache.append((False, f"the simulator's CPU core is missing ({e}): "
                                            "pip install -e . installs unicorn"))
        except Exception as e:  # noqa: BLE001 - SimulatorError: an unsupported unicorn
            _sim_state_cache.append((False, str(e)))
        else:
            _sim_state_cache.append((True, ""))
    return _sim_state_cache[0]


def _imports_the_simulator(path: Path) -> bool:
    """Whether a test module imports unicorn or kvmharness.sim at module level."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return False
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return any(n == "unicorn" or n.startswith(("unicorn.", "kvmharness.sim")) for n in names)


_not_collected: list[str] = []


def pytest_ignore_collect(collection_path, config):
    path = Path(str(collection_path))
    if path.suffix != ".py" or not path.name.startswith("test_"):
        return None
    if "sim" in backends_for(config) or sim_state()[0]:
        return None
    if _imports_the_simulator(path):
        _not_collected.append(path.name)
        return True
    return None


_verdicts_cache: dict = {}


def host_verdicts() -> dict:
    """hostinfo verdicts, computed once per session (they open /dev/kvm)."""
    if not _verdicts_cache:
        from .hostinfo import host_report

        _verdicts_cache.update(host_report()["verdicts"])
    return _verdicts_cache


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}(all_backends=False): {doc} (on the kvm backend's "
                                           "items only, unless all_backends=True)")
    config.addinivalue_line("markers", f"{REQUIRES_SIM}: drives the simulator directly; skips where "
                                       "the sim backend is not selected")
    config.addinivalue_line("markers", "backend_only(name): run this test only on the named backend")
    if "sim" in backends_for(config):
        ok, why = sim_state()
        if not ok:
            raise pytest.UsageError(f"kvmharness: the sim backend is selected (--backend {_selected(config)}) "
                                    f"but {why}; or run the kvm backend only: --backend kvm")


def pytest_report_header(config):
    kvm_ok, why = _kvm_state()
    lines = [f"kvmharness: backends {', '.join(backends_for(config))} (--backend {_selected(config)}); "
             f"/dev/kvm: {why}"]
    if "sim" not in backends_for(config) and not sim_state()[0]:
        lines.append(f"kvmharness: the simulator is not installed here ({sim_state()[1]}); "
                     f"modules that import it are not collected")
    return lines


def pytest_collection_finish(session):
    if _not_collected:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"kvmharness: not collected without the simulator: "
                                f"{', '.join(sorted(set(_not_collected)))}")


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames and "exit_path" in metafunc.fixturenames:
        # each kvm item twice, once per exit path (the simulator has one): kvm-compiled,
        # kvm-python, sim
        pairs = [(b, p) for b in backends_for(metafunc.config)
                 for p in (EXIT_PATHS if b == "kvm" else ("",))]
        metafunc.parametrize(("backend", "exit_path"), pairs, scope="function", indirect=["exit_path"],
                             ids=[f"{b}-{p}" if p else b for b, p in pairs])
    elif "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends_for(metafunc.config), scope="function")


#: The kvm backend's exit paths a test using the ``exit_path`` fixture runs on.
EXIT_PATHS = ("compiled", "python")


@pytest.fixture
def exit_path(request, monkeypatch):
    """The kvm exit path this item runs on: ``compiled`` (KVMHARNESS_FASTPATH=1; skips, naming
    why, where the library cannot be had), ``python`` (=0), or "" on the simulator.  A test
    (or an autouse fixture of its module) asking for it runs each kvm item on both paths,
    so one test run covers both (``KVMHARNESS_FASTPATH=0`` in the environment skips the
    compiled items)."""
    path = getattr(request, "param", "")
    if path:
        from .kvm import fastpath

        if path == "compiled" and os.environ.get(fastpath.ENV, "").strip().lower() in ("0", "off", "no", "false"):
            pytest.skip(f"compiled exit path: {fastpath.ENV}=0 in the environment")
        monkeypatch.setenv(fastpath.ENV, "0" if path == "python" else "1")
        if path == "compiled":
            active, why = fastpath.status()
            if not active:
                pytest.skip(f"compiled exit path: {why}")
    return path


def _item_backend(item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("backend") if callspec is not None else None


def pytest_runtest_setup(item):
    backend = _item_backend(item)
    for name in MARKERS:
        marker = item.get_closest_marker(name)
        if marker is None:
            continue
        if backend == "sim" and not marker.kwargs.get("all_backends", False):
            continue  # a host requirement: the simulator models the hardware itself
        if name == "requires_kvm":
            ok, why = _kvm_state()
            if not ok:
                pytest.skip(f"requires_kvm: {why}")
            continue
        verdict = host_verdicts()[_MARKER_MODE[name]]
        if not verdict["usable"]:
            pytest.skip(f"{name}: {verdict['why']}")
    if item.get_closest_marker(REQUIRES_SIM) is not None and "sim" not in backends_for(item.config):
        pytest.skip(f"{REQUIRES_SIM}: the sim backend is not selected here (--backend {_selected(item.config)})")
    only = item.get_closest_marker("backend_only")
    if only and backend is not None and backend not in only.args:
        pytest.skip(f"only meaningful on the {', '.join(only.args)} backend")
    if backend == "kvm":
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
    from .errors import FeatureUnavailable

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
    try:
        trace = m.vcpu.hardware_trace()
    except FeatureUnavailable:
        trace = []
    if trace:
        lines.append("last hardware exits:")
        lines += [f"  {r}" for r in list(trace)[-20:]]
    lines.append(f"console: {m.console.text!r}")
    return "\n".join(lines)
