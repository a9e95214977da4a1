"""The tree is the architecture: checks on the source itself (``ast``, no import), so a change
that crosses a layer or closes an import circle fails here, with the modules named.

Layers, lowest first: ``layers/`` and ``models/`` (what a model is built from) never reach up into
the processes or the parent's logic; ``core/`` (the parent's logic) runs with no process and no
thread; each worker role, KV handoff and bench system has one home, and its name is matched
nowhere else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "splitwiser"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), str(path)) for name, path in MODULES.items()}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every import statement, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def imports(module: str) -> set[str]:
    """The modules ``module`` imports (``splitwiser.*`` resolved to the module files, others by
    their top-level name)."""
    is_package = MODULES[module].name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = set()
    for node in _import_nodes(TREES[module]):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            anchor = package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:  # `from pkg import module` names a module, not an attribute
            sub = f"{base}.{alias.name}"
            out.add(sub if sub in MODULES else base)
    return {
        name if name.startswith("splitwiser") else name.split(".")[0]
        for name in out
        if not name.startswith("splitwiser") or name in MODULES
    }


GRAPH = {m: {i for i in imports(m) if i in MODULES and i != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_splitwiser_modules():
    assert _cycles(GRAPH) == []


def _violations(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{module} imports {imported}"
        for module in sorted(MODULES)
        if _in(module, *packages)
        for imported in sorted(imports(module))
        if _in(imported, *forbidden)
    ]


UPPER = ("runtime", "worker", "core", "roles", "handoff", "server", "systems", "benchmark", "cli")


def test_layers_and_models_import_nothing_above_them():
    forbidden = tuple(f"splitwiser.{p}" for p in UPPER) + ("splitwiser.pipeline",)
    assert _violations(("splitwiser.layers", "splitwiser.models"), forbidden) == []


def test_core_runs_without_processes_or_threads():
    forbidden = tuple(f"splitwiser.{p}" for p in ("runtime", "worker", "roles", "server"))
    forbidden += ("multiprocessing", "threading", "subprocess")
    assert _violations(("splitwiser.core",), forbidden) == []


def _string_constants(module: str) -> list[tuple[int, str]]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(TREES[module])
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(TREES[module])
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        and id(node) not in docstrings
    ]  # fmt: skip


# the layers that run requests; the server, the bench and the CLI use these words for other things
# (OpenAI's JSON keys, plot colours, the profiler's phase choice)
RUNTIME = ("splitwiser.core", "splitwiser.runtime", "splitwiser.worker", "splitwiser.kv",
           "splitwiser.layers", "splitwiser.models", "splitwiser.pipeline")  # fmt: skip


@pytest.mark.parametrize(
    "names, home",
    [
        (("prompt", "token", "colocated"), ("splitwiser.roles",)),
        (("copy", "shared"), ("splitwiser.handoff", "splitwiser.config")),
    ],
    ids=["role names", "handoff names"],
)
def test_names_of_what_varies_appear_only_in_their_home(names, home):
    found = [
        f"{module}:{line} {value!r}"
        for module in sorted(MODULES)
        if _in(module, *RUNTIME) and not _in(module, *home)
        for line, value in _string_constants(module)
        if value in names
    ]
    assert found == []


def test_the_handoff_is_chosen_once():
    """``kv_handoff`` is read where the handoff is chosen, nowhere else on the request path."""
    found = [
        f"{module}:{node.lineno}"
        for module in sorted(MODULES)
        if _in(module, *RUNTIME) and not _in(module, "splitwiser.handoff", "splitwiser.config")
        for node in ast.walk(TREES[module])
        if isinstance(node, ast.Attribute) and node.attr == "kv_handoff"
    ]
    assert found == []


# what a bench system's name or spec starts with (``vllm-cpu``, ``http://host:port``)
SYSTEM_WORDS = ("splitwiser", "colocated", "sequential", "batched", "vllm", "http")


def _name_dispatch(module: str) -> list[str]:
    """Comparisons (``==``, ``in``, ``startswith``) of anything with a string that names a
    bench system: the registry in ``splitwiser/systems/`` is where names are matched."""

    def names_system(node) -> bool:
        values = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
        return any(
            isinstance(v, ast.Constant) and isinstance(v.value, str)
            and v.value.startswith(SYSTEM_WORDS)
            for v in values
        )  # fmt: skip

    out = []
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Compare) and any(map(names_system, node.comparators)):
            out.append(f"{module}:{node.lineno}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("startswith", "endswith")
            and any(map(names_system, node.args))
        ):
            out.append(f"{module}:{node.lineno}")
    return out


def test_the_benchmark_never_dispatches_on_a_system_name():
    found = [hit for module in sorted(MODULES) if _in(module, "splitwiser.benchmark")
             for hit in _name_dispatch(module)]  # fmt: skip
    assert found == []


def test_the_dispatch_finder_finds_dispatch():
    source = 'if name == "vllm":\n    pass\nif cfg.spec.startswith(("http://", "https://")):\n'
    source += '    pass\nif name == "fixed" or proc.startswith("sw-"):\n    pass\n'
    tree = ast.parse(source)
    TREES["<probe>"] = tree
    try:
        assert _name_dispatch("<probe>") == ["<probe>:1", "<probe>:3"]
    finally:
        del TREES["<probe>"]
