"""The tree's parts: the trainer core imports none of the task kits (maths, logic), the shared evaluation path
(evals) or the toy reproduction."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bridge_trl"
OUTSIDE_CORE = ("maths", "logic", "evals", "toy")


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the package-relative and absolute imports of one module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ("bridge_trl." if node.level else "") + (node.module or "")
            names.add(base.rstrip("."))
            names.update(f"{base}.{alias.name}".replace("..", ".") for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_core_imports_no_task_kit_and_not_the_toy():
    core = sorted(PACKAGE.glob("*.py"))
    assert len(core) > 10
    offending = {
        p.name: sorted(
            m for m in imported_modules(p) if m.split(".")[1:2] and m.split(".")[1] in OUTSIDE_CORE
        )
        for p in core
    }
    assert not {k: v for k, v in offending.items() if v}


def test_the_checker_sees_a_relative_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from .maths.data import normalize_question\nfrom .sft import x\n")
    assert "bridge_trl.maths.data" in imported_modules(module)
