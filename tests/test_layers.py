"""The harness is layered: a module imports only from layers below its own (or from its own package), never in a
cycle, and never lazily to hide one. Data flows one way: traces -> workload -> backends -> records -> report."""

import ast
import shutil
from pathlib import Path

from conftest import REPO

#: Low to high. A module may import from a lower layer, and within its own package (e.g. backends.fa2 from
#: backends.base); a peer of the same layer is not below it.
LAYERS = [
    ["packinfer", "packinfer_bench.resources"],
    ["packinfer_bench", "packinfer_bench.errors", "packinfer_bench.envinfo", "packinfer_bench.timing",
     "packinfer_bench.deadline", "packinfer_bench.stats", "packinfer_bench.logs"],
    ["packinfer_bench.distributed"],
    ["packinfer_bench.traces"],
    ["packinfer_bench.workload"],
    ["packinfer_bench.models"],
    ["packinfer_bench.run_folder"],
    ["packinfer_bench.backends"],
    ["packinfer_bench.config"],
    ["packinfer_bench.reference"],
    ["packinfer_bench.runner", "packinfer_bench.serving", "packinfer_bench.analytic"],
    ["packinfer_bench.ranks"],
    ["packinfer_bench.experiment"],
    ["packinfer_bench.report"],
    ["packinfer_bench.cli"],
    ["packinfer_bench.__main__"],
]


def unit(module: str) -> str | None:
    """The layer entry a module belongs to (the longest matching name)."""
    names = [n for layer in LAYERS for n in layer
             if module == n or (module.startswith(n + ".") and n != "packinfer_bench")]
    return max(names, key=len) if names else None


def rank(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    """Every project module `path` imports, anywhere in the file (function bodies too), with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{a.name}", node.lineno) for a in node.names]  # `from pkg import module`
    return [(m, line) for m, line in found if m.split(".")[0] in ("packinfer", "packinfer_bench")]


def layer_violations(root: Path) -> list[str]:
    """Upward or sideways imports between layers, and import cycles between modules, each naming both modules."""
    modules = {module_name(p, root): p for p in (root / "packinfer_bench").rglob("*.py")}
    problems, graph = [], {}
    for name, path in sorted(modules.items()):
        mine = unit(name)
        assert mine is not None, f"{name} belongs to no layer: add it to LAYERS"
        graph[name] = set()
        for target, line in imports(path, name):
            if target.split(".")[0] == "packinfer_bench" and target not in modules:
                continue  # a name imported from a module, already counted as that module
            theirs = unit(target)
            if target in modules:
                graph[name].add(target)
            if theirs is None or theirs == mine or (mine.startswith(theirs + ".") or theirs.startswith(mine + ".")):
                continue
            if rank(theirs) >= rank(mine):
                problems.append(f"{name} (layer {rank(mine)}) imports {target} (layer {rank(theirs)}) at "
                                f"{path.relative_to(root)}:{line}: only lower layers may be imported")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected part of the import graph (a package importing its own submodules from
    its __init__ is not a cycle unless a submodule imports the package back)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                out.append(sorted(part) + [sorted(part)[0]])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_imports_only_from_lower_layers():
    assert layer_violations(REPO) == []


def test_a_planted_upward_import_is_caught_and_names_both_modules(tmp_path):
    shutil.copytree(REPO / "packinfer_bench", tmp_path / "packinfer_bench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    batch = tmp_path / "packinfer_bench" / "workload" / "batch.py"
    batch.write_text(batch.read_text() + "\n\ndef _late():\n    from packinfer_bench.report import write_report\n")
    problems = set(layer_violations(tmp_path)) - set(layer_violations(REPO))
    assert len(problems) == 1
    assert "packinfer_bench.workload.batch (layer 4) imports packinfer_bench.report (layer 13)" in problems.pop()


def test_a_planted_cycle_is_caught(tmp_path):
    shutil.copytree(REPO / "packinfer_bench", tmp_path / "packinfer_bench",
                    ignore=shutil.ignore_patterns("__pycache__"))
    base = tmp_path / "packinfer_bench" / "traces" / "base.py"
    base.write_text(base.read_text() + "\nfrom packinfer_bench.traces import azure  # noqa\n")
    problems = layer_violations(tmp_path)
    assert any(p.startswith("import cycle:") and "packinfer_bench.traces.base" in p for p in problems), problems
