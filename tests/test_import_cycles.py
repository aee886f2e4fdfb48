"""No import circle among cmmerge's modules: every ``import`` counts, also one inside a
function (only those under ``if TYPE_CHECKING:`` never run). Read from the source, nothing
is imported."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cmmerge"


def _imports() -> dict[str, set[str]]:
    """{module: the cmmerge modules it imports}."""
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text())
        typing_only = {
            id(node)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for stmt in block.body
            for node in ast.walk(stmt)
        }
        names: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[module] = {n for n in names if n in files and n != module}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    graph = _imports()
    assert "cmmerge.stages.registry" in graph and len(graph) > 50
    assert _circles(graph) == []


def test_the_check_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The layers under the stages: they take typed values, never the composed config, and never
# reach up into the stages.
LOWER_LAYERS = ("data", "models", "merging", "training", "evaluation", "reporting", "io")


def _external_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_nothing_below_the_stages_imports_the_config_or_the_stages():
    offenders = {}
    for layer in LOWER_LAYERS:
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            bad = {
                n
                for n in _external_imports(path)
                if n.split(".")[0] in ("omegaconf", "hydra")
                or n.startswith(("cmmerge.stages", "cmmerge.config", "cmmerge.commands"))
            }
            if bad:
                offenders[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert offenders == {}
    assert len(list((PACKAGE / "reporting").glob("*.py"))) > 3  # the walk saw the layers


# Stages whose body is a top-level ``work(job_or_spec, folder)`` that reads no config; their
# commands (cmmerge/commands/<stage>.py) read the config into that job.
TYPED_BODIES = (
    "data",
    "cpt",
    "extract",
    "merge",
    "finetune",
    "graft",
    "evaluate",
    "prompt",
    "report",
)


def test_stage_bodies_see_only_their_typed_job():
    for stage in TYPED_BODIES:
        tree = ast.parse((PACKAGE / "stages" / f"{stage}.py").read_text())
        work = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "work")
        names = {n.id for n in ast.walk(work) if isinstance(n, ast.Name)}
        assert "cfg" not in names and len(work.args.args) == 2, stage
        nested = [n.name for n in ast.walk(work) if isinstance(n, ast.FunctionDef)]
        assert nested == ["work"], (stage, nested)  # no closure over the command's config
        command = ast.parse((PACKAGE / "commands" / f"{stage}.py").read_text())
        calls = [
            n
            for n in ast.walk(command)
            if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_stage"
        ]
        # run_stage(run, spec, inputs, work): the folder, view and options come from the spec
        assert len(calls) == 1 and len(calls[0].args) == 4, stage
        assert ast.unparse(calls[0].args[1]) == "spec", stage


def test_only_the_command_line_and_the_config_layer_read_the_composed_config():
    readers = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if any(n.split(".")[0] in ("omegaconf", "hydra") for n in _external_imports(path)):
            readers.add(str(path.relative_to(PACKAGE)))
    layer = {r for r in readers if r.startswith(("config/", "commands/"))}
    # presets.py loads the shipped YAML files (OmegaConf), and reads no composed config
    assert readers - layer == {"cli.py", "presets.py"}
    assert len(layer) > 10  # the walk saw the config layer and the commands
    for path in sorted((PACKAGE / "stages").glob("*.py")):
        imported = _external_imports(path)
        assert not any(n.startswith("cmmerge.commands") for n in imported), path.name
        # from the config layer, a stage reads only the typed specs
        assert {n for n in imported if n.startswith("cmmerge.config")} <= {
            "cmmerge.config.specs"
        }, path.name
