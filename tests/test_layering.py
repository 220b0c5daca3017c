"""Package layering of noclone, checked on the import statements of src/noclone (module level and inside functions).

Layers, lowest first. A module may import its own layer and lower ones, never a higher one:

    0 foundation  the package root, errors, data, report (page helpers), presets (preset tables), quiet
    1 core        models, training, generation, class_images, the sandbox world (assets, splits, render, train)
    2 methods     attacks, cloak, defenses, eval, and sandbox.evaluator (the identity evaluator: it imports
                  eval.metrics, and eval's face backends load it)
    3 workflows   bench, audit, fidelity, demo, sandbox.experiment
    4 service     serve
    5 cli         cli.py, cli_args.py, every */cli.py, defenses/cli_protect.py

Also checked: only the command-line layer imports the command-line layer (argparse glue is not a library API), no
import cycle at module level, and no cycle closed by a deferred (function-level) import either. The usual way such a
cycle appears is a registry in a base module: base.get_x() imports every method, and every method imports base. A
registry belongs in the package __init__ or a small registry module that imports the methods and that no method
imports.

The checker is plain functions over a source tree, so the last tests run it on a synthetic package to show that each
rule fails when broken.
"""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

CLI_NAMES = ("cli", "cli_args", "cli_protect")

LAYERS = ("foundation", "core", "methods", "workflows", "service", "cli")

# module-name prefix -> layer; the longest matching prefix wins
NOCLONE_LAYERS = {
    "noclone": "foundation",
    "noclone.errors": "foundation",
    "noclone.data": "foundation",
    "noclone.report": "foundation",
    "noclone.presets": "foundation",
    "noclone.quiet": "foundation",
    "noclone.models": "core",
    "noclone.training": "core",
    "noclone.generation": "core",
    "noclone.class_images": "core",
    "noclone.sandbox": "core",
    "noclone.attacks": "methods",
    "noclone.cloak": "methods",
    "noclone.defenses": "methods",
    "noclone.eval": "methods",
    "noclone.sandbox.evaluator": "methods",
    "noclone.bench": "workflows",
    "noclone.audit": "workflows",
    "noclone.fidelity": "workflows",
    "noclone.demo": "workflows",
    "noclone.sandbox.experiment": "workflows",
    "noclone.serve": "service",
}

# (importer, imported) -> why the edge may go upward. Empty: no module imports a higher layer.
LAYER_EXCEPTIONS: dict[tuple[str, str], str] = {}

# (importer, imported) deferred imports that may close a cycle, with the owner file that should remove them.
CYCLE_EXCEPTIONS: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------------------------ the checker


@dataclass(frozen=True)
class Import:
    importer: str
    target: str
    line: int
    deferred: bool  # inside a function: runs when the function is called, not when the module loads

    def __str__(self) -> str:
        return f"{self.importer} -> {self.target} (line {self.line}{', in a function' if self.deferred else ''})"


