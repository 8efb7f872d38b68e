"""The house: no import circles in tasks/ and flows/, every stage declared where it lives."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tasks.core.stage import Stage
from tasks.registry import REGISTRY, STAGES, Config, mermaid, round_stages, select_stages

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str], annotations: bool = False) -> set[str]:
    """The project modules ``module`` imports at run time, at any depth (inside functions too); imports under
    `if TYPE_CHECKING:` (for annotations only) with ``annotations``."""
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node) and not annotations:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(filter(None, (resolve(a.name) for a in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            for alias in node.names:  # `from tasks.stages import curate` imports the module tasks.stages.curate
                target = resolve(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known else resolve(base)
                if target:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def import_graph(annotations: bool = False) -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", set(modules), annotations) for m, p in modules.items()}


#: the house's floors, ground first: a module imports its own floor and those below, never one above — not inside a
#: function; and the ground floor not even for annotations (docs/architecture.md)
LAYERS = ("tasks.core", "tasks.models", "tasks.stages", "tasks.registry", "tasks.report", "flows")


def layer_of(module: str) -> int:
    return max(i for i, floor in enumerate(LAYERS) if module == floor or module.startswith(floor + ".") or floor == "tasks.core"
               and module == "tasks")


def layer_breaches(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module on a higher floor, as ``importer -> imported``."""
    return sorted(f"{m} -> {i}" for m, imports in graph.items() for i in imports if layer_of(i) > layer_of(m))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_circles_in_tasks_and_flows():
    graph = import_graph()
    assert graph["tasks.stages.rollouts"] >= {"tasks.core.shards", "tasks.models.policy"}  # the walk sees imports
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_import_points_down_the_layers():
    """The layers contract: core < models < stages < registry < report < flows, every import at any depth counted;
    tasks.core's imports for annotations too (a stage module may name the registry's Config in an annotation)."""
    graph = {m: i for m, i in import_graph().items() if not m.startswith("tasks.core")}
    graph.update({m: i for m, i in import_graph(annotations=True).items() if m.startswith("tasks.core")})
    breaches = layer_breaches(graph)
    assert breaches == [], "imports that point up the layers " + " < ".join(LAYERS) + ":\n" + "\n".join(breaches)


def test_the_layers_contract_sees_an_import_inside_a_function_and_for_annotations():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from tasks.registry import Config\n"
                     "def f():\n    from tasks.report import runs\n")
    known = {"tasks.core.x", "tasks.registry", "tasks.report", "tasks.report.runs"}
    graph = {"tasks.core.x": _imports(tree, "tasks.core.x", False, known, annotations=True)}
    assert layer_breaches(graph) == ["tasks.core.x -> tasks.registry", "tasks.core.x -> tasks.report.runs"]


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", STAGES)
def test_each_stage_module_declares_itself(name):
    stage = REGISTRY[name]
    assert isinstance(stage, Stage) and stage.module == f"tasks.stages.{name}"
    impl = stage.impl
    for fn in ("settings", "inputs", *(("plan", "run_shard", "assemble") if stage.sharded else ("compute",))):
        assert callable(getattr(impl, fn, None)), f"tasks/stages/{name}.py lacks {fn}()"
    if stage.section:
        head, _, rest = stage.section.partition(".")
        model = Config.model_fields[head].annotation
        assert (model.model_fields[rest].annotation if rest else model) is stage.settings_model
    # a stage comes after everything it reads
    assert all(STAGES.index(u) < STAGES.index(name) for u in (*stage.upstream, *stage.optional_upstream))


def test_the_graph_is_the_registry():
    assert STAGES[0] == "curate" and STAGES[-1] == "eval"
    guidance = ("explain", "hint", "prefix", "self_hint")
    assert {REGISTRY[g].upstream for g in guidance} == {("curate", "rollouts", "filter")}  # guidance reads filter
    assert round_stages() == [s for s in STAGES if s not in ("curate", "dpo")]
    assert select_stages(round_stages()) == [s for s in STAGES if s != "dpo"]
    sharded = {s for s in STAGES if REGISTRY[s].sharded}
    assert sharded == {"rollouts", *guidance, "grade"}


def test_architecture_shows_the_stage_graph_of_the_code():
    assert f"```mermaid\n{mermaid()}\n```" in (ROOT / "docs" / "architecture.md").read_text()
