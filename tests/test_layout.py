"""The layout holds: every stage's deps in dvc.yaml are exactly its script's import closure (so editing any module a
stage runs reruns that stage, and nothing else), project modules import each other without cycles, and no library
module reads params.yaml or imports a command-line tool."""
import ast
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PACKAGES = ("pipeline", "stages")
TOOLS = ("pipeline.chat", "pipeline.view", "pipeline.compare")  # command-line tools: nothing imports them


def module_file(name: str) -> Path | None:
    path = ROOT / (name.replace(".", "/") + ".py")
    return path if path.is_file() else None


def imports_of(path: Path) -> set[str]:
    """The project modules a file imports, anywhere in it (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline import x`
    return {m for m in found if m.split(".")[0] in PACKAGES and module_file(m)}


def closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports_of(module_file(m))
    return seen


def all_modules() -> list[str]:
    return sorted(f"{p.parent.name}.{p.stem}" for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")
                  if p.stem != "__init__")


def test_package_inits_hold_no_code():
    """Importing a module runs its package's __init__.py: they hold at most a docstring, so they are no dep."""
    for pkg in PACKAGES:
        body = ast.parse((ROOT / pkg / "__init__.py").read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), pkg


@pytest.mark.parametrize("stage", list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_stage_deps_are_exactly_the_import_closure_of_its_script(stage):
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    script = spec["cmd"].split()[2]  # python -m stages.<name> ...
    assert spec["cmd"].startswith(f"python -m {script} ") and script == f"stages.{stage}"
    needed = {str(module_file(m).relative_to(ROOT)) for m in closure(script)}
    listed = {d for d in spec["deps"] if d.endswith(".py")}
    assert not needed - listed, f"stage {stage}: deps miss {sorted(needed - listed)} (imported by its script)"
    assert not listed - needed, f"stage {stage}: deps list {sorted(listed - needed)}, which its script never imports"


def test_closure_sees_function_level_imports(tmp_path, monkeypatch):
    """The check reads imports anywhere in a file: one hidden in a function counts."""
    (tmp_path / "pipeline").mkdir()
    for name, text in {"a": "def f():\n    from pipeline.b import g\n    return g()\n", "b": "def g():\n    return 1\n",
                       "__init__": ""}.items():
        (tmp_path / "pipeline" / f"{name}.py").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert closure("pipeline.a") == {"pipeline.a", "pipeline.b"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_import_cycle_among_project_modules():
    graph = {m: imports_of(module_file(m)) - {m} for m in all_modules()}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the check can fail


def test_nothing_imports_a_command_line_tool_and_no_library_module_reads_params():
    for m in all_modules():
        if m in TOOLS:
            continue
        assert not imports_of(module_file(m)) & set(TOOLS), f"{m} imports a command-line tool"
        if m.startswith("pipeline.") and m != "pipeline.config":
            tree = ast.parse(module_file(m).read_text())
            names = {n.attr if isinstance(n, ast.Attribute) else n.id
                     for n in ast.walk(tree) if isinstance(n, (ast.Name, ast.Attribute))}
            assert not names & {"load_params", "read_params"}, f"{m} reads params.yaml (stage scripts do that)"


def top_level_imports(path: Path) -> set[str]:
    """The packages a file imports at module level (what importing it costs)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module.split(".")[0])
    return found


def test_the_model_knows_no_tokenizer_and_data_modules_no_torch():
    assert not closure("pipeline.model") & {"pipeline.tokenizer", "pipeline.template", "pipeline.hf"}
    assert closure("pipeline.config") == {"pipeline.config", "pipeline.common"}
    for m in ("pipeline.common", "pipeline.config", "pipeline.data", "pipeline.template", "pipeline.tokenizer",
              "pipeline.render", "pipeline.pack", "pipeline.metrics"):  # rendering and packing need no torch
        assert "torch" not in set().union(*(top_level_imports(module_file(d)) for d in closure(m))), m
