"""The project's import graph: one way, no circles, every project import at the top of its file.

    pallas_kernels  <-  sharding  <-  lite (the model)  <-  entry points (train.py, serve.py, benchmarks/)

Read from the source with `ast` (nothing is imported), so a circle hidden by an import inside a
function is found too.
"""

from __future__ import annotations

import ast
import pathlib


ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ("pallas_kernels", "sharding", "lite", "entry")  # each may import only the ones before it
PACKAGES = ("pallas_kernels", "sharding", "lite")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[pathlib.Path]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    return files + [ROOT / "train.py", ROOT / "serve.py", *sorted((ROOT / "benchmarks").glob("*.py"))]


MODULES = {module_name(p): p for p in source_files()}
BENCHMARK_SIBLINGS = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}  # `from kernels import ...`


def layer(module: str) -> str:
    top = module.split(".")[0]
    return top if top in PACKAGES else "entry"


def resolve(importer: str, name: str) -> str | None:
    """The project module an imported dotted name refers to (its longest known prefix), or None."""
    if importer.startswith("benchmarks.") and name.split(".")[0] in BENCHMARK_SIBLINGS:
        name = f"benchmarks.{name}"
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in MODULES:
            return ".".join(parts[:end])
    return None


def project_imports(path: pathlib.Path) -> list[tuple[str, int, bool]]:
    """(imported project module, line, whether the import sits at module level) for one file."""
    importer = module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    top_level |= {id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try)) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from pkg import sub` may name a submodule: resolve pkg.sub first, then pkg.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(importer, name)
            if target is not None and target != importer:
                found.append((target, node.lineno, id(node) in top_level))
    return found


GRAPH = {module: project_imports(path) for module, path in MODULES.items()}


def find_circle(graph: dict[str, list[tuple[str, int, bool]]]) -> list[str] | None:
    """A circle of the graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target, _, _ in graph.get(module, []):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (circle := visit(target)) is not None:
                return circle
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (circle := visit(module)) is not None:
            return circle
    return None


def test_the_graph_is_read():
    assert {"lite.model", "pallas_kernels.backend", "sharding.mesh", "train", "serve"} <= set(MODULES)
    assert "lite.config" in {target for target, _, _ in GRAPH["lite.model"]}
    assert "sharding.expert_parallel" in {target for target, _, _ in GRAPH["lite.moe"]}
    edge = [("b", 1, True)]
    assert find_circle({"a": edge, "b": [("c", 1, True)], "c": [("a", 1, True)]}) == ["a", "b", "c", "a"]
    assert find_circle({"a": edge, "b": [("c", 1, True)], "c": []}) is None


def test_every_project_import_is_at_the_top_of_its_file():
    inner = sorted({f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
             for m, edges in GRAPH.items() for target, line, top in edges if not top})
    assert not inner, "imports of project modules inside functions (move them to the top):\n" + "\n".join(inner)


def test_imports_run_one_way():
    order = {name: i for i, name in enumerate(LAYERS)}
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} ({layer(m)}) imports {target} ({layer(target)})"
              for m, edges in GRAPH.items() for target, line, _ in edges if order[layer(target)] > order[layer(m)]]
    assert not upward, "imports against the layering " + " <- ".join(LAYERS) + ":\n" + "\n".join(upward)


def test_no_import_circle():
    circle = find_circle(GRAPH)
    assert circle is None, "import circle: " + " -> ".join(circle or [])