def module_names(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `package` under `src`."""
    names = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` refers to: itself, or its longest prefix that is a module (`pkg.mod.attr` -> `pkg.mod`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def scan_imports(src: Path, package: str) -> tuple[dict[str, Path], list[Import]]:
    """Every import of a module of `package` by a module of `package`: `import`, `from ... import` (relative ones
    too) and `importlib.import_module("...")` with a literal name, each marked deferred when inside a function.
    Imports under `if TYPE_CHECKING:` never run and are skipped."""
    modules = module_names(src, package)
    found: list[Import] = []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        here = name.split(".") if is_package else name.split(".")[:-1]

        def add(target_names: list[str], node: ast.AST, deferred: bool) -> None:
            for target_name in target_names:
                target = _resolve(target_name, modules)
                if target is not None and target != name:
                    found.append(Import(name, target, node.lineno, deferred))

        def visit(node: ast.AST, deferred: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and _is_type_checking(child.test):
                    for sub in child.orelse:
                        visit(ast.Module(body=[sub], type_ignores=[]), deferred)
                    continue
                if isinstance(child, ast.Import):
                    add([a.name for a in child.names], child, deferred)
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = here[:len(here) - (child.level - 1)]
                        module = ".".join(base + ([child.module] if child.module else []))
                    else:
                        module = child.module or ""
                    # `from pkg import mod` imports the module pkg.mod; `from pkg.mod import attr` imports pkg.mod
                    add([f"{module}.{a.name}" for a in child.names], child, deferred)
                elif (isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant)
                      and isinstance(child.args[0].value, str)
                      and (getattr(child.func, "attr", None) == "import_module"
                           or getattr(child.func, "id", None) in ("import_module", "__import__"))):
                    add([child.args[0].value], child, deferred)
                visit(child, deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return modules, found


def is_cli(module: str) -> bool:
    return module.rsplit(".", 1)[-1] in CLI_NAMES


def layer_of(module: str, layers: dict[str, str]) -> int:
    if is_cli(module):
        return LAYERS.index("cli")
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in layers:
            return LAYERS.index(layers[prefix])
    raise AssertionError(f"{module} has no layer: add its package to the layer table")


def cli_violations(imports: list[Import]) -> list[Import]:
    """Imports of the command-line layer by a module outside it."""
    return [i for i in imports if is_cli(i.target) and not is_cli(i.importer)]


def layer_violations(imports: list[Import], layers: dict[str, str],
                     allowed: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Imports of a higher layer (not in `allowed`)."""
    allowed = allowed or {}
    return [f"{i} ({LAYERS[layer_of(i.importer, layers)]} imports {LAYERS[layer_of(i.target, layers)]})"
            for i in imports
            if layer_of(i.target, layers) > layer_of(i.importer, layers) and (i.importer, i.target) not in allowed]


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def import_graph(modules: dict[str, Path], imports: list[Import], deferred: bool,
                 allowed: dict[tuple[str, str], str] | None = None) -> dict[str, dict[str, str]]:
    """importer -> {imported: how}. With `deferred`, imports inside functions count too. Importing pkg.mod also runs
    pkg/__init__.py, so that is an edge as well (unless pkg is the importer's own package, already loading)."""
    allowed = allowed or {}
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for i in imports:
        if (i.deferred and not deferred) or (i.importer, i.target) in allowed:
            continue
        graph[i.importer].setdefault(i.target, f"line {i.line}{', in a function' if i.deferred else ''}")
        own = set(_ancestors(i.importer)) | {i.importer}
        for package in _ancestors(i.target):
            if package not in own and package in modules:
                graph[i.importer].setdefault(package, f"line {i.line}, runs {package}/__init__.py")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[str]:
    """One shortest cycle per strongly connected component, as 'a -> b (line n) -> ... -> a'."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan; the graph is a few hundred edges, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    found = []
    for component in components:
        start, members = component[0], set(component)
        previous: dict[str, str] = {}
        queue = deque([start])
        while queue:  # breadth-first from `start` inside the component, until an edge leads back to it
            last = queue.popleft()
            if start in graph[last]:
                break
            for w in sorted(graph[last]):
                if w in members and w not in previous and w != start:
                    previous[w] = last
                    queue.append(w)
        else:
            raise AssertionError(f"no cycle back to {start} in {component}")
        hops = [last]
        while hops[-1] != start:
            hops.append(previous[hops[-1]])
        hops = hops[::-1] + [start]
        found.append(" -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(hops, hops[1:])) + f" -> {start}")
    return found


# ------------------------------------------------------------------------------------------- noclone's rules


def _noclone() -> tuple[dict[str, Path], list[Import]]:
    return scan_imports(SRC, "noclone")


def test_every_module_has_a_layer():
    modules, _ = _noclone()
    for module in modules:
        layer_of(module, NOCLONE_LAYERS)


def test_only_the_command_line_layer_imports_it():
    _, imports = _noclone()
    bad = cli_violations(imports)
    assert not bad, ("library code imports the command-line layer; move what it needs out of the cli module:\n"
                     + "\n".join(map(str, bad)))


def test_no_import_cycle_at_module_level():
    modules, imports = _noclone()
    found = cycles(import_graph(modules, imports, deferred=False))
    assert not found, "import cycles at module level:\n" + "\n".join(found)


def test_no_cycle_closed_by_a_function_level_import():
    modules, imports = _noclone()
    found = cycles(import_graph(modules, imports, deferred=True, allowed=CYCLE_EXCEPTIONS))
    assert not found, (
        "a function-level import closes an import cycle (typically a registry in a base module that its methods "
        "import): move the registry to the package __init__ or a registry module that no method imports:\n"
        + "\n".join(found))


def test_cycle_exceptions_are_still_needed():
    modules, imports = _noclone()
    edges = {(i.importer, i.target) for i in imports}
    stale = [edge for edge in CYCLE_EXCEPTIONS if edge not in edges]
    assert not stale, f"these cycle exceptions no longer exist, remove them: {stale}"
    for edge in CYCLE_EXCEPTIONS:
        others = {e: why for e, why in CYCLE_EXCEPTIONS.items() if e != edge}
        assert cycles(import_graph(modules, imports, deferred=True, allowed=others)), (
            f"{edge} no longer closes a cycle: remove it from CYCLE_EXCEPTIONS")


def test_lower_layers_never_import_upper_ones():
    _, imports = _noclone()
    bad = layer_violations(imports, NOCLONE_LAYERS, LAYER_EXCEPTIONS)
    assert not bad, "imports of a higher layer:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------------ the checker, on a fake tree


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


FAKE_LAYERS = {"pkg": "foundation", "pkg.meth": "methods", "pkg.flow": "workflows"}


def test_checker_finds_a_registry_cycle_a_cli_import_and_an_upward_import(tmp_path):
    src = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/errors.py": "import pkg.flow.run  # upward\n",
        "pkg/meth/__init__.py": "",
        "pkg/meth/base.py": "def get(name):\n    from pkg.meth import one\n    return one\n",
        "pkg/meth/one.py": "from pkg.meth.base import get\n",
        "pkg/meth/cli.py": "",
        "pkg/flow/__init__.py": "",
        "pkg/flow/run.py": "from ..meth import cli\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                           "    import pkg.cli_args\n",
        "pkg/cli_args.py": "",
    })
    modules, imports = scan_imports(src, "pkg")
    assert set(modules) == {"pkg", "pkg.errors", "pkg.meth", "pkg.meth.base", "pkg.meth.one", "pkg.meth.cli",
                            "pkg.flow", "pkg.flow.run", "pkg.cli_args"}
    assert Import("pkg.meth.base", "pkg.meth.one", 2, True) in imports
    assert Import("pkg.flow.run", "pkg.meth.cli", 1, False) in imports  # the relative import resolved
    assert not any(i.target == "pkg.cli_args" for i in imports)  # TYPE_CHECKING only

    assert [str(i) for i in cli_violations(imports)] == ["pkg.flow.run -> pkg.meth.cli (line 1)"]
    assert layer_violations(imports, FAKE_LAYERS) == [
        "pkg.errors -> pkg.flow.run (line 1) (foundation imports workflows)",
        "pkg.flow.run -> pkg.meth.cli (line 1) (workflows imports cli)"]
    assert layer_violations(imports, FAKE_LAYERS, {("pkg.errors", "pkg.flow.run"): "why"}) == [
        "pkg.flow.run -> pkg.meth.cli (line 1) (workflows imports cli)"]

    assert cycles(import_graph(modules, imports, deferred=False)) == []
    found = cycles(import_graph(modules, imports, deferred=True))
    assert found == ["pkg.meth.base (line 2, in a function) -> pkg.meth.one (line 1) -> pkg.meth.base"]
    assert cycles(import_graph(modules, imports, deferred=True, allowed={("pkg.meth.base", "pkg.meth.one"): ""})) == []


def test_checker_accepts_a_registry_in_the_package_init(tmp_path):
    src = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/meth/__init__.py": "from pkg.meth.registry import get\n",
        "pkg/meth/registry.py": "def get(name):\n    from pkg.meth import one\n    return one\n",
        "pkg/meth/base.py": "",
        "pkg/meth/one.py": "from pkg.meth.base import *\n",
        "pkg/flow/__init__.py": "",
        "pkg/flow/run.py": "import importlib\nimportlib.import_module('pkg.meth.one')\n",
    })
    modules, imports = scan_imports(src, "pkg")
    assert Import("pkg.flow.run", "pkg.meth.one", 2, False) in imports  # a literal import_module counts
    assert cycles(import_graph(modules, imports, deferred=True)) == []
    assert layer_violations(imports, FAKE_LAYERS) == []


def test_checker_finds_a_module_level_cycle_through_a_package_init(tmp_path):
    src = _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from pkg.a.x import X\n",
        "pkg/a/x.py": "from pkg.b.y import Y\n",
        "pkg/b/__init__.py": "",
        "pkg/b/y.py": "from pkg.a import X\n",
    })
    modules, imports = scan_imports(src, "pkg")
    found = cycles(import_graph(modules, imports, deferred=False))
    assert len(found) == 1 and "pkg.a.x" in found[0] and "pkg.b.y" in found[0]
