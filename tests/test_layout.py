"""The layout of ../shared/DESIGN.md, checked on the code's own import statements.

Every ``import``/``from ... import`` in ``plora_ray/`` and ``analysis/`` counts, at module level
or inside a function alike (a lazy import that closes a circle is still a circle).
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("plora_ray", "analysis")

# which layers (sub-packages of plora_ray) each layer may import; every one may import itself
MAY_IMPORT = {
    "config": set(),
    "core": set(),
    "kernels": {"config"},
    "ledger": {"core", "kernels"},
    "assets": {"config"},
    "tracking": {"config", "analysis"},
    "evaluation": {"config", "assets", "analysis"},
    "run": {"config", "core", "ledger", "kernels", "assets", "evaluation"},
    "ray": {"config", "core", "ledger", "kernels", "assets", "evaluation", "run", "tracking"},
    "sweep": {"config", "core", "ledger", "kernels", "assets", "evaluation", "run", "tracking", "ray",
              "analysis"},
    "cli": {"config", "core", "ledger", "kernels", "assets", "evaluation", "run", "tracking", "ray",
            "sweep", "analysis"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of the modules a file imports (``from a.b import c`` gives a.b.c when
    a.b.c is a module of the project, else a.b)."""
    tree = ast.parse(path.read_text(), str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.add(mod)
            for alias in node.names:
                found.add(f"{mod}.{alias.name}")
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports_of(path)
                       if m in modules and m != name and not name.startswith(m + ".")}
        edges[name].discard(name)
    # external imports too, for the purity rules
    external = {name: {m for m in imports_of(path) if m.split(".")[0] not in PACKAGES}
                for name, path in modules.items()}
    return {"edges": edges, "external": external, "modules": modules}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle(graph):
    assert cycles(graph["edges"]) == []


def test_the_algorithm_imports_only_torch_peft_and_the_stdlib(graph):
    allowed = set(sys.stdlib_module_names) | {"torch", "peft", "__future__"}
    bad = {}
    for name, ext in graph["external"].items():
        if name.startswith("plora_ray.core"):
            top = {m.split(".")[0] for m in ext} - allowed
            inner = {m for m in graph["edges"][name] if not m.startswith("plora_ray.core")}
            if top or inner:
                bad[name] = sorted(top | inner)
    assert bad == {}


def test_the_algorithm_touches_no_files_threads_environment_or_process_groups(graph):
    forbidden = {"os", "threading", "concurrent", "tempfile", "shutil", "subprocess", "pathlib",
                 "torch.distributed", "ctypes"}
    bad = {name: sorted(m for m in ext if m in forbidden or m.split(".")[0] in forbidden - {"torch"})
           for name, ext in graph["external"].items() if name.startswith("plora_ray.core")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_analysis_reads_mlflow_only_never_the_library(graph):
    bad = {name: sorted(m for m in ext if m.split(".")[0] == "plora_ray")
           for name, ext in graph["external"].items() if name.startswith("analysis")}
    bad.update({name: sorted(m for m in graph["edges"][name] if m.startswith("plora_ray"))
                for name in graph["edges"] if name.startswith("analysis")})
    assert {k: v for k, v in bad.items() if v} == {}


def test_inner_layers_never_import_outer_ones(graph):
    bad = []
    for name, deps in graph["edges"].items():
        parts = name.split(".")
        if parts[0] != "plora_ray" or len(parts) < 3:
            continue
        layer = parts[1]
        assert layer in MAY_IMPORT, f"{name}: a layer the design does not name"
        for dep in deps:
            dparts = dep.split(".")
            other = dparts[0] if dparts[0] == "analysis" else (dparts[1] if len(dparts) > 1 else "")
            if other and other != layer and other not in MAY_IMPORT[layer]:
                bad.append(f"{name} -> {dep}")
    assert bad == []


def test_no_module_is_over_400_lines(graph):
    long = {name: n for name, path in graph["modules"].items()
            if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}
