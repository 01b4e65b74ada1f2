"""One place for each thing (issue 14, point 8): modules named after what they hold, none
sharing a name or shadowing the standard library, and the command line and the trainer split
by stage rather than in functions of hundreds of lines."""

from __future__ import annotations

import ast
import sys

import pytest

from conftest import REPO

PACKAGE = REPO / "src" / "cellfoundry"
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__"))


def test_module_names_are_unique():
    stems = [p.stem for p in MODULES]
    assert len(stems) == len(set(stems)), sorted(s for s in stems if stems.count(s) > 1)


def test_no_import_alias_shadows_a_standard_library_module():
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    shadowing = alias.asname in sys.stdlib_module_names
                    assert not shadowing, f"{path}: imports {alias.name} as {alias.asname}"


@pytest.mark.parametrize("module", ["cli.py", "train/run.py"])
def test_stage_functions_stay_short(module):
    tree = ast.parse((PACKAGE / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 80, f"{module}: {node.name} has {length} lines"
