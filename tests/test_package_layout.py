"""The package's wings and the one direction imports run between them (docs/how-it-runs.md,
"Where the code is"): a wing imports only wings below it, never one above, and no module
imports another in a circle. Imports under ``if TYPE_CHECKING:`` run nowhere and are not
counted; imports inside functions run when the function does and are."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "pipeline_lib"
# Lowest first: a wing may import itself and the wings before it.
WINGS = ["common", "models", "frameworks", "verify", "plan", "job", "results", "cli"]
# The package's top level: the entry points, above every wing.
TOP = {"pipeline_lib.cli", "pipeline_lib.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    if module == "pipeline_lib":  # the package itself: when the process started (STARTED)
        return "common"
    if module in TOP:
        return "cli"
    return module.split(".")[1]


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            return True
    return False


def runtime_imports(path: Path) -> set[str]:
    """The pipeline_lib modules ``path`` imports at run time (a package's name for a
    ``from pipeline_lib.x import y`` where y is a name; the submodule where y is one)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline_lib")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline_lib"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                is_package = (PACKAGE.parent / sub.replace(".", "/")).is_dir()
                found.add(sub if is_module or is_package else node.module)
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: runtime_imports(path) - {name} for name, path in MODULES.items()}


def test_every_module_lies_in_a_wing():
    assert {wing(m) for m in MODULES} <= set(WINGS)
    flat = [
        m for m in MODULES
        if m.count(".") == 1 and m not in TOP and MODULES[m].name != "__init__.py"
    ]  # fmt: skip
    assert flat == [], f"modules outside every wing: {flat}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_wings_only(module):
    mine = WINGS.index(wing(module))
    upward = sorted(t for t in GRAPH[module] if t in MODULES and WINGS.index(wing(t)) > mine)
    assert upward == [], f"{module} ({wing(module)}) imports a wing above it: {upward}"


def test_no_module_imports_another_in_a_circle():
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt not in MODULES or nxt.endswith("__init__"):
                continue
            if state.get(nxt) == "open" and wing(nxt) != "cli":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    # A package's __init__ naming its own modules (the registries of models and frameworks)
    # is not a circle of code.
    real = [c for c in cycles if not any(m in ("pipeline_lib.models", "pipeline_lib.frameworks")
                                          for m in c)]  # fmt: skip
    assert real == [], f"import circles: {real}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The check can fail: a verify module importing a job module is named."""
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from pipeline_lib.job import training\n")
    assert "pipeline_lib.job.training" in runtime_imports(fake)
    guarded = tmp_path / "g.py"
    guarded.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from pipeline_lib.job.training import Item\n"
    )
    assert runtime_imports(guarded) == set()


# Where a dict with a "status" key may be written: the matrix row the verdict makes
# (verify/records.py, its Parquet columns). Results and records are types (verify/results.py).
STATUS_DICTS_AT = {"pipeline_lib.verify.records"}


def status_dicts(path: Path) -> list[int]:
    """The lines of ``path`` with a dict literal that has a ``status`` key."""
    tree = ast.parse(path.read_text())
    return [
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Dict)
        and any(isinstance(k, ast.Constant) and k.value == "status" for k in node.keys)
    ]  # fmt: skip


def test_results_and_records_are_typed_not_dicts_with_a_status():
    found = {
        f"{m}:{line}" for m, p in MODULES.items() if m not in STATUS_DICTS_AT
        for line in status_dicts(p)
    }  # fmt: skip
    assert found == set(), f"dict literals with a status key outside the record types: {found}"


def test_the_check_sees_a_dict_with_a_status(tmp_path):
    fake = tmp_path / "m.py"
    fake.write_text('def f():\n    return {"status": "ok", "reason": ""}\n')
    assert status_dicts(fake) == [2]
