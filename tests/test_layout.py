"""The layout's one rule: utils/ holds helpers, and no helper imports a step script other than step 2 (the tutorial's
helper module, by design), so the arrows point from the programs down to utils/ and never back up."""
import ast

from tests.conftest import REPO

STEPS = {path.stem for path in REPO.glob("step_*.py")}


def imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_the_steps_are_found():
    assert {"step_2_pretrained", "step_8_evaluate"} <= STEPS


def test_no_helper_imports_a_step_above_step_2():
    climbing = {f"{path.relative_to(REPO)} imports {module}" for path in sorted((REPO / "utils").glob("*.py"))
                for module in imported_modules(path) if module in STEPS - {"step_2_pretrained"}}
    assert not climbing


def test_the_checker_sees_a_climbing_import(tmp_path):
    helper = tmp_path / "helper.py"
    helper.write_text("import os\nfrom step_7_break_defense import figure\n")
    assert "step_7_break_defense" in set(imported_modules(helper))


def test_the_programs_over_the_steps_live_beside_them():
    assert (REPO / "app.py").is_file() and (REPO / "demo.py").is_file()
    assert not (REPO / "utils" / "app.py").exists() and not (REPO / "utils" / "demo.py").exists()
