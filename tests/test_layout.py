"""The package layout: dependencies point one way and no module grows past ~400 lines.

Layer order (an import may only go to the same layer or below):
constants / config / checkpoint -> models -> data (+ verify) -> quant -> train -> export, estimate -> cli.
Imports inside functions are checked too, so a lazy import cannot hide an import going back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "qwen_tune"
MAX_LINES = 400

LAYERS = {
    "__init__": 0, "constants": 0, "config": 0, "recipe_io": 0, "recipe_paths": 0, "checkpoint": 0,
    "models": 1,
    "data": 2, "verify": 2,
    "quant": 3,
    "train": 4,
    "export": 5, "estimate": 5,
    "cli": 6,
}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """qwen_tune modules imported anywhere in the file (module level or inside functions)."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "qwen_tune" or n.startswith("qwen_tune.")}
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_every_top_level_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in PKG.iterdir()
            if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in LAYERS"


def test_imports_never_go_up_the_layer_order():
    mods = _modules()
    known = set(mods)
    bad = []
    for name, path in mods.items():
        for dep in _imports(name, path, known):
            if _layer(dep) > _layer(name):
                bad.append(f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for dep in _imports(name, path, known):
            # `from pkg import submodule` depends on the submodule; importing a package runs its __init__.
            while dep and dep not in known:
                dep = dep.rpartition(".")[0]
            if dep and dep != name:
                deps.add(dep)
        graph[name] = deps
    # A package's __init__ importing its own submodules is how packages re-export: not a cycle to report.
    for name in graph:
        graph[name] = {d for d in graph[name] if not (name.startswith(d + ".") and mods[d].name == "__init__.py")}
    state: dict[str, int] = {}
    cycles = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]) if d in stack else f"{n} -> {d}")
            elif d not in state:
                visit(d, stack + [d])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, "\n".join(cycles)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG.parent)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these modules (lines): {long}"


def test_readme_layout_table_matches_the_tree():
    readme = (PKG.parent / "README.md").read_text(encoding="utf-8")
    after = readme[readme.index("| path |"):].splitlines()
    table = "\n".join(line for line in after[: next((i for i, ln in enumerate(after) if not ln.startswith("|")),
                                                        len(after))])
    tops = sorted(p.name for p in PKG.iterdir() if not p.name.startswith("__") and p.name != "__pycache__"
                  and (p.suffix == ".py" or (p / "__init__.py").is_file()))
    for top in tops:
        assert f"`qwen_tune/{top}{'' if top.endswith('.py') else '/'}`" in table, f"README layout lacks {top}"
    for sub in sorted(PKG.glob("*/*.py")) + sorted(PKG.glob("models/qwen1/*.py")):
        if sub.stem != "__init__" and sub.parent.name != "cli":
            assert f"`{sub.stem}" in table, f"README layout lacks {sub.relative_to(PKG)}"
