"""The package's import layers: every import of every module (function-local and relative ones included) checked
against the layer order written in the README's Layout section, and no import circle between the top-level
modules and packages."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import reamkit

SRC = Path(reamkit.__file__).parent
README = SRC.parents[1] / "README.md"


def readme_layers(text: str) -> list[list[str]]:
    """The numbered list of the README's ``## Layout`` section, lowest layer first: one line per layer, each
    naming its top-level modules and packages in backticks (``errors.py``, ``llamacpp/``)."""
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert section, "README.md has no '## Layout' section"
    rows = re.findall(r"^\d+\. ((?:`[\w.]+/?`[ ,]*)+)$", section.group(1), re.M)
    assert rows, "the README's Layout section lists no layers (a numbered line per layer, names in backticks)"
    return [[n.removesuffix("/").removesuffix(".py") for n in re.findall(r"`([\w.]+/?)`", r)] for r in rows]


def units() -> set[str]:
    """The package's top-level modules and packages."""
    return {p.stem if p.is_file() else p.name for p in SRC.iterdir()
            if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").is_file())}


def module_name(path: Path) -> tuple[str, list[str]]:
    """``reamkit.a.b`` for ``a/b.py`` and the package a relative import starts from."""
    parts = ["reamkit", *path.relative_to(SRC).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
        return ".".join(parts), parts
    return ".".join(parts), parts[:-1]


def imports(path: Path) -> list[tuple[str, int]]:
    """Every ``reamkit`` module ``path`` imports, with the line: module-level, function-local, relative, and
    ``importlib.import_module("reamkit....")``."""
    package = module_name(path)[1] if SRC in path.parents else ["reamkit"]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module) if p)
            out += [(f"{mod}.{a.name}", node.lineno) for a in node.names]   # a name may be a module
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")):
            out.append((node.args[0].value, node.lineno))
    return [(m, line) for m, line in out if m.split(".")[0] == "reamkit"]


def edges() -> list[tuple[str, str, str, int]]:
    """``(from unit, to unit, importing module, line)`` for each import that crosses units."""
    known = units()
    out = []
    for path in sorted(SRC.rglob("*.py")):
        name, _ = module_name(path)
        parts = name.split(".")
        src = parts[1] if len(parts) > 1 else "reamkit"
        for target, line in imports(path):
            t = target.split(".")
            dst = t[1] if len(t) > 1 and t[1] in known else "reamkit"
            if dst != src and not (dst == "reamkit" and len(t) > 1):     # `from reamkit import __version__`
                out.append((src, dst, name, line))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_readme_lists_every_top_level_module_in_one_layer():
    layers = readme_layers(README.read_text())
    listed = [n for layer in layers for n in layer]
    twice = sorted({n for n in listed if listed.count(n) > 1})
    missing = sorted(units() - set(listed))
    unknown = sorted(set(listed) - units())
    assert not twice, f"listed in more than one layer of the README: {', '.join(twice)}"
    assert not missing, f"not in the README's layer list (add each to its layer): {', '.join(missing)}"
    assert not unknown, f"in the README's layer list but not in src/reamkit: {', '.join(unknown)}"


def test_no_lower_layer_imports_a_higher_one():
    layer = {n: i for i, names in enumerate(readme_layers(README.read_text()), 1) for n in names}
    bad = [f"{mod}:{line} imports {dst} (layer {layer[dst]}) into {src} (layer {layer[src]})"
           for src, dst, mod, line in edges() if src in layer and dst in layer and layer[dst] > layer[src]]
    root = [f"{mod}:{line} imports {dst}: the package's __init__ imports nothing"
            for src, dst, mod, line in edges() if src == "reamkit"]
    assert not bad + root, "imports against the README's layer order:\n" + "\n".join(bad + root)


def test_no_import_circle_between_top_level_modules():
    graph: dict[str, set[str]] = defaultdict(set)
    where: dict[tuple[str, str], list[str]] = defaultdict(list)
    for src, dst, mod, line in edges():
        graph[src].add(dst)
        where[src, dst].append(f"{mod}:{line}")
    lines = []
    for comp in cycles(graph):
        lines.append(f"circle between {', '.join(comp)}:")
        lines += [f"  {a} -> {b}: {', '.join(dict.fromkeys(where[a, b]))}" for a in comp
                  for b in sorted(graph[a] & set(comp))]
    assert not lines, "\n".join(lines)


def test_the_walk_sees_function_local_relative_and_dynamic_imports(tmp_path):
    """The walk itself: a function-local relative import, an absolute one and an import_module call count."""
    path = SRC / "pipeline" / "stages.py"
    found = {m for m, _ in imports(path)}
    tree = ast.parse(path.read_text())
    local = [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)
             if isinstance(n, ast.ImportFrom) and n.level == 2]
    assert local, "pipeline/stages.py no longer has a function-local import to check the walk with"
    assert any(m.startswith(f"reamkit.{local[0].module}") for m in found)
    code = tmp_path / "probe.py"
    code.write_text("import importlib\ndef f():\n    import reamkit.zoo\n    importlib.import_module('reamkit.cli')\n")
    assert {m for m, _ in imports(code)} == {"reamkit.zoo", "reamkit.cli"}
