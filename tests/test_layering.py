"""The package's imports run one way: data -> modeling -> retrieval -> training -> evaluation -> recommender ->
finetune -> cli, and no two modules import each other (directly or around a loop).

Every import statement counts, wherever it stands (module top, inside a function, under TYPE_CHECKING): a lazy
import back up the chain is still a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Optional

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "llmrec"

# Lowest first; a module may import from its own layer and the ones before it. A name maps every module at or
# below it (`llmrec.data` covers `llmrec.data.loaders`). Base modules are helpers that anything may use.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("llmrec.utils", "llmrec.errors", "llmrec.limits", "llmrec.config", "llmrec.version")),
    ("data", ("llmrec.data",)),
    ("modeling", ("llmrec.modeling",)),
    ("retrieval", ("llmrec.retrieval",)),
    ("training", ("llmrec.training",)),
    ("evaluation", ("llmrec.evaluation",)),
    ("recommender", ("llmrec.recommender", "llmrec.model_folder", "llmrec.model_io", "llmrec.model_card", "llmrec.hub",
                     "llmrec.serving", "llmrec.ranking", "llmrec.visualization")),
    ("finetune", ("llmrec.finetune",)),
    ("cli", ("llmrec.cli", "llmrec.server", "llmrec")),  # `llmrec` itself (only): the public facade, on top
]
ROOT = "llmrec"  # as a layer entry it names the package's __init__ alone, not every module below it

# Old import paths kept for callers outside the package, served by a lazy module `__getattr__` (PEP 562) that
# runs only when the old name is asked for. Each is (importing module, imported module).
COMPATIBILITY_ALIASES = {
    ("llmrec.training", "llmrec.finetune"),
    ("llmrec.training.pipeline", "llmrec.finetune"),
}


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_package(name: str, root: Path = PACKAGE_ROOT) -> bool:
    return (root.parent / Path(*name.split(".")) / "__init__.py").is_file()


def imported_modules(path: Path, root: Path = PACKAGE_ROOT) -> set[str]:
    """The package modules `path` imports: `from .x import y` gives `llmrec.x.y` when that is a module, else `llmrec.x`."""
    importer = module_name(path, root)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                is_module = is_package(candidate, root) or (root.parent / Path(*candidate.split("."))).with_suffix(".py").is_file()
                found.add(candidate if is_module else base)
    root_name = root.name
    return {name for name in found if name == root_name or name.startswith(root_name + ".")} - {importer}


def layer_of(name: str) -> Optional[int]:
    """The layer of the longest prefix that names `name` (None: the module is in no layer, itself a failure)."""
    best: Optional[tuple[int, int]] = None
    for position, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or (prefix != ROOT and name.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (position, len(prefix))
    return None if best is None else best[0]


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    return {module_name(path, root): imported_modules(path, root) for path in sorted(root.rglob("*.py"))}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            if (importer, target) in COMPATIBILITY_ALIASES:
                continue
            source_layer, target_layer = layer_of(importer), layer_of(target)
            if source_layer is None or target_layer is None:
                problems.append(f"{importer if source_layer is None else target} is in no layer; add it to LAYERS")
            elif target_layer > source_layer:
                problems.append(f"{importer} ({LAYERS[source_layer][0]}) imports {target} ({LAYERS[target_layer][0]})")
    return problems


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach each other through imports (Tarjan's strongly connected components)."""
    edges = {module: {target for target in targets if target in graph and (module, target) not in COMPATIBILITY_ALIASES}
             for module, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(edges):
        if module not in index:
            visit(module)
    return cycles


def test_no_import_runs_back_up_the_chain():
    problems = upward_imports(import_graph())
    assert not problems, "Imports against the layer order:\n  " + "\n  ".join(problems)


def test_no_two_modules_import_each_other():
    cycles = import_cycles(import_graph())
    assert not cycles, "Import cycles:\n  " + "\n  ".join(" <-> ".join(cycle) for cycle in cycles)


def test_the_checks_catch_a_crossing_and_a_cycle(tmp_path):
    """The checker itself: a planted upward import, a function-level cycle and a relative import are all seen."""
    package = tmp_path / "llmrec"
    (package / "data").mkdir(parents=True)
    (package / "training").mkdir()
    (package / "__init__.py").write_text("")
    (package / "data" / "__init__.py").write_text("")
    (package / "data" / "loaders.py").write_text("def f():\n    from ..training.trainer import Trainer\n")
    (package / "training" / "__init__.py").write_text("from .trainer import Trainer\n")
    (package / "training" / "trainer.py").write_text("from ..data import loaders\nclass Trainer: ...\n")
    graph = import_graph(package)
    assert graph["llmrec.data.loaders"] == {"llmrec.training.trainer"}
    assert graph["llmrec.training.trainer"] == {"llmrec.data.loaders"}
    assert upward_imports(graph) == ["llmrec.data.loaders (data) imports llmrec.training.trainer (training)"]
    assert import_cycles(graph) == [["llmrec.data.loaders", "llmrec.training.trainer"]]


@pytest.mark.parametrize("name, layer", [("llmrec.data.loaders", "data"), ("llmrec.evaluation", "evaluation"),
                                         ("llmrec", "cli"), ("llmrec.utils.io", "base")])
def test_layer_of(name, layer):
    assert LAYERS[layer_of(name)][0] == layer


def test_a_new_module_must_be_given_a_layer():
    assert layer_of("llmrec.somewhere_new") is None
    assert upward_imports({"llmrec.somewhere_new": {"llmrec.data"}}) == ["llmrec.somewhere_new is in no layer; add it to LAYERS"]
