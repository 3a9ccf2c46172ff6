"""The folder tree is the architecture: each layer imports only from the layers below it, the built-in
passes use only public names (what a module lists in `__all__`), and no module reaches into another's
private names."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: what each layer of fxslice may import (besides itself, the standard library and third-party packages)
ALLOWED = {
    "core": set(),
    "analysis": {"core"},
    "calibration": {"core", "analysis"},
    "data": {"core"},
    "models": {"core", "analysis"},
    "evaluation": {"core", "data"},
    "recipes": {"core", "data"},
    "testing": {"core", "analysis", "models", "passes"},
    "jobs": {"core", "analysis", "calibration", "data", "models", "evaluation", "recipes"},
}


def _python_files(folder: str) -> list[Path]:
    return sorted(p for p in (ROOT / folder).rglob("*.py") if ".venv" not in p.parts)


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "passes":
        parts = ["fxslice", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            out.append((module, [a.name for a in node.names], node.lineno))
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fxslice":
        return None
    return parts[1] if len(parts) > 1 else "fxslice"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer):
    bad = []
    for path in _python_files(f"fxslice/{layer}"):
        for module, _, line in _imports(path):
            target = _layer(module)
            if target is not None and target != layer and target not in ALLOWED[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_only_the_command_line_imports_the_built_in_passes():
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in _python_files("fxslice")
           if p.name != "cli.py" and "testing" not in p.parts
           for module, _, line in _imports(p) if module.startswith("fxslice.passes")]
    assert not bad, bad


def _public(module: str, name: str) -> bool:
    if name.startswith("_"):
        return False
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return True  # `name` is itself a submodule
    if hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None:
        return True
    return name in getattr(mod, "__all__", [n for n in vars(mod) if not n.startswith("_")])


def test_passes_use_only_public_names_of_fxslice():
    bad = []
    for path in _python_files("passes"):
        for module, names, line in _imports(path):
            if module == "fxslice.cli" or (module.startswith("fxslice") and not all(_public(module, n) for n in names)):
                bad.append(f"{path.relative_to(ROOT)}:{line} from {module} import {', '.join(names)}")
    assert not bad, "passes must use fxslice's public API only:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["fxslice", "passes", "benchmarks", "examples", "tests"])
def test_no_module_imports_another_modules_private_names(folder):
    bad = [f"{p.relative_to(ROOT)}:{line} from {module} import {name}"
           for p in _python_files(folder) for module, names, line in _imports(p)
           for name in names if name.startswith("_") and not name.startswith("__")]
    assert not bad, bad


def test_nothing_imports_a_bare_passes_package():
    """`passes/` installs as `fxslice.passes`; a bare `import passes` would load a second copy (or another project's)."""
    bad = [f"{p.relative_to(ROOT)}:{line}" for folder in ("fxslice", "passes", "benchmarks", "examples", "tests")
           for p in _python_files(folder) for module, _, line in _imports(p) if module.split(".")[0] == "passes"]
    assert not bad, bad


def test_the_layer_table_covers_every_package():
    packages = {p.name for p in (ROOT / "fxslice").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED), f"add new packages to ALLOWED: {sorted(packages ^ set(ALLOWED))}"


def test_the_command_line_builds_stages_but_never_asks_which_method_ran():
    """The CLI turns flags into stages; what a stage did, it hears from the stage (`Stage.summary`), so no
    `isinstance(x, SomePass)` and no `stage.kind == "quantize"` anywhere above `passes/`."""
    from fxslice.passes import STAGES

    kinds = set(STAGES)
    bad = []
    for path in _python_files("fxslice"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        built_in = {name for module, names, _ in _imports(path) if module.startswith("fxslice.passes") for name in names}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                bad += [f"{path.relative_to(ROOT)}:{node.lineno} isinstance(..., {c.id})" for c in classes
                        if isinstance(c, ast.Name) and c.id in built_in]
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                asks_kind = any(isinstance(s, ast.Attribute) and s.attr == "kind" for s in sides)
                names = {s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)}
                names |= {e.value for s in sides if isinstance(s, (ast.Tuple, ast.Set, ast.List))
                          for e in s.elts if isinstance(e, ast.Constant)}
                if asks_kind and names & kinds:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} compares a stage's kind with {sorted(names & kinds)}")
    assert not bad, "the CLI and the job must not know methods by name:\n" + "\n".join(bad)
