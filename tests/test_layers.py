"""The package's import structure, read statically (ast, imports inside functions included): no
module imports itself back through others, and no module imports one of a higher layer.

An import of a submodule (`from robustprune.models import vgg`, `import robustprune.attacks.pgd`)
is an edge to that submodule; an imported name that is not a module is an edge to the module it
comes from. Edges to the top-level `robustprune` package are left out: its public names are loaded
lazily and it is the one module allowed to sit above everything it names."""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "robustprune"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Layer of every module: the longest prefix listed here wins. A module may import modules of its
# own layer or lower ones (the cycle test keeps a layer free of circles), never a higher one.
LAYERS = {
    # 0: helpers that everything may use; they import nothing of robustprune but errors
    "robustprune.errors": 0,
    "robustprune.registry": 0,
    "robustprune.files": 0,
    "robustprune.device": 0,
    "robustprune.stats": 0,
    "robustprune.settings": 0,
    "robustprune.evaluation.names": 0,  # metric-name strings: metrics name their values with them too
    # 1: tensor conversions shared from the attacks up
    "robustprune.tensors": 1,
    # 2: attacks and shifts work on any model and images; they know no data set or architecture
    "robustprune.attacks": 2,
    # 3: data sets; the fgsm_data regime crafts its images with an attack
    "robustprune.data": 3,
    # 4: architectures; a user's model is imported by the same helper as a user's data
    "robustprune.models": 4,
    "robustprune.pruning.unstructured": 4,  # masks on a model's weights: metrics count them, training keeps them
    # 5: measurements of a model (size, latency, weights, training dynamics)
    "robustprune.metrics": 5,
    # 6: the training loop (adversarial training uses the attacks, --dynamics the metrics)
    "robustprune.train": 6,
    # 7: pruning methods; data-driven ones attack, count FLOPs and score accuracy while they choose
    "robustprune.pruning": 7,
    # 8: the evaluation suite and its settings (attacks, accuracy, security curves)
    "robustprune.evaluation": 8,
    # 9: the public Python calls and model files (rp.prune / finetune / evaluate, save, load, ONNX)
    "robustprune.api": 9,
    "robustprune.saving": 9,
    "robustprune.checkpoint": 9,
    "robustprune.export": 9,
    # 10: studies: a grid of the calls below, stored cell by cell
    "robustprune.study": 10,
    # 11: reports read a study's store
    "robustprune.report": 11,
    # 12: the command line and the benchmarks drive everything
    "robustprune.cli": 12,
    "robustprune.cli_model": 12,
    "robustprune.progress": 12,
    "robustprune.__main__": 12,
    "robustprune.bench": 12,
    "robustprune.bench_common": 12,
    "robustprune.bench_attacks": 12,
    "robustprune.bench_cifar": 12,
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    line: int
    target: str  # the imported module

    def __str__(self) -> str:
        return f"{self.module} (line {self.line}) imports {self.target}"


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def _known(name: str) -> str:
    """The module an imported dotted name lives in (a name inside a module: that module)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str, path: Path) -> list[Import]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, path, node)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                target = _known(target)
                if target not in (PACKAGE, module):
                    found.append(Import(module, node.lineno, target))
    return list(dict.fromkeys(found))  # one edge per import line and target


@functools.cache
def all_imports() -> tuple[Import, ...]:
    return tuple(i for m, p in MODULES.items() if m != PACKAGE for i in imports_of(m, p))


def layer_entry(module: str) -> str | None:
    """The LAYERS key that places `module` (the longest prefix), None when there is none."""
    keys = [k for k in LAYERS if module == k or module.startswith(k + ".")]
    return max(keys, key=len) if keys else None


def layer_of(module: str) -> int | None:
    key = layer_entry(module)
    return None if key is None else LAYERS[key]


def circles(edges: tuple[Import, ...]) -> list[list[str]]:
    """The groups of modules that import each other (strongly connected components of more than one
    module, Tarjan's algorithm), each sorted."""
    graph: dict[str, list[str]] = {}
    for e in edges:
        graph.setdefault(e.module, []).append(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, []):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def _circle_through(start: str, inside: dict[str, list[Import]]) -> list[Import] | None:
    """Breadth first from `start`: the first import that leads back to it closes the shortest circle."""
    paths: dict[str, list[Import]] = {start: []}
    queue = [start]
    for module in queue:  # (the queue grows while it is read)
        for e in inside.get(module, []):
            if e.target == start:
                return paths[module] + [e]
            if e.target not in paths:
                paths[e.target] = paths[module] + [e]
                queue.append(e.target)
    return None


def shortest_circle(group: list[str], edges: tuple[Import, ...]) -> list[Import]:
    """The shortest chain of imports inside `group` that leads from one of its modules back to itself."""
    inside: dict[str, list[Import]] = {}
    for e in edges:
        if e.module in group and e.target in group:
            inside.setdefault(e.module, []).append(e)
    chains = [c for m in group if (c := _circle_through(m, inside))]
    return min(chains, key=len)


def test_the_scan_sees_the_package():
    # guards the other tests against passing on an empty or misread tree
    edges = all_imports()
    assert len(MODULES) > 50
    assert any(e.module == "robustprune.train" and e.target == "robustprune.attacks.registry" for e in edges)
    assert any(e.module == "robustprune.study.runner" and e.target == "robustprune.study.executor" for e in edges), (
        "imports inside functions are part of the scan"
    )


def test_no_import_cycles():
    edges = all_imports()
    found = circles(edges)
    text = "\n".join(
        f"  {', '.join(group)}; e.g.\n" + "\n".join(f"    {e}" for e in shortest_circle(group, edges))
        for group in found
    )
    assert not found, f"{len(found)} group(s) of robustprune modules import each other:\n{text}"


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if m != PACKAGE and layer_of(m) is None)
    assert not missing, f"give these modules a layer in LAYERS (tests/test_layers.py): {', '.join(missing)}"


def test_no_module_imports_a_higher_layer():
    wrong = [
        f"  {e}: layer {layer_of(e.module)} ({layer_entry(e.module)}) imports layer {layer_of(e.target)} "
        f"({layer_entry(e.target)})"
        for e in all_imports()
        if layer_of(e.module) is not None and layer_of(e.target) is not None and layer_of(e.target) > layer_of(e.module)
    ]
    assert not wrong, "imports of a higher layer (see LAYERS in tests/test_layers.py):\n" + "\n".join(wrong)


def test_no_module_imports_its_own_package():
    # a package __init__ that registers its modules (attacks, models) imports them; they import the
    # registry module below it instead, or the package would be half initialised when they run
    wrong = [str(e) for e in all_imports() if e.module.startswith(e.target + ".")]
    assert not wrong, "import the module that defines the name, not the package:\n" + "\n".join(wrong)


def test_the_public_api_needs_nothing_from_the_study_package():
    # the study runner is to become a loop over rp.prune / rp.finetune / rp.evaluate
    from_api = [e for e in all_imports() if e.module == "robustprune.api"]
    wrong = [str(e) for e in from_api if layer_entry(e.target) == "robustprune.study"]
    assert not wrong, "\n".join(wrong)
