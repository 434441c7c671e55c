"""The house rules of vegan_scale/, read from its source: imports point down only and form no circle, each outside
library has one door, no room is too long, and no library code changes process-wide state."""

from __future__ import annotations

import ast
from functools import cache

import pytest

from tests.paths import ROOT

PACKAGE = ROOT / "vegan_scale"

# Floors, lowest first: a module may import modules of its own floor or below, never above.
FLOORS = [
    ["errors", "atomic", "stored_json", "retry", "logs", "provenance", "stops", "process_exit", "seeds"],
    ["config", "priors", "noise", "rundir", "metrics_log"],
    ["costs", "models", "penalties", "data", "checkpoint", "export"],
    ["experiment", "registry", "distributed", "tracking"],
    ["evaluation"],
    ["engine"],
    ["api", "cli", "cli_parser", "sweep", "__init__", "__main__"],
]
# Each outside library has one door (the modules allowed to import it).
DOORS = {
    "webdataset": ("data.",),
    "mlflow": ("tracking",),
    "deepspeed": ("distributed.deepspeed_support",),
}
# pure torch: no config object, no distribution, no I/O
PURE_MATH = ("priors", "noise", "costs", "models.", "penalties.")
MAX_FUNCTION_LINES, MAX_FILE_LINES = 80, 400


@cache
def modules() -> dict[str, ast.Module]:
    """{dotted name under vegan_scale (``engine.loop``, ``config`` for config/__init__.py): parsed source}."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imports(tree: ast.Module) -> set[str]:
    """Every module a file imports, at any depth (lazy imports inside functions count too), as dotted names; ours
    without the ``vegan_scale.`` prefix (the package uses absolute imports only: a relative one fails here)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import of {node.module} at line {node.lineno}"
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # a module imported from a package
    return {m.removeprefix("vegan_scale.") for m in found if m.startswith("vegan_scale.")} | {
        m for m in found if not m.startswith("vegan_scale")
    }


def ours(name: str) -> str | None:
    """The module of ours an imported name refers to (``engine.loop`` or, for a package's member, the package)."""
    known = modules()
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def floor(name: str) -> int:
    top = name.split(".")[0]
    return next(i for i, names in enumerate(FLOORS) if top in names)


def test_every_module_has_a_floor():
    for name in modules():
        floor(name)  # StopIteration names the module without one


def test_imports_point_down_only():
    upward = [
        f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})"
        for name, tree in modules().items()
        for target in filter(None, map(ours, imports(tree)))
        if floor(target) > floor(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {name: {t for t in map(ours, imports(tree)) if t and t != name} for name, tree in modules().items()}
    visiting, done, circles = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in visiting:
            circles.append(" -> ".join([*path[path.index(node) :], node]))
            return
        if node in done:
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        visit(name, [])
    assert not circles, "\n".join(circles)


@pytest.mark.parametrize("library", sorted(DOORS))
def test_each_outside_library_has_one_door(library):
    through = sorted(
        name
        for name, tree in modules().items()
        if any(m == library or m.startswith(f"{library}.") for m in imports(tree))
    )
    assert through, f"nothing imports {library}: remove it from DOORS"
    assert all(name.startswith(DOORS[library]) for name in through), through


def test_one_module_builds_the_accelerator():
    builders = {
        name
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Accelerator"
    }
    assert builders == {"distributed.accelerator"}


def test_the_math_sees_no_config_object_distribution_or_io():
    forbidden = ("config.load", "accelerate", "mlflow", "webdataset", "engine", "registry", "data", "tracking")
    leaks = [
        f"{name} imports {m}"
        for name, tree in modules().items()
        if name.startswith(PURE_MATH)
        for m in imports(tree)
        if any(m == f or m.startswith(f"{f}.") for f in forbidden)
    ]
    assert not leaks, leaks


def test_rooms_are_short():
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert not long_files and not long_functions, long_files + long_functions


def test_library_code_leaves_process_wide_state_alone():
    """No module but the CLI sets environment variables or configures the root logger."""
    process_wide = ("os.environ.setdefault", "os.environ.update", "os.putenv", "logging.basicConfig", "logging.root")
    found = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                text = ast.unparse(node.func)
                if text.startswith((*process_wide, "logging.getLogger().")):
                    found.append(f"{name}: {ast.unparse(node)[:80]}")
            elif isinstance(node, ast.Assign) and any("environ[" in ast.unparse(t) for t in node.targets):
                found.append(f"{name}: {ast.unparse(node)[:80]}")
    assert [f for f in found if not f.startswith("cli:")] == [], found
