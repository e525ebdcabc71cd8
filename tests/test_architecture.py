"""The folder tree is the architecture: these checks keep it that way.

The stack, bottom to top (docs/architecture.md explains each package):

    version, errors, recipe_files → core → io → model → data, profile, zo → patch → tune
    → eval, export, sweep → api → (cli, outside the package)

A module may import its own package's modules (without cycles) and packages
strictly below its own level, never above or beside it. Imports inside
functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "layerzo"
LEVELS = {
    "version": 0, "errors": 0, "recipe_files": 0,
    "core": 1,
    "io": 2,
    "model": 3,
    "data": 4, "profile": 4, "zo": 4,
    "patch": 5,
    "tune": 6,
    "eval": 7, "export": 7, "sweep": 7,
    "api": 8, "__init__": 9,
}
TOP_LEVEL_FILES = {"__init__.py", "api.py", "errors.py", "version.py", "py.typed"}
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, Path]:
    """``layerzo.x.y`` → file, for every module of the package."""
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports_of(path: Path, names: set[str]) -> list[tuple[int, str, tuple[str, ...]]]:
    """(line, imported layerzo module, imported names) for every import in the file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, ()) for a in node.names if a.name.split(".")[0] == "layerzo"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "layerzo":
            for alias in node.names:  # `from layerzo.tune import loop` imports the module layerzo.tune.loop
                sub = f"{node.module}.{alias.name}"
                found.append((node.lineno, sub, ()) if sub in names else (node.lineno, node.module, (alias.name,)))
        elif isinstance(node, ast.ImportFrom) and node.level:
            found.append((node.lineno, "<relative>", ()))
    return found


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def graph() -> dict[str, list[tuple[int, str, tuple[str, ...]]]]:
    mods = modules()
    return {m: imports_of(p, set(mods)) for m, p in mods.items()}


def test_every_package_has_a_level():
    assert {package_of(m) for m in modules()} <= set(LEVELS)


def test_imports_point_down_the_stack_only():
    bad = []
    for module, deps in graph().items():
        own = package_of(module)
        for line, dep, _ in deps:
            if dep == "<relative>":
                bad.append(f"{module}:{line} uses a relative import (write layerzo.<package>.<module>)")
                continue
            if dep.startswith("layerzo.cli"):
                bad.append(f"{module}:{line} imports the CLI")
                continue
            other = package_of(dep)
            if other != own and LEVELS[other] >= LEVELS[own]:
                bad.append(f"{module}:{line} imports {dep} (level {LEVELS[other]} ≥ its own {LEVELS[own]})")
    assert bad == []


def test_no_import_cycles():
    edges = defaultdict(set)
    names = set(modules())
    for module, deps in graph().items():
        for _, dep, _ in deps:
            target = dep if dep in names else next((n for n in sorted(names, key=len, reverse=True)
                                                     if dep.startswith(n + ".")), dep)
            if target in names and target != module and target != "layerzo":
                edges[module].add(target)
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" → ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} → {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(names):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_private_name_is_used_outside_its_module():
    bad = []
    for module, deps in graph().items():
        for line, dep, imported in deps:
            bad += [f"{module}:{line} imports {dep}.{n}" for n in imported if n.startswith("_") and n != "__version__"]
    for module, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and (node.module or "").startswith("layerzo") for a in node.names}
        aliases |= {(a.asname or a.name).split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for a in node.names if a.name.startswith("layerzo")}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in aliases):
                bad.append(f"{module}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert bad == []


def test_no_reexports_monkeypatching_or_module_registries():
    bad = []
    for module, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if "noqa: F401" in text:
            bad.append(f"{module}: re-export (noqa: F401); the public surface is layerzo/__init__'s lazy map")
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Global):
                bad.append(f"{module}:{node.lineno}: `global` (state belongs in a parameter or an object)")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                    and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id in {"layerzo", "sys"}):
                bad.append(f"{module}:{node.lineno}: setattr on a module")
        aliases = {(a.asname or a.name).split(".")[0] for node in ast.walk(tree)
                   if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names
                   if isinstance(node, ast.Import) and a.name.startswith("layerzo")
                   or isinstance(node, ast.ImportFrom) and (node.module or "").startswith("layerzo")}
        for node in ast.walk(tree):  # `other_module.name = ...`: changing another module at run time
            targets = node.targets if isinstance(node, ast.Assign) else []
            for t in targets:
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in aliases:
                    bad.append(f"{module}:{node.lineno}: assigns {t.value.id}.{t.attr} (monkeypatching)")
        for node in tree.body:  # module-level mutable containers that code fills at run time
            value = getattr(node, "value", None) if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, ast.Call):
                func = value.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if name in {"WeakKeyDictionary", "WeakValueDictionary", "dict", "defaultdict", "list", "set"}:
                    bad.append(f"{module}:{node.lineno}: module-level registry {name}()")
            elif isinstance(value, (ast.Dict, ast.List, ast.Set)) and not getattr(value, "keys", getattr(value, "elts", None)):
                bad.append(f"{module}:{node.lineno}: module-level registry (an empty container filled at run time)")
    assert bad == []


def test_functions_fit_on_a_screen():
    long = []
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {n} lines")
    assert long == []


def test_the_package_root_holds_only_a_handful_of_files():
    assert {p.name for p in PKG.iterdir() if p.is_file()} <= TOP_LEVEL_FILES


def modules_with_logic() -> list[str]:
    """Package modules (``layerzo.<package>.<module>``) that define a function or a class."""
    return sorted(m for m, p in modules().items() if m.count(".") == 2 and any(
        isinstance(n, (ast.FunctionDef, ast.ClassDef)) for n in ast.parse(p.read_text(encoding="utf-8")).body))


@pytest.mark.parametrize("module", modules_with_logic())
def test_every_module_with_logic_has_a_test_file(module):
    """Tests mirror the modules, flat: layerzo/<package>/<module>.py → tests/test_<package>_<module>.py."""
    _, package, name = module.split(".")
    assert (Path(__file__).parent / f"test_{package}_{name}.py").is_file()
