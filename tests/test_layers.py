"""The package's layers, kept by a machine: the import graph of kvmharness/ has no cycles.

The rule (the one issue 14 counted 14 + 2 modules in cycles by): every ``import`` and
``from ... import`` statement in a module is an edge, wherever it stands -- at module
level, in a class, or deferred inside a function.  A deferred import hides a cycle from
the interpreter, not from a reader, so it counts.  Imports under ``if TYPE_CHECKING:``
do not: they never run, and only name a type for an annotation (import-linter is told
the same, ``exclude_type_checking_imports``).  ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``; importing ``a.b.c`` does not count
as importing the package ``a.b``'s ``__init__``.  Only ``importlib.import_module`` calls
are not seen (``kvmharness.backend.open_backend``'s alias of the factory is the one).

* module-level imports: no cycle at all;
* all imports: no cycle once the imports in ``KNOWN_EDGES`` (each with the work that
  removes it) are taken out, apart from the cycles of work in flight (``IN_FLIGHT``).

Run ``python tests/test_layers.py`` to print the strongly connected components.
The same layers are declared for import-linter in pyproject.toml ([tool.importlinter]),
which :func:`test_import_linter_contracts` runs.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvmharness"

#: Imports that still close a cycle, each with the work that removes it.  The graph without
#: them must be acyclic (apart from IN_FLIGHT below); no edge is to be added here.  Empty
#: since the total backend contract (each backend makes its own SEV interface: Vm.sev_interface),
#: the bindings' bare errors (hostinfo's reason added by the CLI: HarnessError.host_verdict)
#: and SimVm choosing its vCPU class (sim/sev.py imports neither seves.py nor snp.py).
KNOWN_EDGES: dict[tuple[str, str], str] = {}

#: Cycles of work in flight this round, each the set of modules it may span.
IN_FLIGHT: dict[frozenset[str], str] = {}  # none left: every import is acyclic


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
             mods: dict[str, Path]) -> list[str]:
    wanted = []
    if isinstance(node, ast.Import):
        wanted = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module if is_package else module.rpartition(".")[0]
            parts = package.split(".")
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            wanted.append(sub if sub in mods else base)
    found = []
    for name in wanted:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name.startswith("kvmharness"):
            found.append(name)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph(*, module_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the kvmharness modules it imports (by the rule in the docstring)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()

        def visit(body: list[ast.stmt], name=name, path=path, edges=edges) -> None:
            for node in body:
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    edges.update(_targets(node, name, path.name == "__init__.py", mods))
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if not module_level_only:
                        visit(node.body)
                elif isinstance(node, ast.ClassDef):
                    visit(node.body)
                elif isinstance(node, ast.If) and _is_type_checking(node.test):
                    visit(node.orelse)
                else:
                    for field in ("body", "orelse", "finalbody"):
                        visit(getattr(node, field, None) or [])
                    for handler in getattr(node, "handlers", None) or []:
                        visit(handler.body)
                    for case in getattr(node, "cases", None) or []:
                        visit(case.body)

        visit(tree.body)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
    return found


def test_the_graph_sees_deferred_and_relative_imports():
    # the graph itself: kvm/system.py imports its VM module and the cffi layer relatively,
    # and the factory imports both backends inside functions
    graph = import_graph()
    assert {"kvmharness.kvm.vm", "kvmharness.kvm._ffi", "kvmharness.backend"} <= graph["kvmharness.kvm.system"]
    assert {"kvmharness.kvm.system", "kvmharness.sim.system"} <= graph["kvmharness.factory"]
    assert "kvmharness.kvm.system" not in import_graph(module_level_only=True)["kvmharness.factory"]
    # type-only imports are not edges: kvm/vm.py names KvmSystem for an annotation only
    assert "kvmharness.kvm.system" not in graph["kvmharness.kvm.vm"]
    # and the cycle finder finds a planted cycle
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_cycle_among_module_level_imports():
    assert cycles(import_graph(module_level_only=True)) == []


def test_no_cycle_beyond_the_known_ones():
    graph = {m: {t for t in targets if (m, t) not in KNOWN_EDGES} for m, targets in import_graph().items()}
    unexplained = [sorted(c) for c in cycles(graph) if not any(c <= known for known in IN_FLIGHT)]
    assert unexplained == [], "import cycles (deferred imports count):\n" + "\n".join(map(str, unexplained))


def test_the_known_edges_are_real():
    """A listed edge that no longer exists is to be deleted from KNOWN_EDGES."""
    graph = import_graph()
    assert [edge for edge in KNOWN_EDGES if edge[1] not in graph.get(edge[0], ())] == []


def test_the_interface_and_the_abi_import_no_backend():
    graph = import_graph()
    for module in ("kvmharness.abi", "kvmharness.backend", "kvmharness.exits", "kvmharness.errors"):
        backends = sorted(m for m in graph[module] if m.startswith(("kvmharness.kvm", "kvmharness.sim")))
        assert backends == [], f"{module} imports {backends}"
    assert graph["kvmharness.abi"] <= {"kvmharness.errors"}


def test_the_simulator_never_imports_the_kvm_bindings():
    graph = import_graph()
    direct = sorted((m, t) for m, targets in graph.items() if m.startswith("kvmharness.sim")
                    for t in targets if t.startswith("kvmharness.kvm"))
    assert direct == []


def test_importing_the_package_loads_neither_backend():
    code = ("import sys, kvmharness; "
            "print(sorted(m for m in sys.modules if m.startswith(('kvmharness.kvm', 'kvmharness.sim', "
            "'unicorn', '_cffi_backend'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_open_backend_is_importable_from_its_old_places():
    import kvmharness
    import kvmharness.backend
    from kvmharness.factory import open_backend

    assert kvmharness.open_backend is open_backend
    assert kvmharness.backend.open_backend is open_backend
    with pytest.raises(AttributeError):
        kvmharness.backend.no_such_name  # noqa: B018 - the module __getattr__ must still refuse


def test_abi_numbers_match_the_cffi_declarations():
    """Every kvmharness.abi constant the cdefs also declare has the same value there."""
    from kvmharness import abi
    from kvmharness.kvm import _ffi as K

    compared = []
    for name in dir(abi):
        if not name.isupper() or not name.startswith("KVM_") or not isinstance(getattr(abi, name), int):
            continue
        if hasattr(K, name):
            assert getattr(K, name) == getattr(abi, name), name
            compared.append(name)
    for name, number in abi.KVM_CAP_NUMBERS.items():
        assert getattr(K, name) == number, name
        compared.append(name)
    # the nested-state, exit-reason and VM-type numbers are all declared in cdefs/
    assert {"KVM_STATE_NESTED_GIF_SET", "KVM_EXIT_X86_RDMSR", "KVM_X86_SEV_ES_VM"} <= set(compared)


def test_import_linter_contracts():
    """import-linter's contracts in pyproject.toml: layers, kvm/sim independence, no sim -> kvm."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not os.path.exists(exe):
        pytest.skip("import-linter is not installed (pip install -e '.[test]' installs it)")
    out = subprocess.run([exe, "--no-cache"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "Contracts: " in out.stdout and " broken" in out.stdout


if __name__ == "__main__":
    full = import_graph()
    pruned = {m: {t for t in targets if (m, t) not in KNOWN_EDGES} for m, targets in full.items()}
    for rule, graph in (("module level", import_graph(module_level_only=True)), ("all imports", full),
                        ("all imports but KNOWN_EDGES", pruned)):
        found = cycles(graph)
        print(f"{rule}: {len(found)} cycle(s)")
        for component in found:
            print(f"  {len(component)}: {', '.join(sorted(component))}")
