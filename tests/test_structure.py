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


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The project modules ``module`` imports at run time (imports under `if TYPE_CHECKING:` are for annotations only)."""
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
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


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(ast.parse(p.read_text()), m, p.name == "__init__.py", set(modules)) for m, p in modules.items()}


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


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_stages_do_not_import_the_flows_and_core_does_not_import_stages():
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith("tasks."):
            assert not {i for i in imports if i.startswith("flows")}, f"{module} imports flows: stage logic runs without Prefect"
        if module.startswith(("tasks.core", "tasks.models")):
            assert not {i for i in imports if i.startswith("tasks.stages") or i == "tasks.registry"}, \
                f"{module} imports a stage or the registry: machinery must not depend on the stages"


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
    assert REGISTRY["explain"].upstream == REGISTRY["hint"].upstream == ("curate", "rollouts", "filter")  # guidance reads filter
    assert round_stages() == [s for s in STAGES if s not in ("curate", "dpo")]
    assert select_stages(round_stages()) == [s for s in STAGES if s != "dpo"]
    sharded = {s for s in STAGES if REGISTRY[s].sharded}
    assert sharded == {"rollouts", "explain", "hint", "grade"}


def test_architecture_shows_the_stage_graph_of_the_code():
    assert f"```mermaid\n{mermaid()}\n```" in (ROOT / "docs" / "architecture.md").read_text()
