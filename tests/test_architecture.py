"""The layout's rules, checked: no import cycle among the package's modules, and a method's
name is spelled only by its own file and the registry."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

from fxreplay import methods

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(ROOT.glob("fxreplay/**/*.py")) + sorted(ROOT.glob("cli/*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _import_graph() -> nx.DiGraph:
    mods = _modules()
    graph = nx.DiGraph()
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in mods and t != name)
    return graph


def test_no_import_cycle() -> None:
    graph = _import_graph()
    assert graph.number_of_edges() > 50  # the parser found the imports
    assert list(nx.simple_cycles(graph)) == []


def test_method_names_are_spelled_by_their_own_file_and_the_registry_only() -> None:
    for name in methods.names():
        if name == methods.PROPOSED.name:
            continue  # "fr" is also the documented default of every entry point
        pattern = re.compile(rf"""["']{name}["']""")
        spelled = sorted(
            str(path.relative_to(ROOT)) for path in _modules().values() if pattern.search(path.read_text())
        )
        own = methods.get(name).worker.__module__.replace(".", "/") + ".py"  # the file that declares the spec
        assert set(spelled) <= {own, "fxreplay/methods/__init__.py"}, (name, spelled)
