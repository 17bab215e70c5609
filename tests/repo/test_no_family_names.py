"""No code outside a family's or an objective's own modules asks for it by name.

A built-in family (``model.arch``) or objective (``objective.name``) is named only in its own
modules (the family or objective module and its options companion), in the registries that list
them, in the config defaults, and in the converters that are about specific families
(``megafusion/interop/``). Everywhere else, code asks the family or objective (its
``ModelFamily`` / ``Objective`` / ``Options`` fields). The check reads every module's syntax tree
for a comparison of an ``arch`` / ``name`` value with a built-in name (``cfg.model.arch ==
"moma"``, ``o.name in ("lm", "transfusion")``) and an assignment of one to such a field.
"""

from __future__ import annotations

import ast
from pathlib import Path

from megafusion.core.registries import FAMILIES, OBJECTIVES
from tests.helpers import ROOT

NAMES = {*FAMILIES.builtin, *OBJECTIVES.builtin}
ALLOWED = {
    *(module.replace(".", "/") + ".py" for module in FAMILIES.builtin.values()),
    *(module.replace(".", "/") + ".py" for module in OBJECTIVES.builtin.values()),
    *(module.replace(".", "/") + ".py" for module in FAMILIES.option_modules.values()),
    *(module.replace(".", "/") + ".py" for module in OBJECTIVES.option_modules.values()),
    "megafusion/core/registries.py",
    "megafusion/config/schema.py",  # the defaults: model.arch=dense, objective.name=lm
}
CONVERTERS = "megafusion/interop/"
SELECTORS = ("arch", "name")


def _names_in(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value in NAMES}


def _is_selector(node: ast.AST) -> bool:
    text = ast.unparse(node)
    return any(text.endswith(f".{s}") or f'"{s}"' in text or f"'{s}'" in text for s in SELECTORS)


def name_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            named = [s for s in sides if _names_in(s)]
            if named and any(_is_selector(s) for s in sides if s not in named):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Assign) and _names_in(node.value):
            if any(_is_selector(t) for t in node.targets):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_asks_a_builtin_family_or_objective_by_name():
    found = []
    for path in sorted((ROOT / "megafusion").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in ALLOWED or rel.startswith(CONVERTERS):
            continue
        found += name_uses(path)
    assert not found, "ask the family or objective instead of naming it:\n" + "\n".join(found)


def test_the_check_finds_a_name_branch(tmp_path):
    """The control: the check would catch the branches it is there to forbid."""
    probe = tmp_path / "probe.py"
    probe.write_text('def f(cfg, o):\n    return cfg.model.arch == "moma" or o.name in ("lm", "transfusion")\n')
    assert len(name_uses(probe)) == 2
